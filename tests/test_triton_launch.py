"""The triton backend's launches: step tables cached on the device (no host synchronisation per
call), device-aware dispatch, and on CUDA: forward and backward without a host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``) and captured in a ``torch.cuda.CUDAGraph``.

The CPU tests run the launcher under ``TRITON_INTERPRET=1`` (set by conftest.py without CUDA);
the CUDA tests are skipped without a CUDA device.
"""
import contextlib
import functools
import os

import pytest
import torch

import fastrnn
from fastrnn import backends, cells
from fastrnn.autograd import Recurrence

tg = pytest.importorskip("fastrnn.kernels.triton_gpu")
from fastrnn.kernels.triton_gpu import configs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
launch = tg.load()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (sync debug mode, "
                                                     "CUDA graphs)")
PACKED = [5, 5, 4, 2, 2, 1, 1]


def test_step_tables_are_cached_per_content():
    """Equal batch_sizes (another tensor or a list) give the very same device tables; the
    offsets are the first packed row of each step; both start 16-byte aligned."""
    launch._device_tables.cache_clear()
    sizes, offsets = launch._steps(torch.tensor(PACKED), DEVICE)
    again = launch._steps(list(PACKED), DEVICE)
    assert sizes.tolist() == PACKED and offsets.tolist() == [0, 5, 10, 14, 16, 18, 19]
    assert (sizes.dtype, sizes.device.type) == (torch.int32, DEVICE.type)
    assert again[0].data_ptr() == sizes.data_ptr() and again[1].data_ptr() == offsets.data_ptr()
    assert sizes.data_ptr() % 16 == 0 and offsets.data_ptr() % 16 == 0
    other = launch._steps(torch.tensor(PACKED[:-1]), DEVICE)
    assert other[0].data_ptr() != sizes.data_ptr() and other[0].tolist() == PACKED[:-1]
    assert launch._device_tables.cache_info().misses == 2 and not launch._CAPTURED


