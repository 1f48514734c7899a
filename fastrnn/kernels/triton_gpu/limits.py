"""What fits on which device: the limits the dispatcher reads of a CUDA device, and the
largest H of the strategies that keep W_hh on-chip per shared-memory class, measured by
compiling every configuration ahead of time (``tests/test_triton_aot.py``). No Triton import."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

#: Opt-in shared memory per block (bytes) of the archs the AOT test compiles for: sm_80 (A100),
#: sm_86 (A10, RTX 30), sm_89 (L4, L40S, RTX 40), sm_90 (H100/H200). sm_120 (RTX 50) also has
#: 101376. All have 65536 registers per SM and at most 255 per thread.
ARCH_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_REGISTERS = 255  # per thread (ptxas never exceeds it; more would spill)
MIN_SM_REGISTERS = 65536  # per SM: 8 warps x 32 threads x 255 registers of one block fit


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

#: The persistent kernels with W_hh resident (``KernelConfig.k_pad``): 16 units a program, each
#: product's reduction (H padded to a power of two, K_PAD) split into RESIDENT_CHUNKS chunks,
#: one per warp. Largest K_PAD (forward, backward) per shared-memory class (as _FUSED_LIMITS):
#: the largest bucket whose kernels compile for every arch of the class with zero spill bytes
#: and shared memory within its limit under Triton 3.9 and 3.6 (measured 2026-12-06:
#: bench/results/triton_resources.md). The next bucket up needs more shared memory than the
#: class has (float32's tf32x3 keeps 2-4 copies of the weights: 576 KB for an lstm forward at
#: 1024) or spills (rnn float32 backward at 1024: 16 B on sm_80).
RESIDENT_BLOCK_H = 16
RESIDENT_CHUNKS = 8
RESIDENT_BUCKETS = (128, 256, 512, 1024)
_RESIDENT_LIMITS = {
    ("rnn", "16bit"): ((1024, 1024), (1024, 1024)), ("rnn", "float32"): ((512, 512), (512, 512)),
    ("lstm", "16bit"): ((1024, 1024), (512, 512)), ("lstm", "float32"): ((256, 512), (128, 256)),
    ("gru", "16bit"): ((1024, 1024), (512, 512)), ("gru", "float32"): ((256, 512), (128, 256)),
    ("peephole_lstm", "16bit"): ((1024, 1024), (512, 512)),
    ("peephole_lstm", "float32"): ((256, 512), (128, 256)),
}


def class_of(shared, registers):
    """The index in SHARED_CLASSES of a device with ``shared`` opt-in bytes of shared memory per
    block and ``registers`` per SM (shared None: 0, as under the interpreter), None below."""
    if shared is None:
        return 0
    if registers >= MIN_SM_REGISTERS:
        for klass, least in enumerate(SHARED_CLASSES):
            if shared >= least:
                return klass
    return None


def _limit(table, direction, cell, dtype, klass):
    if klass is None:
        return 0
    key = ("rnn" if cell.startswith("rnn") else cell, "float32" if dtype == "float32" else "16bit")
    return table[key][klass][direction == "backward"]


def fused_limit(direction, cell, dtype, klass):
    """Largest fused H of ``direction`` ("forward"/"backward") of ``cell`` in ``dtype`` (name)
    in shared-memory class ``klass`` (:func:`class_of`; None: 0)."""
    return _limit(_FUSED_LIMITS, direction, cell, dtype, klass)


def resident_max(direction, cell, dtype, shared=None, registers=MIN_SM_REGISTERS):
    """Largest H whose persistent ``direction`` kernel keeps W_hh resident for ``cell`` in
    ``dtype`` (name) on a device with these limits (as :func:`class_of`); 0: none."""
    return _limit(_RESIDENT_LIMITS, direction, cell, dtype, class_of(shared, registers))


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
