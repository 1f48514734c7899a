"""A layer and direction's BPTT after its arguments are checked: the time loop
(:func:`.loops._backward_thread`) and the weight gradients reduced after it. On one thread with a
BLAS gemm (:func:`direct`), all of it in one compiled call, :func:`_bptt`: the states' gradients
copied in, each row's previous row, the loop, d_W_hh (and GRU's d_b_hn, LSTM's d_W_hr) through
the gemm with the arguments torch.mm passes (bitwise torch's ``d.t() @ h``) and d_bias as
:func:`column_sums`; no Python between them (LSTM T=50 B=1 H=32 training, Intel Xeon, 1 thread: the
layer's BPTT took 108 µs as Python around the compiled loop, of which the loop 16). Elsewhere
:func:`.launch.recurrence_backward` runs the same pieces from Python, in the same order: the
same results."""
from __future__ import annotations

import numpy as np
from numba import njit

from fastrnn.kernels.numba_cpu import buffers, jit, loops, matmul
from fastrnn.kernels.numba_cpu.jit import _JIT, _prefer_wide_vectors
from fastrnn.kernels.numba_cpu.loops import _backward_thread, _gather_rows, _previous_rows
from fastrnn.kernels.numba_cpu.matmul import _call_gemm, _on_stack


@njit(**_JIT)
def column_sums(a, out):
    """out[j] = the sum of a[:, j] (a (N, C), out (C,)), the rows added in order: a bias's
    gradient, the same bits whatever the thread count."""
    _prefer_wide_vectors()
    for j in range(out.shape[0]):
        out[j] = 0
    for n in range(a.shape[0]):
        for j in range(out.shape[0]):
            out[j] += a[n, j]


@njit(**_JIT)
def gemm_tn(gemm, out, a, b):
    """out (C, P) = a[:, :C]^T @ b, a (N, ·) and b (N, P) with contiguous rows, out C-contiguous,
    by the Fortran gemm at address ``gemm``: the call torch.mm(a[:, :C].t(), b) makes (bitwise
    its result)."""
    rows, p = b.shape
    _call_gemm(gemm, _on_stack(78, np.uint8), _on_stack(84, np.uint8), _on_stack(p, np.int32),
               _on_stack(out.shape[0], np.int32), _on_stack(rows, np.int32),
               _on_stack(1, out.dtype), np.int64(b.ctypes.data), _on_stack(p, np.int32),
               np.int64(a.ctypes.data), _on_stack(a.shape[1], np.int32), _on_stack(0, out.dtype),
               np.int64(out.ctypes.data), _on_stack(p, np.int32))


@njit(**_JIT)
def _bptt(gemm, group, step_gemm, code, grad_y, grad_h_n, grad_c_n, y, h0, c0, gates, c_all, w,
          w_p, wr, w_cell, has_proj, scratch_grad, direct_h, dh, dc, dm, d_xg, d_hn, dg, dy_all,
          m_all, tc, prev, order, offsets, sizes, h_prev, d_w_hh, d_bias, d_b_hn, d_w_hr):
    """:func:`direct`'s compiled call: the arguments of :func:`.loops._backward_thread` on one
    thread, the states' gradients grad_h_n (B, P) and grad_c_n (B, H) or (0, 0) (zeros) copied
    into dh and dc, h_prev (N, P) scratch (or (0, 0): one step), the gradients written into
    d_w_hh (G*H, P), d_bias (G*H,) or (0,), d_b_hn (H,) or (0,), d_w_hr (P, H) or (0, 0)."""
    _prefer_wide_vectors()  # as the loop's own: where LLVM inlines it here
    for b in range(dh.shape[0]):
        for k in range(dh.shape[1]):
            dh[b, k] = grad_h_n[b, k]
        for k in range(dc.shape[1]):
            dc[b, k] = grad_c_n[b, k] if grad_c_n.size else 0
    _previous_rows(order, offsets, sizes, prev)
    _backward_thread(0, 1, group, step_gemm, prev[:0], code, grad_y, y, h0, c0, gates, c_all, w,
                     w_p, wr, w_cell, has_proj, scratch_grad, direct_h, dh, dc, dm, d_xg, d_hn,
                     dg, dy_all, m_all, tc, prev, order, offsets, sizes)
    states = h0  # each row's state before its step: h0 itself for one step
    if h_prev.shape[0]:
        _gather_rows(y, h0, prev, h_prev)
        states = h_prev
    split = d_w_hh.shape[0] - d_hn.shape[1]
    gemm_tn(gemm, d_w_hh[:split], d_xg, states)
    if scratch_grad:
        gemm_tn(gemm, d_w_hh[split:], d_hn, states)
        if d_b_hn.size:
            column_sums(d_hn, d_b_hn)
    if has_proj:
        gemm_tn(gemm, d_w_hr, dy_all, m_all)
    if d_bias.size:
        column_sums(d_xg, d_bias)


def direct(plan, gemm, code, args, grad_h_n, grad_c_n, prev, shapes):
    """The BPTT of :func:`.launch.recurrence_backward` in one compiled call (:func:`_bptt`):
    ``args`` the loop's arguments from ``grad_y`` to ``tc`` as it passes them (dh and dc to be
    written: grad_h_n (B, P) and grad_c_n (B, H), or (0, 0) for zeros, C-contiguous numpy, are
    copied into them), ``prev`` (N,) int64 scratch, ``shapes`` those of h_prev, d_w_hh, d_bias,
    d_b_hn, d_w_hr ((0,) or (0, 0) where there is none). Returns the last four, numpy."""
    dtype = args[0].dtype
    h_prev, d_w_hh, d_bias, d_b_hn, d_w_hr = (
        buffers.alloc(shape, dtype) if min(shape) else buffers._empty(shape, dtype)
        for shape in shapes)
    _bptt(gemm, plan.group, plan.gemm, code, args[0], grad_h_n, grad_c_n, *args[1:], prev,
          *plan[:3], h_prev, d_w_hh, d_bias, d_b_hn, d_w_hr)
    return d_w_hh, d_bias, d_b_hn, d_w_hr


def applies(plan, gemm, w_cell):
    """Whether :func:`direct` runs a call of ``plan``: one loop thread whose BLAS calls (if any)
    keep MKL's thread count, a gemm at ``gemm``, no cell weights (their gradient is the cell's
    own function of torch tensors)."""
    return (plan.nthreads == 1 and not (plan.gemm and plan.blas_threads) and gemm != 0
            and w_cell is None)


# Its cache entries keyed also by the files it compiles in (the loops')
_bptt._cache = jit.KeyedCache(_bptt.py_func, (*loops._INLINED, str(loops.__file__)))
for _fn in (column_sums, gemm_tn):
    _fn._cache = jit.KeyedCache(_fn.py_func, (str(matmul.__file__),))
