"""An independent dense ViT (ViTDet / EVA-02 blocks) for exactness tests.

Written from the host models' definitions, not from apt_dense: tokens stay ``(B, H, W, C)``,
window attention zero-pads and partitions the grid, attention is explicit softmax. It reads the
parameters of an ``APTViT`` state dict (same key names as the hosts).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _abs_pos(pos_embed, has_cls, hw):
    if has_cls:
        pos_embed = pos_embed[:, 1:]
    side = int(math.sqrt(pos_embed.shape[1]))
    grid = pos_embed.reshape(1, side, side, -1)
    if (side, side) != tuple(hw):
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return grid


def _partition(x, ws):
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


def _unpartition(x, ws, padded, hw, b):
    hp, wp = padded
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]]


def _rel_table(table, size):
    n = 2 * size - 1
    if table.shape[0] != n:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=n, mode="linear")
        table = table.reshape(-1, n).permute(1, 0)
    idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return table[idx]  # (size, size, C)


def _rope(x, hw, frame, pretrain_len=16, theta=10000.0):
    """EVA-02 VisionRotaryEmbeddingFast on (B, heads, h*w, D); EVA-02 defines it for an
    ``h = w = frame`` grid, other grids keep the frame's scale ``t = i / frame * pretrain_len``."""
    d = x.shape[-1] // 2
    inv = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    h, w = hw
    fh = torch.einsum("i,f->if", torch.arange(h) / frame * pretrain_len, inv).repeat_interleave(2, dim=-1)
    fw = torch.einsum("i,f->if", torch.arange(w) / frame * pretrain_len, inv).repeat_interleave(2, dim=-1)
    f = torch.cat([fh[:, None, :].expand(h, w, -1), fw[None, :, :].expand(h, w, -1)], dim=-1)
    cos, sin = f.cos().reshape(-1, 2 * d), f.sin().reshape(-1, 2 * d)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * cos + rot * sin


def _attention(x, p, cfg, frame_len, cls=None):
    """``x`` (B, h, w, C) plus an optional (B, C) cls token that leads the sequence."""
    b, h, w, c = x.shape
    heads = cfg["num_heads"]
    t = x.reshape(b, h * w, c)
    prefix = 0
    if cls is not None:
        t = torch.cat([cls.unsqueeze(1), t], dim=1)
        prefix = 1
    if cfg["block_type"] == "vitdet":
        qkv = F.linear(t, p["attn.qkv.weight"], p.get("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, prefix + h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q = F.linear(t, p["attn.q_proj.weight"], p.get("attn.q_bias"))
        k = F.linear(t, p["attn.k_proj.weight"])
        v = F.linear(t, p["attn.v_proj.weight"], p.get("attn.v_bias"))
        q, k, v = (z.reshape(b, prefix + h * w, heads, -1).transpose(1, 2) for z in (q, k, v))
        q = torch.cat([q[:, :, :prefix], _rope(q[:, :, prefix:], (h, w), frame_len)], dim=2)
        k = torch.cat([k[:, :, :prefix], _rope(k[:, :, prefix:], (h, w), frame_len)], dim=2)
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if "attn.rel_pos_h" in p:
        rh, rw = _rel_table(p["attn.rel_pos_h"], h), _rel_table(p["attn.rel_pos_w"], w)
        rq = q.reshape(b, heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
        logits = (logits.view(b, heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]).view(
            b, heads, h * w, h * w
        )
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, prefix + h * w, c)
    out = F.linear(out, p["attn.proj.weight"], p["attn.proj.bias"])
    return out[:, prefix:].reshape(b, h, w, c), (out[:, 0] if prefix else None)


def _mlp(x, p, cfg):
    if cfg["block_type"] == "vitdet":
        return F.linear(F.gelu(F.linear(x, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    hidden = F.silu(F.linear(x, p["mlp.w1.weight"], p["mlp.w1.bias"])) * F.linear(x, p["mlp.w2.weight"], p["mlp.w2.bias"])
    hidden = F.layer_norm(hidden, hidden.shape[-1:], p["mlp.ffn_ln.weight"], p["mlp.ffn_ln.bias"], cfg["eps"])
    return F.linear(hidden, p["mlp.w3.weight"], p["mlp.w3.bias"])


def dense_forward(state: dict, cfg: dict, images: torch.Tensor) -> list[torch.Tensor]:
    """Dense reference. ``cfg``: block_type, num_heads, depth, patch_size, window_size,
    window_block_indexes, img_size, eps, has_cls, out_indices. Returns ``(B, C, H/p, W/p)`` maps."""
    ps = cfg["patch_size"]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=ps)
    x = x.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    if "pos_embed" in state:
        x = x + _abs_pos(state["pos_embed"], cfg["has_cls"], (h, w))
    cls = None
    if "cls_token" in state:
        cls = state["cls_token"][0, 0].expand(b, c)
        if "pos_embed" in state:
            cls = cls + state["pos_embed"][0, 0]
    outs = {}
    for i in range(cfg["depth"]):
        p = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        def norm(z, which):
            return F.layer_norm(z, (c,), p[f"{which}.weight"], p[f"{which}.bias"], cfg["eps"])

        y = norm(x, "norm1")
        ws = cfg["window_size"] if i in cfg["window_block_indexes"] else 0
        if ws:
            y, padded = _partition(y, ws)
            y, _ = _attention(y, p, cfg, ws)
            y = _unpartition(y, ws, padded, (h, w), b)
        else:
            y, cls_y = _attention(y, p, cfg, cfg["img_size"] // ps, None if cls is None else norm(cls, "norm1"))
            if cls is not None:
                cls = cls + cls_y
                cls = cls + _mlp(norm(cls, "norm2"), p, cfg)
        x = x + y
        x = x + _mlp(norm(x, "norm2"), p, cfg)
        if i in cfg["out_indices"]:
            outs[i] = x.permute(0, 3, 1, 2)
    return [outs[i] for i in cfg["out_indices"]]
