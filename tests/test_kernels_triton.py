"""Parity of the Triton kernels (fastrnn.kernels.triton_gpu) with the reference recurrence.

Without CUDA the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set by
conftest.py before triton is imported) on CPU tensors, at small shapes. The oracle is
``Recurrence.apply("reference", ...)`` run in float64 on the same (dtype-rounded) inputs, its
results then cast to the tested dtype. Every strategy is tested: ``fused`` (weights on-chip,
one launch), ``step`` (hidden dimension split across programs, one launch per step) and
``persistent`` (the step kernels in one launch; under the interpreter its programs run in
threads, ``_triton_interpreter.threaded_programs``), the latter two forced at small H with
16-unit tiles so that H spans several blocks.

Under the interpreter, conftest.py corrects its bf16 ``tl.dot`` (``_triton_interpreter.py``): the
kernels run the same dots as on a GPU, in their operands' dtype; and the programs of a launch
also run in reversed and shuffled orders (:func:`test_program_order`).
"""
import ast
import contextlib
import dataclasses
import functools
import os
import re
import unittest.mock

import pytest
import torch

from fastrnn import backends, cells
from fastrnn.autograd import Recurrence
from fastrnn.kernels import reference

tg = pytest.importorskip("fastrnn.kernels.triton_gpu")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastrnn.kernels.triton_gpu import configs, kernels, launch, step_math  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and not INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
if INTERPRETED:
    import _triton_interpreter as interp

# Tolerances: |triton - reference| <= TOL * max(1, max|reference|), per tensor.
# float32 under the interpreter: float32 arithmetic vs float64 -> 1e-5. float16 (eps 9.8e-4)
# and bfloat16 (eps 7.8e-3): h is rounded to the input dtype before each product and outputs
# are rounded once -> a few eps over T <= 16 steps.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# On a GPU at full size (H up to 520, T = 64): float32 products are tf32x3 (~1e-6 relative each)
# summed over up to 520 terms -> 1e-4; 16-bit dtypes round h or the gate gradients every step.
TOL_CUDA = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DENSE = [4] * 6                 # B = 4, T = 6
PACKED = [5, 5, 4, 2, 2, 1, 1]  # non-increasing batch sizes, T = 7
HIDDEN = 24                     # not a power of two: exercises the masks
STEP_TILES = dict(block_h=16, block_k=16)
# "resident": the persistent kernels with W_hh resident, H <= 32 in two 16-wide chunks.
RESIDENT_TILES = dict(block_h=16, block_k=16, k_pad=32)
STRATEGIES = configs.STRATEGIES + ("resident",)


def make_inputs(cell, hidden, sizes, seed=0, with_bias=True):
    """float64 inputs of one layer: xg (N, G*H), h0 (B, H), c0 (B, H) or None,
    w_hh (G*H, H), b_hn (H,) or None, and w_cell (K, H) for a cell with per-unit weights."""
    gen = torch.Generator().manual_seed(seed)
    spec = cells.spec(cell)
    G = spec.gates
    B, N = sizes[0], sum(sizes)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    xg = rand(N, G * hidden, scale=0.5)
    h0 = rand(B, hidden, scale=0.5)
    c0 = rand(B, hidden, scale=0.5) if spec.has_c else None
    w_hh = rand(G * hidden, hidden, scale=hidden ** -0.5)
    b_hn = rand(hidden, scale=0.1) if spec.has_b_hn and with_bias else None
    w_cell = [rand(len(spec.cell_weights), hidden, scale=0.5)] if spec.cell_weights else []
    return [xg, h0, c0, w_hh, b_hn] + w_cell


