"""What a cell declares about itself (:class:`CellSpec`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class CellSpec:
    """A recurrent cell as the time loops see it.

    ``name``: the cell's name ("lstm"); ``gates``: G, rows of ``W_hh`` (and columns of the input
    projection ``xg``) per hidden unit; ``states``: the recurrent state tensors, ("h",) or
    ("h", "c"); ``torch_mode``: the ``nn.RNNBase.mode`` it replaces ("" if torch.nn has none);
    ``code``: a small integer the compiled backends use to pick the cell's step math at compile
    time; ``step``: the reference step, ``step(xg_t, h, c, w_hh, b_hn, w_hr, w_cell) -> (h', c')``
    on torch tensors (xg_t (b, G*H), h (b, P), c (b, H) or None; c' None for cells without c);
    ``has_b_hn``: the cell keeps the n-gate part of ``b_hh`` inside its step (GRU);
    ``projection``: supports ``proj_size`` (``w_hr``); ``cell_weights``: the names (torch style,
    without the ``_l{k}`` suffix) of the cell's own per-unit weights, each (H,), which the time
    loops receive stacked as ``w_cell`` (K, H) (the peephole LSTM's w_ci, w_cf, w_co).
    """

    name: str
    gates: int
    states: tuple
    torch_mode: str
    code: int
    step: Callable
    has_b_hn: bool = False
    projection: bool = False
    cell_weights: tuple = ()

    @property
    def has_c(self):
        """Whether the cell carries a cell state ``c`` beside ``h``."""
        return "c" in self.states
