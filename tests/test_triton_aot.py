"""Ahead-of-time compile every Triton kernel configuration the dispatcher can choose on each arch
and check that it fits there: zero spill bytes (cuobjdump STACK), at most 255 registers per
thread and dynamic shared memory within the arch's opt-in limit per block, for sm_80 (A100,
163 KB), sm_86 (A10, RTX 30, 99 KB), sm_89 (L4, L40S, RTX 40, 99 KB) and sm_90 (H100, 227 KB).
No GPU needed. The per-arch configurations are ``configs.dispatchable(ARCH_SHARED[cc])`` -- what
``select_config`` chooses from on a device with that much shared memory -- compiled with the
launchers' options (``num_warps``, ``enable_fp_fusion``) by ``bench/triton_aot.py``.

Pointer variants: Triton specialises each pointer argument on 16-byte alignment and compiles a
variant per pattern. The launchers pass only aligned pointers (they copy an input that is not,
e.g. an h0[k] view: tests/test_triton_launch.py), so the all-aligned variant is the
only one that runs, and the only one compiled here. That is the sound reduction of CI time: the
variants with the caller's pointers unaligned cannot run (with all of them unaligned, the
fp16/bf16 lstm and peephole_lstm forward at H_PAD 128 spill 144-152 B on sm_80), so checking
them would double the compiles for nothing; ``python bench/triton_resources.py --unaligned``
measures them. sm_86 and sm_89 share sm_80's Triton code generation but not its ptxas target,
so they are compiled, not inferred. 4 archs, aligned: ~1284 compiles (~1.5-2 s each per core;
forward kernels twice: with the stash for backward and without, ``KernelConfig.save``).

Compilation runs in worker processes without ``TRITON_INTERPRET`` (conftest.py sets it when there
is no CUDA, and under the interpreter ``@triton.jit`` functions cannot be compiled), with a fresh
Triton cache so every run compiles.
"""
import os
import pathlib
import sys

import pytest
import torch

configs = pytest.importorskip("fastrnn.kernels.triton_gpu.configs")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import triton_aot as aot  # noqa: E402  (the AOT tooling lives in bench/, outside the runtime)

ARCHS = tuple(configs.ARCH_SHARED)
CASES = aot.cases(ARCHS, variants=(True,))
SMALL = configs.DeviceLimits(86, 101376, 65536, 84)  # a fake sm_86 device: 99 KB per block


def test_configs_cover_the_dispatcher():
    """Every (direction, cell, dtype) has a step kernel and its fused buckets up to the limit, on
    every arch; a device's choices are among its dispatchable configurations."""
    names = {c.name for c in configs.CONFIGS}
    assert len(names) == len(configs.CONFIGS), "duplicate configurations"
    for cc, shared in configs.ARCH_SHARED.items():
        limits = configs.DeviceLimits(cc, shared, 65536, 100)
        allowed = set(configs.dispatchable(shared))
        for direction in ("forward", "backward"):
            for cell in configs.CELLS:
                for dtype in configs.DTYPES.values():
                    limit = configs.fused_max_hidden(direction, cell, dtype, limits)
                    for hidden in sorted({16, limit, limit + 1, 1000}):
                        config = configs.select_config(direction, cell, dtype, hidden,
                                                       limits=limits)
                        assert config in allowed
                        assert (config.strategy == "fused") == (hidden <= limit)


def test_dispatcher_fits_a_99kb_device():
    """On a 99 KB device the float32 and the large 16-bit fused kernels give way to step ones;
    below every class, or with fewer registers, only the step kernels run."""
    for direction, cell, dtype, hidden in [("forward", "rnn_tanh", torch.float32, 128),
                                           ("backward", "gru", torch.float16, 128),
                                           ("forward", "lstm", torch.bfloat16, 128),
                                           ("forward", "lstm", torch.float32, 64)]:
        assert configs.select_config(direction, cell, dtype, hidden).strategy == "fused"
        assert configs.select_config(direction, cell, dtype, hidden,
                                     limits=SMALL).strategy == "step"
    assert configs.select_config("forward", "lstm", torch.float16, 64,
                                 limits=SMALL).h_pad == 64
    for limits in (SMALL._replace(shared=65536), SMALL._replace(registers=32768)):
        assert all(c.strategy != "fused" for c in configs.dispatchable(limits.shared,
                                                                        limits.registers))
        assert configs.select_config("forward", "rnn_tanh", torch.float16, 8,
                                     limits=limits).strategy == "step"
    with pytest.raises(ValueError, match="fits this device"):
        configs.select_config("forward", "gru", torch.float32, 64, "fused", limits=SMALL)
    assert "up to H=32 forward / H=32 backward" in configs.strategy_note("lstm", torch.float32,
                                                                         SMALL)


