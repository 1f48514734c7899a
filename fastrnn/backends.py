"""The one dispatch point: which backend runs a recurrence, and why.

Backends:

========== ================================================================================
numba      compiled CPU loops (:mod:`fastrnn.kernels.numba_cpu`), float32/float64
triton     fused GPU kernels (:mod:`fastrnn.kernels.triton_gpu`), CUDA float32/float16/bfloat16
           (and CPU tensors under ``TRITON_INTERPRET=1``, for testing without a GPU)
native     torch.nn's own implementation (oneDNN/aten on CPU, cuDNN on GPU)
reference  readable per-step PyTorch (:mod:`fastrnn.kernels.reference`), autograd through the loop
========== ================================================================================

``auto`` takes the first backend of ``AUTO_ORDER[device type]`` (``AUTO_ORDER_STEP`` for the
cells) that can run the input: one whose ``CAPABILITIES`` cover it and, for a compiled backend,
that loads (Numba or Triton imports) and prepares the case (numba: loads from the disk cache, or
compiles, the forward loop the call runs). Any failure there skips the backend, with a
RuntimeWarning and the failure in the :class:`Choice`'s ``reason``.
A backend named explicitly that cannot run the input (or fails to load or prepare it) raises
:class:`BackendUnavailable`; it never silently falls back.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from fastrnn import cells
from fastrnn.kernels import numba_cpu, reference, triton_gpu

BACKENDS = ("auto", "numba", "triton", "native", "reference")
AUTO_ORDER = {"cpu": ("numba", "native", "reference"), "cuda": ("triton", "native", "reference")}
# A cell is a single step: there is no time loop to fuse, and torch's one fused cell op beats the
# per-call cost of a kernel backend (measured on the 2-core CPU: numba 0.23-0.45x torch for
# RNNCell/LSTMCell/GRUCell at B <= 64, H <= 256). So auto prefers native there.
AUTO_ORDER_STEP = {"cpu": ("native", "numba", "reference"),
                   "cuda": ("native", "triton", "reference")}
# On CUDA, auto runs triton only where it was measured faster than torch.nn (cuDNN), on an H200
# (2026-12-04, bench/results/cuda-h200/): bfloat16 with H within the device's fused forward limit,
# where torch.nn's bfloat16 path runs per-step kernels and re-packs its weights every call (LSTM
# 2.2-6.1x inference, 0.93-1.4x training; GRU 2.1-5.5x / 1.7-4.6x; RNN 2.6-5.7x / 1.9-5.1x).
# cuDNN was faster everywhere else (float32 0.02-0.74x, float16 0.11-0.72x, bfloat16 above the
# fused limit 0.35-0.69x), so auto runs native there (and triton where cuDNN has no such cell).
AUTO_ORDER_CUDA_SLOWER = ("native", "triton", "reference")
#: The compiled backends: each package declares what it runs (``CAPABILITIES``) and implements
#: the kernel contract of :mod:`fastrnn.kernels.reference`.
KERNELS = {"numba": numba_cpu, "triton": triton_gpu}


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run the given input."""


@dataclass(frozen=True)
class Choice:
    """The backend that will run (``name``) and why (``reason``)."""

    name: str
    reason: str


# Whether autocast is on for any device (torch's own check, as torch.compile uses it).
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(tensor):
    """The dtype ``torch.autocast`` gives a recurrence over ``tensor`` (a weight): autocast's
    lower-precision dtype where autocast is on for the tensor's device and the tensor is eligible
    (floating point, not float64, which autocast leaves alone), else None."""
    if not _ANY_AUTOCAST():  # the common case, cheaply (tensor.device costs a microsecond)
        return None
    device = tensor.device.type
    if not (torch.is_autocast_enabled(device) and tensor.is_floating_point()
            and tensor.dtype != torch.float64):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == tensor.dtype else dtype


def compute_dtype(tensor):
    """The dtype a recurrence over weights like ``tensor`` runs in: :func:`autocast_dtype` under
    autocast, else the tensor's own. Backends are chosen for this dtype."""
    return autocast_dtype(tensor) or tensor.dtype


