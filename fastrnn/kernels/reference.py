"""The reference backend: every recurrence as a plain, readable per-step PyTorch loop over the
cells' own reference steps (:mod:`fastrnn.cells`).

It is the oracle of the test suite and the fallback for what no kernel and no ``native`` path
covers (e.g. double backward). Autograd runs through it; nothing here is hand-differentiated.

Here ``xg = x W_ih^T`` is the input projection of all steps, made by one GEMM before the loop;
``bias = b_ih + b_hh`` is added to it in the loop (for GRU the ``b_hh`` of the n gate is left out of
``bias`` and passed as ``b_hn``).

This module also defines the **kernel contract** every compute backend (``fastrnn.kernels.*``)
implements: :func:`make_plan`, :func:`recurrence_forward` and :func:`recurrence_backward` (see
their docstrings).
"""
from __future__ import annotations

import torch

from fastrnn import cells


def cell_step(cell, xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step of ``cell`` for the rows in ``xg_t``: the cell's own reference step.

    xg_t: (b, G*H) input projection of this step; h: (b, P); c: (b, H) or None (cells with a
    cell state); w_hh: (G*H, P); b_hn: (H,) or None (GRU); w_hr: (P, H) or None (LSTM with
    proj_size); w_cell: (K, H) or None, the cell's own per-unit weights (peephole LSTM).
    Returns (h', c') with c' None for cells without a cell state.
    """
    return cells.spec(cell).step(xg_t, h, c, w_hh, b_hn, w_hr, w_cell)


def step_offsets(batch_sizes):
    """Row offset of each step in the packed layout: ``offsets[t] = sum(batch_sizes[:t])``."""
    offsets = [0]
    for b in batch_sizes[:-1]:
        offsets.append(offsets[-1] + b)
    return offsets


def _sequence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None, w_cell=None):
    if bias is not None:
        xg = xg + bias
    sizes = [int(b) for b in batch_sizes]
    offsets = step_offsets(sizes)
    h, c = h0, c0
    ys = [None] * len(sizes)
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        b, start = sizes[t], offsets[t]
        h_t, c_t = cell_step(cell, xg[start:start + b], h[:b], None if c is None else c[:b],
                             w_hh, b_hn, w_hr, w_cell)
        ys[t] = h_t
        # Rows at and beyond b are not active at this step: they keep their state (their last
        # state going forward; h0 going in reverse, where they have not started yet).
        h = torch.cat([h_t, h[b:]]) if b < h.shape[0] else h_t
        if c is not None:
            c = torch.cat([c_t, c[b:]]) if b < c.shape[0] else c_t
    y = torch.cat(ys) if ys else xg.new_empty(0, h0.shape[1])
    return y, h, c


def make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None, w_cell=None):
    """What a backend works out once per call from the forward's arguments (kernel contract):
    its argument checks and its schedule of the steps (backend-defined; the reference loop has
    none: None). :class:`fastrnn.Recurrence` makes it once and hands it to the forward and to the
    backward as ``plan=``; either makes its own when given none."""
    return None


def recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=True,
                       bias=None, w_cell=None, plan=None):
    """Run one layer in one direction over a whole (possibly packed) sequence.

    The kernel contract, shared by every backend:

    * ``xg``: (N, G*H) input projections in the packed layout: step t owns rows
      ``offsets[t] : offsets[t] + batch_sizes[t]`` (a dense (T, B) input is the case
      ``batch_sizes = [B] * T``, N = T*B). G = 1 (RNN), 4 (LSTM), 3 (GRU).
    * ``h0``: (B, P) with B = batch_sizes[0] and P = proj_size or H; ``c0``: (B, H) for LSTM, else None.
    * ``w_hh``: (G*H, P); ``b_hn``: (H,) for GRU with bias, else None; ``w_hr``: (P, H) or None.
    * ``batch_sizes``: CPU int64 (T,), non-increasing: rows ``b < batch_sizes[t]`` are active at t.
    * ``reverse``: run t = T-1 … 0; each sequence is then reversed within its own length.
    * ``save``: False when no backward will follow (inference); a backend may then skip saving
      and return ``saved = ()``.
    * ``bias``: (G*H,) or None, added to every row of ``xg`` (the input projection's bias, kept
      out of the projection GEMM: a bias there costs a pass over the (N, G*H) result).
    * ``w_cell``: (K, H) or None, the cell's own per-unit weights (``CellSpec.cell_weights``:
      the peephole LSTM's w_ci, w_cf, w_co); None for the torch.nn cells.
    * ``plan``: the call's :func:`make_plan`, or None.

    Returns ``(y, h_n, c_n, saved)``: y (N, P) outputs in the same packed layout, h_n (B, P) and
    c_n (B, H) or None the state of each row after its last active step, and ``saved`` a tuple of
    tensors the backend's :func:`recurrence_backward` needs (backend-defined).
    All tensors share xg's dtype and device.
    """
    with torch.no_grad():
        y, h_n, c_n = _sequence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                                w_cell)
    return y, h_n, c_n, (xg,)


def recurrence_backward(cell, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, b_hn, w_hr,
                        batch_sizes, reverse, y, saved, bias=None, w_cell=None, plan=None):
    """BPTT for :func:`recurrence_forward` (kernel contract).

    ``grad_y``: (N, P), ``grad_h_n``: (B, P), ``grad_c_n``: (B, H) or None; the other arguments
    are those given to and returned by the forward. Returns the gradients
    ``(d_xg, d_h0, d_c0, d_w_hh, d_b_hn, d_w_hr, d_bias, d_w_cell)``, None where the input was
    None.

    The reference computes them by re-running the loop under autograd; the kernels hand-write
    BPTT, reduce weight gradients once after the time loop, and never use atomics.
    """
    (xg,) = saved
    inputs = [xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell]
    present = [i for i, t in enumerate(inputs) if t is not None]

    def run(*tensors):
        args = list(inputs)
        for i, t in zip(present, tensors):
            args[i] = t
        y, h_n, c_n = _sequence(cell, *args[:6], batch_sizes, reverse, *args[6:])
        return (y, h_n) if c_n is None else (y, h_n, c_n)

    outs, vjp = torch.func.vjp(run, *[inputs[i] for i in present])
    cotangents = (grad_y, grad_h_n) if len(outs) == 2 else (grad_y, grad_h_n, grad_c_n)
    grads = iter(vjp(cotangents))
    return tuple(next(grads) if t is not None else None for t in inputs)


def recurrence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None, w_cell=None):
    """The differentiable reference recurrence: same arguments as :func:`recurrence_forward`,
    returns ``(y, h_n, c_n)`` with autograd (double backward included) through the loop."""
    return _sequence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias, w_cell)
