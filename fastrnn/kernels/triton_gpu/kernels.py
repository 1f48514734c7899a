"""The Triton kernels: the fused whole-sequence kernels and the tiled kernels (the step and the
persistent strategies), one body each for every cell. ``CELL`` is the cell's
:class:`~fastrnn.kernels.triton_gpu.step_math.CellMath`: its ``@triton.jit`` helpers (in the
cell's file) do the step math and the cell's own loads and stores.
Shapes and strategies: :mod:`fastrnn.kernels.triton_gpu`."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from fastrnn.kernels.triton_gpu.step_math import (accumulate_products, add_product, arrive,
                                                  block_tiles, load_inputs,
                                                  load_weight_tile, mm, step_inputs, step_rows,
                                                  tf32_products, wait_arrivals, zero_tiles)

# The tuples of tiles (one per gate or stash slot) are built and stored by static loops in the
# kernels themselves, not by more helpers: each level of inlined helper adds line-info scopes to
# the PTX, and those alone moved ptxas's register allocation (Triton 3.6, sm_80).


# ----------------------------------------------------------------------------------------------
# Fused strategy: one launch for the whole sequence, W_hh resident on-chip.
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "B", "H", "reverse"])
def _forward_fused_kernel(
    xg_ptr, h0_ptr, c0_ptr, w_ptr, bhn_ptr, wcell_ptr,     # inputs
    y_ptr, hn_ptr, cn_ptr, hprev_ptr, stash_ptr,           # outputs
    bs_ptr, off_ptr, T, B, H,                              # runtime sizes
    reverse,                                               # 1: run t = T-1 ... 0
    CELL: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr, SAVE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Whole-sequence forward of one batch block (program id 0 -> rows [pid*BLOCK_B, ...)).

    xg: (N, G*H); h0: (B, H); c0: (B, H) (lstm); w: (G*H, H); bhn: (H,) (gru; zeros without bias);
    wcell: (K, H) the cell's own per-unit weights (peephole_lstm; K = 0: never read);
    y: (N, H) in the input dtype; hn/cn: (B, H); hprev: (N, H) fp32; stash: (N, S*H) fp32;
    bs/off: (T,) int32 batch size and first packed row of each step. SAVE False: hprev and
    stash are never written (no backward follows; they may be placeholders). PREFETCH: each
    step loads the next step's xg tiles (into registers, before its products), so that no
    step waits for its own; else a step loads its own before its products.
    """
    G: tl.constexpr = CELL.n_gates
    S: tl.constexpr = CELL.n_stash
    rows, cols, col_ok, state_mask, state_off = block_tiles(0, B, H, BLOCK_B, H_PAD)
    h = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    c = CELL.load_c(c0_ptr + state_off, state_mask, h)
    w = ()
    for gate in tl.static_range(G):
        w = w + (load_weight_tile(w_ptr, gate, H, H_PAD, True),)
    b_hn = CELL.load_b_hn(bhn_ptr + cols, col_ok)
    w_cell = CELL.load_cell_weights(wcell_ptr + cols, col_ok, H)
    if PREFETCH:
        x = step_inputs(xg_ptr, bs_ptr, off_ptr, reverse * (T - 1), rows, cols, col_ok, H, G)
    for s in range(0, T):
        t = s + reverse * (T - 1 - 2 * s)
        first, active, m = step_rows(bs_ptr, off_ptr, t, rows, col_ok)
        prow = (first + rows)[:, None]  # int32: select_config sends N*S*H >= 2**31 to step
        h_off = prow * H + cols[None, :]
        # the G input loads issued together, before the products (which start from them)
        if PREFETCH:  # the next step's (the last step reloads its own)
            s1 = tl.minimum(s + 1, T - 1)
            x_next = step_inputs(xg_ptr, bs_ptr, off_ptr, s1 + reverse * (T - 1 - 2 * s1), rows,
                                 cols, col_ok, H, G)
        else:
            x = load_inputs(xg_ptr + prow * (G * H) + cols[None, :], H, m, G)
        hd = h.to(w_ptr.dtype.element_ty)
        p = CELL.preacts(mm, hd, w, x, b_hn)
        h_new, c_new, stash = CELL.forward(p + w_cell, h, c)
        tl.static_assert(len(stash) == S, "the stash tuple must have STASH[cell] tiles")
        if SAVE:
            tl.store(hprev_ptr + h_off, h, mask=m)
            st_ptrs = stash_ptr + prow * (S * H) + cols[None, :]
            for k in tl.static_range(S):
                tl.store(st_ptrs + k * H, stash[k], mask=m)
        tl.store(y_ptr + h_off, h_new.to(y_ptr.dtype.element_ty), mask=m)
        h = tl.where(active[:, None], h_new, h)
        c = tl.where(active[:, None], c_new, c)
        if PREFETCH:
            x = x_next
    tl.store(hn_ptr + state_off, h.to(hn_ptr.dtype.element_ty), mask=state_mask)
    CELL.store_c(cn_ptr + state_off, c, state_mask)


