"""The implementations a case is timed with (:class:`Impl`): fastrnn's backends as
``fastrnn-<backend>``, and the baselines torch.nn (``torch``, also the weights' source and
the correctness oracle), a Python loop of nn cells (``cell-loop``) and one ONNX Runtime
``RNN``/``LSTM``/``GRU`` node (``onnxruntime``) exported from the torch module's weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import graphs
from .grid import DTYPES, GATES

FASTRNN_CELL = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}
TORCH_CLASS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
TORCH_CELL_CLASS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
KERNEL_BACKENDS = ("numba", "triton", "native", "reference")
#: The triton backend with one strategy forced, to time the strategies side by side on a GPU
#: ("triton-persistent": W_hh resident where the dispatcher would keep it so, else streamed;
#: "triton-streamed": the persistent kernels streaming W_hh; both skipped where the streamed
#: grid does not fit the device's SMs).
FORCED_TRITON = ("triton-fused", "triton-step", "triton-persistent", "triton-streamed")
#: forced_strategy() arguments of each forced strategy
_FORCED = {"fused": ("fused", {}), "step": ("step", {}), "persistent": ("persistent", {}),
           "streamed": ("persistent", dict(k_pad=0))}
BASELINES = ("torch", "cell-loop", "onnxruntime")
BASELINE_LABEL = {"torch": "torch.nn", "cell-loop": "nn cell loop", "onnxruntime": "ONNX Runtime"}
# Python per-step loops (the cell-loop baseline, and the reference backend unless asked for by
# name) are skipped beyond this many steps: they cost minutes there and say nothing new.
LOOP_MAX_STEPS = 256
# ... and, in training, beyond this much work T·B·H (autograd through a per-step loop).
LOOP_MAX_TRAINING_WORK = 1_000_000
ONNX_TOLERANCE = 1e-5


class Skip(Exception):
    """This implementation does not run this case (the message says why)."""


class OnnxMismatch(AssertionError):
    """ONNX Runtime's node disagrees with torch.nn: the exported weights are wrong."""


@dataclass
class Impl:
    """One way to run a case: ``run()`` does one timed call; ``output()`` the forward output
    (T, B, H) (padded for packed input) used for the correctness check."""

    name: str
    kind: str  # "fastrnn" | "baseline"
    run: object = None
    output: object = None
    replayed: bool = False  # run replays a CUDA graph (a "+graph" backend)


def default_backends(device, explicit=None):
    """fastrnn backends to time on ``device``: those ``why_not`` lets run (numba/triton only
    when their kernels have landed). Triton on CPU (its interpreter) is never a benchmark."""
    from fastrnn import backends
    device = torch.device(device)
    names = explicit or KERNEL_BACKENDS
    out = []
    for name in names:
        if explicit is None and name == "triton" and device.type == "cpu":
            continue
        if explicit is None and backends.why_not(name, "lstm", device, torch.float32) is not None:
            continue
        out.append(name)
    return out


def _seed(case):
    return sum(map(ord, case.id)) % (2 ** 31)


def _inputs(case, device):
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(_seed(case) + 1)
    x = torch.randn(case.seq_len, case.batch, case.input_size, generator=g).to(device, dtype)
    lengths = case.lengths()
    packed = (nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
              if lengths is not None else None)
    return x, packed, lengths


def _torch_module(case, device):
    torch.manual_seed(_seed(case))
    return TORCH_CLASS[case.cell](case.input_size, case.hidden).to(device, DTYPES[case.dtype])


def _module_runner(module, case, x, packed):
    """run/output closures for a sequence module (torch.nn or fastrnn)."""
    inp = packed if packed is not None else x
    params = list(module.parameters())

    def output():
        with torch.no_grad():
            y = module(inp)[0]
        if packed is not None:
            y = nn.utils.rnn.pad_packed_sequence(y, total_length=case.seq_len)[0]
        return y

    if case.stream:
        return _stream_runner(module, case, x, params)
    if case.mode == "inference":
        def run():
            with torch.no_grad():
                return module(inp)
    else:
        def run():
            for p in params:
                p.grad = None
            y = module(inp)[0]
            (y.data if packed is not None else y).sum().backward()
    return run, output