def run(backend, cell, sizes, reverse, inputs, out_grads):
    """Forward and backward through Recurrence.apply; returns (outputs, input gradients)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    w_cell = leaves[5:]  # [w_cell] for a cell with per-unit weights (after w_hr and bias: None)
    outs = Recurrence.apply(backend, cell, torch.tensor(sizes), reverse, *leaves[:5], None,
                            *([None] + w_cell if w_cell else []))
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, out_grads)])
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3g}"


def case_tensors(cell, sizes, dtype, hidden=HIDDEN, seed=0, with_bias=True):
    """The inputs of a case (:func:`make_inputs`) in ``dtype`` on DEVICE, and float64 gradients
    of its outputs."""
    inputs = [None if t is None else t.to(DEVICE, dtype)
              for t in make_inputs(cell, hidden, sizes, seed, with_bias)]
    gen = torch.Generator().manual_seed(seed + 1)
    n_out = 3 if cells.spec(cell).has_c else 2
    shapes = [(sum(sizes), hidden), (sizes[0], hidden), (sizes[0], hidden)][:n_out]
    out_grads = [torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE) for s in shapes]
    return inputs, out_grads


@contextlib.contextmanager
def forced(strategy, step_tiles=STEP_TILES, lagging=None):
    """``strategy`` forced (None: the dispatcher's choice), the tiled ones with ``step_tiles``
    ("resident": persistent with RESIDENT_TILES).
    Under the interpreter the persistent kernel's programs run concurrently, each in its own
    thread (they wait for each other within a launch: the sequential loop would time out),
    program ``lagging`` (a grid index) behind the others (``interp.threaded_programs``)."""
    if strategy == "resident":
        strategy, step_tiles = "persistent", RESIDENT_TILES
    with contextlib.ExitStack() as stack:
        if strategy == "persistent" and INTERPRETED:
            stack.enter_context(interp.threaded_programs(lagging, delay_s=0.005))
            stack.enter_context(unittest.mock.patch.object(
                launch, "MAX_POLLS", min(launch.MAX_POLLS, 200_000)))  # ~20 s at most
        if strategy:
            tiles = step_tiles if strategy != "fused" else {}
            stack.enter_context(tg.forced_strategy(strategy, **tiles))
        yield


def run_triton(cell, sizes, reverse, inputs, out_grads, strategy, step_tiles=STEP_TILES):
    """:func:`run` of the triton backend, ``strategy`` forced (None: the dispatcher's choice)."""
    with forced(strategy, step_tiles):
        return run("triton", cell, sizes, reverse, inputs, out_grads)


@contextlib.contextmanager
def relu_pattern_of(y):
    """The reference's rnn_relu step, its ReLU switched on and off where the kernel's output
    ``y`` (N, H, packed) is positive. ReLU's derivative jumps at 0: a pre-activation within
    rounding of 0 may be on in the kernel and off in float64 (29 of 431,104 at float16, H=128,
    T=64, on the GPU and in the interpreter alike), and each such unit changes the gradient by
    its whole incoming gradient. The gradient oracle is float64 BPTT through the kernel's own
    on/off pattern; outputs are still checked against the plain reference."""
    on = (y > 0).double()

    def step(cell, xg_t, h, c, w_hh, *rest):
        start = xg_t.storage_offset() // xg_t.stride(0)  # xg_t: rows of the (N, H) projection
        return (xg_t + h @ w_hh.t()) * on[start:start + xg_t.shape[0]], None

    with unittest.mock.patch.object(reference, "cell_step", step):
        yield


def check_parity(cell, sizes, reverse, dtype, strategy, hidden=HIDDEN, tols=TOL, seed=0,
                 with_bias=True, step_tiles=STEP_TILES):
    if dtype == torch.bfloat16 and INTERPRETED:
        interp.require()  # the interpreter's bf16 dot, corrected by conftest.py
    inputs, out_grads = case_tensors(cell, sizes, dtype, hidden, seed, with_bias)
    # The oracle sees exactly the dtype-rounded inputs, computes in float64, then casts.
    oracle_inputs = [None if t is None else t.double() for t in inputs]
    ref_outs, ref_grads = run("reference", cell, sizes, reverse, oracle_inputs, out_grads)
    outs, grads = run_triton(cell, sizes, reverse, inputs, out_grads, strategy, step_tiles)
    if cell == "rnn_relu":
        with relu_pattern_of(outs[0]):
            ref_grads = run("reference", cell, sizes, reverse, oracle_inputs, out_grads)[1]
    tol = tols[dtype]
    for name, a, e in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert_close(a, e.to(dtype), tol, name)
    for name, a, e in zip(("d_xg", "d_h0", "d_c0", "d_w_hh", "d_b_hn", "d_w_cell"), grads,
                          ref_grads):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e.to(dtype), tol, name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", configs.CELLS)
def test_parity(cell, reverse, layout, dtype, strategy):
    """Outputs and all gradients match the float64 reference."""
    check_parity(cell, DENSE if layout == "dense" else PACKED, reverse, dtype, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "peephole_lstm"])
def test_several_batch_blocks(cell, strategy):
    """B = 19 > BLOCK_B: several batch programs, the last one partly masked."""
    sizes = [19, 19, 17, 16, 3, 1]
    check_parity(cell, sizes, False, torch.float32, strategy, hidden=20, seed=3)


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru", "peephole_lstm"])
def test_fused_second_bucket(cell):
    """H = 40 runs the H_PAD = 64 fused kernels (the larger buckets share the code)."""
    check_parity(cell, PACKED, True, torch.float16, "fused", hidden=40, seed=5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gru_without_bias(strategy):
    check_parity("gru", PACKED, True, torch.float32, strategy, with_bias=False, seed=4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lstm_c_n_unused(strategy):
    """d_c0 when only y and h_n carry gradients (c_n's gradient materialises as zeros)."""
    inputs = [None if t is None else t.float().to(DEVICE) for t in make_inputs("lstm", 16, PACKED)]
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:4]]
        with forced(strategy):
            y, h_n, _ = Recurrence.apply(backend, "lstm", torch.tensor(PACKED), False,
                                         *leaves, None, None)
            (y.sum() + h_n.square().sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for name, a, e in zip(("d_xg", "d_h0", "d_c0", "d_w_hh"), grads["triton"], grads["reference"]):
        assert_close(a, e, TOL[torch.float32], name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cell", configs.CELLS)
def test_bias_gradient(cell, strategy):
    """``bias`` (G*H,) through the Recurrence Function: triton's outputs and its gradients of bias
    and xg equal the reference Function's (run in float64 on the same float32 inputs; the
    interpreter runs no float64, so this stands in for a gradcheck of triton's bias)."""
    G = cells.GATES[cell]
    inputs = [None if t is None else t.float().to(DEVICE)
              for t in make_inputs(cell, HIDDEN, PACKED, seed=6)]
    inputs, w_cell = inputs[:5], inputs[5:]
    gen = torch.Generator().manual_seed(7)
    bias = (torch.randn(G * HIDDEN, generator=gen) * 0.5).to(DEVICE)
    n_out = 3 if cells.spec(cell).has_c else 2
    shapes = [(sum(PACKED), HIDDEN), (PACKED[0], HIDDEN), (PACKED[0], HIDDEN)][:n_out]
    out_grads = [torch.randn(*s, generator=gen).to(DEVICE) for s in shapes]
    results = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True)
                  for t in inputs + [bias] + w_cell]
        with forced(strategy if backend == "triton" else None):
            outs = Recurrence.apply(backend, cell, torch.tensor(PACKED), False, *leaves[:5], None,
                                    *leaves[5:])
            torch.autograd.backward(outs, [g.to(dtype) for g in out_grads])
        results[backend] = ([o.detach() for o in outs] + [leaves[5].grad, leaves[0].grad]
                            + [t.grad for t in leaves[6:]])
    names = ("y", "h_n", "c_n")[:n_out] + ("d_bias", "d_xg") + ("d_w_cell",) * len(w_cell)
    for name, a, e in zip(names, results["triton"], results["reference"]):
        assert_close(a, e.float(), TOL[torch.float32], name)


def launcher_inputs(cell, sizes=PACKED, hidden=16):
    t = [None if t is None else t.float().to(DEVICE) for t in make_inputs(cell, hidden, sizes)]
    return dict(xg=t[0], h0=t[1], c0=t[2], w_hh=t[3], b_hn=t[4], w_cell=(t[5:] or [None])[0])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cell", configs.CELLS)
def test_launchers_return_eight_gradients(cell, strategy):
    """The contract: recurrence_backward returns (d_xg, d_h0, d_c0, d_w_hh, d_b_hn, d_w_hr,
    d_bias, d_w_cell), d_w_cell (K, H) in w_cell's dtype exactly when w_cell is given."""
    a = launcher_inputs(cell)
    sizes = torch.tensor(PACKED)
    with forced(strategy):
        y, h_n, c_n, saved = tg.recurrence_forward(cell, a["xg"], a["h0"], a["c0"], a["w_hh"],
                                                   a["b_hn"], None, sizes, False,
                                                   w_cell=a["w_cell"])
        grads = tg.recurrence_backward(cell, torch.ones_like(y), torch.ones_like(h_n),
                                       None if c_n is None else torch.ones_like(c_n), a["h0"],
                                       a["c0"], a["w_hh"], a["b_hn"], None, sizes, False, y,
                                       saved, w_cell=a["w_cell"])
    assert len(grads) == 8 and grads[5] is None and grads[6] is None
    if a["w_cell"] is None:
        assert grads[7] is None
    else:
        assert grads[7].shape == a["w_cell"].shape and grads[7].dtype == a["w_cell"].dtype


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cell", configs.CELLS)
def test_forward_without_save_runs_the_kernels_that_write_no_stash(cell, strategy, monkeypatch):
    """save=False (no backward follows): the forward kernels' SAVE=False variant runs, outputs
    bitwise those of save=True, nothing saved. Then that variant given full-size h_prev and stash
    buffers (NaN-filled; the launcher's own config forced to save=False) leaves them untouched."""
    a = launcher_inputs(cell)
    sizes = torch.tensor(PACKED)
    args = (cell, a["xg"], a["h0"], a["c0"], a["w_hh"], a["b_hn"], None, sizes, True)
    seen = []
    options = launch._options

    def spy(config, step_math, force_no_save=False):
        seen.append(config)
        if force_no_save and config.kernel.startswith("forward"):
            config = dataclasses.replace(config, save=False)
        return options(config, step_math)

    with forced(strategy):
        monkeypatch.setattr(launch, "_options", spy)
        *outs, saved = tg.recurrence_forward(*args, save=True, w_cell=a["w_cell"])
        *lean, nothing = tg.recurrence_forward(*args, save=False, w_cell=a["w_cell"])
        assert [c.save for c in seen] == [True, False] and nothing == ()
        for got, want in zip(lean, outs):
            assert (got is None and want is None) or torch.equal(got, want)
        empty = torch.empty

        def nan_empty(*shape, **kwargs):
            t = empty(*shape, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, "empty", nan_empty)
        monkeypatch.setattr(launch, "_options", functools.partial(spy, force_no_save=True))
        *no_save, (h_prev, stash) = tg.recurrence_forward(*args, save=True, w_cell=a["w_cell"])
    assert seen[-1].kernel.startswith("forward") and h_prev.isnan().all() and stash.isnan().all()
    for got, want in zip(no_save, outs):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", configs.CELLS)
def test_fused_forward_prefetch_changes_no_bit(cell, reverse, dtype, monkeypatch):
    """The fused forward kernels that load each step's inputs one step ahead (``prefetch``, what
    the dispatcher picks at these sizes) give bitwise the results of the same kernel loading
    them in their own step (packed: the last steps have fewer rows; either direction)."""
    a = {k: None if v is None else v.to(dtype) for k, v in launcher_inputs(cell).items()}
    args = (cell, a["xg"], a["h0"], a["c0"], a["w_hh"], a["b_hn"], None, torch.tensor(PACKED),
            reverse)
    seen = []
    options = launch._options

    def spy(config, plan, prefetch=None):
        if prefetch is not None:
            config = dataclasses.replace(config, prefetch=prefetch)
        seen.append(config)
        return options(config, plan)

    with forced("fused"):
        outs = tg.recurrence_forward(*args, w_cell=a["w_cell"])
        monkeypatch.setattr(launch, "_options", functools.partial(spy, prefetch=False))
        plain = tg.recurrence_forward(*args, w_cell=a["w_cell"])
    assert configs.select_config("forward", cell, dtype, 16).prefetch
    assert [c.prefetch for c in seen] == [False]
    for got, want in zip(plain[:3] + plain[3], outs[:3] + outs[3]):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["step", "persistent", "resident"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiled_kernels_exchange_in_the_products_dtype(strategy, dtype, monkeypatch):
    """The tiled kernels' programs hand h (forward) and the hidden products' gradients
    (backward) over in the dtype of the products that read them (16-bit models: half the bytes
    of float32), each keeping its own units of h and c in float32."""
    a = {k: None if v is None else v.to(dtype) for k, v in launcher_inputs("lstm").items()}
    heads = []
    passes = launch._tiled_passes

    def spy(forward, config, plan, head, steps, n):
        heads.append(head)
        return passes(forward, config, plan, head, steps, n)

    monkeypatch.setattr(launch, "_tiled_passes", spy)
    sizes = torch.tensor(PACKED)
    with forced(strategy):
        y, h_n, c_n, saved = tg.recurrence_forward("lstm", a["xg"], a["h0"], a["c0"], a["w_hh"],
                                                   None, None, sizes, False)
        tg.recurrence_backward("lstm", torch.ones_like(y), torch.ones_like(h_n),
                               torch.ones_like(c_n), a["h0"], a["c0"], a["w_hh"], None, None,
                               sizes, False, y, saved)
    (h_buf, h_state, c_state), exchange = heads[0][4:7], heads[1][7]
    B, H = a["h0"].shape
    assert h_buf.dtype == dtype and h_buf.shape == (2, B, H)
    assert h_state.dtype == c_state.dtype == torch.float32
    assert exchange.dtype == dtype and exchange.shape == (2, B, 4 * H)


def test_w_cell_is_checked():
    """w_cell is required exactly for cells with per-unit weights, as (K, H) in xg's dtype."""
    lstm, peep = launcher_inputs("lstm"), launcher_inputs("peephole_lstm")
    sizes = torch.tensor(PACKED)

    def forward(a, cell, w_cell):
        return tg.recurrence_forward(cell, a["xg"], a["h0"], a["c0"], a["w_hh"], None, None,
                                     sizes, False, w_cell=w_cell)
    with pytest.raises(ValueError, match="no per-unit cell weights"):
        forward(lstm, "lstm", peep["w_cell"])
    with pytest.raises(ValueError, match="takes w_cell"):
        forward(peep, "peephole_lstm", None)
    with pytest.raises(ValueError, match="w_cell must be"):
        forward(peep, "peephole_lstm", peep["w_cell"][:2])
    with pytest.raises(ValueError, match="w_cell must be"):
        forward(peep, "peephole_lstm", peep["w_cell"].half())
    y, h_n, c_n, saved = forward(peep, "peephole_lstm", peep["w_cell"])
    with pytest.raises(ValueError, match="takes w_cell"):
        tg.recurrence_backward("peephole_lstm", y, h_n, c_n, peep["h0"], peep["c0"],
                               peep["w_hh"], None, None, sizes, False, y, saved)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_peephole_weight_gradient_is_deterministic(strategy):
    """d_w_cell (a torch reduction after the loop, no atomics): bit for bit run to run."""
    inputs = [t.float().to(DEVICE) for t in make_inputs("peephole_lstm", 24, PACKED)
              if t is not None]
    inputs.insert(4, None)  # b_hn
    out_grads = [torch.ones(sum(PACKED), 24, device=DEVICE)] + \
                [torch.ones(PACKED[0], 24, device=DEVICE)] * 2
    with forced(strategy):
        first = run("triton", "peephole_lstm", PACKED, False, inputs, out_grads)
        second = run("triton", "peephole_lstm", PACKED, False, inputs, out_grads)
    assert first[1][5] is not None
    for a, b in zip(first[1], second[1]):
        if a is not None:
            assert torch.equal(a, b)


def test_backward_is_deterministic():
    """Same inputs, same gradients bit for bit (no atomics; one GEMM for the weights)."""
    inputs = [None if t is None else t.float().to(DEVICE) for t in make_inputs("gru", 24, PACKED)]
    out_grads = [torch.ones(sum(PACKED), 24, device=DEVICE),
                 torch.ones(PACKED[0], 24, device=DEVICE)]
    first = run("triton", "gru", PACKED, False, inputs, out_grads)
    second = run("triton", "gru", PACKED, False, inputs, out_grads)
    for a, b in zip(first[1], second[1]):
        if a is not None:
            assert torch.equal(a, b)


def test_select_config_strategies():
    """Small H runs fused, H beyond FUSED_MAX_HIDDEN runs step; every choice is in CONFIGS."""
    for cell in configs.CELLS:
        for name, dtype in configs.DTYPES.items():
            for direction in ("forward", "backward"):
                limit = configs.FUSED_MAX_HIDDEN[(direction, cell, name)]
                small = tg.select_config(direction, cell, dtype, 1)
                at_limit = tg.select_config(direction, cell, dtype, limit)
                beyond = tg.select_config(direction, cell, dtype, limit + 1)
                assert small.strategy == at_limit.strategy == "fused"
                assert at_limit.h_pad >= limit and small.h_pad >= 16
                assert beyond.strategy == "step"
                assert {small, at_limit, beyond} <= set(tg.CONFIGS)
    with pytest.raises(ValueError):
        tg.select_config("forward", "lstm", torch.float16, max(configs.FUSED_BUCKETS) + 1, "fused")
    # Packed tensors of 2**31 elements or more leave the int32-indexed fused kernels.
    rows = -(-configs.FUSED_MAX_ELEMENTS // (configs.STASH["lstm"] * 32))  # ceil
    assert tg.select_config("forward", "lstm", torch.float16, 32, rows=rows - 1).strategy == "fused"
    assert tg.select_config("forward", "lstm", torch.float16, 32, rows=rows).strategy == "step"


def test_why_not():
    assert tg.why_not("lstm", torch.device(DEVICE), torch.float32, 8) is not None
    assert tg.why_not("gru", torch.device(DEVICE), torch.float64, 0) is not None
    assert tg.why_not("gru", torch.device(DEVICE), torch.float16, 0) is None
    assert backends.choose("triton", "gru", DEVICE, torch.float16).name == "triton"


# ----------------------------------------------------------------------------------------------
# The interpreter as a stand-in for the GPU: its bf16 dot, and the order of a launch's programs.
# ----------------------------------------------------------------------------------------------
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="tests under Triton's interpreter")


def _jit_code(module):
    """{name: code} of the ``@triton.jit`` (or ``cell_jit``) functions of ``module``'s file,
    without docstrings and comments."""
    code = {}
    for node in ast.walk(ast.parse(open(module.__file__).read())):
        if isinstance(node, ast.FunctionDef) and any(
                "jit" in ast.unparse(d) for d in node.decorator_list):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            code[node.name] = ast.unparse(node.args) + "\n" + "\n".join(map(ast.unparse, body))
    return code


def test_kernel_source_has_no_interpreter_branch():
    """The jit code of the kernels, their helpers and the cells' step math names nothing that
    could tell the interpreter apart (like the former DOT_FP32 constexpr): the interpreter runs
    the dots that are compiled for a GPU."""
    modules = [kernels, step_math] + [cells.MODULES[name] for name in configs.CELLS]
    code = {f"{m.__name__}.{name}": text for m in modules for name, text in _jit_code(m).items()}
    assert {"fastrnn.kernels.triton_gpu.kernels._backward_tiled_kernel",
            "fastrnn.kernels.triton_gpu.step_math.mm", "fastrnn.cells.gru.preacts"} <= set(code)
    for name, text in code.items():
        assert not re.search(r"(?i)interpret|DOT_FP32|environ", text), name


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    """c = a @ b, (N, N) row-major tiles, accumulated in float32."""
    tile = tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
    c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile), tl.zeros([N, N], tl.float32))
    tl.store(c_ptr + tile, c)