@triton.jit(do_not_specialize=["T", "B", "H", "reverse"])
def _backward_fused_kernel(
    gy_ptr, ghn_ptr, gcn_ptr, w_ptr, wcell_ptr, hprev_ptr, stash_ptr,  # inputs
    dgate_ptr, dhn_ptr, dh0_ptr, dc0_ptr,                              # outputs
    bs_ptr, off_ptr, T, B, H,
    reverse,                                          # 1: the forward ran t = T-1 ... 0
    CELL: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Whole-sequence BPTT of one batch block, steps in the opposite order of the forward.

    gy: (N, H) output gradient; ghn/gcn: (B, H) final-state gradients; w: (G*H, H); wcell: (K, H)
    as in the forward; hprev: (N, H) fp32 and stash: (N, S*H) fp32 from the forward; dgate:
    (N, G*H) fp32 gate pre-activation gradients (= d_xg); dhn: (N, H) fp32 (gru); dh0/dc0:
    (B, H) fp32.
    """
    G: tl.constexpr = CELL.n_gates
    S: tl.constexpr = CELL.n_stash
    rows, cols, col_ok, state_mask, state_off = block_tiles(0, B, H, BLOCK_B, H_PAD)
    dh = tl.load(ghn_ptr + state_off, mask=state_mask, other=0.0).to(tl.float32)
    dc = CELL.load_c(gcn_ptr + state_off, state_mask, tl.zeros([BLOCK_B, H_PAD], tl.float32))
    w = ()
    for gate in tl.static_range(G):
        w = w + (load_weight_tile(w_ptr, gate, H, H_PAD, False),)
    dot_dtype = w_ptr.dtype.element_ty
    for s in range(0, T):
        t = T - 1 - s - reverse * (T - 1 - 2 * s)
        # Written out, not step_rows(): here the helper's inlined scope alone cost registers on
        # sm_80 (rnn float32 H_PAD 128: 226 -> 232; lstm 16-bit H_PAD 64: 103 -> 104).
        n_active = tl.load(bs_ptr + t)
        first = tl.load(off_ptr + t)
        active = rows < n_active
        m = active[:, None] & col_ok[None, :]
        prow = (first + rows)[:, None]  # int32: select_config sends N*S*H >= 2**31 to step
        h_off = prow * H + cols[None, :]
        dh_t = dh + tl.load(gy_ptr + h_off, mask=m, other=0.0).to(tl.float32)
        st_ptrs = stash_ptr + prow * (S * H) + cols[None, :]
        stash = ()
        for k in tl.static_range(S):
            stash = stash + (tl.load(st_ptrs + k * H, mask=m, other=0.0),)
        h_prev = tl.load(hprev_ptr + h_off, mask=m, other=0.0)
        # Loaded every step (held across the loop they made the peephole float32 H_PAD 64
        # backward spill on sm_90), unlike the forward's, which stay resident.
        w_cell = CELL.load_cell_weights(wcell_ptr + cols, col_ok, H)
        d_xg, d_hidden, direct, dc_prev = CELL.backward(dh_t, dc, stash + w_cell, h_prev)
        # dh_prev = direct + sum_g d_hidden[g] W_g. 16-bit: each gate's product on its own
        # accumulator (G independent chains of tensor-core products, not one), summed in gate
        # order. float32: the three tf32 products of tf32x3 (hi*hi, lo*hi, hi*lo: tf32_products)
        # on three accumulators across the gates (three independent chains, not tf32x3's one;
        # G chains of tf32x3 spilled the fp32 lstm and peephole_lstm at H_PAD 64 on sm_90).
        # The order of these stores and products steers register allocation (storing every
        # d_xg first made the float32 LSTM spill on sm_90): compile the configurations ahead
        # of time before changing it.
        g_ptrs = dgate_ptr + prow * (G * H) + cols[None, :]
        if dot_dtype == tl.float32:
            tl.store(g_ptrs, d_xg[0], mask=m)
            zero = tl.zeros([BLOCK_B, H_PAD], tl.float32)
            acc = tf32_products(d_hidden[0], w[0], (direct, zero, zero))
            for gate in tl.static_range(1, G):
                tl.store(g_ptrs + gate * H, d_xg[gate], mask=m)
            CELL.store_d_hn(dhn_ptr + h_off, d_hidden, m)
            for gate in tl.static_range(1, G):
                acc = tf32_products(d_hidden[gate], w[gate], acc)
            dh_prev = acc[0] + (acc[1] + acc[2])
        else:
            parts = ()
            for gate in tl.static_range(G):
                parts = parts + (mm(d_hidden[gate].to(dot_dtype), w[gate],
                                    tl.zeros([BLOCK_B, H_PAD], tl.float32)),)
                tl.store(g_ptrs + gate * H, d_xg[gate], mask=m)
            CELL.store_d_hn(dhn_ptr + h_off, d_hidden, m)
            dh_prev = direct
            for gate in tl.static_range(G):
                dh_prev = dh_prev + parts[gate]
        dh = tl.where(active[:, None], dh_prev, dh)
        dc = tl.where(active[:, None], dc_prev, dc)
    tl.store(dh0_ptr + state_off, dh, mask=state_mask)
    CELL.store_c(dc0_ptr + state_off, dc, state_mask)


# ----------------------------------------------------------------------------------------------
# Tiled kernels: the hidden dimension split across programs. Strategy "step" launches them once
# per pass (T forward, T + 1 backward; the launch boundary orders the passes), "persistent" once
# for all passes, its programs resident at once and handing each pass over to the next through
# global memory (:func:`~.step_math.wait_arrivals`, :func:`~.step_math.arrive`). With ``K_PAD``
# (persistent only) a program keeps its W_hh slice on-chip for the whole launch and splits each
# product's reduction into K_PAD // BLOCK_K chunks, one batched ``tl.dot`` whose chunks run on
# different warps with accumulators of their own, summed at the end; else (K_PAD 0) it streams
# the slice from L2 in BLOCK_K chunks every pass.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chunks(K_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """(K_PAD // BLOCK_K, 1, BLOCK_K) reduction indices: chunk c, element k -> c*BLOCK_K + k."""
    return tl.arange(0, K_PAD)[:, None].reshape(K_PAD // BLOCK_K, 1, BLOCK_K)


@triton.jit
def resident_weights(w_ptr, gate_stride, unit_stride, cols, col_ok, H, G: tl.constexpr,
                     K_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """The G weight slices of units ``cols`` a persistent program keeps on-chip: (K_PAD //
    BLOCK_K, BLOCK_K, BLOCK_H) tiles, tile_g[c, k, j] = w[g*gate_stride + cols[j]*unit_stride
    + c*BLOCK_K + k] (0 from k = H on): the forward's W_g^T from w_hh (G*H, H) (strides H*H,
    H); the backward's W_g from w_hh^T (H, G*H) (strides H, G*H). Read along k (along j, the
    16-bit backward at K_PAD 1024 spilled 16-56 B). Loaded before the pass loop and used by
    every pass: Triton keeps them in shared memory. One gate at a time (a CTA barrier after
    each; at once, the 16-bit lstm forward at K_PAD 1024 spilled 40 B on sm_90)."""
    ks = tl.permute(_chunks(K_PAD, BLOCK_K), (0, 2, 1))
    ptrs = w_ptr + cols[None, None, :] * unit_stride + ks
    mask = (ks < H) & col_ok[None, None, :]
    w = ()
    for gate in tl.static_range(G):
        w = w + (tl.load(ptrs + gate * gate_stride, mask=mask, other=0.0),)
        tl.debug_barrier()
    return w


@triton.jit
def split_product(a_ptr, row_off, rows_ok, H, w, K_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """``a @ W`` (BLOCK_B, BLOCK_H) float32 of the rows of ``a`` at ``a_ptr + row_off``
    (BLOCK_B,), K_PAD entries each (0 past H and where not ``rows_ok``), and a
    :func:`resident_weights` tile ``w``: chunk c of the reduction is batch entry c of one
    tl.dot (its own warps and accumulator), the chunks summed in a fixed order after."""
    ks = _chunks(K_PAD, BLOCK_K)
    a = tl.load(a_ptr + row_off[None, :, None] + ks, mask=rows_ok[None, :, None] & (ks < H),
                other=0.0)
    return tl.sum(mm(a, w, tl.zeros([a.shape[0], a.shape[1], w.shape[2]], tl.float32)), axis=0)


@triton.jit(do_not_specialize=["T", "B", "H", "reverse", "s_begin", "s_end", "buf_stride",
                               "arrivals", "max_polls"])
def _forward_tiled_kernel(
    xg_ptr, w_ptr, bhn_ptr, wcell_ptr,                      # inputs
    hbuf_ptr, hst_ptr, c_ptr,                               # states, in and out
    y_ptr, hprev_ptr, stash_ptr,                            # outputs
    sync_ptr,                                               # int32 zeros (1 + blocks * T,)
    bs_ptr, off_ptr, T, B, H, reverse, s_begin, s_end,
    buf_stride, arrivals, max_polls,                        # B*H, hidden programs, poll cap
    CELL: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
    SAVE: tl.constexpr,
):
    """Steps ``s_begin .. s_end - 1`` (in the order of the sequence: ``reverse`` 1 runs t =
    T-1-s) of batch block program_id(0), hidden units [program_id(1)*BLOCK_H, ...).

    hbuf: (2, B, H) in w's dtype (what the products take), h_s in ``hbuf[s % 2]``
    (``buf_stride`` = B*H apart; hbuf[0] = h0): step s reads the whole h_{s-1} of its batch
    block and writes its own units of h_s (inactive rows keep h); hst and c: (B, H) fp32, h and
    c read at the start and written at the end (each program owns its units); in between h and
    c stay in registers. Before each step but the first of the
    launch, the program waits until ``sync[1 + block*T + s-1]`` counts ``arrivals`` programs
    (acquire), and after writing h_s it arrives at ``sync[1 + block*T + s]`` (release); a wait
    past ``max_polls`` polls adds 1 at ``sync[0]`` and later steps no longer wait.
    ``PDL`` (step kernels on sm_90+, launched with programmatic dependent launch): wait for the
    previous launch to finish (and its writes to show) before any memory access, then let the
    next launch start (it waits the same way). Other pointers and shapes as in
    :func:`_forward_fused_kernel`.
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    G: tl.constexpr = CELL.n_gates
    S: tl.constexpr = CELL.n_stash
    rows, cols, col_ok, state_mask, state_off = block_tiles(tl.program_id(1) * BLOCK_H, B, H,
                                                            BLOCK_B, BLOCK_H)
    dot_dtype = w_ptr.dtype.element_ty
    h = tl.load(hst_ptr + state_off, mask=state_mask, other=0.0)
    c = CELL.load_c(c_ptr + state_off, state_mask, h)
    b_hn = CELL.load_b_hn(bhn_ptr + cols, col_ok)
    w_cell = CELL.load_cell_weights(wcell_ptr + cols, col_ok, H)
    if K_PAD:  # this program's slice of every gate, on-chip for the whole launch
        w_res = resident_weights(w_ptr, H * H, H, cols, col_ok, H, G, K_PAD, BLOCK_K)
    counters = sync_ptr + 1 + tl.program_id(0) * T
    ok = 1
    for s in range(s_begin, s_end):
        t = s + reverse * (T - 1 - 2 * s)
        first, active, m = step_rows(bs_ptr, off_ptr, t, rows, col_ok)
        first64 = first.to(tl.int64)  # step base in int64 (N*S*H may pass 2**31), tiles int32
        prow = rows[:, None]
        h_off = prow * H + cols[None, :]  # int32 offsets of this step's (rows, units) in (N, H)
        # the step's inputs (no other program writes them) loaded before the wait and products
        x = load_inputs(xg_ptr + first64 * (G * H) + prow * (G * H) + cols[None, :], H, m, G)
        if s > s_begin:
            ok = wait_arrivals(counters + (s - 1), arrivals, max_polls, ok, sync_ptr)
        src = hbuf_ptr + (s % 2) * buf_stride
        if K_PAD:  # h W_g^T of this program's units, per gate
            acc = ()
            for gate in tl.static_range(G):  # (the G loads of h: one, after CSE)
                acc = acc + (split_product(src, rows * H, active, H, w_res[gate], K_PAD,
                                           BLOCK_K),)
        else:
            acc = zero_tiles(G, [BLOCK_B, BLOCK_H])
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                hk = tl.load(src + rows[:, None] * H + ks[None, :],
                             mask=active[:, None] & k_ok[None, :], other=0.0).to(dot_dtype)
                w_ptrs = w_ptr + cols[None, :] * H + ks[:, None]  # tile[k, j] = w[g*H + j, k]
                acc = accumulate_products(hk, w_ptrs, k_ok[:, None] & col_ok[None, :], H, acc)
        p = CELL.preacts(add_product, None, acc, x, b_hn)
        h_new, c_new, stash = CELL.forward(p + w_cell, h, c)
        tl.static_assert(len(stash) == S, "the stash tuple must have STASH[cell] tiles")
        if SAVE:
            tl.store(hprev_ptr + first64 * H + h_off, h, mask=m)
            st_ptrs = stash_ptr + first64 * (S * H) + prow * (S * H) + cols[None, :]
            for k in tl.static_range(S):
                tl.store(st_ptrs + k * H, stash[k], mask=m)
        tl.store(y_ptr + first64 * H + h_off, h_new.to(y_ptr.dtype.element_ty), mask=m)
        h = tl.where(active[:, None], h_new, h)
        c = tl.where(active[:, None], c_new, c)
        tl.store(hbuf_ptr + ((s + 1) % 2) * buf_stride + state_off, h.to(dot_dtype),
                 mask=state_mask)
        arrive(counters + s)
    tl.store(hst_ptr + state_off, h, mask=state_mask)
    CELL.store_c(c_ptr + state_off, c, state_mask)


@triton.jit(do_not_specialize=["T", "B", "H", "reverse", "s_begin", "s_end", "arrivals",
                               "max_polls"])
def _backward_tiled_kernel(
    gy_ptr, w_ptr, wcell_ptr, hprev_ptr, stash_ptr, dgate_ptr, dhn_ptr,
    xch_ptr,                         # (2, B, G*H) in w's dtype: the d_hidden exchange
    dh_ptr, dc_ptr,                  # (B, H) fp32: the final states' gradients in, d_h0/d_c0 out
    sync_ptr,                        # int32 zeros (1 + blocks * T,)
    bs_ptr, off_ptr, T, B, H, reverse, s_begin, s_end, arrivals, max_polls,
    CELL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """Passes ``s_begin .. s_end - 1`` of the BPTT (T + 1 passes, steps in the opposite order of
    the forward) of batch block program_id(0), hidden units [program_id(1)*BLOCK_H, ...).

    Pass s finishes the step of pass s-1 (s > 0): ``dh += d_hidden_gates @ W_hh`` for its units,
    reading every program's gradients of the hidden products of that step from
    ``xch[(s-1) % 2]`` (written in pass s-1: a launch boundary or, within a launch, a wait for
    ``arrivals`` as in :func:`_forward_tiled_kernel`; in the products' dtype, as the forward
    exchanges h), for the rows active there; then (s < T) it runs the elementwise BPTT of its
    own step for its units: writes their dgate/dhn rows (float32) and their d_hidden to
    ``xch[s % 2]``, leaves in dh the part of the state gradient that bypasses W_hh (gru: dh*z;
    0 else; inactive rows: dh) and in dc the cell-state gradient, and arrives.
    dh/dc: read at the start, in registers between passes, written at the end. Each step's gate
    gradients have rows of their own: nothing is written twice. Shapes as in
    :func:`_backward_fused_kernel`, but w: w_hh^T (H, G*H) when ``K_PAD`` (resident weights:
    :func:`resident_weights`); ``PDL`` as in :func:`_forward_tiled_kernel`.
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    G: tl.constexpr = CELL.n_gates
    S: tl.constexpr = CELL.n_stash
    rows, cols, col_ok, state_mask, state_off = block_tiles(tl.program_id(1) * BLOCK_H, B, H,
                                                            BLOCK_B, BLOCK_H)
    dot_dtype = w_ptr.dtype.element_ty
    dh = tl.load(dh_ptr + state_off, mask=state_mask, other=0.0)
    dc = CELL.load_c(dc_ptr + state_off, state_mask, tl.zeros([BLOCK_B, BLOCK_H], tl.float32))
    if K_PAD:  # this program's slice of every gate, on-chip for the whole launch
        w_res = resident_weights(w_ptr, H, G * H, cols, col_ok, H, G, K_PAD, BLOCK_K)
    counters = sync_ptr + 1 + tl.program_id(0) * T
    ok = 1
    for s in range(s_begin, s_end):
        if s > s_begin:
            ok = wait_arrivals(counters + (s - 1), arrivals, max_polls, ok, sync_ptr)
        if s > 0:
            t_done = T - s - reverse * (T + 1 - 2 * s)  # the step pass s - 1 ran
            _, done, _ = step_rows(bs_ptr, off_ptr, t_done, rows, col_ok)
            if K_PAD:  # d_hidden_g W_g, per gate
                acc = ()
                for gate in tl.static_range(G):
                    acc = acc + (split_product(xch_ptr + ((s - 1) % 2) * (B * G * H) + gate * H,
                                               rows * (G * H), done, H, w_res[gate], K_PAD,
                                               BLOCK_K),)
            else:
                acc = zero_tiles(G, [BLOCK_B, BLOCK_H])  # one chain per gate
                src = xch_ptr + ((s - 1) % 2) * (B * G * H) + rows[:, None] * (G * H)
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < H
                    g_mask = done[:, None] & k_ok[None, :]
                    parts = ()
                    for gate in tl.static_range(G):
                        dk = tl.load(src + gate * H + ks[None, :], mask=g_mask, other=0.0)
                        wt = tl.load(w_ptr + (gate * H + ks[:, None]) * H + cols[None, :],
                                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                        parts = parts + (mm(dk, wt, acc[gate]),)
                    acc = parts
            hw = acc[0]
            for gate in tl.static_range(1, G):
                hw = hw + acc[gate]
            dh = tl.where(done[:, None], dh + hw, dh)
        if s < T:
            t = T - 1 - s - reverse * (T - 1 - 2 * s)
            first, active, m = step_rows(bs_ptr, off_ptr, t, rows, col_ok)
            first64 = first.to(tl.int64)  # step base in int64 (N*S*H may pass 2**31)
            prow = rows[:, None]
            h_off = prow * H + cols[None, :]  # int32 offsets of (rows, units) in (N, H)
            dh_t = dh + tl.load(gy_ptr + first64 * H + h_off, mask=m, other=0.0).to(tl.float32)
            st_ptrs = stash_ptr + first64 * (S * H) + prow * (S * H) + cols[None, :]
            stash = ()
            for k in tl.static_range(S):
                stash = stash + (tl.load(st_ptrs + k * H, mask=m, other=0.0),)
            h_prev = tl.load(hprev_ptr + first64 * H + h_off, mask=m, other=0.0)
            w_cell = CELL.load_cell_weights(wcell_ptr + cols, col_ok, H)
            d_xg, d_hidden, direct, dc_prev = CELL.backward(dh_t, dc, stash + w_cell, h_prev)
            g_ptrs = dgate_ptr + first64 * (G * H) + prow * (G * H) + cols[None, :]
            x_ptrs = xch_ptr + (s % 2) * (B * G * H) + prow * (G * H) + cols[None, :]
            for gate in tl.static_range(G):
                tl.store(g_ptrs + gate * H, d_xg[gate], mask=m)
                tl.store(x_ptrs + gate * H, d_hidden[gate].to(dot_dtype), mask=m)
            CELL.store_d_hn(dhn_ptr + first64 * H + h_off, d_hidden, m)
            dh = tl.where(active[:, None], direct, dh)
            dc = tl.where(active[:, None], dc_prev, dc)
            arrive(counters + s)
    tl.store(dh_ptr + state_off, dh, mask=state_mask)
    CELL.store_c(dc_ptr + state_off, dc, state_mask)
