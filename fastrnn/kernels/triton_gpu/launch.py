"""Launchers of the triton backend (the kernel contract of :mod:`fastrnn.kernels.reference`)."""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import triton

from fastrnn import cells
from fastrnn.kernels.triton_gpu import why_not
from fastrnn.kernels.triton_gpu.configs import (GATES, STASH, device_limits, kernel_options,
                                                persistent_fits, select_config)
from fastrnn.kernels.triton_gpu.kernels import (_backward_fused_kernel, _backward_tiled_kernel,
                                                _forward_fused_kernel, _forward_tiled_kernel)
from fastrnn.kernels.triton_gpu.step_math import cell_math, fast_activations

# ----------------------------------------------------------------------------------------------
# Launchers (the kernel contract of fastrnn.kernels.reference).
# ----------------------------------------------------------------------------------------------
_CAPTURED = {}  # step tables a CUDA graph captured (it reads them on every replay): never freed


@functools.lru_cache(maxsize=64)
def _device_tables(device, data):
    """(host, device) int32 (2, T4) tables of the int64 batch sizes in bytes ``data`` (T,): the
    sizes, then the first packed row of each step; T4 = T rounded up to 4, so that both rows
    start 16-byte aligned. On CUDA the host table is pinned and copied asynchronously."""
    sizes = torch.frombuffer(bytearray(data), dtype=torch.int64)
    cuda = device.type == "cuda"
    host = torch.zeros(2, -(-sizes.numel() // 4) * 4, dtype=torch.int32, pin_memory=cuda)
    host[0, :sizes.numel()] = sizes
    host[1, 1:sizes.numel()] = torch.cumsum(sizes[:-1], 0)
    return host, host.to(device, non_blocking=True)


def _steps(batch_sizes, device):
    """(T,) int32 batch sizes and first packed rows on ``device``, from CPU int64 batch_sizes.

    Made once per content and device (an LRU cache, :func:`_device_tables`), so that a call
    neither copies from pageable memory nor waits for the device. On CUDA, a table is marked as
    used by the current stream (so that its eviction waits for that stream's kernels), and one
    read during CUDA-graph capture is kept for good. Capture after a warm-up call (the usual
    recipe; the kernels compile then too), so that the tables exist before capture."""
    sizes = torch.as_tensor(batch_sizes, dtype=torch.int64).cpu()
    entry = _device_tables(device, sizes.numpy().tobytes())
    table = entry[1]
    if device.type == "cuda":
        table.record_stream(torch.cuda.current_stream(device))
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED[id(table)] = entry
    return table[0, :sizes.numel()], table[1, :sizes.numel()]


def _aligned(t):
    """``t`` contiguous and starting on 16 bytes (a copy when not; None stays None): the kernels
    then run only the pointer variant Triton specialises for aligned pointers, the one
    ``tests/test_triton_aot.py`` checks on every arch (an h0[k] view is often not aligned)."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _options(config, plan):
    """The keywords of ``config``'s kernel on the plan's device (:func:`~.configs.kernel_options`:
    constexprs, launch options)."""
    return kernel_options(config, plan.step_math, None if plan.limits is None else plan.limits.cc)


def _current_stream(device):
    """The raw handle of ``device``'s current stream, as Triton's JIT launches on it."""
    return triton.runtime.driver.active.get_current_stream(device.index)


def _launch_passes(kernel, grid, args, options, passes):
    """Launch ``kernel[grid](*args, s, s + 1, ...)`` for passes s = 0 .. ``passes`` - 1; ``args`` =
    (leading arguments, [s_begin, s_end], trailing ones). The first launch goes through the
    JIT (it compiles, specialises, returns the compiled kernel); the others call that compiled
    kernel's launcher with the same arguments (every parameter in order, constexprs included),
    skipping the JIT's binding and cache lookup: same kernel, a few microseconds less per step.
    The interpreter returns no compiled kernel: it runs every pass through the JIT."""
    lead, tail = args
    compiled = kernel[grid](*lead, 0, 1, *tail, **options)
    if compiled is None or passes == 1:
        for s in range(1, passes):
            kernel[grid](*lead, s, s + 1, *tail, **options)
        return
    values = [*lead, 0, 1, *tail]
    values += [options[name] for name in kernel.arg_names[len(values):]]
    stream = _current_stream(lead[0].device)
    run = compiled[(*grid, 1, 1)[:3]]  # its launcher reads three grid sizes (the JIT pads them)
    for s in range(1, passes):
        values[len(lead)], values[len(lead) + 1] = s, s + 1
        run(*values, stream=stream)


def _check(cell, xg, w_hr, w_cell, hidden):
    """ValueError unless this backend runs ``cell`` on xg's device and dtype, and ``w_cell`` is
    given exactly for a cell with per-unit weights, as (K, H) in xg's dtype and device."""
    reason = why_not(cell, xg.device, xg.dtype, 0 if w_hr is None else w_hr.shape[0])
    names = cells.spec(cell).cell_weights
    if reason is None and (w_cell is None) != (not names):
        reason = (f"{cell} takes w_cell ({', '.join(names)})" if names else
                  f"{cell} has no per-unit cell weights, got w_cell")
    if reason is None and w_cell is not None and (
            tuple(w_cell.shape) != (len(names), hidden) or w_cell.dtype != xg.dtype
            or w_cell.device != xg.device):
        reason = (f"w_cell must be ({len(names)}, {hidden}) {xg.dtype} on {xg.device}, got "
                  f"{tuple(w_cell.shape)} {w_cell.dtype} on {w_cell.device}")
    if reason:
        raise ValueError(reason)


class _Plan(NamedTuple):
    """A call's checked plan (:func:`make_plan`): the cell's spec and its Triton step math (with
    the fast activations for 16-bit inputs on CUDA: :func:`~.step_math.fast_activations`), the
    step tables on the device (``sizes``, ``offsets``: int32 (T,); None when T or B is 0) and
    the device's :class:`~.configs.DeviceLimits` (None on the CPU: the interpreter)."""

    spec: object
    step_math: object
    sizes: torch.Tensor
    offsets: torch.Tensor
    limits: object


def make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias=None, w_cell=None):
    """The checks and the device step tables of a call, made once (arguments as
    :func:`recurrence_forward`, kernel contract); given as ``plan=``, the forward and the backward
    neither check nor copy the tables again."""
    _check(cell, xg, w_hr, w_cell, w_hh.shape[1])
    empty = len(batch_sizes) == 0 or h0.shape[0] == 0
    sizes, offsets = (None, None) if empty else _steps(batch_sizes, xg.device)
    step_math = cell_math(cell, fast_activations(xg.dtype, xg.device))
    return _Plan(cells.spec(cell), step_math, sizes, offsets, device_limits(xg.device))


#: Polls a persistent program makes waiting for a step's other programs before it gives up
#: (an acquire atomic on L2 takes ~1 us: ~16 s on a GPU; a step takes microseconds). The tests'
#: threaded interpreter lowers it.
MAX_POLLS = 2 ** 24
#: {device: why its persistent launch failed}: that device runs the step strategy instead.
PERSISTENT_FAILED = {}


def handoff(B, H, grid):
    """The tiled kernels' handoff arguments: the distance of the forward's two h buffers (B*H)
    and how many programs write one batch block's step (the grid's hidden programs)."""
    return B * H, grid[1]


def _tiled_passes(forward, config, plan, head, steps, passes):
    """Run ``passes`` passes of the tiled ``forward`` (else backward) kernel with ``config`` on
    ``plan``'s device: one launch per pass (step: :func:`_launch_passes`), or one launch for all
    (persistent). ``head``: the kernel's pointers before ``sync``; ``steps`` = (bs, off, T, B,
    H, reverse). Returns False if the
    device refused the persistent launch (recorded in :data:`PERSISTENT_FAILED`, warned once;
    nothing ran: the caller runs step kernels). A persistent wait that timed out raises:
    RuntimeError here under the interpreter; on CUDA a device-side assertion (no host sync)
    -- which needs programs that were not all resident, what a cooperative launch rules out."""
    kernel = _forward_tiled_kernel if forward else _backward_tiled_kernel
    bs, off, T, B, H, reverse = steps
    if config.k_pad and not forward:  # the resident backward reads w_hh^T (H, G*H) along k
        head = (head[0], head[1].t().contiguous(), *head[2:])
    dev = head[0].device
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h))
    sync = torch.zeros(1 + grid[0] * T, device=dev, dtype=torch.int32)
    buf_stride, arrivals = handoff(B, H, grid)
    args = (*head, sync, bs, off, T, B, H, int(bool(reverse)))
    tail = ((buf_stride,) if forward else ()) + (arrivals, MAX_POLLS)
    options = _options(config, plan)
    if config.strategy == "step":
        _launch_passes(kernel, grid, (args, tail), options, passes)
        return True
    try:
        kernel[grid](*args, 0, passes, *tail, **options)
    except RuntimeError as error:
        if dev.type != "cuda":
            raise
        PERSISTENT_FAILED[dev] = str(error)
        warnings.warn(f"fastrnn triton: the persistent launch failed on {dev} ({error}); "
                      f"running step kernels there from now on", RuntimeWarning, stacklevel=3)
        return False
    if dev.type == "cuda":
        torch._assert_async(sync[0] == 0)
    elif int(sync[0]):
        raise RuntimeError(f"fastrnn triton: {int(sync[0])} persistent program(s) waited over "
                           f"{MAX_POLLS} polls for the others of a step (not all resident)")
    return True


