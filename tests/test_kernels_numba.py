"""The Numba CPU kernels against the reference recurrence: outputs, every gradient, gradcheck,
determinism, long sequences.

Every case draws its own random inputs, from a seed derived from its test id (``seed_of``), so a
failure replays. Buffers the kernels allocate are NaN-filled during these tests
(``numba_cpu.buffers.alloc`` is replaced), so an element a kernel forgets to write shows up as a mismatch.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _support import nan_filled_buffers, seed_of

from fastrnn import backends, cells, reference
from fastrnn.autograd import Recurrence
from fastrnn.cells import scalar
from fastrnn.kernels import numba_cpu
from fastrnn.kernels.numba_cpu import bptt, buffers, jit, launch, loops, team, vectors
from fastrnn.kernels.numba_cpu import matmul as numba_matmul

# Tolerances per dtype (abs and rel): float32 kernels use a rational tanh accurate to ~2e-7 and sum
# the matmul in another order than torch; float64 uses exact tanh/exp.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}

# (cell, proj_size > 0, with biases: b_hn for gru, and the (G*H,) bias of the input projection)
VARIANTS = {
    "rnn_tanh": ("rnn_tanh", False, False),
    "rnn_relu": ("rnn_relu", False, False),
    "lstm": ("lstm", False, False),
    "lstm_proj": ("lstm", True, False),
    "gru": ("gru", False, True),
    "gru_no_bias": ("gru", False, False),
}

TWO_THREADS = min(torch.get_num_threads(), os.cpu_count() or 1) >= 2




@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_buffers_are_64_byte_aligned(dtype):
    for shape in ((1, 3), (7, 5), (0, 4), (256, 1024), (600, 1000)):
        out = buffers.alloc(shape, dtype)  # NaN-filled, by the aligned allocator
        assert out.shape == shape and out.dtype == dtype and out.flags.c_contiguous
        assert out.size == 0 or out.ctypes.data % 64 == 0, shape


@pytest.fixture(params=["serial", "rows", "blas-threads"])
def threading(request, monkeypatch):
    """Run on one thread; or force, even for small shapes, the row split over threads of ours, or
    one loop thread whose BLAS calls use torch's threads."""
    if request.param != "serial" and not TWO_THREADS:
        pytest.skip("needs torch.get_num_threads() >= 2 and 2 CPUs")
    rows = request.param == "rows"
    monkeypatch.setattr(launch, "PARALLEL_MIN_BATCH", 0 if rows else float("inf"))
    monkeypatch.setattr(launch, "PARALLEL_MIN_WORK", 0 if rows else float("inf"))
    blas = request.param == "blas-threads"
    monkeypatch.setattr(launch, "BLAS_PARALLEL_MIN_STEP_WORK", 0 if blas else float("inf"))
    monkeypatch.setattr(launch, "BLAS_PARALLEL_MIN_WEIGHT_BYTES", 0 if blas else float("inf"))
    return request.param


@pytest.fixture(params=["blas", "live", "microkernel", "panels"])
def matmul(request, monkeypatch):
    """The recurrent matmul through BLAS gemm (where torch exports it, at every batch size) on
    W_hh^T, or on the weights as given (``live``: read in place, as calls of a few rows; here at
    every size), the Numba micro-kernel on unpacked weights, or its panel kernels (forced either
    way: which one a CPU gets depends on its vectors; both run on any x86-64 CPU)."""
    blas = request.param in ("blas", "live")
    if blas and not numba_matmul.USE_BLAS:
        pytest.skip("torch exports no BLAS gemm here")
    monkeypatch.setattr(numba_matmul, "USE_BLAS", blas)
    monkeypatch.setattr(launch, "LIVE_MAX_ROWS", float("inf") if request.param == "live" else 0)
    monkeypatch.setattr(numba_matmul, "USE_PANELS", request.param == "panels")
    monkeypatch.setattr(launch, "PANELS_MIN_STEPS", 1)  # the tests' short sequences too
    monkeypatch.setattr(launch, "MICROKERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(launch, "PANELS_MAX_ROWS", 0)
    return request.param


@pytest.fixture
def generator(request):
    """A generator seeded from the test's id (parameters included): each case its own inputs,
    the same ones every run."""
    seed = seed_of(request.node.nodeid)
    print(f"seed = {seed}")
    return torch.Generator().manual_seed(seed)


def ragged_batch_sizes(steps, batch, generator):
    """Non-increasing batch sizes of `batch` sequences of random lengths in [1, steps], the longest
    `steps` long and the shortest 1 long, so the batch shrinks at least once."""
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0], lengths[-1] = steps, 1
    sizes = (lengths[None, :] > torch.arange(steps)[:, None]).sum(1)
    assert sizes[0] == batch and sizes[-1] < batch
    return sizes.to(torch.int64)


