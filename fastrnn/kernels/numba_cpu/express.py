"""The numba lean path's one compiled call (:func:`forward_express`): a whole stack of layers
whose loops and input projections run on the calling thread with a small scratch (a few rows,
T*B at most :data:`.launch.LIVE_MAX_ROWS`, every weight read in place: streaming; or more, on
the prepared weights: a short sequence on one thread), as :func:`.inference.forward_stack` runs
it (the same compiled calls in the same order: bitwise its results) but with no Python between
them: the weights are found by their addresses in a table made once per shape (:func:`build`),
the input and initial states by theirs, the outputs and the scratch passed in. Measured (Intel
Xeon, 1 thread): a streamed LSTM call (T=1 B=1, state carried) 15-18 µs against 23 at H=64,
79-83 against 87 at H=256 (the weights, 2 MiB, stream from L3 there); T=50 B=1 H=32 33 µs
against 40."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastrnn import cells
from fastrnn.kernels.numba_cpu import buffers, jit, loops, matmul, projection
from fastrnn.kernels.numba_cpu.jit import _JIT
from fastrnn.kernels.numba_cpu.loops import CODES, _forward_thread, _layer_start


class Express(NamedTuple):
    """A stack's calls of one shape as one compiled call (:func:`_express_forward`): ``table`` the
    int64 sizes, weight addresses and step plans it reads (:func:`build`), ``scratch`` its
    scratch's elements, ``free`` the free scratch arrays (two threads calling at once take two),
    ``code`` the cell's, ``no_c`` the (0,) array passed as c_n for cells without a cell state."""

    table: np.ndarray
    scratch: int
    free: list
    code: object
    no_c: np.ndarray


# The table's header (_H_*), then a row of _ROW per layer and direction (_R_*), then the step plans
# (per direction order, offsets, sizes: 3T). Offsets (_OFF) are in the scratch's elements, each
# part 64-byte aligned: every operand of a BLAS call is in the scratch or given, as on
# forward_stack, whose results depend on their alignment.
(_H_STEPS, _H_BATCH, _H_FEATURES, _H_HIDDEN, _H_PROJ, _H_LAYERS, _H_DIRECTIONS, _H_WIDTH,
 _H_BIASES, _H_B_HN, _H_CELL_ROWS, _H_GATES_IN_Y, _H_LIVE, _H_PANEL, _H_BLOCK_ROWS, _H_PROJECT,
 _H_GROUP, _H_GEMM, _H_XG_OFF, _H_ACC_OFF, _H_ACC_ROWS, _H_ACC_COLS, _H_M_OFF, _H_M_ROWS,
 _H_M_COLS, _H_H_OFF, _H_C_OFF, _H_C_ROWS, _H_PLANS, _HEAD) = range(30)
# Addresses of W_ih as given, and packed for the panel kernels (W_ih^T, its panels and their
# count; where they project); of W_hh^T (W_hh where read in place), its panels and their count;
# of W_hr^T (W_hr), w_cell, b_ih, b_hh; the count summed (.loops._sum_bias); addresses of the
# summed bias and b_hn; offsets in the scratch of the y of the layer and direction and of its
# layer's output ((T*B, D*P); -1: the call's output).
(_R_W_IH, _R_IH_T, _R_IH_P, _R_IH_PANELS, _R_W_T, _R_W_P, _R_PANELS, _R_WR_T, _R_W_CELL,
 _R_B_IH, _R_B_HH, _R_SUMMED, _R_BIAS, _R_B_HN, _R_Y_OFF, _R_OUT_OFF, _ROW) = range(17)
PANELS = -1  # _H_PROJECT where the panel kernels project (else the gemm's address)


