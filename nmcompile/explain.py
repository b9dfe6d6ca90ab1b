"""explain(): compile a model with the nm backend, run one step, report what was rewritten."""
from __future__ import annotations

from typing import Any

import torch

from nmcompile.backend import nm_backend, recorded_kept, recording, resolve_options
from nmcompile.capture import reduce_output
from nmcompile.graph_breaks import collecting
from nmcompile.report import Report


def explain(model: torch.nn.Module, *inputs: Any, **options: Any) -> Report:
    """Compile ``model`` with ``backend="nm"`` and ``options``, run one forward and one backward on
    ``inputs``, and return the Report (with the graph breaks Dynamo hit, and what each backward keeps). The model's
    gradients and buffers are left as they were."""
    config, _ = resolve_options(options)  # bad options fail before any work; NMCOMPILE_OPTIONS under them
    grads = {p: p.grad for p in model.parameters()}
    for p in grads:
        p.grad = None
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with recording() as records, collecting() as breaks, torch._inductor.config.patch(force_disable_caches=True):
            # static shapes: the report describes exactly these inputs
            compiled = torch.compile(model, backend=nm_backend, options=dict(options), dynamic=False)
            reduce_output(compiled(*inputs)).backward()
            kept, recomputed = recorded_kept()
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return Report(list(records), config.as_dict(), graph_breaks=breaks, kept=kept, recomputed=recomputed)
