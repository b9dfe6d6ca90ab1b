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
    """Causal self-attention, written with matmuls (its two GEMMs of activations are then in the graph, the pass
    decides their roles) or, with ``sdpa``, through ``F.scaled_dot_product_attention``."""

    def __init__(self, d: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: attention, then a GELU MLP of width 4d, each around a residual."""

    def __init__(self, d: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, sdpa)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT that returns the mean next-token cross-entropy (nats) of ``idx`` against ``targets``: token and
    position embeddings, ``layers`` blocks, a final LayerNorm and a linear head. With ``tied`` the head is the token
    embedding's transpose and both embeddings start at GPT-2's scale (std 0.02), so the logits start near uniform.
    The CLI's ``gpt`` example, the LM tools' byte-level model and the step benchmarks' decoder are all this one."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, block: int, sdpa: bool = False,
                 tied: bool = False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = None if tied else nn.Linear(d, vocab, bias=False)
        if tied:
            for emb in (self.tok, self.pos):
                nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.ln(x)
        logits = x @ self.tok.weight.t() if self.head is None else self.head(x)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # fp32 loss under autocast too


def mlp():
    g = torch.Generator().manual_seed(0)
    return MLP(), (torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g))


def cnn():
    g = torch.Generator().manual_seed(0)
    return CNN(), (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 8, (4,), generator=g))


def gpt():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (2, 16), generator=g)
    return GPT(vocab=64, d=64, layers=2, heads=4, block=16), (idx, torch.roll(idx, -1, dims=1))


EXAMPLES = {
    "mlp": (mlp, "3-layer MLP (32→64→64→8), batch 16, cross-entropy"),
    "cnn": (cnn, "2 conv layers + linear head on 4×3×16×16 images"),
    "gpt": (gpt, "2-layer GPT, d=64, 4 heads, causal attention via matmul, 2×16 tokens"),
}
