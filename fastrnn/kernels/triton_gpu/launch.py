"""Launchers of the triton backend (the kernel contract of :mod:`fastrnn.kernels.reference`)."""
from __future__ import annotations

import torch
import triton

from fastrnn.kernels.triton_gpu import why_not
from fastrnn.kernels.triton_gpu.configs import GATES, STASH, _interpreted, select_config
from fastrnn.kernels.triton_gpu.kernels import (_backward_fused_kernel, _backward_step_kernel,
                                                _forward_fused_kernel, _forward_step_kernel)
from fastrnn.kernels.triton_gpu.step_math import cell_math

# ----------------------------------------------------------------------------------------------
# Launchers (the kernel contract of fastrnn.kernels.reference).
# ----------------------------------------------------------------------------------------------
def _steps(batch_sizes, device):
    """(T,) int32 batch sizes and first packed rows on ``device``, from CPU int64 batch_sizes."""
    sizes = torch.as_tensor(batch_sizes, dtype=torch.int64).cpu()
    offsets = torch.zeros_like(sizes)
    if sizes.numel() > 1:
        offsets[1:] = torch.cumsum(sizes, 0)[:-1]
    return sizes.to(device=device, dtype=torch.int32), offsets.to(device=device, dtype=torch.int32)


def _dot_fp32(dtype):
    return dtype == torch.bfloat16 and _interpreted()


def _check(cell, xg, w_hr):
    reason = why_not(cell, xg.device, xg.dtype, 0 if w_hr is None else w_hr.shape[0])
    if reason:
        raise ValueError(reason)


def recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=True,
                       bias=None):
    """One layer, one direction, a whole (possibly packed) sequence on the GPU.

    xg: (N, G*H); h0: (B, H); c0: (B, H) (lstm) or None; w_hh: (G*H, H); b_hn: (H,) or None
    (gru); w_hr must be None; batch_sizes: CPU int64 (T,). All floating tensors share xg's dtype
    (float32/float16/bfloat16) and device. Returns (y (N, H), h_n (B, H), c_n (B, H) or None,
    saved = (h_prev (N, H) fp32, stash (N, S*H) fp32)). See :mod:`fastrnn.kernels.reference`. ``save`` is
    accepted for the contract; the kernels always write the stash. ``bias`` (G*H,) or None is
    added to xg before the kernels (one elementwise pass on the GPU).
    """
    _check(cell, xg, w_hr)
    if bias is not None:
        xg = xg + bias
    N = xg.shape[0]
    B, H = h0.shape
    T = len(batch_sizes)
    dev, dtype = xg.device, xg.dtype
    xg, h0, w_hh = xg.contiguous(), h0.contiguous(), w_hh.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    y = torch.empty(N, H, device=dev, dtype=dtype)
    h_prev = torch.empty(N, H, device=dev, dtype=torch.float32)
    stash = torch.empty(N, STASH[cell] * H, device=dev, dtype=torch.float32)
    if T == 0 or B == 0:
        return y, h0.clone(), None if c0 is None else c0.clone(), (h_prev, stash)
    bs, off = _steps(batch_sizes, dev)
    config = select_config("forward", cell, dtype, H, rows=N)
    step_math = cell_math(cell)  # the cell's @triton.jit helpers, the kernels' CELL constexpr
    n_blocks = triton.cdiv(B, config.block_b)
    if cell == "gru":
        bhn = b_hn.contiguous() if b_hn is not None else torch.zeros(H, device=dev, dtype=dtype)
    else:
        bhn = w_hh  # never read: a placeholder pointer
    if config.strategy == "fused":
        h_n = torch.empty(B, H, device=dev, dtype=dtype)
        c_n = torch.empty(B, H, device=dev, dtype=dtype) if cell == "lstm" else None
        _forward_fused_kernel[(n_blocks,)](
            xg, h0, c0 if c0 is not None else h0, w_hh, bhn,
            y, h_n, c_n if c_n is not None else h_n, h_prev, stash,
            bs, off, T, B, H, int(bool(reverse)),
            CELL=step_math, H_PAD=config.h_pad, BLOCK_B=config.block_b, DOT_FP32=_dot_fp32(dtype),
            num_warps=config.num_warps)
        return y, h_n, c_n, (h_prev, stash)
    h_bufs = [h0.to(torch.float32).clone(), torch.empty(B, H, device=dev, dtype=torch.float32)]
    c_state = c0.to(torch.float32).clone() if cell == "lstm" else h_bufs[0]
    grid = (n_blocks, triton.cdiv(H, config.block_h))
    order = range(T - 1, -1, -1) if reverse else range(T)
    for s, t in enumerate(order):
        _forward_step_kernel[grid](
            xg, w_hh, bhn, h_bufs[s % 2], h_bufs[(s + 1) % 2], c_state,
            y, h_prev, stash, bs, off, t, B, H,
            CELL=step_math, BLOCK_B=config.block_b,
            BLOCK_H=config.block_h, BLOCK_K=config.block_k, DOT_FP32=_dot_fp32(dtype),
            num_warps=config.num_warps)
    h_n = h_bufs[T % 2].to(dtype)
    c_n = c_state.to(dtype) if cell == "lstm" else None
    return y, h_n, c_n, (h_prev, stash)


