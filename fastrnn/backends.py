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
cells) that can run the input.
A backend named explicitly that cannot run the input raises :class:`BackendUnavailable`;
it never silently falls back.
"""
from __future__ import annotations

import functools
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


def check_backend_name(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def kernels(name):
    """The kernel package of a compiled backend, or :mod:`fastrnn.kernels.reference` (both
    implement the contract of :func:`fastrnn.kernels.reference.recurrence_forward` /
    ``recurrence_backward``)."""
    return reference if name == "reference" else KERNELS[name]


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


@functools.lru_cache(maxsize=None)
def _choose(backend, cell, device, dtype, proj_size, step):
    return choose(backend, cell, device, dtype, proj_size, step)


@torch.compiler.assume_constant_result
def resolve(backend, cell, device, dtype, proj_size=0, step=False):
    """The name :func:`choose` picks, cached per case; a constant to torch.compile."""
    return _choose(backend, cell, torch.device(device), dtype, proj_size, step).name


def choose(backend, cell, device, dtype, proj_size=0, step=False):
    """Resolve ``backend`` (a name or "auto") for a recurrence on ``device``/``dtype``
    (``step=True``: a single cell step, see ``AUTO_ORDER_STEP``).

    Returns a :class:`Choice`. Raises ValueError for an unknown name and
    :class:`BackendUnavailable` when a named backend cannot run the case.
    """
    check_backend_name(backend)
    device = torch.device(device)
    if backend != "auto":
        reason = why_not(backend, cell, device, dtype, proj_size)
        if reason:
            raise BackendUnavailable(f"backend={backend!r} cannot run this input: {reason}")
        return Choice(backend, "requested explicitly")
    order = (AUTO_ORDER_STEP if step else AUTO_ORDER).get(device.type, ("native", "reference"))
    skipped = []
    for name in order:
        reason = why_not(name, cell, device, dtype, proj_size)
        if reason is None:
            what = f"a {cell} cell step" if step else cell
            why = f"auto: first of {list(order)} that runs {what} on {device.type} {dtype}"
            return Choice(name, why + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailable("no backend can run this input: " + "; ".join(skipped))
