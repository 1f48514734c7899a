"""GRU, gates r, z, n (``W_hh`` rows stacked in this order, as torch.nn; ``b_hn``, the n-gate part
of ``b_hh``, stays inside ``r ⊙ (…)``)::

    r = σ(xg_r + h W_hr^T)      z = σ(xg_z + h W_hz^T)
    n = tanh(xg_n + r ⊙ (h W_hn^T + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h
"""
from __future__ import annotations

import torch

from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, 3H) (without the n gate's b_hh), h (b, H),
    b_hn (H,) or None -> (h' (b, H), None)."""
    x_r, x_z, x_n = xg_t.chunk(3, dim=1)
    h_r, h_z, h_n = (h @ w_hh.t()).chunk(3, dim=1)
    if b_hn is not None:
        h_n = h_n + b_hn
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None


SPEC = CellSpec(name="gru", gates=3, states=("h",), torch_mode="GRU", code=3,
                step=reference_step, has_b_hn=True)
