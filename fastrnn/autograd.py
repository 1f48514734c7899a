"""One layer in one direction over a whole sequence: the routes a call can take (decided in one
place, :func:`route`), and the autograd Function at the core of fastrnn (:class:`Recurrence`)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from fastrnn import backends
from fastrnn.kernels import reference

# Inference over a long input projects it in chunks of steps of about PROJECTION_CHUNK_BYTES each,
# which the recurrence reads while they are still in cache, instead of one (N, G*H) GEMM result
# that streams through memory (LSTM T=1000 B=64 H=512: a 524 MB xg, written then read once).
# Used on CPU tensors when no gradient is recorded and xg would exceed PROJECTION_CHUNK_MIN_BYTES.
PROJECTION_CHUNK_BYTES = 8 << 20
PROJECTION_CHUNK_MIN_BYTES = 32 << 20


class _Call(NamedTuple):
    """What one :class:`Recurrence` call worked out once, in forward, and backward reuses: the
    backend's kernel package (``kern``), the cell, the steps (``batch_sizes``, ``reverse``) and
    the backend's checked plan of the call (``kern.make_plan``: for numba the schedule of the
    steps and threads, for triton its step tables)."""

    kern: object
    cell: str
    batch_sizes: torch.Tensor
    reverse: bool
    plan: object


class Recurrence(torch.autograd.Function):
    """One recurrent layer in one direction over a whole (possibly packed) sequence.

    ``Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr[, bias[,
    w_cell]])`` returns ``(y, h_n, c_n)`` (``(y, h_n)`` for cells without a cell state); shapes as
    in :func:`fastrnn.kernels.reference.recurrence_forward` (xg: (N, G*H), h0: (B, P), c0: (B, H)
    or None, bias: (G*H,) or None, w_cell: (K, H) or None, y: (N, P)). ``forward`` makes the
    call's plan (checks, schedule) once and runs the backend's forward kernel; ``backward`` runs
    its hand-written BPTT kernel with that plan, which returns the gradients of xg, h0, c0, w_hh,
    b_hn, w_hr, bias and w_cell. Once differentiable: for double backward use
    ``backend="reference"``.
    """

    @staticmethod
    def forward(ctx, backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr, bias=None,
                w_cell=None):
        kern = backends.kernels(backend)
        plan = kern.make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                              w_cell)
        y, h_n, c_n, saved = kern.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr,
                                                     batch_sizes, reverse, bias=bias,
                                                     w_cell=w_cell, plan=plan)
        ctx.call = _Call(kern, cell, batch_sizes, reverse, plan)
        ctx.save_for_backward(h0, c0, w_hh, b_hn, w_hr, bias, w_cell, y, *saved)
        if c_n is None:
            return y, h_n
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h_n, grad_c_n=None):
        h0, c0, w_hh, b_hn, w_hr, bias, w_cell, y, *saved = ctx.saved_tensors
        call = ctx.call
        grads = call.kern.recurrence_backward(
            call.cell, grad_y.contiguous(), grad_h_n.contiguous(),
            None if grad_c_n is None else grad_c_n.contiguous(), h0, c0, w_hh, b_hn, w_hr,
            call.batch_sizes, call.reverse, y, tuple(saved), bias=bias, w_cell=w_cell,
            plan=call.plan)
        return (None, None, None, None) + tuple(grads)


def needs_grad(*tensors):
    """Whether autograd will record an op on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route(backend, x, xg_bytes, tensors):
    """How one layer and direction runs, decided in one place (``backend`` is a resolved name,
    not "native"; ``x`` the layer's input, ``xg_bytes`` the size its projection would have,
    ``tensors`` everything autograd could record through):

    * ``"reference"``: autograd through the reference loop (double backward included; traced as
      plain torch ops under torch.compile and export);
    * ``"custom-op"``: under torch.compile, the custom op ``fastrnn::recurrence`` (every kernel
      backend);
    * ``"chunked"``: no gradient recorded and a long CPU input: the projection made chunk by chunk
      (see ``PROJECTION_CHUNK_BYTES``), the kernel's forward without saving;
    * ``"inference"``: no gradient recorded: the kernel's forward without saving;
    * ``"autograd"``: :class:`Recurrence` (the kernel's forward, then its BPTT).
    """
    if backend == "reference":  # plain torch ops: torch.compile and export trace them as such
        return "reference"
    if torch.compiler.is_compiling():
        return "custom-op"
    if needs_grad(*tensors):
        return "autograd"
    if x.device.type == "cpu" and xg_bytes > PROJECTION_CHUNK_MIN_BYTES:
        return "chunked"
    return "inference"


def recurrence(backend, cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None,
               w_cell=None, how=None):
    """Run one layer/direction on ``backend`` ("reference" or a kernel backend) by the route
    ``how`` (:func:`route`; decided here when None). Returns ``(y, h_n, c_n)`` (c_n None for
    cells without a cell state)."""
    tensors = (xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell)
    how = how or route(backend, xg, 0, tensors)
    if how == "custom-op":
        from fastrnn import custom_ops  # the custom op torch.compile traces
        y, h_n, c_n = custom_ops.recurrence(backend, cell, batch_sizes, reverse, xg, h0, c0,
                                            w_hh, b_hn, w_hr, bias, w_cell)
        return y, h_n, None if c0 is None else c_n
    if how == "reference":
        return reference.recurrence(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse,
                                    bias, w_cell)
    if how in ("inference", "chunked"):
        y, h_n, c_n, _ = backends.kernels(backend).recurrence_forward(
            cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=False, bias=bias,
            w_cell=w_cell)
        return y, h_n, c_n
    out = Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr,
                           bias, w_cell)
    return out if len(out) == 3 else (out[0], out[1], None)
