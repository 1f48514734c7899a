"""Module behaviour beyond parity: what fastrnn inherits from torch, cells, dropout, long
sequences, gradcheck of every Function, determinism, dispatch."""
import copy
import io
import itertools

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import Recurrence, autograd, backends, cells
from _support import (BACKENDS, CELL_OF_VARIANT, TOL, VARIANTS, assert_all_close, flatten,
                      make_case, pair, require, seed_of)

CELLS = {"RNNCell": ("rnn_tanh", {}), "RNNCell-relu": ("rnn_relu", {"nonlinearity": "relu"}),
         "LSTMCell": ("lstm", {}), "GRUCell": ("gru", {})}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inherits_torch_machinery(variant):
    torch_cls, fast_cls, extra = VARIANTS[variant]
    ref, mod = pair(variant, "auto", torch.float32, input_size=4, hidden_size=5, num_layers=2,
                    bidirectional=True, **{})
    assert isinstance(mod, nn.RNNBase) and not isinstance(mod, torch_cls)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert [(n, p.shape) for n, p in mod.named_parameters()] == \
           [(n, p.shape) for n, p in ref.named_parameters()]
    assert repr(mod) == repr(ref)
    mod.flatten_parameters()
    # state_dict both ways
    other = torch_cls(4, 5, num_layers=2, bidirectional=True, **extra)
    other.load_state_dict(mod.state_dict())
    back = fast_cls(4, 5, num_layers=2, bidirectional=True, **extra)
    back.load_state_dict(other.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # init: same distribution and bounds as torch (U(-1/sqrt(H), 1/sqrt(H)))
    bound = 1 / 5 ** 0.5
    assert all(p.abs().max() <= bound for p in fast_cls(4, 5, **extra).parameters())


def test_repr_names_a_non_default_backend_and_module_survives_copy_and_pickle():
    mod = fastrnn.GRU(3, 4, backend="reference")
    assert repr(mod) == "GRU(3, 4, backend='reference')"
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 1, 3)
    assert torch.equal(loaded(x)[0], mod(x)[0])
    assert torch.equal(copy.deepcopy(mod)(x)[0], mod(x)[0])


