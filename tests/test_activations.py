"""Gate activations saturate like torch's (issue #12 W1, W2).

The kernels' own tanh and sigmoid (numba: ``fastrnn.kernels.numba_cpu.activations``; Triton:
``step_math.tanh`` and ``tl.sigmoid``) against torch's CPU ones over float32 bit patterns: exactly
+-1 / 0 / 1 wherever torch's are (so that the derivatives 1 - y^2 and s (1 - s) are exactly 0),
NaN where torch's is NaN, and within a few ulp elsewhere. Then whole modules at saturated gates
against torch.nn: outputs and gradients equal, NaN included (relu's gradient passes where its
output is NaN, as torch's threshold_backward).
"""
import os

import numpy as np
import pytest
import torch
from _support import require
from torch import nn

import fastrnn

# numpy's overflow warnings of the Triton interpreter (e^-x overflowing to inf, as meant)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

F32 = np.float32
TINY32 = float(np.finfo(F32).tiny)
MAX32 = float(np.finfo(F32).max)


# ---------------------------------------------------------------------------------------- inputs
def _between(lo, hi, count=None):
    """The float32 values in [lo, hi] (0 <= lo <= hi), all of them or ``count`` spread evenly
    over their bit patterns."""
    a, b = (int(np.array(v, F32).view(np.int32)) for v in (lo, hi))
    step = 1 if count is None else max(1, (b - a) // count)
    return np.arange(a, b + 1, step, dtype=np.int32).view(F32)


def _sweep32():
    """Every 1021st float32 bit pattern (all signs and exponents, NaNs and infinities), then
    dense ranges: around the saturation points (tanh: 9.0108; sigmoid: 16.636 and the overflow
    of e^-x at -88.72, above which sigmoid is denormal), around 0 and out to float32's limits."""
    pos = np.concatenate([
        _between(8.8, 9.2),                    # tanh -> 1
        _between(16.5, 16.8),                  # sigmoid -> 1
        _between(86.5, 89.5),                  # sigmoid(-x): denormal, then 0
        _between(0, 1e-3, 400_000), _between(1e-3, 1.0, 400_000), _between(1.0, 9.2, 400_000),
        np.array([1e30, 3.4e38, MAX32, np.inf, TINY32, 1e-45], F32)])
    patterns = np.arange(0, 1 << 32, 1021, dtype=np.int64).astype(np.uint32).view(F32)
    return np.concatenate([patterns, pos, -pos, np.array([0.0, -0.0, np.nan], F32)])


def _sweep64(gen):
    """Random float64 bit patterns and values near the saturation points and 0."""
    bits = gen.integers(-(1 << 63), (1 << 63) - 1, 1_000_000, dtype=np.int64, endpoint=True)
    return np.concatenate([
        bits.view(np.float64), gen.uniform(-1, 1, 300_000), gen.uniform(-1e-3, 1e-3, 100_000),
        gen.uniform(-40, 40, 300_000), gen.uniform(18.5, 19.5, 100_000),
        gen.uniform(-750, -700, 100_000),
        np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1e300, -1e300, 1.7e308, -1.7e308, 5e-324])])


def _ulps(a, b):
    """Distance of same-dtype float arrays in units in the last place (finite values)."""
    int_type = np.int32 if a.dtype == F32 else np.int64
    i, j = (v.view(int_type).astype(np.int64) for v in (a, b))
    sign = np.int64(np.iinfo(int_type).min)
    i, j = (np.where(v < 0, sign - v, v) for v in (i, j))  # monotone in the float's value
    return np.abs(i - j)


