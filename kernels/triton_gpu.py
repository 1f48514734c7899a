"""Triton GPU kernels for the fastrnn kernel contract (:mod:`fastrnn.reference`).

Cells ``rnn_tanh``, ``rnn_relu``, ``lstm`` (without ``proj_size``) and ``gru``; dtypes float32,
float16 and bfloat16. The cell is a ``tl.constexpr`` of one kernel body per direction of work;
T (sequence length) and the batch are runtime arguments, never compile-time constants.
The hidden state, the cell state and every accumulation are float32 whatever the input dtype.
The input projection ``xg`` is made by the caller; the kernels run the recurrence only.

Strategies (chosen by :func:`select_config` from H, the cell and the dtype)
--------------------------------------------------------------------------
``fused``  one launch per layer and direction for the whole sequence: one program per block of
           ``BLOCK_B`` = 16 batch rows runs the time loop and keeps ``W_hh`` (G tiles of
           ``H_PAD x H_PAD``, H padded to a power of two and masked) on-chip for all steps.
           Largest H (:data:`FUSED_MAX_HIDDEN`, per direction, cell and dtype) -- the largest
           ``H_PAD`` whose kernel compiles for sm_80 and sm_90 with zero spill bytes and shared
           memory under both limits (``tests/test_triton_aot.py``; measured table in
           ``bench/results/triton_resources.md``). Triton keeps the loop-invariant weight tiles
           in shared memory (the dot operand staging is hoisted out of the time loop), so the
           limit is shared memory (weights + layout-conversion scratch) and registers:

           ============  =====================  =====================
           cell          float16 / bfloat16     float32
                         forward / backward     forward / backward
           ============  =====================  =====================
           rnn_tanh/relu 128 / 128              128 / 128
           lstm          128 / 64               64 / 64
           gru           128 / 128              64 / 64
           ============  =====================  =====================

           Inputs whose packed (N, S*H) tensors reach 2**31 elements also go to ``step``
           (the fused kernels index with int32 tiles, :data:`FUSED_MAX_ELEMENTS`).

``step``   any larger H -- no on-chip limit (the largest H is bounded by device memory for the
           float32 workspaces, O(N * 6 * H)): one launch per time step of a tiled
           kernel; the grid splits the batch into blocks of 16 rows and the hidden dimension into
           blocks of ``BLOCK_H`` units, and each program streams its ``W_hh`` slice (from L2) in
           ``BLOCK_K`` chunks. The hidden state crosses steps through global float32 buffers
           (ping-pong for h, whose every unit every program reads). No grid-wide barrier is used,
           so the interpreter runs exactly the code a GPU runs. The backward is T + 1 launches:
           launch s finishes step s-1 (``dh = d_gates(s-1) @ W_hh``, which needs every
           program's gate gradients of the previous launch) and runs the elementwise BPTT of
           step s for the program's own hidden units.

Both strategies write the same ``saved`` tensors, so either backward can follow either forward:

* ``h_prev``: (N, H) float32, the state entering each step of each packed row;
* ``stash``:  (N, S*H) float32, per-step values the backward needs -- ``rnn``: h' (S=1);
  ``lstm``: i, f, g, o (activated) and c entering the step (S=5); ``gru``: r, z, n and
  ``h W_hn^T + b_hn`` (S=4).

The backward kernels write ``d_gates`` (N, G*H) float32 (the gradient of the gate
pre-activations = ``d_xg``; for GRU the n part is the gradient of ``x_n``) and, for GRU,
``d_hn`` (N, H) float32 (gradient of ``h W_hn^T + b_hn``). The weight gradients are then one
``torch.mm`` in float32 after the loop (``d_w_hh = d_hidden_gates^T @ h_prev``), fixed order, no
atomics: deterministic.

Precision
---------
``tl.dot`` operands are the input dtype and accumulate in float32: fp16/bf16 use tensor cores
with h (forward) and the gate gradients (backward) rounded to the input dtype for the product,
like cuDNN. float32 uses ``input_precision="tf32x3"``: three TF32 tensor-core products
(big*big + big*small + small*big), about float32 accuracy (relative error ~1e-6 per product),
so float32 results match torch.nn's float32 on the CPU within fastrnn's 1e-5 tolerance.
Measured alternatives (Triton 3.9): ``"ieee"`` (FMA, no tensor cores) crashes LLVM's SLP
vectorizer on sm_90 for the lstm backward (H_PAD 32 at 4 warps, 64 at 8 warps) and spills 8 B
on the lstm forward at 64; plain ``"tf32"`` (what cuDNN does by default) fits in half the shared
memory but rounds products to 10 mantissa bits (~1e-3), failing float32 parity.
The interpreter multiplies float32 exactly, so tf32x3 rounding is only seen on a GPU.
Under ``TRITON_INTERPRET=1`` a bf16 x bf16 ``tl.dot`` returns garbage (Triton 3.9 interpreter
defect), so there only, bf16 operands are upcast to float32 before the product (``DOT_FP32``);
the compiled GPU kernels never take that path.

Real-GPU rules kept although the interpreter does not enforce them: every ``tl.dot`` operand is
at least 16 in each dimension (batch blocks are 16 rows, ``H_PAD``/``BLOCK_H``/``BLOCK_K`` >= 16),
every block shape is a power of two (H is masked), ``tanh`` is written from ``tl.sigmoid``
(``libdevice.tanh`` is missing in the interpreter).

The kernel configurations the dispatcher can choose are listed in ONE place, :data:`CONFIGS`
(built from :data:`FUSED_MAX_HIDDEN`, :data:`FUSED_BUCKETS` and the step tiles); the AOT test and
``bench/triton_resources.py`` compile exactly that list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
STASH = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 5, "gru": 4}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
STRATEGIES = ("fused", "step")
#: tl.dot input precision of float32 operands (see "Precision" in the module docstring).
FP32_DOT_PRECISION = tl.constexpr("tf32x3")

# ----------------------------------------------------------------------------------------------
# Configurations: the ONE list the dispatcher chooses from and the AOT test compiles.
# ----------------------------------------------------------------------------------------------
BLOCK_B = 16  # batch rows per program: the tl.dot minimum M on every NVIDIA target.
FUSED_BUCKETS = (32, 64, 128)  # H_PAD values of the fused kernels (H <= 32 pads to 32).
#: Largest H the fused (weights-resident) strategy serves, per (direction, cell, dtype): the
#: largest bucket whose kernel compiles for sm_80 and sm_90 with zero spill bytes and dynamic
#: shared memory under both limits (measured: bench/results/triton_resources.md). Beyond it,
#: the step strategy. Buckets that were tried and rejected (measured 2026-11-23, Triton 3.9):
#: H_PAD 256 spills for every cell and dtype (rnn fp16: 120-136 B STACK at 8 warps; fp32 and
#: lstm/gru: also over the shared limit); float32 lstm and gru at 128: weights alone are
#: 256 KB and 192 KB (over sm_80's 163 KB; lstm also over sm_90's 227 KB); lstm fp16/bf16
#: backward at 128 needs 180 KB shared (over sm_80's 163 KB).
_FUSED_LIMITS = {  # (cell, dtype group) -> (forward limit, backward limit)
    ("rnn", "16bit"): (128, 128), ("rnn", "float32"): (128, 128),
    ("lstm", "16bit"): (128, 64), ("lstm", "float32"): (64, 64),
    ("gru", "16bit"): (128, 128), ("gru", "float32"): (64, 64),
}
FUSED_MAX_HIDDEN = {
    (direction, cell, dtype): _FUSED_LIMITS[("rnn" if cell.startswith("rnn") else cell,
                                             "float32" if dtype == "float32" else "16bit")][d]
    for d, direction in enumerate(("forward", "backward")) for cell in CELLS for dtype in DTYPES
}
STEP_BLOCK_H = 32  # hidden units per program of the step kernels
STEP_BLOCK_K = 32  # reduction chunk of the step kernels


@dataclass(frozen=True)
class KernelConfig:
    """One compiled kernel variant.

    ``kernel``: "forward_fused" | "backward_fused" | "forward_step" | "backward_step";
    ``h_pad``: the padded hidden size of the fused kernels (0 for step kernels, where H is a
    runtime argument); ``block_h``/``block_k``: the step tiles (0 for fused kernels).
    """

    kernel: str
    cell: str
    dtype: str
    h_pad: int
    num_warps: int
    block_b: int = BLOCK_B
    block_h: int = 0
    block_k: int = 0

    @property
    def strategy(self):
        return self.kernel.split("_")[1]

    @property
    def name(self):
        size = f"H{self.h_pad}" if self.h_pad else f"bh{self.block_h}xbk{self.block_k}"
        return f"{self.kernel}-{self.cell}-{self.dtype}-{size}-w{self.num_warps}"


#: Warps per program of the shipped kernels. Measured (Triton 3.9, ptxas with Triton's
#: ``--regAllocOptLevel=2``): at 4 warps the fused 64/128 tiles need 166-255 registers per
#: thread and spill at 128, and some 4-warp kernels spill 8 B at only 80-96 registers; at 8
#: warps every shipped config has STACK 0 except those in _NUM_WARPS_EXCEPTIONS.
NUM_WARPS = 8
_NUM_WARPS_EXCEPTIONS = {
    # 8 warps: STACK 8 on sm_90 at 128 registers; 4 warps: 168 registers, STACK 0.
    ("forward_fused", "lstm", "float32", 32): 4,
    # 8 warps: STACK 8 on sm_90 at 64 registers; 4 warps: 93 registers, STACK 0.
    ("forward_fused", "lstm", "bfloat16", 32): 4,
}


def _build_configs():
    configs = []
    for cell in CELLS:
        for dtype in DTYPES:
            for direction in ("forward", "backward"):
                for h_pad in FUSED_BUCKETS:
                    if h_pad <= FUSED_MAX_HIDDEN[(direction, cell, dtype)]:
                        kernel = f"{direction}_fused"
                        warps = _NUM_WARPS_EXCEPTIONS.get((kernel, cell, dtype, h_pad), NUM_WARPS)
                        configs.append(KernelConfig(kernel, cell, dtype, h_pad, warps))
                configs.append(KernelConfig(f"{direction}_step", cell, dtype, 0, NUM_WARPS,
                                            block_h=STEP_BLOCK_H, block_k=STEP_BLOCK_K))
    return tuple(configs)


#: Every kernel configuration the dispatcher can choose (the AOT test compiles all of them).
CONFIGS = _build_configs()

_forced = None  # (strategy, step tile overrides) set by forced_strategy()


@contextlib.contextmanager
def forced_strategy(strategy, block_h=None, block_k=None):
    """Within the ``with`` block, run every recurrence with ``strategy`` ("fused" or "step")
    regardless of H -- for tests: the step strategy at small H. ``block_h``/``block_k``
    (powers of two >= 16) override the step tiles so that H <= 32 still spans several hidden
    blocks and reduction chunks. Not thread-safe."""
    global _forced
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for block in (block_h, block_k):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"step tiles must be powers of two >= 16, got {block}")
    previous, _forced = _forced, (strategy, block_h, block_k)
    try:
        yield
    finally:
        _forced = previous


def _dtype_name(dtype):
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"triton supports float32, float16 and bfloat16, got {dtype}")


#: The fused kernels index the packed (N, width) tensors with int32 tiles (int64 tiles cost the
#: registers that keep H_PAD 128 spill-free); inputs whose largest packed tensor reaches this
#: many elements run the step kernels, which add an int64 per-step base.
FUSED_MAX_ELEMENTS = 2 ** 31


def select_config(direction, cell, dtype, hidden_size, strategy=None, rows=0):
    """The :class:`KernelConfig` (from :data:`CONFIGS`) that runs ``direction`` ("forward" or
    "backward") of ``cell`` at ``hidden_size`` for ``dtype`` (a torch dtype).

    ``strategy`` None (and no :func:`forced_strategy` in effect) picks "fused" when
    ``hidden_size <= FUSED_MAX_HIDDEN[(direction, cell, dtype)]``, else "step"; "fused" at a
    hidden size no fused bucket covers raises ValueError. ``rows`` (N, the packed rows) sends
    inputs whose (N, max(G, S) * H) tensors reach :data:`FUSED_MAX_ELEMENTS` to "step".
    """
    name = _dtype_name(dtype)
    overrides = {}
    if strategy is None and _forced is not None:
        strategy, block_h, block_k = _forced
        overrides = {k: v for k, v in (("block_h", block_h), ("block_k", block_k)) if v}
    if strategy is None:
        small = hidden_size <= FUSED_MAX_HIDDEN[(direction, cell, name)]
        fits_int32 = rows * max(GATES[cell], STASH[cell]) * hidden_size < FUSED_MAX_ELEMENTS
        strategy = "fused" if small and fits_int32 else "step"
    for config in CONFIGS:
        if (config.kernel, config.cell, config.dtype) != (f"{direction}_{strategy}", cell, name):
            continue
        if strategy == "step":
            return dataclasses.replace(config, **overrides) if overrides else config
        if hidden_size <= config.h_pad:
            return config
    raise ValueError(f"no {strategy} {direction} kernel for {cell} {name} at H={hidden_size}")


def fused_max_hidden(direction, cell, dtype):
    """Largest H the fused strategy serves for ``direction`` of ``cell`` in ``dtype`` (torch)."""
    return FUSED_MAX_HIDDEN[(direction, cell, _dtype_name(dtype))]


def why_not(cell, device, dtype, proj_size):
    """Why the triton backend cannot run this case, or None."""
    if cell not in CELLS:
        return f"unknown cell {cell!r}"
    if proj_size:
        return "the triton backend does not implement LSTM proj_size (w_hr)"
    if dtype not in DTYPES.values():
        return f"triton supports float32, float16 and bfloat16, got {dtype}"
    return None


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


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


# ----------------------------------------------------------------------------------------------
# Launchers (the kernel contract of fastrnn.reference).
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
    saved = (h_prev (N, H) fp32, stash (N, S*H) fp32)). See :mod:`fastrnn.reference`. ``save`` is
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
            CELL=cell, H_PAD=config.h_pad, BLOCK_B=config.block_b, DOT_FP32=_dot_fp32(dtype),
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
            CELL=cell, BLOCK_B=config.block_b,
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
        n_blocks = triton.cdiv(B, config.block_b)
        dhn_arg = d_hn if d_hn is not None else d_gates
        if config.strategy == "fused":
            _backward_fused_kernel[(n_blocks,)](
                grad_y, grad_h_n, grad_c_n if grad_c_n is not None else grad_h_n, w_hh,
                h_prev, stash, d_gates, dhn_arg, d_h0, d_c0 if d_c0 is not None else d_h0,
                bs, off, T, B, H, int(bool(reverse)),
                CELL=cell, H_PAD=config.h_pad, BLOCK_B=config.block_b, DOT_FP32=_dot_fp32(dtype),
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
                    CELL=cell, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation of CONFIGS for real GPUs (no GPU needed): the resource check.
# ----------------------------------------------------------------------------------------------
#: Largest dynamic shared memory one block may request, per compute capability (bytes).
SHARED_LIMIT = {80: 166912, 90: 232448}

_KERNELS = {
    "forward_fused": "_forward_fused_kernel", "backward_fused": "_backward_fused_kernel",
    "forward_step": "_forward_step_kernel", "backward_step": "_backward_step_kernel",
}
# Pointer arguments that are float32 workspaces whatever the input dtype (the rest are the
# input dtype, except the int32 step tables).
_FP32_POINTERS = {"hprev_ptr", "stash_ptr", "h_in_ptr", "h_out_ptr", "c_ptr", "dgate_ptr",
                  "dhn_ptr", "dh_ptr", "dc_ptr", "dh0_ptr", "dc0_ptr"}
_INT_POINTERS = {"bs_ptr", "off_ptr"}


def aot_source(config):
    """The ``triton.compiler.ASTSource`` of ``config`` exactly as the launchers run it on a GPU:
    runtime integers unspecialised (the kernels declare them ``do_not_specialize``), pointers
    16-byte aligned (torch allocations are), ``DOT_FP32`` False (interpreter-only)."""
    from triton.compiler import ASTSource

    fn = globals()[_KERNELS[config.kernel]]
    if not hasattr(fn, "cache_key"):
        raise RuntimeError("AOT compilation needs the compiled Triton frontend: run it in a "
                           "process without TRITON_INTERPRET=1 (see aot_resources)")
    constexprs = {"CELL": config.cell, "BLOCK_B": config.block_b, "DOT_FP32": False}
    if config.strategy == "fused":
        constexprs["H_PAD"] = config.h_pad
    else:
        constexprs.update(BLOCK_H=config.block_h, BLOCK_K=config.block_k)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = ("i32" if name in _INT_POINTERS else
                    "fp32" if name in _FP32_POINTERS else TRITON_DTYPE[config.dtype])
            signature[name] = "*" + kind
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_config(config, cc):
    """Compile ``config`` for ``sm_<cc>`` (80 or 90) without a GPU; returns the compiled kernel
    (``.asm["cubin"]``, ``.metadata.shared``). Raises under ``TRITON_INTERPRET=1``."""
    from triton.backends.compiler import GPUTarget

    return triton.compile(aot_source(config), target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": config.num_warps})


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(config, cc):
    """Compile ``config`` for ``sm_<cc>`` and read its resources from the cubin.

    Returns a dict: config (name), cc, REG, STACK (bytes; > 0 means spills), SHARED (static
    shared memory, bytes), metadata_shared (dynamic shared memory the launch requests, bytes),
    shared_limit (bytes), compile_s.
    """
    import re
    import subprocess
    import tempfile
    import time

    start = time.perf_counter()
    kernel = compile_config(config, cc)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    found = {key: int(re.search(rf"\b{key}:(\d+)", dump).group(1))
             for key in ("REG", "STACK", "SHARED")}
    return dict(config=config.name, cc=cc, **found, metadata_shared=int(kernel.metadata.shared),
                shared_limit=SHARED_LIMIT[cc], compile_s=round(seconds, 2))


def _aot_worker():
    """Subprocess entry: reads [[KernelConfig fields, cc], ...] as JSON on stdin, prints one
    JSON resource dict per line."""
    import json
    import sys

    for fields, cc in json.load(sys.stdin):
        config = KernelConfig(**fields)
        # Named on stderr first, so that a compiler crash (an abort) says which config it was.
        print(f"compiling {config.name} for sm_{cc}", file=sys.stderr, flush=True)
        print(json.dumps(resource_usage(config, cc)), flush=True)


def aot_resources(configs=CONFIGS, ccs=(80, 90), jobs=2, cache_dir=None):
    """Resource usage of every (config, cc), compiled in ``jobs`` worker processes.

    The workers run without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit``
    functions cannot be compiled) and, when ``cache_dir`` is given, with that Triton cache
    (pass a fresh directory to measure cold compile time). Returns a list of dicts (see
    :func:`resource_usage`) in the order of ``configs`` then ``ccs``.
    """
    import dataclasses
    import json
    import subprocess
    import sys

    work = [[dataclasses.asdict(c), cc] for c in configs for cc in ccs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    code = "from fastrnn.kernels.triton_gpu import _aot_worker; _aot_worker()"
    procs = []
    for j in range(max(1, jobs)):
        share = work[j::max(1, jobs)]
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((proc, share))
    results = {}
    for proc, share in procs:
        out, err = proc.communicate(json.dumps(share))
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (rc {proc.returncode}):\n{err[-4000:]}")
        for line, (fields, cc) in zip(out.splitlines(), share):
            results[(KernelConfig(**fields), cc)] = json.loads(line)
    return [results[(KernelConfig(**fields), cc)] for fields, cc in work]