def make_inputs(variant, dtype, steps, batch, hidden, packed, generator, proj=None):
    """(cell, (xg, h0, c0, w_hh, b_hn, w_hr, bias), batch_sizes): random inputs of one
    layer/direction, in the order of :class:`Recurrence`'s tensors. Every variant but
    ``gru_no_bias`` has a bias (b_hn for gru)."""
    cell, has_proj, has_bias = VARIANTS[variant]
    gates = cells.GATES[cell]
    p = (proj or max(1, hidden // 2)) if has_proj else hidden
    sizes = (ragged_batch_sizes(steps, batch, generator) if packed
             else torch.full((steps,), batch, dtype=torch.int64))
    n = int(sizes.sum())

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).requires_grad_()

    xg = rand(n, gates * hidden)
    h0 = rand(batch, p)
    c0 = rand(batch, hidden) if cell == "lstm" else None
    w_hh = rand(gates * hidden, p, scale=p ** -0.5)
    b_hn = rand(hidden) if has_bias and cell == "gru" else None
    w_hr = rand(p, hidden, scale=hidden ** -0.5) if has_proj else None
    bias = rand(gates * hidden) if has_bias else None
    return cell, (xg, h0, c0, w_hh, b_hn, w_hr, bias), sizes


def forward(kernels, cell, inputs, sizes, reverse, save=True):
    """``kernels.recurrence_forward`` of the inputs of :func:`make_inputs`."""
    return kernels.recurrence_forward(cell, *inputs[:6], sizes, reverse, save=save,
                                      bias=inputs[6])


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, dtype, packed, reverse, threading, matmul, generator):
    g = generator
    cell, inputs, sizes = make_inputs(variant, dtype, steps=7, batch=9, hidden=33, packed=packed,
                                      generator=g)

    # Forward kernel alone, against the reference forward.
    y, h_n, c_n, _ = forward(numba_cpu, cell, inputs, sizes, reverse)
    y_ref, h_ref, c_ref, _ = forward(reference, cell, inputs, sizes, reverse)
    assert_close(y, y_ref, dtype, "y")
    assert_close(h_n, h_ref, dtype, "h_n")
    if cell == "lstm":
        assert_close(c_n, c_ref, dtype, "c_n")
    else:
        assert c_n is None

    # Inference (save=False: pre-activations in scratch rows, nothing saved): bitwise the same.
    y_inf, h_inf, c_inf, saved_inf = forward(numba_cpu, cell, inputs, sizes, reverse, save=False)
    assert saved_inf == ()
    assert torch.equal(y_inf, y) and torch.equal(h_inf, h_n)
    assert c_n is None and c_inf is None or torch.equal(c_inf, c_n)

    # Gradients through the autograd Function, against the reference backend.
    wrt = [t for t in inputs if t is not None]
    outs = Recurrence.apply("numba", cell, sizes, reverse, *inputs)
    outs_ref = Recurrence.apply("reference", cell, sizes, reverse, *inputs)
    upstream = [torch.randn(o.shape, generator=g, dtype=dtype) for o in outs]
    grads = torch.autograd.grad(outs, wrt, upstream)
    grads_ref = torch.autograd.grad(outs_ref, wrt, upstream)
    names = [n for n, t in zip(("xg", "h0", "c0", "w_hh", "b_hn", "w_hr", "bias"), inputs)
             if t is not None]
    for name, got, want in zip(names, grads, grads_ref):
        assert_close(got, want, dtype, f"d_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_activations_match_torch(dtype, generator):
    """The vectorizable tanh/sigmoid of the loops against torch's, over the whole float range,
    NaN and infinities included. Max abs error: float32 3e-7 (rational tanh), float64 4e-16."""
    from numba import njit

    @njit
    def apply(x, which):
        out = np.empty_like(x)
        for j in range(x.shape[0]):
            out[j] = scalar.tanh(x[j]) if which == 0 else scalar.sigmoid(x[j])
        return out

    g = generator
    scales = torch.tensor([1e-30, 1e-6, 1e-2, 0.3, 1.0, 3.0, 10.0, 30.0, 300.0], dtype=torch.float64)
    x = (torch.randn(len(scales), 2000, generator=g, dtype=torch.float64) * scales[:, None]).flatten()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-300, -700.0])
    x = torch.cat([x, special.double()]).to(dtype)
    tolerance = 3e-7 if dtype == torch.float32 else 4e-16
    for which, ref in enumerate((torch.tanh, torch.sigmoid)):
        got = torch.from_numpy(apply(x.numpy(), which))
        want = ref(x)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), ref.__name__
        finite = ~torch.isnan(want)
        err = (got[finite].double() - want[finite].double()).abs().max().item()
        assert err <= tolerance, f"{ref.__name__} {dtype}: max abs error {err}"


