"""Layout invariants, property-based on random scores and checked on real photos."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from apt_dense import APTViT, PatchSchedule, PendingLayout, TokenPlanner, select_levels, thresholds_from_sequence
from conftest import photo_batch


def pack(level, window, num_levels):
    pending = PendingLayout.from_levels(level, window)
    return pending.pack(pending.counts.tolist(), num_levels)


def check_layout(layout, window):
    b = layout.batch_size
    hc, wc = layout.grid_size
    n = layout.num_tokens
    c2t = layout.cell_to_token
    # every cell covered by exactly one token, each token by 4^level cells of its own image
    assert c2t.min() >= 0 and c2t.max() < n
    covered = torch.bincount(c2t.flatten(), minlength=n)
    assert torch.equal(covered, 4 ** layout.token_level)
    image_of_cell = torch.arange(b).view(b, 1, 1).expand(b, hc, wc)
    assert torch.equal(layout.token_image[c2t], image_of_cell)
    # a token's cells form its aligned square
    rows = torch.arange(hc).view(1, hc, 1).expand(b, hc, wc)
    cols = torch.arange(wc).view(1, 1, wc).expand(b, hc, wc)
    span = 1 << layout.token_level[c2t]
    assert torch.equal(layout.token_cell[c2t][..., 0], rows - rows % span)
    assert torch.equal(layout.token_cell[c2t][..., 1], cols - cols % span)
    # counts and sequences
    assert layout.tokens_per_image.tolist() == list(layout.tokens_per_image_host)
    assert sum(layout.tokens_per_image_host) == n
    cu = layout.images.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == n
    assert torch.equal(layout.token_image, torch.repeat_interleave(torch.arange(b), layout.tokens_per_image))
    if window:
        # no patch crosses a window
        last = layout.token_cell + (1 << layout.token_level).unsqueeze(1) - 1
        assert torch.equal(layout.token_cell // window, last // window)
        seqs = layout.windows
        assert int(seqs.cu_seqlens[-1]) == seqs.num_slots == int(seqs.lengths.sum())
        assert seqs.max_len == int(seqs.lengths.max())
        slot_tokens = seqs.gather if seqs.gather is not None else torch.arange(n)
        real = slot_tokens < n
        assert int(real.sum()) == n
        # each window's slots are exactly the tokens of that window (plus padding)
        win = torch.repeat_interleave(torch.arange(seqs.num_sequences), torch.from_numpy(seqs.lengths))
        token_window = torch.empty(n, dtype=torch.long)
        token_window[slot_tokens[real]] = win[real]
        nwr, nwc = -(-hc // window), -(-wc // window)
        wr, wc_ = layout.token_cell[:, 0] // window, layout.token_cell[:, 1] // window
        assert torch.equal(token_window, layout.token_image * nwr * nwc + wr * nwc + wc_)
        assert seqs.positions.min() >= 0 and seqs.positions.max() <= window - 1


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    levels=st.integers(1, 3),
    blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    window_mult=st.integers(0, 2),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
    thresholds=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
)
def test_layout_invariants_random(batch, levels, blocks, window_mult, pad, seed, thresholds):
    unit = 1 << levels
    hc, wc = blocks[0] * unit * 2, blocks[1] * unit
    window = window_mult * unit
    if window and pad:
        window += unit  # a window that does not tile the grid: padded windows
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(batch, hc >> k, wc >> k, generator=g) for k in range(1, levels + 1)]
    level = select_levels(scores, thresholds[:levels])
    layout = pack(level, window, levels)
    check_layout(layout, window)
    # the quadtree rule itself
    for k in range(1, levels + 1):
        used = (layout.token_level == k)
        cells = layout.token_cell[used] >> k
        s = scores[k - 1][layout.token_image[used], cells[:, 0], cells[:, 1]]
        assert (s < thresholds[k - 1]).all()


def test_select_levels_rule():
    # level 2 above threshold, but its level-1 children below: children merge independently
    s2 = torch.tensor([[[0.9]]])
    s1 = torch.tensor([[[0.1, 0.9], [0.1, 0.1]]])
    level = select_levels([s1, s2], [0.5, 0.5])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(level[0], expected)
    # a used coarse patch wins over its children
    level = select_levels([s1, torch.tensor([[[0.2]]])], [0.5, 0.5])
    assert (level == 2).all()


def test_uniform_image_collapses_to_largest_patches():
    model = APTViT(img_size=256, embed_dim=32, depth=1, num_heads=2, thresholds={32: 1.0, 64: 1.0, 128: 1.0})
    images = torch.full((2, 3, 256, 384), 128.0)
    layout = model.planner(images)
    assert layout.tokens_per_image_host == (6, 6)
    assert (layout.token_level == 3).all()
    check_layout(layout, 0)


@pytest.mark.parametrize("window", [0, 8, 12])
def test_layout_on_real_photos(photos, window):
    model = APTViT(
        img_size=512, embed_dim=32, depth=1, num_heads=2, thresholds={32: 5.5, 64: 5.5},
        window_size=window, window_block_indexes=(0,) if window else (),
    )
    images = photo_batch(photos, 512)
    layout = model.planner(images)
    check_layout(layout, window)
    kept = layout.kept_fraction
    assert all(0 < f < 1 for f in kept) and len(set(kept)) > 1


def test_dense_layout_needs_no_scores():
    layout = TokenPlanner(patch_size=16, window_size=4, adaptive=False)(torch.zeros(2, 3, 96, 160))
    check_layout(layout, 4)
    assert layout.tokens_per_image_host == (60, 60)
    assert (layout.windows.lengths == 16).all()  # padded windows hold their padding slots


def test_schedule_forms_and_errors():
    s = PatchSchedule.create(16, {128: 0.3, 32: 2, 64: 2})
    assert s.patch_sizes == (16, 32, 64, 128) and s.thresholds == (2.0, 2.0, 0.3)
    assert PatchSchedule.create(16, thresholds_from_sequence([2, 2, 0.3], (16, 32, 64, 128))) == s
    assert s.threshold_map() == {32: 2.0, 64: 2.0, 128: 0.3}
    with pytest.raises(ValueError, match="exactly 3"):
        thresholds_from_sequence([2, 2], (16, 32, 64, 128))
    with pytest.raises(ValueError, match="finite"):
        PatchSchedule.create(16, {32: float("nan")})
    with pytest.raises(ValueError, match="finite"):
        PatchSchedule.create(16, {32: float("inf")})
    with pytest.raises(ValueError, match="no gaps"):
        PatchSchedule.create(16, {32: 1.0, 128: 1.0})
    with pytest.raises(ValueError, match="powers of two"):
        thresholds_from_sequence([1.0], (16, 48))
    with pytest.raises(ValueError, match="explicit patch_sizes"):
        PatchSchedule.create(16, [1.0])
    with pytest.raises(TypeError, match="mapping"):
        PatchSchedule.create(16, 5.5)


@settings(max_examples=25, deadline=None)
@given(
    photo=st.integers(0, 4),
    top=st.floats(0, 0.5),
    left=st.floats(0, 0.5),
    cells=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    thresholds=st.tuples(st.floats(0, 9), st.floats(0, 9)),
    window=st.sampled_from([0, 4, 8, 12]),
)
def test_layout_invariants_real_photo_crops(photos, photo, top, left, cells, thresholds, window):
    """Random crops of real photos (sizes in multiples of 64 px), random entropy thresholds."""
    image = photos[photo]
    h, w = cells[0] * 64, cells[1] * 64
    r0, c0 = int(top * (image.shape[0] - h)) if image.shape[0] > h else 0, int(left * (image.shape[1] - w)) if image.shape[1] > w else 0
    crop = torch.from_numpy(image[r0 : r0 + h, c0 : c0 + w]).permute(2, 0, 1).float()
    crop = torch.nn.functional.pad(crop, (0, w - crop.shape[2], 0, h - crop.shape[1]))
    model = APTViT(img_size=256, embed_dim=32, depth=1, num_heads=2, thresholds=dict(zip((32, 64), thresholds)),
                   window_size=window, window_block_indexes=(0,) if window else ())
    layout = model.planner(crop.unsqueeze(0))
    check_layout(layout, window)


def test_process_wide_caches_do_not_grow_with_token_counts():
    """A long stream of batches keeps a fixed set of cached objects: what is cached is keyed by
    the image grid (geometry, at most 64 grids) or the backend choice, never by token counts;
    bucket plans live on their layout."""
    from apt_dense import attention, layout as layout_module

    model = APTViT(img_size=128, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True, window_size=4,
                   window_block_indexes=(0,), thresholds={32: 4.0, 64: 4.0}).eval()
    g = torch.Generator().manual_seed(0)
    layout_module._geometry.cache_clear()
    sizes = []
    with torch.no_grad():
        for step in range(12):
            x = torch.rand(2, 3, 128, 128, generator=g) * 255
            flat = (torch.rand(2, 1, 4, 4, generator=g) < step / 12).repeat_interleave(32, 2).repeat_interleave(32, 3)
            out = model(torch.where(flat, torch.full_like(x, 90.0), x))
            sizes.append((out.layout.num_tokens, layout_module._geometry.cache_info().currsize, len(attention._reported)))
    assert len({tokens for tokens, _, _ in sizes}) > 6
    assert {cached for _, cached, _ in sizes} == {1} and len({reported for _, _, reported in sizes}) == 1
    assert layout_module._geometry.cache_info().maxsize == 64
