"""Elman RNN with tanh: ``h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (G = 1)."""
from __future__ import annotations

import torch

from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, H), h (b, H) -> (h' (b, H), None)."""
    return torch.tanh(xg_t + h @ w_hh.t()), None


SPEC = CellSpec(name="rnn_tanh", gates=1, states=("h",), torch_mode="RNN_TANH", code=0,
                step=reference_step)
