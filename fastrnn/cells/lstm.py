"""LSTM, gates i, f, g, o (``W_hh`` rows stacked in this order, as torch.nn)::

    i = σ(xg_i + h W_hi^T)      f = σ(xg_f + h W_hf^T)
    g = tanh(xg_g + h W_hg^T)   o = σ(xg_o + h W_ho^T)
    c' = f ⊙ c + i ⊙ g          h' = o ⊙ tanh(c')       (then h' = h' W_hr^T with proj_size)
"""
from __future__ import annotations

import torch

from fastrnn.cells import scalar
from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, 4H), h (b, P), c (b, H), w_hr (P, H) or None
    -> (h' (b, P), c' (b, H))."""
    i, f, g, o = (xg_t + h @ w_hh.t()).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


# ------------------------------------------------------------------------------ numba step math
# One batch row of one step for the numba backend's one forward and one backward time loop
# (fastrnn/kernels/numba_cpu/loops.py documents every argument): Numba-compilable plain Python,
# activations from fastrnn.cells.scalar, rows indexed in the 2-D arrays, each loop writing one
# array (so that they vectorize).

def numba_forward(a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    """a[r, :4H] (a: (., 4H)) holds the row's h W_hh^T and leaves with the activated gates
    i, f, g, o; xg (N, 4H) row q, bias (4H,); c (B, H) row b: c, updated to c'; h' = o tanh(c')
    into out[o] (out: (., H); the projection's input when there is one). b_hn, w_cell, h: unused."""
    hidden = c.shape[1]
    for j in range(2 * hidden):  # i, f
        a[r, j] = scalar.sigmoid(a[r, j] + (xg[q, j] + bias[j]))
    for u in range(hidden):  # g (a loop from a nonzero start stayed scalar: 8x slower)
        j = 2 * hidden + u
        a[r, j] = scalar.tanh(a[r, j] + (xg[q, j] + bias[j]))
    for u in range(hidden):  # o
        j = 3 * hidden + u
        a[r, j] = scalar.sigmoid(a[r, j] + (xg[q, j] + bias[j]))
    for u in range(hidden):
        c[b, u] = a[r, hidden + u] * c[b, u] + a[r, u] * a[r, 2 * hidden + u]
    for u in range(hidden):
        out[o, u] = a[r, 3 * hidden + u] * scalar.tanh(c[b, u])


def numba_backward(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                   w_cell, d_xg, d_hn, dg):
    """gates (N, 4H) row q: i, f, g, o; c_all (N, H) row q: c'; c_prev[cr] (., H): c; dm (B, H)
    row b: the gradient w.r.t. h' (before any projection); dc (B, H) row b: on entry the carried
    gradient w.r.t. c', on exit w.r.t. c; d_xg (N, 4H) row q: the gates' pre-activation gradient.
    tc[tr] (., H): scratch for tanh(c'); with ``proj`` it is a row of m_all and leaves holding
    m = o tanh(c') (the projection's input, for d_w_hr). w_cell, y, h_prev, hr, dh, d_hn, dg:
    unused."""
    hidden = dc.shape[1]
    one = scalar.one(dc)
    for u in range(hidden):
        tc[tr, u] = scalar.tanh(c_all[q, u])
    for u in range(hidden):
        o, tcu = gates[q, 3 * hidden + u], tc[tr, u]
        dc[b, u] += dm[b, u] * o * (one - tcu * tcu)
    for u in range(hidden):  # d o
        o = gates[q, 3 * hidden + u]
        d_xg[q, 3 * hidden + u] = dm[b, u] * tc[tr, u] * o * (one - o)
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
    if proj:
        for u in range(hidden):
            tc[tr, u] *= gates[q, 3 * hidden + u]


SPEC = CellSpec(name="lstm", gates=4, states=("h", "c"), torch_mode="LSTM", code=2,
                step=reference_step, projection=True, saved=("gates", "c"))


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def triton_step_math():
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`), without
    ``proj_size``. Stash: i, f, g, o (activated) and the c entering the step. Tiles are float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import CellMath, cell_jit, sigmoid, tanh

    @cell_jit
    def forward(p, h, c):
        i = sigmoid(p[0])
        f = sigmoid(p[1])
        g = tanh(p[2])
        o = sigmoid(p[3])
        c_new = f * c + i * g
        return o * tanh(c_new), c_new, (i, f, g, o, c)

    @cell_jit
    def backward(dh, dc, stash, h_prev):
        i, f, g, o, c = stash
        tc = tanh(f * c + i * g)  # tanh(c')
        dct = dc + dh * o * (1.0 - tc * tc)
        d_i = dct * g * i * (1.0 - i)
        d_f = dct * c * f * (1.0 - f)
        d_g = dct * i * (1.0 - g * g)
        d_o = dh * tc * o * (1.0 - o)
        d_gates = (d_i, d_f, d_g, d_o)
        return d_gates, d_gates, tl.zeros_like(dh), dct * f

    return CellMath(SPEC, forward=forward, backward=backward)