def build(stack, layout, args, projections, project, steps, batch, num_layers, directions,
          dtype):
    """The :class:`Express` of a stack's calls of one shape: ``layout``, ``args`` (per layer and
    direction the loop's weights), ``projections`` (W_ih packed, or None) and ``project`` (its
    gemm's address, or :data:`PANELS`) as :func:`.inference._call` made them."""
    spec = cells.spec(stack.cell)
    (*_, w_t, _, live, _, _), width = args[0], stack.inputs[0].shape[0]
    proj, hidden, n = w_t.shape[1 if live else 0], width // spec.gates, steps * batch
    align, used = 64 // dtype.itemsize, [0]

    def take(count):  # a 64-byte aligned part of the scratch: its offset
        start = used[0]
        used[0] += -(-count // align) * align
        return start

    (acc_rows, acc_cols), (m_rows, m_cols) = layout.scratch[:2]
    c_rows = batch if spec.has_c else 0
    head = [steps, batch, stack.inputs[0].shape[1], hidden, proj, num_layers, directions, width,
            stack.biases[0][0].shape[0], args[0][3].shape[0], args[0][4].shape[0],
            spec.gates_in_y, live, matmul.PANEL_BYTES // dtype.itemsize, projection.BLOCK_ROWS,
            project, layout.plans[0].group, layout.plans[0].gemm,
            take(n * width), take(acc_rows * acc_cols), acc_rows, acc_cols,
            take(m_rows * m_cols), m_rows, m_cols, take(batch * proj), take(c_rows * hidden),
            c_rows, _HEAD + num_layers * directions * _ROW]
    rows = []
    for layer in range(num_layers):  # a layer's output: the call's, or its y, or both ys joined
        out = (-1 if layer == num_layers - 1 else take(n * 2 * proj) if directions == 2
               else None)
        for direction in range(directions):
            k = layer * directions + direction
            _, _, bias, b_hn, w_cell, w_t, w_p, _, wr_t, _ = args[k]
            ih_t, ih_p = projections[k] if projections is not None else (w_cell, w_p[:0])
            b_ih, b_hh, summed = stack.biases[k]
            y = take(n * proj)
            rows += [stack.inputs[k].ctypes.data, ih_t.ctypes.data, ih_p.ctypes.data,
                     ih_p.shape[0], w_t.ctypes.data, w_p.ctypes.data, w_p.shape[0],
                     wr_t.ctypes.data, w_cell.ctypes.data, b_ih.ctypes.data, b_hh.ctypes.data,
                     summed, bias.ctypes.data, b_hn.ctypes.data, y, y if out is None else out]
    plans = [part for plan in layout.plans for part in plan[:3]]
    table = np.concatenate([np.array(head + rows, np.int64), *plans]).astype(np.int64)
    return Express(table, used[0], [], CODES[stack.cell], buffers._empty((0,), dtype))


def forward_express(express, x, h0, c0, y, h_n, c_n):
    """The forward of a stack of :func:`build`'s ``express``, as :func:`.inference.forward_stack`'s
    (bitwise its results): x (T*B, I), h0 (L*D, B, P), c0 (L*D, B, H) C-contiguous, given by
    address (0: zeros); writes y (T*B*D*P elements), h_n (L*D*B*P) and c_n (L*D*B*H; None for
    cells without a cell state), C-contiguous numpy."""
    free = express.free
    scratch = free.pop() if free else buffers.alloc((express.scratch,), y.dtype)
    _express_forward(express.code, express.table, x, h0, c0, scratch, y, h_n,
                     express.no_c if c_n is None else c_n)
    free.append(scratch)


@intrinsic
def _view(typingctx, address, shape, like):
    """A C-contiguous array of ``shape`` (a tuple of ints) and ``like``'s dtype over the memory at
    ``address`` (int64): a view that owns nothing (no meminfo: Numba's ``carray`` would need its
    runtime to return one)."""
    if not isinstance(shape, types.UniTuple):
        return None
    result = types.Array(like.dtype, shape.count, "C")

    def codegen(context, builder, signature, args):
        # the array's fields set here: populate_array would import Numba's array module (0.05 s
        # in a process's first call)
        array = cgutils.create_struct_proxy(result)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(result.dtype)))
        dims = cgutils.unpack_tuple(builder, args[1], shape.count)
        strides, stride = [], itemsize
        for dim in reversed(dims):
            strides.insert(0, stride)
            stride = builder.mul(stride, dim)
        array.data = builder.inttoptr(args[0], context.get_data_type(result.dtype).as_pointer())
        array.shape = cgutils.pack_array(builder, dims)
        array.strides = cgutils.pack_array(builder, strides)
        array.itemsize = itemsize
        array.nitems = builder.udiv(stride, itemsize)
        array.meminfo = cgutils.get_null_value(array.meminfo.type)
        array.parent = cgutils.get_null_value(array.parent.type)
        return array._getvalue()
    return result(address, shape, like), codegen


@njit(inline="always", **_JIT)
def _part(array, offset, rows, cols):
    """The (rows, cols) view of C-contiguous ``array``'s elements from ``offset`` on (by
    :func:`_view`: Numba's reshape keeps an environment that a load from the cache rebuilds by
    importing Numba's array module, 0.05 s in a process's first call)."""
    return _view(array.ctypes.data + offset * array.itemsize, (rows, cols), array)