def _check_against_torch(got, x, fn, max_ulp, max_abs=None):
    """``got`` = the kernel's ``fn`` (torch.tanh / torch.sigmoid) of ``x``: NaN where torch's
    is NaN, exactly torch's where that is saturated (+-1, 0, 1), within ``max_ulp`` elsewhere
    (or, given ``max_abs``, within that absolute distance)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own result on one thread: on 2, 1 run in ~10 gave
    try:                      # tanh(8.8643) = 1.0 (not 0.99999994) for the worker's chunk
        want = fn(torch.from_numpy(x)).numpy()
    finally:
        torch.set_num_threads(threads)
    name = f"{fn.__name__} {x.dtype}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN positions"
    saturated = np.isin(want, [-1.0, 0.0, 1.0]) & (x != 0)
    wrong = saturated & (got != want)
    assert not wrong.any(), (f"{name}: {wrong.sum()} not saturated as torch, e.g. x = "
                             f"{x[wrong][:3]} -> {got[wrong][:3]} (torch: {want[wrong][:3]})")
    grad = 1 - got * got if fn is torch.tanh else got * (1 - got)
    assert (grad[saturated] == 0).all(), f"{name}: derivative not 0 where saturated"
    finite = ~np.isnan(want)
    if max_abs is not None:
        gap = np.abs(got[finite].astype(np.float64) - want[finite])
        assert gap.max() <= max_abs, f"{name}: {gap.max()} from torch at x = {x[finite][gap.argmax()]!r}"
        return
    ulps = _ulps(got[finite], want[finite])
    worst = np.argmax(ulps)
    assert ulps[worst] <= max_ulp, (f"{name}: {ulps[worst]} ulp from torch at "
                                    f"x = {x[finite][worst]!r}")


# ----------------------------------------------------------------------------------------- numba
@pytest.fixture(scope="module")
def numba_apply():
    """f(x, which) -> tanh (0) or sigmoid (1) of array x, elementwise in an @njit loop (the code
    the gate loops inline: fastrnn.cells.scalar's functions, their numba overloads)."""
    numba = pytest.importorskip("numba")
    from fastrnn.cells import scalar
    from fastrnn.kernels.numba_cpu import activations, jit  # noqa: F401 (the overloads)

    @numba.njit(fastmath=jit._FASTMATH, error_model="numpy")
    def apply(x, which):
        out = np.empty_like(x)
        for j in range(x.shape[0]):
            out[j] = scalar.tanh(x[j]) if which == 0 else scalar.sigmoid(x[j])
        return out
    return apply


# Largest distances to torch's CPU results, as swept. float32 tanh is Eigen's rational function;
# the sigmoids are 2 ulp from the exact value, as torch's own are.
MAX_ULP = {(F32, 0): 5, (F32, 1): 4, (np.float64, 0): 2, (np.float64, 1): 4}


@pytest.mark.parametrize("which", [0, 1], ids=["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [F32, np.float64], ids=["f32", "f64"])
def test_numba_activations_saturate_like_torch(numba_apply, dtype, which):
    x = _sweep32() if dtype == F32 else _sweep64(np.random.default_rng(12))
    with np.errstate(all="ignore"):
        _check_against_torch(numba_apply(x, which), x, (torch.tanh, torch.sigmoid)[which],
                             MAX_ULP[dtype, which])


# ---------------------------------------------------------------------------------------- triton
@pytest.fixture(scope="module")
def triton_apply():
    """f(x, which) -> step_math.tanh (0) or tl.sigmoid (1) of float32 array x in a Triton kernel
    (under the interpreter without CUDA)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    triton = pytest.importorskip("triton", reason="triton does not import")
    import triton.language as tl

    from fastrnn.kernels.triton_gpu import step_math

    @step_math.cell_jit  # triton.jit that also sees step_math (the interpreter needs it global)
    def kernel(x_ptr, out_ptr, n, WHICH: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = step_math.tanh(x) if WHICH == 0 else tl.sigmoid(x)
        tl.store(out_ptr + offs, y, mask=mask)

    def apply(x, which):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        xt = torch.from_numpy(x).to(device)
        out = torch.empty_like(xt)
        block = 1 << 16
        kernel[(triton.cdiv(x.size, block),)](xt, out, x.size, WHICH=which, BLOCK=block)
        return out.cpu().numpy()
    return apply


@pytest.mark.parametrize("which", [0, 1], ids=["tanh", "sigmoid"])
def test_triton_activations_saturate_like_torch(triton_apply, which):
    """Under the interpreter (numpy's float32 exp): tl.sigmoid 4 ulp of torch's; step_math.tanh,
    2 sigmoid(2x) - 1 with -1 selected from -9.0108 on, within 2.4e-7 absolute (not relative:
    near 0 it cancels; it is 1 from x = 8.3 on, torch's CPU tanh from 9.0108: a more accurate
    tanh spilled registers in fused kernels on sm_90). Both saturate exactly, with derivative 0, wherever torch's do. On a
    GPU (approximate exp and division) only saturation far from the switch points and NaN."""
    fn = (torch.tanh, torch.sigmoid)[which]
    x = _sweep32()
    if torch.cuda.is_available():
        far = np.abs(x) >= 10.0 if which == 0 else (x >= 17.0) | (x <= -89.0)
        x = x[far | np.isnan(x)]
    with np.errstate(all="ignore"):
        _check_against_torch(triton_apply(x, which), x, fn,
                             np.inf if torch.cuda.is_available() else (None, 4)[which],
                             max_abs=2.4e-7 if which == 0 and not torch.cuda.is_available()
                             else None)


# --------------------------------------------------------------------------------------- modules
def _device(backend, cell):
    """Where ``backend`` runs float32 ``cell`` here (skips, with the reason, where it cannot)."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    require(backend, cell, torch.float32, device)
    return device


def _run(module, x, hx, grad_outs, device):
    """Outputs and gradients (of x, the initial states, every parameter) of one forward and
    backward with explicit output gradients, on the CPU."""
    x = x.detach().to(device).requires_grad_(True)
    hx = tuple(h.detach().to(device).requires_grad_(True) for h in hx)
    out, state = module(x, hx if len(hx) == 2 else hx[0])
    outs = [out] + (list(state) if isinstance(state, tuple) else [state])
    leaves = [x, *hx, *module.parameters()]
    grads = torch.autograd.grad(outs, leaves, [g.to(device) for g in grad_outs])
    return [o.detach().cpu() for o in outs], [g.cpu() for g in grads]


def _assert_same_as_torch(torch_cls, backend, x, hx, setup=None, exact=True, **kwargs):
    """torch.nn's ``torch_cls(**kwargs)`` (float32, CPU, weights seeded then ``setup(module)``)
    and its fastrnn twin on ``backend``: outputs and gradients equal (``exact``: bitwise, else to
    float32 rounding), NaN where torch's are. Returns the twin's (outputs, gradients)."""
    device = _device(backend, {"RNN": "rnn_" + kwargs.get("nonlinearity", "tanh"),
                               "LSTM": "lstm", "GRU": "gru"}[torch_cls.__name__])
    torch.manual_seed(0)
    ref = torch_cls(**kwargs)
    if setup is not None:
        with torch.no_grad():
            setup(ref)
    mod = getattr(fastrnn, torch_cls.__name__)(backend=backend, **kwargs)
    mod.load_state_dict(ref.state_dict())
    mod = mod.to(device)
    gen = torch.Generator().manual_seed(1)
    n_out = 3 if torch_cls is nn.LSTM else 2
    shapes = [(x.shape[0], x.shape[1], kwargs["hidden_size"])] + [h.shape for h in hx]
    grad_outs = [torch.randn(s, generator=gen) for s in shapes[:n_out]]
    want = _run(ref, x, hx, grad_outs, "cpu")
    got = _run(mod, x, hx, grad_outs, device)
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for kind, g, w in zip(("output", "gradient"), got, want):
        for i, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, equal_nan=True, **tol,
                                       msg=lambda m: f"{backend} {kind} {i}: {m}")
    return got


BACKENDS = ["numba", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_tanh_saturates(backend):
    """nn.RNN(1, 1), weight 1, x = 20: y is exactly 1 and dy/dx exactly 0 (was 0.99999976 and
    4.8e-7); x = 1e30: every gradient 0, no NaN (the weight gradient was 4.8e23)."""
    def setup(m):
        for p in m.parameters():
            p.zero_()
        m.weight_ih_l0.fill_(1.0)
    for value in (20.0, 1e30, -1e30, 3.4e38):
        x = torch.full((2, 1, 1), value)
        (y, h_n), grads = _assert_same_as_torch(nn.RNN, backend, x, (torch.zeros(1, 1, 1),),
                                                setup, input_size=1, hidden_size=1)
        assert (y.abs() == 1).all() and (grads[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_shut_update_gate_keeps_no_state(backend):
    """z = sigmoid(-100) is exactly 0: h' = n = 0 with h0 = 1e6 (was 0.1192), and the gradients
    through z are 0."""
    def setup(m):
        for p in m.parameters():
            p.zero_()
        m.bias_ih_l0[1] = -100.0  # the update gate's bias (r, z, n)
    (y, h_n), _ = _assert_same_as_torch(nn.GRU, backend, torch.zeros(3, 1, 1),
                                        (torch.full((1, 1, 1), 1e6),), setup, exact=False,
                                        input_size=1, hidden_size=1)
    assert (h_n == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_shut_forget_gate_forgets(backend):
    """f = sigmoid(-100) is exactly 0: c' = i g = 0 with c0 = 1e6 (was 0.1192)."""
    def setup(m):
        for p in m.parameters():
            p.zero_()
        m.bias_ih_l0[1] = -100.0  # the forget gate's bias (i, f, g, o)
    (y, h_n, c_n), _ = _assert_same_as_torch(
        nn.LSTM, backend, torch.zeros(3, 1, 1),
        (torch.zeros(1, 1, 1), torch.full((1, 1, 1), 1e6)), setup, exact=False, input_size=1,
        hidden_size=1)
    assert (c_n == 0).all() and (h_n == 0).all()


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_inputs_saturate_every_gate(backend, cls):
    """x = +-1e30: every gate saturated, the gradients of the weights exactly torch's (0 through
    every gate), nothing NaN."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2, (3, 2, 3), generator=gen).float().mul(2).sub(1).mul(1e30)
    hx = (torch.randn(1, 2, 4, generator=gen),) * (2 if cls is nn.LSTM else 1)
    _, grads = _assert_same_as_torch(cls, backend, x, hx, exact=False, input_size=3,
                                     hidden_size=4)
    assert not any(g.isnan().any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_gradient_passes_nan(backend):
    """A NaN input makes its row's relu output NaN; torch's threshold_backward lets the gradient
    through there (grad where not y <= 0), so d_x of that row is finite, not 0."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, generator=gen)
    x[1, 0, 0] = float("nan")
    got = _assert_same_as_torch(nn.RNN, backend, x, (torch.randn(1, 2, 3, generator=gen),),
                                exact=False, input_size=2, hidden_size=3, nonlinearity="relu")
    d_x = got[1][0]
    assert d_x[1, 0].isfinite().all() and (d_x[1, 0] != 0).any()