def test_fits_rejects_spills_registers_and_shared():
    """What excludes a configuration from an arch: any spill, > 255 registers, or more dynamic
    shared memory than the arch's opt-in limit."""
    row = dict(REG=200, STACK=0, metadata_shared=100000, shared_limit=101376)
    assert aot.fits(row)
    assert not aot.fits({**row, "STACK": 8})
    assert not aot.fits({**row, "REG": 256})
    assert not aot.fits({**row, "metadata_shared": 101377})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the in-process refusal under TRITON_INTERPRET=1")
def test_in_process_compile_refused_under_interpreter():
    """Why the compile runs in worker processes: under the interpreter it cannot compile."""
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_config(configs.CONFIGS[0], ARCHS[0])


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    """{(config name, cc, aligned): resource dict} for every case, compiled once."""
    if not os.path.exists(aot._cuobjdump()):
        pytest.skip("triton's NVIDIA backend (cuobjdump) is not installed")
    jobs = max(1, min(4, os.cpu_count() or 1))
    rows = aot.aot_resources(CASES, jobs=jobs, cache_dir=tmp_path_factory.mktemp("triton-cache"))
    return {(row["config"], row["cc"], row["aligned"]): row for row in rows}


@pytest.mark.parametrize("config,cc,aligned", CASES,
                         ids=[f"{c.name}-sm{cc}-{'aligned' if a else 'unaligned'}"
                              for c, cc, a in CASES])
def test_fits(resources, config, cc, aligned):
    """... and the 16-bit forward kernels compute their activations with tanh.approx.f32 (the
    fast activations they run with on CUDA; rnn_relu has none to approximate, and of the
    backward kernels only the LSTMs' recompute one), float32 kernels never; the step kernels
    on sm_90 wait for the launch before them and release the next (``griddepcontrol.wait`` and
    ``.launch_dependents``, launched with programmatic dependent launch), with no memory access
    before the wait (it could see the previous pass unfinished); no other kernel has either."""
    row = resources[(config.name, cc, aligned)]
    assert aot.pdl_as_launched(config, row), row
    if config.dtype == "float32":
        assert row["tanh_approx"] == 0, row
    elif config.kernel.startswith("forward") and config.cell != "rnn_relu":
        assert row["tanh_approx"] > 0, row


PERSISTENT = [case for case in CASES if case[0].strategy == "persistent"]


@pytest.mark.parametrize("config,cc,aligned", PERSISTENT,
                         ids=[f"{c.name}-sm{cc}" for c, cc, a in PERSISTENT])
def test_persistent_grid_is_resident(resources, config, cc, aligned):
    """Occupancy: wherever the dispatcher picks a persistent kernel (devices of 1-132 SMs,
    B and H around the block edges), its grid is at most SMs x the programs one SM holds of the
    compiled kernel (registers and shared memory from the AOT compile), so the cooperative launch
    can make every program resident."""
    per_sm = aot.blocks_per_sm(resources[(config.name, cc, aligned)], config.num_warps)
    assert per_sm >= 1
    dtype = configs.DTYPES[config.dtype]
    picked = 0
    for sms in (1, 28, 84, 108, 132):
        limits = configs.DeviceLimits(cc, configs.ARCH_SHARED[cc], 65536, sms)
        for batch in (1, 16, 17, 64, 128, 1000):
            for hidden in (100, 129, 200, 256, 500, 1000, 1024, 4096):
                chosen = configs.select_config(config.kernel.split("_")[0], config.cell, dtype,
                                               hidden, limits=limits, save=config.save,
                                               batch=batch)
                if chosen == config:
                    picked += 1
                    grid = -(-batch // chosen.block_b) * -(-hidden // chosen.block_h)
                    assert grid <= sms * per_sm
    assert picked > 0


RESIDENT = [case for case in CASES if case[0].k_pad]


@pytest.mark.parametrize("config,cc,aligned", RESIDENT,
                         ids=[f"{c.name}-sm{cc}" for c, cc, a in RESIDENT])
def test_resident_weights_stay_in_shared_memory(resources, config, cc, aligned):
    """A resident persistent kernel keeps its weight slices on-chip for the whole launch: its
    shared memory holds at least the G slices of K_PAD x 16 units in the weights' dtype (a
    kernel that reloaded them from global memory every pass would need a few KB, as the
    streamed ones do)."""
    item = 4 if config.dtype == "float32" else 2
    slices = configs.GATES[config.cell] * config.k_pad * config.block_h * item
    assert resources[(config.name, cc, aligned)]["metadata_shared"] >= slices
