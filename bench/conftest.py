"""pytest options of the benchmark suite (bench/test_bench.py).

    pytest bench/ --benchmark-json=out.json                 # the small default grid, CPU
    pytest bench/ --bench-grid=quick --bench-cells=lstm     # the CLI's quick grid, LSTM only
    pytest bench/ --bench-device=cuda --bench-grid=quick    # CUDA (fp32 and bf16)

Triton is never benchmarked under its CPU interpreter: TRITON_INTERPRET must not be set here.
"""
import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fastrnn-bench")
    group.addoption("--bench-grid", default="pytest",
                    help="pytest (default, small), tiny, quick, full (the fastrnn-bench grids)")
    group.addoption("--bench-device", default="cpu", help="cpu or cuda")
    group.addoption("--bench-cells", default="rnn,lstm,gru", help="comma list of rnn,lstm,gru")
    group.addoption("--bench-modes", default="inference,training", help="inference,training")
    group.addoption("--bench-backends", default=None,
                    help="fastrnn backends (default: every one available on the device)")


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        config.issue_config_time_warning(
            pytest.PytestConfigWarning("TRITON_INTERPRET=1: triton is interpreted, not benchmarked"),
            stacklevel=2)