@pytest.mark.parametrize("with_mkl", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_weights(dtype, with_mkl, monkeypatch, generator):
    """The once-per-call transpose of the recurrent weights: numpy's (small), MKL's or torch's."""
    if with_mkl and numba_matmul._OMATCOPY is None:
        pytest.skip("torch exports no MKL transpose here")
    if not with_mkl:
        monkeypatch.setattr(numba_matmul, "_OMATCOPY", None)
    for shape in ((12, 3), (1, 7), (128, 32), (256, 64), (2048, 512)):
        w = torch.randn(shape, generator=generator, dtype=dtype)
        got = buffers.transposed(w)
        assert got.flags.c_contiguous and torch.equal(torch.from_numpy(got), w.t())


def test_loops_ask_for_512_bit_vectors_where_the_cpu_has_them():
    """The attribute set by ``_prefer_wide_vectors`` reaches LLVM: a loop using it carries it and is
    vectorized with zmm registers (AVX-512 CPUs newer than Cooper Lake); one without it does not
    carry it and gets LLVM's default width for the CPU: ymm only on Intel's AVX-512 cores, zmm on
    AMD Zen 4 (znver4), so its width is checked only where the default is 256 bits."""
    import llvmlite.binding as llvm
    from numba import njit
    if not jit.WIDE_VECTORS or not llvm.get_host_cpu_features().get("avx512f"):
        pytest.skip(f"no 512-bit vectors wanted on this CPU ({llvm.get_host_cpu_name()})")

    def wide(x):
        jit._prefer_wide_vectors()
        for j in range(x.shape[0]):
            x[j] = scalar.tanh(x[j])

    def narrow(x):
        for j in range(x.shape[0]):
            x[j] = scalar.tanh(x[j])

    for loop, expected in ((wide, True), (narrow, False)):
        fn = njit(fastmath=jit._FASTMATH, error_model="numpy")(loop)
        fn(np.ones(64, np.float32))
        sig = fn.signatures[0]
        assert ('"prefer-vector-width"="512"' in fn.inspect_llvm(sig)) == expected, loop.__name__
        if expected or not llvm.get_host_cpu_name().startswith("znver"):
            assert ("zmm" in fn.inspect_asm(sig)) == expected, loop.__name__


def test_panel_vector_width_follows_the_target_cpu():
    """64-byte vectors where 512-bit code is wanted, 32 with AVX2 + FMA (also on the first
    AVX-512 cores, and where a target CPU is set), none without; the kernels here are compiled
    with what this CPU gets."""
    avx512 = "+avx,+avx2,+fma,+avx512f"
    assert jit.panel_vector_bytes(avx512, None, wide=True) == 64
    assert jit.panel_vector_bytes(avx512, None, wide=False) == 32
    assert jit.panel_vector_bytes(avx512, "haswell", wide=True) == 32
    assert jit.panel_vector_bytes("+avx,+avx2,+fma,-avx512f", None, wide=True) == 32
    assert jit.panel_vector_bytes("+avx,+avx2,-fma", None, wide=True) == 0
    assert jit.panel_vector_bytes("+sse2,-avx2", None, wide=True) == 0
    assert numba_matmul.USE_PANELS == (jit.PANEL_VECTOR_BYTES > 0)
    assert numba_matmul.PANEL_BYTES == 2 * (jit.PANEL_VECTOR_BYTES or 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 5), (13, 33), (64, 48)])
def test_dot_row(dtype, n, k, generator):
    """One row's product with a weight as given (N, K), the live plans' single-row matmul: N not
    a multiple of 4, K not of the vector lanes; = and +=; no other row of acc written."""
    a, w = torch.randn(3, k, dtype=dtype, generator=generator), \
        torch.randn(n, k, dtype=dtype, generator=generator)
    acc = torch.randn(3, n, dtype=dtype, generator=generator)
    before = acc.clone()
    vectors._dot_row(acc.numpy(), 1, a.numpy(), 2, w.numpy(), True)
    assert_close(acc[1], a[2] @ w.t(), dtype, "overwrite")
    assert torch.equal(acc[::2], before[::2])
    vectors._dot_row(acc.numpy(), 1, a.numpy(), 0, w.numpy(), False)
    assert_close(acc[1], a[2] @ w.t() + a[0] @ w.t(), dtype, "accumulate")
    assert torch.equal(acc[::2], before[::2])