def _detached(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def _stream_runner(module, case, x, params):
    """run/output closures of a streamed case: T calls of one step, the state carried; in
    training each call's forward and backward (truncated BPTT of one step), the state detached."""
    def forward(train):
        state, ys = None, []
        for t in range(x.shape[0]):
            y, state = module(x[t:t + 1], state)
            if train:
                y.sum().backward()
                state = _detached(state)
            ys.append(y)
        return torch.cat(ys)

    def output():
        with torch.no_grad():
            return forward(False)

    if case.mode == "inference":
        return output, output

    def run():
        for p in params:
            p.grad = None
        forward(True)
    return run, output


def _cell_loop(case, reference, x):
    cell = TORCH_CELL_CLASS[case.cell](case.input_size, case.hidden).to(x.device, x.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(reference.weight_ih_l0)
        cell.weight_hh.copy_(reference.weight_hh_l0)
        cell.bias_ih.copy_(reference.bias_ih_l0)
        cell.bias_hh.copy_(reference.bias_hh_l0)
    is_lstm = case.cell == "lstm"
    params = list(cell.parameters())

    def forward():
        state = None
        ys = []
        for t in range(x.shape[0]):
            state = cell(x[t], state)
            ys.append(state[0] if is_lstm else state)
        return torch.stack(ys)

    def output():
        with torch.no_grad():
            return forward()

    if case.mode == "inference":
        def run():
            with torch.no_grad():
                return forward()
    else:
        def run():
            for p in params:
                p.grad = None
            forward().sum().backward()
    return run, output


ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}
# ONNX gate order as indices into torch's: LSTM torch (i, f, g, o) -> ONNX (i, o, f, c);
# GRU torch (r, z, n) -> ONNX (z, r, h).
ONNX_GATE_ORDER = {"rnn": [0], "lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def onnx_model(cell, module, packed=False, opset=17, stream=False):
    """One ONNX ``RNN``/``LSTM``/``GRU`` node with the weights of a 1-layer torch module.

    Inputs ``X`` (T, B, I) float32 (and ``sequence_lens`` (B,) int32 when ``packed``; the
    initial states ``initial_h`` (1, B, H), for LSTM also ``initial_c``, when ``stream``);
    outputs ``Y`` (T, 1, B, H), ``Y_h`` (1, B, H) and for LSTM ``Y_c``. GRU uses
    ``linear_before_reset=1``, torch's semantics (``b_hn`` inside ``r ⊙ (…)``)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gates, hidden = GATES[cell], module.hidden_size
    order = ONNX_GATE_ORDER[cell]

    def reorder(w):
        w = w.detach().float().cpu().numpy()
        return np.ascontiguousarray(w.reshape(gates, hidden, -1)[order].reshape(gates * hidden, -1))

    W = reorder(module.weight_ih_l0)[None]
    R = reorder(module.weight_hh_l0)[None]
    B = np.concatenate([reorder(module.bias_ih_l0[:, None])[:, 0],
                        reorder(module.bias_hh_l0[:, None])[:, 0]])[None]
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"),
             numpy_helper.from_array(R.astype(np.float32), "R"),
             numpy_helper.from_array(B.astype(np.float32), "B")]
    attrs = dict(hidden_size=hidden)
    if cell == "gru":
        attrs["linear_before_reset"] = 1
    if cell == "rnn":
        attrs["activations"] = ["Tanh"]
    states = (["initial_h"] + (["initial_c"] if cell == "lstm" else [])) if stream else []
    node_inputs = ["X", "W", "R", "B"] + (["sequence_lens"] if packed else [""] if stream else [])
    outputs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    node = helper.make_node(ONNX_OP[cell], node_inputs + states, outputs, **attrs)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                  ["T", "B", module.input_size])]
    if packed:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    graph_inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "B", hidden])
                     for name in states]
    shapes = {"Y": ["T", 1, "B", hidden], "Y_h": [1, "B", hidden], "Y_c": [1, "B", hidden]}
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs]
    graph = helper.make_graph([node], f"fastrnn_{cell}", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fastrnn-bench")
    onnx.checker.check_model(model)
    return model


def onnx_runner(case, module, x, lengths, threads=None):
    """(run, output) of an ONNX Runtime session for ``module``; checks the output against
    torch.nn (max abs difference ≤ 1e-5 on output and h_n) and raises :class:`OnnxMismatch`."""
    import numpy as np
    import onnxruntime as ort

    model = onnx_model(case.cell, module, packed=lengths is not None, stream=case.stream)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # No spinning worker after each run: with more than one thread it kept a core busy and
    # stalled the threads of the libraries timed after it (torch.nn's own times spread 0.17-4.8x
    # between two identical runs in one 2-thread grid); with one thread there is no worker.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"X": x.detach().float().cpu().numpy()}
    if lengths is not None:
        feed["sequence_lens"] = lengths.numpy().astype(np.int32)

    def run():
        return session.run(["Y", "Y_h"], feed)

    if case.stream:  # one session call per step, the state carried
        names = ["Y", "Y_h"] + (["Y_c"] if case.cell == "lstm" else [])
        zeros = np.zeros((1, case.batch, module.hidden_size), np.float32)

        def run():
            state, ys = [zeros] * (len(names) - 1), []
            for t in range(case.seq_len):
                step = {"X": feed["X"][t:t + 1], "initial_h": state[0]}
                if case.cell == "lstm":
                    step["initial_c"] = state[1]
                y, *state = session.run(names, step)
                ys.append(y)
            return np.concatenate(ys), state[0]

    def output():
        return torch.from_numpy(run()[0][:, 0])

    # the check: outputs and final state against torch.nn on this very input
    y, y_h = run()
    with torch.no_grad():
        if lengths is not None:
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
            out, h_n = module(packed)
            out = nn.utils.rnn.pad_packed_sequence(out, total_length=case.seq_len)[0]
        else:
            out, h_n = module(x)
        h_n = h_n[0] if case.cell == "lstm" else h_n
    errors = {"Y": float((torch.from_numpy(y[:, 0]) - out.float().cpu()).abs().max()),
              "Y_h": float((torch.from_numpy(y_h) - h_n.float().cpu()).abs().max())}
    if not all(math.isfinite(e) and e <= ONNX_TOLERANCE for e in errors.values()):
        raise OnnxMismatch(f"ONNX Runtime {ONNX_OP[case.cell]} node differs from torch.nn on "
                           f"{case.id}: max abs error {errors} > {ONNX_TOLERANCE} "
                           "(check the gate order / linear_before_reset in onnx_model)")
    return run, output, max(errors.values())


def _loop_too_big(case):
    """Why a Python per-step loop is too slow to time in ``case``, or None."""
    if case.seq_len > LOOP_MAX_STEPS:
        return f"Python per-step loop, T={case.seq_len} > {LOOP_MAX_STEPS}"
    work = case.seq_len * case.batch * case.hidden
    if case.mode == "training" and work > LOOP_MAX_TRAINING_WORK:
        return f"Python per-step loop in training, T·B·H = {work} > {LOOP_MAX_TRAINING_WORK}"
    return None


def _strategy_refused(case, device, strategy):
    """Why triton's ``strategy`` cannot be forced for ``case`` on ``device``, or None."""
    from fastrnn.kernels.triton_gpu import configs
    if strategy in ("persistent", "streamed") and not configs.persistent_fits(
            case.batch, case.hidden, configs.device_limits(device)):
        return (f"the persistent grid, ceil(B/{configs.BLOCK_B}) x "
                f"ceil(H/{configs.STEP_BLOCK_H}), exceeds this device's SMs")
    if strategy == "fused" and case.hidden > configs.fused_max_hidden(
            "backward" if case.mode == "training" else "forward", FASTRNN_CELL[case.cell],
            DTYPES[case.dtype], configs.device_limits(device)):
        return "H is over the fused kernels' limit"
    return None


def _forcing(fn, strategy):
    """``fn`` run with triton's ``strategy`` forced."""
    from fastrnn.kernels.triton_gpu import forced_strategy

    name, tiles = _FORCED[strategy]

    def call():
        with forced_strategy(name, **tiles):
            return fn()
    return call


def build_impls(case, device, backends, baselines, explicit_backends=False):
    """``{name: Impl or Skip(reason)}`` for one case. Names: ``fastrnn-<backend>`` and the
    baselines ``torch``, ``cell-loop``, ``onnxruntime``. The torch.nn module is always built (it
    is the weights' source and the correctness oracle); it is timed when "torch" is listed."""
    import fastrnn
    from fastrnn import backends as fb

    device = torch.device(device)
    dtype = DTYPES[case.dtype]
    x, packed, lengths = _inputs(case, device)
    reference = _torch_module(case, device)
    impls = {}
    run, output = _module_runner(reference, case, x, packed)
    torch_impl = impls["torch"] = Impl("torch", "baseline", run, output)
    torch_impl.module, torch_impl.x, torch_impl.lengths = reference, x, lengths
    for backend in backends:
        name = f"fastrnn-{backend}"
        backend, graph = backend.removesuffix(graphs.GRAPH), backend.endswith(graphs.GRAPH)
        backend, _, strategy = backend.partition("-")
        reason = fb.why_not(backend, FASTRNN_CELL[case.cell], device, dtype) or (
            strategy and _strategy_refused(case, device, strategy))
        if reason:
            impls[name] = Skip(reason)
            continue
        too_big = _loop_too_big(case)
        if backend == "reference" and not explicit_backends and too_big:
            impls[name] = Skip(f"{too_big} (name it in --backends to run it)")
            continue
        module = getattr(fastrnn, TORCH_CLASS[case.cell].__name__)(
            case.input_size, case.hidden, backend=backend).to(device, dtype)
        module.load_state_dict(reference.state_dict())
        run, output = _module_runner(module, case, x, packed)
        if strategy:
            run, output = _forcing(run, strategy), _forcing(output, strategy)
        replay, reason = graphs.replayed(run, device) if graph else (run, None)
        impls[name] = Skip(reason) if reason else Impl(name, "fastrnn", replay, output, graph)
    if "cell-loop" in baselines:
        if packed is not None:
            impls["cell-loop"] = Skip("no packed input for a loop of cells")
        elif _loop_too_big(case):
            impls["cell-loop"] = Skip(_loop_too_big(case))
        else:
            run, output = _cell_loop(case, reference, x)
            impls["cell-loop"] = Impl("cell-loop", "baseline", run, output)
    if "onnxruntime" in baselines:
        impls["onnxruntime"] = _onnx_impl(case, device, reference, x, lengths)
    if "torch" not in baselines:
        impls["torch"] = Skip("torch.nn baseline not requested")
        impls["torch"].oracle = torch_impl
    return impls


def onnxruntime_missing():
    """Why the ONNX Runtime baseline cannot run at all, or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"onnxruntime/onnx not installed ({e.name})"
    return None


def _onnx_impl(case, device, reference, x, lengths):
    missing = onnxruntime_missing()
    if missing:
        return Skip(missing)
    if case.mode != "inference":
        return Skip("inference only")
    if device.type != "cpu" or case.dtype != "float32":
        return Skip("CPU float32 only")
    run, output, error = onnx_runner(case, reference, x, lengths)
    impl = Impl("onnxruntime", "baseline", run, output)
    impl.check_error = error
    return impl
