"""The Triton kernels: the cell math (forward and BPTT of one step on float32 tiles), the fused
whole-sequence kernels and the per-step kernels. Shapes and strategies: :mod:`fastrnn.kernels.triton_gpu`."""
from __future__ import annotations

import triton
import triton.language as tl

#: tl.dot input precision of float32 operands (see "Precision" in the module docstring).
FP32_DOT_PRECISION = tl.constexpr("tf32x3")


# ----------------------------------------------------------------------------------------------
# Shared device helpers: the cell math is written once, used by both strategies.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh from tl.sigmoid (libdevice.tanh is missing in the interpreter)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _mm(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b with float32 accumulation; float32 operands in FP32_DOT_PRECISION (tf32x3).
    DOT_FP32 (interpreter only): upcast both operands and multiply exactly."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=FP32_DOT_PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _cell_forward(CELL: tl.constexpr, p0, p1, p2, p3, c):
    """One cell step on float32 tiles (BLOCK_B, BLOCK_H).

    p0..p3: for rnn/lstm, the gate pre-activations ``xg + h W^T`` (unused ones ignored); for gru
    ``p0 = x_r + h W_hr^T``, ``p1 = x_z + h W_hz^T``, ``p2 = x_n``, ``p3 = h W_hn^T + b_hn``.
    c: the cell state (lstm) or, for gru, the previous h. Returns (h', c', s0, s1, s2, s3)
    where s* are the stash slots (c' is the new cell state for lstm, else c unchanged).
    """
    if CELL == "rnn_tanh":
        h = _tanh(p0)
        return h, c, h, h, h, h
    elif CELL == "rnn_relu":
        h = tl.maximum(p0, 0.0)
        return h, c, h, h, h, h
    elif CELL == "lstm":
        i = tl.sigmoid(p0)
        f = tl.sigmoid(p1)
        g = _tanh(p2)
        o = tl.sigmoid(p3)
        c_new = f * c + i * g
        h = o * _tanh(c_new)
        return h, c_new, i, f, g, o
    else:  # gru; c is the previous h
        r = tl.sigmoid(p0)
        z = tl.sigmoid(p1)
        n = _tanh(p2 + r * p3)
        h = (1.0 - z) * n + z * c
        return h, c, r, z, n, p3


@triton.jit
def _cell_backward(CELL: tl.constexpr, dh, dc, s0, s1, s2, s3, s4):
    """BPTT of one cell step on float32 tiles.

    dh: gradient w.r.t. h' (carried + this step's output gradient); dc: w.r.t. c' (lstm).
    s0..s4: the stash slots (rnn: h'; lstm: i, f, g, o, c; gru: r, z, n, hn, and s4 = h).
    Returns (d0, d1, d2, d3, d_hn, direct, dc_prev): d0..d3 the gradients of the xg gate
    pre-activations, d_hn (gru) the gradient of ``h W_hn^T + b_hn``, direct the part of the
    gradient of h that does not go through W_hh (gru: dh * z, else 0), dc_prev (lstm).
    """
    zero = tl.zeros_like(dh)
    if CELL == "rnn_tanh":
        d = dh * (1.0 - s0 * s0)
        return d, d, d, d, d, zero, zero
    elif CELL == "rnn_relu":
        d = tl.where(s0 > 0.0, dh, 0.0)
        return d, d, d, d, d, zero, zero
    elif CELL == "lstm":
        c_new = s1 * s4 + s0 * s2
        tc = _tanh(c_new)
        dct = dc + dh * s3 * (1.0 - tc * tc)
        d_i = dct * s2 * s0 * (1.0 - s0)
        d_f = dct * s4 * s1 * (1.0 - s1)
        d_g = dct * s0 * (1.0 - s2 * s2)
        d_o = dh * tc * s3 * (1.0 - s3)
        return d_i, d_f, d_g, d_o, d_g, zero, dct * s1
    else:
        d_n = dh * (1.0 - s1) * (1.0 - s2 * s2)
        d_r = d_n * s3 * s0 * (1.0 - s0)
        d_z = dh * (s4 - s2) * s1 * (1.0 - s1)
        return d_r, d_z, d_n, d_n, d_n * s0, dh * s1, zero