def _config(direction, cell, dtype, B, H, rows, dev, limits, save=True):
    """The dispatcher's config for a call (:func:`~.configs.select_config`), a persistent one
    only where its grid can be resident on ``dev``: a CUDA device (the interpreter only when
    forced), not after ``dev`` refused one, not when forced beyond its SMs (else the step
    kernels')."""
    if limits is not None and (dev.type != "cuda" or dev in PERSISTENT_FAILED):
        limits = limits._replace(sms=0)
    config = select_config(direction, cell, dtype, H, rows=rows, limits=limits, save=save,
                           batch=B)
    if config.strategy == "persistent" and limits is not None and not persistent_fits(
            B, H, limits, config.block_h):
        config = select_config(direction, cell, dtype, H, strategy="step", save=save)
    return config


def recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=True,
                       bias=None, w_cell=None, plan=None):
    """One layer, one direction, a whole (possibly packed) sequence on the GPU.

    xg: (N, G*H); h0: (B, H); c0: (B, H) (cells with c) or None; w_hh: (G*H, H); b_hn: (H,) or
    None (gru); w_hr must be None; w_cell: (K, H) for a cell with per-unit weights
    (peephole_lstm), else None; batch_sizes: CPU int64 (T,). All floating tensors share xg's
    dtype (float32/float16/bfloat16) and device. Returns (y (N, H), h_n (B, H), c_n (B, H) or
    None, saved = (h_prev (N, H) fp32, stash (N, S*H) fp32), or () when ``save`` is False: then
    the kernels write neither (no backward follows). See :mod:`fastrnn.kernels.reference`.
    ``bias`` (G*H,) or None is added to xg before the kernels (one elementwise pass; on CUDA the
    layers pass none: they add it in the input projection's GEMM, ``CAPABILITIES``).
    ``plan``: the call's :func:`make_plan`, made here when None.
    """
    plan = plan or make_plan(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                             w_cell)
    spec, step_math, bs, off, limits = plan
    if bias is not None:
        xg = xg + bias
    N = xg.shape[0]
    B, H = h0.shape
    T = len(batch_sizes)
    dev, dtype = xg.device, xg.dtype
    xg, h0, c0, w_hh, b_hn, w_cell = map(_aligned, (xg, h0, c0, w_hh, b_hn, w_cell))
    y = torch.empty(N, H, device=dev, dtype=dtype)
    if save:
        h_prev = torch.empty(N, H, device=dev, dtype=torch.float32)
        stash = torch.empty(N, STASH[cell] * H, device=dev, dtype=torch.float32)
        saved = (h_prev, stash)
    else:  # placeholders the kernels never write (SAVE=False)
        h_prev = stash = torch.empty(1, device=dev, dtype=torch.float32)
        saved = ()
    if T == 0 or B == 0:
        return y, h0.clone(), None if c0 is None else c0.clone(), saved
    config = _config("forward", cell, dtype, B, H, N, dev, limits, save)
    if spec.has_b_hn:
        bhn = b_hn if b_hn is not None else torch.zeros(H, device=dev, dtype=dtype)
    else:
        bhn = w_hh  # never read: a placeholder pointer
    wcell = w_hh if w_cell is None else w_cell  # w_hh: never read
    if config.strategy == "fused":
        h_n = torch.empty(B, H, device=dev, dtype=dtype)
        c_n = torch.empty(B, H, device=dev, dtype=dtype) if spec.has_c else None
        _forward_fused_kernel[(triton.cdiv(B, config.block_b),)](
            xg, h0, c0 if c0 is not None else h0, w_hh, bhn, wcell,
            y, h_n, c_n if c_n is not None else h_n, h_prev, stash,
            bs, off, T, B, H, int(bool(reverse)), **_options(config, plan))
        return y, h_n, c_n, saved
    # h_s in h_buf[s % 2], exchanged between programs in the products' dtype; each program's
    # own units of h (and c) in float32
    h_buf = torch.empty(2, B, H, device=dev, dtype=dtype)
    h_buf[0].copy_(h0)
    h_state = h0.to(torch.float32, copy=True)
    c_state = c0.to(torch.float32, copy=True) if spec.has_c else h_state  # (unread without c)
    head = (xg, w_hh, bhn, wcell, h_buf, h_state, c_state, y, h_prev, stash)
    steps = (bs, off, T, B, H, reverse)
    if not _tiled_passes(True, config, plan, head, steps, T):
        step = select_config("forward", cell, dtype, H, strategy="step", save=save)
        _tiled_passes(True, step, plan, head, steps, T)
    h_n = h_state.to(dtype)
    c_n = c_state.to(dtype) if spec.has_c else None
    return y, h_n, c_n, saved


