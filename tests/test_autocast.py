"""torch.autocast and parameters of another dtype (issue #12 C1, C9): fastrnn gives what torch.nn
gives.

Under autocast, ``auto`` picks the backend for autocast's dtype (``backends.compute_dtype``): on
the CPU no kernel backend runs bfloat16/float16, so torch.nn's own op runs, under torch's
autocast: the same dtype and bitwise the same values and gradients as torch.nn (or the same
exception: oneDNN's LSTM refuses bfloat16 on CPUs without it). A pinned kernel backend runs the
whole recurrence in autocast's dtype (triton, checked under the interpreter) or, when it cannot
(numba), raises BackendUnavailable. Tolerances of the 16-bit runs against torch.nn in float32:
as tests/test_kernels_triton.py (bfloat16 4e-2, float16 1e-2, relative to max(1, |ref|)).
"""
import contextlib

import pytest
import torch

import fastrnn
from fastrnn import backends

AMP = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2}
SEQUENCES = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("GRU", {}),
             ("LSTM", {"num_layers": 2, "bidirectional": True})]
CELLS = ["RNNCell", "LSTMCell", "GRUCell"]


def _pair(name, kwargs, backend, seed):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, name)(4, 6, **kwargs)
    mod = getattr(fastrnn, name)(4, 6, backend=backend, **kwargs)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def _run(module, x, dtype):
    """Forward under CPU autocast, backward of a float32 sum outside it: (outputs, x.grad,
    parameter grads) or the exception raised."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    try:
        with (torch.autocast("cpu", dtype=dtype) if dtype in AMP else contextlib.nullcontext()):
            out = module(x)
        flat = [t for t in (out if isinstance(out, tuple) else (out,)) for t in
                (t if isinstance(t, tuple) else (t,))]
        sum(t.float().sum() for t in flat).backward()
    except Exception as exc:  # compared with torch.nn's own: same type and message
        return type(exc), str(exc)
    return flat, x.grad, [p.grad for p in module.parameters()]


def _inputs(name, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((3, 4) if name.endswith("Cell") else (5, 3, 4), generator=gen)


@pytest.mark.parametrize("dtype", AMP, ids=str)
@pytest.mark.parametrize("name,kwargs", SEQUENCES + [(c, {}) for c in CELLS],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_auto_is_torch_under_cpu_autocast(name, kwargs, dtype):
    """auto under CPU autocast: exactly torch.nn's result (dtype, values, gradients) or error."""
    ref, mod = _pair(name, kwargs, "auto", 0)
    x = _inputs(name, 1)
    with torch.autocast("cpu", dtype=dtype):
        assert mod.backend_for(x).name == "native"
    expected, actual = _run(ref, x, dtype), _run(mod, x, dtype)
    if isinstance(expected[0], type):  # torch.nn raised: so must fastrnn, with its message
        assert actual == expected
        return
    for got, want in zip([*actual[0], actual[1], *actual[2]], [*expected[0], expected[1],
                                                              *expected[2]]):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", AMP, ids=str)
def test_numba_pinned_under_autocast_is_unavailable(dtype):
    """numba runs float32/float64 only: pinned under autocast it says so (no silent float32)."""
    _, mod = _pair("LSTM", {}, "numba", 0)
    with torch.autocast("cpu", dtype=dtype), pytest.raises(backends.BackendUnavailable,
                                                           match=str(dtype)):
        mod(_inputs("LSTM", 1))


def test_float64_is_not_autocast():
    """autocast leaves float64 alone (as torch): a float64 module stays on numba, in float64."""
    ref, mod = _pair("GRU", {}, "auto", 0)
    ref, mod = ref.double(), mod.double()
    x = _inputs("GRU", 1).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mod.backend_for(x).name == "numba"
        out, h = mod(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", AMP, ids=str)
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU", "GRUCell"])
def test_pinned_backend_runs_autocast_dtype(name, dtype, backend):
    """A pinned backend runs the recurrence in autocast's dtype (as cuDNN under CUDA autocast):
    outputs in that dtype, close to torch.nn in float32; gradients reach the float32
    parameters. triton runs under the interpreter here."""
    if backend == "triton":
        pytest.importorskip("fastrnn.kernels.triton_gpu")
        reason = backends.why_not("triton", "gru", torch.device("cpu"), dtype)
        if reason:
            pytest.skip(reason)
    ref, mod = _pair(name, {}, backend, 0)
    x = _inputs(name, 1)
    flat, x_grad, grads = _run(mod, x, dtype)
    expected, x_grad_ref, grads_ref = _run(ref, x, torch.float32)  # float32: no autocast
    for got, want in zip(flat, expected):
        assert got.dtype == dtype
        assert (got.float() - want).abs().max() <= TOL[dtype] * max(1.0, want.abs().max())
    for got, want in zip([x_grad, *grads], [x_grad_ref, *grads_ref]):
        assert got.dtype == torch.float32
        assert (got - want).abs().max() <= 4 * TOL[dtype] * max(1.0, want.abs().max())


def test_peephole_under_autocast():
    """PeepholeLSTM (no torch.nn twin, no bfloat16 kernel on the CPU): auto runs the reference
    in bfloat16; close to its own float32 result."""
    torch.manual_seed(0)
    mod = fastrnn.PeepholeLSTM(4, 6)
    x = _inputs("LSTM", 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mod.backend_for(x).name == "reference"
        out, _ = mod(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - mod(x)[0]).abs().max() <= TOL[torch.bfloat16]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_functional_call_with_other_dtype_parameters(x_dtype):
    """C9: torch.func.functional_call with bfloat16 parameters into a float32 module dispatches
    on the dtype that arrives: what torch.nn does (its ValueError for a float32 input, its
    bfloat16 result for a bfloat16 input)."""
    ref, mod = _pair("LSTM", {}, "auto", 0)
    params = {k: v.detach().to(torch.bfloat16) for k, v in ref.named_parameters()}
    x = _inputs("LSTM", 1).to(x_dtype)
    results = []
    for module in (ref, mod):
        try:
            results.append(torch.func.functional_call(module, params, (x,)))
        except Exception as exc:  # compared with torch.nn's own: same type and message
            results.append((type(exc), str(exc)))
    expected, actual = results
    if isinstance(expected[0], type):
        assert actual == expected
        return
    assert actual[0].dtype == torch.bfloat16
    assert torch.equal(actual[0], expected[0])
