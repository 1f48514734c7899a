"""torch.func over fastrnn modules (numba, float64, CPU): grad (input and, through
functional_call, parameters), jacrev, vmap, and their compositions, each against the same
computation with the torch.nn module of the same state_dict; and ordinary training unchanged.

``fastrnn.autograd._Recurrence`` is in the setup_context style with a vmap rule that runs the
kernels once per slice; its backward is a second Function (``_BPTT``, the kernel's BPTT) with a
vmap rule of its own (jacrev) and a backward (double backward: jacrev of grad, hessians by
jacrev of jacrev). Seeds: ``seed_of`` the case.
"""
import pytest
import torch
from _support import seed_of
from torch.func import functional_call, grad, jacrev, vmap

import fastrnn
from fastrnn import backends
from fastrnn.autograd import Recurrence

MODULES = {"lstm": (torch.nn.LSTM, fastrnn.LSTM, "lstm"),
           "gru": (torch.nn.GRU, fastrnn.GRU, "gru"),
           "rnn": (torch.nn.RNN, fastrnn.RNN, "rnn_tanh")}
TOL = dict(rtol=1e-9, atol=1e-11)


def pair(name, seed, input_size=3, hidden_size=4):
    """(torch.nn module, fastrnn twin on numba with its state_dict, input (T=5, B=2, I)); the
    twin is run once outside any transform first (see :func:`warm`)."""
    torch_cls, fast_cls, cell = MODULES[name]
    reason = backends.why_not("numba", cell, torch.device("cpu"), torch.float64)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(seed)
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=2,
                  bidirectional=True, dtype=torch.float64)
    ref = torch_cls(**kwargs)
    mod = fast_cls(backend="numba", **kwargs)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, input_size, dtype=torch.float64)
    warm(mod, x)
    return ref, mod, x


def warm(mod, x):
    """backends.resolve prepares (compiles or loads) the numba loops on its first call per case
    and process, with tensors of its own; run it outside torch.func transforms, whose factory
    functions return wrapped tensors numba cannot read."""
    mod(x)


def assert_trees_close(got, want):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def out_h(result):
    """(output, h_n) of a module's result ((output, (h_n, c_n)) for LSTM)."""
    out, state = result
    return out, state[0] if isinstance(state, tuple) else state


def loss_of(module):
    def loss(params, x):
        out, h_n = out_h(functional_call(module, params, (x,)))
        return (out.sin() * out).sum() + h_n.pow(2).sum()
    return loss


@pytest.mark.parametrize("name", list(MODULES))
def test_grad_input_and_parameters(name):
    ref, mod, x = pair(name, seed_of("grad", name))
    for argnums in (0, 1, (0, 1)):
        want = grad(loss_of(ref), argnums=argnums)(dict(ref.named_parameters()), x)
        got = grad(loss_of(mod), argnums=argnums)(dict(mod.named_parameters()), x)
        assert_trees_close(got, want)


@pytest.mark.parametrize("name", list(MODULES))
def test_jacrev_input(name):
    ref, mod, x = pair(name, seed_of("jacrev", name), input_size=2, hidden_size=3)
    x = x[:3]
    want = jacrev(lambda v: ref(v)[0])(x)
    got = jacrev(lambda v: mod(v)[0])(x)
    assert got.shape == (3, 2, 6, 3, 2, 2)
    assert_trees_close(got, want)


@pytest.mark.parametrize("name", list(MODULES))
def test_vmap_over_inputs(name):
    """vmap over an extra leading dim (torch.nn has no batching rule for its RNN ops: the
    oracle is a loop)."""
    ref, mod, x = pair(name, seed_of("vmap", name))
    xs = torch.stack([x, 2 * x, x.flip(0)])
    got = vmap(mod)(xs)
    want = [torch.stack(parts) for parts in zip(*(torch.utils._pytree.tree_leaves(ref(v))
                                                  for v in xs))]
    assert_trees_close(got, want)
    # in_dims on the second dim, and a per-example gradient (vmap of grad)
    got = vmap(grad(loss_of(mod), argnums=1), in_dims=(None, 1))(dict(mod.named_parameters()),
                                                                  xs.transpose(0, 1))
    want = torch.stack([grad(loss_of(ref), argnums=1)(dict(ref.named_parameters()), v)
                        for v in xs])
    assert_trees_close(got, want)


@pytest.mark.parametrize("name", list(MODULES))
def test_second_order(name):
    """jacrev of grad (through _BPTT's vmap and its backward, the double backward) and the
    Hessian wrt the input as jacrev of jacrev."""
    ref, mod, x = pair(name, seed_of("second", name), input_size=2, hidden_size=3)
    x = x[:3, :1]

    def scalar(module):
        return lambda v: (out_h(module(v))[0] ** 2).sum() + out_h(module(v))[1].sin().sum()

    assert_trees_close(jacrev(grad(scalar(mod)))(x), jacrev(grad(scalar(ref)))(x))
    assert_trees_close(jacrev(jacrev(scalar(mod)))(x), jacrev(jacrev(scalar(ref)))(x))
    params = dict(mod.named_parameters())
    ref_params = dict(ref.named_parameters())
    got = jacrev(grad(loss_of(mod), argnums=1), argnums=0)(params, x)
    want = jacrev(grad(loss_of(ref), argnums=1), argnums=0)(ref_params, x)
    assert_trees_close(got, want)


def test_recurrence_apply_vmap_in_dims():
    """vmap straight over Recurrence.apply, the initial state batched and xg not: slices as a
    loop of calls."""
    gen = torch.Generator().manual_seed(seed_of("apply-vmap"))
    sizes = torch.tensor([3, 2, 2, 1])
    xg = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    w_hh = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 0.5
    h0s = torch.randn(4, 3, 4, generator=gen, dtype=torch.float64)
    c0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)

    def run(h0):
        return Recurrence.apply("numba", "lstm", sizes, True, xg, h0, c0, w_hh, None, None)

    got = vmap(run)(h0s)
    want = [torch.stack(parts) for parts in zip(*(run(h0) for h0 in h0s))]
    assert len(got) == 3
    assert_trees_close(got, want)


@pytest.mark.parametrize("name", list(MODULES))
def test_training_unchanged(name):
    """Ordinary training (loss.backward()) runs the kernels as before: outputs and gradients
    equal the reference backend's in float64 and are bitwise the same run to run."""
    _, mod, x = pair(name, seed_of("train", name))
    twin = type(mod)(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64,
                     backend="reference")
    twin.load_state_dict(mod.state_dict())

    def step(module):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        out, h_n = out_h(module(xi))
        ((out.sin() * out).sum() + h_n.pow(2).sum()).backward()
        return [out.detach(), h_n.detach(), xi.grad] + [p.grad.clone() for p in
                                                         module.parameters()]

    first, second, want = step(mod), step(mod), step(twin)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(not t.requires_grad for t in first)
    assert_trees_close(first, want)
