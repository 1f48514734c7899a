"""The autograd Function at the core of fastrnn: one layer, one direction, a whole sequence."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastrnn import backends


class Recurrence(torch.autograd.Function):
    """One recurrent layer in one direction over a whole (possibly packed) sequence.

    ``Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr[, bias])``
    returns ``(y, h_n, c_n)``; shapes as in :func:`fastrnn.kernels.reference.recurrence_forward`
    (xg: (N, G*H), h0: (B, P), c0: (B, H) or None, bias: (G*H,) or None, y: (N, P)). ``forward``
    calls the backend's forward kernel; ``backward`` its hand-written BPTT kernel, which returns
    the gradients of xg, h0, c0, w_hh, b_hn, w_hr and bias. Once differentiable: for double
    backward use ``backend="reference"``.
    """

    @staticmethod
    def forward(ctx, backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr, bias=None):
        kern = backends.kernels(backend)
        y, h_n, c_n, saved = kern.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr,
                                                     batch_sizes, reverse, bias=bias)
        ctx.kern, ctx.cell, ctx.batch_sizes, ctx.reverse = kern, cell, batch_sizes, reverse
        ctx.save_for_backward(h0, c0, w_hh, b_hn, w_hr, bias, y, *saved)
        if c_n is None:
            return y, h_n
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h_n, grad_c_n=None):
        h0, c0, w_hh, b_hn, w_hr, bias, y, *saved = ctx.saved_tensors
        grads = ctx.kern.recurrence_backward(
            ctx.cell, grad_y.contiguous(), grad_h_n.contiguous(),
            None if grad_c_n is None else grad_c_n.contiguous(),
            h0, c0, w_hh, b_hn, w_hr, ctx.batch_sizes, ctx.reverse, y, tuple(saved), bias=bias)
        return (None, None, None, None) + tuple(grads)


def needs_grad(*tensors):
    """Whether autograd will record an op on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def recurrence(backend, cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None):
    """Run one layer/direction on ``backend`` ("reference" or a kernel backend).

    Returns ``(y, h_n, c_n)`` (c_n None except for LSTM). The reference runs with autograd
    through its loop; every kernel backend runs through :class:`Recurrence`, or straight through
    its forward kernel (``save=False``) when no gradient is wanted. Under torch.compile every
    backend runs through the custom op ``fastrnn::recurrence``.
    """
    if torch.compiler.is_compiling():
        from fastrnn import custom_ops  # the custom op torch.compile traces
        y, h_n, c_n = custom_ops.recurrence(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh,
                                     b_hn, w_hr, bias)
        return y, h_n, None if c0 is None else c_n
    if backend == "reference":
        from fastrnn.kernels import reference
        return reference.recurrence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse,
                                    bias)
    if not needs_grad(xg, h0, c0, w_hh, b_hn, w_hr, bias):
        # No backward will follow: the kernel need not keep anything for it.
        y, h_n, c_n, _ = backends.kernels(backend).recurrence_forward(
            cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=False, bias=bias)
        return y, h_n, c_n
    out = Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr,
                           bias)
    return out if len(out) == 3 else (out[0], out[1], None)
