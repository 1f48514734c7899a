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

from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, 4H), h (b, H), c (b, H), w_cell (3, H)
    -> (h' (b, H), c' (b, H))."""
    w_ci, w_cf, w_co = w_cell
    i, f, g, o = (xg_t + h @ w_hh.t()).chunk(4, dim=1)
    c_new = torch.sigmoid(f + w_cf * c) * c + torch.sigmoid(i + w_ci * c) * torch.tanh(g)
    h_new = torch.sigmoid(o + w_co * c_new) * torch.tanh(c_new)
    return h_new, c_new


SPEC = CellSpec(name="peephole_lstm", gates=4, states=("h", "c"), torch_mode="", code=4,
                step=reference_step, cell_weights=("weight_ci", "weight_cf", "weight_co"))
