"""Two zoo networks beyond convolutions: a Vision Transformer for small images and an LSTM that
reads an image row by row.

Both are built from ``nn.Linear`` layers (attention's query, key and value are three Linear
layers, the LSTM's gates two), so every weight that computes is prunable by default and each of
q, k and v is a layer of its own for a layerwise scope. Attention is written out (softmax of
scaled dot products) rather than called through ``F.scaled_dot_product_attention``: the fused
kernels have no second derivative and no forward-mode derivative, which GraSP, NTK-SAP and the
NTK engine need.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..core.checks import check_int
from ._base import (ZooModel, check_image_shape, check_input_shape, check_num_classes, param, torch_default_,
                    truncated_normal_)

__all__ = ["ViT", "LSTMClassifier", "vit", "lstm"]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x) with GELU."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(ZooModel):
    """Vision Transformer (Dosovitskiy et al., 2021) at CIFAR scale: non-overlapping patches
    embedded by a Linear layer, a class token, learned position embeddings, pre-norm blocks, a
    final LayerNorm and a Linear head on the class token. Initialised as timm's ViT: weights
    N(0, 0.02^2) truncated at 2 sigma, biases 0, LayerNorm (1, 0), position embeddings as the
    weights, class token 0."""

    def __init__(self, input_shape, num_classes, patch: int, dim: int, depth: int, heads: int, mlp: int):
        super().__init__(input_shape, num_classes)
        c, h, w = self.input_shape
        self.patch = patch
        tokens = (h // patch) * (w // patch)
        self.embed = nn.Linear(c * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reinitialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p)  # [b, c, H/p, W/p, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])

    @torch.no_grad()
    def reinitialize(self) -> "ViT":
        for m in self.modules():
            if isinstance(m, nn.Linear):
                truncated_normal_(param(m, "weight"), 0.02)
                nn.init.zeros_(param(m, "bias"))
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        truncated_normal_(self.pos, 0.02)
        nn.init.zeros_(self.cls_token)
        return self


def vit(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *, patch: int = 4, dim: int = 128,
        depth: int = 6, heads: int = 4, mlp: int = 256) -> ViT:
    """A small ViT for 32x32 images: 4x4 patches (64 tokens and a class token), width 128, 6
    blocks of 4 heads, MLP 256; 811,146 parameters on CIFAR-10."""
    c, h, w = check_image_shape(input_shape, "vit")
    check_num_classes(num_classes)
    patch = check_int(patch, "patch", lo=1)
    dim, depth, heads, mlp = (check_int(v, n, lo=1) for v, n in ((dim, "dim"), (depth, "depth"), (heads, "heads"),
                                                                   (mlp, "mlp")))
    if h % patch or w % patch:
        raise ValueError(f"patch: {patch} does not divide the image size {h}x{w}")
    if dim % heads:
        raise ValueError(f"heads: {heads} does not divide dim={dim}")
    return ViT((c, h, w), num_classes, patch, dim, depth, heads, mlp)


class LSTMClassifier(ZooModel):
    """An LSTM that reads an image as a sequence of rows (MNIST: 28 steps of 28 pixels) and
    classifies from its last hidden state. Each layer's gates are two Linear layers (``ih`` on the
    input, with the bias; ``hh`` on the previous hidden state, without), in PyTorch's gate order
    (input, forget, cell, output); initialised as ``nn.LSTM``: every weight and bias uniform in
    +-1/sqrt(hidden)."""

    def __init__(self, input_shape, num_classes, hidden: int, layers: int):
        super().__init__(input_shape, num_classes)
        features = self.input_shape[-1]
        self.hidden = hidden
        self.ih = nn.ModuleList([nn.Linear(features if i == 0 else hidden, 4 * hidden) for i in range(layers)])
        self.hh = nn.ModuleList([nn.Linear(hidden, 4 * hidden, bias=False) for _ in range(layers)])
        self.fc = nn.Linear(hidden, num_classes)
        self.reinitialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], -1, self.input_shape[-1])  # rows as time steps
        for ih, hh in zip(self.ih, self.hh):
            h = seq.new_zeros(seq.shape[0], self.hidden)
            c = torch.zeros_like(h)
            gates_in = ih(seq)  # every step's input projection in one matmul
            outputs = []
            for t in range(seq.shape[1]):
                i, f, g, o = (gates_in[:, t] + hh(h)).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            seq = torch.stack(outputs, dim=1)
        return self.fc(seq[:, -1])

    @torch.no_grad()
    def reinitialize(self) -> "LSTMClassifier":
        bound = 1.0 / math.sqrt(self.hidden)
        for m in [*self.ih, *self.hh]:
            for t in (param(m, "weight"), param(m, "bias")):
                if t is not None:
                    nn.init.uniform_(t, -bound, bound)
        torch_default_(self.fc)
        return self


def lstm(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, *, hidden: int = 128,
         layers: int = 1) -> LSTMClassifier:
    """An LSTM classifier reading the rows of an image; 81,674 parameters on MNIST (hidden 128)."""
    shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    return LSTMClassifier(shape, num_classes, check_int(hidden, "hidden", lo=1), check_int(layers, "layers", lo=1))
