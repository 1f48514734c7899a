"""The peephole LSTM (``fastrnn.PeepholeLSTM``, cell ``peephole_lstm``): a cell torch.nn does not
have, added as one cell file plus its registry entry.

Its oracle is the reference step of ``fastrnn/cells/peephole_lstm.py``, checked two ways: with the
peephole weights at zero the module is torch.nn.LSTM (outputs, states and every gradient), and
with them nonzero the Function passes float64 gradcheck. Each compiled backend that declares the
cell is compared with the reference on fresh random inputs (outputs, final states, gradients of
input, states and every parameter, the peephole weights included) and gradchecked in float64
where it has float64. Tolerances as in tests/_support.py (float32 1e-5 / 1e-4, float64 1e-9).
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import Recurrence
from _support import TOL, assert_all_close, flatten, require, run_and_grad, seed_of

CELL = "peephole_lstm"
PEEPHOLES = ("weight_ci", "weight_cf", "weight_co")


def _module(backend, dtype, seed, **kwargs):
    torch.manual_seed(seed)
    return fastrnn.PeepholeLSTM(dtype=dtype, backend=backend, **kwargs)


def test_parameters_are_torch_named_and_initialised_in_range():
    m = fastrnn.PeepholeLSTM(3, 5, num_layers=2, bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    for layer in range(2):
        for suffix in ("", "_reverse"):
            for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + PEEPHOLES:
                assert f"{base}_l{layer}{suffix}" in names
    for name in names:
        if name.startswith(PEEPHOLES):
            p = getattr(m, name)
            assert p.shape == (5,) and p.abs().max() <= 5 ** -0.5 and p.abs().max() > 0
    assert set(m.state_dict()) == set(names)
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.PeepholeLSTM(3, 5, proj_size=2)
    assert m.backend_for().name in ("numba", "reference")
    with pytest.raises(fastrnn.BackendUnavailable, match="torch.nn has no peephole_lstm"):
        fastrnn.PeepholeLSTM(3, 5, backend="native").backend_for()


@pytest.mark.parametrize("packed", [False, True])
def test_zero_peepholes_is_torch_nn_lstm(packed):
    """With w_ci = w_cf = w_co = 0 the cell is torch.nn.LSTM: same outputs, states, gradients."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(seed_of(CELL, "zero", packed))
    mod = _module("reference", dtype, seed_of(CELL, packed), input_size=4, hidden_size=6,
                  num_layers=2, bidirectional=True)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith(PEEPHOLES):
                p.zero_()
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=dtype)
    ref.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith(PEEPHOLES)})
    x = torch.randn(5, 3, 4, generator=gen, dtype=dtype)
    h0, c0 = (torch.randn(4, 3, 6, generator=gen, dtype=dtype) for _ in range(2))
    out_shape = (10, 12) if packed else (5, 3, 12)  # packed: 5 + 3 + 2 rows
    weights = [torch.randn(*out_shape, generator=gen, dtype=dtype)] + \
              [torch.randn(4, 3, 6, generator=gen, dtype=dtype) for _ in range(2)]

    def build(leaves):
        x, h, c = leaves
        return (pack_padded_sequence(x, [5, 3, 2]) if packed else x), (h, c)

    out, grads = run_and_grad(mod, [x, h0, c0], build, weights)
    expected_out, expected_grads = run_and_grad(ref, [x, h0, c0], build, weights)
    assert_all_close(out, expected_out, dtype, "outputs")
    torch_grads = [g for g, (n, _) in zip(grads[3:], mod.named_parameters())
                   if not n.startswith(PEEPHOLES)]
    assert_all_close(grads[:3] + torch_grads, expected_grads, dtype, "gradients")


def _function_inputs(dtype, packed=True):
    gen = torch.Generator().manual_seed(seed_of(CELL, "function", packed, dtype))
    H = 4
    sizes = torch.tensor([3, 3, 2, 1] if packed else [3, 3, 3, 3], dtype=torch.int64)
    N, B = int(sizes.sum()), int(sizes[0])

    def rand(*shape):
        return (0.5 * torch.randn(*shape, generator=gen, dtype=dtype)).requires_grad_(True)

    return dict(xg=rand(N, 4 * H), h0=rand(B, H), c0=rand(B, H), w_hh=rand(4 * H, H),
                bias=rand(4 * H), w_cell=rand(3, H), batch_sizes=sizes)


