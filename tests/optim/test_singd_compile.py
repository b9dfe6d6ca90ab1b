"""Compiled SINGD: statistics inside one fullgraph graph, same results as eager/official."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from nmcompile.optim import SINGD
from singd_helpers import STRUCTURE_NAMES, assert_same_training, classification_batch, mlp, train

# 6 Linear layers: layer i uses K = structure i and C = structure i+1, and every other
# layer is kfac_like, so each structure is used for K and for C, with and without kfac_like.
WIDTHS = (20, 36, 33, 40, 31, 36, 5)
HYPER = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-2, lr_cov=0.05)
STEPS = 22


def groups(model):
    linears = [m for m in model if isinstance(m, nn.Linear)]
    out = []
    for i, layer in enumerate(linears):
        kfac_like = i % 2 == 1
        out.append(dict(
            params=layer.parameters(),
            structures=(STRUCTURE_NAMES[i], STRUCTURE_NAMES[(i + 1) % 6]),
            kfac_like=kfac_like, alpha1=0.0 if kfac_like else 0.5,
        ))
    return out


def data(count=STEPS):
    return [classification_batch(seed=200 + i) for i in range(count)]


def compiled_vs_official(reference_singd, backend, T):
    torch._dynamo.reset()
    model, ref_model = mlp(widths=WIDTHS), mlp(widths=WIDTHS)
    opt = SINGD(model, groups(model), T=T, **HYPER)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = reference_singd(ref_model, groups(ref_model), T=T, **HYPER)
        train(ref_model, ref_opt, data())
    train(model, opt, data(), forward=compiled)
    assert_same_training(model, opt, ref_model, ref_opt)
    return counter


def test_aot_eager_matches_official_with_two_graphs(reference_singd):
    """T=2: one graph with statistics, one without, compiled once each, no graph breaks."""
    counter = compiled_vs_official(reference_singd, "aot_eager", T=2)
    assert counter.frame_count == 2
    with_stats, without = counter.graphs
    code = with_stats.code
    assert "KroneckerStatistics" in code or "autograd_function_apply" in code
    assert "KroneckerStatistics" not in without.code and "autograd_function_apply" not in without.code


def test_inductor_matches_official(reference_singd):
    counter = compiled_vs_official(reference_singd, "inductor", T=1)
    assert counter.frame_count == 1


def test_statistics_are_computed_in_the_backward_graph():
    """The statistic is an opaque op of the backward graph, not a Python hook."""
    torch._dynamo.reset()
    model = mlp()
    opt = SINGD(model, T=1, structures=("diagonal", "block30diagonal"))
    graphs = []

    def capture(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    compiled = torch.compile(model, backend=capture, fullgraph=True)
    x, y = classification_batch()
    nn.functional.cross_entropy(compiled(x), y).backward()
    forward, backward = graphs
    stat_ops = [n for n in backward.graph.nodes if "structured_gram" in str(n.target)]
    assert len(stat_ops) == 2 * len(opt._layers)  # H_K and H_C per layer
    assert not any("structured_gram" in str(n.target) for n in forward.graph.nodes)
    assert all(layer.tap.probe_K.grad is not None for layer in opt._layers.values())


def test_compiling_before_constructing_the_optimizer_still_collects():
    torch._dynamo.reset()
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, y = classification_batch()
    compiled(x).sum().backward()
    opt = SINGD(model, T=1)
    opt.zero_grad()
    nn.functional.cross_entropy(compiled(x), y).backward()
    assert all(layer.tap.probe_C.grad is not None for layer in opt._layers.values())
    opt.step()


nm_available = "nm" in torch._dynamo.list_backends()


@pytest.mark.skipif(not nm_available, reason="nmcompile's 'nm' backend is not installed")
def test_nm_backend_statistics_use_uncompressed_gradients():
    """With 2:4 MVUE gradient sparsity the weight gradients change, the statistics do not."""
    from nmcompile.backend import recording

    x, y = classification_batch()
    results = {}
    for mode in ("eager", "nm"):
        torch._dynamo.reset()
        model = mlp(widths=(20, 36, 32, 8))
        opt = SINGD(model, T=1, structures=("dense", "hierarchical15_15"))
        forward = model
        if mode == "nm":  # the inner aot_eager keeps this test fast; inductor behaves the same
            forward = torch.compile(model, backend="nm", fullgraph=True,
                                    options={"sparsity": "2:4", "inner": "aot_eager"})
        torch.manual_seed(0)
        with recording() as records:
            nn.functional.cross_entropy(forward(x), y).backward()
        results[mode] = {name: (layer.tap.probe_K.grad, layer.tap.probe_C.grad, layer.module.weight.grad)
                         for name, layer in opt._layers.items()}
        if mode == "nm":
            assert any(r.transforms for r in records), "nm compressed nothing: vacuous test"
    compressed_somewhere = False
    for name, (H_K, H_C, grad) in results["eager"].items():
        nm_H_K, nm_H_C, nm_grad = results["nm"][name]
        torch.testing.assert_close(nm_H_K, H_K, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(nm_H_C, H_C, rtol=1e-5, atol=1e-7)
        compressed_somewhere |= not torch.allclose(nm_grad, grad, rtol=1e-3)
    assert compressed_somewhere


def test_checkpoint_round_trip_under_compile():
    """Loading copies into the factors in place, so a freshly built optimizer under a
    compiled model continues the exact trajectory."""
    torch._dynamo.reset()
    hyper = dict(HYPER, T=2, structures=("block30diagonal", "triutoeplitz"))
    batches = data(10)
    model = mlp()
    opt = SINGD(model, **hyper)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    train(model, opt, batches[:5], forward=compiled)
    # deepcopy: like every torch optimizer, state_dict() returns references to live buffers
    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))

    restored = mlp(seed=7)
    restored.load_state_dict(saved_model)
    restored_opt = SINGD(restored, **hyper)
    restored_opt.load_state_dict(saved_opt)
    restored_compiled = torch.compile(restored, backend="aot_eager", fullgraph=True)
    train(model, opt, batches[5:], forward=compiled)
    train(restored, restored_opt, batches[5:], forward=restored_compiled)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    for name, K in opt.Ks.items():
        assert torch.equal(K.flat, restored_opt.Ks[name].flat)