_BLOCK_SCRIPT = r"""if True:
    import re
    import numpy as np
    from fastrnn.kernels.numba_cpu import buffers, matmul, vectors
    rng = np.random.default_rng(0)
    rows = vectors.PANEL_ROWS
    a, w = rng.standard_normal((rows, 48), np.float32), rng.standard_normal((48, 40), np.float32)
    acc = np.zeros((rows, 40), np.float32)
    matmul._matmul_rows(acc, 0, a, 0, w, matmul.panels(w), 0, 1, rows, rows, 0, True)
    np.testing.assert_allclose(acc, a @ w, rtol=1e-5, atol=1e-5)
    kernel = vectors._panel_rows
    asm = kernel.inspect_asm(kernel.signatures[0]).split(".Lfunc_end0")[0]  # not the wrapper
    spills = [l for l in asm.splitlines() if re.search(r"%[yz]mm.*\(%rsp\)|\(%rsp\).*%[yz]mm", l)]
    print(rows, vectors.VECTOR_BYTES, "ymm" in asm, "zmm" in asm, len(spills))
"""


def test_avx2_panel_kernel_keeps_its_block_in_registers(tmp_path):
    """Compiled for an AVX2 CPU (forced: NUMBA_CPU_NAME=haswell and its features, a fresh cache),
    the panel kernel holds a 4-row block on 32-byte vectors, ymm only, with no vector register
    spilled to the stack (its 64-byte form spilled there: 5x slower), and computes the product
    (a width of 40 columns: one panel of 16 and a padded one of 8 valid columns)."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2")
    run = subprocess.run([sys.executable, "-c", _BLOCK_SCRIPT], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["4", "32", "True", "False", "0"], run.stdout


def test_avx512_panel_kernel_keeps_its_8_row_block_in_registers(tmp_path):
    """On a CPU that gets 64-byte vectors (AVX-512, 32 vector registers), the panel kernel holds
    an 8-row block (16 zmm accumulators) with no vector register spilled to the stack."""
    if jit.PANEL_VECTOR_BYTES != 64:
        pytest.skip(f"this CPU gets {jit.PANEL_VECTOR_BYTES}-byte panel vectors, not 64")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _BLOCK_SCRIPT], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["8", "64", "False", "True", "0"], run.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_panel_kernels_blocks_and_a_padded_last_panel(dtype):
    """The panel kernels' product for row counts that take every block (PANEL_ROWS, 4, single
    rows) and widths that end in a padded panel (a few valid columns) or none at all: = and +=,
    within the dtype's tolerance of numpy's, each row the same bits whatever its block (a row's
    sum never depends on the split), and nothing written outside the rows and columns asked for
    (masked stores)."""
    rng = np.random.default_rng(3)
    width = numba_matmul.PANEL_BYTES // np.dtype(dtype).itemsize
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for rows, k, n in ((13, 33, width + 3), (9, 7, 2 * width), (5, 64, 1), (20, 130, width - 1)):
        w = buffers.alloc((k, n), dtype)
        w[...] = rng.standard_normal((k, n))
        a = rng.standard_normal((rows + 2, k)).astype(dtype)
        for overwrite in (True, False):
            acc = rng.standard_normal((rows + 3, n)).astype(dtype)
            before = acc.copy()
            numba_matmul._matmul_rows(acc, 2, a, 1, w, numba_matmul.panels(w), 0, 1, rows, rows,
                                      0, overwrite)
            expected = a[1:rows + 1] @ w + (0 if overwrite else before[2:rows + 2])
            np.testing.assert_allclose(acc[2:rows + 2], expected, rtol=rtol, atol=rtol * 10)
            assert np.array_equal(acc[:2], before[:2]) and np.array_equal(acc[rows + 2:],
                                                                           before[rows + 2:])
            one = before[2:3].copy()  # row 0 alone: a single-row pass, another summation
            by_four = before[2:6].copy()  # rows 0-3 as one 4-row block
            numba_matmul._matmul_rows(by_four, 0, a, 1, w, numba_matmul.panels(w), 0, 1, 4, 4,
                                      0, overwrite)
            assert np.array_equal(by_four, acc[2:6]), (rows, k, n, overwrite)
            numba_matmul._matmul_rows(one, 0, a, 1, w, numba_matmul.panels(w), 0, 1, 1, 1, 0,
                                      overwrite)
            np.testing.assert_allclose(one, acc[2:3], rtol=rtol, atol=rtol * 10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_float64(variant, matmul, generator):
    g = generator
    for packed, reverse in ((False, False), (True, True)):
        # hidden=4, batch=5: an LSTM's 16 gate columns are one float64 panel, 5 rows = 4 + 1
        cell, inputs, sizes = make_inputs(variant, torch.float64, steps=4, batch=5, hidden=4,
                                          packed=packed, generator=g, proj=2)
        present = [i for i, t in enumerate(inputs) if t is not None]

        def run(*tensors):
            args = list(inputs)
            for i, t in zip(present, tensors):
                args[i] = t
            return Recurrence.apply("numba", cell, sizes, reverse, *args)

        assert torch.autograd.gradcheck(run, [inputs[i] for i in present])


def test_backward_is_bitwise_deterministic(matmul, threading, generator):
    g = generator
    for variant in ("lstm", "lstm_proj", "gru"):
        cell, inputs, sizes = make_inputs(variant, torch.float32, steps=12, batch=16, hidden=64,
                                          packed=True, generator=g)
        wrt = [t for t in inputs if t is not None]
        runs = []
        for _ in range(2):
            outs = Recurrence.apply("numba", cell, sizes, False, *inputs)
            upstream = [torch.ones_like(o) for o in outs]
            runs.append(list(outs) + list(torch.autograd.grad(outs, wrt, upstream)))
        for first, second in zip(*runs):
            assert torch.equal(first, second)


def test_long_sequence_stays_finite(generator):
    g = generator
    cell, inputs, sizes = make_inputs("lstm", torch.float32, steps=5000, batch=2, hidden=16,
                                      packed=False, generator=g)
    wrt = [t for t in inputs if t is not None]
    y, h_n, c_n = Recurrence.apply("numba", cell, sizes, False, *inputs)
    grads = torch.autograd.grad((y, h_n, c_n), wrt, [torch.ones_like(t) for t in (y, h_n, c_n)])
    for t in (y, h_n, c_n, *grads):
        assert torch.isfinite(t).all()
    assert y.abs().max() <= 1  # h = o * tanh(c)
    assert torch.equal(h_n, y[-2:])


def test_non_contiguous_inputs(generator):
    g = generator
    dtype = torch.float64
    cell, (xg, h0, c0, w_hh, b_hn, w_hr, _), sizes = make_inputs(
        "lstm", dtype, steps=5, batch=4, hidden=6, packed=True, generator=g)
    h0_nc = h0.detach().t().contiguous().t().requires_grad_()
    c0_nc = c0.detach().t().contiguous().t().requires_grad_()
    w_nc = w_hh.detach().t().contiguous().t().requires_grad_()
    assert not h0_nc.is_contiguous() and not w_nc.is_contiguous()
    outs = Recurrence.apply("numba", cell, sizes, True, xg, h0_nc, c0_nc, w_nc, None, None)
    outs_ref = Recurrence.apply("reference", cell, sizes, True, xg, h0, c0, w_hh, None, None)
    # Upstream gradients as non-contiguous views too.
    upstream = [torch.randn(o.shape[::-1], generator=g, dtype=dtype).t() for o in outs]
    for got, want in zip(outs, outs_ref):
        assert_close(got, want, dtype, "output")
    grads = torch.autograd.grad(outs, (xg, h0_nc, c0_nc, w_nc), upstream)
    grads_ref = torch.autograd.grad(outs_ref, (xg, h0, c0, w_hh), upstream)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, dtype, "gradient")


def test_saved_tensors_are_small(generator):
    """Forward saves at most the activated gates and cell states (RNN: nothing)."""
    g = generator
    for variant, per_row in (("rnn_tanh", 0), ("lstm", 5), ("gru", 4)):
        cell, inputs, sizes = make_inputs(variant, torch.float32, steps=6, batch=3, hidden=8,
                                          packed=True, generator=g)
        *_, saved = forward(numba_cpu, cell, inputs, sizes, False)
        assert sum(t.numel() for t in saved) == per_row * 8 * int(sizes.sum())


def _step_arguments(cell, direction, rng):
    """Random float64 arguments of one row step (loops.py: the argument roles), rows 1 of 3."""
    spec = cells.spec(cell)
    h = 5
    g = spec.gates * h

    def rand(*shape):
        return rng.standard_normal(shape)

    c = rand(3, h) if spec.has_c else np.zeros((0, 0))
    b_hn = rand(h) if spec.has_b_hn else np.zeros(0)
    w_cell = rand(len(spec.cell_weights), h) if spec.cell_weights else np.zeros((0, 0))
    if direction == "forward":  # a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o
        return (rand(3, spec.row_blocks * h), 1, rand(3, g), 1, rand(g), b_hn, w_cell, rand(3, h),
                c, 1, rand(3, h), 1)
    gates = 1 / (1 + np.exp(-rand(3, spec.row_blocks * h)))  # in (0, 1), like activated gates
    # gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj, w_cell, d_xg, d_hn,
    # dg
    return (gates, np.tanh(rand(3, h)), rand(3, h), 1, rand(3, h), 1, rand(3, h), 1, rand(3, h),
            rand(3, h), c, 1, rand(3, h), 1, spec.projection, w_cell, rand(3, g), rand(3, h),
            rand(3, g))


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("cell", list(loops.CODES))
def test_cell_step_math_runs_unjitted(cell, direction):
    """The "numba step math" of a cell file is plain Python: run as such (numpy, the stubs of
    fastrnn.cells.scalar) and compiled (the loops' activations), it writes the same rows."""
    from numba import njit
    fn = getattr(cells.MODULES[cell], f"numba_{direction}")
    args = _step_arguments(cell, direction, np.random.default_rng(seed_of(cell, direction)))
    plain, compiled = ([a.copy() if isinstance(a, np.ndarray) else a for a in args] for _ in "ab")
    fn(*plain)
    # not cached: a disk cache of the bare step would be keyed on the cell file alone, and go
    # stale when the activations it inlines change
    njit(**{**jit._JIT, "cache": False})(fn)(*compiled)
    for before, want, got in zip(args, plain, compiled):
        if isinstance(before, np.ndarray):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    assert any(isinstance(a, np.ndarray) and not np.array_equal(a, b) for a, b in zip(args, plain))


def test_loops_load_from_the_disk_cache():
    """Each cell's loops are specializations on a literal cell code, which a second process
    loads from Numba's disk cache instead of compiling them again."""
    script = """if True:
        import torch
        from fastrnn.kernels.numba_cpu import launch, loops
        xg, h0, c0, w = torch.ones(6, 8), torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(8, 2)
        launch.recurrence_forward("lstm", xg, h0, c0, w, None, None, torch.tensor([3, 3]), False)
        stats = loops._forward_thread.stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()),
              [str(sig[5]) for sig in loops._forward_thread.signatures])
    """
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True).stdout.split(maxsplit=2) for _ in range(2)]
    hits, misses, signatures = runs[1]
    assert (hits, misses) == ("1", "0"), runs
    assert signatures.strip() == "['Literal[int](2)']"


