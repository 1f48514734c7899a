"""The numba backend's lean inference path (:mod:`fastrnn.inference`): a whole stack of layers over
a dense input, no autograd, on weights prepared once per weight version (:func:`prepare_stack`),
with a layout of its buffers and a thread plan made once per shape (:func:`_call`). Where each
layer's loop runs on one thread (every call below ``launch.PARALLEL_MIN_BATCH`` rows), a layer and
direction is one compiled call (:func:`.loops._forward_layer`: states, input projection through
torch's own gemm call, time loop, on regions of one buffer); else torch projects and the loop runs
on the plan's threads. Either way the same loop and input projection as
:func:`.launch.recurrence_forward`: bitwise the same results as the full path."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fastrnn import cells
from fastrnn.kernels.numba_cpu import buffers, launch, matmul
from fastrnn.kernels.numba_cpu.loops import CODES, _forward_layer, _forward_thread


class _Stack:
    """A module's layers prepared for the lean path (:func:`prepare_stack`), and the arguments of
    its calls per shape and thread setting."""

    __slots__ = ("cell", "layers", "calls")

    def __init__(self, cell, layers):
        self.cell, self.layers, self.calls = cell, layers, {}


def prepare_stack(cell, weights):
    """The :class:`_Stack` of ``weights``: per layer and direction ``(w_ih, w_hh, b_hn, w_hr,
    bias, w_cell)`` tensors as given to :func:`.launch.recurrence_forward` (w_ih (G*H, I)), each
    prepared as ``(w_ih numpy, buffers.Prepared)``."""
    return _Stack(cell, [(buffers.array(w_ih),
                          buffers.prepare(cell, w_hh, b_hn, w_hr, bias, w_cell))
                         for w_ih, w_hh, b_hn, w_hr, bias, w_cell in weights])


# Up to this many bytes a call's states, output and scratch are one allocation (a kept state then
# keeps at most this much alive); above it, three.
GROUP_MAX_BYTES = 64 << 10
_ALIGN = 16  # elements: 64 bytes of float32 (regions of the scratch start at such offsets)


class _Layout(NamedTuple):
    """Where a call's arrays live (:func:`_layout`): ``sizes`` elements of the (states, output,
    scratch) buffers, (total, 0, 0) when they are one buffer; ``at`` (L*D, 6, 3) int64, per layer
    and direction the (offset, rows, cols) of h, c in the states buffer (together h_n then c_n), y
    in the output buffer (the last layer's) or in the scratch (the others'), then acc, m and xg in
    the scratch; ``plans`` per direction; ``one_call``: each layer and direction is one compiled
    call (every plan one loop thread)."""

    sizes: tuple
    at: np.ndarray
    states: np.ndarray  # (2, 3): h_n's and c_n's (offset, rows, cols) ((0, 0): none)
    plans: tuple
    one_call: bool


_LAYOUTS = {}


def _settings():
    """What a call's layout depends on besides its shape: the thread count and the thresholds
    (tests move them)."""
    return (torch.get_num_threads(), matmul.USE_BLAS, launch.PARALLEL_MIN_BATCH,
            launch.PARALLEL_MIN_WORK, launch.BLAS_PARALLEL_MIN_WEIGHT_BYTES,
            launch.BLAS_PARALLEL_MIN_STEP_WORK, GROUP_MAX_BYTES)


def _layout(spec, proj, hidden, steps, batch, num_layers, directions, itemsize):
    """The :class:`_Layout` of a call, made once per shape and thread setting."""
    width = spec.gates * hidden
    key = (spec.name, proj, hidden, steps, batch, num_layers, directions, itemsize, *_settings())
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    stack, n_rows = num_layers * directions, steps * batch
    plans = tuple(launch._schedule(np.full(steps, batch, np.int64), reverse, batch, width * proj,
                                   itemsize) for reverse in (False, True)[:directions])
    h_size, c_size = batch * proj, batch * hidden if spec.has_c else 0
    scratch = [(0, 0) if spec.gates_in_y else (batch, spec.row_blocks * hidden),
               (batch, hidden) if proj != hidden else (0, 0), (n_rows, width)]
    ends = np.cumsum([-(-rows * cols // _ALIGN) * _ALIGN for rows, cols in scratch])
    y_size = -(-n_rows * proj // _ALIGN) * _ALIGN
    at = np.zeros((stack, 6, 3), np.int64)
    for k in range(stack):
        last = k >= stack - directions
        at[k, :3] = ((k * h_size, batch, proj),
                     (stack * h_size + k * c_size, c_size and batch, c_size and hidden),
                     ((k - stack + directions) * y_size if last else ends[-1] + k * y_size,
                      n_rows, proj))
        at[k, 3:] = [(end - size, rows, cols) for end, size, (rows, cols) in
                     zip(ends, np.diff(ends, prepend=0), scratch)]
    sizes = (stack * (h_size + c_size), directions * y_size,
             ends[-1] + (stack - directions) * y_size)
    if sum(sizes) * itemsize <= GROUP_MAX_BYTES:  # one buffer: states, then output, then scratch
        sizes = ((sizes[0] + _ALIGN - 1) // _ALIGN * _ALIGN, sizes[1], sizes[2])
        last = np.arange(stack) >= stack - directions
        at[:, 2, 0] += np.where(last, sizes[0], sizes[0] + sizes[1])
        at[:, 3:, 0] += sizes[0] + sizes[1]
        sizes = (sum(sizes), 0, 0)
    if len(_LAYOUTS) >= 256:
        _LAYOUTS.clear()
    states = np.array([(0, stack * batch, proj),
                       (stack * h_size, c_size and stack * batch, c_size and hidden)],
                      np.int64)
    layout = _LAYOUTS[key] = _Layout(
        tuple(int(size) for size in sizes), at, states, plans,
        all(plan.nthreads == 1 for plan in plans))
    return layout


def _region(buffer, at):
    """The (rows, cols) view of flat ``buffer`` at ``at`` = (offset, rows, cols)."""
    offset, rows, cols = at
    return buffer[offset:offset + rows * cols].reshape(rows, cols)


class _LayerArgs(NamedTuple):
    """The arguments of :func:`.loops._forward_layer` after the per-call ones, as named there."""

    gemm: int
    set_threads: int
    blas_threads: int
    group: int
    code: object
    packed: bool
    has_proj: bool
    w_ih: np.ndarray
    bias: np.ndarray
    b_hn: np.ndarray
    w_cell: np.ndarray
    w_t: np.ndarray
    wr_t: np.ndarray
    at: np.ndarray
    order: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray


class _Call(NamedTuple):
    """A stack's call of one shape: its :class:`_Layout` and, per layer and direction, the
    arguments of :func:`.loops._forward_layer` after the per-call ones."""

    layout: _Layout
    args: list


def _call(stack, steps, batch, num_layers, directions, dtype):
    """The :class:`_Call` of ``stack`` for a shape, made once per shape and thread setting."""
    key = (steps, batch, *_settings())
    call = stack.calls.get(key)
    if call is None:
        spec = cells.spec(stack.cell)
        proj, width = stack.layers[0][1].w_t.shape
        hidden = width // spec.gates
        layout = _layout(spec, proj, hidden, steps, batch, num_layers, directions, dtype.itemsize)
        gemm = matmul._gemm_address(buffers.TORCH_DTYPES[dtype])
        args = []
        for k, (w_ih, prepared) in enumerate(stack.layers):
            plan = layout.plans[k % directions]
            args.append(_LayerArgs(
                gemm, matmul.MKL_SET_THREADS_LOCAL_ADDRESS, plan.blas_threads, plan.group,
                CODES[stack.cell], spec.gates_in_y, proj != hidden, w_ih, *prepared, layout.at[k],
                *plan[:3]))
        if len(stack.calls) >= 64:
            stack.calls.clear()
        call = stack.calls[key] = _Call(layout, args)
    return call


def forward_stack(stack, x, steps, batch, h0, c0, num_layers, directions):
    """The forward of :func:`prepare_stack`'s ``stack``. x (T*B, I) C-contiguous numpy; h0 (L*D,
    B, P), c0 (L*D, B, H) numpy (None: zeros; c0 None also for cells without a cell state).
    Returns numpy ``(y (T*B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None)``."""
    dtype = x.dtype
    layout, args = _call(stack, steps, batch, num_layers, directions, dtype)
    states, ys, work = [buffers.alloc((size,), dtype) if size else None for size in layout.sizes]
    if ys is None:
        ys = work = states
    empty = buffers._empty((0, 0), dtype)
    layer_input = x
    for layer in range(num_layers):
        outputs, out = [], ys if layer == num_layers - 1 else work  # where this layer's y is
        for k in range(layer * directions, (layer + 1) * directions):
            state = (empty if h0 is None else h0[k], empty if c0 is None else c0[k])
            a = args[k]
            if not (a.gemm and layout.one_call):  # torch projects
                torch.mm(torch.from_numpy(layer_input), torch.from_numpy(a.w_ih).t(),
                         out=torch.from_numpy(_region(work, a.at[5])))
            if layout.one_call:
                _forward_layer(layer_input if a.gemm else empty, *state, states, out, work, *a)
            else:  # the plan's threads
                h, c, y = (_region(buffer, at) for buffer, at in zip((states, states, out), a.at))
                h[...] = state[0] if h0 is not None else 0
                c[...] = state[1] if c0 is not None else 0
                launch._run(_forward_thread, layout.plans[k % directions], a.gemm, a.code,
                            a.packed, _region(work, a.at[5]), a.bias, a.b_hn, a.w_cell, h, c,
                            a.w_t, a.wr_t, a.has_proj, y, y if a.packed else empty, empty,
                            _region(work, a.at[3]), _region(work, a.at[4]), a.order, a.offsets,
                            a.sizes)
            outputs.append(_region(out, a.at[2]))
        layer_input = np.concatenate(outputs, 1) if directions == 2 else outputs[0]
    h_n, c_n = (_region(states, at).reshape(num_layers * directions, batch, -1)
                if at[1] else None for at in layout.states)
    return layer_input, h_n, c_n
