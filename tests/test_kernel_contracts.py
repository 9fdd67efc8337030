"""The fused attention paths (``flash_attn``, ``torch_varlen``) without a GPU.

A reference kernel stands in for FlashAttention's varlen kernel: it asserts every documented
precondition of the real kernels (fp16/bf16, contiguous last dim, ``cu_seqlens`` int32 on the
tensors' device with a leading 0, ``max_seqlen`` a Python int, head dim at most 256 and a multiple
of 8, no bias), then computes attention per sequence. The kernel lookup and the CUDA-only
availability check are monkeypatched, so the model's wiring runs end to end on CPU.
"""
import contextlib

import pytest
import torch

from apt_dense import APTViT, available_backends, packed_attention
from apt_dense import attention as attention_module
from apt_dense import model as model_module
from test_attention import make_seqs, naive, qkv

FUSED = ("flash_attn", "torch_varlen")


class HostConversions:
    """Records Tensor-to-Python conversions (each one a host sync on CUDA) while active."""

    NAMES = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        self.calls = []
        self._paused = False
        self._originals = {}

    @contextlib.contextmanager
    def paused(self):
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def __enter__(self):
        def counting(name, original):
            def call(tensor, *args, **kwargs):
                if not self._paused:
                    self.calls.append(name)
                return original(tensor, *args, **kwargs)
            return call

        for name in self.NAMES:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counting(name, self._originals[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


class ReferenceVarlenKernel:
    """``flash_attn_varlen_func`` / ``varlen_attn`` on CPU: preconditions asserted, then attention
    per sequence in float32 (default scale, no dropout, not causal)."""

    def __init__(self, conversions: HostConversions | None = None):
        self.calls = []
        self.conversions = conversions

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs):
        with self.conversions.paused() if self.conversions else contextlib.nullcontext():
            self.check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, args, kwargs)
            bounds = cu_seqlens_q.tolist()
            outputs = []
            for start, end in zip(bounds, bounds[1:]):
                qs, ks, vs = (t[start:end].float().transpose(0, 1) for t in (q, k, v))  # (H, L, D)
                weights = (qs @ ks.transpose(1, 2) * q.shape[-1] ** -0.5).softmax(-1)
                outputs.append((weights @ vs).transpose(0, 1).to(q.dtype))
            lengths = [end - start for start, end in zip(bounds, bounds[1:])]
            self.calls.append(dict(dtype=q.dtype, max_seqlen=max_seqlen_q, lengths=lengths))
            return torch.cat(outputs)

    @staticmethod
    def check(q, k, v, cu_q, cu_k, max_q, max_k, args, kwargs):
        assert not args and not kwargs, f"only the seven positional arguments, got {args} {kwargs}"
        for t in (q, k, v):
            assert t.dim() == 3 and t.shape == q.shape, "q, k, v are (total, heads, head_dim), same shape"
            assert t.dtype in (torch.float16, torch.bfloat16) and t.dtype == q.dtype, t.dtype
            assert t.stride(-1) == 1, "last dim contiguous"
            assert t.device == q.device
        head_dim = q.shape[-1]
        assert head_dim <= 256 and head_dim % 8 == 0, f"head dim {head_dim}"
        for cu, max_len in ((cu_q, max_q), (cu_k, max_k)):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
            assert int(cu[0]) == 0 and int(cu[-1]) == q.shape[0], "leading 0, total last"
            lengths = cu.diff()
            assert bool((lengths >= 0).all())
            assert type(max_len) is int and max_len >= int(lengths.max()), "max_seqlen: a Python int upper bound"


@pytest.fixture
def fused_kernels(monkeypatch):
    """Both fused backends available on CPU, served by one reference kernel."""
    kernel = ReferenceVarlenKernel()
    monkeypatch.setattr(attention_module, "_fused_kernels_run_on", lambda device: True)
    monkeypatch.setattr(attention_module, "_flash_attn_func", lambda: kernel)
    monkeypatch.setattr(attention_module, "_torch_varlen_func", lambda: kernel)
    return kernel


def make_model(backend, **kwargs):
    args = dict(img_size=128, embed_dim=64, depth=3, num_heads=4, block_type="eva02", mlp_ratio=8 / 3,
                window_size=4, window_block_indexes=(0, 2), thresholds={32: 4.0, 64: 4.0}, attention_backend=backend)
    args.update(kwargs)
    torch.manual_seed(0)
    return APTViT(**args).eval()


