"""Handwritten attention blocks of the layouts users write themselves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeparateQKV(nn.Module):
    """Separate q/k/v Linears, explicit softmax attention, GQA when kv_heads < heads."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        x = attn.softmax(dim=-1) @ v
        return self.o_proj(x.transpose(1, 2).reshape(B, N, C))


class FusedKV(nn.Module):
    """A q Linear and a fused kv Linear, SDPA core."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, self.head_dim).permute(0, 2, 1, 3)
        kv = (
            self.kv(x)
            .reshape(B, N, 2, self.heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Stack(nn.Module):
    """Blocks of one or two widths: each width is a stage, like Swin's."""

    def __init__(self, make_attn=SeparateQKV, depths=(3,), dims=(32,)):
        super().__init__()
        self.stages = nn.ModuleList()
        for depth, dim in zip(depths, dims, strict=True):
            self.stages.append(
                nn.Sequential(*[Block(make_attn(dim), dim) for _ in range(depth)])
            )
        self.downs = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x):
        for i, stage in enumerate(self.stages):
            if i:
                x = self.downs[i - 1](x)
            x = stage(x)
        return x


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.mlp(x)


# ---------------------------------------------------------------------------
# Patterns of real models, written small (see tests/test_find_attention.py)


def _heads(x, heads):
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)  # (B, H, N, D)


def _rotate(x, sin, cos):
    # Rotary embedding on pairs of channels, as eva's apply_rot_embed_cat
    pairs = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + pairs * sin


class PrefixRotary(nn.Module):
    """eva: rotary embedding on every token but the first, then cat them back."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        angle = torch.randn(16, dim // heads)
        self.register_buffer("sin", angle.sin(), persistent=False)
        self.register_buffer("cos", angle.cos(), persistent=False)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        sin, cos = self.sin[: N - 1], self.cos[: N - 1]
        q = torch.cat([q[:, :, :1], _rotate(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], _rotate(k[:, :, 1:], sin, cos)], dim=2)
        x = F.scaled_dot_product_attention(q, k, v.type_as(q))
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LinearNorm(nn.Module):
    """levit: a Linear then a BatchNorm1d over the flattened tokens."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out, bias=False)
        self.bn = nn.BatchNorm1d(dim_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TalkingHeads(nn.Module):
    """cait: Linears over the heads before and after the softmax; normed q, k, v."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (LinearNorm(dim, dim) for _ in range(3))
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class GatedPositional(nn.Module):
    """convit's GPSA: softmax scores mixed with positional scores, renormalised."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 5):
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.randn(1, heads, tokens, tokens))
        self.gating = nn.Parameter(torch.zeros(heads))

    def forward(self, x):
        B, N, C = x.shape
        qk = self.qk(x).reshape(B, N, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        scores = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        gate = torch.sigmoid(self.gating).view(1, -1, 1, 1)
        attn = (1.0 - gate) * scores + gate * self.pos.softmax(dim=-1)
        attn = attn / attn.sum(dim=-1).unsqueeze(-1)
        v = _heads(self.v(x), self.heads)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class ChannelsFirst(nn.Module):
    """shvit / efficientvit: 1x1-conv qkv (with BatchNorm) on (B, C, H, W),
    pooled q and k, ``v @ attn.transpose(-2, -1)``, and a 1x1-conv proj."""

    def __init__(self, dim: int = 16, key_dim: int = 8):
        super().__init__()
        self.key_dim = key_dim
        self.qkv = nn.Sequential(
            nn.Conv2d(dim, 2 * key_dim + dim, 1, bias=False),
            nn.BatchNorm2d(2 * key_dim + dim),
        )
        self.dw = nn.Conv2d(key_dim, key_dim, 3, padding=1, groups=key_dim)
        self.proj = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).split([self.key_dim, self.key_dim, C], dim=1)
        q = self.dw(q)  # depthwise: each channel stays a row of qkv
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, C, HW)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).reshape(B, C, H, W)
        return self.proj(x)