def check_backend_name(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def kernels(name):
    """The kernel package of a compiled backend, or :mod:`fastrnn.kernels.reference` (both
    implement the contract of :func:`fastrnn.kernels.reference.recurrence_forward` /
    ``recurrence_backward``)."""
    return reference if name == "reference" else KERNELS[name]


def bias_in_projection(name, device):
    """Whether the layers add the recurrence bias in the input projection's GEMM for backend
    ``name`` on ``device`` (its ``CAPABILITIES.bias_in_projection``) rather than pass it to its
    kernels."""
    caps = getattr(kernels(name), "CAPABILITIES", None)
    return caps is not None and torch.device(device).type in caps.bias_in_projection


def why_not(name, cell, device, dtype, proj_size=0):
    """Why backend ``name`` cannot run this case, or None if it can. torch.nn (``native``) and the
    reference run every torch.nn case (torch.nn raises its own errors for what it does not
    support); the compiled backends answer from their ``CAPABILITIES``."""
    spec = cells.SPECS.get(cell)
    if spec is None:
        return f"unknown cell {cell!r}; expected one of {cells.CELLS}"
    if proj_size and not spec.projection:
        return f"proj_size is supported for lstm only, got {cell}"
    if name in ("reference", "native"):
        return None if name == "reference" or spec.torch_mode else f"torch.nn has no {cell} cell"
    return KERNELS[name].CAPABILITIES.why_not(cell, device, dtype, proj_size)


_FAILURES = {}  # (backend, cell, dtype, proj_size) -> the exception of a failed load/prepare


@functools.lru_cache(maxsize=None)
def not_ready(name, cell, dtype, proj_size=0):
    """Why compiled backend ``name`` failed to load (``KERNELS[name].load()``: Numba or Triton
    imports) or to prepare ``cell`` in ``dtype`` (``KERNELS[name].prepare``, where the package
    has one: the numba backend loads or compiles the forward loop the call runs), in one line;
    None when it did both. Tried once per case and process (:func:`forget` forgets)."""
    package = KERNELS[name]
    step, what = "load", ""
    try:
        package.load()
        prepare = getattr(package, "prepare", None)
        if prepare is not None:
            step, what = "compile", f" the {cell} forward for {str(dtype).replace('torch.', '')}"
            with torch._C._DisableFuncTorch():  # plain tensors inside torch.func transforms
                prepare(cell, dtype, proj_size)
    except Exception as exc:  # any import, cache or compile failure: auto falls back
        _FAILURES[name, cell, dtype, proj_size] = exc
        message = (str(exc).strip().splitlines() or [""])[0]
        return f"{name} failed to {step}{what} ({type(exc).__name__}: {message})"
    return None


def forget():
    """Forget every cached choice and failure (tests; after installing or repairing a backend)."""
    _choose.cache_clear()
    not_ready.cache_clear()
    _FAILURES.clear()


@functools.lru_cache(maxsize=None)
def _choose(backend, cell, device, dtype, proj_size, step, hidden):
    return choose(backend, cell, device, dtype, proj_size, step, hidden)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (which costs
    1.5-1.9 s at ``import fastrnn``, imports Triton and sets ``TORCHINDUCTOR_CACHE_DIR``): the
    decorator only sets this attribute, which Dynamo reads when it meets the function
    (tests/test_install.py checks that torch's decorator still does just that)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(backend, cell, device, dtype, proj_size=0, step=False, hidden=None):
    """The name :func:`choose` picks, cached per case; a constant to torch.compile."""
    return _choose(backend, cell, torch.device(device), dtype, proj_size, step, hidden).name


def _auto_order(cell, device, dtype, step, hidden):
    """The backends ``auto`` tries, in order (AUTO_ORDER, AUTO_ORDER_STEP; on CUDA the measured
    rule above: triton first only for bfloat16 at H within the device's fused forward limit)."""
    if step:
        return AUTO_ORDER_STEP.get(device.type, ("native", "reference"))
    if device.type == "cuda" and not (
            dtype == torch.bfloat16 and hidden is not None
            and hidden <= triton_gpu.fused_max_hidden("forward", cell, dtype,
                                                      triton_gpu.device_limits(device))):
        return AUTO_ORDER_CUDA_SLOWER
    return AUTO_ORDER.get(device.type, ("native", "reference"))


def _with_strategy(name, cell, device, dtype, reason):
    """``reason``, for the triton backend followed by the strategy it runs on ``device`` and why
    (:func:`fastrnn.kernels.triton_gpu.strategy_note`: the device's fused limits)."""
    if name != "triton":
        return reason
    note = triton_gpu.strategy_note(cell, dtype, triton_gpu.device_limits(torch.device(device)))
    return f"{reason}; {note}"


def choose(backend, cell, device, dtype, proj_size=0, step=False, hidden=None):
    """Resolve ``backend`` (a name or "auto") for a recurrence on ``device``/``dtype``
    (``step=True``: a single cell step, see ``AUTO_ORDER_STEP``; ``hidden``: H, which decides
    on CUDA, see ``AUTO_ORDER_CUDA_SLOWER``; None there: as for an H beyond the fused limit).

    Returns a :class:`Choice`. Raises ValueError for an unknown name and
    :class:`BackendUnavailable` when a named backend cannot run the case.
    """
    check_backend_name(backend)
    device = torch.device(device)
    if backend != "auto":
        reason = why_not(backend, cell, device, dtype, proj_size)
        failed = not reason and backend in KERNELS and not_ready(backend, cell, dtype, proj_size)
        if reason or failed:
            raise BackendUnavailable(f"backend={backend!r} cannot run this input: "
                                     f"{reason or failed}") from _FAILURES.get(
                                         (backend, cell, dtype, proj_size))
        return Choice(backend,
                      _with_strategy(backend, cell, device, dtype, "requested explicitly"))
    order = _auto_order(cell, device, dtype, step, hidden)
    skipped = []
    for name in order:
        reason = why_not(name, cell, device, dtype, proj_size)
        if reason is None and name in KERNELS:
            reason = not_ready(name, cell, dtype, proj_size)
            if reason:
                warnings.warn(f"fastrnn: {reason}; backend='auto' runs the next backend of "
                              f"{list(order)} instead", RuntimeWarning, stacklevel=2)
        if reason is None:
            what = f"a {cell} cell step" if step else cell
            why = f"auto: first of {list(order)} that runs {what} on {device.type} {dtype}"
            if order is AUTO_ORDER_CUDA_SLOWER:
                why += (f" H={hidden}: triton measured slower than cuDNN there on an H200, "
                        "bench/results/cuda-h200/")
            why += f" (skipped: {'; '.join(skipped)})" if skipped else ""
            return Choice(name, _with_strategy(name, cell, device, dtype, why))
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailable("no backend can run this input: " + "; ".join(skipped))
