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
    ``has_b_hn``: the cell keeps the n-gate part of ``b_hh`` inside its step (GRU: inside
    ``r ⊙ (…)``, so the gradient w.r.t. that block of ``h W_hh^T`` is its own, ``d_hn``);
    ``projection``: supports ``proj_size`` (``w_hr``); ``cell_weights``: the names (torch style,
    without the ``_l{k}`` suffix) of the cell's own per-unit weights, each (H,), which the time
    loops receive stacked as ``w_cell`` (K, H) (the peephole LSTM's w_ci, w_cf, w_co);
    ``cell_weight_grad``: with ``cell_weights``, ``cell_weight_grad(d_pre, c_prev, c_new)``, the
    gradient d_w_cell (K, H) from the gates' pre-activation gradients d_pre (N, G*H) and the cell
    state before and after each packed row's step (N, H): torch ops every backend's BPTT calls
    after its loop.

    For the compiled step math (the "numba step math" section of a cell file): ``saved``: what
    the compiled forward keeps per packed row for backward, in this order: "gates" (the step's
    gate row as the step leaves it, ``row_blocks`` blocks of H) and "c" (the cell state after the
    step); () keeps nothing (the RNNs: backward reads y); ``gates_in_y``: the step's gate row is
    its output row (the RNNs: the step's matmul runs into y, activated there in place);
    ``extra_blocks``: H-wide blocks the step keeps in its gate row beyond the G gates (GRU: hn
    and n after r, z); ``direct_h``: h' depends on h also outside ``h W_hh^T`` (GRU: z ⊙ h), so
    backward's row step leaves that part of the gradient w.r.t. h in ``dh`` and the step's matmul
    adds onto it (else the matmul overwrites it).
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
    cell_weight_grad: Callable = None
    saved: tuple = ()
    gates_in_y: bool = False
    extra_blocks: int = 0
    direct_h: bool = False

    @property
    def has_c(self):
        """Whether the cell carries a cell state ``c`` beside ``h``."""
        return "c" in self.states

    @property
    def row_blocks(self):
        """H-wide blocks of the compiled step's gate row: the G gates plus ``extra_blocks``."""
        return self.gates + self.extra_blocks