def test_to_dtype_keeps_working():
    ref, mod = pair("lstm", "reference", torch.float32, input_size=3, hidden_size=4)
    ref, mod = ref.double(), mod.double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(mod(x)[0], ref(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched,with_hx,bias", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_parity_with_torch_nn(name, batched, with_hx, bias, dtype, backend):
    cell, kwargs = CELLS[name]
    require(backend, cell, dtype)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton has no float64")
    cls = name.split("-")[0]
    torch.manual_seed(seed_of(name, bias, dtype))
    ref = getattr(nn, cls)(4, 5, bias=bias, dtype=dtype, **kwargs)
    mod = getattr(fastrnn, cls)(4, 5, bias=bias, dtype=dtype, backend=backend, **kwargs)
    mod.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(seed_of(name, batched, with_hx, bias, dtype))
    batch = (3,) if batched else ()
    x = torch.randn(*batch, 4, generator=gen, dtype=dtype, requires_grad=True)
    leaves = [x]
    hx = None
    if with_hx:
        leaves += [torch.randn(*batch, 5, generator=gen, dtype=dtype, requires_grad=True)
                   for _ in range(2 if cls == "LSTMCell" else 1)]
        hx = tuple(leaves[1:]) if cls == "LSTMCell" else leaves[1]
    weights = [torch.randn(*batch, 5, generator=gen, dtype=dtype) for _ in range(2)]

    def run(module):
        for t in leaves:
            t.grad = None
        module.zero_grad()
        out = module(x, hx)
        outs = list(out) if isinstance(out, tuple) else [out]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return outs, [t.grad for t in leaves] + [p.grad for p in module.parameters()]

    expected_out, expected_grads = run(ref)
    out, grads = run(mod)
    assert_all_close(out, expected_out, dtype, "outputs")
    assert_all_close(grads, expected_grads, dtype, "gradients")


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dropout_matches_torch_in_train_mode_and_is_off_in_eval(variant, backend):
    """Same seed, same masks: torch.nn drops each layer's output but the last, at rate p, with
    one bernoulli over the layer output; parity in train mode proves fastrnn does the same."""
    require(backend, "lstm", torch.float32)
    for p in (0.3, 1.0):
        ref, mod = pair(variant, backend, torch.float32, input_size=4, hidden_size=6,
                        num_layers=3, dropout=p, bidirectional=True)
        x = torch.randn(5, 3, 4)
        for train in (True, False):
            ref.train(train)
            mod.train(train)
            torch.manual_seed(7)
            expected = ref(x)
            torch.manual_seed(7)
            actual = mod(x)
            assert_all_close(fastrnn_flat(actual), fastrnn_flat(expected), torch.float32,
                             f"p={p} train={train}")
        ref.train()
        torch.manual_seed(8)
        assert not torch.allclose(ref(x)[0], mod.eval()(x)[0]), "dropout had no effect in train mode"


def fastrnn_flat(result):
    out, hidden = result
    return [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


# The reference runs 5000 Python steps (about 10 s a cell): LSTM only there.
@pytest.mark.parametrize("backend,variant", [("reference", "lstm"), ("numba", "lstm"),
                                             ("numba", "gru"), ("numba", "rnn_tanh")])
def test_long_sequence_stays_finite_and_matches(variant, backend):
    require(backend, CELL_OF_VARIANT[variant], torch.float32)
    T = 5000
    ref, mod = pair(variant, backend, torch.float32, input_size=3, hidden_size=8)
    x = torch.randn(T, 2, 3, requires_grad=True)
    out, _ = mod(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected, _ = ref(x)
    expected.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # errors do not grow with T: the recurrence contracts, so rounding differences stay local
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(grad, x.grad, **TOL[torch.float32])


@pytest.mark.parametrize("steps_per_chunk", [1, 2])
@pytest.mark.parametrize("fmt", ["seq_first", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_projects_long_inputs_in_chunks_of_steps(variant, fmt, steps_per_chunk,
                                                            monkeypatch):
    """Inference with the input projection chunked (forced here on a small case) matches
    torch.nn, in both directions, over packed ragged input (the full path) and dense input (the
    lean path), in every layer; training never chunks (the autograd graph needs the whole
    projection)."""
    require("numba", CELL_OF_VARIANT[variant], torch.float32)
    from fastrnn import functional
    from fastrnn.kernels.numba_cpu import buffers, inference as lean
    ref, mod, leaves, build, _ = make_case(variant, fmt, 2, True, True, True, torch.float32,
                                           "numba", T=5, B=3, I=4, H=6)
    gates = cells.GATES[CELL_OF_VARIANT[variant]]
    monkeypatch.setattr(autograd, "PROJECTION_CHUNK_MIN_CHUNKS", 0)
    monkeypatch.setattr(autograd, "PROJECTION_CHUNK_WEIGHTS", 0)
    monkeypatch.setattr(autograd, "PROJECTION_CHUNK_MIN_STEPS", 1)
    monkeypatch.setattr(autograd, "PROJECTION_CHUNK_BYTES", steps_per_chunk * 3 * gates * 6 * 4)
    calls = []
    chunked = functional._chunked_layer
    monkeypatch.setattr(functional, "_chunked_layer",
                        lambda *args: calls.append(args[0]) or chunked(*args))
    lean_chunked = lean._chunked
    monkeypatch.setattr(lean, "_chunked",
                        lambda *args: calls.append("lean") or lean_chunked(*args))
    prepared, prepare = [], buffers._prepare  # the full path: once per layer and direction
    monkeypatch.setattr(buffers, "_prepare", lambda *args: prepared.append(1) or prepare(*args))
    with torch.no_grad():
        actual, expected = flatten(mod(*build(leaves))), flatten(ref(*build(leaves)))
    assert calls == (["lean"] if fmt == "seq_first" else ["numba"]) * 4  # 2 layers x 2 directions
    if fmt != "seq_first":  # ... not per chunk (5 steps: none of them has 16 for the panels)
        assert len(prepared) == 4
    assert_all_close(actual, expected, torch.float32, "chunked inference")
    mod(*build([t.requires_grad_(True) for t in leaves]))
    assert len(calls) == 4


# ---- the Function: float64 gradcheck for every backend that has float64 -----------------------

def _function_inputs(cell, proj, dtype=torch.float64, packed=True):
    gen = torch.Generator().manual_seed(seed_of(cell, proj, packed))
    H, P = 4, (3 if proj else 4)
    G = cells.GATES[cell]
    sizes = torch.tensor([3, 3, 2, 1] if packed else [3, 3, 3, 3], dtype=torch.int64)
    N, B = int(sizes.sum()), int(sizes[0])

    def rand(*shape):
        return (0.5 * torch.randn(*shape, generator=gen, dtype=dtype)).requires_grad_(True)

    return dict(xg=rand(N, G * H), h0=rand(B, P), c0=rand(B, H) if cell == "lstm" else None,
                w_hh=rand(G * H, P), b_hn=rand(H) if cell == "gru" else None,
                w_hr=rand(P, H) if proj else None, batch_sizes=sizes)


FUNCTION_CASES = [("rnn_tanh", False), ("rnn_relu", False), ("lstm", False), ("lstm", True),
                  ("gru", False)]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,proj", FUNCTION_CASES)
def test_recurrence_function_gradcheck(cell, proj, reverse, backend):
    require(backend, cell, torch.float64)
    a = _function_inputs(cell, proj)
    names = ["xg", "h0", "c0", "w_hh", "b_hn", "w_hr"]
    present = [n for n in names if a[n] is not None]

    def fn(*tensors):
        kw = dict(zip(present, tensors))
        args = [kw.get(n) for n in names]
        return Recurrence.apply(backend, cell, a["batch_sizes"], reverse, *args)

    assert torch.autograd.gradcheck(fn, [a[n] for n in present], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_backend_supports_double_backward(variant):
    _, mod = pair(variant, "reference", torch.float64, input_size=3, hidden_size=4,
                  bidirectional=True)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: mod(inp)[0], [x])


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitwise_deterministic(variant, backend):
    require(backend, "lstm", torch.float32)
    _, mod = pair(variant, backend, torch.float32, input_size=4, hidden_size=8, num_layers=2,
                  bidirectional=True)
    x = torch.randn(7, 3, 4, requires_grad=True)

    def run():
        x.grad = None
        mod.zero_grad()
        out, _ = mod(x)
        out.square().sum().backward()
        return [out, x.grad] + [p.grad for p in mod.parameters()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- dispatch --------------------------------------------------------------------------------

def test_backend_for_explains_the_choice():
    mod = fastrnn.LSTM(3, 4)
    choice = mod.backend_for(torch.randn(2, 1, 3))
    assert choice.name in ("numba", "native") and "auto" in choice.reason
    assert fastrnn.LSTM(3, 4, backend="reference").backend_for().reason == "requested explicitly"


def test_named_backend_that_cannot_run_raises_instead_of_falling_back():
    mod = fastrnn.GRU(3, 4, backend="numba", dtype=torch.float16)
    with pytest.raises(fastrnn.BackendUnavailable, match="numba"):
        mod(torch.randn(2, 1, 3, dtype=torch.float16))
    with pytest.raises(fastrnn.BackendUnavailable, match="triton"):
        backends.choose("triton", "gru", torch.device("meta"), torch.float32)


def test_functional_api_matches_vf():
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(2, 5, 3)
    hx = (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    expected = torch._VF.lstm(x, hx, ref._flat_weights, True, 2, 0.0, False, True, True)
    actual = fastrnn.functional.lstm(x, hx, ref._flat_weights, True, 2, 0.0, False, True, True,
                                     backend="reference")
    assert_all_close(list(actual), list(expected), torch.float32, "functional.lstm")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_read_the_weights_a_call_gives(name, backend):
    """A cell reads its weights as torch.nn's forward would: those torch.func.functional_call
    passes, a parametrization's, none for bias=False (auto: torch's own op, bitwise)."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    for bias in (True, False):
        mod = getattr(fastrnn, name)(4, 3, bias=bias, backend=backend)
        ref = getattr(nn, name)(4, 3, bias=bias)
        ref.load_state_dict(mod.state_dict())
        x, h = torch.randn(2, 4), torch.randn(2, 3)
        hx = (h, torch.randn(2, 3)) if name == "LSTMCell" else h  # W_hh reads a nonzero state
        params = {n: torch.randn_like(p) for n, p in mod.named_parameters()}
        runs = [(torch.func.functional_call(mod, params, (x, hx)),
                 torch.func.functional_call(ref, params, (x, hx)))]
        for module in (mod, ref):
            parametrize.register_parametrization(module, "weight_hh", Double())
        runs.append((mod(x, hx), ref(x, hx)))
        for got, want in runs:
            for g, w in zip(flatten_cell(got), flatten_cell(want), strict=True):
                if backend == "auto":
                    assert torch.equal(g, w)
                else:
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def flatten_cell(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_auto_runs_single_cell_steps_on_torchs_fused_cell_op(name):
    choice = getattr(fastrnn, name)(3, 4).backend_for()
    assert choice.name == "native" and "cell step" in choice.reason
    assert getattr(fastrnn, name)(3, 4, backend="reference").backend_for().name == "reference"


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_auto_runs_a_one_step_sequence_call_as_a_cell_step(name, batch_first, monkeypatch):
    """A dense input of one time step (streamed training) is a cell step for auto: torch's own
    op (numba ran such calls at 0.36-1.03x torch.nn, bench/results/cpu-full-1thread-epyc-zen4);
    longer and packed inputs keep numba, no-grad one-step calls keep the lean path, and a named
    backend is kept. The one-step call's outputs and gradients are torch.nn's."""
    mod = getattr(fastrnn, name)(3, 4, batch_first=batch_first)
    ref = getattr(nn, name)(3, 4, batch_first=batch_first)
    ref.load_state_dict(mod.state_dict())
    one, two = torch.randn(2, 1, 3), torch.randn(2, 2, 3)
    if not batch_first:
        one, two = one.transpose(0, 1), two.transpose(0, 1)
    assert mod.backend_for(one).name == "native" and "cell step" in mod.backend_for(one).reason
    assert mod.backend_for(torch.randn(1, 3)).name == "native"  # unbatched, one step
    expected = "numba" if backends.why_not("numba", mod.cell, "cpu", torch.float32) is None \
        else "native"
    assert mod.backend_for(two).name == expected
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(1, 2, 3), torch.tensor([1, 1]))
    assert mod.backend_for(packed).name == expected
    assert getattr(fastrnn, name)(3, 4, backend="reference").backend_for(one).name == "reference"
    calls = []
    monkeypatch.setattr(type(mod)._torch_class, "forward",
                        lambda self, *a, f=type(mod)._torch_class.forward: calls.append(1) or f(
                            self, *a))
    x = one.clone().requires_grad_()
    out = mod(x)[0]
    assert calls == [1]  # torch.nn's forward ran it
    out.sum().backward()
    x_ref = one.clone().requires_grad_()
    ref(x_ref)[0].sum().backward()
    assert_all_close([out, x.grad] + [p.grad for p in mod.parameters()],
                     [ref(one)[0], x_ref.grad] + [p.grad for p in ref.parameters()],
                     torch.float32, name)
