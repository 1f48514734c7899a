"""torch.library custom ops, so that ``torch.compile(model, fullgraph=True)`` traces fastrnn
modules without graph breaks.

``fastrnn::recurrence`` runs one layer/direction on a kernel backend (the contract of
:func:`fastrnn.kernels.reference.recurrence_forward`); its autograd formula calls
``fastrnn::recurrence_backward``, which recomputes the forward's saved tensors and runs the
backend's BPTT. Custom ops cannot return a backend-defined list of saved tensors with shapes a
fake implementation could know, hence the recompute: compiled training pays one extra forward
per layer in backward. Eager mode uses :class:`fastrnn.autograd.Recurrence`, without it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastrnn import backends


@torch.library.custom_op("fastrnn::recurrence", mutates_args=())
def recurrence(backend: str, cell: str, batch_sizes: Tensor, reverse: bool, xg: Tensor,
               h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor],
               w_hr: Optional[Tensor], bias: Optional[Tensor] = None,
               w_cell: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y (N, P), h_n (B, P), c_n (B, H), or an empty tensor when the cell has no c)."""
    y, h_n, c_n, _ = backends.kernels(backend).recurrence_forward(
        cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=False, bias=bias,
        w_cell=w_cell)
    return y, h_n, h0.new_empty(0) if c_n is None else c_n


@recurrence.register_fake
def _(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr, bias=None, w_cell=None):
    y = xg.new_empty(xg.shape[0], h0.shape[1])
    return y, torch.empty_like(h0), h0.new_empty(0) if c0 is None else torch.empty_like(c0)


@torch.library.custom_op("fastrnn::recurrence_backward", mutates_args=())
def recurrence_backward(backend: str, cell: str, batch_sizes: Tensor, reverse: bool,
                        grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, xg: Tensor,
                        h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, b_hn: Optional[Tensor],
                        w_hr: Optional[Tensor], bias: Optional[Tensor] = None,
                        w_cell: Optional[Tensor] = None) -> list[Tensor]:
    """Gradients of the present inputs among (xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell), in
    that order."""
    kern = backends.kernels(backend)
    plan = kern.make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias, w_cell)
    y, _, _, saved = kern.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes,
                                             reverse, bias=bias, w_cell=w_cell, plan=plan)
    grads = kern.recurrence_backward(cell, grad_y.contiguous(), grad_h_n.contiguous(),
                                     None if c0 is None else grad_c_n.contiguous(), h0, c0,
                                     w_hh, b_hn, w_hr, batch_sizes, reverse, y, saved, bias=bias,
                                     w_cell=w_cell, plan=plan)
    return [g for g in grads if g is not None]


@recurrence_backward.register_fake
def _(backend, cell, batch_sizes, reverse, grad_y, grad_h_n, grad_c_n, xg, h0, c0, w_hh, b_hn,
      w_hr, bias=None, w_cell=None):
    return [torch.empty_like(t) for t in (xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell)
            if t is not None]


def _setup_context(ctx, inputs, output):
    ctx.args = inputs[:4]
    ctx.save_for_backward(*inputs[4:])
    ctx.present = [t is not None for t in inputs[4:]]


def _backward(ctx, grad_y, grad_h_n, grad_c_n):
    backend, cell, batch_sizes, reverse = ctx.args
    tensors = ctx.saved_tensors
    grads = iter(recurrence_backward(backend, cell, batch_sizes, reverse, grad_y, grad_h_n,
                                     grad_c_n, *tensors))
    return (None, None, None, None) + tuple(next(grads) if p else None for p in ctx.present)


recurrence.register_autograd(_backward, setup_context=_setup_context)
