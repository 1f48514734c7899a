"""pytest-benchmark suite: cell × T × B × H × implementation × mode.

    pytest bench/ --benchmark-json=out.json
    pytest bench/ --benchmark-compare            # against the last saved run (--benchmark-autosave)

Implementations: ``fastrnn-<backend>`` for every fastrnn backend available on the device, and
the baselines ``torch`` (torch.nn), ``cell-loop`` (a Python loop of nn cells) and
``onnxruntime`` (one ONNX LSTM/GRU/RNN node, inference only, checked against torch.nn to 1e-5 when
it is built). Each case is a benchmark group, so pytest-benchmark's table puts the
implementations of one case side by side. A fastrnn implementation's output is checked against
torch.nn before it is timed. The timed call of ``training`` is forward + backward of the sum of
the outputs (gradients reset to None first, as ``optimizer.zero_grad()`` does).

Unlike ``fastrnn-bench`` (which interleaves implementations in one loop and reports ratios),
pytest-benchmark times each test on its own, one after another; use the CLI for ratios.
"""
import functools

import pytest
import torch

from fastrnn_bench import baselines, cli, grid, timing

# The default grid: small enough to run in a few minutes on 2 CPU cores.
PYTEST_GRID = dict(T=(50, 200), B=(8,), H=(128,))
IMPLS = ["torch", "cell-loop", "onnxruntime"]


def _cases(config):
    device = config.getoption("--bench-device")
    cells = cli._csv(config.getoption("--bench-cells"), grid.CELLS, "cells")
    modes = cli._csv(config.getoption("--bench-modes"), grid.MODES, "modes")
    grid_name = config.getoption("--bench-grid")
    if grid_name == "pytest":
        dtypes = ("float32", "bfloat16") if device.startswith("cuda") else ("float32",)
        return [grid.Case(cell, t, b, h, mode, dtype) for cell in cells for dtype in dtypes
                for mode in modes for h in PYTEST_GRID["H"] for b in PYTEST_GRID["B"]
                for t in PYTEST_GRID["T"]]
    return grid.build_grid(grid_name, device, cells, modes)


def _backends(config):
    device = config.getoption("--bench-device")
    explicit = config.getoption("--bench-backends")
    if explicit:
        return cli._csv(explicit, baselines.KERNEL_BACKENDS, "backends")
    return baselines.default_backends(device)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    impls = [f"fastrnn-{b}" for b in _backends(config)] + IMPLS
    metafunc.parametrize("impl", impls)
    metafunc.parametrize("case", _cases(config), ids=lambda c: c.id)


@functools.lru_cache(maxsize=4)
def _built(case, device, backends):
    return baselines.build_impls(case, torch.device(device), list(backends), baselines.BASELINES)


def test_recurrence(benchmark, case, impl, request):
    config = request.config
    device = torch.device(config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    impls = _built(case, str(device), tuple(_backends(config)))
    chosen = impls[impl]
    if isinstance(chosen, baselines.Skip):
        pytest.skip(str(chosen))
    if chosen.kind == "fastrnn":
        expected = impls["torch"].output().float().cpu()
        error = float((chosen.output().float().cpu() - expected).abs().max())
        assert error <= timing.CHECK_TOLERANCE[case.dtype], f"{impl} differs from torch.nn: {error}"
    run = chosen.run
    if device.type == "cuda":
        def run(fn=chosen.run):
            fn()
            torch.cuda.synchronize(device)
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.id, impl=impl, flops=case.flops(),
                                torch_threads=torch.get_num_threads())
    benchmark(run)
