"""Buffers of the numba backend: 64-byte aligned scratch and outputs, numpy views of CPU tensors,
the recurrent weights as the forward loop reads them (:func:`prepare`)."""
from __future__ import annotations

import contextlib
import math
import threading
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from fastrnn import cells
from fastrnn.kernels.numba_cpu import matmul
from fastrnn.kernels.numba_cpu.jit import _JIT

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
NUMPY_DTYPES = {t: n for n, t in TORCH_DTYPES.items()}
_NUMPY_ALLOC_MAX_BYTES = 1 << 20
_ALIGN = 64
# Up to this many elements (256 KB of float32) numpy transposes fastest: on an AMD EPYC Zen 1,
# 1 thread, with the aligned allocation, 128x128 18 µs (MKL's omatcopy 48, torch 25), 512x128
# 56 µs (MKL 149, torch 77); beyond, torch or MKL (see transposed).
_NUMPY_TRANSPOSE_MAX_NUMEL = 1 << 16


def alloc(shape, dtype):
    """Uninitialized float buffer of ``shape`` (2-D or 1-D) and numpy ``dtype`` for outputs and
    scratch, 64-byte aligned (MKL's gemm ran 1.7x slower per step on a 16-byte aligned weight,
    B=1 H=128). Every element is written before it is read (tests replace this with a NaN-filled
    allocator to prove it). Small ones from numpy (under 1 µs, a third of a torch tensor's cost:
    it counts at small sizes, where a call allocates several). Large ones from torch: numpy asks
    the kernel for transparent huge pages on large arrays, and here a first touch of those stalled
    now and then in page compaction (GRU training T=1000 B=64 H=128: 2 calls in 3 took 1.9x
    longer). Zero-size ones (arguments a loop does not use) are shared."""
    dtype, count = np.dtype(dtype), math.prod(shape)
    if not count:
        return _empty(shape, dtype)
    if count * dtype.itemsize >= _NUMPY_ALLOC_MAX_BYTES:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype]).numpy()
    raw = np.empty(count + _ALIGN // dtype.itemsize, dtype)
    start = _aligned_start(raw)
    return raw[start:start + count].reshape(shape)


_EMPTIES = {}


def _empty(shape, dtype):
    """A shared zero-size array of ``shape`` and ``dtype`` (nothing can be written into it)."""
    key = (tuple(shape), dtype)
    empty = _EMPTIES.get(key)
    if empty is None:
        empty = _EMPTIES[key] = np.empty(shape, dtype)
    return empty


def alloc_group(shapes, dtype):
    """Uninitialized buffers of 2-D ``shapes``, each 64-byte aligned, carved from one
    :func:`alloc` (each allocation costs microseconds: a call needs several)."""
    dtype = np.dtype(dtype)
    step = _ALIGN // dtype.itemsize
    starts, total = [], 0
    for rows, cols in shapes:
        starts.append(total)
        total += -(-(rows * cols) // step) * step
    raw = alloc((total,), dtype)
    return [raw[start:start + rows * cols].reshape(rows, cols) if rows * cols
            else _empty((rows, cols), dtype) for start, (rows, cols) in zip(starts, shapes)]


@njit(**_JIT)
def _aligned_start(a):
    """The first index of 1-D ``a`` at a 64-byte boundary (a jitted call: 4x faster than reading
    the address through numpy's ctypes)."""
    return (-a.ctypes.data % 64) // a.itemsize


def owned(tensor):
    """A C-contiguous, aligned numpy array owning a copy of ``tensor`` (a state the loop updates
    in place)."""
    a = tensor.detach().resolve_neg().numpy()
    out = alloc(a.shape, a.dtype)
    out[...] = a
    return out


def array(tensor):
    """A C-contiguous numpy view (zero copy when already contiguous and without its negative bit
    set, which numpy cannot show) of a CPU tensor."""
    return tensor.detach().resolve_neg().contiguous().numpy()


def transposed(tensor, out=None):
    """A C-contiguous, aligned numpy copy of ``tensor.t()`` (2-D), or written into ``out`` (one
    made before) where given. Up to ``_NUMPY_TRANSPOSE_MAX_NUMEL`` elements by numpy, larger ones
    by MKL's transpose where torch exports it, else by torch (2048x512, 1 thread: numpy's took 4.4
    ms, torch's 1.0 ms, MKL's 0.6 ms in an earlier session's measurement; on an AMD EPYC Zen 1
    numpy 4.3 ms, MKL 4.4, torch 1.7)."""
    a = array(tensor)
    rows, cols = a.shape
    if a.size > _NUMPY_TRANSPOSE_MAX_NUMEL and matmul._OMATCOPY is None:
        if out is None:
            return tensor.detach().t().contiguous().numpy()
        torch.from_numpy(out).copy_(tensor.detach().t())
        return out
    out = alloc((cols, rows), a.dtype) if out is None else out
    if a.size <= _NUMPY_TRANSPOSE_MAX_NUMEL:
        out[...] = a.T
    else:
        matmul._OMATCOPY[a.dtype](b"R", b"T", rows, cols, 1.0, a.ctypes.data, cols, out.ctypes.data,
                           rows)
    return out


class Prepared(NamedTuple):
    """One layer and direction's weights as the forward loop reads them (numpy, one dtype):
    bias (G*H,) added to each row of xg (zeros without bias), b_hn (H,) or (0,), w_cell (K, H) or
    (0, 0), w_t = W_hh^T (P, G*H) and wr_t = W_hr^T (H, P) or (0, 0), aligned copies (for a call
    whose plan reads the weights in place, ``live``: W_hh (G*H, P) and W_hr (P, H) themselves), and
    w_p: w_t packed for the panel kernels (:func:`.matmul.panels`)."""

    bias: np.ndarray
    b_hn: np.ndarray
    w_cell: np.ndarray
    w_t: np.ndarray
    wr_t: np.ndarray
    w_p: np.ndarray


_REUSED = threading.local()


@contextlib.contextmanager
def reusing_weights():
    """Within this context (on this thread) :func:`prepare` prepares the same tensors once, for
    calls on weights that do not change meanwhile: a long input's chunks
    (``functional._chunked_layer``; LSTM H=512, 4 MiB of W_hh: ~3 ms a chunk)."""
    previous = getattr(_REUSED, "prepared", None)
    _REUSED.prepared = {}
    try:
        yield
    finally:
        _REUSED.prepared = previous


def prepare(cell, w_hh, b_hn, w_hr, bias, w_cell, panels=True, live=False):
    """The :class:`Prepared` weights of :func:`.launch.recurrence_forward`'s arguments (tensors);
    w_p has no panels unless ``panels`` (the call's step matmul runs in the micro-kernels); with
    ``live`` (the plan's), W_hh and W_hr as given. Within :func:`reusing_weights`, made once per
    tensors (the key: they stay alive, unchanged, in the context)."""
    reused = getattr(_REUSED, "prepared", None)
    if reused is None:
        return _prepare(cell, w_hh, b_hn, w_hr, bias, w_cell, panels, live)
    key = (cell, *map(id, (w_hh, b_hn, w_hr, bias, w_cell)), panels, live)
    if (prepared := reused.get(key)) is None:
        prepared = reused[key] = _prepare(cell, w_hh, b_hn, w_hr, bias, w_cell, panels, live)
    return prepared


def _prepare(cell, w_hh, b_hn, w_hr, bias, w_cell, panels, live):
    spec = cells.spec(cell)
    dtype = NUMPY_DTYPES[w_hh.dtype]
    hidden = w_hh.shape[0] // spec.gates
    empty = _empty((0, 0), dtype)
    # (K, N) for the matmul; MKL's gemm reading W_hh in place with transa='T' measured 1.7x slower
    # per step (B=8, H=128) than this one copy per call.
    w_t = array(w_hh) if live else transposed(w_hh)
    return Prepared(
        array(bias) if bias is not None else np.zeros(w_hh.shape[0], dtype),
        array(b_hn) if b_hn is not None else np.zeros(hidden if spec.has_b_hn else 0, dtype),
        array(w_cell) if w_cell is not None else empty, w_t,
        (array if live else transposed)(w_hr) if w_hr is not None else empty,
        matmul.panels(w_t, panels and not live))
