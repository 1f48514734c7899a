"""Buffers of the numba backend: 64-byte aligned scratch and outputs, numpy views of CPU tensors,
the recurrent weights' transposed copies."""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

from fastrnn.kernels.numba_cpu import matmul
from fastrnn.kernels.numba_cpu.jit import _JIT

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
NUMPY_DTYPES = {t: n for n, t in TORCH_DTYPES.items()}
_NUMPY_ALLOC_MAX_BYTES = 1 << 20
_ALIGN = 64
_NUMPY_TRANSPOSE_MAX_NUMEL = 1 << 13


def alloc(shape, dtype):
    """Uninitialized float buffer for outputs and scratch, 64-byte aligned (MKL's gemm ran 1.7x
    slower per step on a 16-byte aligned weight, B=1 H=128). Every element is written before it
    is read (tests replace this with a NaN-filled allocator to prove it). Small ones from numpy
    (under 1 µs, a third of a torch tensor's cost: it counts at small sizes, where a call
    allocates five). Large ones from torch: numpy asks the kernel for transparent huge pages on
    large arrays, and here a first touch of those stalled now and then in page compaction (GRU
    training T=1000 B=64 H=128: 2 calls in 3 took 1.9x longer)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes >= _NUMPY_ALLOC_MAX_BYTES:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype]).numpy()
    if nbytes == 0:  # an argument the loop does not use
        return np.empty(shape, dtype)
    count = nbytes // dtype.itemsize
    raw = np.empty(count + _ALIGN // dtype.itemsize, dtype)
    start = _aligned_start(raw)
    return raw[start:start + count].reshape(shape)


def alloc_group(shapes, dtype):
    """Uninitialized buffers of ``shapes``, each 64-byte aligned, carved from one :func:`alloc`
    (each allocation costs microseconds: a call needs several)."""
    step = _ALIGN // np.dtype(dtype).itemsize
    sizes = [math.prod(shape) for shape in shapes]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // step) * step)
    raw = alloc((starts[-1],), dtype)
    return [raw[start:start + size].reshape(shape)
            for start, size, shape in zip(starts, sizes, shapes)]


@njit(**_JIT)
def _aligned_start(a):
    """The first index of 1-D ``a`` at a 64-byte boundary (a jitted call: 4x faster than reading
    the address through numpy's ctypes)."""
    return (-a.ctypes.data % 64) // a.itemsize


def owned(tensor):
    """A C-contiguous, aligned numpy array owning a copy of ``tensor`` (a state the loop updates
    in place)."""
    a = tensor.detach().numpy()
    out = alloc(a.shape, a.dtype)
    out[...] = a
    return out


def array(tensor):
    """A C-contiguous numpy view (zero copy when already contiguous) of a CPU tensor."""
    return tensor.detach().contiguous().numpy()


def transposed(tensor):
    """A C-contiguous, aligned numpy copy of ``tensor.t()`` (2-D). Small ones by numpy (3 µs; a
    ctypes call costs 8), large ones by MKL's transpose where torch exports it, else by torch
    (numpy's took 4.4 ms at 2048x512, torch's 1.0 ms, MKL's 0.6 ms)."""
    a = array(tensor)
    rows, cols = a.shape
    if a.size > _NUMPY_TRANSPOSE_MAX_NUMEL and matmul._OMATCOPY is None:
        return tensor.detach().t().contiguous().numpy()
    out = alloc((cols, rows), a.dtype)
    if a.size <= _NUMPY_TRANSPOSE_MAX_NUMEL:
        out[...] = a.T
    else:
        matmul._OMATCOPY[a.dtype](b"R", b"T", rows, cols, 1.0, a.ctypes.data, cols, out.ctypes.data,
                           rows)
    return out