# ----------------------------------------------------------------------------------------------
# Fused strategy: one launch for the whole sequence, W_hh resident on-chip.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_weight_tile(w_ptr, gate, H, H_PAD: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Gate ``gate`` of w_hh (G*H, H) as an (H_PAD, H_PAD) tile, zero-padded.
    TRANSPOSE: tile[k, j] = w[gate*H + j, k] (for h @ W^T); else tile[j, k] = w[gate*H + j, k]."""
    a = tl.arange(0, H_PAD)[:, None]
    b = tl.arange(0, H_PAD)[None, :]
    mask = (a < H) & (b < H)
    if TRANSPOSE:
        return tl.load(w_ptr + (gate * H + b) * H + a, mask=mask, other=0.0)
    else:
        return tl.load(w_ptr + (gate * H + a) * H + b, mask=mask, other=0.0)


@triton.jit(do_not_specialize=["T", "B", "H", "reverse"])
def _forward_fused_kernel(
    xg_ptr, h0_ptr, c0_ptr, w_ptr, bhn_ptr,            # inputs
    y_ptr, hn_ptr, cn_ptr, hprev_ptr, stash_ptr,       # outputs
    bs_ptr, off_ptr, T, B, H,                          # runtime sizes
    reverse,                                           # 1: run t = T-1 ... 0
    CELL: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Whole-sequence forward of one batch block (program id 0 -> rows [pid*BLOCK_B, ...)).

    xg: (N, G*H); h0: (B, H); c0: (B, H) (lstm); w: (G*H, H); bhn: (H,) (gru; zeros without bias);
    y: (N, H) in the input dtype; hn/cn: (B, H); hprev: (N, H) fp32; stash: (N, S*H) fp32;
    bs/off: (T,) int32 batch size and first packed row of each step.
    """
    G: tl.constexpr = 4 if CELL == "lstm" else (3 if CELL == "gru" else 1)
    S: tl.constexpr = 5 if CELL == "lstm" else (4 if CELL == "gru" else 1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, H_PAD)
    col_ok = cols < H
    state_mask = (rows < B)[:, None] & col_ok[None, :]
    state_off = rows[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    if CELL == "lstm":
        c = tl.load(c0_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        c = h
    w0 = _load_weight_tile(w_ptr, 0, H, H_PAD, True)
    if G > 1:
        w1 = _load_weight_tile(w_ptr, 1, H, H_PAD, True)
        w2 = _load_weight_tile(w_ptr, 2, H, H_PAD, True)
    if G > 3:
        w3 = _load_weight_tile(w_ptr, 3, H, H_PAD, True)
    if CELL == "gru":
        bhn = tl.load(bhn_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for s in range(0, T):
        t = s + reverse * (T - 1 - 2 * s)
        n_active = tl.load(bs_ptr + t)
        first = tl.load(off_ptr + t)
        active = rows < n_active
        m = active[:, None] & col_ok[None, :]
        prow = (first + rows)[:, None]  # int32: select_config sends N*S*H >= 2**31 to step
        h_off = prow * H + cols[None, :]
        x_base = xg_ptr + prow * (G * H) + cols[None, :]
        hd = h.to(w_ptr.dtype.element_ty)
        zero = tl.zeros([BLOCK_B, H_PAD], tl.float32)
        p0 = _mm(hd, w0, tl.load(x_base, mask=m, other=0.0).to(tl.float32), DOT_FP32)
        p1 = zero
        p2 = zero
        p3 = zero
        if CELL == "lstm":
            p1 = _mm(hd, w1, tl.load(x_base + H, mask=m, other=0.0).to(tl.float32), DOT_FP32)
            p2 = _mm(hd, w2, tl.load(x_base + 2 * H, mask=m, other=0.0).to(tl.float32), DOT_FP32)
            p3 = _mm(hd, w3, tl.load(x_base + 3 * H, mask=m, other=0.0).to(tl.float32), DOT_FP32)
        if CELL == "gru":
            p1 = _mm(hd, w1, tl.load(x_base + H, mask=m, other=0.0).to(tl.float32), DOT_FP32)
            p2 = tl.load(x_base + 2 * H, mask=m, other=0.0).to(tl.float32)
            p3 = _mm(hd, w2, bhn + zero, DOT_FP32)
            c = h
        h_new, c_new, s0, s1, s2, s3 = _cell_forward(CELL, p0, p1, p2, p3, c)
        tl.store(hprev_ptr + h_off, h, mask=m)
        st_base = stash_ptr + prow * (S * H) + cols[None, :]
        tl.store(st_base, s0, mask=m)
        if S > 1:
            tl.store(st_base + H, s1, mask=m)
            tl.store(st_base + 2 * H, s2, mask=m)
            tl.store(st_base + 3 * H, s3, mask=m)
        if S > 4:
            tl.store(st_base + 4 * H, c, mask=m)
        tl.store(y_ptr + h_off, h_new.to(y_ptr.dtype.element_ty), mask=m)
        h = tl.where(active[:, None], h_new, h)
        if CELL == "lstm":
            c = tl.where(active[:, None], c_new, c)
    tl.store(hn_ptr + state_off, h.to(hn_ptr.dtype.element_ty), mask=state_mask)
    if CELL == "lstm":
        tl.store(cn_ptr + state_off, c.to(cn_ptr.dtype.element_ty), mask=state_mask)


@triton.jit(do_not_specialize=["T", "B", "H", "reverse"])
def _backward_fused_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, w_ptr, hprev_ptr, stash_ptr,   # inputs
    dgate_ptr, dhn_ptr, dh0_ptr, dc0_ptr,                   # outputs
    bs_ptr, off_ptr, T, B, H,
    reverse,                                           # 1: the forward ran t = T-1 ... 0
    CELL: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Whole-sequence BPTT of one batch block, steps in the opposite order of the forward.

    gy: (N, H) output gradient; ghn/gcn: (B, H) final-state gradients; w: (G*H, H);
    hprev: (N, H) fp32 and stash: (N, S*H) fp32 from the forward; dgate: (N, G*H) fp32 gate
    pre-activation gradients (= d_xg); dhn: (N, H) fp32 (gru); dh0/dc0: (B, H) fp32.
    """
    G: tl.constexpr = 4 if CELL == "lstm" else (3 if CELL == "gru" else 1)
    S: tl.constexpr = 5 if CELL == "lstm" else (4 if CELL == "gru" else 1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, H_PAD)
    col_ok = cols < H
    state_mask = (rows < B)[:, None] & col_ok[None, :]
    state_off = rows[:, None] * H + cols[None, :]
    dh = tl.load(ghn_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    dc = tl.zeros([BLOCK_B, H_PAD], tl.float32)
    if CELL == "lstm":
        dc = tl.load(gcn_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    w0 = _load_weight_tile(w_ptr, 0, H, H_PAD, False)
    if G > 1:
        w1 = _load_weight_tile(w_ptr, 1, H, H_PAD, False)
        w2 = _load_weight_tile(w_ptr, 2, H, H_PAD, False)
    if G > 3:
        w3 = _load_weight_tile(w_ptr, 3, H, H_PAD, False)
    dot_dtype = w_ptr.dtype.element_ty
    for s in range(0, T):
        t = T - 1 - s - reverse * (T - 1 - 2 * s)
        n_active = tl.load(bs_ptr + t)
        first = tl.load(off_ptr + t)
        active = rows < n_active
        m = active[:, None] & col_ok[None, :]
        prow = (first + rows)[:, None]  # int32: select_config sends N*S*H >= 2**31 to step
        h_off = prow * H + cols[None, :]
        dh_t = dh + tl.load(gy_ptr + h_off, mask=m, other=0.0).to(tl.float32)
        st_base = stash_ptr + prow * (S * H) + cols[None, :]
        s0 = tl.load(st_base, mask=m, other=0.0)
        s1 = s0
        s2 = s0
        s3 = s0
        s4 = s0
        if S > 1:
            s1 = tl.load(st_base + H, mask=m, other=0.0)
            s2 = tl.load(st_base + 2 * H, mask=m, other=0.0)
            s3 = tl.load(st_base + 3 * H, mask=m, other=0.0)
        if S > 4:
            s4 = tl.load(st_base + 4 * H, mask=m, other=0.0)
        if CELL == "gru":
            s4 = tl.load(hprev_ptr + h_off, mask=m, other=0.0)
        d0, d1, d2, d3, d_hn, direct, dc_prev = _cell_backward(CELL, dh_t, dc, s0, s1, s2, s3, s4)
        g_base = dgate_ptr + prow * (G * H) + cols[None, :]
        tl.store(g_base, d0, mask=m)
        dh_prev = _mm(d0.to(dot_dtype), w0, direct, DOT_FP32)
        if CELL == "lstm":
            tl.store(g_base + H, d1, mask=m)
            tl.store(g_base + 2 * H, d2, mask=m)
            tl.store(g_base + 3 * H, d3, mask=m)
            dh_prev = _mm(d1.to(dot_dtype), w1, dh_prev, DOT_FP32)
            dh_prev = _mm(d2.to(dot_dtype), w2, dh_prev, DOT_FP32)
            dh_prev = _mm(d3.to(dot_dtype), w3, dh_prev, DOT_FP32)
        if CELL == "gru":
            tl.store(g_base + H, d1, mask=m)
            tl.store(g_base + 2 * H, d2, mask=m)
            tl.store(dhn_ptr + h_off, d_hn, mask=m)
            dh_prev = _mm(d1.to(dot_dtype), w1, dh_prev, DOT_FP32)
            dh_prev = _mm(d_hn.to(dot_dtype), w2, dh_prev, DOT_FP32)
        dh = tl.where(active[:, None], dh_prev, dh)
        if CELL == "lstm":
            dc = tl.where(active[:, None], dc_prev, dc)
    tl.store(dh0_ptr + state_off, dh, mask=state_mask)
    if CELL == "lstm":
        tl.store(dc0_ptr + state_off, dc, mask=state_mask)


# ----------------------------------------------------------------------------------------------
# Step strategy: one launch per time step, hidden dimension split across programs.
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["t", "B", "H"])
def _forward_step_kernel(
    xg_ptr, w_ptr, bhn_ptr, h_in_ptr, h_out_ptr, c_ptr,     # c_ptr: (B, H) fp32 in/out (lstm)
    y_ptr, hprev_ptr, stash_ptr,
    bs_ptr, off_ptr, t, B, H,
    CELL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Step ``t`` for batch block program_id(0) and hidden units [program_id(1)*BLOCK_H, ...).

    h_in: (B, H) fp32 state before the step (read whole); h_out: (B, H) fp32 state after it
    (inactive rows copy h_in); c: (B, H) fp32 updated in place (each program owns its units).
    Other pointers as in :func:`_forward_fused_kernel`.
    """
    G: tl.constexpr = 4 if CELL == "lstm" else (3 if CELL == "gru" else 1)
    S: tl.constexpr = 5 if CELL == "lstm" else (4 if CELL == "gru" else 1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    row_ok = rows < B
    n_active = tl.load(bs_ptr + t)
    first = tl.load(off_ptr + t)
    active = rows < n_active
    m = active[:, None] & col_ok[None, :]
    dot_dtype = w_ptr.dtype.element_ty
    acc0 = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        hk = tl.load(h_in_ptr + rows[:, None] * H + ks[None, :],
                     mask=active[:, None] & k_ok[None, :], other=0.0).to(dot_dtype)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_base = w_ptr + cols[None, :] * H + ks[:, None]   # tile[k, j] = w[g*H + j, k]
        acc0 = _mm(hk, tl.load(w_base, mask=w_mask, other=0.0), acc0, DOT_FP32)
        if G > 1:
            acc1 = _mm(hk, tl.load(w_base + H * H, mask=w_mask, other=0.0), acc1, DOT_FP32)
            acc2 = _mm(hk, tl.load(w_base + 2 * H * H, mask=w_mask, other=0.0), acc2, DOT_FP32)
        if G > 3:
            acc3 = _mm(hk, tl.load(w_base + 3 * H * H, mask=w_mask, other=0.0), acc3, DOT_FP32)
    first64 = first.to(tl.int64)  # step base in int64 (N*S*H may pass 2**31), tiles int32
    prow = rows[:, None]
    h_off = prow * H + cols[None, :]  # int32 offsets of this step's (rows, units) in (N, H)
    x_base = xg_ptr + first64 * (G * H) + prow * (G * H) + cols[None, :]
    state_mask = row_ok[:, None] & col_ok[None, :]
    state_off = rows[:, None] * H + cols[None, :]
    h = tl.load(h_in_ptr + state_off, mask=state_mask, other=0.0)
    p0 = acc0 + tl.load(x_base, mask=m, other=0.0).to(tl.float32)
    p1 = acc1
    p2 = acc2
    p3 = acc3
    c = h
    if CELL == "lstm":
        p1 = acc1 + tl.load(x_base + H, mask=m, other=0.0).to(tl.float32)
        p2 = acc2 + tl.load(x_base + 2 * H, mask=m, other=0.0).to(tl.float32)
        p3 = acc3 + tl.load(x_base + 3 * H, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + state_off, mask=state_mask, other=0.0)
    if CELL == "gru":
        p1 = acc1 + tl.load(x_base + H, mask=m, other=0.0).to(tl.float32)
        p2 = tl.load(x_base + 2 * H, mask=m, other=0.0).to(tl.float32)
        p3 = acc2 + tl.load(bhn_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h_new, c_new, s0, s1, s2, s3 = _cell_forward(CELL, p0, p1, p2, p3, c)
    tl.store(hprev_ptr + first64 * H + h_off, h, mask=m)
    st_base = stash_ptr + first64 * (S * H) + prow * (S * H) + cols[None, :]
    tl.store(st_base, s0, mask=m)
    if S > 1:
        tl.store(st_base + H, s1, mask=m)
        tl.store(st_base + 2 * H, s2, mask=m)
        tl.store(st_base + 3 * H, s3, mask=m)
    if S > 4:
        tl.store(st_base + 4 * H, c, mask=m)
    tl.store(y_ptr + first64 * H + h_off, h_new.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(h_out_ptr + state_off, tl.where(active[:, None], h_new, h), mask=state_mask)
    if CELL == "lstm":
        tl.store(c_ptr + state_off, tl.where(active[:, None], c_new, c), mask=state_mask)


@triton.jit(do_not_specialize=["t_done", "t_next", "B", "H"])
def _backward_step_kernel(
    gy_ptr, w_ptr, hprev_ptr, stash_ptr, dgate_ptr, dhn_ptr,
    dh_ptr, dc_ptr,                  # (B, H) fp32 carries, each program owns its units
    bs_ptr, off_ptr, t_done, t_next, B, H,
    CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One launch of the step-strategy BPTT: finish step ``t_done`` and start ``t_next``.

    Phase 1 (t_done >= 0): dh[:, units] = carry + d_hidden_gates(t_done) @ W_hh[:, units] for
    rows active at t_done (d_hidden_gates were written by every program of the previous
    launch, hence the launch boundary). Phase 2 (t_next >= 0): the elementwise cell BPTT of
    step t_next for this program's units: writes dgate/dhn rows of t_next and leaves in dh the
    part of the state gradient that bypasses W_hh (gru: dh*z; 0 else; inactive rows: dh) and
    in dc the cell-state gradient. Each program reads and writes only its own units of dh/dc.
    Shapes as in :func:`_backward_fused_kernel`.
    """
    G: tl.constexpr = 4 if CELL == "lstm" else (3 if CELL == "gru" else 1)
    S: tl.constexpr = 5 if CELL == "lstm" else (4 if CELL == "gru" else 1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    state_mask = (rows < B)[:, None] & col_ok[None, :]
    state_off = rows[:, None] * H + cols[None, :]
    dot_dtype = w_ptr.dtype.element_ty
    dh = tl.load(dh_ptr + state_off, mask=state_mask, other=0.0)
    if t_done >= 0:
        n_done = tl.load(bs_ptr + t_done)
        first_done = tl.load(off_ptr + t_done)
        done = rows < n_done
        acc = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
        done64 = first_done.to(tl.int64)
        grow = rows[:, None]
        for gate in tl.static_range(G):
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                g_mask = done[:, None] & k_ok[None, :]
                if CELL == "gru" and gate == 2:
                    dk = tl.load(dhn_ptr + done64 * H + grow * H + ks[None, :], mask=g_mask,
                                 other=0.0)
                else:
                    dk = tl.load(dgate_ptr + done64 * (G * H) + grow * (G * H) + gate * H
                                 + ks[None, :], mask=g_mask, other=0.0)
                wt = tl.load(w_ptr + (gate * H + ks[:, None]) * H + cols[None, :],
                             mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _mm(dk.to(dot_dtype), wt, acc, DOT_FP32)
        dh = tl.where(done[:, None], dh + acc, dh)
    if t_next >= 0:
        n_active = tl.load(bs_ptr + t_next)
        first = tl.load(off_ptr + t_next)
        active = rows < n_active
        m = active[:, None] & col_ok[None, :]
        first64 = first.to(tl.int64)  # step base in int64 (N*S*H may pass 2**31), tiles int32
        prow = rows[:, None]
        h_off = prow * H + cols[None, :]  # int32 offsets of this step's (rows, units) in (N, H)
        dh_t = dh + tl.load(gy_ptr + first64 * H + h_off, mask=m, other=0.0).to(tl.float32)
        dc = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
        if CELL == "lstm":
            dc = tl.load(dc_ptr + state_off, mask=state_mask, other=0.0)
        st_base = stash_ptr + first64 * (S * H) + prow * (S * H) + cols[None, :]
        s0 = tl.load(st_base, mask=m, other=0.0)
        s1 = s0
        s2 = s0
        s3 = s0
        s4 = s0
        if S > 1:
            s1 = tl.load(st_base + H, mask=m, other=0.0)
            s2 = tl.load(st_base + 2 * H, mask=m, other=0.0)
            s3 = tl.load(st_base + 3 * H, mask=m, other=0.0)
        if S > 4:
            s4 = tl.load(st_base + 4 * H, mask=m, other=0.0)
        if CELL == "gru":
            s4 = tl.load(hprev_ptr + first64 * H + h_off, mask=m, other=0.0)
        d0, d1, d2, d3, d_hn, direct, dc_prev = _cell_backward(CELL, dh_t, dc, s0, s1, s2, s3, s4)
        g_base = dgate_ptr + first64 * (G * H) + prow * (G * H) + cols[None, :]
        tl.store(g_base, d0, mask=m)
        if G > 1:
            tl.store(g_base + H, d1, mask=m)
            tl.store(g_base + 2 * H, d2, mask=m)
        if G > 3:
            tl.store(g_base + 3 * H, d3, mask=m)
        if CELL == "gru":
            tl.store(dhn_ptr + first64 * H + h_off, d_hn, mask=m)
        dh = tl.where(active[:, None], direct, dh)
        if CELL == "lstm":
            tl.store(dc_ptr + state_off, tl.where(active[:, None], dc_prev, dc), mask=state_mask)
    tl.store(dh_ptr + state_off, dh, mask=state_mask)

