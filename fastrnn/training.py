"""The modules' lean training path: where a gradient is recorded, a call the lean inference path
would take (:func:`fastrnn.inference.lean_call`: a dense CPU input of the module's dtype, its
backend offering a lean path; numba: :mod:`fastrnn.kernels.numba_cpu.training`) runs the whole
layer stack as one autograd Function, :class:`_Stack`, on the weights prepared once per weight
version: one autograd node per call instead of four or more per layer and direction, no argument
checks or plans per layer, the weight gradients made by the backend. Same kernels, same plans,
same operations as the full path (:func:`fastrnn.functional.stack`): bitwise its outputs and
gradients. A double backward (``create_graph=True``) recomputes the call by the full path and
differentiates that. A call where nothing requires a gradient runs the lean inference path, as the
full path then would.
"""
from __future__ import annotations

import numpy as np
import torch

from fastrnn import backends, functional, inference


_KERNELS = {}


def _kernels(name):
    """The backend's lean training functions (its ``lean_training()``), or None."""
    try:
        return _KERNELS[name]
    except KeyError:
        lean = getattr(backends.KERNELS.get(name), "lean_training", None)
        kernels = _KERNELS[name] = lean() if lean is not None else None
        return kernels


class _Stack(torch.autograd.Function):
    """``apply(module, entry, shape, x_2d, input, h0, c0, *weights)`` → ``(out, h_n[, c_n])`` as
    the module returns them: ``entry``, ``shape`` of :func:`fastrnn.inference.lean_call`, x_2d
    the input as (T*B, I) C-contiguous, ``input`` the module's input, h0/c0 the initial states as
    given (None: zeros), ``weights`` the module's flat weights."""

    @staticmethod
    def forward(ctx, module, entry, shape, x_2d, input, h0, c0, *weights):
        kern = _kernels(entry.name)
        layers, directions = shape.num_layers, shape.directions

        def states(state):  # numpy (L*D, B, ·) of a state as given
            if state is None:
                return None
            state = state.detach().numpy()
            return state if shape.batched else state[:, None]

        y, h_n, c_n, ctx.plans, tape = kern.forward(
            entry.layers, entry.layer_weights, x_2d, shape.steps, shape.batch, states(h0),
            states(c0), layers, directions)
        out, h_n_out, c_n_out = (torch.from_numpy(a) if a is not None else None for a in
                                 inference.shaped(shape, y.numpy(), h_n.numpy(),
                                                  None if c_n is None else c_n.numpy()))
        ctx.module, ctx.entry, ctx.shape, ctx.kern = module, entry, shape, kern
        ctx.n_weights, ctx.has_c = len(weights), c_n is not None
        # The returned output where it is the last layer's y itself: a change to it in place
        # then fails backward, as on the full path.
        ctx.save_for_backward(x_2d, input, h0, c0, *weights, out if directions == 1 else None,
                              *tape)
        return (out, h_n_out) if c_n is None else (out, h_n_out, c_n_out)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n=None):
        x_2d, input, h0, c0, *rest = ctx.saved_tensors
        weights, tape = rest[:ctx.n_weights], rest[ctx.n_weights + 1:]
        if torch.is_grad_enabled():  # create_graph: differentiate the full path's graph
            return (None,) * 4 + _full_path_grads(ctx, input, h0, c0, weights,
                                                  (grad_out, grad_h_n, grad_c_n))
        shape, has_c = ctx.shape, ctx.has_c
        batched, sizes = shape.batched, shape.states

        def state(s, size):  # (L*D, B, ·); zeros for None
            return x_2d.new_zeros(size) if s is None else s if batched else s.unsqueeze(1)

        if not batched:
            sizes = tuple((s[0], 1, s[1]) for s in sizes)
        grad_y = grad_out.transpose(0, 1) if shape.batch_first else grad_out
        per_layer = ctx.entry.layer_weights
        d_x, d_h0, d_c0, grads = ctx.kern.backward(
            ctx.entry.layers, per_layer, ctx.plans, tape, grad_y.reshape(x_2d.shape[0], -1),
            state(grad_h_n, sizes[0]), state(grad_c_n, sizes[1]) if has_c else None,
            state(h0, sizes[0]), state(c0, sizes[1]) if has_c else None,
            shape.num_layers, shape.directions, ctx.needs_input_grad[4])
        d_weights = []
        for w, (d_w_ih, d_w_hh, d_bias, d_b_hn, d_w_hr, d_w_cell) in zip(per_layer, grads):
            d_weights += [d_w_ih, d_w_hh]
            if w.b_ih is not None:
                d_b_hh = d_bias if d_b_hn is None else torch.cat(
                    [d_bias[:d_bias.shape[0] - d_b_hn.shape[0]], d_b_hn])
                d_weights += [d_bias, d_b_hh]
            if w.w_hr is not None:
                d_weights.append(d_w_hr)
            if w.w_cell is not None:
                d_weights += list(d_w_cell.unbind())
        if d_x is not None:
            d_x = d_x.view(shape.steps, shape.batch, -1) if batched else d_x
            d_x = d_x.transpose(0, 1) if shape.batch_first else d_x
        if not batched:
            d_h0, d_c0 = d_h0[:, 0], d_c0[:, 0] if d_c0 is not None else None
        needs = ctx.needs_input_grad
        return (None, None, None, None, d_x, d_h0 if needs[5] else None,
                d_c0 if needs[6] else None, *d_weights)


