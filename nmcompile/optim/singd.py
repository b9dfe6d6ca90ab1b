"""SINGD: structured inverse-free natural gradient descent (Lin et al., ICML 2024).

A drop-in for ``singd.optim.optimizer.SINGD`` (same constructor, hyperparameter names,
defaults and structure names) whose curvature statistics are computed inside the training
graph (see :mod:`nmcompile.optim.capture`), so ``torch.compile(model, fullgraph=True)``
captures forward, backward and statistics in one graph.

Per supported layer with weight gradient ``G`` (bias appended as an extra column):

* every ``T`` steps, with ``H_K, H_C`` from the last backward pass(es)::

      m_K ← α₁ m_K + ½ [ tr(H_C)/d_C · H_K + λ tr(Π̂(CᵀC))/d_C · Π̂(KᵀK) − I ]
      m_C ← α₁ m_C + ½ [ tr(H_K)/d_K · H_C + λ tr(Π̂(KᵀK))/d_K · Π̂(CᵀC) − I ]
      K ← K (I − β₁ m_K),   C ← C (I − β₁ m_C)

  (``kfac_like=True``: α₁ = 0 and the trace factors are 1);
* every step: ``Ĝ = C Cᵀ G K Kᵀ``, ``buf ← α₂ buf + Ĝ + γ θ``, ``θ ← θ − β₂ buf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union
from warnings import warn

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim import Optimizer

from .capture import LayerSpec, StatisticsTap, TapHandle, conv_padding, install_tap
from .structures import STRUCTURES, StructuredMatrix, get_structure

LossAverage = Union[None, str]


@dataclass
class _Layer:
    module: nn.Module
    group: int
    tap: StatisticsTap

    @property
    def params(self) -> List[nn.Parameter]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]


class SINGD(Optimizer):
    """Structured inverse-free natural gradient descent for Linear and Conv2d layers.

    Construct it from the model *before* compiling the model: it rewires each supported
    layer's ``forward`` to collect curvature statistics. Parameters of other layers
    (norms, embeddings, ...) are not trained by SINGD; give them to a second optimizer.
    Multi-process training: do not wrap the model in DistributedDataParallel; with an
    initialized process group SINGD all-reduces statistics and preconditioned gradients.
    """

    SUPPORTED_STRUCTURES = STRUCTURES
    SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)
    SUPPORTED_LOSS_AVERAGE = (None, "batch", "batch+sequence")
    SUPPORTED_KFAC_APPROX = ("expand", "reduce")
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf

    def __init__(
        self,
        model: nn.Module,
        params: Union[None, Iterable[nn.Parameter], List[Dict[str, Any]]] = None,
        lr: float = 0.001,  # β₂
        momentum: float = 0.9,  # α₂
        damping: float = 0.001,  # λ
        alpha1: float = 0.5,  # α₁, Riemannian momentum
        weight_decay: float = 0.0,  # γ
        T: int = 10,
        loss_average: LossAverage = "batch",
        lr_cov: Union[float, Callable[[int], float]] = 1e-2,  # β₁
        structures: Tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: Tuple[Optional[torch.dtype], Optional[torch.dtype]] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
    ):
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            raise TypeError(
                "SINGD does not support DataParallel/DistributedDataParallel wrappers; pass "
                "the plain model: with an initialized process group SINGD all-reduces its "
                "statistics and preconditioned gradients itself"
            )
        defaults = dict(
            lr=lr, momentum=momentum, damping=damping, alpha1=alpha1,
            weight_decay=weight_decay, T=T, loss_average=loss_average, lr_cov=lr_cov,
            structures=structures, kfac_approx=kfac_approx, kfac_like=kfac_like,
            preconditioner_dtype=preconditioner_dtype, normalize_lr_cov=normalize_lr_cov,
        )
        if params is None:
            params = _supported_trainable_params(model, warn_unsupported)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            _check_group(index, group)

        self.steps = 0
        # Scale of the GradScaler in the backward pass of each step; the statistics of
        # step t are un-scaled with the scale of step t-1 (the only one known then).
        self._grad_scales: Dict[int, float] = {-1: init_grad_scale}
        self.Ks: Dict[str, StructuredMatrix] = {}
        self.Cs: Dict[str, StructuredMatrix] = {}
        self.m_Ks: Dict[str, StructuredMatrix] = {}
        self.m_Cs: Dict[str, StructuredMatrix] = {}
        self._layers: Dict[str, _Layer] = {}
        self.hook_handles: List[TapHandle] = []
        self._setup_layers(model)
        self._prepare_forward()

    # ------------------------------------------------------------------ set-up
    def _setup_layers(self, model: nn.Module) -> None:
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        claimed = set()
        for name, module in model.named_modules():
            if not isinstance(module, self.SUPPORTED_MODULES):
                continue
            own = [p for p in module.parameters(recurse=False)]
            in_opt = [p for p in own if id(p) in group_of]
            if not in_opt:
                continue
            if len(in_opt) != len(own):
                missing = [names.get(id(p), "?") for p in own if id(p) not in group_of]
                raise ValueError(
                    f"layer {name!r} has parameters {missing} that are not in the optimizer; "
                    "SINGD preconditions weight and bias jointly, so pass all of a "
                    "layer's parameters or none"
                )
            groups = {group_of[id(p)] for p in in_opt}
            if len(groups) != 1:
                raise ValueError(
                    f"parameters of layer {name!r} are in different parameter groups "
                    f"{sorted(groups)}; put all of a layer's parameters in one group"
                )
            claimed.update(id(p) for p in in_opt)
            self._layers[name] = self._new_layer(name, module, groups.pop())

        stray = [p for g in self.param_groups for p in g["params"] if id(p) not in claimed]
        if stray:
            stray_names = [names.get(id(p), f"<tensor {tuple(p.shape)}>") for p in stray]
            raise ValueError(
                f"SINGD only trains parameters of {[m.__name__ for m in self.SUPPORTED_MODULES]} "
                f"layers of the model; got other parameters {stray_names}. Train them with "
                "a second optimizer, e.g. torch.optim.AdamW"
            )

    def _new_layer(self, name: str, module: nn.Module, group_index: int) -> _Layer:
        group = self.param_groups[group_index]
        dim_K, dim_C = self.preconditioner_dims(module)
        dtype_K, dtype_C = (d if d is not None else module.weight.dtype
                            for d in group["preconditioner_dtype"])
        device = module.weight.device
        cls_K, cls_C = (get_structure(s) for s in group["structures"])
        self.Ks[name] = cls_K.eye(dim_K, dtype=dtype_K, device=device)
        self.Cs[name] = cls_C.eye(dim_C, dtype=dtype_C, device=device)
        if group["alpha1"] != 0.0:
            self.m_Ks[name] = cls_K.zeros(dim_K, dtype=dtype_K, device=device)
            self.m_Cs[name] = cls_C.zeros(dim_C, dtype=dtype_C, device=device)

        conv = None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise ValueError(
                    f"layer {name!r}: padding_mode={module.padding_mode!r} is not supported "
                    "by SINGD's input statistics; allowed: 'zeros'"
                )
            conv = (tuple(module.kernel_size), tuple(module.stride), conv_padding(module),
                    tuple(module.dilation), module.groups)
        spec = LayerSpec(
            kind="linear" if isinstance(module, nn.Linear) else "conv2d",
            structure_K=group["structures"][0], structure_C=group["structures"][1],
            dim_K=dim_K, dim_C=dim_C, has_bias=module.bias is not None,
            loss_average=group["loss_average"], kfac_approx=group["kfac_approx"], conv=conv,
        )
        unscale = torch.ones((), dtype=dtype_C, device=device)
        tap = StatisticsTap(spec, self.Ks[name].flat, self.Cs[name].flat, unscale)
        self.hook_handles.append(install_tap(module, tap))
        return _Layer(module, group_index, tap)

    @staticmethod
    def preconditioner_dims(module: nn.Module) -> Tuple[int, int]:
        """(dim_K, dim_C): input features (+1 for the bias) and output features."""
        dim_C = module.weight.shape[0]
        dim_K = module.weight[0].numel() + (module.bias is not None)
        return dim_K, dim_C

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if hasattr(self, "_layers"):  # layers, factors and taps are set up in __init__
            raise NotImplementedError("SINGD takes all parameter groups at construction")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is not None:
            raise NotImplementedError("SINGD.step does not support a closure")
        if self.steps not in self._grad_scales:  # not set by set_current_grad_scale
            scale = getattr(self, "grad_scale", None)
            self.set_current_grad_scale(1.0 if scale is None else float(scale))
        if bool(getattr(self, "found_inf", False)):
            warn("Encountered inf in gradients. Skipping update.")
            for layer in self._layers.values():
                layer.tap.take()  # this step's statistics are discarded as well
        else:
            for name, layer in self._layers.items():
                self._step_layer(name, layer)
        self.steps += 1
        for t in [t for t in self._grad_scales if t < self.steps - 1]:
            del self._grad_scales[t]
        self._prepare_forward()

    def _prepare_forward(self) -> None:
        """Switch statistics on for the coming forward pass iff its step updates K, C."""
        unscale = 1.0 / math.sqrt(self._grad_scales[self.steps - 1])
        for layer in self._layers.values():
            tap = layer.tap
            tap.collect = self.steps % self.param_groups[layer.group]["T"] == 0
            if tap.grad_unscale_value != unscale:  # avoid a device sync per layer
                tap.grad_unscale.fill_(unscale)
                tap.grad_unscale_value = unscale

    def _step_layer(self, name: str, layer: _Layer) -> None:
        group = self.param_groups[layer.group]
        if self.steps % group["T"] == 0:
            H_K, H_C = layer.tap.take()
            if layer.module.weight.grad is None and H_K is None:
                return  # layer unused in this step
            if H_K is None or H_C is None:
                raise RuntimeError(
                    f"no curvature statistics were collected for layer {name!r} on update "
                    f"step {self.steps}; construct SINGD before compiling the model and run "
                    "forward and backward with gradients enabled before .step()"
                )
            self._update_preconditioner(name, group, H_K, H_C)
        if layer.module.weight.grad is None:
            return
        self._update_params(name, layer, group)

    def _update_preconditioner(self, name: str, group: Dict, H_K: Tensor, H_C: Tensor) -> None:
        K, C = self.Ks[name], self.Cs[name]
        # Over processes: H_K's rows carry 1/√(local batch), so it is always averaged; H_C
        # is per-sample (averaged) for a mean loss and a plain sum for a sum loss.
        # (Upstream also sums H_K for a sum loss, which makes it scale with world size.)
        H_K = type(K)(K.dim, _all_reduce(H_K, average=True))
        H_C = type(C)(C.dim, _all_reduce(H_C, average=group["loss_average"] is not None))

        # H_C was divided by the previous step's grad scale in backward; finish the
        # division by scale² here, in the coefficients, which is safer in low precision.
        prev_scale, scale = self._grad_scales[self.steps - 1], self._grad_scales[self.steps]
        grad_unscaling = prev_scale / scale**2

        KtK, CtC = K.from_inner(), C.from_inner()
        damping, alpha1 = group["damping"], group["alpha1"]
        if group["kfac_like"]:
            coeff_HK, coeff_KtK = 1.0, damping
            coeff_HC, coeff_CtC = grad_unscaling, damping
        else:
            coeff_HK = grad_unscaling * H_C.average_trace()
            coeff_KtK = damping * CtC.average_trace()
            coeff_HC = grad_unscaling * H_K.average_trace()
            coeff_CtC = damping * KtK.average_trace()
        # normalized lr_cov: (1 - α₁) keeps the largest entry of m from growing forever
        half = 0.5 * (1.0 - alpha1 if group["normalize_lr_cov"] else 1.0)
        new_m_K = _riemannian_grad(K, H_K, coeff_HK, KtK, coeff_KtK, half)
        new_m_C = _riemannian_grad(C, H_C, coeff_HC, CtC, coeff_CtC, half)
        if alpha1 != 0.0:
            new_m_K.add_(self.m_Ks[name], alpha=alpha1)
            new_m_C.add_(self.m_Cs[name], alpha=alpha1)
            self.m_Ks[name].flat.copy_(new_m_K.flat)
            self.m_Cs[name].flat.copy_(new_m_C.flat)

        lr_cov = group["lr_cov"]
        beta1 = lr_cov(self.steps) if callable(lr_cov) else lr_cov
        beta1_K = beta1_C = beta1
        if group["normalize_lr_cov"]:
            beta1_K /= max(1.0, float(new_m_K.infinity_norm()))
            beta1_C /= max(1.0, float(new_m_C.infinity_norm()))
        # in place: the compiled graph reads K and C through these very tensors
        K.add_(K @ new_m_K, alpha=-beta1_K)
        C.add_(C @ new_m_C, alpha=-beta1_C)

    def _update_params(self, name: str, layer: _Layer, group: Dict) -> None:
        module = layer.module
        grad = module.weight.grad.flatten(1)
        if module.bias is not None:
            grad = torch.cat([grad, module.bias.grad.unsqueeze(1)], dim=1)
        scale = self._grad_scales[self.steps]
        if scale != 1.0:
            grad = grad / scale

        # C Cᵀ G K Kᵀ = C (Cᵀ (K (Kᵀ Gᵀ))ᵀ), only products with the structured factors
        K, C = self.Ks[name], self.Cs[name]
        nat = K.matmul(K.rmatmat(grad.T.to(K.dtype))).T
        nat = C.matmul(C.rmatmat(nat.to(C.dtype))).to(grad.dtype)
        nat = _all_reduce(nat, group["loss_average"] is not None)

        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        nat_params = nat.split([module.weight[0].numel(), 1][: len(layer.params)], dim=1)
        for p, p_nat in zip(layer.params, nat_params):
            update = p_nat.reshape(p.shape)
            if weight_decay != 0.0:  # L2 term added after preconditioning, as upstream
                update = update + weight_decay * p
            if momentum != 0.0:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                update = state["momentum_buffer"].mul_(momentum).add_(update)
            p.add_(update, alpha=-lr)

    def set_current_grad_scale(self, grad_scale: float) -> None:
        """Record the gradient scale of the current step (GradScaler users)."""
        self._grad_scales[self.steps] = grad_scale
        if self.steps == 0 and self._grad_scales[-1] == 1.0 and grad_scale != 1.0:
            warn(
                f"Detected gradient scale {grad_scale} at step 0; pass a similar value as "
                "init_grad_scale for numerically safer statistics in the first step"
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        pending = {}
        for name, layer in self._layers.items():
            H_K, H_C = layer.tap.probe_K.grad, layer.tap.probe_C.grad
            if H_K is not None:
                pending[name] = (H_K.clone(), H_C.clone())
        state["singd"] = {
            "steps": self.steps,
            "grad_scales": dict(self._grad_scales),
            "structures": {n: (type(self.Ks[n]).name, type(self.Cs[n]).name) for n in self.Ks},
            "Ks": {n: m.flat.clone() for n, m in self.Ks.items()},
            "Cs": {n: m.flat.clone() for n, m in self.Cs.items()},
            "m_Ks": {n: m.flat.clone() for n, m in self.m_Ks.items()},
            "m_Cs": {n: m.flat.clone() for n, m in self.m_Cs.items()},
            "pending_statistics": pending,
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("singd", None)
        if saved is None:
            raise ValueError("state_dict has no 'singd' entry; was it saved by nmcompile's SINGD?")
        mine = {n: (type(self.Ks[n]).name, type(self.Cs[n]).name) for n in self.Ks}
        if saved["structures"] != mine:
            raise ValueError(
                f"checkpoint layers/structures {saved['structures']} do not match this "
                f"optimizer's {mine}"
            )
        super().load_state_dict(state_dict)
        self.steps = saved["steps"]
        self._grad_scales = dict(saved["grad_scales"])
        # copy in place: compiled graphs and taps hold references to these tensors
        for key in ("Ks", "Cs", "m_Ks", "m_Cs"):
            for name, flat in saved[key].items():
                getattr(self, key)[name].flat.copy_(flat)
        for name, layer in self._layers.items():
            layer.tap.take()
            if name in saved["pending_statistics"]:
                H_K, H_C = saved["pending_statistics"][name]
                layer.tap.probe_K.grad = H_K.to(layer.tap.probe_K).clone()
                layer.tap.probe_C.grad = H_C.to(layer.tap.probe_C).clone()
        self._prepare_forward()


def _riemannian_grad(M: StructuredMatrix, H: StructuredMatrix, coeff_H, MtM: StructuredMatrix,
                     coeff_MtM, half: float) -> StructuredMatrix:
    """half · (coeff_H · H + coeff_MtM · Π̂(MᵀM) − I), in M's structure."""
    out = type(M).zeros(M.dim, dtype=M.dtype, device=M.flat.device)
    out.add_(H, alpha=coeff_H)
    out.add_(MtM, alpha=coeff_MtM)
    return out.diag_add_(-1.0).mul_(half)