class PooledQuery(nn.Module):
    """hiera / mvitv2: q pooled over tokens (max over windows, average pool)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pool = nn.AvgPool1d(3, stride=1, padding=1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D)
        q = q.reshape(B, self.heads, 2, N // 2, -1).amax(dim=2)  # (B, H, N/2, D)
        k = self.pool(k.flatten(0, 1).transpose(1, 2)).transpose(1, 2)
        k = k.reshape(B, self.heads, N, -1)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N/2, D)
        x = self.proj(x.transpose(1, 2).reshape(B, N // 2, C))
        return x.repeat_interleave(2, dim=1)  # back to N tokens for the residual


class HaloWindows(nn.Module):
    """halonet: keys and values in padded, overlapping windows (pad, unfold)."""

    def __init__(self, dim: int = 32, window: int = 2, halo: int = 1):
        super().__init__()
        self.window, self.halo = window, halo
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        size = self.window + 2 * self.halo
        q = self.q(x).reshape(B, N // self.window, self.window, C)
        kv = F.pad(self.kv(x).transpose(1, 2), (self.halo, self.halo))  # (B, 2C, N+)
        kv = kv.unfold(2, size, self.window).permute(0, 2, 3, 1)  # (B, n, size, 2C)
        k, v = kv.split([C, C], dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.reshape(B, N, C))


class GlobalQuery(nn.Module):
    """gcvit: the query is a learned tensor, not a projection; ``qkv`` holds k, v."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 5):
        super().__init__()
        self.heads = heads
        self.q_global = nn.Parameter(torch.randn(1, tokens, dim))
        self.qkv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        kv = self.qkv(x).reshape(B, N, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q = _heads(self.q_global.expand(B, -1, -1), self.heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ResidualQuery(nn.Module):
    """A q that is a projection plus a shortcut: no projection owns its rows."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x):
        q = _heads(self.q(x) + x, self.heads)
        k, v = _heads(self.k(x), self.heads), _heads(self.v(x), self.heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.heads * x.shape[-1])


class InterleavedHeads(nn.Module):
    """tiny_vit / levit: qkv rows ordered per head (q_h, k_h, v_h for each h)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, self.heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(C // self.heads, dim=3))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SharedLayer(nn.Module):
    """ALBERT: one attention module called at every depth."""

    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.attn, self.depth = FusedKV(dim), depth

    def forward(self, x):
        for _ in range(self.depth):
            x = x + self.attn(x)
        return x


class Factorized(nn.Module):
    """CoaT: softmax over the keys, context ``k^T v``, then ``q @ context``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, H, D, D)
        x = (q @ context).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class CosineRotary(nn.Module):
    """swinv2 and qwen2 as export writes them: q and k divided by their own norm
    (expanded to their shape), and a rotary table as large as k (one key head)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.head_dim)
        self.register_buffer("freq", torch.randn(self.head_dim), persistent=False)

    def forward(self, x):
        B, N, C = x.shape
        q = _heads(self.q(x), self.heads)
        k, v = self.kv(x).view(B, N, 1, 2 * self.head_dim).transpose(1, 2).chunk(2, -1)
        angle = torch.arange(N, dtype=x.dtype)[:, None] * self.freq  # (N, D)
        cos = angle.cos().expand(B, 1, N, self.head_dim)  # as large as k
        k = k * cos
        q = q / q.norm(dim=-1, keepdim=True).expand_as(q)
        k = k / k.norm(dim=-1, keepdim=True).expand_as(k)
        k, v = k.expand(B, self.heads, N, -1), v.expand(B, self.heads, N, -1)
        x = F.scaled_dot_product_attention(q, k, v)
        return x.transpose(1, 2).reshape(B, N, C)


class HalfHidden(nn.Module):
    """Two plain attention blocks, then two that fx keeps as leaves (torch's own
    ``nn.MultiheadAttention``): fx sees half of the attention, export all of it."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.plain = nn.ModuleList([SeparateQKV(dim), SeparateQKV(dim)])
        self.mha = nn.ModuleList(
            [nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(2)]
        )

    def forward(self, x):
        for block in self.plain:
            x = x + block(x)
        for block in self.mha:
            x = x + block(x, x, x, need_weights=False)[0]
        return x


class Untraceable(nn.Module):
    """Blocks behind a branch on a tensor's value: neither fx nor export reads it."""

    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(SeparateQKVNamed(dim), dim) for _ in range(depth)
        )

    def forward(self, x):
        for block in self.blocks:
            if x.abs().mean().item() > 1e-6:  # data-dependent Python control flow
                x = block(x)
        return x


class SeparateQKVNamed(SeparateQKV):
    """SeparateQKV with the q_proj/k_proj/v_proj/o_proj names of transformers."""
