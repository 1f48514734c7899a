"""LSTM, gates i, f, g, o (``W_hh`` rows stacked in this order, as torch.nn)::

    i = σ(xg_i + h W_hi^T)      f = σ(xg_f + h W_hf^T)
    g = tanh(xg_g + h W_hg^T)   o = σ(xg_o + h W_ho^T)
    c' = f ⊙ c + i ⊙ g          h' = o ⊙ tanh(c')       (then h' = h' W_hr^T with proj_size)
"""
from __future__ import annotations

import torch

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


SPEC = CellSpec(name="lstm", gates=4, states=("h", "c"), torch_mode="LSTM", code=2,
                step=reference_step, projection=True)


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def triton_step_math():
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`), without
    ``proj_size``. Stash: i, f, g, o (activated) and the c entering the step. Tiles are float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import CellMath, cell_jit, tanh

    @cell_jit
    def forward(p, h, c):
        i = tl.sigmoid(p[0])
        f = tl.sigmoid(p[1])
        g = tanh(p[2])
        o = tl.sigmoid(p[3])
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
