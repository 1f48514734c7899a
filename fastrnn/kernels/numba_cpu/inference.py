"""The numba backend's lean inference path (:mod:`fastrnn.inference`): a whole stack of layers over
a dense input, no autograd, on weights prepared once (:func:`prepare_layer`) and a thread and step
plan made once per shape. Each layer and direction runs the same compiled loop, on the same
buffers and with the same input projection as :func:`.launch.recurrence_forward`: bitwise the
same results."""
from __future__ import annotations

import numpy as np
import torch

from fastrnn import cells
from fastrnn.kernels.numba_cpu import buffers, launch, matmul


def prepare_layer(cell, w_ih, w_hh, b_hn, w_hr, bias, w_cell):
    """One layer and direction, prepared: ``(w_ih^T, buffers.Prepared)`` (tensors as given to
    :func:`.launch.recurrence_forward`; w_ih^T (I, G*H) a view, for torch's GEMM)."""
    return w_ih.t(), buffers.prepare(cell, w_hh, b_hn, w_hr, bias, w_cell)


_PLANS = {}


def _dense_plan(steps, batch, reverse, row_work, itemsize):
    """The :class:`.launch._Plan` of ``steps`` steps of ``batch`` rows, by :func:`.launch._schedule`,
    made once per shape and thread setting (its thresholds included: tests move them)."""
    key = (steps, batch, reverse, row_work, itemsize, torch.get_num_threads(),
           matmul.USE_BLAS, launch.PARALLEL_MIN_BATCH, launch.PARALLEL_MIN_WORK,
           launch.BLAS_PARALLEL_MIN_WEIGHT_BYTES, launch.BLAS_PARALLEL_MIN_STEP_WORK)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[key] = launch._schedule(np.full(steps, batch, np.int64), reverse, batch,
                                              row_work, itemsize)
    return plan


def forward_stack(cell, layers, x, steps, batch, h0, c0, num_layers, directions):
    """The stack's forward. layers: :func:`prepare_layer` per layer and direction (L*D); x (T, B,
    I) or (T*B, I) tensor; h0 (L*D, B, P), c0 (L*D, B, H) numpy (None: zeros; c0 None also for
    cells without a cell state). Returns tensors ``(y (T, B, D*P), h_n (L*D, B, P), c_n (L*D, B,
    H) or None)``."""
    spec = cells.spec(cell)
    itemsize = x.element_size()
    # (T*B, I): torch's GEMM of the full path (a 3-D input folds into this same matmul)
    layer_input, h_n, c_n = x.reshape(steps * batch, x.shape[-1]), [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih_t, prepared = layers[k]
            proj, width = prepared.w_t.shape
            plan = _dense_plan(steps, batch, direction == 1, width * proj, itemsize)
            xg = torch.mm(layer_input, w_ih_t).numpy()
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
