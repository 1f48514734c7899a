"""The numba backend's lean inference path (:mod:`fastrnn.inference`): a whole stack of layers over
a dense input, no autograd, on weights prepared once (:func:`prepare_layer`) and a thread and step
plan made once per shape. Each layer and direction runs the same compiled loop, on the same
buffers and with the same input projection as :func:`.launch.recurrence_forward`: bitwise the
same results."""
from __future__ import annotations

import numpy as np
import torch

from fastrnn import cells
from fastrnn.kernels.numba_cpu import buffers, launch


def prepare_layer(cell, w_ih, w_hh, b_hn, w_hr, bias, w_cell):
    """One layer and direction, prepared: ``(w_ih^T, buffers.Prepared)`` (tensors as given to
    :func:`.launch.recurrence_forward`; w_ih^T (I, G*H) a view, for torch's GEMM)."""
    return w_ih.t(), buffers.prepare(cell, w_hh, b_hn, w_hr, bias, w_cell)


_SIZES = {}


def _dense_plan(steps, batch, reverse, row_work, itemsize):
    """The :class:`.launch._Plan` of ``steps`` steps of ``batch`` rows (the sizes array made once
    per shape; the plan by :func:`.launch._schedule`, which caches the checked steps)."""
    sizes = _SIZES.get((steps, batch))
    if sizes is None:
        if len(_SIZES) >= 256:
            _SIZES.clear()
        sizes = _SIZES[(steps, batch)] = np.full(steps, batch, np.int64)
    return launch._schedule(sizes, reverse, batch, row_work, itemsize)


def forward_stack(cell, layers, x, steps, batch, h0, c0, num_layers, directions):
    """The stack's forward. layers: :func:`prepare_layer` per layer and direction (L*D); x (T, B,
    I) or (T*B, I) tensor; h0 (L*D, B, P), c0 (L*D, B, H) numpy (None: zeros; c0 None also for
    cells without a cell state). Returns tensors ``(y (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B,
    H) or None)``."""
    spec = cells.spec(cell)
    itemsize = x.element_size()
    layer_input, h_n, c_n = x, [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih_t, prepared = layers[k]
            proj, width = prepared.w_t.shape
            plan = _dense_plan(steps, batch, direction == 1, width * proj, itemsize)
            # torch's GEMM of the full path (a 3-D input folds into the same (T*B, I) matmul)
            xg = torch.matmul(layer_input, w_ih_t).numpy().reshape(steps * batch, width)
            y, h, c, _ = launch.run_forward(cell, plan, xg, prepared,
                                            None if h0 is None else h0[k],
                                            None if c0 is None else c0[k], False)
            outputs.append(torch.from_numpy(y))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 1) if directions == 2 else outputs[0]
    return (layer_input.view(steps, batch, layer_input.shape[-1]), _stacked(h_n),
            _stacked(c_n) if spec.has_c else None)


def _stacked(states):
    """(L*D, B, ·) tensor of (B, ·) arrays."""
    return torch.from_numpy(states[0][None] if len(states) == 1 else np.stack(states))
