"""The compiled time loops, one forward and one BPTT loop for every cell; each runs one thread's
rows of a whole (possibly packed) sequence and inlines the cell's own row step (the "numba step
math" section of its file in :mod:`fastrnn.cells`), picked at compile time by the cell's code."""
from __future__ import annotations

from numba import literally, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from fastrnn import cells
from fastrnn.cells import scalar
# activations: the tanh/sigmoid overloads; all four: compiled into the loops (_INLINED)
from fastrnn.kernels.numba_cpu import activations, jit, matmul, team, vectors
from fastrnn.kernels.numba_cpu.jit import _JIT, _prefer_wide_vectors
from fastrnn.kernels.numba_cpu.matmul import _matmul_rows
from fastrnn.kernels.numba_cpu.team import barrier

# --------------------------------------------------------------------------- cells
# A cell reaches the loops as its ``SPEC.code`` typed as a literal (a :class:`CellCode`), and the
# loops call ``forward_step(literally(code), ...)``: the overload below resolves the literal to the
# cell's compiled row step, so each cell gets its own specialization of the one loop, which loads
# from Numba's disk cache like any module-level function (a step function passed as an argument
# or closed over in a factory never loads from it: shared/notes/cpu-kernels.md).


class CellCode:
    """A cell's code as a loop argument, typed by Numba as ``Literal[int](code)`` (through
    ``_numba_type_``, which the dispatcher reads in its C fast path: about 1 µs a call). A plain
    int would be typed int64, and ``literally`` would retype every call (12 ms)."""

    __slots__ = ("value", "_numba_type_")

    def __init__(self, value):
        self.value = value
        self._numba_type_ = types.literal(value)

    def __index__(self):
        return self.value


#: name -> :class:`CellCode` of every cell that has numba step math.
CODES = {}
_STEPS = {}  # code -> (forward, backward) row steps, inlined where called
for _name, _module in cells.MODULES.items():
    if hasattr(_module, "numba_forward"):
        CODES[_name] = CellCode(_module.SPEC.code)
        _STEPS[_module.SPEC.code] = tuple(njit(inline="always", **_JIT)(fn) for fn in (
            _module.numba_forward, _module.numba_backward))
        for _fn in (_module.numba_forward, _module.numba_backward):  # callable from another step
            register_jitable(inline="always", **_JIT)(_fn)


