"""The numba backend's lean training path (:mod:`fastrnn.training`): the forward of a whole stack of
layers over a dense input with what BPTT needs saved, and the backward of the whole stack, on the
lean inference path's prepared weights (:func:`.inference.prepare_stack`) with the step plans
made once per shape. Per layer and direction the same calls, in the same order, as the full path
(:class:`fastrnn.autograd.Recurrence` behind torch's autograd): the projection ``x @ W_ih^T`` by
torch.mm, :func:`.launch.run_forward` saving, :func:`.launch.recurrence_backward` on the same plan,
and the projection's gradients as torch's mm backward makes them: bitwise the full path's results,
without an autograd node, a check or a plan per layer."""
from __future__ import annotations

import numpy as np
import torch

from fastrnn import cells, functional
from fastrnn.kernels.numba_cpu import inference, launch, matmul


_PLANS = {}


def _plans(stack, steps, batch, directions, itemsize):
    """Per direction the :class:`.launch._Plan` of a training call of a shape, made once per shape
    and thread setting (for every stack: a plan does not depend on the weights' values)."""
    width, proj = stack.live[0].w_t.shape
    key = (width, proj, steps, batch, directions, itemsize, *inference._settings())
    plans = _PLANS.get(key)
    if plans is None:
        sizes = np.full(steps, batch, np.int64)
        plans = tuple(launch._schedule(sizes, reverse, batch, width, proj, itemsize)
                      for reverse in (False, True)[:directions])
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[key] = plans
    return plans


def forward(stack, weights, x, steps, batch, h0, c0, num_layers, directions):
    """The forward of ``stack`` (:func:`.inference.prepare_stack`) with BPTT's tensors saved.
    weights: per layer and direction its :class:`fastrnn.functional.LayerWeights` (the stack's,
    as tensors); x (T*B, I) contiguous
    tensor; h0 (L*D, B, P), c0 (L*D, B, H) numpy, or None: zeros (c0 None also for cells without
    a cell state). Returns ``(y (T*B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None, plans,
    tape)``, ``plans`` the steps' plans per direction and ``tape`` the tensors :func:`backward`
    reads: per layer and direction its input (T*B, I), its output y (T*B, P) and the tensors its
    cell saves (``SPEC.saved``), in one list."""
    plans = _plans(stack, steps, batch, directions, x.element_size())
    if plans[0].panels and stack.panels is None:
        stack.panels = [matmul.panels(prepared.w_t) for prepared in stack.layers()]
    h_n, c_n, tape, layer_input = [], [], [], x
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            plan = plans[direction]
            prepared = stack.live[k] if plan.live else stack.layers()[k]
            stack.sum_bias(k, prepared)
            if plan.panels:
                prepared = prepared._replace(w_p=stack.panels[k])
            xg = torch.mm(layer_input, weights[k].w_ih.t())
            y, h, c, saved = launch.run_forward(
                stack.cell, plan, xg.numpy(), prepared, None if h0 is None else h0[k],
                None if c0 is None else c0[k], True)
            y = torch.from_numpy(y)
            tape += [layer_input, y, *map(torch.from_numpy, saved)]
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 1) if directions == 2 else outputs[0]
    return (layer_input, torch.from_numpy(np.array(h_n)),  # np.array: 4x np.stack's speed
            torch.from_numpy(np.array(c_n)) if c_n[0].size else None, plans, tape)


def backward(stack, weights, plans, tape, grad_y, grad_h_n, grad_c_n, h0, c0, num_layers,
             directions, need_x):
    """The backward of :func:`forward`. weights: per layer and direction its
    :class:`fastrnn.functional.LayerWeights`; plans, tape: :func:`forward`'s; grad_y (T*B, D*P),
    grad_h_n (L*D, B, P), grad_c_n (L*D, B, H) or None; h0 (L*D, B, P), c0 (L*D, B, H) tensors
    (zeros where forward had None; c0 None for cells without a cell state). Returns ``(d_x (T*B,
    I) or None unless need_x, d_h0, d_c0 or None, grads)``, ``grads`` per layer and direction
    ``(d_w_ih, d_w_hh, d_bias, d_b_hn, d_w_hr, d_w_cell)`` (None where absent; d_bias the gradient
    of b_ih + b_hh as the kernels add it, d_b_hn of GRU's b_hh n-gate part)."""
    proj, per_k = h0.shape[2], len(tape) // len(weights)
    d_h0, d_c0 = [None] * len(weights), [None] * len(weights)
    grads = [None] * len(weights)
    d_out = grad_y
    for layer in reversed(range(num_layers)):
        d_input = None
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k]
            x, y, *saved = tape[k * per_k:(k + 1) * per_k]
            d_y = d_out if directions == 1 else d_out[:, direction * proj:(direction + 1) * proj]
            # b_ih, b_hh stand for the bias and b_hn: the BPTT reads only whether they are there
            d_xg, d_h0[k], d_c0[k], d_w_hh, d_b_hn, d_w_hr, d_bias, d_w_cell = \
                launch.recurrence_backward(
                    stack.cell, d_y.contiguous(), grad_h_n[k].contiguous(),
                    None if grad_c_n is None else grad_c_n[k].contiguous(), h0[k],
                    None if c0 is None else c0[k], w.w_hh,
                    w.b_hh if cells.spec(stack.cell).has_b_hn else None, w.w_hr, None,
                    direction == 1, y, saved, bias=w.b_ih, w_cell=w.w_cell,
                    plan=plans[direction])
            # torch's mm backward of x @ w_ih.t(): grad.t().mm(x) and grad.mm(w_ih)
            grads[k] = (d_xg.t().mm(x), d_w_hh, d_bias, d_b_hn, d_w_hr, d_w_cell)
            if layer or need_x:
                d_in = d_xg.mm(w.w_ih)
                d_input = d_in if d_input is None else d_input + d_in
        d_out = d_input
    return (d_out, functional.stacked(d_h0), functional.stacked(d_c0) if c0 is not None else None,
            grads)
