"""Built-in example targets for the ``nmcompile`` CLI: small models that return their training loss.

Each factory returns ``(model, example_inputs)`` like a user's ``FILE.py:factory``. Sizes are small
(CPU-friendly) but every reduction size is a multiple of 4, so 2:4 applies to every backward GEMM.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, classes: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, y):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.cross_entropy(self.head(x), y)


class CNN(nn.Module):
    def __init__(self, classes: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x, y):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.cross_entropy(self.fc(x.flatten(1)), y)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # (b, h, t, dh)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A 2-layer GPT (d=64, 4 heads): causal self-attention written with matmuls."""

    def __init__(self, vocab: int = 64, d: int = 64, layers: int = 2, heads: int = 4, block: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def mlp():
    g = torch.Generator().manual_seed(0)
    return MLP(), (torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g))


def cnn():
    g = torch.Generator().manual_seed(0)
    return CNN(), (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 8, (4,), generator=g))


def gpt():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (2, 16), generator=g)
    return TinyGPT(), (idx, torch.roll(idx, -1, dims=1))


EXAMPLES = {
    "mlp": (mlp, "3-layer MLP (32→64→64→8), batch 16, cross-entropy"),
    "cnn": (cnn, "2 conv layers + linear head on 4×3×16×16 images"),
    "gpt": (gpt, "2-layer GPT, d=64, 4 heads, causal attention via matmul, 2×16 tokens"),
}