def recurrence_backward(cell, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, b_hn, w_hr,
                        batch_sizes, reverse, y, saved, bias=None, w_cell=None, plan=None):
    """BPTT for :func:`recurrence_forward`: hand-written kernels, weight gradients by one GEMM.

    grad_y: (N, H); grad_h_n: (B, H); grad_c_n: (B, H) or None; saved = (h_prev, stash) from the
    forward; w_cell as given to it. Returns (d_xg (N, G*H), d_h0 (B, H), d_c0 (B, H) or None,
    d_w_hh (G*H, H), d_b_hn (H,) or None, None, d_bias (G*H,) or None, d_w_cell (K, H) or
    None), each in its input's dtype. d_w_cell: ``CellSpec.cell_weight_grad`` of the gate
    gradients and of the c, c' the cell reads from the stash, after the loop (no atomics).
    ``plan``: the forward's :func:`make_plan`, made here when None.
    """
    plan = plan or make_plan(cell, grad_y, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, bias,
                             w_cell)
    spec, step_math, bs, off, limits = plan
    h_prev, stash = saved
    N, H = grad_y.shape[0], w_hh.shape[1]
    B = h0.shape[0]
    T = len(batch_sizes)
    G = GATES[cell]
    dev, dtype = grad_y.device, w_hh.dtype
    grad_y, grad_h_n, grad_c_n, w_hh, w_cell = map(_aligned, (grad_y, grad_h_n, grad_c_n, w_hh,
                                                             w_cell))
    d_gates = torch.empty(N, G * H, device=dev, dtype=torch.float32)
    d_hn = torch.empty(N, H, device=dev, dtype=torch.float32) if spec.has_b_hn else None
    d_h0 = grad_h_n.to(torch.float32).clone()
    d_c0 = None
    wcell = w_hh if w_cell is None else w_cell  # w_hh: never read
    if spec.has_c:
        if grad_c_n is None:
            grad_c_n = torch.zeros(B, H, device=dev, dtype=dtype)
        d_c0 = grad_c_n.to(torch.float32).clone()
    if T > 0 and B > 0:
        config = _config("backward", cell, dtype, B, H, N, dev, limits)
        dhn_arg = d_hn if d_hn is not None else d_gates
        dc_arg = d_c0 if d_c0 is not None else d_h0
        if config.strategy == "fused":
            _backward_fused_kernel[(triton.cdiv(B, config.block_b),)](
                grad_y, grad_h_n, grad_c_n if grad_c_n is not None else grad_h_n, w_hh, wcell,
                h_prev, stash, d_gates, dhn_arg, d_h0, dc_arg,
                bs, off, T, B, H, int(bool(reverse)), **_options(config, plan))
        else:
            # each pass's d_hidden, exchanged between programs in the products' dtype
            exchange = torch.empty(2, B, G * H, device=dev, dtype=dtype)
            head = (grad_y, w_hh, wcell, h_prev, stash, d_gates, dhn_arg, exchange, d_h0, dc_arg)
            steps = (bs, off, T, B, H, reverse)
            if not _tiled_passes(False, config, plan, head, steps, T + 1):
                step = select_config("backward", cell, dtype, H, strategy="step")
                _tiled_passes(False, step, plan, head, steps, T + 1)
    # Weight gradients: one GEMM over all steps, after the loop (deterministic), in the input
    # dtype (float32 accumulation: 16-bit operands run on the tensor cores, as the input
    # projection's own weight gradient does; in float32, T=1024 B=128 H=768 is 618 GFLOP at the
    # ~51 TFLOP/s of a float32 torch.mm measured on an H200: ~12 ms).
    d_gates_out = d_gates.to(dtype)
    d_hidden = (d_gates_out if d_hn is None else
                torch.cat([d_gates_out[:, :2 * H], d_hn.to(dtype)], dim=1))
    d_w_hh = torch.mm(d_hidden.t(), h_prev.to(dtype))
    d_b_hn = None
    if b_hn is not None:
        d_b_hn = d_hn.sum(0).to(b_hn.dtype)
    d_bias = None if bias is None else d_gates.sum(0).to(bias.dtype)
    d_w_cell = None
    if w_cell is not None:  # the cell's per-unit weights: its own reduction, also after the loop
        c_before, c_after = step_math.saved_cell_states(stash, H)
        d_w_cell = spec.cell_weight_grad(d_gates, c_before, c_after).to(w_cell.dtype)
    return (d_gates_out, d_h0.to(h0.dtype), None if c0 is None else d_c0.to(c0.dtype),
            d_w_hh, d_b_hn, None, d_bias, d_w_cell)

