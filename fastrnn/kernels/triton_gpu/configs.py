"""The kernel configurations of the triton backend: the ONE list the dispatcher chooses from and the
AOT test compiles, and the choice of one for a call (strategy, padded H, tiles, warps)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from fastrnn.cells import GATES

#: The cells this backend implements.
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru", "peephole_lstm")

STASH = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 5, "gru": 4, "peephole_lstm": 5}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
STRATEGIES = ("fused", "step")

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
    ("peephole_lstm", "16bit"): (128, 64), ("peephole_lstm", "float32"): (64, 64),
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
    # 8 warps: STACK 8 on sm_80 at 128 registers under Triton 3.6 (3.9: 136, STACK 0); 4 warps:
    # 191 / 160 registers (sm_80 / sm_90) under 3.6, 156 / 140 under 3.9, STACK 0.
    ("backward_step", "peephole_lstm", "float32", 0): 4,
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
                kernel = f"{direction}_step"
                warps = _NUM_WARPS_EXCEPTIONS.get((kernel, cell, dtype, 0), NUM_WARPS)
                configs.append(KernelConfig(kernel, cell, dtype, 0, warps,
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


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"

