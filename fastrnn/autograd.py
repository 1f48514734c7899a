"""One layer in one direction over a whole sequence: the routes a call can take (decided in one
place, :func:`route`), and the autograd Function at the core of fastrnn (:class:`Recurrence`)."""
from __future__ import annotations

import dataclasses

import torch

from fastrnn import backends
from fastrnn.kernels import reference

# Inference over a long input projects it in chunks of steps, which the recurrence reads while they
# are still in cache, instead of one (N, G*H) GEMM result that streams through memory (LSTM T=1000
# B=64 H=512: a 524 MB xg, written then read once): on CPU tensors when no gradient is recorded,
# in chunks of PROJECTION_CHUNK_BYTES or PROJECTION_CHUNK_WEIGHTS times the recurrent weights'
# bytes, whichever is more, and at least PROJECTION_CHUNK_MIN_STEPS steps (numba's panel kernels
# run calls of 16 steps and more: launch.PANELS_MIN_STEPS), where xg would take more than
# PROJECTION_CHUNK_MIN_CHUNKS chunks. Against chunks of 8 MiB from 32 MiB on (Intel Xeon, numba,
# LSTM inference, in-process ratios to torch.nn, 1 thread): dense T=1000 B=64 H=32 0.82 -> 0.99-
# 1.16x, T=1000 B=8 H=128 0.88 -> 0.97-0.99x, T=200 B=64 H=128 0.83-0.89 -> 0.89-0.94x, H=512 the
# same; packed T=200 B=64 H=128 on 2 threads 2.03-2.06 -> 1.85-1.86x (the full path: more Python
# and copies a chunk). bench/results/chunks-xeon-1206.md.
PROJECTION_CHUNK_BYTES = 4 << 20
PROJECTION_CHUNK_WEIGHTS = 2
PROJECTION_CHUNK_MIN_STEPS = 16
PROJECTION_CHUNK_MIN_CHUNKS = 2


