"""torch.compile: blocks compiled once per kind of block, then batches with other token counts,
sequence lengths and bucket counts run without recompiling, and match the eager model.

Most tests compile with ``aot_eager`` (dynamo + AOTAutograd, the custom ops' fake and autograd
implementations, no code generation) to stay fast on 2 CPU cores; one compiles with inductor.
"""
import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from apt_dense import APTViT
from apt_dense import attention as attention_module
from apt_dense.attention import MAX_BUCKETS, bucket_groups, bucket_plan
from test_attention import make_seqs, naive, qkv
from test_kernel_contracts import HostConversions, ReferenceVarlenKernel


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def tiny(**kwargs):
    args = dict(img_size=128, embed_dim=32, depth=2, num_heads=2, block_type="eva02", mlp_ratio=8 / 3,
                window_size=4, window_block_indexes=(0,), thresholds={32: 4.0, 64: 4.0})
    args.update(kwargs)
    torch.manual_seed(0)
    return APTViT(**args).eval()


def stream(count, size=(128, 128), batch=2):
    """Batches whose images merge different areas: every batch has its own token count, window
    lengths and bucket shapes."""
    batches = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, 3, *size, generator=g) * 255
        x[0, :, : 16 + 16 * seed % (size[0] - 16)] = 30.0
        x[-1, :, :, : 16 + 48 * seed % (size[1] - 16)] = 80.0
        batches.append(x)
    return batches


def assert_stream_compiles_once(model, batches, backend="aot_eager", atol=1e-5):
    """Compiles on the first batch only; every output matches the eager model's. Returns the
    compile counter."""
    counter = CompileCounterWithBackend(backend)
    with torch.no_grad():
        eager = [model(x) for x in batches]
        model.compile_blocks(backend=counter)
        tokens = set()
        for i, (x, reference) in enumerate(zip(batches, eager)):
            out = model(x)
            if i == 0:
                compiled_frames = counter.frame_count
            tokens.add(out.layout.num_tokens)
            for a, b in zip(out.features, reference.features):
                torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    assert len(tokens) == len(batches), "the stream should change the token count every batch"
    assert counter.frame_count == compiled_frames, "recompiled after warm-up"
    return counter


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, (128, 128)),  # window + global blocks, RoPE
        (dict(thresholds={32: 4.0}), (96, 160)),  # padded windows: padding slots, gather/scatter
        (dict(block_type="vitdet", mlp_ratio=4.0, use_rel_pos=True), (128, 128)),  # bias inside the op
        (dict(use_cls_token=True, window_size=0, window_block_indexes=()), (128, 128)),  # cls prefix slots
    ],
)
def test_new_token_counts_do_not_recompile(kwargs, size):
    model = tiny(**kwargs)
    counter = assert_stream_compiles_once(model, stream(4, size))
    kinds = 2 if model.window_size else 1
    assert counter.frame_count == kinds  # one graph per kind of block, shared by its blocks


def test_new_batch_and_image_sizes_do_not_recompile():
    # tokens of a batch are packed into one sequence: batch and image size are more dynamic lengths
    shapes = [(2, (128, 128)), (1, (128, 256)), (3, (256, 256))]
    batches = [stream(seed + 1, size, batch)[seed] for seed, (batch, size) in enumerate(shapes)]
    counter = assert_stream_compiles_once(tiny(), batches)
    assert counter.frame_count == 2


@pytest.mark.parametrize("block_type", ["vitdet", "eva02"])
def test_image_sizes_with_and_without_padded_windows_do_not_recompile(block_type):
    # 6x10 and 10x6 cells are padded to 8x12 / 12x8 by the 4-cell windows, 8x8 is not; relative
    # positions of global blocks span each image's own grid
    extra = dict(mlp_ratio=4.0, use_rel_pos=True, rel_pos_zero_init=False) if block_type == "vitdet" else {}
    model = tiny(block_type=block_type, thresholds={32: 4.0}, **extra)
    sizes = [(96, 160), (128, 128), (160, 96), (96, 96)]
    batches = [stream(seed + 1, size)[seed] for seed, size in enumerate(sizes)]
    counter = assert_stream_compiles_once(model, batches)
    assert counter.frame_count == 2


def test_dense_model_compiles_once():
    # the baseline side: equal-length sequences by construction, a plain batched SDPA in the graph
    model = tiny(adaptive=False)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        model.compile_blocks(backend=counter)
        for x in stream(3):
            model(x)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_inductor_matches_eager_without_recompiling():
    counter = assert_stream_compiles_once(tiny(depth=3, window_block_indexes=(0, 2)), stream(4), "inductor", atol=1e-4)
    assert counter.frame_count == 2


def test_whole_model_compile_breaks_only_before_the_blocks():
    from torch._dynamo.utils import counters

    model = tiny()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    batches = stream(4)
    with torch.no_grad():
        eager = [model(x) for x in batches]
        outputs = [compiled(x) for x in batches]
    for out, reference in zip(outputs, eager):
        for a, b in zip(out.features, reference.features):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    frames = counter.frame_count
    with torch.no_grad():
        compiled(stream(5)[-1])
    assert counter.frame_count == frames
    breaks = [reason for reason in counters["graph_break"] if "disable" in reason]
    assert breaks and all("_plan_and_embed" in reason for reason in breaks), dict(counters["graph_break"])