def _all_reduce(t: Tensor, average: bool) -> Tensor:
    """Sum (or average, for a mean loss) over processes; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        if average:
            t.div_(dist.get_world_size())
    return t


def _check_group(index: int, group: Dict) -> None:
    """Validate one parameter group's hyperparameters, with the allowed values."""
    for key in ("lr", "momentum", "alpha1", "weight_decay", "damping"):
        if not isinstance(group[key], (int, float)) or group[key] < 0:
            raise ValueError(f"{key} must be a non-negative number, got {group[key]!r}")
    if not callable(group["lr_cov"]) and not group["lr_cov"] >= 0:
        raise ValueError(f"lr_cov must be a non-negative number or a callable, got {group['lr_cov']!r}")
    if not isinstance(group["T"], int) or group["T"] < 1:
        raise ValueError(f"T must be a positive integer, got {group['T']!r}")
    if group["loss_average"] not in SINGD.SUPPORTED_LOSS_AVERAGE:
        raise ValueError(
            f"loss_average={group['loss_average']!r} is not supported; "
            f"allowed: {SINGD.SUPPORTED_LOSS_AVERAGE}"
        )
    if group["kfac_approx"] not in SINGD.SUPPORTED_KFAC_APPROX:
        raise ValueError(
            f"kfac_approx={group['kfac_approx']!r} is not supported; "
            f"allowed: {SINGD.SUPPORTED_KFAC_APPROX}"
        )
    structures = group["structures"]
    if isinstance(structures, str) or len(structures) != 2:
        raise ValueError(f"structures must be a pair of names (for K and C), got {structures!r}")
    for name in structures:
        get_structure(name)
    dtypes = group["preconditioner_dtype"]
    if not isinstance(dtypes, (tuple, list)) or len(dtypes) != 2 or any(
        d is not None and not isinstance(d, torch.dtype) for d in dtypes
    ):
        raise ValueError(
            f"preconditioner_dtype must be a pair of torch.dtype or None, got {dtypes!r}"
        )
    if group["kfac_like"] and group["alpha1"] != 0.0:
        warn(
            f"Parameter group {index} has kfac_like=True, which ignores the Riemannian "
            f"momentum alpha1={group['alpha1']}; setting alpha1=0."
        )
        group["alpha1"] = 0.0


def _supported_trainable_params(model: nn.Module, warn_unsupported: bool) -> List[nn.Parameter]:
    params, skipped = [], []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, SINGD.SUPPORTED_MODULES):
            params.extend(own)
        elif own:
            skipped.append(f"{name or '<root>'} ({type(module).__name__})")
    if skipped and warn_unsupported:
        warn(
            f"SINGD will not train the parameters of these unsupported layers: "
            f"{', '.join(skipped)}. Give them to a second optimizer (e.g. torch.optim.AdamW); "
            "pass warn_unsupported=False to silence this warning."
        )
    return params