def _full_path_grads(ctx, input, h0, c0, weights, grad_outputs):
    """The gradients of ``(x_2d: None, input, h0, c0, *weights)`` by autograd through the full
    path's graph of the call, recorded again from the saved inputs (a double backward runs
    through it)."""
    module, shape = ctx.module, ctx.shape
    wrt = [t for t, need in zip((input, h0, c0, *weights), ctx.needs_input_grad[4:])
           if need and t is not None]
    with torch.enable_grad():  # as the forward ran: no dropout (the lean path takes none)
        x = input if shape.batched else input.unsqueeze(1)
        hx = None if h0 is None else (h0, c0) if ctx.has_c else h0
        if hx is None:
            hx = module._zero_state(shape.batch, x)
        elif not shape.batched:
            hx = tuple(s.unsqueeze(1) for s in hx) if ctx.has_c else hx.unsqueeze(1)
        result = functional._recurrent(module.cell, x, hx, list(weights), module.bias,
                                       module.num_layers, 0.0, False, module.bidirectional,
                                       shape.batch_first, None, ctx.entry.name)
        outs = list(result)
        if not shape.batched:
            outs = [outs[0].squeeze(1)] + [s.squeeze(1) for s in outs[1:]]
        grads = iter(torch.autograd.grad(outs, wrt, grad_outputs[:len(outs)],
                                         create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None
                 for t, need in zip((input, h0, c0, *weights), ctx.needs_input_grad[4:]))


def forward(module, input, hx):
    """``module(input, hx)`` by the lean training path (call it with gradients on), by the lean
    inference path where nothing requires a gradient, or None where neither applies."""
    if (call := inference.lean_call(module, input, hx)) is None:
        return None
    entry, shape, x, _, _ = call
    states = () if hx is None else tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
    if not (input.requires_grad or any(s.requires_grad for s in states)
            or any(w.requires_grad for w in entry.weights)):
        return inference.run(call)
    if _kernels(entry.name) is None or (shape.steps == 1 and backends.resolve(
            module.backend, *module._case(entry.weights[0], input), module.hidden_size)
            != entry.name):  # auto runs one step with a gradient on torch's (AUTO_ORDER_STEP)
        return None
    if shape.batch_first:
        x = x.transpose(1, 0, 2)
    x_2d = torch.from_numpy(np.ascontiguousarray(x).reshape(shape.steps * shape.batch,
                                                            shape.features))
    h0, c0 = (states + (None, None))[:2]
    out, h_n, *c_n = _Stack.apply(module, entry, shape, x_2d, input, h0, c0, *entry.weights)
    return (out, h_n) if not c_n else (out, (h_n, c_n[0]))
