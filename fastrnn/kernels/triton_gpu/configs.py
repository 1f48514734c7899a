"""The kernel configurations of the triton backend: the ONE list the dispatcher chooses from and the
AOT test compiles, and the choice of one for a call (strategy, padded H, tiles, warps)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastrnn.cells import GATES

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
#: Opt-in shared memory per block (bytes) of the archs the AOT test compiles for: sm_80 (A100),
#: sm_86 (A10, RTX 30), sm_89 (L4, L40S, RTX 40), sm_90 (H100/H200). sm_120 (RTX 50) also has
#: 101376. All have 65536 registers per SM and at most 255 per thread.
ARCH_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_REGISTERS = 255  # per thread (ptxas never exceeds it; more would spill)
MIN_SM_REGISTERS = 65536  # per SM: 8 warps x 32 threads x 255 registers of one block fit
#: ``enable_fp_fusion`` of every launch and AOT compile (Triton 3.9's default, which the
#: measured resources and the float32 parity tolerances were made with; pinned because Triton
#: 3.10 turns the default off).
FP_FUSION = True

#: Largest H the fused (weights-resident) strategy serves, per shared-memory class and
#: (cell, dtype group): (forward, backward). A class is the least opt-in shared memory per block
#: of the devices it covers, largest first; a device below the last class (or with fewer than
#: MIN_SM_REGISTERS registers per SM) runs the step strategy only. Each limit is the largest
#: bucket whose kernel compiles, on every AOT arch of the class, with zero spill bytes (with the
#: aligned pointers the launcher passes) and dynamic shared memory within the class
#: (tests/test_triton_aot.py; measured: bench/results/triton_resources.md). Rejected (measured
#: 2026-11-23, Triton 3.9): H_PAD 256 spills for every cell and dtype (rnn fp16: 120-136 B STACK
#: at 8 warps; fp32 and lstm/gru: also over the shared limit); float32 lstm and gru at 128:
#: weights alone are 256 KB and 192 KB; lstm fp16/bf16 backward at 128 needs 180 KB shared
#: (over sm_80's 163 KB). The 99 KB class loses every fused kernel over 101376 B (sm_80 table).
SHARED_CLASSES = (166912, 101376)  # sm_80 / sm_90 (and sm_87, sm_100); sm_86 / sm_89 / sm_120
_FUSED_LIMITS = {  # (cell, dtype group) -> ((forward, backward) per class of SHARED_CLASSES)
    ("rnn", "16bit"): ((128, 128), (128, 128)), ("rnn", "float32"): ((128, 128), (64, 64)),
    ("lstm", "16bit"): ((128, 64), (64, 64)), ("lstm", "float32"): ((64, 64), (32, 32)),
    ("gru", "16bit"): ((128, 128), (64, 64)), ("gru", "float32"): ((64, 64), (32, 32)),
    ("peephole_lstm", "16bit"): ((128, 64), (64, 64)),
    ("peephole_lstm", "float32"): ((64, 64), (32, 32)),
}


def _fused_table(klass):
    """{(direction, cell, dtype name): largest fused H} of class index ``klass`` (None: 0)."""
    def limit(direction, cell, dtype):
        key = ("rnn" if cell.startswith("rnn") else cell,
               "float32" if dtype == "float32" else "16bit")
        return 0 if klass is None else _FUSED_LIMITS[key][klass][direction == "backward"]
    return {(d, cell, dtype): limit(d, cell, dtype)
            for d in ("forward", "backward") for cell in CELLS for dtype in DTYPES}


#: {shared-memory class: {(direction, cell, dtype name): largest fused H}}; 0: step only.
FUSED_MAX_HIDDEN_BY_SHARED = {shared: _fused_table(k) for k, shared in enumerate(SHARED_CLASSES)}
_STEP_ONLY = _fused_table(None)
#: The largest class's limits: sm_80 and sm_90, and the interpreter.
FUSED_MAX_HIDDEN = FUSED_MAX_HIDDEN_BY_SHARED[SHARED_CLASSES[0]]


def fused_limits(shared=None, registers=MIN_SM_REGISTERS):
    """The FUSED_MAX_HIDDEN table of a device with ``shared`` opt-in bytes of shared memory per
    block and ``registers`` per SM (None: the largest class, as under the interpreter)."""
    if shared is None:
        return FUSED_MAX_HIDDEN
    if registers >= MIN_SM_REGISTERS:
        for least in SHARED_CLASSES:
            if shared >= least:
                return FUSED_MAX_HIDDEN_BY_SHARED[least]
    return _STEP_ONLY


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
    step's input tiles one step ahead (:func:`prefetches`).
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

    @property
    def strategy(self):
        return self.kernel.split("_")[1]

    @property
    def name(self):
        size = f"H{self.h_pad}" if self.h_pad else f"bh{self.block_h}xbk{self.block_k}"
        return (f"{self.kernel}-{self.cell}-{self.dtype}-{size}-w{self.num_warps}"
                + ("" if self.save else "-nosave") + ("-prefetch" if self.prefetch else ""))


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
                for strategy in ("step", "persistent"):
                    configs += [KernelConfig(f"{direction}_{strategy}", cell, dtype, 0,
                                             NUM_WARPS, block_h=STEP_BLOCK_H,
                                             block_k=STEP_BLOCK_K, save=save) for save in saves]
    return tuple(configs)


#: Every kernel configuration the dispatcher can choose on some device (the largest class's).
CONFIGS = _build_configs()


@functools.lru_cache(maxsize=None)
def dispatchable(shared=None, registers=MIN_SM_REGISTERS):
    """The configurations of :data:`CONFIGS` the dispatcher can choose on a device with these
    limits (see :func:`fused_limits`): every step kernel and the fused buckets within the limits.
    The AOT test compiles these per arch."""
    limits = fused_limits(shared, registers)
    return tuple(c for c in CONFIGS
                 if c.h_pad <= limits[(c.kernel.split("_")[0], c.cell, c.dtype)])


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
             dict(BLOCK_H=config.block_h, BLOCK_K=config.block_k,
                  PDL=programmatic_launch(config, cc)))
    if config.kernel.startswith("forward"):
        tiles["SAVE"] = config.save
    if config.kernel == "forward_fused":
        tiles["PREFETCH"] = config.prefetch
    return dict(CELL=cell_math, BLOCK_B=config.block_b, **tiles, **launch_options(config, cc))


_forced = None  # (strategy, step tile overrides) set by forced_strategy()


@contextlib.contextmanager
def forced_strategy(strategy, block_h=None, block_k=None):
    """Within the ``with`` block, run every recurrence with ``strategy`` (one of
    :data:`STRATEGIES`) regardless of H and the device -- for tests: the step and persistent
    strategies at small H.
    ``block_h``/``block_k`` (powers of two >= 16) override their tiles so that H <= 32 still
    spans several hidden blocks and reduction chunks. Not thread-safe."""
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


class DeviceLimits(NamedTuple):
    """What the dispatcher reads of a CUDA device: compute capability (``10 * major + minor``),
    opt-in shared memory per block (bytes), registers per SM, SM count."""

    cc: int
    shared: int
    registers: int
    sms: int


@functools.lru_cache(maxsize=None)
def _cuda_limits(index):
    props = torch.cuda.get_device_properties(index)
    cc = 10 * props.major + props.minor
    # Attribute names differ across torch versions; missing ones come from the AOT table (an
    # unknown arch: the 48 KB every device grants, so step only).
    shared = (getattr(props, "shared_memory_per_block_optin", None)
              or ARCH_SHARED.get(cc, 49152))
    registers = getattr(props, "regs_per_multiprocessor", None) or MIN_SM_REGISTERS
    return DeviceLimits(cc, int(shared), int(registers), int(props.multi_processor_count))


def device_limits(device):
    """The :class:`DeviceLimits` of ``device`` (a torch.device; read once per CUDA device
    index), or None for a CPU device (the interpreter: the largest class, like sm_80/sm_90)."""
    if device.type != "cuda":
        return None
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


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
    hidden size no fitting fused bucket covers raises ValueError.
    ``rows`` (N, the packed rows) sends inputs whose (N, max(G, S) * H) tensors reach
    :data:`FUSED_MAX_ELEMENTS` away from "fused".
    ``save`` False: a forward kernel that writes nothing for backward (backward ignores it).
    """
    name = _dtype_name(dtype)
    overrides = {}
    if strategy is None and _forced is not None:
        strategy, block_h, block_k = _forced
        overrides = {k: v for k, v in (("block_h", block_h), ("block_k", block_k)) if v}
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
        if strategy != "fused":
            return dataclasses.replace(config, **overrides) if overrides else config
        if hidden_size <= config.h_pad:
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
    beyond = ("step kernels" if limits is None else
              f"one persistent launch (hidden split over SMs) while "
              f"ceil(B/{BLOCK_B}) x ceil(H/{STEP_BLOCK_H}) <= {limits.sms} SMs, else step kernels")
    if not forward and not backward:
        return f"triton strategy: no fused kernel fits ({where}); {beyond}"
    return (f"triton strategy: fused kernels (W_hh in shared memory) up to H={forward} forward / "
            f"H={backward} backward; beyond: {beyond} ({where})")

