"""A layer's input projection ``xg = x W_ih^T`` without gradients, in the panel kernels
(:mod:`.vectors`) on CPUs that run them (:data:`.matmul.USE_PANELS`) but for calls of a few rows
(:func:`.launch.live`: W_ih read in place) and, with MKL on an Intel CPU, calls of many rows
(:data:`MAX_ROWS`); torch.mm's gemm call (MKL) elsewhere, a single row in
:func:`.vectors._dot_row`; torch.mm wherever a gradient is recorded. The lean inference path
(:mod:`.inference`) and the full path's no-gradient routes (:func:`project`) both run it, the
panel kernels on W_ih packed once per weight version, so both give the same bits.

W_ih^T is packed in panels; x's rows go in blocks of :data:`BLOCK_ROWS` (a block of x stays in
cache while every panel passes over it), blocks dealt round-robin over torch's threads. Each
element's sum is the same whatever the thread count: 4-row blocks start at multiples of 4.
Measured (AMD EPYC Zen 4, 1 thread, float32, this kernel against torch.mm): 98-112 against
85-94 GFLOP/s at N=1600-12800 rows, I=128-512, G*H=512-2048 (105 against 73 at I=32,
G*H=128); 1.1-2.7x at N=1-200, H=32-512 (H=128 N=1: 4.1 against 9.7 us).
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from numba import njit

from fastrnn import weight_cache
from fastrnn.kernels.numba_cpu import buffers, jit, launch, matmul, team, vectors
from fastrnn.kernels.numba_cpu.jit import _JIT

BLOCK_ROWS = 128  # a multiple of 4 (the 4-row kernel's blocks must not depend on the split)
# Up to this many rows the panel kernels project, beyond it the BLAS gemm; no limit unless the BLAS
# is MKL on an Intel CPU (matmul.MKL_ON_INTEL). There (Intel Xeon, family 6 model 167, AVX-512)
# MKL's gemm called directly took, against the panel kernels, I=32-512, G*H=128-2048: from 64
# rows 0.82-0.99 of their time on 1 thread, 0.53-1.34 on 2 (below 1 in 17 of 20); 16 rows
# 0.78-1.40 (above 1 from I=128).
MAX_ROWS = 16 if matmul.MKL_ON_INTEL else 1 << 62


def applies(rows):
    """Whether the projection of ``rows`` rows runs here (else torch.mm / BLAS, as for every call
    that reads its weights in place: :func:`.launch.live`, and beyond :data:`MAX_ROWS`)."""
    return matmul.USE_PANELS and not launch.live(rows) and rows <= MAX_ROWS


def packed(w_ih):
    """``(w_t, w_p)``: W_ih^T (I, G*H) aligned and its panels (:func:`.matmul.panels`), from
    ``w_ih`` (G*H, I), a CPU tensor."""
    w_t = buffers.transposed(w_ih)
    return w_t, matmul.panels(w_t)


# id(w_ih) -> (weak reference, fingerprint, packed(w_ih)): the full path's packed weights, remade
# when the weight changes (fastrnn.weight_cache) and dropped with it (the lean path keeps its own
# with its prepared weights).
_PACKED = {}


def _packed_weights(w_ih):
    """:func:`packed` of ``w_ih``, kept while :func:`fastrnn.weight_cache.matches` (an inference
    tensor, which has no version counter: packed every call)."""
    key = id(w_ih)
    entry = _PACKED.get(key)
    same = entry is not None and entry[0]() is w_ih
    if same and weight_cache.matches(entry[1], [w_ih]):
        return entry[2]
    fingerprint = weight_cache.fingerprint([w_ih], entry[1] if same else None)
    if fingerprint is None:
        return packed(w_ih)
    if entry is None:
        weakref.finalize(w_ih, _PACKED.pop, key, None)
    weights = packed(w_ih)
    _PACKED[key] = (weakref.ref(w_ih), fingerprint, weights)
    return weights


class _Plan(NamedTuple):  # what launch._run reads
    nthreads: int
    group: int
    gemm: int = 0
    blas_threads: int = 0
    split: bool = False


def run(xg, x, w_t, w_p):
    """``xg = x @ w_t`` in place: numpy xg (N, G*H), x (N, I) C-contiguous, w_t (I, G*H) and its
    panels w_p."""
    threads = min(torch.get_num_threads(), launch._CPUS, -(-x.shape[0] // BLOCK_ROWS))
    launch._run(_project_thread, _Plan(max(1, threads), BLOCK_ROWS), xg, x, w_t, w_p)


def project(x, w_ih, out=None):
    """``x @ w_ih.t()`` (x (N, I), w_ih (G*H, I) CPU tensors of one float dtype, no gradient
    recorded) as a new tensor, or into ``out`` (a contiguous (N, G*H) tensor) where given, as
    the lean path makes it: here where :func:`applies`, else by :func:`.matmul._project_in_place`
    (W_ih read in place; torch.mm's own gemm call but for a single row); None where torch exports
    no gemm (torch.mm then)."""
    panels, gemm = applies(x.shape[0]), matmul._gemm_address(w_ih.dtype)
    if not (panels or gemm):
        return None
    xg = (buffers.alloc((x.shape[0], w_ih.shape[0]), buffers.NUMPY_DTYPES[w_ih.dtype])
          if out is None else out.numpy())
    if panels:
        run(xg, buffers.array(x), *_packed_weights(w_ih))
    else:
        matmul._project_in_place(gemm, xg, buffers.array(x), buffers.array(w_ih))
    return torch.from_numpy(xg) if out is None else out


@njit(**_JIT)
def _project_thread(tid, nthreads, group, gemm, xg, x, w_t, w_p):
    """Thread ``tid``'s blocks of ``group`` rows (launch._run's loop signature; gemm unused)."""
    for r0 in range(tid * group, x.shape[0], nthreads * group):
        rows = min(group, x.shape[0] - r0)
        matmul._matmul_rows(xg, r0, x, r0, w_t, w_p, 0, 1, rows, rows, 0, True)


_project_in_team = team.in_team(_project_thread)


@njit(**_JIT)
def _project_team(nthreads, group, gemm, xg, x, w_t, w_p):
    """:func:`_project_thread` on each thread of torch's OpenMP team (:mod:`.team`)."""
    _project_in_team(None, (nthreads, group, gemm, xg, x, w_t, w_p))


team.LOOPS[_project_thread] = _project_team
# Their cache entries keyed also by the files they compile in (as the loops': .loops._INLINED)
for _fn in (_project_thread, _project_team):
    _fn._cache = jit.KeyedCache(_fn.py_func,
                                tuple(str(m.__file__) for m in (matmul, team, vectors)))
