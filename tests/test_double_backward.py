"""Double backward (``create_graph=True``) through the kernel backends.

A plain backward runs the backend's hand-written BPTT kernel; the gradients it returns under
``create_graph=True`` are differentiable again: their backward recomputes the layer through the
reference loop (``fastrnn.autograd._BPTT``). Checked here by ``gradgradcheck`` on
``Recurrence.apply`` (numba, float64, every cell), against the reference in float32 (triton, whose
interpreter runs float32 only), and at module level against torch.nn (a gradient penalty), with
the module path's recipe for xg instead of a kept xg. Seeds: ``seed_of`` the case.
"""
import os

import pytest
import torch
from _support import seed_of

import fastrnn
from fastrnn import backends, cells
from fastrnn.autograd import Recurrence

# (cell, proj_size > 0, biases: bias (G*H,) and, for gru, b_hn)
VARIANTS = {
    "rnn_tanh": ("rnn_tanh", False, True),
    "rnn_relu": ("rnn_relu", False, False),
    "lstm": ("lstm", False, True),
    "lstm_proj": ("lstm", True, False),
    "gru": ("gru", False, True),
    "gru_no_bias": ("gru", False, False),
    "peephole_lstm": ("peephole_lstm", False, True),
}
DENSE, PACKED = [3, 3, 3, 3], [3, 3, 2, 1]


def layer_inputs(variant, packed, dtype, seed, hidden=4, device="cpu"):
    """(cell, batch_sizes, [xg, h0, c0, w_hh, b_hn, w_hr, bias, w_cell]) of one layer/direction,
    the tensors requiring grad (None where the variant has none)."""
    cell, has_proj, has_bias = VARIANTS[variant]
    spec = cells.spec(cell)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(PACKED if packed else DENSE, dtype=torch.int64)
    n, b, g = int(sizes.sum()), int(sizes[0]), spec.gates
    p = 3 if has_proj else hidden

    def rand(*shape, scale=0.5):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype=dtype, device=device).requires_grad_()

    tensors = [rand(n, g * hidden), rand(b, p), rand(b, hidden) if spec.has_c else None,
               rand(g * hidden, p, scale=p ** -0.5),
               rand(hidden, scale=0.1) if has_bias and spec.has_b_hn else None,
               rand(p, hidden, scale=hidden ** -0.5) if has_proj else None,
               rand(g * hidden, scale=0.1) if has_bias else None,
               rand(len(spec.cell_weights), hidden) if spec.cell_weights else None]
    return cell, sizes, tensors


def as_function(backend, cell, sizes, reverse, tensors):
    """(fn, inputs): Recurrence.apply as a function of the present tensors only."""
    present = [i for i, t in enumerate(tensors) if t is not None]

    def fn(*args):
        full = list(tensors)
        for i, t in zip(present, args):
            full[i] = t
        return Recurrence.apply(backend, cell, sizes, reverse, *full)

    return fn, [tensors[i] for i in present]


def require(backend, cell, dtype, device="cpu"):
    reason = backends.why_not(backend, cell, torch.device(device), dtype)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradgradcheck_numba(variant, packed, reverse):
    cell, sizes, tensors = layer_inputs(variant, packed, torch.float64,
                                        seed_of("numba", variant, packed, reverse))
    require("numba", cell, torch.float64)
    fn, inputs = as_function("numba", cell, sizes, reverse, tensors)
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


def double_backward(backend, cell, sizes, reverse, tensors, seed):
    """First-order gradients (create_graph) of a random projection of the outputs, then the
    gradients of a random projection of those: (first, second), each a list over the inputs."""
    fn, inputs = as_function(backend, cell, sizes, reverse, tensors)
    outs = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)

    def like(t):
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)

    first = torch.autograd.grad(outs, inputs, [like(o) for o in outs], create_graph=True)
    second = torch.autograd.grad(first, inputs, [like(g) for g in first], allow_unused=True)
    return first, second


