"""The Triton kernels under Triton 3.6, the version the lent GPU machine has (torch 2.11, Triton
3.6, no package registry), beside the 3.9 of this environment: every configuration the
dispatcher can choose compiles ahead of time for each arch and fits there (as
``test_triton_aot.py`` checks under 3.9), and a parity subset passes under 3.6's interpreter.

Triton 3.6 comes from a side install, ``pip install --target .triton36 "triton==3.6.0"
"numpy<2.4"`` at the repository root (``.ci/run`` makes it; ``FASTRNN_TRITON36`` names another
directory), put first on the child processes' ``PYTHONPATH``; without it these tests skip. NumPy
below 2.4 because 3.6's interpreter converts one-element arrays to ``int``, which NumPy 2.4
refuses (the compiled path does not).
"""
import os
import pathlib
import subprocess
import sys

import pytest

configs = pytest.importorskip("fastrnn.kernels.triton_gpu.configs")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import triton_aot as aot  # noqa: E402  (the AOT tooling lives in bench/, outside the runtime)

TRITON36 = pathlib.Path(os.environ.get("FASTRNN_TRITON36", ROOT / ".triton36"))
VERSION = "3.6.0"
# The interpreter subset: every cell, both strategies, dense and packed, each dtype, forward in
# time (the reversed half adds nothing version-specific); about 60 cases, 1-2 minutes.
SUBSET = "test_parity and fwd"

pytestmark = pytest.mark.skipif(not (TRITON36 / "triton").is_dir(),
                                reason=f"no Triton {VERSION} side install in {TRITON36} "
                                       "(.ci/run installs it; see the module docstring)")


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TRITON36)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def test_the_side_install_is_triton_3_6():
    out = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                         env=_child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == VERSION


def test_every_dispatchable_config_fits_each_arch_under_triton_3_6(tmp_path):
    """~1284 compiles (as test_triton_aot.py's, by Triton 3.6): no spill, <= 255 registers,
    dynamic shared memory within each arch's limit; programmatic dependent launch exactly in
    the step kernels on sm_90, no memory access before its wait."""
    if not os.path.exists(TRITON36 / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump"):
        pytest.fail(f"Triton {VERSION} in {TRITON36} has no cuobjdump")
    work = aot.cases(tuple(configs.ARCH_SHARED), variants=(True,))
    rows = aot.aot_resources(work, jobs=max(1, min(4, os.cpu_count() or 1)),
                             cache_dir=tmp_path, pythonpath=TRITON36)
    assert {row["triton"] for row in rows} == {VERSION}
    misfits = [row for row in rows if not aot.fits(row)]
    assert not misfits, f"{len(misfits)} of {len(rows)} do not fit under Triton {VERSION}: {misfits}"
    wrong = [row for (config, _, _), row in zip(work, rows)
             if not aot.pdl_as_launched(config, row)]
    assert not wrong, f"programmatic dependent launch not as launched: {wrong}"


def test_step_passes_launch_the_compiled_kernel_under_triton_3_6():
    """tests/test_triton_launch.py's check of the step strategy's direct launches, with Triton
    3.6's JIT, compiled kernel and launcher interface."""
    from _support import launcher_check
    assert launcher_check(TRITON36) == VERSION


def test_interpreter_parity_subset_under_triton_3_6():
    """tests/test_kernels_triton.py's ``SUBSET`` in a child process on Triton 3.6's interpreter:
    all pass, none skipped."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
         "-k", SUBSET, str(ROOT / "tests" / "test_kernels_triton.py"),
         "--override-ini", "addopts=-ra"],
        env=_child_env(TRITON_INTERPRET="1", FASTRNN_EXPECT_TRITON=VERSION), cwd=str(ROOT),
        capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= 50, summary
