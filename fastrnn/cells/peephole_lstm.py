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

from fastrnn.cells import scalar
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
# As in lstm.py (fastrnn/kernels/numba_cpu/loops.py documents every argument), with w_cell (3, H).

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
    """gates (N, 4H) row q: i, f, g, o; c_all (N, H) row q: c'; c_prev[cr] (., H): c; w_cell
    (3, H); dm (B, H) row b: the gradient w.r.t. h'; dc (B, H) row b: on entry the carried
    gradient w.r.t. c', on exit w.r.t. c (through f and the peepholes into i and f); d_xg (N, 4H)
    row q: the gates' pre-activation gradient; tc[tr] (B, H): scratch for tanh(c'). y, h_prev,
    hr, dh, proj, d_hn, dg: unused."""
    hidden = dc.shape[1]
    one = scalar.one(dc)
    for u in range(hidden):
        tc[tr, u] = scalar.tanh(c_all[q, u])
    for u in range(hidden):  # d o
        o = gates[q, 3 * hidden + u]
        d_xg[q, 3 * hidden + u] = dm[b, u] * tc[tr, u] * o * (one - o)
    for u in range(hidden):  # w.r.t. c': carried, through tanh(c') and through o's peephole
        o, tcu = gates[q, 3 * hidden + u], tc[tr, u]
        dc[b, u] += dm[b, u] * o * (one - tcu * tcu) + d_xg[q, 3 * hidden + u] * w_cell[2, u]
    for u in range(hidden):  # d i
        i = gates[q, u]
        d_xg[q, u] = dc[b, u] * gates[q, 2 * hidden + u] * i * (one - i)
    for u in range(hidden):  # d f
        f = gates[q, hidden + u]
        d_xg[q, hidden + u] = dc[b, u] * c_prev[cr, u] * f * (one - f)
    for u in range(hidden):  # d g
        g = gates[q, 2 * hidden + u]
        d_xg[q, 2 * hidden + u] = dc[b, u] * gates[q, u] * (one - g * g)
    for u in range(hidden):  # w.r.t. c
        dc[b, u] = (dc[b, u] * gates[q, hidden + u] + d_xg[q, u] * w_cell[0, u]
                    + d_xg[q, hidden + u] * w_cell[1, u])


SPEC = CellSpec(name="peephole_lstm", gates=4, states=("h", "c"), torch_mode="", code=4,
                step=reference_step, cell_weights=("weight_ci", "weight_cf", "weight_co"),
                saved=("gates", "c"), cell_weight_grad=cell_weight_grad)
