"""The numba backend's lean inference path (:mod:`fastrnn.inference`): a whole stack of layers over
a dense input, no autograd, on weights prepared once per weight version (:func:`prepare_stack`),
with the thread plan, the layout of its buffers and its scratch kept per shape (:func:`_call`). Per
layer and direction: one small compiled call for the states and the input projection
(:func:`.loops._layer_start`, through the very gemm call torch.mm makes; where the CPU runs the
panel kernels, :func:`.projection.run` on W_ih packed once per weight version, as the full path's
no-gradient routes), then the same compiled loop, on the same plan, as
:func:`.launch.recurrence_forward`: bitwise the full path's results. A long input
(``autograd.chunk_steps``) goes chunk by chunk of steps, as the full path's
``functional._chunked_layer`` (:func:`_chunked`), on the weights prepared once per weight version
(LSTM T=200 B=64 H=512, 1 thread, Intel Xeon: 0.36-0.38 s, 0.44 s on the full path when it prepared
them per chunk). A call of a few rows (weights read in place: streaming) whose loops run on the
calling thread is one compiled call instead (:mod:`.express`: the same calls in the same order, the
weights found by address, the states and output written by it: 17 µs against 23 for a streamed LSTM
call at H=64, 1 thread, Intel Xeon)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from fastrnn import autograd, cells
from fastrnn.kernels.numba_cpu import buffers, launch, matmul, projection, team
from fastrnn.kernels.numba_cpu import express as one_call
from fastrnn.kernels.numba_cpu.loops import CODES, _forward_thread, _layer_start, _sum_bias

# Whether a call of ``rows`` rows (T*B) reads the weight matrices in place (nothing derived from
# them: fastrnn.inference checks the contents of the others only).
live = launch.live


def projects_in_place(rows):
    """Whether a call of ``rows`` rows projects its input on W_ih as given (the BLAS gemm, or
    torch.mm where there is none), not on W_ih packed (:func:`.projection.applies`)."""
    return not projection.applies(rows)


# A stack's call of a shape that has one (:func:`express`) as one compiled call
forward_express = one_call.forward_express


class _Stack:
    """A module's layers prepared for the lean path (:func:`prepare_stack`). Per layer and
    direction: ``weights`` the tensors as given, ``inputs`` W_ih (G*H, I) as numpy (read in
    place), ``biases`` the arguments of :func:`.loops._sum_bias` but the bias (b_ih, b_hh as
    numpy, read in place, or (0,) without biases; the count summed), ``live`` the
    :class:`.buffers.Prepared` of a call that reads its weights in place
    (:func:`.launch.live`: W_hh, W_hr as given) and, each made by the first call that needs them,
    the one of the other calls (:meth:`layers`: W_hh^T, W_hr^T), W_hh^T packed in panels
    (``panels``) and W_ih as :mod:`.projection` reads it (``projections``); ``calls`` the
    arguments of its calls per shape and thread setting, ``kept`` the bytes of scratch they may
    keep."""

    __slots__ = ("cell", "weights", "inputs", "biases", "live", "prepared", "calls", "kept",
                 "panels", "projections")

    def __init__(self, cell, weights):
        spec = cells.spec(cell)
        self.cell, self.weights, self.calls, self.kept = cell, weights, {}, 0
        self.inputs = [buffers.array(w[0]) for w in weights]
        self.biases = []
        for w_ih, _, _, _, _, _, b_ih, b_hh in weights:
            empty = buffers._empty((0,), buffers.NUMPY_DTYPES[w_ih.dtype])
            width = w_ih.shape[0]
            self.biases.append((empty, empty, 0) if b_ih is None else (
                buffers.array(b_ih), buffers.array(b_hh),
                width - (width // spec.gates if spec.has_b_hn else 0)))
        self.live = [buffers.prepare(cell, *w[1:6], False, True) for w in weights]
        self.prepared = self.panels = self.projections = None

    def layers(self):
        """Per layer and direction the :class:`.buffers.Prepared` with W_hh^T and W_hr^T."""
        if self.prepared is None:
            self.prepared = [buffers.prepare(self.cell, *w[1:6], False) for w in self.weights]
        return self.prepared

    def refresh(self):
        """Make again, where they are, what was made from the weights' values (W_hh^T, W_hr^T,
        their panels, W_ih packed), for weights changed in place, each still contiguous where it
        was (the calls' tables hold those buffers' addresses; all else reads the weights, or is
        summed each call)."""
        for w, prepared in zip(self.weights, self.prepared or ()):
            buffers.transposed(w[1], prepared.w_t)
            if w[3] is not None:
                buffers.transposed(w[3], prepared.wr_t)
        for prepared, panels in zip(self.prepared or (), self.panels or ()):
            matmul.panels(prepared.w_t, out=panels)
        for w, (w_t, w_p) in zip(self.weights, self.projections or ()):
            matmul.panels(buffers.transposed(w[0], w_t), out=w_p)

    def sum_bias(self, k, prepared):
        """Layer and direction ``k``'s bias summed into ``prepared.bias`` from the biases as they
        are now (:func:`.loops._sum_bias`)."""
        _sum_bias(*self.biases[k][:2], prepared.bias, self.biases[k][2])


def refresh_stack(stack):
    """:meth:`_Stack.refresh` of ``stack``, made by :func:`prepare_stack` from weights whose
    values changed since, in place."""
    stack.refresh()


def prepare_stack(cell, weights):
    """The :class:`_Stack` of ``weights``: per layer and direction ``(w_ih, w_hh, b_hn, w_hr,
    bias, w_cell, b_ih, b_hh)`` tensors, the first six as given to
    :func:`.launch.recurrence_forward` (w_ih (G*H, I)); bias b_ih + b_hh (their sum when
    prepared: each call sums them again, the lean paths check no copy of them)."""
    return _Stack(cell, weights)


# Up to this many bytes a call's states and output are one allocation (a kept state then keeps at
# most this much alive); above it, two.
GROUP_MAX_BYTES = 64 << 10
# Scratch up to SCRATCH_KEEP_MAX_BYTES is kept for the next call of its shape, for up to CALLS_KEPT
# shapes and MODULE_SCRATCH_MAX_BYTES a module (a shape beyond either drops the module's kept
# calls first). A fresh allocation of a few MiB is fresh pages each call (the C library gives
# them back), a kept one stays in cache: against 256 KiB kept at most, Intel Xeon, 1 thread, LSTM
# inference T=200 B=1 H=128 (xg 400 KiB) 0.72 against 0.76 ms, T=50 B=64 H=32 0.71 against 0.74.
SCRATCH_KEEP_MAX_BYTES = 4 << 20
MODULE_SCRATCH_MAX_BYTES = 16 << 20
CALLS_KEPT = 16


class _Layout(NamedTuple):
    """A call's buffers and plans (:func:`_layout`): ``states`` (L*D*B*P + L*D*B*H elements:
    h_n then c_n), ``y_size`` (the last layer's y per direction: (T*B, P) rows, padded to 64
    bytes), ``one_buffer`` (states and y in one allocation), ``scratch`` the shapes of the gate
    rows, m, xg and the y of each layer but the last, ``keep_scratch`` whether it is kept for the
    next call; ``plans`` per direction; ``chunks`` None, or for a long input (projected in
    chunks: ``autograd.chunk_steps``) per direction its :class:`_Chunk` in
    processing order (``plans`` then their first)."""

    states: int
    y_size: int
    one_buffer: bool
    scratch: list
    keep_scratch: bool
    plans: tuple
    chunks: Optional[tuple]


class _Chunk(NamedTuple):
    """A long input's chunk of steps as the full path runs it (``functional._chunked_layer``):
    its rows ``start`` to ``stop``, its plan (of its steps alone) and how its input is projected
    (``project``: :data:`PANELS`, else the BLAS gemm's address, 0 where there is none)."""

    start: int
    stop: int
    plan: object
    project: int


_LAYOUTS = {}


def _settings():
    """What a call's layout depends on besides its shape: the thread count and the thresholds
    (tests move them)."""
    return (torch.get_num_threads(), matmul.USE_BLAS, matmul.USE_PANELS,
            launch.PARALLEL_MIN_BATCH, launch.PARALLEL_MIN_WORK,
            launch.BLAS_PARALLEL_MIN_WEIGHT_BYTES, launch.BLAS_PARALLEL_MIN_STEP_WORK,
            launch.MICROKERNEL_MAX_ROWS, launch.PANELS_MAX_ROWS, launch.PANELS_MIN_STEPS,
            launch.SPLIT_MIN_STEP_WORK, launch.LIVE_MAX_ROWS, projection.MAX_ROWS,
            GROUP_MAX_BYTES, SCRATCH_KEEP_MAX_BYTES, autograd.PROJECTION_CHUNK_BYTES,
            autograd.PROJECTION_CHUNK_WEIGHTS, autograd.PROJECTION_CHUNK_MIN_STEPS,
            autograd.PROJECTION_CHUNK_MIN_CHUNKS)


def _layout(spec, proj, hidden, steps, batch, num_layers, directions, itemsize):
    """The :class:`_Layout` of a call, made once per shape and thread setting."""
    key = (spec.name, proj, hidden, steps, batch, num_layers, directions, itemsize, *_settings())
    layout = _LAYOUTS.get(key)
    if layout is None:
        stack, n_rows, width = num_layers * directions, steps * batch, spec.gates * hidden
        states = stack * batch * (proj + (hidden if spec.has_c else 0))
        y_size = -(-n_rows * proj * itemsize // 64) * 64 // itemsize
        chunk = autograd.chunk_steps(n_rows, batch, width, proj, itemsize) or steps
        scratch = [(0, 0) if spec.gates_in_y else (batch, spec.row_blocks * hidden),
                   (batch, hidden) if proj != hidden else (0, 0), (chunk * batch, width)]
        scratch += [(n_rows, proj)] * (stack - directions)
        chunks = None if chunk >= steps else tuple(
            _chunks(steps, batch, chunk, reverse, width, proj, itemsize)
            for reverse in (False, True)[:directions])
        plans = tuple(parts[0].plan for parts in chunks) if chunks else tuple(
            launch._schedule(np.full(steps, batch, np.int64), reverse, batch, width, proj,
                             itemsize, True) for reverse in (False, True)[:directions])
        if len(_LAYOUTS) >= 256:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _Layout(
            states, y_size, (states + directions * y_size) * itemsize <= GROUP_MAX_BYTES, scratch,
            sum(rows * cols for rows, cols in scratch) * itemsize <= SCRATCH_KEEP_MAX_BYTES, plans,
            chunks)
    return layout


def _chunks(steps, batch, chunk, reverse, width, proj, itemsize):
    """The :class:`_Chunk` of a long input's call in one direction, in processing order."""
    gemm = matmul._gemm_address(torch.float32 if itemsize == 4 else torch.float64)
    plans, out = {}, []
    starts = range(0, steps, chunk)
    for t0 in reversed(starts) if reverse else starts:
        count = min(chunk, steps - t0)
        if count not in plans:
            plans[count] = launch._schedule(np.full(count, batch, np.int64), reverse, batch,
                                            width, proj, itemsize, True)
        rows = count * batch
        out.append(_Chunk(t0 * batch, t0 * batch + rows, plans[count],
                          PANELS if projection.applies(rows) else gemm))
    return tuple(out)


class _Call(NamedTuple):
    """A stack's calls of one shape: the :class:`_Layout`, per layer and direction the arguments
    of :func:`.loops._forward_thread` that do not change between calls (``args``) and W_ih as
    :mod:`.projection` packs it where the panel kernels project (``projections``, else None), the
    free scratch groups (``free``: taken and given back by each call; two threads calling at once
    take two), how the input is projected (``project``: the BLAS gemm for :func:`.loops.
    _layer_start`, or :data:`PANELS`, or :data:`TORCH` where there is no BLAS) and per direction
    whether its loop runs on the calling thread alone, with no thread-local BLAS setting
    (``direct``: called without :func:`.launch._run`); ``empty`` the (0, 0) array of unused
    arguments; ``h_size`` the elements of h_n."""

    layout: _Layout
    args: list
    projections: list
    free: list
    project: int
    direct: tuple
    empty: np.ndarray
    h_size: int
    express: object  # its :class:`.express.Express`, or None: the call takes forward_stack


PANELS, TORCH = one_call.PANELS, 0  # _Call.project besides a gemm address


def _call(stack, steps, batch, num_layers, directions, dtype):
    """The :class:`_Call` of ``stack`` for a shape, made once per shape and thread setting."""
    key = (steps, batch, *_settings())
    call = stack.calls.get(key)
    if call is None:
        spec = cells.spec(stack.cell)
        width, proj = stack.live[0].w_t.shape
        hidden = width // spec.gates
        layout = _layout(spec, proj, hidden, steps, batch, num_layers, directions, dtype.itemsize)
        # The weights and panels the plan says, as the full path (bitwise its results)
        live = layout.plans[0].live
        layers = stack.live if live else stack.layers()
        w_ps = [prepared.w_p for prepared in layers]  # none
        chunks = [part for parts in layout.chunks or () for part in parts]
        if any(plan.panels for plan in layout.plans + tuple(c.plan for c in chunks)):
            if stack.panels is None:
                stack.panels = [matmul.panels(prepared.w_t) for prepared in stack.layers()]
            if layout.plans[0].panels:
                w_ps = stack.panels
        args = [(CODES[stack.cell], spec.gates_in_y, prepared.bias, prepared.b_hn,
                 prepared.w_cell, prepared.w_t, w_p, live, prepared.wr_t, proj != hidden)
                for prepared, w_p in zip(layers, w_ps)]
        projections, project = None, matmul._gemm_address(buffers.TORCH_DTYPES[dtype])
        if (any(c.project == PANELS for c in chunks) if chunks
                else projection.applies(steps * batch)):
            if stack.projections is None:  # the panel kernels project, as the full path's
                stack.projections = [projection.packed(torch.from_numpy(w))
                                     for w in stack.inputs]
            projections, project = stack.projections, PANELS
        direct = tuple(plan.nthreads == 1 and not (plan.gemm and plan.blas_threads)
                       for plan in layout.plans)
        express = None
        if _express(layout, direct, project, steps * batch):
            express = one_call.build(stack, layout, args, projections, project, steps, batch,
                                     num_layers, directions, dtype)
            if express.scratch * dtype.itemsize > SCRATCH_KEEP_MAX_BYTES:
                express = None  # its scratch (states and ys besides the layout's) not kept
        kept = (0 if not layout.keep_scratch else express.scratch * dtype.itemsize if express
                else sum(rows * cols for rows, cols in layout.scratch) * dtype.itemsize)
        if len(stack.calls) >= CALLS_KEPT or stack.kept + kept > MODULE_SCRATCH_MAX_BYTES:
            stack.calls.clear()
            stack.kept = 0
        stack.kept += kept
        call = stack.calls[key] = _Call(layout, args, projections, [], project or TORCH, direct,
                                        buffers._empty((0, 0), dtype),
                                        num_layers * directions * batch * proj, express)
    return call


def _express(layout, direct, project, rows):
    """Whether a call of ``rows`` rows (T*B) with this layout, loops on the calling thread or not
    (``direct``) and projection is one compiled call (:mod:`.express`): every loop and the
    projection on the calling thread, none of their BLAS calls with a thread-local setting (a
    single row calls none: streaming), no torch.mm (no BLAS), scratch kept (a few rows: the
    Python between the compiled calls is what it saves)."""
    if project == TORCH or not layout.keep_scratch or layout.chunks:
        return False
    if project == PANELS and min(torch.get_num_threads(), launch._CPUS,
                                 -(-rows // projection.BLOCK_ROWS)) > 1:
        return False  # the projection on several threads (projection.run)
    return all(direct) or (rows == 1 and layout.plans[0].live)


def forward_stack(stack, x, steps, batch, h0, c0, num_layers, directions):
    """The forward of :func:`prepare_stack`'s ``stack``. x (T*B, I) C-contiguous numpy; h0 (L*D,
    B, P), c0 (L*D, B, H) numpy (None: zeros; c0 None also for cells without a cell state).
    Returns numpy ``(y (T*B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None)``."""
    dtype = x.dtype
    layout, args, projections, free, project, direct, empty, h_size, _ = _call(
        stack, steps, batch, num_layers, directions, dtype)
    n_y, plans = layout.y_size, layout.plans
    if layout.one_buffer:
        ys = states = buffers.alloc((layout.states + directions * n_y,), dtype)
        start = layout.states
    else:
        states = buffers.alloc((layout.states,), dtype)
        ys, start = buffers.alloc((directions * n_y,), dtype), 0
    h_n = states[:h_size].reshape(num_layers * directions, batch, -1)
    c_n = (states[h_size:layout.states].reshape(num_layers * directions, batch, -1)
           if layout.states > h_size else None)
    acc, m, xg, *inner = free.pop() if free else buffers.alloc_group(layout.scratch, dtype)
    n_rows, last = steps * batch, num_layers - 1
    layer_input, k = x, 0
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            code, packed, bias, b_hn, w_cell, w_t, w_p, live, wr_t, has_proj = args[k]
            if layer < last:
                y = inner[k]
            else:
                offset = start + direction * n_y
                y = ys[offset:offset + n_rows * h_n.shape[2]].reshape(n_rows, -1)
            h, c, w_ih = h_n[k], empty if c_n is None else c_n[k], stack.inputs[k]
            if layout.chunks:
                _chunked(stack, k, layout.chunks[direction], layer_input, xg, y, h, c,
                         empty if h0 is None else h0[k], empty if c0 is None else c0[k],
                         args[k], projections, acc, m, empty)
                outputs.append(y)
                k += 1
                continue
            x_start = empty  # what _layer_start projects (by the BLAS gemm in ``project``)
            if project == PANELS:
                projection.run(xg, layer_input, *projections[k])
            elif project == TORCH:
                torch.mm(torch.from_numpy(layer_input), torch.from_numpy(w_ih).t(),
                         out=torch.from_numpy(xg))
            else:
                x_start = layer_input
            b_ih, b_hh, summed = stack.biases[k]
            _layer_start(project, x_start, w_ih, xg, empty if h0 is None else h0[k],
                         empty if c0 is None else c0[k], h, c, b_ih, b_hh, bias, summed)
            plan = plans[direction]
            loop_args = (code, packed, xg, bias, b_hn, w_cell, h, c, w_t, w_p, live, wr_t,
                         has_proj, y, y if packed else empty, empty, acc, m, plan.order,
                         plan.offsets, plan.sizes)
            if direct[direction]:
                _forward_thread(0, 1, plan.group, plan.gemm, team.new_counter(False), *loop_args)
            else:
                launch._run(_forward_thread, plan, team.new_counter(plan.split), *loop_args)
            outputs.append(y)
            k += 1
        layer_input = np.concatenate(outputs, 1) if directions == 2 else outputs[0]
    if layout.keep_scratch:
        free.append([acc, m, xg, *inner])
    return layer_input, h_n, c_n


def _chunked(stack, k, chunks, x, xg, y, h, c, h0, c0, args, projections, acc, m, empty):
    """Layer and direction ``k`` of a long input, chunk by chunk (``chunks``: its
    :class:`_Chunk`, in processing order), as the full path runs it: each chunk's projection into
    ``xg``'s first rows, then the loop over its steps, on its plan, from the states the chunk
    before left in h and c. x (T*B, I), y (T*B, P); h0, c0 the initial states or (0, 0)."""
    code, packed, bias, b_hn, w_cell, _, _, _, _, has_proj = args
    w_ih, (b_ih, b_hh, summed) = stack.inputs[k], stack.biases[k]
    for i, (start, stop, plan, project) in enumerate(chunks):
        x_c, xg_c, y_c = x[start:stop], xg[:stop - start], y[start:stop]
        if project == PANELS:
            projection.run(xg_c, x_c, *projections[k])
        elif project == TORCH:
            torch.mm(torch.from_numpy(x_c), torch.from_numpy(w_ih).t(), out=torch.from_numpy(xg_c))
        if i == 0:
            _layer_start(project, x_c if project > 0 else empty, w_ih, xg_c, h0, c0, h, c, b_ih,
                         b_hh, bias, summed)
        elif project > 0:
            matmul._project_in_place(project, xg_c, x_c, w_ih)
        prepared = stack.live[k] if plan.live else stack.layers()[k]
        loop_args = (code, packed, xg_c, bias, b_hn, w_cell, h, c, prepared.w_t,
                     stack.panels[k] if plan.panels else prepared.w_p, plan.live, prepared.wr_t,
                     has_proj, y_c, y_c if packed else empty, empty, acc, m, plan.order,
                     plan.offsets, plan.sizes)
        if plan.nthreads == 1 and not (plan.gemm and plan.blas_threads):
            _forward_thread(0, 1, plan.group, plan.gemm, team.new_counter(False), *loop_args)
        else:
            launch._run(_forward_thread, plan, team.new_counter(plan.split), *loop_args)


def express(stack, steps, batch, num_layers, directions, dtype):
    """The :class:`_Express` of ``stack``'s calls of this shape, or None where
    :func:`forward_stack` runs them."""
    return _call(stack, steps, batch, num_layers, directions, dtype).express