def recurrence_backward(cell, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, b_hn, w_hr,
                        batch_sizes, reverse, y, saved, bias=None):
    """BPTT for :func:`recurrence_forward`: hand-written kernels, weight gradients by one GEMM.

    grad_y: (N, H); grad_h_n: (B, H); grad_c_n: (B, H) or None; saved = (h_prev, stash) from the
    forward. Returns (d_xg (N, G*H), d_h0 (B, H), d_c0 (B, H) or None, d_w_hh (G*H, H),
    d_b_hn (H,) or None, None, d_bias (G*H,) or None), each in its input's dtype.
    """
    h_prev, stash = saved
    N, H = grad_y.shape[0], w_hh.shape[1]
    B = h0.shape[0]
    T = len(batch_sizes)
    G = GATES[cell]
    dev, dtype = grad_y.device, w_hh.dtype
    w_hh = w_hh.contiguous()
    d_gates = torch.empty(N, G * H, device=dev, dtype=torch.float32)
    d_hn = torch.empty(N, H, device=dev, dtype=torch.float32) if cell == "gru" else None
    d_h0 = grad_h_n.to(torch.float32).clone()
    d_c0 = None
    if cell == "lstm":
        if grad_c_n is None:
            grad_c_n = torch.zeros(B, H, device=dev, dtype=dtype)
        d_c0 = grad_c_n.to(torch.float32).clone()
    if T > 0 and B > 0:
        bs, off = _steps(batch_sizes, dev)
        config = select_config("backward", cell, dtype, H, rows=N)
        step_math = cell_math(cell)
        n_blocks = triton.cdiv(B, config.block_b)
        dhn_arg = d_hn if d_hn is not None else d_gates
        if config.strategy == "fused":
            _backward_fused_kernel[(n_blocks,)](
                grad_y, grad_h_n, grad_c_n if grad_c_n is not None else grad_h_n, w_hh,
                h_prev, stash, d_gates, dhn_arg, d_h0, d_c0 if d_c0 is not None else d_h0,
                bs, off, T, B, H, int(bool(reverse)),
                CELL=step_math, H_PAD=config.h_pad, BLOCK_B=config.block_b, DOT_FP32=_dot_fp32(dtype),
                num_warps=config.num_warps)
        else:
            order = list(range(T)) if reverse else list(range(T - 1, -1, -1))
            grid = (n_blocks, triton.cdiv(H, config.block_h))
            for s in range(T + 1):
                t_done = order[s - 1] if s > 0 else -1
                t_next = order[s] if s < T else -1
                _backward_step_kernel[grid](
                    grad_y, w_hh, h_prev, stash, d_gates, dhn_arg,
                    d_h0, d_c0 if d_c0 is not None else d_h0,
                    bs, off, t_done, t_next, B, H,
                    CELL=step_math, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
                    BLOCK_K=config.block_k, DOT_FP32=_dot_fp32(dtype),
                    num_warps=config.num_warps)
    # Weight gradients: one float32 GEMM over all steps, after the loop (deterministic).
    d_hidden = d_gates if cell != "gru" else torch.cat([d_gates[:, :2 * H], d_hn], dim=1)
    d_w_hh = torch.mm(d_hidden.t(), h_prev).to(dtype)
    d_b_hn = None
    if b_hn is not None:
        d_b_hn = d_hn.sum(0).to(b_hn.dtype)
    d_bias = None if bias is None else d_gates.sum(0).to(bias.dtype)
    return (d_gates.to(dtype), d_h0.to(h0.dtype), None if c0 is None else d_c0.to(c0.dtype),
            d_w_hh, d_b_hn, None, d_bias)

