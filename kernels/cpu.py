"""The nm ops' CPU kernels (``nm_cpu.cpp``): built once per machine, called through ctypes.

Each op becomes one call of a precompiled kernel, opaque to Inductor, instead of math that
Inductor inlines into its own kernels: compile time no longer grows with the number of layers
(docs/architecture.md, "Kernels"), and every group / tensor quantity is computed once. The library is compiled with
the C++ compiler Inductor's CPU backend needs anyway and kept in ``~/.cache/nmcompile`` (or
``$NMCOMPILE_CACHE_DIR``), keyed by its source, compiler and CPU; with
``torch._inductor.config.force_disable_caches`` it is rebuilt once per process instead.

``available()`` says whether it could be built; the ops fall back to the portable torch math
otherwise. The layout planning here maps a tensor of any dense layout, grouped along any dim, to the
kernels' ``[outer, k, inner]`` memory-order view, and a uniform tensor of any strides (or the
virtual contiguous one a seed stands for) to offsets ``u_outer[o] + g·u_group + i·u_inner``.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

import torch

from .catalog import Kind, Stage, ops_of
from .grouping import flat_plan, grouped_layout, prepare, sampled_layout, slice_strides
from .scales import scale_shape

SOURCE = pathlib.Path(__file__).with_name("nm_cpu.cpp")
FLAGS = ["-O2", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "double": ctypes.c_double}


def _c_type(param: str):
    """The ctypes type of one C parameter declaration ("const int64_t* u_outer" -> c_void_p)."""
    if "*" in param:
        return ctypes.c_void_p
    declared = param.rsplit(None, 1)[0]
    if declared not in _C_TYPES:
        raise RuntimeError(f"{SOURCE.name}: no ctypes type for parameter {param!r}; add its type to _C_TYPES")
    return _C_TYPES[declared]


def signatures(source: str) -> dict[str, list]:
    """The ctypes argument types of every entry point in the ``extern "C"`` block of ``source``, read from their
    C declarations (one that a macro defines, for each name the macro is instantiated with): one description of
    each signature, the C++ one, so the two cannot disagree."""
    block = source[source.index('extern "C" {'):source.index('}  // extern "C"')].replace("\\\n", " ")
    found: dict[str, list] = {}
    for name, params in re.findall(r"\bvoid (nm_\w+)\(([^)]*)\)", block):
        found[name] = [_c_type(p.strip()) for p in params.split(",")]
    for macro, params in re.findall(r"#define (\w+)\(name\)\s+void nm_##name\(([^)]*)\)", block):
        for name in re.findall(rf"^{macro}\((\w+)\)$", block, re.M):
            found[f"nm_{name}"] = [_c_type(p.strip()) for p in params.split(",")]
    return found


# Every elementwise stochastic quantizer of the catalog has a kernel nm_<name> with one signature (dtype,
# x, out, codes, scale, outer, inner, its int parameter, samples, u, seeds, u_outer, u_sample, u_inner,
# the number of scales, s_outer, s_inner, times, t_outer, t_inner, threads).
SIGNATURES = signatures(SOURCE.read_text())
STOCHASTIC = tuple(f"nm_{spec.name}" for spec in ops_of(kind=Kind.QUANTIZE, stage=Stage.GRADIENT))


class _Checked:
    """The loaded library, whose entry points refuse a call with the wrong number of arguments (ctypes passes
    extra ones on as C varargs, where they would be read as other parameters)."""

    def __init__(self, lib: ctypes.CDLL):
        self._calls = {}
        for name, argtypes in SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, None
            self._calls[name] = self._checked(name, function, len(argtypes))

    @staticmethod
    def _checked(name: str, function, count: int):
        def call(*args):
            if len(args) != count:
                raise TypeError(f"{name} takes {count} arguments ({len(args)} given)")
            function(*args)

        return call

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_calls"][name]
        except KeyError:
            raise AttributeError(f"{SOURCE.name} has no entry point {name!r} in its extern \"C\" block") from None


_lock = threading.Lock()
_library = None  # a _Checked once built
_failure: Optional[str] = None
build_seconds: Optional[float] = None  # how long this process spent compiling the library (None: not built)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _private_dir() -> pathlib.Path:
    """A build directory for this process only, removed at exit."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="nmcompile-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def caches_disabled() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.force_disable_caches)


