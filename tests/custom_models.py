"""Handwritten attention blocks of the layouts users write themselves."""

from __future__ import annotations

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