def test_compiled_gradients_match_eager():
    """Training through the custom op: its backward recomputes eagerly, relative-position tables included."""
    model = tiny(block_type="vitdet", mlp_ratio=4.0, use_rel_pos=True, rel_pos_zero_init=False).train()
    x = stream(1)[0]

    def grads():
        model.zero_grad()
        sum(f.square().mean() for f in model(x).features).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    eager = grads()
    model.compile_blocks(backend="aot_eager")
    compiled = grads()
    assert compiled.keys() == eager.keys() and any("rel_pos" in name for name in compiled)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_forward_keeps_one_host_sync():
    model = tiny(thresholds={32: 4.0})
    batches = stream(3, (96, 160))
    conversions = HostConversions()
    with torch.no_grad():
        model.compile_blocks(backend="aot_eager")
        for x in batches[:2]:
            model(x)  # compile, warm the caches
        with conversions:
            model(batches[2])
    assert conversions.calls == ["tolist"]


# The fused path without a GPU: torch's varlen_attn is a custom op with a fake implementation,
# so a custom op around the reference kernel stands in for it.
_kernel = [ReferenceVarlenKernel()]


@torch.library.custom_op("apt_dense_test::varlen_reference", mutates_args=())
def _varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int) -> torch.Tensor:
    return _kernel[0](q, k, v, cu_q, cu_k, max_q, max_k)


@_varlen_reference.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


@pytest.fixture
def compiled_fused_kernels(monkeypatch):
    _kernel[0] = ReferenceVarlenKernel()
    monkeypatch.setattr(attention_module, "_fused_kernels_run_on", lambda device: True)
    monkeypatch.setattr(attention_module, "_flash_attn_func", lambda: _varlen_reference)
    monkeypatch.setattr(attention_module, "_torch_varlen_func", lambda: _varlen_reference)
    return _kernel[0]


def test_compiled_fused_path_takes_torch_varlen_with_a_static_bound(compiled_fused_kernels):
    model = tiny(thresholds={32: 4.0}).to(torch.bfloat16)
    assert model.attention_backends("cpu", torch.bfloat16) == {"global": "flash_attn", "window": "flash_attn"}
    counter = CompileCounterWithBackend("aot_eager")
    batches = [x.to(torch.bfloat16) for x in stream(3, (96, 160))]
    with torch.no_grad():
        model.compile_blocks(backend=counter)
        assert model.attention_backends("cpu", torch.bfloat16) == {"global": "torch_varlen", "window": "torch_varlen"}
        outputs = [model(x) for x in batches]
        frames = counter.frame_count
        model(batches[0])
    assert counter.frame_count == frames == 2
    calls = compiled_fused_kernels.calls
    assert len(calls) == 4 * len(model.blocks)
    # max_seqlen is the frame's capacity, never the batch's longest sequence: no int to guard on
    cells = 6 * 10
    assert {call["max_seqlen"] for call in calls} == {4 * 4, cells}
    assert len({sum(call["lengths"]) for call in calls}) > 2
    model.attention_backend = "sdpa"
    with torch.no_grad():
        for x, out in zip(batches, outputs):
            reference = model(x).features[0]
            assert float((out.features[0].float() - reference.float()).norm() / reference.float().norm()) < 2e-2


def test_flash_attn_forced_under_compile_is_an_error(compiled_fused_kernels):
    model = tiny(attention_backend="flash_attn").to(torch.bfloat16).compile_blocks(backend="aot_eager")
    with pytest.raises(RuntimeError, match="flash-attn issue 1894"), torch.no_grad():
        model(stream(1)[0].to(torch.bfloat16))


@pytest.mark.parametrize("lengths", [[5], [16, 1, 3, 9, 16, 2, 7, 12, 4, 8, 1, 15], list(range(1, 200))])
def test_bucket_groups_cover_every_sequence_in_few_buckets(lengths):
    lengths = np.asarray(lengths)
    groups = bucket_groups(lengths)
    assert 1 <= len(groups) <= MAX_BUCKETS
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    widths = [lengths[g].max() for g in groups]
    assert widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("lengths", [[7, 7, 7], [1, 9, 3, 30, 2, 17, 16, 8], [64, 3]])
def test_bucketed_op_matches_naive(lengths):
    """The op compiled graphs call, run directly: equal lengths (q/k/v viewed in order), padded
    buckets, and gradients through its recomputing backward."""
    seqs = make_seqs(lengths)
    plan = bucket_plan(seqs, torch.device("cpu"))
    q, k, v = (t.requires_grad_() for t in qkv(sum(lengths)))
    out = torch.ops.apt_dense.bucketed_sdpa(q, k, v, list(plan.slots), list(plan.key_ok), None, None, None, plan.frame_size)
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference = naive(q2, k2, v2, lengths)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(torch.ops.apt_dense.bucketed_sdpa.default,
                          (q, k, v, list(plan.slots), list(plan.key_ok), None, None, None, plan.frame_size))
