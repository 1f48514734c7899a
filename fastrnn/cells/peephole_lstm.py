"""LSTM with peephole connections (Gers & Schmidhuber 2000): the cell state enters the gates,
``c`` (before the step) into i and f, ``c'`` (after it) into o, through per-unit weights
``w_ci, w_cf, w_co`` (each (H,), stacked as ``w_cell`` (3, H))::

    i = σ(xg_i + h W_hi^T + w_ci ⊙ c)      f = σ(xg_f + h W_hf^T + w_cf ⊙ c)
    g = tanh(xg_g + h W_hg^T)              c' = f ⊙ c + i ⊙ g
    o = σ(xg_o + h W_ho^T + w_co ⊙ c')     h' = o ⊙ tanh(c')

torch.nn has no such cell; fastrnn exposes it as :class:`fastrnn.PeepholeLSTM`.
"""
from __future__ import annotations

import torch

from fastrnn.cells import lstm, scalar
from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, 4H), h (b, H), c (b, H), w_cell (3, H)
    -> (h' (b, H), c' (b, H))."""
    w_ci, w_cf, w_co = w_cell
    i, f, g, o = (xg_t + h @ w_hh.t()).chunk(4, dim=1)
    c_new = torch.sigmoid(f + w_cf * c) * c + torch.sigmoid(i + w_ci * c) * torch.tanh(g)
    h_new = torch.sigmoid(o + w_co * c_new) * torch.tanh(c_new)
    return h_new, c_new


def cell_weight_grad(d_pre, c_prev, c_new):
    """d_w_cell (3, H) from d_pre (N, 4H), the gates' pre-activation gradients of every packed
    row, and the cell state each row had before (c_prev) and after (c_new) its step, both (N, H):
    sums over rows (torch reductions, a fixed order); any backend's BPTT calls it after its loop."""
    hidden = c_prev.shape[1]
    return torch.stack([(d_pre[:, :hidden] * c_prev).sum(0),
                        (d_pre[:, hidden:2 * hidden] * c_prev).sum(0),
                        (d_pre[:, 3 * hidden:] * c_new).sum(0)])


# ------------------------------------------------------------------------------ numba step math
# As in lstm.py (fastrnn/kernels/numba_cpu/loops.py documents every argument), with w_cell (3, H);
# a cell's step may call another cell's (the loops compile every cell's steps in).

def numba_forward(a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    """a[r, :4H] (a: (., 4H)) holds the row's h W_hh^T and leaves with the activated gates
    i, f, g, o; xg (N, 4H) row q, bias (4H,); w_cell (3, H): w_ci, w_cf, w_co; c (B, H) row b: c,
    updated to c'; h' = o tanh(c') into out[o] (out: (., H)). b_hn, h: unused."""
    hidden = c.shape[1]
    for u in range(hidden):  # i
        a[r, u] = scalar.sigmoid(a[r, u] + (xg[q, u] + bias[u]) + w_cell[0, u] * c[b, u])
    for u in range(hidden):  # f
        j = hidden + u
        a[r, j] = scalar.sigmoid(a[r, j] + (xg[q, j] + bias[j]) + w_cell[1, u] * c[b, u])
    for u in range(hidden):  # g
        j = 2 * hidden + u
        a[r, j] = scalar.tanh(a[r, j] + (xg[q, j] + bias[j]))
    for u in range(hidden):
        c[b, u] = a[r, hidden + u] * c[b, u] + a[r, u] * a[r, 2 * hidden + u]
    for u in range(hidden):  # o, from c'
        j = 3 * hidden + u
        a[r, j] = scalar.sigmoid(a[r, j] + (xg[q, j] + bias[j]) + w_cell[2, u] * c[b, u])
    for u in range(hidden):
        out[o, u] = a[r, 3 * hidden + u] * scalar.tanh(c[b, u])


def numba_backward(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                   w_cell, d_xg, d_hn, dg):
    """lstm.py's row step (same arguments, read there) with the peepholes' two extra paths: o's
    pre-activation gradient d_o reaches c' through w_co (added to dc before), and those of i and f
    reach c through w_ci and w_cf (added to dc after); w_cell (3, H)."""
    hidden = dc.shape[1]
    one = scalar.one(dc)
    for u in range(hidden):
        o = gates[q, 3 * hidden + u]
        dc[b, u] += dm[b, u] * scalar.tanh(c_all[q, u]) * o * (one - o) * w_cell[2, u]
    lstm.numba_backward(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                        w_cell, d_xg, d_hn, dg)
    for u in range(hidden):
        dc[b, u] += d_xg[q, u] * w_cell[0, u] + d_xg[q, hidden + u] * w_cell[1, u]


SPEC = CellSpec(name="peephole_lstm", gates=4, states=("h", "c"), torch_mode="", code=4,
                step=reference_step, cell_weights=("weight_ci", "weight_cf", "weight_co"),
                saved=("gates", "c"), cell_weight_grad=cell_weight_grad)


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def saved_cell_states(stash, hidden):
    """c and c' (each (N, H)) of every packed row from the Triton stash (N, 5H): i, f, g, o, c
    (torch, for SPEC.cell_weight_grad after the loop)."""
    i, f, g, _, c = stash.split(hidden, dim=1)
    return c, f * c + i * g


def triton_step_math():
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`): the
    LSTM's with the peepholes w_ci, w_cf, w_co ((1, BLOCK_H) tiles after the gates in ``p`` and
    after the stash in ``backward``). Stash as the LSTM's: i, f, g, o (activated) and the c
    entering the step. Tiles are float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import (CellMath, cell_jit, load_f32, sigmoid,
                                                      tanh)

    @cell_jit
    def load_cell_weights(ptrs, mask, H):
        return (load_f32(ptrs, mask)[None, :], load_f32(ptrs + H, mask)[None, :],
                load_f32(ptrs + 2 * H, mask)[None, :])

    @cell_jit
    def forward(p, h, c):
        x_i, x_f, x_g, x_o, w_ci, w_cf, w_co = p
        i = sigmoid(x_i + w_ci * c)
        f = sigmoid(x_f + w_cf * c)
        g = tanh(x_g)
        c_new = f * c + i * g
        o = sigmoid(x_o + w_co * c_new)
        return o * tanh(c_new), c_new, (i, f, g, o, c)

    @cell_jit
    def backward(dh, dc, stash, h_prev):
        i, f, g, o, c, w_ci, w_cf, w_co = stash
        tc = tanh(f * c + i * g)  # tanh(c')
        d_o = dh * tc * o * (1.0 - o)
        dct = dc + dh * o * (1.0 - tc * tc) + d_o * w_co  # w.r.t. c', o's peephole included
        d_i = dct * g * i * (1.0 - i)
        d_f = dct * c * f * (1.0 - f)
        d_g = dct * i * (1.0 - g * g)
        d_gates = (d_i, d_f, d_g, d_o)
        return d_gates, d_gates, tl.zeros_like(dh), dct * f + d_i * w_ci + d_f * w_cf

    return CellMath(SPEC, forward=forward, backward=backward, load_cell_weights=load_cell_weights,
                    saved_cell_states=saved_cell_states)
