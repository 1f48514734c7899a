"""Argument checks of the numba launchers (:mod:`.launch`): the loops index without bounds
checks, so shapes and dtypes are checked before a call."""
from __future__ import annotations

import torch

from fastrnn import cells
from fastrnn.kernels.numba_cpu.loops import CODES


def _check(cell, xg, h0, c0, w_hh, b_hn, w_hr, n_rows, bias=None, w_cell=None):
    """Shapes and dtypes of the forward arguments (the loops index without bounds checks);
    ``n_rows`` = sum(batch_sizes)."""
    if cell not in CODES:
        raise ValueError(f"unknown cell {cell!r}; expected one of {tuple(CODES)}")
    spec = cells.spec(cell)
    dtype = xg.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        raise TypeError(f"numba kernels support float32 and float64, got {dtype}")
    for name, t in (("xg", xg), ("h0", h0), ("c0", c0), ("w_hh", w_hh), ("b_hn", b_hn),
                    ("w_hr", w_hr), ("bias", bias), ("w_cell", w_cell)):
        if t is not None and t.dtype is not dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} like xg")
        if t is not None and not t.is_cpu:
            raise ValueError(f"numba kernels run on CPU tensors, {name} is on {t.device}")
    if spec.has_c != (c0 is not None):
        raise ValueError(f"c0 is required for {cell} and must be None otherwise" if spec.has_c
                         else f"c0 must be None for {cell}")
    if spec.cell_weights and w_cell is None:
        raise ValueError(f"w_cell ({spec.cell_weights}) is required for {cell}")
    if w_cell is not None and not spec.cell_weights:
        raise ValueError(f"w_cell must be None for {cell}")
    if w_hr is not None and not spec.projection:
        raise ValueError(f"w_hr (projection) is not supported for {cell}")
    gates = spec.gates
    if w_hh.dim() != 2 or w_hh.shape[0] % gates:
        raise ValueError(f"w_hh must be ({gates}*H, P), got {tuple(w_hh.shape)}")
    hidden, proj = w_hh.shape[0] // gates, w_hh.shape[1]
    if w_hr is None and proj != hidden:
        raise ValueError(f"w_hh is {tuple(w_hh.shape)}: P != H needs w_hr")
    batch = h0.shape[0]
    for name, t, shape in (("xg", xg, (n_rows, gates * hidden)), ("h0", h0, (batch, proj)),
                           ("c0", c0, (batch, hidden)), ("b_hn", b_hn, (hidden,)),
                           ("w_hr", w_hr, (proj, hidden)), ("bias", bias, (gates * hidden,)),
                           ("w_cell", w_cell, (len(spec.cell_weights), hidden))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_backward(spec, grad_y, grad_h_n, grad_c_n, y, saved, hidden):
    """Shapes and dtypes of what backward receives beyond the forward's arguments."""
    n_rows, proj = y.shape
    batch = grad_h_n.shape[0]
    if len(saved) != len(spec.saved):
        raise ValueError(f"saved must hold {spec.saved} of {spec.name}, got {len(saved)} tensors")
    widths = {"gates": spec.row_blocks * hidden, "c": hidden}
    expected = {"y": (y, (n_rows, proj)), "grad_y": (grad_y, (n_rows, proj)),
                "grad_h_n": (grad_h_n, (batch, proj)), "grad_c_n": (grad_c_n, (batch, hidden))}
    expected.update({f"saved[{i}]": (t, (n_rows, widths[name]))
                     for i, (name, t) in enumerate(zip(spec.saved, saved))})
    for name, (t, shape) in expected.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype != grad_y.dtype):
            raise ValueError(f"{name} must be {shape} {grad_y.dtype}, got {tuple(t.shape)} {t.dtype}")