@njit(inline="always", **_JIT)
def _copy(dst, col, src):
    """dst[:, col:col + P] = src (N, P)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, col + j] = src[i, j]


@njit(**_JIT)
def _express_forward(code, table, x, h0, c0, scratch, y, h_n, c_n):
    """:func:`forward_express` in one compiled call: per layer and direction the input projection
    (:func:`.projection._project_thread` or the gemm of :func:`.loops._layer_start`),
    :func:`.loops._layer_start` and :func:`.loops._forward_thread` on the calling thread, as
    :func:`.inference.forward_stack` runs them (the states and y in the scratch, copied out), the
    weights read from the addresses in ``table``."""
    steps, batch, hidden, proj = table[_H_STEPS], table[_H_BATCH], table[_H_HIDDEN], table[_H_PROJ]
    directions, width, n = table[_H_DIRECTIONS], table[_H_WIDTH], steps * batch
    stack, panel, project = table[_H_LAYERS] * directions, table[_H_PANEL], table[_H_PROJECT]
    none = _part(scratch, 0, 0, 0)
    xg = _part(scratch, table[_H_XG_OFF], n, width)
    acc = _part(scratch, table[_H_ACC_OFF], table[_H_ACC_ROWS], table[_H_ACC_COLS])
    m = _part(scratch, table[_H_M_OFF], table[_H_M_ROWS], table[_H_M_COLS])
    c_rows = table[_H_C_ROWS]  # (B, H), or (0, 0) for cells without a cell state
    h = _part(scratch, table[_H_H_OFF], batch, proj)
    c = _part(scratch, table[_H_C_OFF], c_rows, hidden if c_rows else 0)
    has_proj, packed, live = proj != hidden, table[_H_GATES_IN_Y] != 0, table[_H_LIVE] != 0
    h_all, c_all = _part(h_n, 0, 1, h_n.size), _part(c_n, 0, 1, c_n.size)  # copied at k
    h0s = _view(h0, (stack if h0 else 0, batch, proj), scratch)
    c0s = _view(c0, (stack if c0 else 0, batch, hidden), scratch)
    layer_input = _view(x, (n, table[_H_FEATURES]), scratch)
    out = _part(y, 0, n, directions * proj)
    for k in range(stack):
        r, d, features = _HEAD + k * _ROW, k % directions, layer_input.shape[1]
        w_ih = _view(table[r + _R_W_IH], (width, features), scratch)
        w_t = _view(table[r + _R_W_T], (width, proj) if live else (proj, width), scratch)
        w_p = _view(table[r + _R_W_P], (table[r + _R_PANELS], proj, panel), scratch)
        wr_t = _view(table[r + _R_WR_T], ((proj, hidden) if live else (hidden, proj)) if has_proj
                     else (0, 0), scratch)
        w_cell = _view(table[r + _R_W_CELL], (table[_H_CELL_ROWS], hidden), scratch)
        b_ih = _view(table[r + _R_B_IH], (table[_H_BIASES],), scratch)
        b_hh = _view(table[r + _R_B_HH], (table[_H_BIASES],), scratch)
        bias = _view(table[r + _R_BIAS], (width,), scratch)
        b_hn = _view(table[r + _R_B_HN], (table[_H_B_HN],), scratch)
        projected = layer_input  # what _layer_start projects by the gemm: none after the panels
        if project == PANELS:
            ih_t = _view(table[r + _R_IH_T], (features, width), scratch)
            ih_p = _view(table[r + _R_IH_P], (table[r + _R_IH_PANELS], features, panel), scratch)
            projection._project_thread(0, 1, table[_H_BLOCK_ROWS], 0, xg, layer_input, ih_t,
                                       ih_p)
            projected = _view(table[r + _R_W_IH], (0, features), scratch)
        _layer_start(project, projected, w_ih, xg, h0s[k] if h0 else none,
                     c0s[k] if c0 else none, h, c, b_ih, b_hh, bias, table[r + _R_SUMMED])
        y_k = _part(scratch, table[r + _R_Y_OFF], n, proj)
        p = table[_H_PLANS] + d * 3 * steps
        _forward_thread(0, 1, table[_H_GROUP], table[_H_GEMM], table[:0], code, packed, xg,
                        bias, b_hn, w_cell, h, c, w_t, w_p, live, wr_t, has_proj, y_k,
                        y_k if packed else none, none, acc, m, table[p:p + steps],
                        table[p + steps:p + 2 * steps], table[p + 2 * steps:p + 3 * steps])
        _copy(h_all, k * h.size, _part(h, 0, 1, h.size))
        _copy(c_all, k * c.size, _part(c, 0, 1, c.size))
        out_off = table[r + _R_OUT_OFF]
        layer_out = out if out_off < 0 else _part(scratch, out_off, n, directions * proj)
        if out_off != table[r + _R_Y_OFF]:  # the call's output, or both directions' ys joined
            _copy(layer_out, d * proj, y_k)
        if d == directions - 1:
            layer_input = layer_out


# Its cache entries keyed also by the files it compiles in (the loops' and the projection's)
_express_forward._cache = jit.KeyedCache(_express_forward.py_func, (
    *loops._INLINED, str(loops.__file__), str(projection.__file__)))
