"""Triton GPU kernels for the fastrnn kernel contract (:mod:`fastrnn.kernels.reference`).

Cells ``rnn_tanh``, ``rnn_relu``, ``lstm`` (without ``proj_size``), ``gru`` and
``peephole_lstm``; dtypes float32, float16 and bfloat16. One kernel body per strategy and
direction of work serves every cell: the cell is its ``CELL`` ``tl.constexpr``, the
``@triton.jit`` step helpers of the cell's own file (:mod:`.step_math` says what they are).
T (sequence length) and the batch are runtime arguments, never compile-time constants.
The hidden state, the cell state and every accumulation are float32 whatever the input dtype.
The input projection ``xg`` is made by the caller; the kernels run the recurrence only. On CUDA
the layers add the bias in that projection's GEMM (``torch.addmm``, whose cuBLASLt epilogue adds
it for free; ``CAPABILITIES.bias_in_projection``): a bias folded into the kernels' loads cost
registers and made seven fused configurations spill (measured, sm_80/sm_90). A ``bias`` given to
:func:`recurrence_forward` (the interpreter's path) is one elementwise pass before the kernels.

Strategies (chosen by :func:`select_config` from H, B, the cell, the dtype and the device)
-----------------------------------------------------------------------------------------
``fused``  one launch per layer and direction for the whole sequence: one program per block of
           ``BLOCK_B`` = 16 batch rows runs the time loop and keeps ``W_hh`` (G tiles of
           ``H_PAD x H_PAD``, H padded to a power of two and masked) on-chip for all steps.
           Triton keeps the loop-invariant weight tiles in shared memory (the dot operand
           staging is hoisted out of the time loop), so the limit is shared memory (weights +
           layout-conversion scratch) and registers. The largest H (:func:`fused_max_hidden`,
           per direction, cell, dtype and device) is the largest ``H_PAD`` whose kernel
           compiles with zero spill bytes, at most 255 registers and dynamic shared memory
           within the opt-in limit per block of every arch of the device's shared-memory class
           (``tests/test_triton_aot.py``; measured table in ``bench/results/triton_resources.md``).
           The launcher reads the device's opt-in shared memory per block and registers per SM
           (:func:`device_limits`, once per device); ``backend_for`` names the strategy and why
           (:func:`strategy_note`):

           ============  ===========================  ===========================
           class         >= 163 KB: sm_80, sm_90      >= 99 KB: sm_86, sm_89, sm_120
                         (A100, H100; sm_87, sm_100)  (A10, L4, L40S, RTX 30/40/50)
           cell          fp16/bf16     float32        fp16/bf16     float32
                         fwd / bwd     fwd / bwd      fwd / bwd     fwd / bwd
           ============  ============  =============  ============  =============
           rnn_tanh/relu 128 / 128     128 / 128      128 / 128     64 / 64
           lstm          128 / 64      64 / 64        64 / 64       32 / 32
           gru           128 / 128     64 / 64        64 / 64       32 / 32
           peephole_lstm 128 / 64      64 / 64        64 / 64       32 / 32
           ============  ============  =============  ============  =============

           A device with less shared memory per block (or under 65536 registers per SM) runs
           ``step`` only. Under the interpreter (CPU tensors) the first class applies.
           The launcher passes only 16-byte-aligned pointers (it copies an input view that is
           not, e.g. ``h0[k]``), so the aligned pointer variant the AOT test checks is the only
           one that runs: with unaligned inputs, the fp16/bf16 lstm and peephole_lstm forward at
           128 spill 144-152 B on sm_80 (Triton 3.9).
           Inputs whose packed (N, S*H) tensors reach 2**31 elements also go to ``step``
           (the fused kernels index with int32 tiles, :data:`FUSED_MAX_ELEMENTS`).
           The forward kernels load step s+1's xg tiles during step s (into registers:
           ``KernelConfig.prefetch``, :func:`~.configs.prefetches`), all but the 16-bit ones at
           ``H_PAD`` 128, which would spill; those load a step's tiles at its start, before
           its products. Either way the same bits.

``step``   any larger H -- no on-chip limit (the largest H is bounded by device memory for the
           float32 workspaces, O(N * 6 * H)): the *tiled* kernels, one launch per pass. Their
           grid splits the batch into blocks of 16 rows and the hidden dimension into blocks
           of ``BLOCK_H`` units, and each program streams its ``W_hh`` slice (from L2) in
           ``BLOCK_K`` chunks. The forward's pass s is step s: the hidden state crosses steps
           through global buffers: a ping-pong pair for h, whose every unit every program
           reads, in the products' dtype (16-bit models exchange half the bytes; the products
           read h in that dtype anyway), and float32 h and c, each program's own units. The
           backward is T + 1 passes: pass s finishes step s-1 (``dh += d_gates(s-1) @ W_hh``,
           which needs every program's gate gradients of the previous pass, exchanged through a
           ping-pong pair in the products' dtype like h) and runs the elementwise BPTT of step
           s for the program's own units. Between launches the
           launch boundary orders the passes: no grid-wide barrier.
           Launch cost: only the first pass goes through Triton's JIT; the others call the
           compiled kernel's launcher with the same arguments (``launch._launch_passes``: 1.6
           instead of 15 µs of Python a pass on an Intel Xeon, ``bench/launch_overhead.py``),
           and on sm_90+ they use programmatic dependent launch
           (:func:`~.configs.programmatic_launch`): each kernel waits for the previous one's
           end before touching memory (``griddepcontrol.wait``, checked in the PTX by the AOT
           test) and lets the next one launch at once, so its launch and start overlap this
           one's run.

``persistent`` the same tiled kernels, one launch for all the passes of a layer, direction and
           pass kind (forward; backward): one program per (16-row batch block, hidden block),
           all resident at once -- a cooperative launch (``launch_cooperative_grid``), chosen
           on a CUDA device only where the grid fits its SMs at one program each
           (:func:`~.configs.persistent_fits`), else ``step``. Two variants
           (:func:`select_config`): with W_hh *resident* (``KernelConfig.k_pad``, constexpr
           ``K_PAD``), 16-unit blocks whose G weight slices (K_PAD x 16 each, H padded to a
           power of two) are loaded once and kept in shared memory for the whole launch, each
           product's reduction split into 8 chunks, one per warp (a batched ``tl.dot``, each
           chunk on its own accumulator, the partial sums added in a fixed order), chosen
           where H <= the resident limit of the device's class and ceil(B/16) x ceil(H/16)
           programs fit (H=1024 up to B=32, H=512 up to B=64 on a 132-SM H100/H200); else
           *streamed*, 32 x 16 tiles as ``step`` (the slice read from L2 every pass), where
           ceil(B/16) x ceil(H/32) fit (H=1024 up to B=64, H=512 up to B=128):

           ============  ==================  ==================
           resident H    fp16/bf16 fwd/bwd   float32 fwd/bwd
           ============  ==================  ==================
           >= 163 KB     1024/1024           rnn 512/512,
           sm_80, sm_90                      others 256/512
           >= 99 KB      rnn 1024/1024,      rnn 512/512,
           sm_86, sm_89  others 512/512      others 128/256
           ============  ==================  ==================

           (each the largest bucket of 128-1024 whose kernels compile without spills within
           the class's shared memory under Triton 3.9 and 3.6; float32's tf32x3 keeps 2-4
           copies of the weights.) Within the launch, before each pass a program waits until
           every program of its batch block has finished the previous one (thread 0 polls an
           int32 counter with acquire loads, then a CTA barrier), and after it arrives (a CTA
           barrier, then a release atomic add); h, c (forward) and dh, dc (backward) stay in
           registers between passes. Each step's gate gradients have rows of their own and h
           alternates between two buffers, so nothing is overwritten while another program may
           still read it. The streamed variant runs the same code and order of operations as
           ``step``: the same bits. A wait that passes ``launch.MAX_POLLS`` polls counts an
           error and stops waiting, so the launch always ends; the launcher then raises (a
           device-side assertion on CUDA: no host sync). A device that refuses the cooperative
           launch is remembered and runs ``step``. Compiled with ``maxnreg`` 255 (one program
           per SM). Proven without a GPU (``tests/test_triton_persistent.py``): every program
           in its own thread under the interpreter (one lagging in turn), two mutants of the
           handoff caught, and the handoff's barriers and memory orders read from the PTX of
           the AOT compile. Not yet run on a GPU.

Every launch pins ``enable_fp_fusion`` (:data:`~.configs.FP_FUSION`, as the AOT compile does).
The step tables (batch size and first packed row per step, int32 (T,)) are cached on the device
per ``batch_sizes`` content and device, copied from pinned memory without waiting: no
call synchronises with the host, and a ``torch.cuda.CUDAGraph`` can capture forward and
backward (``tests/test_triton_launch.py``).

The strategies write the same ``saved`` tensors, so either backward can follow any forward:

* ``h_prev``: (N, H) float32, the state entering each step of each packed row;
* ``stash``:  (N, S*H) float32, per-step values the backward needs -- ``rnn``: h' (S=1);
  ``lstm`` and ``peephole_lstm``: i, f, g, o (activated) and c entering the step (S=5);
  ``gru``: r, z, n and ``h W_hn^T + b_hn`` (S=4).

A forward without a backward to follow (``save=False``: inference, no gradient recorded) runs
each forward kernel's ``SAVE=False`` variant, which writes neither (a configuration of its own,
``KernelConfig.save``, compiled and checked ahead of time like the rest) and returns no
``saved``.

The backward kernels write ``d_gates`` (N, G*H) float32 (the gradient of the gate
pre-activations = ``d_xg``; for GRU the n part is the gradient of ``x_n``) and, for GRU,
``d_hn`` (N, H) float32 (gradient of ``h W_hn^T + b_hn``). The weight gradients are then one
``torch.mm`` in float32 after the loop (``d_w_hh = d_hidden_gates^T @ h_prev``), fixed order, no
atomics: deterministic. A cell's own per-unit weights (``w_cell`` (K, H), the peephole LSTM's
w_ci, w_cf, w_co) reach every kernel as (1, BLOCK_H) tiles (resident in the fused forward,
reloaded each step by the fused backward); their gradient is the cell's
``CellSpec.cell_weight_grad`` (torch reductions over the packed rows) of ``d_gates`` and the
c, c' the cell reads from the stash, also after the loop.

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
The fused float32 backward computes the same three tf32 products itself
(:func:`~.step_math.tf32_products`: hi with the low 13 mantissa bits cleared, lo = x - hi) on
three accumulators across the gates, three independent chains instead of tf32x3's one.
The interpreter multiplies float32 exactly, so tf32 rounding is only seen on a GPU.
Activations: float32 kernels use exact ones (``tl.sigmoid``; tanh from it); 16-bit kernels on
CUDA the GPU's ``tanh.approx.f32`` (sigmoid as (1 + tanh(x/2)) / 2: one MUFU instruction each;
largest relative error about 2^-11, under float16's rounding), a ``CELL`` of its own
(:func:`~.step_math.fast_activations`; the AOT test finds the instruction in exactly those
kernels). The interpreter cannot run inline PTX, so the CPU tests run 16-bit kernels with the
exact activations: the fast ones are tested by the CUDA suite only.
Order of the recurrent products: the forward runs one product per gate, each on its own
accumulator, after loading the step's xg tiles (no product waits for a load); the 16-bit fused
backward likewise runs ``dh_prev = direct + sum_g d_hidden_g W_g`` as G independent
tensor-core chains summed in gate order (float32: three chains, one per tf32 product, across
the gates; G chains of tf32x3 spilled on sm_90), and the tiled backward keeps one accumulator
per gate across its K chunks. The fused forward kernels load step s+1's xg tiles during step s
(``KernelConfig.prefetch``) where that does not spill.
The kernels have no interpreter-only path: every ``tl.dot`` runs on its operands' own dtype.
Triton's interpreter (3.6 to 3.9) multiplies the bit patterns of bf16 operands as integers; the
test harness (``tests/_triton_interpreter.py``, installed by ``tests/conftest.py``) corrects its
dot to widen bf16 exactly to float32 and sum in float32, as tensor cores do, so the bf16 tests
run the kernel source that is compiled for a GPU.

Real-GPU rules kept although the interpreter does not enforce them: every ``tl.dot`` operand is
at least 16 in each dimension (batch blocks are 16 rows, ``H_PAD``/``BLOCK_H``/``BLOCK_K`` >= 16),
every block shape is a power of two (H is masked), ``tanh`` is written from ``tl.sigmoid``
(``libdevice.tanh`` is missing in the interpreter).

The kernel configurations the dispatcher can choose are listed in ONE place, :data:`CONFIGS`
(built from the fused limits, :data:`FUSED_BUCKETS` and the step tiles); ``dispatchable(shared)``
is the subset a device's class allows, and the AOT test compiles exactly that per arch.

Files: ``configs.py`` (the configuration list and the choice of one; no Triton import),
``limits.py`` (what fits on which device: the measured limits per shared-memory class),
``step_math.py`` (what the kernels ask of a cell, and the device helpers kernels and cells
share), ``kernels.py`` (the ``@triton.jit`` kernels), ``launch.py`` (the contract's two
functions).
Importing this package does not import Triton; the first kernel call does.
"""
from __future__ import annotations

import importlib
import os

from fastrnn.kernels import Capabilities, contract_on_first_use
from fastrnn.kernels.triton_gpu.configs import (CELLS, CONFIGS, DTYPES, DeviceLimits,
                                                KernelConfig, device_limits, forced_strategy,
                                                fused_max_hidden, select_config, strategy_note)

#: Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CAPABILITIES = Capabilities(
    "triton", devices=("cuda", "cpu") if INTERPRETED else ("cuda",), dtypes=tuple(DTYPES.values()),
    cells=CELLS, projection=False,
    device_note=" (or CPU tensors under TRITON_INTERPRET=1)", bias_in_projection=("cuda",))


why_not = CAPABILITIES.why_not


def load():
    """The launcher module (:mod:`.launch`), imported on the first call: Triton loads then.
    Raises whatever importing raises (``auto`` then falls back, saying why)."""
    return importlib.import_module(__name__ + ".launch")


__getattr__ = contract_on_first_use(__name__, load)  # the contract: Triton loads then


__all__ = ["recurrence_forward", "recurrence_backward", "why_not", "select_config",
           "forced_strategy", "fused_max_hidden", "device_limits", "strategy_note", "CONFIGS",
           "DeviceLimits", "KernelConfig", "CAPABILITIES"]