def chunk_steps(rows, batch, width, proj, itemsize):
    """Steps per chunk in which inference projects a layer's input, or 0: in one piece. ``rows``
    the input's rows (N), ``batch`` its first step's, ``width`` the projection's columns (G*H),
    ``proj`` the columns of the recurrent weights (P: G*H*P of them)."""
    chunk = max(PROJECTION_CHUNK_BYTES, PROJECTION_CHUNK_WEIGHTS * width * proj * itemsize)
    if rows * width * itemsize <= PROJECTION_CHUNK_MIN_CHUNKS * chunk:
        return 0
    return max(PROJECTION_CHUNK_MIN_STEPS, chunk // max(1, batch * width * itemsize))


@dataclasses.dataclass(frozen=True)
class _Call:
    """What one :class:`Recurrence` call worked out once, in forward, and backward reuses: the
    backend's kernel package (``kern``), the cell, the steps (``batch_sizes``, ``reverse``) and
    the backend's checked plan of the call (``kern.make_plan``: for numba the schedule of the
    steps and threads, for triton its step tables; it depends on shapes and steps only, so one
    plan serves every slice of a vmap). Not a tuple: torch.func passes it through untouched."""

    kern: object
    cell: str
    batch_sizes: torch.Tensor
    reverse: bool
    plan: object


def _select(value, dim, i):
    """Slice ``i`` of ``value`` along its vmapped ``dim`` (``dim`` mirrors ``value``'s nesting
    of tuples, as a vmap staticmethod's ``in_dims`` does; None: not batched)."""
    if isinstance(value, tuple):
        dims = dim if isinstance(dim, tuple) else (dim,) * len(value)
        return tuple(_select(v, d, i) for v, d in zip(value, dims))
    return value if dim is None else value.select(dim, i)


def _vmap_loop(function, info, in_dims, args):
    """A vmap rule by a loop: ``function.apply`` on each slice of ``args``, then each output's
    slices stacked on a new dim 0 (None and non-tensor outputs: the first slice's, unbatched).
    The kernels take plain tensors (``.numpy()``, raw pointers): they cannot run batched."""
    runs = [function.apply(*_select(args, in_dims, i)) for i in range(info.batch_size)]

    def stack(outs):
        first = outs[0]
        if isinstance(first, tuple):
            pairs = [stack(list(parts)) for parts in zip(*outs)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        if isinstance(first, torch.Tensor):
            return torch.stack(outs), 0
        return first, None

    return stack(runs)


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


class _Function(torch.autograd.Function):
    """An autograd Function always applied with all its arguments, positionally: outside
    torch.func, ``apply`` goes straight to autograd's C++ apply, without the per-call
    ``inspect.signature`` binding of defaults that ``Function.apply`` does for a Function with
    ``setup_context`` (measured 0.25 ms per layer/direction of a training step)."""

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        # torch's Function.apply unwraps tensors left over from a finished torch.func transform
        # (``unwrap_dead_wrappers``); the same, in a list comprehension: 2 µs less per call.
        args = [_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args]
        return super(torch.autograd.Function, cls).apply(*args)


class _Recurrence(_Function):
    """The autograd Function behind :class:`Recurrence`: its arguments plus ``recipe``, and it
    returns ``(y, h_n, c_n, call, saved)``: c_n None for cells without a cell state, ``call`` the
    :class:`_Call`, ``saved`` the kernel's saved tensors (``(y, *kern_saved)``, returned so that
    they reach ``setup_context`` under torch.func too; not differentiable).

    ``recipe``: None, or ``(fn, *tensors)`` with ``fn(*tensors)`` equal to ``xg`` (the module
    path: ``x W_ih^T`` from the layer's input and w_ih, tensors the projection's matmul keeps
    alive anyway; saved like the others: freed after backward). Double backward needs xg; with a
    recipe it is recomputed then, from tensors that carry its graph; without one, forward keeps
    ``xg`` itself."""

    @staticmethod
    def forward(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell,
                recipe):
        kern = backends.kernels(backend)
        plan = kern.make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                              w_cell)
        y, h_n, c_n, saved = kern.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr,
                                                     batch_sizes, reverse, bias=bias,
                                                     w_cell=w_cell, plan=plan)
        return y, h_n, c_n, _Call(kern, cell, batch_sizes, reverse, plan), (y, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell, recipe = inputs[4:]
        fn, *recipe_tensors = recipe or (None,)
        ctx.call, ctx.recipe, ctx.xg_dtype = output[3], fn, xg.dtype
        ctx.n_recipe = len(recipe_tensors)
        ctx.save_for_backward(None if fn else xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell,
                              *recipe_tensors, *output[4])

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _call, _saved):
        xg, *tensors = ctx.saved_tensors
        tensors, recipe_tensors, saved = (tensors[:7], tensors[7:7 + ctx.n_recipe],
                                          tuple(tensors[7 + ctx.n_recipe:]))
        args = (ctx.call, saved, grad_y, grad_h_n, grad_c_n)
        if not torch.is_grad_enabled():  # a plain backward: the kernel's BPTT, nothing recomputed
            if not torch._C._are_functorch_transforms_active():  # ... and nothing to record
                return (None,) * 4 + _BPTT.forward(*args, None, *tensors) + (None,)
            xg = None
        elif ctx.recipe:  # create_graph: xg again, with its graph to the layer's input and w_ih
            xg = ctx.recipe(*recipe_tensors).to(ctx.xg_dtype)
        grads = _BPTT.apply(*args, xg, *tensors)
        return (None,) * 4 + tuple(grads) + (None,)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_loop(_Recurrence, info, in_dims, args)


class _BPTT(_Function):
    """The backend's hand-written BPTT of one :class:`_Recurrence` call, as a Function of its own:
    so that it runs under vmap (jacrev: the loop of :func:`_vmap_loop`) and has a backward, the
    double backward.

    ``forward(call, saved, grad_y, grad_h_n, grad_c_n, xg, h0, c0, w_hh, b_hn, w_hr, bias,
    w_cell)`` returns the 8 gradients of (xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell) (None for an
    absent input), bitwise the kernel's. ``xg`` is used only by ``backward`` (None in a plain
    backward), which recomputes those gradients through the reference loop (``torch.func.vjp``)
    and takes their vector-Jacobian product in turn: the double backward of every backend, and
    any higher order, as the recompute is plain torch ops. No ``jvp``: no forward-mode AD."""

    @staticmethod
    def forward(call, saved, grad_y, grad_h_n, grad_c_n, xg, h0, c0, w_hh, b_hn, w_hr, bias,
                w_cell):
        y, *kern_saved = saved
        return tuple(call.kern.recurrence_backward(
            call.cell, grad_y.contiguous(), grad_h_n.contiguous(),
            None if grad_c_n is None else grad_c_n.contiguous(), h0, c0, w_hh, b_hn, w_hr,
            call.batch_sizes, call.reverse, y, tuple(kern_saved), bias=bias, w_cell=w_cell,
            plan=call.plan))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[2:])

    @staticmethod
    def backward(ctx, *grad_grads):
        call = ctx.call
        leaves = ctx.saved_tensors  # grad_y, grad_h_n, grad_c_n, xg, h0, ..., w_cell
        present = [t for t in leaves if t is not None]
        n_out = 2 if leaves[2] is None else 3

        def bptt(*tensors):  # the layer's gradients through the reference loop
            args = iter(tensors)
            full = [None if t is None else next(args) for t in leaves]
            cotangents, inputs = full[:n_out], full[3:]
            wrt = [t for t in inputs if t is not None]

            def layer(*wrt_now):
                now = iter(wrt_now)
                sub = [None if t is None else next(now) for t in inputs]
                outs = reference.recurrence(call.cell, *sub[:6], call.batch_sizes, call.reverse,
                                            *sub[6:])
                return outs[:n_out]

            return torch.func.vjp(layer, *wrt)[1](tuple(cotangents))

        # torch.func.vjp (not autograd.grad) so that this runs under torch.func transforms too.
        grads, vjp = torch.func.vjp(bptt, *present)
        cotangents = [torch.zeros_like(g) if gg is None else gg
                      for g, gg in zip(grads, (gg for gg, t in zip(grad_grads, leaves[3:])
                                               if t is not None))]
        second = iter(vjp(tuple(cotangents)))
        return (None, None) + tuple(None if t is None else next(second) for t in leaves)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_loop(_BPTT, info, in_dims, args)