def test_dispatch_reads_the_device_limits(monkeypatch):
    """The plan carries the device's limits and the launch picks the config that fits them: on
    a fake 99 KB device a float32 GRU at H = 64 (fused on sm_80/sm_90: 104 KB forward, 128 KB
    backward) runs the step kernels."""
    fake = configs.DeviceLimits(86, 101376, 65536, 84)
    chosen = []
    select = configs.select_config

    def spy(*args, **kwargs):
        chosen.append(select(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(launch, "device_limits", lambda device: fake)
    monkeypatch.setattr(launch, "select_config", spy)
    gen = torch.Generator().manual_seed(0)
    H, B = 64, 2
    xg = torch.randn(3 * B, 3 * H, generator=gen).to(DEVICE)
    h0 = torch.zeros(B, H, device=DEVICE)
    w_hh = (torch.randn(3 * H, H, generator=gen) * H ** -0.5).to(DEVICE)
    y, *_ = launch.recurrence_forward("gru", xg, h0, None, w_hh, None, None, [B] * 3, False)
    assert [c.strategy for c in chosen] == ["step"] and torch.isfinite(y).all()
    assert configs.select_config("forward", "gru", torch.float32, H).strategy == "fused"


class _Recorder:
    """Stands for a kernel: records the tensor arguments of each launch, runs nothing."""

    def __init__(self):
        self.tensors = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.tensors.extend(
            a for a in args if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("strategy", ["fused", "step"])
def test_launch_passes_aligned_pointers(monkeypatch, strategy):
    """Inputs that do not start on 16 bytes (views such as h0[k]) reach the kernels as aligned
    copies: only the pointer variant the AOT test checks ever runs."""
    kernels = {name: _Recorder() for name in ("_forward_fused_kernel", "_forward_tiled_kernel",
                                              "_backward_fused_kernel", "_backward_tiled_kernel")}
    for name, recorder in kernels.items():
        monkeypatch.setattr(launch, name, recorder)
    H, B, sizes = 5, 3, [3, 2]
    flat = torch.randn(1 + 4 * (5 * B * 4 * H + 4 * H * H), device=DEVICE)[1:]  # 4 B past 16
    views = iter(flat.split([5 * B * 4 * H] * 4 + [4 * H * H] * 4))
    xg, h0, c0, w_hh = (next(views)[:n].view(*shape) for n, shape in
                        [(5 * 4 * H, (5, 4 * H)), (B * H, (B, H)), (B * H, (B, H)),
                         (4 * H * H, (4 * H, H))])
    grad_y, grad_h_n, grad_c_n = (next(views)[:n].view(*shape) for n, shape in
                                  [(5 * H, (5, H)), (B * H, (B, H)), (B * H, (B, H))])
    assert all(t.data_ptr() % 16 for t in (xg, h0, c0, w_hh, grad_y, grad_h_n, grad_c_n))
    with tg.forced_strategy(strategy):
        y, h_n, c_n, saved = launch.recurrence_forward("lstm", xg, h0, c0, w_hh, None, None,
                                                       sizes, False)
        launch.recurrence_backward("lstm", grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, None, None,
                                   sizes, False, y, saved)
    launched = [t for recorder in kernels.values() for t in recorder.tensors]
    assert len(launched) > 10 and all(t.data_ptr() % 16 == 0 for t in launched)
    assert torch.equal(launched[0], xg)  # the same values, copied


def _layer_inputs(cell, hidden, sizes, dtype, seed=0):
    """One layer's leaves on DEVICE: xg (N, G*H), h0 (B, H), c0 (B, H) or None, w_hh (G*H, H),
    b_hn (H,) or None, w_hr None, and w_cell (K, H) for a cell with per-unit weights."""
    gen = torch.Generator().manual_seed(seed)
    spec = cells.spec(cell)
    B, N = sizes[0], sum(sizes)

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()

    tensors = [rand(N, spec.gates * hidden), rand(B, hidden), rand(B, hidden) if spec.has_c else
               None, rand(spec.gates * hidden, hidden, scale=hidden ** -0.5),
               rand(hidden, scale=0.1) if spec.has_b_hn else None, None]
    if spec.cell_weights:
        tensors += [None, rand(len(spec.cell_weights), hidden)]
    return tensors


def _forward_backward(cell, inputs, sizes):
    outputs = Recurrence.apply("triton", cell, torch.tensor(sizes), False, *inputs)
    sum(out.float().sum() for out in outputs).backward()
    return [t.grad for t in inputs if t is not None]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", configs.CELLS)
def test_no_host_sync(cell, dtype):
    """Forward and backward of every strategy (this device's largest fused H, and a larger H:
    persistent where its grid fits the SMs, and step forced) never synchronise with the host,
    first call included (step tables made then)."""
    limits = configs.device_limits(DEVICE)
    largest = max(configs.fused_max_hidden(d, cell, dtype, limits) for d in ("forward", "backward"))
    cases = [(max(largest, 16), None)] + [(2 * configs.FUSED_BUCKETS[-1] + 8, s)
                                           for s in (None, "step")]
    for hidden, strategy in cases:
        sizes = [40] * 6 + [17] * 3 + [3]
        inputs = _layer_inputs(cell, hidden, sizes, dtype)  # copied from the host: a sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with tg.forced_strategy(strategy) if strategy else _no_strategy():
                grads = _forward_backward(cell, inputs, sizes)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.isfinite(g).all() for g in grads)


@contextlib.contextmanager
def _no_strategy():
    yield


@needs_cuda
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("strategy", ["fused", "step", "persistent"])
def test_cuda_graph_captures_forward_and_backward(strategy, bidirectional):
    """A fastrnn.LSTM forward + backward captured in a CUDA graph and replayed on new data gives
    the output and weight gradients of an eager call (bidirectional: the reverse direction on
    its side stream, forked from and joined to the capturing stream)."""
    torch.manual_seed(0)
    model = fastrnn.LSTM(16, 32, num_layers=2, backend="triton",
                         bidirectional=bidirectional).to(DEVICE)
    assert model.backend_for().name == "triton"
    static_x = torch.randn(12, 4, 16, device=DEVICE)
    forced = (tg.forced_strategy(strategy, 16, 16) if strategy != "fused" else _no_strategy())

    def step():
        y, _ = model(static_x)
        y.square().sum().backward()
        return y

    with forced:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, makes the step tables
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        model.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = step()
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        captured = [static_y.clone()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        eager = [step().detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backend_for_names_the_strategy():
    """The triton choice says which strategy runs and why (the device's fused limits)."""
    backends.forget()
    reason = backends.choose("triton", "lstm", DEVICE, torch.float16).reason
    limit = configs.fused_max_hidden("forward", "lstm", torch.float16,
                                     configs.device_limits(DEVICE))
    assert "fused" in reason and f"H={limit}" in reason


@pytest.mark.parametrize("device_class", ["sm_90", "sm_86"])
def test_auto_on_cuda_runs_triton_only_where_it_was_measured_faster(monkeypatch, device_class):
    """auto on a CUDA device (faked: its limits): triton first for bfloat16 at H within the
    device's fused forward limit, torch.nn (cuDNN) first elsewhere (float32, float16, larger H,
    H unknown); cells take torch's fused cell op as before."""
    fake = None if device_class == "sm_90" else configs.DeviceLimits(86, 101376, 65536, 84)
    monkeypatch.setattr(backends.triton_gpu, "device_limits", lambda device: fake)
    cuda = torch.device("cuda", 0)
    for cell in ("rnn_tanh", "lstm", "gru"):
        limit = configs.fused_max_hidden("forward", cell, torch.bfloat16, fake)
        assert limit in (64, 128)
        order = functools.partial(backends._auto_order, cell, cuda, step=False)
        assert order(torch.bfloat16, hidden=limit) == backends.AUTO_ORDER["cuda"]
        assert order(torch.bfloat16, hidden=16) == backends.AUTO_ORDER["cuda"]
        assert order(torch.bfloat16, hidden=limit + 1)[0] == "native"
        assert order(torch.bfloat16, hidden=None)[0] == "native"
        for dtype in (torch.float32, torch.float16):
            assert order(dtype, hidden=16)[0] == "native"
        assert backends._auto_order(cell, cuda, torch.bfloat16, True, 16)[0] == "native"
        assert backends._auto_order(cell, torch.device("cpu"), torch.float32, False, 16)[0] == "numba"
    choice = backends.choose("auto", "lstm", cuda, torch.float32, hidden=16)
    assert choice.name == "native" and "triton measured slower than cuDNN" in choice.reason


@needs_cuda
def test_auto_module_choice_on_this_gpu():
    """On the GPU itself: a bfloat16 LSTM within the fused limit runs triton, a float32 one and
    a peephole LSTM in float32 (no such cell in cuDNN) run native and triton."""
    limit = configs.fused_max_hidden("forward", "lstm", torch.bfloat16,
                                     configs.device_limits(DEVICE))
    small = fastrnn.LSTM(8, limit).to(DEVICE, torch.bfloat16)
    assert small.backend_for().name == "triton"
    choice = fastrnn.LSTM(8, 16).to(DEVICE).backend_for()
    assert choice.name == "native" and "measured slower" in choice.reason
    peephole = fastrnn.PeepholeLSTM(8, 16).to(DEVICE)
    assert peephole.backend_for().name == "triton"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bias_in_the_projection_gemm(monkeypatch, cell):
    """On CUDA (``CAPABILITIES.bias_in_projection``) the layers add the bias in the input
    projection's GEMM (torch.addmm) and give the kernels none. Forced here on the CPU: the
    launcher gets ``bias=None`` (GRU: b_hn still), and outputs, final states, every gradient and
    a double backward match torch.nn's (float32, 1e-5; gradients 1e-4)."""
    assert backends.bias_in_projection("triton", "cuda")
    assert not backends.bias_in_projection("triton", "cpu")
    assert not backends.bias_in_projection("numba", "cpu")
    assert not backends.bias_in_projection("reference", "cuda")
    import dataclasses
    monkeypatch.setattr(tg, "CAPABILITIES", dataclasses.replace(
        tg.CAPABILITIES, bias_in_projection=(DEVICE.type,)))
    seen = []
    forward = launch.recurrence_forward

    def spy(*args, **kwargs):
        seen.append((kwargs.get("bias"), args[5]))
        return forward(*args, **kwargs)
    monkeypatch.setattr(launch, "recurrence_forward", spy)
    torch.manual_seed(3)
    ours = getattr(fastrnn, cell.upper())(5, 16, num_layers=2, backend="triton").to(DEVICE)
    ref = getattr(torch.nn, cell.upper())(5, 16, num_layers=2).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 5, device=DEVICE)
    outs = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        y, state = module(xi)
        states = state if isinstance(state, tuple) else (state,)
        loss = (y * y).sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [xi, *module.parameters()], create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), xi)[0]
        outs.append((y, *states, *grads, second))
    assert len(seen) == 2 and all(b is None for b, _ in seen)
    assert all((b_hn is not None) == (cell == "gru") for _, b_hn in seen)
    for k, (a, b) in enumerate(zip(*outs)):
        tol = 1e-5 if k < 1 + len(states) else 1e-4
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reverse_direction_runs_on_a_side_stream(monkeypatch, cell):
    """A bidirectional layer's reverse direction runs its kernels on the side stream (forward
    and backward) while the forward direction runs on the current one; outputs, final states
    and every gradient match torch.nn (float32, 1e-4), and two calls give the same bits."""
    from fastrnn import functional
    streams = []
    for name in ("recurrence_forward", "recurrence_backward"):
        original = getattr(launch, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            streams.append((_name, args[8] if _name == "recurrence_forward" else args[10],
                            torch.cuda.current_stream().stream_id))
            return _original(*args, **kwargs)
        monkeypatch.setattr(launch, name, spy)
    torch.manual_seed(5)
    ours = getattr(fastrnn, cell.upper())(8, 24, num_layers=2, bidirectional=True,
                                          backend="triton").to(DEVICE)
    ref = getattr(torch.nn, cell.upper())(8, 24, num_layers=2, bidirectional=True).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(9, 5, 8, device=DEVICE)
    results = []
    for module in (ours, ours, ref):
        with torch.backends.cudnn.flags(enabled=False):  # torch.nn in float32, no TF32
            xi = x.clone().requires_grad_()
            y, state = module(xi)
            states = state if isinstance(state, tuple) else (state,)
            (y.square().sum() + sum(s.sum() for s in states)).backward()
        results.append([y.detach(), *[s.detach() for s in states], xi.grad,
                        *[p.grad for p in module.parameters()]])
        module.zero_grad(set_to_none=True)
    side = functional._SIDE_STREAMS[DEVICE].stream_id
    main = torch.cuda.current_stream().stream_id
    assert {(name, reverse, sid) for name, reverse, sid in streams} == {
        (name, reverse, side if reverse else main)
        for name in ("recurrence_forward", "recurrence_backward") for reverse in (False, True)}
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fast_activations_for_16_bit_on_cuda(monkeypatch):
    """16-bit kernels on CUDA take the fast activations (tanh.approx.f32: the AOT test finds it
    in their PTX); float32 and the interpreter the exact ones. The fast CELL is another
    constexpr; wherever a cell's helpers referred to tanh or sigmoid (rnn_relu's never do), its
    fast helpers refer to the fast functions instead, in their globals and closures alike."""
    from fastrnn.kernels.triton_gpu import step_math as sm
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sm.fast_activations(torch.bfloat16, cuda) and sm.fast_activations(torch.float16, cuda)
    assert not sm.fast_activations(torch.float32, cuda)
    assert not sm.fast_activations(torch.bfloat16, cpu)
    def refers(math):  # what the cell's own helpers refer to (globals and closures)
        return {id(v) for fn in math.own.values() for v in (
            *fn.fn.__globals__.values(), *(c.cell_contents for c in fn.fn.__closure__ or ()))}
    for cell in configs.CELLS:
        exact, fast = refers(sm.cell_math(cell)), refers(sm.cell_math(cell, fast=True))
        for old, new in sm.FAST_ACTIVATIONS:
            assert id(old) not in fast and id(new) not in exact, cell
        uses = {id(old) for old, _ in sm.FAST_ACTIVATIONS} & exact
        assert bool(uses) == (cell != "rnn_relu"), cell
        assert {id(new) for old, new in sm.FAST_ACTIVATIONS if id(old) in uses} <= fast
    lstm = sm.cell_math("lstm", fast=True).forward.fn
    assert lstm.__globals__["tanh"] is sm.fast_tanh
    assert lstm.__globals__["sigmoid"] is sm.fast_sigmoid
    elman = sm.cell_math("rnn_tanh", fast=True).forward.fn
    assert [c.cell_contents for c in elman.__closure__ if c.cell_contents is sm.fast_tanh]
    xg, h0 = torch.zeros(6, 64, dtype=torch.bfloat16), torch.zeros(2, 16, dtype=torch.bfloat16)
    w_hh = torch.zeros(64, 16, dtype=torch.bfloat16)
    args = ("lstm", xg, h0, h0, w_hh, None, None, [2, 2, 2], False)
    assert launch.make_plan(*args).step_math == sm.cell_math("lstm")
    monkeypatch.setattr(launch, "fast_activations", lambda dtype, device: True)
    assert launch.make_plan(*args).step_math == sm.cell_math("lstm", fast=True)



def test_step_passes_after_the_first_call_the_compiled_kernel():
    """The step strategy launches its first pass through Triton's JIT (which compiles and returns
    the compiled kernel) and the others through that kernel's own launcher: the CUDA launcher
    receives exactly what the JIT would give it for every pass (grid, stream, metadata, every
    argument in order), checked with Triton's real JIT and compiled kernel (sm_90, compiled
    ahead of time) over a stub driver. The interpreter returns no compiled kernel and runs
    every pass through the JIT (the parity tests)."""
    from _support import launcher_check
    launcher_check()