def test_dispatcher_offers_numba():
    assert not getattr(numba_cpu, "UNAVAILABLE", None)
    for variant in VARIANTS:
        cell, has_proj, _ = VARIANTS[variant]
        choice = backends.choose("numba", cell, "cpu", torch.float32, proj_size=2 if has_proj else 0)
        assert choice.name == "numba"
    assert numba_cpu.why_not("lstm", torch.device("cpu"), torch.float16, 0) is not None
    assert numba_cpu.why_not("gru", torch.device("cpu"), torch.float32, 4) is not None


def test_rejects_inconsistent_arguments(generator):
    """The loops index without bounds checks, so bad sizes must be refused before they run."""
    g = generator
    cell, (xg, h0, c0, w_hh, b_hn, w_hr, _), sizes = make_inputs(
        "lstm", torch.float32, steps=5, batch=4, hidden=6, packed=True, generator=g)
    growing = sizes.flip(0)
    with pytest.raises(ValueError, match="non-increasing"):
        numba_cpu.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, growing, False)
    with pytest.raises(ValueError, match="xg must have shape"):
        numba_cpu.recurrence_forward(cell, xg[1:], h0, c0, w_hh, b_hn, w_hr, sizes, False)
    with pytest.raises(ValueError, match="c0 must have shape"):
        numba_cpu.recurrence_forward(cell, xg, h0, c0[:, 1:], w_hh, b_hn, w_hr, sizes, False)
    with pytest.raises(TypeError, match="dtype"):
        numba_cpu.recurrence_forward(cell, xg, h0.double(), c0, w_hh, b_hn, w_hr, sizes, False)
    with pytest.raises(ValueError, match="w_cell must be None for lstm"):
        numba_cpu.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, sizes, False,
                                     w_cell=torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"w_cell \(.*\) is required for peephole_lstm"):
        numba_cpu.recurrence_forward("peephole_lstm", xg, h0, c0, w_hh, None, None, sizes, False)
    with pytest.raises(ValueError, match=r"w_cell must have shape \(3, 6\)"):
        numba_cpu.recurrence_forward("peephole_lstm", xg, h0, c0, w_hh, None, None, sizes, False,
                                     w_cell=torch.zeros(4, 6))


