"""The compiled time loops, forward and BPTT, one per cell family; each runs one thread's rows of a
whole (possibly packed) sequence."""
from __future__ import annotations

import numpy as np
from numba import njit

from fastrnn.kernels.numba_cpu.activations import _sigmoid, _tanh
from fastrnn.kernels.numba_cpu.jit import _JIT, _one, _prefer_wide_vectors
from fastrnn.kernels.numba_cpu.matmul import _matmul_rows

# --------------------------------------------------------------------------- time loops
# How the pointwise work is written (each choice measured here, LSTM/GRU rows of H = 32 … 128):
# * rows are indexed in the 2-D arrays (``a[r, j]``), never taken as row views: a view costs a
#   reference-count increment and decrement per row (atomics), which was 6x the LSTM backward's
#   arithmetic at H = 32;
# * each loop writes one array and never reads the array it writes at another offset, so LLVM
#   vectorizes it with a few runtime alias checks (a loop writing several arrays stayed scalar,
#   4x slower on the LSTM gates);
# * constants are of the array's dtype (``_one``): an int literal would promote float32 to float64.
#
# Arguments shared by the loops: ``order`` (T,) steps in processing order, ``offsets``/``sizes``
# (T,) packed row offset and batch size of each step; (tid, nthreads, group) pick this thread's
# rows. Forward: ``save`` keeps what backward needs (training); without it (inference) the
# pre-activations go to the per-row scratch ``acc`` instead of the saved ``gates``.
# Backward: ``prev`` (N,) is the packed row of each row's previous state in processing order, or
# -1 - b when it is the initial state h0[b] / c0[b]; ``dh``/``dc`` (B, ·) carry the gradient
# w.r.t. each row's current state: on entry grad_h_n / grad_c_n, on exit d_h0 / d_c0.

