"""Launchers of the numba backend (the kernel contract of :mod:`fastrnn.kernels.reference`): argument checks,
the thread plan, buffers, and the compiled loops of :mod:`.loops`."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from fastrnn import cells
from fastrnn.kernels.numba_cpu import bptt, buffers, matmul, team
from fastrnn.kernels.numba_cpu.checks import _check, _check_backward
from fastrnn.kernels.numba_cpu.loops import (CODES, _backward_thread, _forward_thread,
                                             _gather_rows, _previous_rows)

# How a call uses torch.get_num_threads() threads (measured on the 2-core AMD EPYC, module calls,
# 2 threads, interleaved with torch.nn's). Multi-threaded loops that make no BLAS call run in
# torch's own OpenMP team (:mod:`.team`; where there is none, on a pool of Python threads):
# torch's workers spin for milliseconds after each parallel region (the input projection, the
# model's other layers) and a thread of ours then waited behind them (LSTM T=100 B=64 H=128
# inference, pool 17.0 ms, team 10.5; GRU training 42.3 / 28.5).
# * split the batch rows over the threads (each runs the whole time loop for its rows, no barrier)
#   when the batch has at least PARALLEL_MIN_BATCH rows; on the pool only where the recurrent
#   matmul has at least PARALLEL_MIN_WORK multiply-adds (T*B*G*H*P) in all (in the team at any
#   size: LSTM T=200 B=64 H=32 training 12.6 -> 8.3 ms, inference 2.55 -> 2.00 against the
#   threshold; nothing measured lost);
# * else, where the step matmul runs in the panel kernels, split each step's columns (the weight
#   panels) over the threads (the row steps still split the rows), two barriers a step, from
#   SPLIT_MIN_STEP_WORK multiply-adds a step (B*G*H*P) without a backward (LSTM H=128 B=1 1.10x,
#   H=256 B=8 1.76x, H=512 B=16 1.60x one thread; H=64 B=4 lost, 0.79x), SPLIT_MIN_STEP_WORK_
#   TRAINING with one (LSTM T=100 B=4-16 H=128-512 1.20-1.34x; RNN, GRU 0.9-1.3x from 2^16 up,
#   within the noise where the work is under 2^19; RNN H=128 B=1 0.90x);
# * else one loop thread; its per-step BLAS call (where it makes one) uses torch's threads (MKL's
#   OpenMP team) when the weights take at least BLAS_PARALLEL_MIN_WEIGHT_BYTES (more than one
#   core's L2) or a step has at least BLAS_PARALLEL_MIN_STEP_WORK multiply-adds (B*G*H*P): LSTM
#   B=1 H=512 2.0x, B=8 H=512 1.5x one thread; smaller steps lost (RNN B=64 H=128 0.5x).
PARALLEL_MIN_BATCH = 32
PARALLEL_MIN_WORK = 250_000_000
SPLIT_MIN_STEP_WORK = 1 << 17
SPLIT_MIN_STEP_WORK_TRAINING = 1 << 16
BLAS_PARALLEL_MIN_WEIGHT_BYTES = 1 << 20
BLAS_PARALLEL_MIN_STEP_WORK = 4_000_000
# A step's recurrent matmul runs in the Numba micro-kernels, not a BLAS gemm call, where a loop
# thread has at most PANELS_MAX_ROWS rows (panel kernels, matmul.USE_PANELS; calls of at least
# PANELS_MIN_STEPS steps: packing copies the weights per call, and streamed training lost 9-18% a
# call to it), or MICROKERNEL_MAX_ROWS without panels where the gemm call would run on one thread.
# AMD EPYC Zen 4, module times MKL / ours: unpacked B=1 1.04-1.42, B=8 0.96-1.12, B=64 0.68-0.91;
# panels B=16 1.04-1.31, B=64 0.85-1.20, and on one thread against MKL on two 1.23-1.76
# (bench/results/panel-kernels-zen4.md; bench/numba_profile.py --matmul measures another CPU).
MICROKERNEL_MAX_ROWS = 8
PANELS_MAX_ROWS = 1 << 30
PANELS_MIN_STEPS = 16
# A call of at most LIVE_MAX_ROWS rows in all (T*B: streaming, one step of a few rows) reads its
# weights in place (W_ih, W_hh and W_hr as given: one row in dot products of their rows,
# vectors._dot_row, more rows through the BLAS gemm transposing them, torch.mm(x, w.t())'s call):
# nothing derived from them, so the lean paths need not check that copies still match the weights
# (fastrnn.weight_cache, a pass over twice their bytes). LSTM H=256, one streamed call: 60 µs, 106
# with the copies checked (AMD EPYC Zen 4, 1 thread). :func:`live`.
LIVE_MAX_ROWS = 8
# Rows dealt to a thread at a time: a block of the panel kernels (8 rows with AVX-512, 4 with
# AVX2; the other micro-kernels take 4 a pass). Against 4 on the Intel Xeon (family 6 model 167),
# 2 threads, row split, module calls: LSTM B=64 H=32-512 1.02-1.35x inference, 1.02-1.12x
# training; H=51 B=97 1.04x / 1.07x.
ROW_GROUP = matmul.PANEL_ROWS


_POOL = None
_POOL_LOCK = threading.Lock()
# CPUs this process may run on (the affinity mask, as torch counts them).
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Plan(NamedTuple):
    """How one call runs: the steps (``order``, ``offsets``, ``sizes``: int64 (T,)) and the threads
    (``nthreads`` loop threads splitting the rows in groups of ``group``; ``blas_threads`` threads
    for each BLAS call, 0 for MKL's global setting, which is torch's thread count) and the step
    matmul (``gemm``: address of the BLAS gemm it calls, 0 for the Numba micro-kernels;
    ``panels``: the micro-kernels read the weights packed in panels, :func:`.matmul.panels`)."""

    order: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    nthreads: int
    group: int
    blas_threads: int
    rows: int  # N = sum(sizes), rows of the packed layout
    gemm: int
    panels: bool
    split: bool = False  # the column split: each step's matmul columns over the nthreads threads
    live: bool = False  # the weights read in place (:func:`live`): W_hh, W_hr not transposed


def _run(loop, plan, *args):
    """Run ``loop(tid, nthreads, group, gemm, *args)`` for tid = 0 … nthreads-1 of ``plan``: tid 0
    on the calling thread, the others in torch's OpenMP team (the loops of :data:`.team.LOOPS`,
    in a plan without BLAS calls, where :data:`.team.AVAILABLE`) or on a persistent pool of
    Python threads (the loops are compiled ``nogil``; one hand-off per call). Each thread's BLAS
    calls use ``plan.blas_threads`` threads (MKL's thread-local setting): threads never multiply."""
    global _POOL
    nthreads = plan.nthreads
    if nthreads > 1 and loop in team.LOOPS and team.AVAILABLE and not plan.gemm:
        team.LOOPS[loop](nthreads, plan.group, plan.gemm, *args)
        return
    if nthreads == 1:
        _run_one(loop, 0, plan, args)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < nthreads - 1:
            _POOL = ThreadPoolExecutor(max_workers=nthreads - 1, thread_name_prefix="fastrnn-numba")
        pool = _POOL
    futures = [pool.submit(_run_one, loop, tid, plan, args) for tid in range(1, nthreads)]
    try:
        _run_one(loop, 0, plan, args)
    finally:
        for future in futures:
            future.result()


def _run_one(loop, tid, plan, args):
    gemm = plan.gemm
    if gemm and plan.blas_threads and matmul._MKL_SET_THREADS_LOCAL is not None:
        previous = matmul._MKL_SET_THREADS_LOCAL(plan.blas_threads)
        try:
            loop(tid, plan.nthreads, plan.group, gemm, *args)
        finally:
            matmul._MKL_SET_THREADS_LOCAL(previous)
    else:
        loop(tid, plan.nthreads, plan.group, gemm, *args)


_STEPS = {}


def _checked_steps(sizes, batch, reverse):
    """(order, offsets, sizes) of int64 ``sizes`` (:func:`_plan_steps`), checked; made once per
    distinct steps (a training loop repeats its predecessor's) and shared by the calls with the
    same steps: the loops only read them (read-only flags would make numba compile them again)."""
    key = (sizes.tobytes(), sizes.ndim, batch, reverse) if sizes.size <= 4096 else None
    steps = _STEPS.get(key)
    if steps is None:
        ok, order, offsets = _plan_steps(sizes.reshape(-1), batch, reverse)
        if sizes.ndim != 1 or not ok:
            raise ValueError(f"batch_sizes must be non-increasing with batch_sizes[0] = {batch} "
                             f"(rows of h0), got {sizes.tolist()}")
        steps = order, offsets, sizes.copy()  # a copy: the caller's tensor may change
        if key is not None:
            if len(_STEPS) >= 256:
                _STEPS.clear()
            _STEPS[key] = steps
    return steps


def _plan_steps(sizes, batch, reverse):
    """(ok, order, offsets) of batch sizes (T,): ok when they are non-increasing, none negative and
    the first equals ``batch``; order (T,) the steps in processing order; offsets (T,) the packed
    row offset of each step. NumPy, not compiled: made once per distinct steps, and a compiled
    version would import Numba's array module (0.05 s) into every process's first call."""
    steps = sizes.shape[0]
    ok = steps == 0 or (sizes[0] == batch and bool((sizes >= 0).all())
                        and bool((sizes[1:] <= sizes[:-1]).all()))
    offsets = np.cumsum(sizes) - sizes
    order = np.arange(steps - 1, -1, -1) if reverse else np.arange(steps)
    return ok, order.astype(np.int64, copy=False), offsets.astype(np.int64, copy=False)


def live(rows):
    """Whether a call of ``rows`` rows in all (T*B) reads its weights in place (LIVE_MAX_ROWS;
    where torch exports a BLAS gemm): the input projection, the step matmul and LSTM's projection
    on W_ih, W_hh and W_hr as given (:func:`.matmul._matmul_rows` with ``transposed``)."""
    return matmul.USE_BLAS and rows <= LIVE_MAX_ROWS


def _schedule(batch_sizes, reverse, batch, width, proj, itemsize, inference=False):
    """The :class:`_Plan` of a call whose recurrent weights W_hh are (``width``, ``proj``) = (G*H,
    P) of ``itemsize`` bytes (the step matmul: G*H*P multiply-adds per row); ``inference``: no
    backward follows.

    Checks the batch sizes (the loops index without bounds checks): non-increasing, the first equal
    to ``batch``, none negative."""
    if isinstance(batch_sizes, torch.Tensor) and batch_sizes.dtype == torch.int64:
        sizes = batch_sizes.contiguous().numpy()
    else:
        sizes = np.ascontiguousarray(np.asarray(batch_sizes), dtype=np.int64)
    order, offsets, sizes = _checked_steps(sizes, batch, reverse)
    threads = min(torch.get_num_threads(), _CPUS)
    row_work = width * proj
    rows = int(offsets[-1] + sizes[-1]) if len(sizes) else 0
    gemm = matmul._gemm_address(torch.float32 if itemsize == 4 else torch.float64)
    # MKL's global thread count is torch's: leave it (0) on one thread or where BLAS threads pay.
    keep = threads == 1 or (row_work * itemsize >= BLAS_PARALLEL_MIN_WEIGHT_BYTES
                            or batch * row_work >= BLAS_PARALLEL_MIN_STEP_WORK)
    if live(rows):
        return _Plan(order, offsets, sizes, 1, max(1, batch), 0 if keep else 1, rows, gemm, False,
                     live=True)
    panels = matmul.USE_PANELS and len(sizes) >= PANELS_MIN_STEPS
    most = PANELS_MAX_ROWS if panels else MICROKERNEL_MAX_ROWS
    kernels = -(-batch // threads) <= most  # split rows: the micro-kernels, no BLAS call
    if threads >= 2 and batch >= PARALLEL_MIN_BATCH and (
            kernels and team.AVAILABLE or rows * row_work >= PARALLEL_MIN_WORK):
        # BLAS: one contiguous block of rows per thread (one gemm per step); micro-kernel: groups
        # of ROW_GROUP rows dealt round-robin, which balances packed batches.
        if kernels:
            gemm = 0
        group = ROW_GROUP if batch >= ROW_GROUP * threads and not gemm else -(-batch // threads)
        return _Plan(order, offsets, sizes, min(threads, -(-batch // group)), group, 1, rows,
                     gemm, panels and not gemm)
    # Column split: every thread a share of the panels of W_hh^T (forward) and W_hh (backward)
    parts = min(threads, min(width, proj) * itemsize // matmul.PANEL_BYTES)
    if (team.AVAILABLE and panels and parts >= 2
            and batch * row_work >= (SPLIT_MIN_STEP_WORK if inference
                                     else SPLIT_MIN_STEP_WORK_TRAINING)):
        group = ROW_GROUP if batch >= ROW_GROUP * parts else max(1, -(-batch // parts))
        return _Plan(order, offsets, sizes, parts, group, 1, rows, 0, True, True)
    if batch <= most and (threads == 1 or not keep or panels):
        gemm = 0
    return _Plan(order, offsets, sizes, 1, max(1, batch), 0 if keep else 1, rows, gemm,
                 panels and not gemm)


def _weight_grad(d_pre, y, h0, prev):
    """``d_pre^T @ h_prev``: a weight gradient summed over all steps in one GEMM (fixed order, no
    atomics). d_pre: (N, K) gradient of each row's pre-activations; h_prev (N, P): the state each
    row had before its step (y's row of the previous step or h0's, gathered by ``prev``, the rows
    of :func:`.loops._previous_rows`). One step (streaming) reads h0 in place. Gathered, not two
    GEMMs on y in place (h0's rows, then an addmm of the others): LSTM T=50 B=8, Intel Xeon, 1
    thread, H=512 5.4 against 8.3 ms (torch's addmm ran 1.5x its mm), H=128 0.35 against 0.39."""
    if d_pre.shape[0] == h0.shape[0]:
        return d_pre.t() @ h0
    y_a = buffers.array(y)
    h_prev = buffers.alloc((prev.shape[0], h0.shape[1]), y_a.dtype)
    _gather_rows(y_a, buffers.array(h0), prev, h_prev)
    return d_pre.t() @ torch.from_numpy(h_prev)


def _sums(a):
    """The column sums of numpy ``a`` (N, C) as a tensor (:func:`.bptt.column_sums`)."""
    out = buffers.alloc((a.shape[1],), a.dtype)
    bptt.column_sums(a, out)
    return torch.from_numpy(out)


def make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None, w_cell=None,
              inference=False):
    """The checked :class:`_Plan` of a call (arguments as :func:`recurrence_forward`; ``inference``:
    no backward follows): the argument checks and the schedule, made once per call.
    :class:`fastrnn.Recurrence` hands it to the forward and to the backward (``plan=``), which then
    neither check nor schedule again."""
    plan = _schedule(batch_sizes, reverse, h0.shape[0], w_hh.shape[0], h0.shape[1],
                     w_hh.element_size(), inference)
    _check(cell, xg, h0, c0, w_hh, b_hn, w_hr, plan.rows, bias, w_cell)
    return plan


def recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=True,
                       bias=None, w_cell=None, plan=None):
    """One layer, one direction, whole (possibly packed) sequence (kernel contract of
    :func:`fastrnn.kernels.reference.recurrence_forward`).

    xg: (N, G*H); h0: (B, P); c0: (B, H) (lstm) or None; w_hh: (G*H, P); b_hn: (H,) (gru) or None;
    w_hr: (P, H) (lstm with projection) or None; batch_sizes: int64 (T,), non-increasing, B =
    batch_sizes[0], N = sum(batch_sizes); bias: (G*H,) or None, added to every row of xg;
    w_cell: (K, H), the cell's own per-unit weights (peephole_lstm), else None; plan: the call's
    :func:`make_plan`, made here when None. float32 or float64 CPU tensors, all of one dtype.

    Returns ``(y, h_n, c_n, saved)``: y (N, P), h_n (B, P), c_n (B, H) or None, and ``saved``:
    () whenever ``save`` is False (no backward follows), else what the cell's ``SPEC.saved``
    names: () for rnn_*; (gates (N, 4H) = i, f, g, o after activation; c (N, H) cell state after
    each step) for lstm; (gates (N, 4H) = r, z, h W_hn^T + b_hn, n) for gru.
    """
    plan = plan or make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                             w_cell, not save)
    y, h, c, saved = run_forward(cell, plan, buffers.array(xg),
                                 buffers.prepare(cell, w_hh, b_hn, w_hr, bias, w_cell,
                                                 plan.panels, plan.live),
                                 buffers.array(h0), None if c0 is None else buffers.array(c0),
                                 save)
    return (torch.from_numpy(y), torch.from_numpy(h), None if c0 is None else torch.from_numpy(c),
            tuple(map(torch.from_numpy, saved)))


def run_forward(cell, plan, xg, prepared, h0, c0, save):
    """The forward time loop on numpy arrays: xg (N, G*H); h0 (B, P), c0 (B, H) (cells with a cell
    state) or None: zeros. Returns ``(y (N, P), h_n (B, P), c_n (B, H) or (0, 0), saved)``, ``saved``
    the arrays the cell's ``SPEC.saved`` names when ``save``, else ()."""
    spec = cells.spec(cell)
    dtype = xg.dtype
    proj, width = prepared.w_t.shape[::-1] if plan.live else prepared.w_t.shape
    hidden = width // spec.gates
    n_rows, batch = xg.shape[0], len(h0) if h0 is not None else int(plan.sizes[0])
    has_proj = prepared.wr_t.size > 0
    # The steps' gate rows: y itself where they are the output (the RNNs, activated in place);
    # else kept for backward when training (spec.saved: "gates", then "c", the cell state after
    # each step), or a scratch row per batch row.
    save = save and bool(spec.saved)
    rows = spec.row_blocks * hidden
    gates = (0, 0) if spec.gates_in_y or not save else (n_rows, rows)
    acc = (0, 0) if spec.gates_in_y or save else (batch, rows)
    # The per-step arrays apart (a returned state must not keep the output or the stash alive),
    # the per-row ones in one allocation.
    y, gates = buffers.alloc((n_rows, proj), dtype), buffers.alloc(gates, dtype)
    c_all = buffers.alloc((n_rows, hidden) if save and "c" in spec.saved else (0, 0), dtype)
    h, c, acc, m = buffers.alloc_group(
        [(batch, proj), (batch, hidden) if spec.has_c else (0, 0), acc,
         (batch, hidden) if has_proj else (0, 0)], dtype)
    if spec.gates_in_y:
        gates = y
    h[...] = 0 if h0 is None else h0
    if spec.has_c:
        c[...] = 0 if c0 is None else c0
    _run(_forward_thread, plan, team.new_counter(plan.split), CODES[cell], save or spec.gates_in_y,
         xg, prepared.bias, prepared.b_hn, prepared.w_cell, h, c, prepared.w_t, prepared.w_p,
         plan.live, prepared.wr_t, has_proj, y, gates, c_all, acc, m, *plan[:3])
    kept = {"gates": gates, "c": c_all}
    return y, h, c, tuple(kept[name] for name in spec.saved) if save else ()


def recurrence_backward(cell, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, b_hn, w_hr,
                        batch_sizes, reverse, y, saved, bias=None, w_cell=None, plan=None):
    """Hand-written BPTT for :func:`recurrence_forward` (kernel contract of
    :func:`fastrnn.kernels.reference.recurrence_backward`).

    grad_y: (N, P); grad_h_n: (B, P); grad_c_n: (B, H) or None (None is read as zeros for lstm);
    the rest as given to / returned by :func:`recurrence_forward` (with its ``plan``, nothing is
    checked again). Returns
    ``(d_xg (N, G*H), d_h0 (B, P), d_c0 (B, H) or None, d_w_hh (G*H, P), d_b_hn (H,) or None,
    d_w_hr (P, H) or None, d_bias (G*H,) or None, d_w_cell (K, H) or None)``. Weight gradients
    are reduced once, after the time loop, as GEMMs (d_bias as one sum over rows, d_w_cell by the
    cell's ``SPEC.cell_weight_grad``); on one thread in one compiled call (:mod:`.bptt`).
    """
    spec = cells.spec(cell)
    hidden = w_hh.shape[0] // spec.gates
    batch, proj = h0.shape
    n_rows = grad_y.shape[0]
    gy = buffers.array(grad_y)
    dtype = gy.dtype
    d_xg = torch.from_numpy(buffers.alloc((n_rows, w_hh.shape[0]), dtype))
    if plan is None:
        plan = make_plan(cell, d_xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias, w_cell)
        _check_backward(spec, grad_y, grad_h_n, grad_c_n, y, saved, hidden)
    d_xg_t, d_xg = d_xg, d_xg.numpy()
    prev = np.empty(n_rows, np.int64)
    empty = np.zeros((0, 0), dtype)  # what the cell does not use
    kept = dict(zip(spec.saved, map(buffers.array, saved)))
    has_proj = w_hr is not None
    w, wr = buffers.array(w_hh), buffers.array(w_hr) if has_proj else empty
    # With b_hn inside r * (h W_hn^T + b_hn) (GRU), the gradient w.r.t. that block of h W_hh^T is
    # d_hn = d(n's pre-activation) * r, not d_xg's: the row step writes it per packed row (for
    # d_w_hh and d_b_hn) and the step matmul's operand to the scratch dg.
    scratch_grad, none = spec.has_b_hn, (0, 0)
    dh, dc = buffers.alloc_group([(batch, proj), (batch, hidden) if spec.has_c else none], dtype)
    dm, tc, dy_all, m_all, d_hn, dg = buffers.alloc_group(
        [(batch, hidden), none if has_proj else (batch, hidden),
         (n_rows, proj) if has_proj else none, (n_rows, hidden) if has_proj else none,
         (n_rows, hidden) if scratch_grad else none,
         (batch, w_hh.shape[0]) if scratch_grad else none], dtype)
    args = (gy, buffers.array(y), buffers.array(h0), buffers.array(c0) if spec.has_c else empty,
            kept.get("gates", empty), kept.get("c", empty), w, matmul.panels(w, plan.panels), wr,
            buffers.array(w_cell) if w_cell is not None else empty, has_proj, scratch_grad,
            spec.direct_h, dh, dc, dm, d_xg, d_hn, dg, dy_all, m_all, tc)
    gemm = matmul._gemm_address(d_xg_t.dtype)
    if bptt.applies(plan, gemm, w_cell):
        d_w_hh, d_bias, d_b_hn, d_w_hr = map(torch.from_numpy, bptt.direct(
            plan, gemm, CODES[cell], args, buffers.array(grad_h_n),
            empty if grad_c_n is None else buffers.array(grad_c_n), prev,
            [(0, 0) if n_rows == batch else (n_rows, proj), (w_hh.shape[0], proj),
             (w_hh.shape[0] if bias is not None else 0,), (hidden if b_hn is not None else 0,),
             (proj, hidden) if has_proj else none]))
        return (d_xg_t, torch.from_numpy(dh), torch.from_numpy(dc) if spec.has_c else None,
                d_w_hh, d_b_hn if b_hn is not None else None, d_w_hr if has_proj else None,
                d_bias if bias is not None else None, None)
    dh[:] = buffers.array(grad_h_n)
    if spec.has_c:
        dc[:] = 0 if grad_c_n is None else buffers.array(grad_c_n)
    _previous_rows(*plan[:3], prev)
    _run(_backward_thread, plan, team.new_counter(plan.split), CODES[cell], *args, prev,
         *plan[:3])

    d_b_hn = d_w_hr = None
    d_w_hh = _weight_grad(d_xg_t[:, :w_hh.shape[0] - d_hn.shape[1]], y, h0, prev)
    if scratch_grad:
        d_w_hh = torch.cat([d_w_hh, _weight_grad(torch.from_numpy(d_hn), y, h0, prev)])
        if b_hn is not None:
            d_b_hn = _sums(d_hn)
    if has_proj:
        d_w_hr = torch.mm(torch.from_numpy(dy_all).t(), torch.from_numpy(m_all))
    d_c0 = torch.from_numpy(dc) if spec.has_c else None
    d_bias = _sums(d_xg) if bias is not None else None
    d_w_cell = None
    if w_cell is not None:  # from the cell state before (gathered) and after each row's step
        c_prev = buffers.alloc((n_rows, hidden), dtype)
        _gather_rows(kept["c"], buffers.array(c0), prev, c_prev)
        d_w_cell = spec.cell_weight_grad(d_xg_t, torch.from_numpy(c_prev),
                                         torch.from_numpy(kept["c"]))
    return d_xg_t, torch.from_numpy(dh), d_c0, d_w_hh, d_b_hn, d_w_hr, d_bias, d_w_cell