def test_one_plan_per_call(generator, monkeypatch):
    """Recurrence makes the call's plan (checks and schedule) once, in forward; backward reuses
    it: the schedule runs once per forward+backward, and the gradients equal a plan-less call's."""
    from fastrnn.kernels.numba_cpu import launch
    cell, inputs, sizes = make_inputs("lstm", torch.float64, steps=4, batch=3, hidden=5,
                                      packed=True, generator=generator)
    calls = []
    schedule = launch._schedule
    monkeypatch.setattr(launch, "_schedule", lambda *a: calls.append(a) or schedule(*a))
    outs = Recurrence.apply("numba", cell, sizes, False, *inputs)
    grads = torch.autograd.grad(sum(o.sum() for o in outs),
                                [t for t in inputs if t is not None and t.requires_grad])
    assert len(calls) == 1
    xg, h0, c0, w_hh, b_hn, w_hr, bias = inputs
    y, h_n, c_n, saved = launch.recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, sizes,
                                                   False, bias=bias)
    direct = launch.recurrence_backward(cell, torch.ones_like(y), torch.ones_like(h_n),
                                        torch.ones_like(c_n), h0, c0, w_hh, b_hn, w_hr, sizes,
                                        False, y, saved, bias=bias)
    assert len(calls) == 3  # without a plan, forward and backward each make their own
    want = [g for g, t in zip(direct, inputs) if t is not None and t.requires_grad]
    for got, expected in zip(grads, want):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not TWO_THREADS, reason="needs torch.get_num_threads() >= 2 and 2 CPUs")