def ragged_images(size=(128, 128)):
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size) * 255
    x[0, :, : size[0] // 2] = 30.0  # image 0 merges, image 1 barely: ragged sequences
    return x


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backends_match_naive(fused_kernels, backend, dtype):
    lengths = [1, 9, 3, 130, 2, 17, 64]
    seqs = make_seqs(lengths)
    q, k, v = qkv(sum(lengths), heads=4, dim=64, dtype=dtype)
    out = packed_attention(q, k, v, seqs, backend)
    torch.testing.assert_close(out, naive(q, k, v, lengths), atol=2e-2, rtol=2e-2)
    assert len(fused_kernels.calls) == 1


@pytest.mark.parametrize("backend", ["auto", *FUSED])
@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, (128, 128)),  # windows and global blocks
        (dict(thresholds={32: 4.0}), (96, 160)),  # 6x10 cells, padded windows: padding slots too
        (dict(block_type="vitdet", mlp_ratio=4.0), (128, 128)),  # fused qkv, no relative positions
        (dict(use_cls_token=True, window_size=0, window_block_indexes=()), (128, 128)),  # cls prefix slots
    ],
)
def test_model_wiring_through_fused_kernel(fused_kernels, backend, kwargs, size):
    model = make_model(backend, **kwargs).to(torch.bfloat16)
    x = ragged_images(size).to(torch.bfloat16)
    with torch.no_grad():
        fused = model(x)
        assert len(fused_kernels.calls) == len(model.blocks)
        assert all(call["dtype"] == torch.bfloat16 for call in fused_kernels.calls)
        assert len(set(fused.layout.tokens_per_image_host)) == 2
        # each block got its own kind's sequences: windows (with padding slots), or images (with a cls slot)
        layout, cls_slots = fused.layout, int(model.cls_token is not None)
        for block, call in zip(model.blocks, fused_kernels.calls):
            expected = layout.windows.lengths if block.use_window else layout.images.lengths + cls_slots
            assert call["lengths"] == expected.tolist()
        model.attention_backend = "sdpa"
        reference = model(x)
    assert len(fused_kernels.calls) == len(model.blocks)
    for a, b in zip(fused.features, reference.features):
        assert relative_error(a, b) < 2e-2


def test_backend_resolved_once_per_forward(fused_kernels, monkeypatch):
    calls = {"model": 0, "attention": 0}

    def counted(where, resolve):
        def call(*args, **kwargs):
            calls[where] += 1
            return resolve(*args, **kwargs)
        return call

    monkeypatch.setattr(model_module, "resolve_backend", counted("model", model_module.resolve_backend))
    monkeypatch.setattr(attention_module, "resolve_backend", counted("attention", attention_module.resolve_backend))
    model = make_model("auto").to(torch.bfloat16)
    with torch.no_grad():
        model(ragged_images().to(torch.bfloat16))
    assert calls == {"model": 1, "attention": 0}
    assert len(fused_kernels.calls) == len(model.blocks)


def test_autocast_sends_low_precision_to_fused_kernel(fused_kernels):
    model = make_model("auto")
    x = ragged_images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x).features[0]
        model.attention_backend = "sdpa"
        reference = model(x).features[0]
    assert [call["dtype"] for call in fused_kernels.calls] == [torch.bfloat16] * len(model.blocks)
    assert relative_error(fused, reference) < 2e-2


def test_float32_and_relative_positions_stay_on_sdpa(fused_kernels):
    with torch.no_grad():
        make_model("auto")(ragged_images())  # float32: the kernels take fp16/bf16 only
        rel_pos = make_model("auto", block_type="vitdet", mlp_ratio=4.0, use_rel_pos=True).to(torch.bfloat16)
        rel_pos(ragged_images().to(torch.bfloat16))  # an additive bias: sdpa only
    assert fused_kernels.calls == []
    assert rel_pos.attention_backends("cpu", torch.bfloat16) == {"global": "sdpa", "window": "sdpa"}
    forced = make_model("flash_attn", block_type="vitdet", mlp_ratio=4.0, use_rel_pos=True).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="additive bias"):
        forced(ragged_images().to(torch.bfloat16))


@pytest.mark.parametrize("head_dim", [12, 264])
def test_head_dims_the_kernels_reject_stay_on_sdpa(fused_kernels, head_dim):
    cpu = torch.device("cpu")
    assert available_backends(cpu, torch.bfloat16, False, head_dim) == ["sdpa"]
    assert available_backends(cpu, torch.bfloat16, False, 64) == [*FUSED, "sdpa"]
    if head_dim == 12:  # a whole model: 48 dims over 4 heads
        model = make_model("auto", embed_dim=48).to(torch.bfloat16)
        with torch.no_grad():
            model(ragged_images().to(torch.bfloat16))
        assert fused_kernels.calls == []
        model.attention_backend = "torch_varlen"
        with pytest.raises(RuntimeError, match="head dim 12"):
            model(ragged_images().to(torch.bfloat16))


def test_fused_path_keeps_one_host_sync(monkeypatch):
    conversions = HostConversions()
    kernel = ReferenceVarlenKernel(conversions)
    monkeypatch.setattr(attention_module, "_fused_kernels_run_on", lambda device: True)
    monkeypatch.setattr(attention_module, "_flash_attn_func", lambda: kernel)
    model = make_model("auto", thresholds={32: 4.0}).to(torch.bfloat16)
    x = ragged_images((96, 160)).to(torch.bfloat16)  # padded windows
    with torch.no_grad():
        model(x)  # warm the geometry caches
        with conversions:
            model(x)
    assert conversions.calls == ["tolist"]
    assert len(kernel.calls) == 2 * len(model.blocks)