def forward_step(code, a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    """Batch row ``b`` (packed row ``q``) of a step of cell ``code`` (an integer literal): the
    cell's ``numba_forward`` with these arguments. ``a[r]``: the row's gate row, on entry the
    matmul's h W_hh^T in its first G*H columns, on exit what backward reads (saved when training);
    ``xg[q]``, ``bias``, ``b_hn``; ``h[b]``: the state before the step (the loop copies the output
    into h after the step); ``c[b]``: the cell state, updated in place; ``out[o]``: receives the
    step's output h' (y's row q, or m's row b ahead of a projection), except where the gate row
    is the output row (``SPEC.gates_in_y``): the step activates ``a[r]`` in place (a loop
    reading ``a[r]`` and writing ``out[o]``, the same row, would fail its alias check and run
    scalar: 1.5x slower RNN inference)."""
    raise NotImplementedError  # only jitted code calls it, through the overload below


def backward_step(code, gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                  w_cell, d_xg, d_hn, dg):
    """Batch row ``b`` (packed row ``q``) of a step of cell ``code`` in BPTT: the cell's
    ``numba_backward`` with these arguments. Row q of what forward kept (``gates``, ``c_all``) and
    of ``y``; the states before the step, ``h_prev[hr]`` (y or h0) and ``c_prev[cr]`` (c_all or
    c0); row b of ``dm`` (the gradient w.r.t. the step's output), ``dh`` (where the step leaves the
    gradient w.r.t. h outside the matmul, with ``direct_h``) and ``dc`` (in: w.r.t. c', out: w.r.t.
    c); ``tc[tr]``: a scratch row, m_all's row q with ``proj``; the step writes ``d_xg[q]`` and,
    where the cell has b_hn, ``d_hn[q]`` and ``dg[b]`` (the step matmul's operand)."""
    raise NotImplementedError  # only jitted code calls it, through the overload below


# Each overload returns the cell's step, both inlined into the loop (Numba IR): a call per row
# would pass its arrays with a reference-count increment and decrement each (atomics: the LSTM
# at B=1 H=32 ran 1.5x slower). The arguments are spelled out: Numba does not inline a call with
# *args.
@overload(forward_step, jit_options=_JIT, inline="always")
def _forward_step(code, a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    if isinstance(code, types.IntegerLiteral):
        step = _STEPS[code.literal_value][0]

        def impl(code, a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
            _prefer_wide_vectors()
            step(a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o)
        return impl
    return None


@overload(backward_step, jit_options=_JIT, inline="always")
def _backward_step(code, gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                   w_cell, d_xg, d_hn, dg):
    if isinstance(code, types.IntegerLiteral):
        step = _STEPS[code.literal_value][1]

        def impl(code, gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                 w_cell, d_xg, d_hn, dg):
            _prefer_wide_vectors()
            step(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj, w_cell,
                 d_xg, d_hn, dg)
        return impl
    return None


@intrinsic
def _borrowed(typingctx, arrays):
    """The arrays of the tuple ``arrays`` without reference counting (meminfo and parent null): the
    inlined row step binds its array arguments anew each row, which otherwise costs an atomic
    increment and decrement per array (up to 14 a row: +25-80 ns a row measured). The caller's
    references keep the arrays alive for the call."""
    def codegen(context, builder, signature, args):
        views = []
        for i, ty in enumerate(signature.args[0]):
            ary = cgutils.create_struct_proxy(ty)(context, builder,
                                                  value=builder.extract_value(args[0], i))
            ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
            ary.parent = cgutils.get_null_value(ary.parent.type)
            views.append(ary._getvalue())
        return context.make_tuple(builder, signature.return_type, views)
    return arrays(arrays), codegen


# --------------------------------------------------------------------------- time loops
# How the pointwise work is written (each choice measured here, LSTM/GRU rows of H = 32 … 128):
# * rows are indexed in the 2-D arrays (``a[r, j]``), never taken as row views: a view costs a
#   reference-count increment and decrement per row (atomics), which was 6x the LSTM backward's
#   arithmetic at H = 32;
# * each loop writes one array and never reads the array it writes at another offset, so LLVM
#   vectorizes it with a few runtime alias checks (a loop writing several arrays stayed scalar,
#   4x slower on the LSTM gates);
# * constants are of the array's dtype (``scalar.one``): an int literal would promote float32 to
#   float64.
# The cells' row steps follow the same rules.
#
# Arguments shared by the loops: ``code`` the cell (:class:`CellCode`); ``order`` (T,) steps in
# processing order, ``offsets``/``sizes`` (T,) packed row offset and batch size of each step;
# (tid, nthreads, group) pick this thread's rows; ``has_proj``: LSTM's projection ``w_hr``, whose
# matmul follows the row step (its input ``m``, o tanh(c), is then the step's output).
#
# Forward: xg (N, G*H), bias (G*H,), b_hn (H,) or (0,) where the cell has none, w_cell (K, H) the
# cell's own per-unit weights or (0, 0) (``SPEC.cell_weights``; backward too); h (B, P) and c
# (B, H) or (0, 0) the states, updated in place; w_t (P, G*H) and wr_t (H, P) the transposed
# weights, or with ``live`` W_hh (G*H, P) and W_hr (P, H) themselves, read in place (a call of a
# few rows: nothing derived from the weights, :func:`.launch.live`); y (N, P). Each step runs the
# matmul into the row's gate row ``a[r]`` (``row_blocks`` blocks of H), then the row step. With
# ``packed`` the gate rows are the packed rows of ``gates`` (N, ·): kept for backward (training),
# or y itself for cells whose gate row is their output (the RNNs: activated in place); else they
# are the per-row scratch ``acc`` (B, ·). ``c_all`` (N, H) receives the cell state after each
# step where it is kept, else it is (0, 0).
#
# Backward: ``prev`` (N,) is the packed row of each row's previous state in processing order, or
# -1 - b when it is the initial state h0[b] / c0[b]; ``dh``/``dc`` (B, ·) carry the gradient
# w.r.t. each row's current state: on entry grad_h_n / grad_c_n, on exit d_h0 / d_c0. ``dm`` (B, H)
# is the gradient w.r.t. the row step's output: dh + grad_y, through w_hr with a projection (whose
# (N, P) input ``dy_all`` and (N, H) m_all are kept for d_w_hr). The step matmul's operand is
# d_xg's rows, or with ``scratch_grad`` the step's own ``dg`` (B, G*H) (GRU: r scales the n part);
# with ``direct_h`` it adds onto what the row step left in dh, else it overwrites dh.
#
# Thread ``tid`` of ``nthreads`` owns the groups of ``group`` batch rows dealt to it round-robin
# (rows tid*group.., then (tid+nthreads)*group..); a step's active rows are those below ``rows``.
# Its row steps and the projection's matmul take only those rows. The step matmul over W_hh too,
# unless ``counter`` has elements (the column-split plan): then each thread computes every row's
# columns of its part of the weight panels, and the threads meet at a barrier after it and at
# the end of each step (:mod:`.team`; ``counter`` zero at the call's start).

@njit(**_JIT)
def _forward_thread(tid, nthreads, group, gemm, counter, code, packed, xg, bias, b_hn, w_cell, h,
                    c, w_t, w_p, live, wr_t, has_proj, y, gates, c_all, acc, m, order, offsets,
                    sizes):
    _prefer_wide_vectors()
    xg, bias, b_hn, w_cell, h, c, y, gates, c_all, acc, m = _borrowed((
        xg, bias, b_hn, w_cell, h, c, y, gates, c_all, acc, m))
    out = m if has_proj else y  # the row step's output: the projection's input, or y itself
    split = counter.shape[0] > 0
    arrivals = 0
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        a, base = (gates, off) if packed else (acc, 0)
        if split:
            _matmul_rows(a, base, h, 0, w_t, w_p, 0, 1, max(rows, 1), rows, 0, True, tid,
                         nthreads)
            arrivals += nthreads
            barrier(counter, arrivals)
        else:
            _matmul_rows(a, base, h, 0, w_t, w_p, tid, nthreads, group, rows, gemm, True, 0, 1,
                         live)
        for g in range(tid * group, rows, nthreads * group):  # this thread's row groups
            for b in range(g, min(g + group, rows)):
                q = off + b
                forward_step(literally(code), a, base + b, xg, q, bias, b_hn, w_cell, h, c, b,
                             out, b if has_proj else q)
                for u in range(c_all.shape[1]):
                    c_all[q, u] = c[b, u]
                if not has_proj:
                    for k in range(h.shape[1]):
                        h[b, k] = y[q, k]
        if has_proj:
            _matmul_rows(y, off, m, 0, wr_t, w_p[:0], tid, nthreads, group, rows, gemm, True, 0,
                         1, live)
            for g in range(tid * group, rows, nthreads * group):
                for b in range(g, min(g + group, rows)):
                    for k in range(h.shape[1]):
                        h[b, k] = y[off + b, k]
        if split:
            arrivals += nthreads
            barrier(counter, arrivals)


@njit(**_JIT)
def _sum_bias(b_ih, b_hh, bias, summed):
    """bias (G*H,) = b_ih + b_hh in its first ``summed`` elements, b_ih + 0 beyond (GRU: b_hh's
    n part is b_hn), as :func:`fastrnn.functional.projection_bias` adds them (bitwise); nothing
    where b_ih is (0,) (no biases: bias stays zeros). The lean paths run it each call, reading
    the biases in place."""
    zero = b_ih.dtype.type(0)
    for j in range(b_ih.shape[0]):
        bias[j] = b_ih[j] + (b_hh[j] if j < summed else zero)


@njit(**_JIT)
def _layer_start(gemm, x, w_ih, xg, h0, c0, h, c, b_ih, b_hh, bias, summed):
    """What a layer's forward loop needs first, in one small compiled call (the lean inference
    path; the loop itself stays the one :func:`_forward_thread`): the bias by :func:`_sum_bias`,
    h (B, P) and c (B, H) or (0, 0) set from h0 and c0 ((0, 0): zeros) and, where x has rows,
    xg = x @ w_ih^T (x (N, I), w_ih (G*H, I), read in place) by
    :func:`.matmul._project_in_place`, as the full path's :func:`.projection.project`."""
    _sum_bias(b_ih, b_hh, bias, summed)
    for b in range(h.shape[0]):
        for k in range(h.shape[1]):
            h[b, k] = h0[b, k] if h0.shape[0] else 0
        for u in range(c.shape[1]):
            c[b, u] = c0[b, u] if c0.shape[0] else 0
    if x.shape[0]:
        matmul._project_in_place(gemm, xg, x, w_ih)


@njit(**_JIT)
def _backward_thread(tid, nthreads, group, gemm, counter, code, grad_y, y, h0, c0, gates, c_all, w,
                     w_p, wr, w_cell, has_proj, scratch_grad, direct_h, dh, dc, dm, d_xg, d_hn, dg,
                     dy_all, m_all, tc, prev, order, offsets, sizes):
    """``tc`` (B, H), or (0, 0) with a projection: the row step's scratch (LSTM: tanh(c)), per
    packed row in ``m_all`` with a projection (where it becomes m = o tanh(c))."""
    _prefer_wide_vectors()
    grad_y, y, h0, c0, gates, c_all, w_cell, dh, dc, dm, d_xg, d_hn, dg, dy_all, m_all, tc = \
        _borrowed((grad_y, y, h0, c0, gates, c_all, w_cell, dh, dc, dm, d_xg, d_hn, dg, dy_all,
                   m_all, tc))
    tanh_c = m_all if has_proj else tc
    split = counter.shape[0] > 0
    arrivals = 0
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        if has_proj:  # carry + grad_y, kept per packed row for d_w_hr; dm = that @ w_hr
            for g in range(tid * group, rows, nthreads * group):
                for b in range(g, min(g + group, rows)):
                    for k in range(dh.shape[1]):
                        dy_all[off + b, k] = dh[b, k] + grad_y[off + b, k]
            _matmul_rows(dm, 0, dy_all, off, wr, w_p[:0], tid, nthreads, group, rows, gemm, True)
        for g in range(tid * group, rows, nthreads * group):  # this thread's row groups
            for b in range(g, min(g + group, rows)):
                q = off + b
                if not has_proj:
                    for u in range(dm.shape[1]):
                        dm[b, u] = dh[b, u] + grad_y[q, u]
                pr = prev[q]
                h_prev, hr = (y, pr) if pr >= 0 else (h0, -1 - pr)
                c_prev, cr = (c_all, pr) if pr >= 0 else (c0, -1 - pr)
                backward_step(literally(code), gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh,
                              dc, b, tanh_c, q if has_proj else b, has_proj, w_cell, d_xg,
                              d_hn, dg)
        operand, base = (dg, 0) if scratch_grad else (d_xg, off)
        if split:
            arrivals += nthreads
            barrier(counter, arrivals)
            _matmul_rows(dh, 0, operand, base, w, w_p, 0, 1, max(rows, 1), rows, 0, not direct_h,
                         tid, nthreads)
            arrivals += nthreads
            barrier(counter, arrivals)
        else:
            _matmul_rows(dh, 0, operand, base, w, w_p, tid, nthreads, group, rows, gemm,
                         not direct_h)


# The loops on each thread of torch's OpenMP team (:mod:`.team`, the multi-threaded plans); the
# arguments as the loops', without tid. Spelled out: a jitted function taking *args costs ~30 µs
# a call to dispatch.
_forward_in_team, _backward_in_team = map(team.in_team, (_forward_thread, _backward_thread))


@njit(**_JIT)
def _forward_team(nthreads, group, gemm, counter, code, packed, xg, bias, b_hn, w_cell, h, c, w_t,
                  w_p, live, wr_t, has_proj, y, gates, c_all, acc, m, order, offsets, sizes):
    _forward_in_team(code, (nthreads, group, gemm, counter, packed, xg, bias, b_hn, w_cell, h, c,
                            w_t, w_p, live, wr_t, has_proj, y, gates, c_all, acc, m, order,
                            offsets, sizes))


@njit(**_JIT)
def _backward_team(nthreads, group, gemm, counter, code, grad_y, y, h0, c0, gates, c_all, w, w_p,
                   wr, w_cell, has_proj, scratch_grad, direct_h, dh, dc, dm, d_xg, d_hn, dg,
                   dy_all, m_all, tc, prev, order, offsets, sizes):
    _backward_in_team(code, (nthreads, group, gemm, counter, grad_y, y, h0, c0, gates, c_all, w,
                             w_p, wr, w_cell, has_proj, scratch_grad, direct_h, dh, dc, dm, d_xg,
                             d_hn, dg, dy_all, m_all, tc, prev, order, offsets, sizes))


team.LOOPS.update({_forward_thread: _forward_team, _backward_thread: _backward_team})


# A loop's cache entries are keyed also by what it compiles in from other files (the cells' step
# math, the activations, the matmul, the compile settings): an edit there must not load a stale
# loop.
_INLINED = tuple(str(cells.MODULES[name].__file__) for name in CODES) + tuple(
    str(module.__file__) for module in (activations, matmul, scalar, team, vectors))
for _loop in (_forward_thread, _layer_start, _backward_thread, _forward_team, _backward_team):
    _loop._cache = jit.KeyedCache(_loop.py_func, _INLINED)


@njit(**_JIT)
def _previous_rows(order, offsets, sizes, prev):
    """prev[offsets[t] + b] = packed row of row b's state before step t (the row it had at the
    previous step in processing order), or -1 - b where that is the initial state."""
    for p in range(order.shape[0]):
        t = order[p]
        off = offsets[t]
        if p == 0:
            for b in range(sizes[t]):
                prev[off + b] = -1 - b
        else:
            tp = order[p - 1]
            for b in range(sizes[t]):
                prev[off + b] = offsets[tp] + b if b < sizes[tp] else -1 - b


@njit(**_JIT)
def _gather_rows(src, init, prev, out):
    """out[n] = src[prev[n]] if prev[n] >= 0 else init[-1 - prev[n]] (out: (N, P))."""
    _prefer_wide_vectors()
    for n in range(prev.shape[0]):
        pr = prev[n]
        rows, row = (src, pr) if pr >= 0 else (init, -1 - pr)
        for k in range(out.shape[1]):
            out[n, k] = rows[row, k]