def test_thread_plan_follows_the_thresholds_after_a_cached_call(monkeypatch):
    """The checked steps are cached, the thread decision is not: the ``threading`` fixture's
    forced thresholds take effect for steps that an earlier call already planned."""
    sizes = torch.full((5,), 8, dtype=torch.int64)
    assert launch._schedule(sizes, False, 8, 4 * 16, 16, 4).nthreads == 1
    monkeypatch.setattr(launch, "PARALLEL_MIN_BATCH", 0)
    monkeypatch.setattr(launch, "PARALLEL_MIN_WORK", 0)
    assert launch._schedule(sizes, False, 8, 4 * 16, 16, 4).nthreads == 2


@pytest.mark.skipif(not TWO_THREADS, reason="needs torch.get_num_threads() >= 2 and 2 CPUs")
@pytest.mark.parametrize("batch", [37, 44])
def test_row_split_gives_the_bits_of_one_thread(batch, monkeypatch, generator):
    """Rows dealt to two threads in groups of ROW_GROUP (the panel kernels' block) give one
    thread's outputs and gradients bit for bit: a row's sum is the same in every block (batch
    37: 8-row blocks, a 4-row block, a single row; 44: the last group 4 rows)."""
    monkeypatch.setattr(numba_matmul, "USE_PANELS", True)
    monkeypatch.setattr(launch, "PANELS_MIN_STEPS", 1)
    cell, inputs, sizes = make_inputs("lstm", torch.float32, steps=4, batch=batch, hidden=20,
                                      packed=False, generator=generator)
    results = []
    for split in (False, True):
        monkeypatch.setattr(launch, "PARALLEL_MIN_BATCH", 0 if split else float("inf"))
        monkeypatch.setattr(launch, "PARALLEL_MIN_WORK", 0 if split else float("inf"))
        plan = launch._schedule(sizes, False, batch, 4 * 20, 20, 4)
        assert (plan.nthreads, plan.group, plan.gemm, plan.panels) == (
            (2, launch.ROW_GROUP, 0, True) if split else (1, batch, 0, True))
        outs = Recurrence.apply("numba", cell, sizes, False, *inputs)
        wrt = [t for t in inputs if t is not None]
        results.append(list(outs) + list(torch.autograd.grad(outs, wrt, [o * 0 + 1 for o in outs])))
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.skipif(not numba_matmul.USE_BLAS, reason="torch exports no BLAS gemm here")
@pytest.mark.parametrize("steps", [1, 6], ids=["one-step", "steps"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bptt_in_one_call_gives_the_bits_of_its_pieces(variant, dtype, packed, steps,
                                                         monkeypatch, generator):
    """The one-thread BPTT as one compiled call (bptt.direct) and its pieces run from Python
    (the route of multi-threaded plans) give the same gradients bit for bit, for every cell: the
    loop, d_W_hh through the gemm (one step: on h0 itself), d_bias and d_b_hn as column sums."""
    monkeypatch.setattr(launch, "PANELS_MIN_STEPS", 1)
    cell, inputs, sizes = make_inputs(variant, dtype, steps=steps, batch=5, hidden=9,
                                      packed=packed and steps > 1, generator=generator)
    wrt = [t for t in inputs if t is not None]
    upstream = None
    results, calls = [], []
    direct = bptt.direct
    monkeypatch.setattr(bptt, "direct", lambda *a: calls.append(1) or direct(*a))
    for one_call in (True, False):
        monkeypatch.setattr(bptt, "applies", lambda *a, one_call=one_call: one_call)
        outs = Recurrence.apply("numba", cell, sizes, False, *inputs)
        upstream = upstream or [torch.randn(o.shape, generator=generator, dtype=dtype)
                                for o in outs]
        results.append(torch.autograd.grad(outs, wrt, upstream))
    assert len(calls) == 1
    for one, pieces in zip(*results):
        assert torch.equal(one, pieces)


@pytest.mark.skipif(not numba_matmul.USE_BLAS, reason="torch exports no BLAS gemm here")
@pytest.mark.parametrize("panels", [True, False], ids=["panels", "no-panels"])
@pytest.mark.parametrize("threads", [1, 2])
def test_step_matmul_choice(threads, panels, monkeypatch):
    """The micro-kernels run a step's matmul where a loop thread has at most PANELS_MAX_ROWS rows
    (panel kernels), or MICROKERNEL_MAX_ROWS without them where the gemm call would run on one
    thread; BLAS elsewhere."""
    if threads > launch._CPUS:
        pytest.skip(f"needs {threads} CPUs")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(numba_matmul, "USE_PANELS", panels)
    monkeypatch.setattr(team, "AVAILABLE", False)  # no column split (tests/test_numba_team.py)
    default = launch.PANELS_MAX_ROWS if panels else launch.MICROKERNEL_MAX_ROWS
    most = 16 if panels else launch.MICROKERNEL_MAX_ROWS
    monkeypatch.setattr(launch, "PANELS_MAX_ROWS", 16)
    gemm = numba_matmul._gemm_address(torch.float32)

    def plan(batch, hidden, itemsize=4, steps=50):
        sizes = torch.full((steps,), batch, dtype=torch.int64)
        return launch._schedule(sizes, False, batch, 4 * hidden, hidden, itemsize)

    assert plan(1, 64).gemm == 0 and plan(most, 64).gemm == 0
    assert plan(most, 64, 8).gemm == 0
    assert plan(most + 1, 64).gemm == gemm != 0
    big = plan(1, 512)  # 4 MiB of weights: the gemm call runs on torch's threads
    assert (big.blas_threads, big.gemm) == (0, gemm if threads == 2 and not panels else 0)
    monkeypatch.setattr(launch, "PANELS_MAX_ROWS", default)
    assert plan(64, 64).gemm == (0 if panels else gemm)
    assert plan(64, 64).panels == panels
    short = plan(64, 64, steps=launch.PANELS_MIN_STEPS - 1)  # too few steps to pack for
    assert not short.panels and short.gemm == gemm
    monkeypatch.setattr(launch, "PANELS_MAX_ROWS", 16)
    monkeypatch.setattr(launch, "PARALLEL_MIN_BATCH", 0)
    monkeypatch.setattr(launch, "PARALLEL_MIN_WORK", 0)
    split = plan(2 * most, 64)  # loop threads of `most` rows each (one with threads=1)
    assert split.gemm == (0 if threads == 2 else gemm)
    few = plan(2, 64, steps=launch.LIVE_MAX_ROWS // 2)  # a call of a few rows
    assert few.live == numba_matmul.USE_BLAS
    assert not few.panels and few.nthreads == 1 and few.gemm == gemm
    assert not plan(1, 64, steps=launch.LIVE_MAX_ROWS + 1).live
    monkeypatch.setattr(numba_matmul, "USE_BLAS", False)
    assert plan(64, 64).gemm == 0 and not plan(1, 64, steps=1).live