@needs_interpreter
def test_interpreter_bf16_dot():
    """A bf16 x bf16 tl.dot: exact products summed in float32 (as on a GPU) with the correction
    conftest.py installs; the interpreter's own dot multiplies the bf16 bit patterns."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).bfloat16() for _ in range(2))
    expected = a.double() @ b.double()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-6)
    with interp.original_dot():
        _dot_kernel[(1,)](a, b, c, N=16)
    assert (c.double() - expected).abs().max() > 1.0


@needs_interpreter
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_parity_needs_the_dot_correction(strategy):
    """The kernels' bf16 products go through the interpreter's bf16 tl.dot (no upcast of their
    own): without the correction, bf16 parity fails."""
    with interp.original_dot(), pytest.raises(AssertionError):
        check_parity("lstm", [4, 4], False, torch.bfloat16, strategy)


@triton.jit
def _order_kernel(counter_ptr, order_ptr):
    """order[k] = the linear id of the k-th program to run."""
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(order_ptr + tl.atomic_add(counter_ptr, 1), pid)


@needs_interpreter
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_program_order_runs_every_program_once(order):
    counter, ran = torch.zeros(1, dtype=torch.int32), torch.full((12,), -1, dtype=torch.int32)
    with interp.program_order(order):
        _order_kernel[(3, 4)](counter, ran)
    natural = torch.arange(12, dtype=torch.int32)
    assert sorted(ran.tolist()) == natural.tolist()
    if order == "reversed":
        assert torch.equal(ran, natural.flip(0))
    else:
        assert not torch.equal(ran, natural) and not torch.equal(ran, natural.flip(0))


WIDE = {"dense": [19] * 3, "packed": [19, 17, 3]}  # two batch blocks, then one
# (cell, strategy, layout, reverse): each cell, both strategies and layouts, both directions.
ORDER_CASES = [("rnn_tanh", "fused", "packed", False), ("rnn_relu", "step", "dense", True),
               ("lstm", "step", "packed", False), ("lstm", "fused", "dense", True),
               ("gru", "fused", "packed", True), ("gru", "step", "packed", True),
               ("peephole_lstm", "step", "dense", False),
               ("peephole_lstm", "fused", "packed", False)]


@functools.cache
def _natural_order_results(cell, strategy, layout, reverse):
    inputs, out_grads = case_tensors(cell, WIDE[layout], torch.float32, seed=8)
    return run_triton(cell, WIDE[layout], reverse, inputs, out_grads, strategy)


@needs_interpreter
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
@pytest.mark.parametrize("cell,strategy,layout,reverse", ORDER_CASES)
def test_program_order(cell, strategy, layout, reverse, order):
    """No result depends on the order of a launch's programs (fused: batch blocks; step: batch
    blocks x unit blocks, no grid-wide barrier): outputs and gradients bit for bit those of
    the interpreter's natural order."""
    expected = _natural_order_results(cell, strategy, layout, reverse)
    inputs, out_grads = case_tensors(cell, WIDE[layout], torch.float32, seed=8)
    with interp.program_order(order):
        actual = run_triton(cell, WIDE[layout], reverse, inputs, out_grads, strategy)
    for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]):
        assert (a is None and e is None) or torch.equal(a, e)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: full-size kernels on the GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cell", configs.CELLS)
def test_parity_cuda_full_size(cell, dtype):
    """Every shipped strategy at full size on the GPU: the largest fused H and two larger H, B = 64
    (4 batch programs), T = 64, packed, both directions; at the larger H the dispatcher's choice
    (persistent where the grid fits the SMs, W_hh resident where it may: 3 * limit + 8 is
    within every resident limit, 4 * limit + 8 over some), the streamed persistent kernels
    (``k_pad`` 0) and the step kernels."""
    sizes = [64] * 40 + [48] * 16 + [5] * 8
    limits = [tg.fused_max_hidden(d, cell, dtype) for d in ("forward", "backward")]
    for hidden in sorted({*limits, 3 * max(limits) + 8, 4 * max(limits) + 8}):
        for strategy in (None,) if hidden in limits else (None, "persistent", "step"):
            for reverse in (False, True):
                check_parity(cell, sizes, reverse, dtype, strategy, hidden=hidden, tols=TOL_CUDA,
                             step_tiles=dict(k_pad=0) if strategy else {})
