"""A layer's input projection ``xg = x W_ih^T`` without gradients, in the panel kernels
(:mod:`.vectors`) on CPUs that run them (:data:`.matmul.USE_PANELS`) and from
:data:`MIN_ROWS` rows on; torch.mm (MKL) elsewhere. The lean inference path
(:mod:`.inference`, W_ih packed once per weight version) and the full path's no-gradient routes
(:func:`project`, W_ih packed per call) follow the same rule, so both give the same bits.

W_ih^T is packed in panels; x's rows go in blocks of :data:`BLOCK_ROWS` (a block of x stays in
cache while every panel passes over it), blocks dealt round-robin over torch's threads. Each
element's sum is the same whatever the thread count: 4-row blocks start at multiples of 4.
Measured (AMD EPYC Zen 4, 1 thread, float32, GFLOP/s, this kernel / torch.mm): N=1600 I=128
G*H=512 111/92; N=12800 same 98/85; N=3200 I=512 G*H=2048 110/94; N=12800 I=32 G*H=128 105/73.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from numba import njit

from fastrnn.kernels.numba_cpu import buffers, launch, matmul
from fastrnn.kernels.numba_cpu.jit import _JIT

# From this many rows (x's: T*B) on the panel kernels project. Below, packing W_ih^T per call
# (the full path's) costs about what the kernel saves (I=128, G*H=512: ~40 us to pack, ~18% of
# a 256-row GEMM's 0.17 ms).
MIN_ROWS = 256
BLOCK_ROWS = 128  # a multiple of 4 (the 4-row kernel's blocks must not depend on the split)


def applies(rows):
    """Whether a projection of ``rows`` rows runs here (else torch.mm / BLAS)."""
    return matmul.USE_PANELS and rows >= MIN_ROWS


def packed(w_ih):
    """``(w_t, w_p)``: W_ih^T (I, G*H) aligned and its panels (:func:`.matmul.panels`), from
    ``w_ih`` (G*H, I), a CPU tensor."""
    w_t = buffers.transposed(w_ih)
    return w_t, matmul.panels(w_t)


class _Plan(NamedTuple):  # what launch._run reads
    nthreads: int
    group: int
    gemm: int = 0
    blas_threads: int = 0


def run(xg, x, w_t, w_p):
    """``xg = x @ w_t`` in place: numpy xg (N, G*H), x (N, I) C-contiguous, w_t (I, G*H) and its
    panels w_p."""
    threads = min(torch.get_num_threads(), launch._CPUS, -(-x.shape[0] // BLOCK_ROWS))
    launch._run(_project_thread, _Plan(max(1, threads), BLOCK_ROWS), xg, x, w_t, w_p)


def project(x, w_ih):
    """``x @ w_ih.t()`` (x (N, I), w_ih (G*H, I) CPU tensors of one float dtype, no gradient
    recorded) as a new tensor, or None where :func:`applies` says torch.mm."""
    if not applies(x.shape[0]):
        return None
    w_t, w_p = packed(w_ih)
    xg = buffers.alloc((x.shape[0], w_t.shape[1]), w_t.dtype)
    run(xg, buffers.array(x), w_t, w_p)
    return torch.from_numpy(xg)


@njit(**_JIT)
def _project_thread(tid, nthreads, group, gemm, xg, x, w_t, w_p):
    """Thread ``tid``'s blocks of ``group`` rows (launch._run's loop signature; gemm unused)."""
    for r0 in range(tid * group, x.shape[0], nthreads * group):
        rows = min(group, x.shape[0] - r0)
        matmul._matmul_rows(xg, r0, x, r0, w_t, w_p, 0, 1, rows, rows, 0, True)

