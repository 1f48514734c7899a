"""Ahead-of-time compile every Triton kernel configuration the dispatcher can choose and check
that it fits the GPU: zero spill bytes (cuobjdump STACK) and dynamic shared memory within the
per-block limit, for sm_80 (A100) and sm_90 (H100). No GPU needed.

The configuration list is ``fastrnn.kernels.triton_gpu.CONFIGS`` (compiled by ``bench/triton_aot.py``; the one the dispatcher's
``select_config`` chooses from). Compilation runs in worker processes without
``TRITON_INTERPRET`` (conftest.py sets it when there is no CUDA, and under the interpreter
``@triton.jit`` functions cannot be compiled), with a fresh Triton cache so every run compiles.
"""
import os
import pathlib
import sys

import pytest

configs = pytest.importorskip("fastrnn.kernels.triton_gpu.configs")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import triton_aot as aot  # noqa: E402  (the AOT tooling lives in bench/, outside the runtime)

ARCHS = tuple(sorted(aot.SHARED_LIMIT))
CASES = [(config, cc) for config in configs.CONFIGS for cc in ARCHS]

if not os.path.exists(aot._cuobjdump()):
    pytest.skip("triton's NVIDIA backend (cuobjdump) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    """{(config name, cc): resource dict} for every case, compiled once for the module."""
    jobs = max(1, min(4, os.cpu_count() or 1))
    rows = aot.aot_resources(configs.CONFIGS, ARCHS, jobs=jobs,
                             cache_dir=tmp_path_factory.mktemp("triton-cache"))
    return {(row["config"], row["cc"]): row for row in rows}


def test_configs_cover_the_dispatcher():
    """Every (direction, cell, dtype) has a step kernel and its fused buckets up to the limit."""
    names = {c.name for c in configs.CONFIGS}
    assert len(names) == len(configs.CONFIGS), "duplicate configurations"
    for direction in ("forward", "backward"):
        for cell in configs.CELLS:
            for dtype in configs.DTYPES.values():
                limit = configs.fused_max_hidden(direction, cell, dtype)
                for hidden in sorted({16, limit, limit + 1}):
                    assert configs.select_config(direction, cell, dtype, hidden) in configs.CONFIGS


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the in-process refusal under TRITON_INTERPRET=1")
def test_in_process_compile_refused_under_interpreter():
    """Why the compile runs in worker processes: under the interpreter it cannot compile."""
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_config(configs.CONFIGS[0], ARCHS[0])


@pytest.mark.parametrize("config,cc", CASES, ids=[f"{c.name}-sm{cc}" for c, cc in CASES])
def test_fits(resources, config, cc):
    row = resources[(config.name, cc)]
    assert row["STACK"] == 0, f"{config.name} spills on sm_{cc}: {row}"
    assert row["metadata_shared"] <= aot.SHARED_LIMIT[cc], f"{config.name} shared memory: {row}"
    assert 0 < row["REG"] <= 255, row