class Recurrence:
    """One recurrent layer in one direction over a whole (possibly packed) sequence.

    ``Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr[, bias[,
    w_cell]])`` returns ``(y, h_n, c_n)`` (``(y, h_n)`` for cells without a cell state); shapes as
    in :func:`fastrnn.kernels.reference.recurrence_forward` (xg: (N, G*H), h0: (B, P), c0: (B, H)
    or None, bias: (G*H,) or None, w_cell: (K, H) or None, y: (N, P)). Forward makes the call's
    plan (checks, schedule) once and runs the backend's forward kernel; backward runs its
    hand-written BPTT kernel with that plan (gradients of xg, h0, c0, w_hh, b_hn, w_hr, bias and
    w_cell). Double backward (``create_graph=True``) differentiates the layer again through the
    reference loop, recomputed from the inputs (called this way, without the module path's
    ``recipe``, the call keeps xg for it). torch.func (grad, vjp, jacrev, vmap) composes with it:
    vmap runs the kernels once per slice.
    """

    @staticmethod
    def apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh, b_hn, w_hr, bias=None,
              w_cell=None, recipe=None):
        y, h_n, c_n, _, _ = _Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0,
                                              w_hh, b_hn, w_hr, bias, w_cell, recipe)
        return (y, h_n) if c_n is None else (y, h_n, c_n)


def needs_grad(*tensors):
    """Whether autograd will record an op on ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route(backend, x, chunked, tensors):
    """How one layer and direction runs, decided in one place (``backend`` is a resolved name,
    not "native"; ``x`` the layer's input, ``chunked`` None or a function: whether a no-gradient
    CPU call projects it in chunks (:func:`chunk_steps`; called only then, so that a traced or
    exported call's symbolic shapes get no guard from it), ``tensors`` everything autograd could
    record through):

    * ``"reference"``: autograd through the reference loop (double backward included; traced as
      plain torch ops under torch.compile and export);
    * ``"custom-op"``: under torch.compile, the custom op ``fastrnn::recurrence`` (every kernel
      backend);
    * ``"chunked"``: no gradient recorded and a long CPU input: the projection made chunk by chunk
      (``chunked``: :func:`chunk_steps`), the kernel's forward without saving;
    * ``"inference"``: no gradient recorded: the kernel's forward without saving;
    * ``"autograd"``: :class:`Recurrence` (the kernel's forward, then its BPTT); also under
      torch.func transforms (grad, vmap, ...), which only the Function supports.
    """
    if backend == "reference":  # plain torch ops: torch.compile and export trace them as such
        return "reference"
    if torch.compiler.is_compiling():
        return "custom-op"
    if needs_grad(*tensors) or torch._C._are_functorch_transforms_active():
        return "autograd"
    if x.device.type == "cpu" and chunked is not None and chunked():
        return "chunked"
    return "inference"


def recurrence(backend, cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None,
               w_cell=None, how=None, recipe=None):
    """Run one layer/direction on ``backend`` ("reference" or a kernel backend) by the route
    ``how`` (:func:`route`; decided here when None). Returns ``(y, h_n, c_n)`` (c_n None for
    cells without a cell state). ``recipe``: how to recompute xg for a double backward (see
    :class:`_Recurrence`), or None."""
    tensors = (xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell)
    how = how or route(backend, xg, None, tensors)
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
    y, h_n, c_n, _, _ = _Recurrence.apply(backend, cell, batch_sizes, reverse, xg, h0, c0, w_hh,
                                          b_hn, w_hr, bias, w_cell, recipe)
    return y, h_n, c_n