def _apply(backend, a, reverse):
    names = ["xg", "h0", "c0", "w_hh", "bias", "w_cell"]

    def fn(xg, h0, c0, w_hh, bias, w_cell):
        return Recurrence.apply(backend, CELL, a["batch_sizes"], reverse, xg, h0, c0, w_hh, None,
                                None, bias, w_cell)
    return fn, [a[n] for n in names]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("reverse", [False, True])
def test_function_gradcheck(backend, reverse):
    require(backend, CELL, torch.float64)
    fn, inputs = _apply(backend, _function_inputs(torch.float64), reverse)
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", ["dense", "packed", "bidirectional-packed"])
@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_backend_matches_reference(backend, fmt, dtype):
    """Module level: outputs, final (h, c) and the gradients of input, h0, c0 and every
    parameter (peepholes included) equal the reference backend's on fresh random inputs."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    require(backend, CELL, dtype, device)
    seed = seed_of(CELL, backend, fmt, dtype)
    bidir = fmt.startswith("bidirectional")
    kwargs = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=bidir)
    ref, mod = _module("reference", dtype, seed, **kwargs), _module(backend, dtype, seed, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    D = 2 if bidir else 1
    x = torch.randn(5, 3, 4, generator=gen, dtype=dtype)
    h0, c0 = (torch.randn(2 * D, 3, 6, generator=gen, dtype=dtype) for _ in range(2))
    packed = "packed" in fmt

    def build(leaves):
        x, h, c = leaves
        return (pack_padded_sequence(x, [5, 3, 2], enforce_sorted=False) if packed else x), (h, c)

    out_shape = (10, 6 * D) if packed else (5, 3, 6 * D)  # packed: 5 + 3 + 2 rows
    weights = [torch.randn(*out_shape, generator=gen, dtype=dtype)] + \
              [torch.randn(2 * D, 3, 6, generator=gen, dtype=dtype) for _ in range(2)]
    expected_out, expected_grads = run_and_grad(ref, [x, h0, c0], build, weights)
    out, grads = run_and_grad(mod.to(device), [x, h0, c0], build, weights)
    assert_all_close(out, expected_out, dtype, "outputs")
    assert_all_close(grads, expected_grads, dtype, "gradients")


def test_functional_and_unbatched_input():
    mod = _module("reference", torch.float32, 0, input_size=3, hidden_size=4)
    x = torch.randn(6, 3)
    out, (h, c) = mod(x)
    assert out.shape == (6, 4) and h.shape == (1, 4) and c.shape == (1, 4)
    batched, _ = mod(x.unsqueeze(1))
    torch.testing.assert_close(out, batched.squeeze(1), **TOL[torch.float32])
    flat = flatten((out, (h, c)))
    assert all(torch.isfinite(t).all() for t in flat)


def test_one_step_follows_gers_and_schmidhuber():
    """One step at H=1 against the equations written out by hand (c into i and f, c' into o)."""
    import math
    xg = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=torch.float64)
    h0, c0 = torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64)
    w_hh = torch.tensor([[0.2], [0.6], [-0.4], [0.9]], dtype=torch.float64)
    w_ci, w_cf, w_co = 0.5, -1.5, 2.0
    w_cell = torch.tensor([[w_ci], [w_cf], [w_co]], dtype=torch.float64)
    y, h, c = fastrnn.reference.recurrence(CELL, xg, h0, c0, w_hh, None, None,
                                           torch.tensor([1]), False, None, w_cell)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    pre = [0.3 + 0.4 * 0.2, -0.2 + 0.4 * 0.6, 0.5 - 0.4 * 0.4, 0.1 + 0.4 * 0.9]
    i, f, g = sig(pre[0] + w_ci * -0.7), sig(pre[1] + w_cf * -0.7), math.tanh(pre[2])
    c_new = f * -0.7 + i * g
    h_new = sig(pre[3] + w_co * c_new) * math.tanh(c_new)
    assert c.item() == pytest.approx(c_new, abs=1e-15) and h.item() == pytest.approx(h_new, abs=1e-15)
    assert y.item() == h.item()