def test_plain_backward_is_the_kernels():
    """Under create_graph the first-order gradients are still the kernel's, bitwise; without it
    nothing is recorded (no graph, the grads do not require grad)."""
    cell, sizes, tensors = layer_inputs("lstm", True, torch.float64, seed_of("plain"))
    fn, inputs = as_function("numba", cell, sizes, False, tensors)
    outs = fn(*inputs)
    ones = [torch.ones_like(o) for o in outs]
    plain = torch.autograd.grad(outs, inputs, ones, retain_graph=True)
    graph = torch.autograd.grad(outs, inputs, ones, create_graph=True)
    assert all(not g.requires_grad for g in plain)
    assert all(g.requires_grad for g in graph)
    assert all(torch.equal(a, b) for a, b in zip(plain, graph))
    # ... and those of the backend's kernels called directly (the once-differentiable result).
    kern = backends.kernels("numba")
    with torch.no_grad():
        y, h_n, c_n, saved = kern.recurrence_forward(cell, *tensors[:6], sizes, False,
                                                     bias=tensors[6], w_cell=tensors[7])
        direct = kern.recurrence_backward(cell, *ones, *tensors[1:6], sizes, False, y, saved,
                                          bias=tensors[6], w_cell=tensors[7])
    assert all(torch.equal(a, b) for a, b in zip(plain, (g for g in direct if g is not None)))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("variant", ["rnn_tanh", "lstm", "gru", "peephole_lstm"])
def test_triton_interpreted(variant, reverse):
    """Triton (float32 only): the double backward against the reference backend's, both in
    float32 on the same inputs (packed)."""
    pytest.importorskip("fastrnn.kernels.triton_gpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (conftest.py sets it before import)")
    cell, sizes, tensors = layer_inputs(variant, True, torch.float32,
                                        seed_of("triton", variant, reverse), hidden=8,
                                        device=device)
    require("triton", cell, torch.float32, device)
    seed = seed_of("upstream", variant, reverse)
    got = double_backward("triton", cell, sizes, reverse, tensors, seed)
    want = double_backward("reference", cell, sizes, reverse, tensors, seed)
    for order, (g_list, w_list) in enumerate(zip(got, want), 1):
        for g, w in zip(g_list, w_list):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"order {order}: {m}")


MODULES = {"lstm": (torch.nn.LSTM, fastrnn.LSTM, {}),
           "lstm_proj": (torch.nn.LSTM, fastrnn.LSTM, {"proj_size": 3}),
           "gru": (torch.nn.GRU, fastrnn.GRU, {}),
           "rnn_tanh": (torch.nn.RNN, fastrnn.RNN, {}),
           "rnn_relu": (torch.nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"})}
LENGTHS = torch.tensor([6, 5, 3, 1])


def penalty_grads(module, x, hx, packed):
    """Gradients (parameters, input, initial states) of a gradient-penalty loss:
    ``||d <out, w> / dx||^2 + mean(out^2)`` (out: the output, its data when packed)."""
    x = x.clone().requires_grad_()
    hx = [h.clone().requires_grad_() for h in hx]
    inp = torch.nn.utils.rnn.pack_padded_sequence(x, LENGTHS) if packed else x
    out = module(inp, tuple(hx) if len(hx) == 2 else hx[0])[0]
    out = out.data if packed else out
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (dx,) = torch.autograd.grad((out * weights).sum(), x, create_graph=True)
    loss = dx.pow(2).sum() + out.pow(2).mean()
    return torch.autograd.grad(loss, list(module.parameters()) + [x] + hx)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", list(MODULES))
def test_gradient_penalty_matches_torch_nn(name, packed):
    """Two bidirectional layers (dropout 0) on numba vs torch.nn with the same state_dict: the
    gradient penalty's gradients agree in float64 (the module path recomputes xg from its
    recipe; torch.nn double-backwards its own RNN)."""
    torch_cls, fast_cls, extra = MODULES[name]
    cell = "lstm" if name == "lstm_proj" else name
    require("numba", cell, torch.float64)
    torch.manual_seed(seed_of("penalty", name, packed))
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, dropout=0.0,
                  dtype=torch.float64, **extra)
    ref = torch_cls(**kwargs)
    mod = fast_cls(backend="numba", **kwargs)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    hx = [torch.randn(4, 4, extra.get("proj_size", 5), dtype=torch.float64)]
    if cell == "lstm":
        hx.append(torch.randn(4, 4, 5, dtype=torch.float64))
    want = penalty_grads(ref, x, hx, packed)
    got = penalty_grads(mod, x, hx, packed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
