"""The demo's model: an MLP on the digits whose loss is part of the compiled graph, and its test accuracy."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class DigitsMLP(torch.nn.Module):
    """64 -> hidden -> hidden -> hidden -> 10 with ReLU; ``forward(x, y)`` returns the mean
    cross-entropy so the loss is part of the compiled graph. Hidden sizes are multiples of 4."""

    def __init__(self, hidden: int = 256, depth: int = 3, classes: int = 10, inputs: int = 64):
        super().__init__()
        dims = [inputs] + [hidden] * depth
        layers: list[torch.nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(dims[-1], classes))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, fwd_quant: Optional[str] = None, fwd_bits: int = 4,
               keep_first_last: bool = True) -> torch.Tensor:
        """Eager inference; with ``fwd_quant`` the Linear layers' weights and inputs go through the
        same forward quantizer the backend uses in training (first and last layer kept in high
        precision when ``keep_first_last``), so a low-bit-forward model is evaluated as it trained."""
        from nmcompile.kernels.catalog import OPS

        linears = [m for m in self.net if isinstance(m, torch.nn.Linear)]
        quantized = set(linears[1:-1] if keep_first_last else linears) if fwd_quant else set()
        for module in self.net:
            if module in quantized:
                spec = OPS[fwd_quant]
                x = F.linear(spec.apply(x, bits=fwd_bits), spec.apply(module.weight, bits=fwd_bits), module.bias)
            else:
                x = module(x)
        return x


def evaluate(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor, options: dict, batch_size: int = 64) -> float:
    """Test accuracy. A run with forward quantization is evaluated with it, in batches of the
    training batch size: SAWB scales are per tensor (per batch of activations), so this is the
    setting the model was trained in."""
    correct = 0
    for start in range(0, len(x), batch_size):
        out = model.logits(x[start:start + batch_size], options.get("fwd_quant"), options.get("fwd_bits", 4),
                           options.get("keep_first_last", True))
        correct += (out.argmax(-1) == y[start:start + batch_size]).sum().item()
    return correct / len(x)
