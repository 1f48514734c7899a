"""The numba backend's input projection without gradients (:mod:`fastrnn.kernels.numba_cpu.projection`):
equal to ``x @ w_ih.t()`` within tolerance on any CPU (the panel kernels forced where the CPU would
not pick them), bitwise the same at 1 and 2 threads and for any block split, every element written
(buffers NaN-filled), its packed weights following the weight, used by the full path's no-gradient
routes and never where a gradient is recorded."""
from __future__ import annotations

import gc

import pytest
import torch

import fastrnn
from fastrnn.kernels import numba_cpu
from fastrnn.kernels.numba_cpu import launch, matmul, projection

from _support import nan_filled_buffers, seed_of

MAX_ROWS = projection.MAX_ROWS  # the default (the fixture below moves it)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(autouse=True)
def forced(monkeypatch):
    """Panel kernels on whatever CPU, at any number of rows (test_rule: not for a few, nor for
    many where MKL runs on an Intel CPU); NaN-filled buffers."""
    nan_filled_buffers(monkeypatch)
    monkeypatch.setattr(matmul, "USE_PANELS", True)
    monkeypatch.setattr(projection, "MAX_ROWS", 1 << 62)
    monkeypatch.setattr(launch, "LIVE_MAX_ROWS", 0)


def with_threads(n, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rows,features,width", [(1, 3, 4), (7, 5, 36), (130, 17, 96),
                                                 (261, 33, 80)])
def test_equals_torch_mm_and_threads_agree(dtype, rows, features, width, monkeypatch):
    """Rows not a multiple of 4 or of the block, columns past the last panel (float32 panels:
    32 columns, float64: 16), K odd: close to torch.mm; at 2 threads and with other blocks
    (multiples of 4) bitwise the 1-thread result."""
    generator = torch.Generator().manual_seed(seed_of(dtype, rows, features, width))
    x = torch.randn(rows, features, dtype=dtype, generator=generator)
    w = torch.randn(width, features, dtype=dtype, generator=generator)
    one = with_threads(1, lambda: numba_cpu.project(x, w))
    torch.testing.assert_close(one, x @ w.t(), **TOLERANCE[dtype])
    if launch._CPUS >= 2:
        assert torch.equal(with_threads(2, lambda: numba_cpu.project(x, w)), one)
    monkeypatch.setattr(projection, "BLOCK_ROWS", 8)
    assert torch.equal(with_threads(2, lambda: numba_cpu.project(x, w)), one)


def test_not_contiguous_input():
    generator = torch.Generator().manual_seed(seed_of("nc"))
    x = torch.randn(40, 9, generator=generator).t()  # (9, 40) strided
    w = torch.randn(64, 40, generator=generator)
    torch.testing.assert_close(numba_cpu.project(x, w), x @ w.t(), **TOLERANCE[torch.float32])


def test_rule(monkeypatch):
    """The panel kernels where they apply (not for a call of a few rows, launch.live, nor of
    more than projection.MAX_ROWS); else W_ih read in place by torch.mm's gemm call (bitwise
    torch.mm), a single row by dot products; None (torch.mm) where torch exports no gemm."""
    x, w = torch.randn(10, 4), torch.randn(8, 4)
    panels, run = [], projection.run
    monkeypatch.setattr(projection, "run", lambda *a: panels.append(1) or run(*a))
    assert numba_cpu.project(x, w) is not None and len(panels) == 1
    monkeypatch.setattr(launch, "LIVE_MAX_ROWS", 8)
    monkeypatch.setattr(matmul, "USE_BLAS", True)
    assert numba_cpu.project(x, w) is not None and len(panels) == 2
    assert torch.equal(numba_cpu.project(x[:8], w), x[:8] @ w.t()) and len(panels) == 2
    torch.testing.assert_close(numba_cpu.project(x[:1], w), x[:1] @ w.t(),
                               **TOLERANCE[torch.float32])
    monkeypatch.setattr(matmul, "USE_PANELS", False)
    assert torch.equal(numba_cpu.project(x, w), x @ w.t()) and len(panels) == 2
    monkeypatch.setattr(matmul, "USE_BLAS", False)
    assert numba_cpu.project(x, w) is None  # torch.mm then
    monkeypatch.setattr(matmul, "USE_PANELS", True)
    assert numba_cpu.project(x[:8], w) is not None and len(panels) == 3
    monkeypatch.setattr(matmul, "USE_BLAS", True)
    monkeypatch.setattr(projection, "MAX_ROWS", 9)  # beyond it the gemm (MKL on an Intel CPU)
    assert torch.equal(numba_cpu.project(x, w), x @ w.t()) and len(panels) == 3
    assert numba_cpu.project(x[:9], w) is not None and len(panels) == 4