def cache_root() -> pathlib.Path:
    """Where what is built or measured once per machine is kept: ``$NMCOMPILE_CACHE_DIR``, else ~/.cache/nmcompile."""
    return pathlib.Path(os.environ.get("NMCOMPILE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "nmcompile")


def _cache_dir() -> pathlib.Path:
    return _private_dir() if caches_disabled() else cache_root()  # cold caches: a private build for this process


def cpu_flags() -> str:
    """This CPU's feature flags (the ``flags`` line of /proc/cpuinfo), or what the platform says of it."""
    cpu = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else platform.processor()
    return next((line for line in cpu.splitlines() if line.startswith("flags")), cpu)


def _key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    blob = "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, cpu_flags(), platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _build(directory: pathlib.Path) -> _Checked:
    global build_seconds
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: a private build for this process
        directory = _private_dir()
    target = directory / f"nm_cpu-{_key(cxx)}.so"
    if not target.exists():
        start = time.perf_counter()
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
        build_seconds = time.perf_counter() - start
    return _Checked(ctypes.CDLL(str(target)))


def library(directory: Optional[pathlib.Path] = None) -> Optional[_Checked]:
    """The loaded kernels, built on first use; None (and ``failure()`` says why) if that failed."""
    global _library, _failure
    if _library is None and _failure is None:
        with _lock:
            if _library is None and _failure is None:
                if os.environ.get("NMCOMPILE_DISABLE_CPU_KERNELS"):
                    _failure = "disabled by NMCOMPILE_DISABLE_CPU_KERNELS"
                else:
                    try:
                        _library = _build(directory or _cache_dir())
                    except Exception as err:  # fall back to the torch math, say why once
                        _failure = f"{type(err).__name__}: {err}"
                        print(f"nmcompile: CPU kernels unavailable, using the slower torch math ({_failure})",
                              file=sys.stderr)
    return _library


def available() -> bool:
    return library() is not None


def failure() -> Optional[str]:
    return _failure


def prebuild() -> None:
    """Start building the library in the background (compile time overlaps Inductor's)."""
    if _library is None and _failure is None:
        # Inductor's config patches are thread-local: decide where to build here, not in the thread
        directory = _cache_dir()
        threading.Thread(target=library, args=(directory,), name="nmcompile-build", daemon=True).start()


def _ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _threads() -> int:
    return torch.get_num_threads()


def mvue(x: torch.Tensor, u: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    return _prune(x, u, n, m, dim, mvue=True)


def greedy(x: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    return _prune(x, None, n, m, dim, mvue=False)


def _prune(x, u, n, m, dim, mvue):
    src, out = prepare(x)
    if x.numel() == 0:
        return out
    if u is not None and u.is_floating_point():
        u = u.float()
    plan, seeded = grouped_layout(src, u, m, dim)
    if plan is None:  # a layout whose inner dims do not nest: compute contiguously, copy back
        return out.copy_(_prune(x.contiguous(), u.contiguous() if u is not None and not seeded else u, n, m, dim, mvue))
    outer, k, inner, u_outer, u_group, u_inner = plan
    lib = library()
    if mvue:
        seed = int(u.item()) if seeded else 0
        lib.nm_mvue(DTYPES[x.dtype], _ptr(src), _ptr(out), outer, k, inner, n, m, None if seeded else _ptr(u),
                    seed, _ptr(u_outer), u_group, u_inner, _threads())
    else:
        lib.nm_greedy(DTYPES[x.dtype], _ptr(src), _ptr(out), outer, k, inner, n, m, _threads())
    return out


def _outputs(out: torch.Tensor, codes: bool, dim: Optional[int] = None):
    """(values tensor or None, int8 codes tensor or None, fp32 scale(s)): what a quantizer kernel writes,
    both in ``out``'s layout (x's, as the fake kernels promise); one scale, or one per slice along ``dim``."""
    shape = scale_shape(out.shape, dim)
    scale = torch.zeros(shape, dtype=torch.float32)
    if codes:
        return None, torch.empty_like(out, dtype=torch.int8), scale
    return out, None, scale


def stochastic(name: str, x: torch.Tensor, u: torch.Tensor, param: int, codes: bool = False,
               dim: Optional[int] = None, times: Optional[torch.Tensor] = None):
    """The elementwise stochastic quantizer ``nm_<name>`` (LUQ: ``param`` is its top exponent), one scale
    per tensor or per slice along ``dim``. ``u``: float uniforms ``(samples, *x.shape)``, or int64 seeds
    ``(samples,)``. Returns the values, or with ``codes`` (int8 codes, fp32 scale(s)) whose product is
    those values. ``times`` (codes only; fp32, broadcastable to x): quantize x.float() * times, the
    product formed inside the kernel."""
    assert times is None or (codes and times.dtype == torch.float32)
    src, out = prepare(x)
    values, int8, scale = _outputs(out, codes, dim)
    if x.numel() > 0:
        if u.is_floating_point():
            u = u.float()
        plan = sampled_layout(src, u, dim, times)
        seeds, u = (u.contiguous(), None) if plan.seeded else (None, u)
        getattr(library(), f"nm_{name}")(
            DTYPES[x.dtype], _ptr(src), _ptr(values), _ptr(int8), _ptr(scale), plan.outer, plan.inner, param,
            plan.samples, _ptr(u), _ptr(seeds), _ptr(plan.u_outer), plan.u_sample, plan.u_inner, scale.numel(),
            _ptr(plan.s_outer), plan.s_inner, _ptr(times), _ptr(plan.t_outer), plan.t_inner, _threads())
    else:
        scale.fill_(1.0)
    return (int8, scale) if codes else values


def sawb(x: torch.Tensor, bits: int, c1: float, c2: float, keep: int, codes: bool = False):
    """SAWB of ``x`` and its scale (fp32, 0-d), rounded to ``keep`` significant bits; with ``codes``
    the int8 codes instead of the values (the same scale: 0 for an all-zero x)."""
    src, out = prepare(x)
    values, int8, scale = _outputs(out, codes)
    if x.numel() > 0:
        library().nm_sawb(DTYPES[x.dtype], _ptr(src), _ptr(values), _ptr(int8), x.numel(), c1, c2, bits, keep,
                          _ptr(scale), _threads())
    return (int8 if codes else values), scale


def absmax(x: torch.Tensor, bits: int, codes: bool = False, dim: Optional[int] = None):
    """Round-to-nearest absmax quantization of ``x`` (the values), or with ``codes`` (int8 codes,
    fp32 scale(s)); one scale per tensor or per slice along ``dim``. ``bits`` as
    ``sr.kernel_bits`` gives it (with the power-of-two flag)."""
    src, out = prepare(x)
    values, int8, scale = _outputs(out, codes, dim)
    if x.numel() > 0:
        outer, inner, s_outer, s_inner = 1, x.numel(), None, 0
        if dim is not None:
            outer, inner, ((s_outer, s_inner),) = flat_plan(tuple(src.shape), src.stride(),
                                                            slice_strides(tuple(src.shape), dim))
        library().nm_absmax(DTYPES[x.dtype], _ptr(src), _ptr(values), _ptr(int8), outer, inner, bits, _ptr(scale),
                            scale.numel(), _ptr(s_outer), s_inner, _threads())
    else:
        scale.fill_(1.0)
    return (int8, scale) if codes else values


def int8_scale(sums: torch.Tensor, scale: float, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``int8.scaled_sums`` in one pass: ``dtype``(sums · scale + bias) for the contiguous int32 sums of an
    int8 GEMM (``scale``: the product of the two scales as a Python float, exact); ``bias`` broadcast."""
    rows, cols = sums.shape
    out = torch.empty((rows, cols), dtype=dtype)
    strides = (0, 0)
    if bias is not None:
        bias = bias.to(dtype).expand(rows, cols)
        strides = bias.stride()
    library().nm_int8_scale(DTYPES[dtype], _ptr(sums), _ptr(out), rows, cols, scale, _ptr(bias), *strides, _threads())
    return out
