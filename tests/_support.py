"""Shared helpers of the test suite: backends under test, tolerances, case builders."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from fastrnn import backends

# Backends the parity suite runs. A kernel backend that cannot run here is skipped with its reason.
BACKENDS = ["reference", "native", "numba", "triton"]

# Tolerances per dtype, against torch.nn (and the reference) on the same inputs.
# float32: a handful of roundings per step over T <= 16 steps and 3 layers stays below 1e-5;
# float64: same computations, 1e-9 leaves room for kernels' own (non-libm) tanh/sigmoid.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-9)}

CELL_OF_VARIANT = {"rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm",
                   "lstm_proj": "lstm", "gru": "gru"}
VARIANTS = {  # variant -> (torch.nn class, fastrnn class, extra constructor kwargs)
    "rnn_tanh": (nn.RNN, fastrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTM, fastrnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fastrnn.LSTM, {"proj_size": 3}),
    "gru": (nn.GRU, fastrnn.GRU, {}),
}
FORMATS = ["seq_first", "batch_first", "unbatched", "packed_sorted", "packed_unsorted"]


def require(backend, cell, dtype, device="cpu", proj_size=0):
    """Skip (visibly, with the reason) when ``backend`` cannot run this case here."""
    reason = backends.why_not(backend, cell, torch.device(device), dtype, proj_size)
    if reason:
        pytest.skip(f"{backend}: {reason}")


def seed_of(*parts):
    """A per-case seed: fresh random inputs for every case, reproducible run to run."""
    return zlib.crc32(repr(parts).encode())


def pair(variant, backend, dtype, **kwargs):
    """A torch.nn module and its fastrnn twin with the same weights."""
    torch_cls, fast_cls, extra = VARIANTS[variant]
    kwargs = {**extra, **kwargs}
    ref = torch_cls(dtype=dtype, **kwargs)
    mod = fast_cls(dtype=dtype, backend=backend, **kwargs)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


def flatten(result):
    """(output, hidden) -> list of tensors (PackedSequence -> its data)."""
    out, hidden = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def run_and_grad(module, leaves, build, weights):
    """Forward on ``build(leaves) -> (input, hx)``, a weighted-sum loss over every output,
    backward. Returns (outputs, gradients of ``leaves`` then of every parameter), on the CPU."""
    device = next(module.parameters()).device
    leaves = [t.detach().to(device).requires_grad_(True) for t in leaves]
    module.zero_grad()
    outs = flatten(module(*build(leaves)))
    loss = sum((o * w.to(device)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
    return [o.cpu() for o in outs], [None if g is None else g.cpu() for g in grads]


def assert_all_close(actual, expected, dtype, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"{what}[{i}]: expected no gradient"
            continue
        assert a is not None, f"{what}[{i}]: gradient missing"
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def make_case(variant, fmt, num_layers, bidirectional, bias, with_hx, dtype, backend,
              T=5, B=3, I=4, H=6):
    """One parity case on the CPU: (torch module, fastrnn module, leaves, build, weights)."""
    gen = torch.Generator().manual_seed(seed_of(variant, fmt, num_layers, bidirectional, bias,
                                                with_hx, dtype))
    torch.manual_seed(seed_of("init", variant, fmt, num_layers, bidirectional, bias, dtype))
    ref, mod = pair(variant, backend, dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                    bias=bias, batch_first=fmt == "batch_first", bidirectional=bidirectional)
    P = ref.proj_size or H
    D = 2 if bidirectional else 1

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    batch = () if fmt == "unbatched" else (B,)
    if fmt == "batch_first":
        x = rand(B, T, I)
    elif fmt == "unbatched":
        x = rand(T, I)
    else:
        x = rand(T, B, I)
    leaves = [x]
    if with_hx:
        leaves.append(rand(num_layers * D, *batch, P))
        if variant.startswith("lstm"):
            leaves.append(rand(num_layers * D, *batch, H))
    lengths = [T, 3, 2] if fmt == "packed_sorted" else [3, T, 2]

    def build(tensors):
        """(input, hx) of the module from the leaves (x, [h0, [c0]])."""
        x, *state = tensors
        hx = (tuple(state) if len(state) == 2 else state[0]) if state else None
        if fmt.startswith("packed"):
            x = pack_padded_sequence(x, lengths, enforce_sorted=fmt == "packed_sorted")
        return x, hx

    n_out = {"seq_first": (T, B), "batch_first": (B, T), "unbatched": (T,)}
    out_rows = sum(lengths) if fmt.startswith("packed") else None
    out_shape = (out_rows, D * P) if out_rows else (*n_out[fmt], D * P)
    hid_shape = (num_layers * D, *batch, P)
    weights = [rand(*out_shape), rand(*hid_shape)]
    if variant.startswith("lstm"):
        weights.append(rand(num_layers * D, *batch, H))
    return ref, mod, leaves, build, weights


def nan_filled_buffers(monkeypatch):
    """The numba kernels' own allocator (``numba_cpu.buffers.alloc``, 64-byte aligned) with its
    buffers NaN-filled: an element a kernel forgets to write shows up as a mismatch. Its
    alignment matters: MKL's multithreaded gemm rounds differently on differently aligned
    operands, so buffers of varying alignment (numpy's 16 bytes) broke the bitwise determinism
    test 7 times in 15."""
    from fastrnn.kernels.numba_cpu import buffers
    alloc = buffers.alloc

    def nan_filled(shape, dtype):
        out = alloc(shape, dtype)
        out[...] = float("nan")
        return out
    monkeypatch.setattr(buffers, "alloc", nan_filled)


def spy_calls(monkeypatch, owner, name, calls=None):
    """A list (``calls``, or a new one) that gets the first argument of every call of
    ``owner.name`` (still called)."""
    calls, original = [] if calls is None else calls, getattr(owner, name)

    def spy(*args):
        calls.append(args[0])
        return original(*args)
    monkeypatch.setattr(owner, name, spy)
    return calls


def without(owner, name, fn, *args):
    """``fn(*args)`` with ``owner.name`` replaced by a function that returns None (a lean path
    switched off, so that the full path runs)."""
    original = getattr(owner, name)
    setattr(owner, name, lambda *a: None)
    try:
        return fn(*args)
    finally:
        setattr(owner, name, original)


# The lean paths' parity cases (tests/test_inference.py, tests/test_lean_training.py).
LEAN_CASES = [  # variant, layers, bidirectional, batch_first, shape of x, with hx
    ("rnn_tanh", 1, False, False, (7, 3, 5), False),
    ("rnn_relu", 2, True, True, (3, 6, 5), True),
    ("lstm", 1, False, False, (6, 1, 5), True),
    ("lstm", 2, True, False, (5, 4, 5), False),
    ("lstm", 3, False, True, (2, 9, 5), True),
    ("lstm_proj", 2, True, False, (4, 3, 5), True),
    ("gru", 1, True, False, (8, 2, 5), True),
    ("gru", 2, False, False, (1, 1, 5), True),
    ("lstm", 2, True, False, (6, 5), True),  # unbatched
    ("gru", 1, False, True, (4, 5), False),  # unbatched, batch_first
    ("rnn_tanh", 1, False, False, (3, 2, 5), True),
]


def run_no_grad(module, *args):
    """``module(*args)`` under torch.no_grad()."""
    with torch.no_grad():
        return module(*args)


def full_path(module, *args):
    """``module(*args)`` under no_grad by the full path (the lean one switched off)."""
    from fastrnn import inference
    return without(inference, "forward", run_no_grad, module, *args)


def assert_bitwise(got, expected):
    """Outputs and states (module results) equal bit for bit, of the same shapes and dtypes."""
    for g, e in zip(flatten(got), flatten(expected), strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e), (g - e).abs().max()


def streamed(module, x, call=run_no_grad):
    """``(output, final state)`` of ``call(module, step, state)`` over the steps of ``x`` (T, ...),
    one step per call, each given the state the previous returned."""
    state, ys = None, []
    for t in range(x.shape[0]):
        y, state = call(module, x[t:t + 1], state)
        ys.append(y)
    return torch.cat(ys), state


def launcher_check(pythonpath=None):
    """``bench/launch_overhead.py --check`` in a child process (compiled Triton, a stub driver):
    what the CUDA launcher received for 5 step passes, JIT-only and through
    ``launch._launch_passes``: the same for every pass, the pass indices advancing
    (tests/test_triton_launch.py; ``pythonpath``: tests/test_triton36.py's Triton 3.6).
    Returns the child's Triton version."""
    import json
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath),
                                                        env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, str(root / "bench" / "launch_overhead.py"), "--check"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    launches = json.loads(out.stdout)
    from fastrnn.kernels.triton_gpu import kernels
    begin = 9 + kernels._forward_tiled_kernel.arg_names.index("s_begin")  # after grid, stream..
    assert [a[begin:begin + 2] for a in launches["jit"]] == [[s, s + 1] for s in range(5)]
    assert launches["direct"] == launches["jit"]
    return launches["triton"]