def test_many_rows_go_to_mkl_on_intel_cpus_only():
    """The panel kernels project any number of rows but where the BLAS is MKL on an Intel CPU
    (tuned for it): there beyond 16 rows the gemm does. The vendor as /proc/cpuinfo has it."""
    vendor = matmul._cpu_vendor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            listed = [line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("vendor_id")]
    except OSError:
        listed = []
    assert vendor == (listed[0] if listed else None)
    intel = vendor == "GenuineIntel" and matmul._MKL_SET_THREADS_LOCAL is not None
    assert matmul.MKL_ON_INTEL == intel
    assert (MAX_ROWS == 16) == intel and MAX_ROWS >= 16


@pytest.mark.parametrize("change", ["in_place", "data", "through_data", "numpy"])
def test_packed_weights_follow_the_weight(change):
    """Packed once per weight version (twice: its contents are copied when it is seen unchanged
    a second time): reused while the weight is unchanged, remade after an
    in-place update, ``.data =``, or a write no version counter sees (through ``.data``, a numpy
    view; one element), dropped with the weight; an inference tensor every call."""
    generator = torch.Generator().manual_seed(seed_of(change))
    x = torch.randn(6, 5, generator=generator)
    w = torch.nn.Parameter(torch.randn(40, 5, generator=generator))
    first = numba_cpu.project(x, w)
    assert projection._PACKED[id(w)][1].copies is None  # not copied before it is seen again
    numba_cpu.project(x, w)
    kept = projection._PACKED[id(w)][2]
    numba_cpu.project(x, w)
    assert projection._PACKED[id(w)][2] is kept
    with torch.no_grad():
        if change == "in_place":
            w.mul_(2)
        elif change == "data":
            w.data = torch.randn(40, 5, generator=generator)
        elif change == "through_data":
            w.data[7, 3] += 1
        else:
            w.detach().numpy()[39, 4] -= 1
    got = numba_cpu.project(x, w)
    assert projection._PACKED[id(w)][2] is not kept
    torch.testing.assert_close(got, x @ w.detach().t(), **TOLERANCE[torch.float32])
    assert not torch.equal(got, first)
    key = id(w)
    del w
    gc.collect()
    assert key not in projection._PACKED
    with torch.inference_mode():
        frozen = torch.randn(40, 5, generator=generator)
        torch.testing.assert_close(numba_cpu.project(x, frozen), x @ frozen.t(),
                                   **TOLERANCE[torch.float32])
    assert id(frozen) not in projection._PACKED


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_full_path_projects_here_only_without_gradients(grad, monkeypatch):
    """The full path (packed input: never the lean path) projects through the kernel under
    no_grad and through torch.mm when a gradient is recorded; both close to torch.nn."""
    calls = []
    run = projection.run
    monkeypatch.setattr(projection, "run", lambda *a: calls.append(1) or run(*a))
    torch.manual_seed(0)
    ref = torch.nn.GRU(5, 6, num_layers=2, bidirectional=True)
    mod = fastrnn.GRU(5, 6, num_layers=2, bidirectional=True, backend="numba")
    mod.load_state_dict(ref.state_dict())
    x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(7, 3, 5), [7, 4, 2])
    with torch.set_grad_enabled(grad):
        got, expected = mod(x), ref(x)
    assert len(calls) == (0 if grad else 4)
    torch.testing.assert_close(got[0].data, expected[0].data, **TOLERANCE[torch.float32])
    torch.testing.assert_close(got[1], expected[1], **TOLERANCE[torch.float32])
