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