@njit(**_JIT)
def _thread_rows(tid, nthreads, group, batch):
    """The batch rows of thread ``tid``, ascending: groups of ``group`` rows dealt round-robin over
    ``nthreads``. At a step with ``rows`` active rows, a thread's active rows are a prefix."""
    count = 0
    for b in range(batch):
        if (b // group) % nthreads == tid:
            count += 1
    mine = np.empty(count, np.int64)
    count = 0
    for b in range(batch):
        if (b // group) % nthreads == tid:
            mine[count] = b
            count += 1
    return mine


@njit(**_JIT)
def _rnn_forward_thread(tid, nthreads, group, gemm, relu, xg, bias, h, w_t, y, order, offsets,
                        sizes):
    _prefer_wide_vectors()
    hidden = h.shape[1]
    zero = _one(y) - _one(y)
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        _matmul_rows(y, off, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if relu:
                for u in range(hidden):
                    v = y[q, u] + (xg[q, u] + bias[u])
                    y[q, u] = zero if v <= zero else v  # NaN passes through, as in torch.relu
            else:
                for u in range(hidden):
                    y[q, u] = _tanh(y[q, u] + (xg[q, u] + bias[u]))
            for u in range(hidden):
                h[b, u] = y[q, u]


@njit(**_JIT)
def _lstm_forward_thread(tid, nthreads, group, gemm, save, xg, bias, h, c, w_t, wr_t, has_proj, y,
                         gates, c_all, acc, m, order, offsets, sizes):
    _prefer_wide_vectors()
    hidden = c.shape[1]
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    out = m if has_proj else y  # o tanh(c): the projection's input, or the output itself
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        a, base = (gates, off) if save else (acc, 0)
        _matmul_rows(a, base, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            r, q = base + b, off + b
            o = b if has_proj else q
            for j in range(2 * hidden):  # i, f
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):  # g (a loop from a nonzero start stayed scalar: 8x slower)
                j = 2 * hidden + u
                a[r, j] = _tanh(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):  # o
                j = 3 * hidden + u
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):
                c[b, u] = a[r, hidden + u] * c[b, u] + a[r, u] * a[r, 2 * hidden + u]
            for u in range(hidden):
                out[o, u] = a[r, 3 * hidden + u] * _tanh(c[b, u])
            if save:
                for u in range(hidden):
                    c_all[q, u] = c[b, u]
            if not has_proj:
                for u in range(hidden):
                    h[b, u] = y[q, u]
        if has_proj:
            _matmul_rows(y, off, m, 0, wr_t, tid, nthreads, group, rows, gemm, True)
            for b in mine:
                if b >= rows:
                    break
                for k in range(h.shape[1]):
                    h[b, k] = y[off + b, k]


@njit(**_JIT)
def _gru_forward_thread(tid, nthreads, group, gemm, save, xg, bias, h, w_t, b_hn, y, gates, acc,
                        order, offsets, sizes):
    """Row of ``a`` after a step: (r, z, hn = h W_hn^T + b_hn, n), the saved gates."""
    _prefer_wide_vectors()
    hidden = h.shape[1]
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        a, base = (gates, off) if save else (acc, 0)
        _matmul_rows(a, base, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            r, q = base + b, off + b
            for j in range(2 * hidden):  # r, z
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):
                a[r, 2 * hidden + u] += b_hn[u]
            for u in range(hidden):  # n, kept in y until the update
                j = 2 * hidden + u
                y[q, u] = _tanh((xg[q, j] + bias[j]) + a[r, u] * a[r, j])
            if save:
                for u in range(hidden):
                    a[r, 3 * hidden + u] = y[q, u]
            for u in range(hidden):
                n = y[q, u]
                y[q, u] = n + a[r, hidden + u] * (h[b, u] - n)
            for u in range(hidden):
                h[b, u] = y[q, u]


@njit(**_JIT)
def _rnn_backward_thread(tid, nthreads, group, gemm, relu, grad_y, y, w, dh, d_xg, order, offsets,
                         sizes):
    _prefer_wide_vectors()
    hidden = dh.shape[1]
    one = _one(dh)
    zero = one - one
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if relu:
                for u in range(hidden):
                    d_xg[q, u] = (dh[b, u] + grad_y[q, u]) if y[q, u] > zero else zero
            else:
                for u in range(hidden):
                    d_xg[q, u] = (dh[b, u] + grad_y[q, u]) * (one - y[q, u] * y[q, u])
        _matmul_rows(dh, 0, d_xg, off, w, tid, nthreads, group, rows, gemm, True)


@njit(**_JIT)
def _lstm_backward_thread(tid, nthreads, group, gemm, grad_y, c0, w, wr, has_proj, gates, c_all, dh,
                          dc, dm, d_xg, dy_all, m_all, tc, prev, order, offsets, sizes):
    """``dm`` (B, H): gradient w.r.t. o tanh(c); ``tc``: tanh(c) of the step (per batch row, or
    per packed row in ``m_all`` with a projection, which then holds m = o tanh(c) for d_w_hr)."""
    _prefer_wide_vectors()
    hidden = dc.shape[1]
    one = _one(dc)
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    tanh_c = m_all if has_proj else tc
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if has_proj:  # carry + grad_y, kept per packed row for d_w_hr; dm = that @ w_hr
                for k in range(dh.shape[1]):
                    dy_all[q, k] = dh[b, k] + grad_y[q, k]
            else:
                for u in range(hidden):
                    dm[b, u] = dh[b, u] + grad_y[q, u]
        if has_proj:
            _matmul_rows(dm, 0, dy_all, off, wr, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            q = off + b
            tr = q if has_proj else b
            pr = prev[q]
            c_prev, cr = (c_all, pr) if pr >= 0 else (c0, -1 - pr)
            for u in range(hidden):
                tanh_c[tr, u] = _tanh(c_all[q, u])
            for u in range(hidden):
                o, tcu = gates[q, 3 * hidden + u], tanh_c[tr, u]
                dc[b, u] += dm[b, u] * o * (one - tcu * tcu)
            for u in range(hidden):  # d o
                o = gates[q, 3 * hidden + u]
                d_xg[q, 3 * hidden + u] = dm[b, u] * tanh_c[tr, u] * o * (one - o)
            for u in range(hidden):  # d i
                i = gates[q, u]
                d_xg[q, u] = dc[b, u] * gates[q, 2 * hidden + u] * i * (one - i)
            for u in range(hidden):  # d f
                f = gates[q, hidden + u]
                d_xg[q, hidden + u] = dc[b, u] * c_prev[cr, u] * f * (one - f)
            for u in range(hidden):  # d g
                g = gates[q, 2 * hidden + u]
                d_xg[q, 2 * hidden + u] = dc[b, u] * gates[q, u] * (one - g * g)
            for u in range(hidden):
                dc[b, u] *= gates[q, hidden + u]
            if has_proj:
                for u in range(hidden):
                    m_all[q, u] *= gates[q, 3 * hidden + u]
        _matmul_rows(dh, 0, d_xg, off, w, tid, nthreads, group, rows, gemm, True)


@njit(**_JIT)
def _gru_backward_thread(tid, nthreads, group, gemm, grad_y, h0, y, w, gates, dh, d_xg, d_hn, dg,
                         prev, order, offsets, sizes):
    """``gates`` rows (r, z, hn, n); ``d_hn`` (N, H) receives the gradient w.r.t.
    hn = h W_hn^T + b_hn; ``dg`` (B, 3H) is the step's gradient w.r.t. (h W_hr^T, h W_hz^T, hn),
    the left operand of the step's matmul (scratch: an (N, 3H) copy would cost a fresh 3H per
    row)."""
    _prefer_wide_vectors()
    hidden = dh.shape[1]
    one = _one(dh)
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            pr = prev[q]
            h_prev, hr = (y, pr) if pr >= 0 else (h0, -1 - pr)
            for u in range(hidden):
                dh[b, u] += grad_y[q, u]
            for u in range(hidden):  # d n
                z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_xg[q, 2 * hidden + u] = dh[b, u] * (one - z) * (one - n * n)
            for u in range(hidden):  # d r
                r, z, n = gates[q, u], gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_xg[q, u] = (dh[b, u] * (one - z) * (one - n * n) * gates[q, 2 * hidden + u]
                              * r * (one - r))
            for u in range(hidden):  # d z
                z = gates[q, hidden + u]
                d_xg[q, hidden + u] = (dh[b, u] * (h_prev[hr, u] - gates[q, 3 * hidden + u])
                                       * z * (one - z))
            for j in range(2 * hidden):
                dg[b, j] = d_xg[q, j]
            for u in range(hidden):
                z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_hn[q, u] = dh[b, u] * (one - z) * (one - n * n) * gates[q, u]
            for u in range(hidden):
                dg[b, 2 * hidden + u] = d_hn[q, u]
            for u in range(hidden):
                dh[b, u] *= gates[q, hidden + u]
        _matmul_rows(dh, 0, dg, 0, w, tid, nthreads, group, rows, gemm, False)


@njit(**_JIT)
def _previous_rows(order, offsets, sizes, prev):
    """prev[offsets[t] + b] = packed row of row b's state before step t (the row it had at the
    previous step in processing order), or -1 - b where that is the initial state."""
    for p in range(order.shape[0]):
        t = order[p]
        off = offsets[t]
        if p == 0:
            for b in range(sizes[t]):
                prev[off + b] = -1 - b
        else:
            tp = order[p - 1]
            for b in range(sizes[t]):
                prev[off + b] = offsets[tp] + b if b < sizes[tp] else -1 - b


@njit(**_JIT)
def _gather_rows(src, init, prev, out):
    """out[n] = src[prev[n]] if prev[n] >= 0 else init[-1 - prev[n]] (out: (N, P))."""
    _prefer_wide_vectors()
    for n in range(prev.shape[0]):
        pr = prev[n]
        rows, row = (src, pr) if pr >= 0 else (init, -1 - pr)
        for k in range(out.shape[1]):
            out[n, k] = rows[row, k]

