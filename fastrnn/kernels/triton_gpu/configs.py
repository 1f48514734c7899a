"""The kernel configurations of the triton backend: the ONE list the dispatcher chooses from and the
AOT test compiles, and the choice of one for a call (strategy, padded H, tiles, warps). What fits
on which device: :mod:`.limits` (re-exported here)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

from fastrnn.cells import GATES
from fastrnn.kernels.triton_gpu import limits
from fastrnn.kernels.triton_gpu.limits import (MAX_REGISTERS, MIN_SM_REGISTERS, RESIDENT_BLOCK_H,
                                               RESIDENT_BUCKETS, RESIDENT_CHUNKS, SHARED_CLASSES,
                                               class_of, fused_limit, resident_max)

# for the launchers, tools and tests that read them here
ARCH_SHARED, DeviceLimits, device_limits = (limits.ARCH_SHARED, limits.DeviceLimits,
                                            limits.device_limits)

#: The cells this backend implements.
CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru", "peephole_lstm")

STASH = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 5, "gru": 4, "peephole_lstm": 5}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
STRATEGIES = ("fused", "step", "persistent")

# ----------------------------------------------------------------------------------------------
# Configurations: the ONE list the dispatcher chooses from and the AOT test compiles. The fused
# kernels keep W_hh in shared memory, so which of them fit depends on the device's largest
# dynamic shared memory per block (opt-in, cudaDevAttrMaxSharedMemoryPerBlockOptin).
# ----------------------------------------------------------------------------------------------
BLOCK_B = 16  # batch rows per program: the tl.dot minimum M on every NVIDIA target.
FUSED_BUCKETS = (32, 64, 128)  # H_PAD values of the fused kernels (H <= 32 pads to 32).
#: ``enable_fp_fusion`` of every launch and AOT compile (Triton 3.9's default, which the
#: measured resources and the float32 parity tolerances were made with; pinned because Triton
#: 3.10 turns the default off).
FP_FUSION = True


def _fused_table(klass):
    """{(direction, cell, dtype name): largest fused H} of class index ``klass`` (None: 0)."""
    return {(d, cell, dtype): fused_limit(d, cell, dtype, klass)
            for d in ("forward", "backward") for cell in CELLS for dtype in DTYPES}


#: {shared-memory class: {(direction, cell, dtype name): largest fused H}}; 0: step only.
FUSED_MAX_HIDDEN_BY_SHARED = {shared: _fused_table(k) for k, shared in enumerate(SHARED_CLASSES)}
_STEP_ONLY = _fused_table(None)
#: The largest class's limits: sm_80 and sm_90, and the interpreter.
FUSED_MAX_HIDDEN = FUSED_MAX_HIDDEN_BY_SHARED[SHARED_CLASSES[0]]


def fused_limits(shared=None, registers=MIN_SM_REGISTERS):
    """The FUSED_MAX_HIDDEN table of a device with ``shared`` opt-in bytes of shared memory per
    block and ``registers`` per SM (None: the largest class, as under the interpreter)."""
    klass = class_of(shared, registers)
    return _STEP_ONLY if klass is None else FUSED_MAX_HIDDEN_BY_SHARED[SHARED_CLASSES[klass]]


#: Tiles of the tiled kernels (the step and persistent strategies): hidden units per program,
#: reduction chunk. Their pass loop keeps h, c (or dh, dc) and the cell's own tiles in
#: registers across passes, so they are compiled with ``maxnreg`` = MAX_REGISTERS
#: (:func:`launch_options`). Measured (Triton 3.9, 8 warps): with 32-unit K chunks the float32
#: lstm and peephole_lstm spill 8-16 B at 255 registers (sm_80, sm_90); 16-unit chunks: 188-207
#: registers, no spill; without maxnreg ptxas stops 8-warp kernels at 128 registers and the
#: 16-bit lstm and gru spill 8-32 B. The persistent strategy serves a call whose grid,
#: ceil(B / BLOCK_B) x ceil(H / STEP_BLOCK_H) programs, fits the device's SMs
#: (:func:`persistent_fits`).
STEP_BLOCK_H = 32
STEP_BLOCK_K = 16


@dataclass(frozen=True)
class KernelConfig:
    """One compiled kernel variant.

    ``kernel``: "<direction>_<strategy>", direction "forward" | "backward", strategy one of
    :data:`STRATEGIES`;
    ``h_pad``: the padded hidden size of the fused kernels (0 for step kernels, where H is a
    runtime argument); ``block_h``/``block_k``: the step tiles (0 for fused kernels); ``save``:
    a forward kernel writes what backward reads (h_prev, the stash); False when no backward
    follows (always True for backward kernels); ``prefetch``: a fused forward kernel loads each
    step's input tiles one step ahead (:func:`prefetches`); ``k_pad``: a persistent kernel
    keeps its W_hh slice resident for H <= k_pad (0: it streams the slice every step).
    """

    kernel: str
    cell: str
    dtype: str
    h_pad: int
    num_warps: int
    block_b: int = BLOCK_B
    block_h: int = 0
    block_k: int = 0
    save: bool = True
    prefetch: bool = False
    k_pad: int = 0

    @property
    def strategy(self):
        return self.kernel.split("_")[1]

    @property
    def name(self):
        size = f"H{self.h_pad}" if self.h_pad else f"bh{self.block_h}xbk{self.block_k}"
        return (f"{self.kernel}-{self.cell}-{self.dtype}-{size}-w{self.num_warps}"
                + ("" if self.save else "-nosave") + ("-prefetch" if self.prefetch else "")
                + (f"-k{self.k_pad}" if self.k_pad else ""))


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
    # the same for float16 since its fast activations (2026-12-06): 8 warps STACK 8 on sm_90
    # (no stash, 64 registers).
    ("forward_fused", "lstm", "float16", 32): 4,
    # since the fast activations, under Triton 3.6: 8 warps STACK 8-16 on sm_90 at 80 (gru, no
    # stash) and 64 (peephole_lstm, no stash) registers.
    ("forward_fused", "gru", "float16", 64): 4, ("forward_fused", "gru", "bfloat16", 64): 4,
    ("forward_fused", "peephole_lstm", "float16", 32): 4,
    ("forward_fused", "peephole_lstm", "bfloat16", 32): 4,
    # since the one-step-ahead prefetch (2026-12-06), under Triton 3.6: 8 warps STACK 8 on
    # sm_86/sm_89 at 128 registers.
    ("forward_fused", "peephole_lstm", "float32", 32): 4,
}


def prefetches(dtype, h_pad):
    """Whether the fused forward kernel of ``dtype`` (name) at ``h_pad`` loads step s+1's xg tiles
    during step s: all but the 16-bit ones at H_PAD 128, where the G more float32 tiles the
    prefetch holds spill (measured, Triton 3.9: 8 B STACK at 128 registers for rnn on sm_80-89,
    16-64 B at 255 for lstm, gru and peephole_lstm on sm_90)."""
    return dtype == "float32" or h_pad < 128


def _resident_fits(direction, cell, dtype, k_pad, shared=None, registers=MIN_SM_REGISTERS):
    """Whether the dispatcher can choose the resident kernel of ``k_pad`` on a device with these
    limits: within its resident limit and over its fused one (H up to that runs fused)."""
    return (fused_limits(shared, registers)[(direction, cell, dtype)] < k_pad
            <= resident_max(direction, cell, dtype, shared, registers))


def _build_configs():
    configs = []
    for cell in CELLS:
        for dtype in DTYPES:
            for direction in ("forward", "backward"):
                saves = (True, False) if direction == "forward" else (True,)
                for h_pad in FUSED_BUCKETS:
                    if h_pad <= FUSED_MAX_HIDDEN[(direction, cell, dtype)]:
                        kernel = f"{direction}_fused"
                        warps = _NUM_WARPS_EXCEPTIONS.get((kernel, cell, dtype, h_pad), NUM_WARPS)
                        prefetch = direction == "forward" and prefetches(dtype, h_pad)
                        configs += [KernelConfig(kernel, cell, dtype, h_pad, warps, save=save,
                                                 prefetch=prefetch) for save in saves]
                kernel = f"{direction}_persistent"
                configs += [KernelConfig(kernel, cell, dtype, 0, NUM_WARPS,
                                         block_h=RESIDENT_BLOCK_H, save=save, k_pad=k_pad,
                                         block_k=k_pad // RESIDENT_CHUNKS)
                            for k_pad in RESIDENT_BUCKETS
                            if any(_resident_fits(direction, cell, dtype, k_pad, shared)
                                   for shared in SHARED_CLASSES) for save in saves]
                for strategy in ("step", "persistent"):  # after the resident: the fallback
                    configs += [KernelConfig(f"{direction}_{strategy}", cell, dtype, 0,
                                             NUM_WARPS, block_h=STEP_BLOCK_H,
                                             block_k=STEP_BLOCK_K, save=save) for save in saves]
    return tuple(configs)


#: Every kernel configuration the dispatcher can choose on some device (the largest class's).
CONFIGS = _build_configs()


@functools.lru_cache(maxsize=None)
def dispatchable(shared=None, registers=MIN_SM_REGISTERS):
    """The configurations of :data:`CONFIGS` the dispatcher can choose on a device with these
    limits (see :func:`fused_limits`): every step and streamed persistent kernel, the fused
    buckets within the fused limits, the resident buckets within the resident limits and over
    the fused ones (H up to a fused limit runs fused). The AOT test compiles these per arch."""
    fused = fused_limits(shared, registers)

    def allowed(c):
        key = (c.kernel.split("_")[0], c.cell, c.dtype)
        return c.h_pad <= fused[key] and (not c.k_pad or _resident_fits(*key, c.k_pad, shared,
                                                                        registers))
    return tuple(c for c in CONFIGS if allowed(c))


def programmatic_launch(config, cc):
    """Whether ``config``'s kernel runs with programmatic dependent launch on ``sm_<cc>`` (cc
    None: the interpreter, never): the step strategy's kernels on sm_90 and later (the PTX
    ``griddepcontrol`` needs sm_90). Each waits at its start for the kernel before it and at once
    lets the next one launch, so that the next pass's launch and start overlap this one's run."""
    return config.strategy == "step" and cc is not None and cc >= 90


def launch_options(config, cc=None):
    """The compile and launch options of ``config`` on ``sm_<cc>`` (what the launchers and the
    AOT compile pass): warps and the pinned ``enable_fp_fusion``; the tiled kernels with every
    register a thread may have (their pass loop carries state: see STEP_BLOCK_H), the persistent
    strategy launched cooperatively (all programs resident at once, or no launch), the step
    strategy with programmatic dependent launch where :func:`programmatic_launch`."""
    options = dict(num_warps=config.num_warps, enable_fp_fusion=FP_FUSION)
    if config.strategy != "fused":
        options["maxnreg"] = MAX_REGISTERS
    if config.strategy == "persistent":
        options["launch_cooperative_grid"] = True
    if programmatic_launch(config, cc):
        options["launch_pdl"] = True
    return options


def kernel_options(config, cell_math, cc=None):
    """Every keyword of a launch of ``config``'s kernel on ``sm_<cc>`` (None: the interpreter),
    what the launchers pass and bench/triton_aot.py compiles: the constexprs (the cell's step
    math ``cell_math``, the tiles, whether a forward kernel saves for backward, whether a fused
    forward prefetches, whether a tiled kernel waits for the kernel before it:
    :func:`programmatic_launch`) and :func:`launch_options`."""
    tiles = (dict(H_PAD=config.h_pad) if config.strategy == "fused" else
             dict(BLOCK_H=config.block_h, BLOCK_K=config.block_k, K_PAD=config.k_pad,
                  PDL=programmatic_launch(config, cc)))
    if config.kernel.startswith("forward"):
        tiles["SAVE"] = config.save
    if config.kernel == "forward_fused":
        tiles["PREFETCH"] = config.prefetch
    return dict(CELL=cell_math, BLOCK_B=config.block_b, **tiles, **launch_options(config, cc))


_forced = None  # (strategy, step tile overrides) set by forced_strategy()


@contextlib.contextmanager
def forced_strategy(strategy, block_h=None, block_k=None, k_pad=None):
    """Within the ``with`` block, run every recurrence with ``strategy`` (one of
    :data:`STRATEGIES`) regardless of H and the device -- for tests and benchmarks: the step and
    persistent strategies at small H.
    ``block_h``/``block_k`` (powers of two >= 16) override their tiles so that H <= 32 still
    spans several hidden blocks and reduction chunks; ``k_pad`` (persistent): 0 streams W_hh,
    a power of two >= H and a multiple of ``block_k`` keeps it resident. With none of the
    three, the persistent strategy keeps W_hh resident where the dispatcher would. Not
    thread-safe."""
    global _forced
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for block in (block_h, block_k):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"step tiles must be powers of two >= 16, got {block}")
    if k_pad and (strategy != "persistent" or k_pad & (k_pad - 1) or k_pad % (block_k or 1)):
        raise ValueError(f"k_pad must be a power of two and a multiple of block_k for the "
                         f"persistent strategy, got {k_pad}")
    previous, _forced = _forced, (strategy, block_h, block_k, k_pad)
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


def _limits_of(limits):
    return fused_limits() if limits is None else fused_limits(limits.shared, limits.registers)


def persistent_fits(batch, hidden_size, limits, block_h=STEP_BLOCK_H):
    """Whether the persistent kernels' grid for ``batch`` rows at ``hidden_size`` (``block_h``
    units a program) fits the device with ``limits`` (a :class:`DeviceLimits`; None, the
    interpreter: never) at one program per SM -- the residency a cooperative launch needs and
    every configuration allows (the AOT test checks that each compiles within one SM's registers
    and shared memory)."""
    if limits is None or batch <= 0:
        return False
    return -(-batch // BLOCK_B) * -(-hidden_size // block_h) <= limits.sms


def select_config(direction, cell, dtype, hidden_size, strategy=None, rows=0, limits=None,
                  save=True, batch=0):
    """The :class:`KernelConfig` (from :func:`dispatchable` on a device with ``limits``, a
    :class:`DeviceLimits`; None: the largest class) that runs ``direction`` ("forward" or
    "backward") of ``cell`` at ``hidden_size`` for ``dtype`` (a torch dtype).

    ``strategy`` None (and no :func:`forced_strategy` in effect) picks "fused" when
    ``hidden_size`` is within the device's :func:`fused_limits`, else "persistent" where the
    grid of ``batch`` rows fits the device (:func:`persistent_fits`), else "step"; "fused" at a
    hidden size no fitting fused bucket covers raises ValueError. "persistent" keeps W_hh
    resident (the least ``k_pad`` >= H) where such a config exists and its grid fits.
    ``rows`` (N, the packed rows) sends inputs whose (N, max(G, S) * H) tensors reach
    :data:`FUSED_MAX_ELEMENTS` away from "fused".
    ``save`` False: a forward kernel that writes nothing for backward (backward ignores it).
    """
    name = _dtype_name(dtype)
    overrides = {}
    if strategy is None and _forced is not None:
        strategy, block_h, block_k, k_pad = _forced
        overrides = {k: v for k, v in (("block_h", block_h), ("block_k", block_k),
                                       ("k_pad", k_pad)) if v is not None}
    if strategy is None:
        small = hidden_size <= _limits_of(limits)[(direction, cell, name)]
        fits_int32 = rows * max(GATES[cell], STASH[cell]) * hidden_size < FUSED_MAX_ELEMENTS
        strategy = ("fused" if small and fits_int32 else
                    "persistent" if persistent_fits(batch, hidden_size, limits) else "step")
    configs = CONFIGS if limits is None else dispatchable(limits.shared, limits.registers)
    for config in configs:
        if ((config.kernel, config.cell, config.dtype) != (f"{direction}_{strategy}", cell, name)
                or config.save != (save or direction == "backward")):
            continue
        if strategy == "fused":
            if hidden_size <= config.h_pad:
                return config
        elif overrides:
            if 0 < overrides.get("k_pad", 0) < hidden_size:
                raise ValueError(f"forced k_pad {overrides['k_pad']} < H={hidden_size}")
            if not config.k_pad:  # the streaming tiles, overridden
                return dataclasses.replace(config, **overrides)
        elif not config.k_pad or (hidden_size <= config.k_pad and persistent_fits(
                batch, hidden_size, limits, config.block_h)):  # resident where its grid fits
            return config
    raise ValueError(f"no {strategy} {direction} kernel for {cell} {name} at H={hidden_size}"
                     + ("" if limits is None else f" fits this device ({limits.shared} B shared)"))


def fused_max_hidden(direction, cell, dtype, limits=None):
    """Largest H the fused strategy serves for ``direction`` of ``cell`` in ``dtype`` (torch) on
    a device with ``limits`` (:class:`DeviceLimits`; None: the largest class)."""
    return _limits_of(limits)[(direction, cell, _dtype_name(dtype))]


def strategy_note(cell, dtype, limits):
    """Which strategy runs ``cell`` in ``dtype`` on a device with ``limits`` (its
    :func:`device_limits`), and why, in one line: the fused limits of its shared-memory class."""
    forward, backward = (fused_max_hidden(d, cell, dtype, limits) for d in ("forward", "backward"))
    where = ("the interpreter (sm_80/sm_90 limits)" if limits is None else
             f"sm_{limits.cc}: {limits.shared} B shared memory per block, {limits.registers} "
             f"registers per SM")
    resident = [resident_max(d, cell, _dtype_name(dtype), *([] if limits is None else
                                                            [limits.shared, limits.registers]))
                for d in ("forward", "backward")]
    beyond = ("step kernels" if limits is None else
              f"one persistent launch (hidden split over SMs; W_hh resident up to H="
              f"{resident[0]} forward / H={resident[1]} backward while ceil(B/{BLOCK_B}) x "
              f"ceil(H/{RESIDENT_BLOCK_H}) <= {limits.sms} SMs, else streamed) while "
              f"ceil(B/{BLOCK_B}) x ceil(H/{STEP_BLOCK_H}) <= {limits.sms} SMs, else step kernels")
    if not forward and not backward:
        return f"triton strategy: no fused kernel fits ({where}); {beyond}"
    return (f"triton strategy: fused kernels (W_hh in shared memory) up to H={forward} forward / "
            f"H={backward} backward; beyond: {beyond} ({where})")

