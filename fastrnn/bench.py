"""fastrnn-bench: time fastrnn's backends against torch.nn, a Python loop of nn cells and
ONNX Runtime, over a grid of cell × seq_len × batch × hidden × mode.

    fastrnn-bench                      # the quick CPU grid (< 5 min on 2 cores) -> bench/results/cpu-quick
    fastrnn-bench --full               # the full grid of the Numba issue
    fastrnn-bench --device cuda        # CUDA grid, CUDA-event timed (fp32 and bf16)
    python -m fastrnn.bench --cells lstm --modes inference --out bench/results/mine

Method (see bench/README.md): every implementation of one case runs in this process,
interleaved round by round (the order rotates each round); the first call is timed apart
(``first_call_s``: compilation, caches) and a warm-up call follows before the timed rounds;
the reported time is the median of the rounds. ``ratio = baseline time / fastrnn time``
(> 1: fastrnn is faster). Before timing, every implementation's output is compared with
torch.nn's; the ONNX Runtime node must match within 1e-5 or the run stops.

Writes ``results.json`` (machine, versions, every timing), ``results.md`` (tables of ratios) and
PNG plots into ``--out``. If ``--out`` already holds a ``results.json``, the new run is compared
with it case by case (kept as ``results.previous.json``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

CELLS = ("rnn", "lstm", "gru")
MODES = ("inference", "training")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
FASTRNN_CELL = {"rnn": "rnn_tanh", "lstm": "lstm", "gru": "gru"}
TORCH_CLASS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
TORCH_CELL_CLASS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
KERNEL_BACKENDS = ("numba", "triton", "native", "reference")
BASELINES = ("torch", "cell-loop", "onnxruntime")
BASELINE_LABEL = {"torch": "torch.nn", "cell-loop": "nn cell loop", "onnxruntime": "ONNX Runtime"}
# Python per-step loops (the cell-loop baseline, and the reference backend unless asked for by
# name) are skipped beyond this many steps: they cost minutes there and say nothing new.
LOOP_MAX_STEPS = 256
# ... and, in training, beyond this much work T·B·H (autograd through a per-step loop).
LOOP_MAX_TRAINING_WORK = 1_000_000
ONNX_TOLERANCE = 1e-5
# max |out - torch.nn out| allowed for a fastrnn backend before its timing is marked wrong.
# float32/64: max abs difference to torch.nn; float16/bfloat16: relative norm error to torch.nn
# in float32 (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "float16": 1e-2, "bfloat16": 2e-2}
DEFAULT_OUT = "bench/results"


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One benchmark case: a single-layer unidirectional ``cell`` over input (T, B, I=H)."""

    cell: str          # "rnn" (tanh) | "lstm" | "gru"
    seq_len: int       # T
    batch: int         # B
    hidden: int        # H (input_size I = H)
    mode: str          # "inference" (no_grad forward) | "training" (forward + backward of sum)
    dtype: str = "float32"
    packed: bool = False  # ragged lengths in [T/4, T] as a PackedSequence

    @property
    def input_size(self):
        return self.hidden

    @property
    def id(self):
        s = f"{self.cell}-T{self.seq_len}-B{self.batch}-H{self.hidden}-{self.mode}-{self.dtype}"
        return s + ("-packed" if self.packed else "")

    def label(self):
        s = f"{self.cell} T={self.seq_len} B={self.batch} H={self.hidden} {self.mode}"
        if self.dtype != "float32":
            s += f" {self.dtype}"
        return s + (" packed" if self.packed else "")

    def lengths(self):
        """Sequence lengths of the packed case (non-increasing, first = T), else None."""
        if not self.packed:
            return None
        g = torch.Generator().manual_seed(1234 + self.seq_len * 7 + self.batch)
        lengths = torch.randint(max(1, self.seq_len // 4), self.seq_len + 1, (self.batch,),
                                generator=g)
        lengths[0] = self.seq_len
        return torch.sort(lengths, descending=True).values

    def flops(self):
        """GEMM floating-point operations of one call (elementwise work left out).

        forward: 2·N·G·H·(I + H) with N = Σ lengths (T·B dense); training: 3× forward."""
        lengths = self.lengths()
        rows = int(lengths.sum()) if lengths is not None else self.seq_len * self.batch
        forward = 2 * rows * GATES[self.cell] * self.hidden * (self.input_size + self.hidden)
        return forward * (3 if self.mode == "training" else 1)


# Named grids: (seq_lens, batches, hiddens, dtypes, extra points (T, B, H), packed points (T, B, H))
GRIDS = {
    "cpu": {
        "tiny": dict(T=(8, 16), B=(2,), H=(16,), dtypes=("float32",), extra=(),
                     packed=((16, 3, 16),)),
        "quick": dict(T=(50, 200), B=(1, 8, 64), H=(32, 128), dtypes=("float32",),
                      extra=((50, 8, 512),), packed=((200, 8, 128),)),
        "full": dict(T=(50, 200, 1000), B=(1, 8, 64), H=(32, 128, 512), dtypes=("float32",),
                     extra=(), packed=((200, 64, 128), (1000, 64, 128))),
    },
    "cuda": {
        "tiny": dict(T=(8, 16), B=(2,), H=(16,), dtypes=("float32", "bfloat16"), extra=(),
                     packed=((16, 3, 16),)),
        "quick": dict(T=(64, 256), B=(8, 128), H=(128, 512), dtypes=("float32", "bfloat16"),
                      extra=(), packed=((256, 128, 256),)),
        # sized for bench/gpu_bench.py: < 10 minutes on one GPU with the loop baselines capped
        "gpu10": dict(T=(64, 256, 1024), B=(1, 32, 128), H=(128, 512, 768),
                      dtypes=("float32", "bfloat16"), extra=(), packed=((1024, 128, 512),)),
        "full": dict(T=(64, 256, 1024), B=(1, 8, 32, 128), H=(64, 128, 256, 512, 768),
                     dtypes=("float32", "bfloat16"), extra=(),
                     packed=((256, 128, 256), (1024, 128, 512))),
    },
}


def build_grid(name, device="cpu", cells=CELLS, modes=MODES, dtypes=None):
    """The list of :class:`Case` of grid ``name`` ("tiny", "quick", "full"; "gpu10" on cuda)."""
    spec = GRIDS["cuda" if str(device).startswith("cuda") else "cpu"][name]
    dtypes = dtypes or spec["dtypes"]
    cases = []
    for cell in cells:
        for dtype in dtypes:
            shapes = [(t, b, h) for h in spec["H"] for b in spec["B"] for t in spec["T"]]
            shapes += [s for s in spec["extra"] if s not in shapes]
            for mode in modes:
                cases += [Case(cell, t, b, h, mode, dtype) for t, b, h in shapes]
                cases += [Case(cell, t, b, h, mode, dtype, packed=True)
                          for t, b, h in spec["packed"]]
    return cases


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------
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


def onnx_model(cell, module, packed=False, opset=17):
    """One ONNX ``RNN``/``LSTM``/``GRU`` node with the weights of a 1-layer torch module.

    Inputs ``X`` (T, B, I) float32 (and ``sequence_lens`` (B,) int32 when ``packed``);
    outputs ``Y`` (T, 1, B, H) and ``Y_h`` (1, B, H). GRU uses ``linear_before_reset=1``,
    torch's semantics (``b_hn`` inside ``r ⊙ (…)``)."""
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
    node_inputs = ["X", "W", "R", "B"] + (["sequence_lens"] if packed else [])
    outputs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    node = helper.make_node(ONNX_OP[cell], node_inputs, outputs, **attrs)
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                  ["T", "B", module.input_size])]
    if packed:
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
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

    model = onnx_model(case.cell, module, packed=lengths is not None)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"X": x.detach().float().cpu().numpy()}
    if lengths is not None:
        feed["sequence_lens"] = lengths.numpy().astype(np.int32)

    def run():
        return session.run(["Y", "Y_h"], feed)

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
        reason = fb.why_not(backend, FASTRNN_CELL[case.cell], device, dtype)
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
        impls[name] = Impl(name, "fastrnn", run, output)
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


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device):
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _status_value(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_peak_supported():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_value("VmHWM") is not None
    except OSError:
        return False


def peak_memory(fn, device, method):
    """Peak memory (bytes) one call of ``fn`` adds over what was allocated before it.

    cuda: ``torch.cuda.max_memory_allocated``. cpu ``rss``: growth of the process's peak
    resident set (``/proc/self/clear_refs`` resets VmHWM) — counts torch, numba and ONNX Runtime
    allocations alike, but not memory the allocator already held. cpu ``profiler``: the running
    sum of torch allocator events under ``torch.profiler.profile(profile_memory=True)`` (torch
    tensors only; slow for Python loops)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if method == "rss":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_value("VmRSS")
        fn()
        return max(0, _status_value("VmHWM") - base)
    if method == "profiler":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        return peak
    return None


@dataclass
class Settings:
    repeats: int | None = None     # fixed number of timed rounds, or None: by time budget
    min_repeats: int = 5
    max_repeats: int = 50
    budget_s: float = 0.25         # target timed seconds per implementation and case
    memory: str = "rss"            # "rss" | "profiler" | "off" (CPU)


def measure(impls, device, settings):
    """Time every runnable Impl of one case, interleaved. Returns ``{name: result dict}``."""
    results = {}
    live = {}
    for name, impl in impls.items():
        if isinstance(impl, Skip):
            results[name] = {"status": "skipped", "reason": str(impl)}
            continue
        try:
            first = time_call(impl.run, device)          # compilation, caches, first touch
            warm = time_call(impl.run, device)           # warm-up, not reported
        except Exception as e:  # noqa: BLE001 - a backend that crashes is reported, not fatal
            results[name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
            continue
        # slower than the whole budget per call: 3 rounds minimum instead of min_repeats
        least = settings.min_repeats if warm < settings.budget_s else min(3, settings.min_repeats)
        count = settings.repeats or int(min(settings.max_repeats,
                                            max(least, settings.budget_s / max(warm, 1e-6))))
        live[name] = impl
        results[name] = {"status": "ok", "first_call_s": first, "warmup_s": warm,
                         "repeats": count, "times_s": []}
    names = list(live)
    rounds = max((results[n]["repeats"] for n in names), default=0)

    def wanted(name):
        times = results[name]["times_s"]
        if len(times) >= results[name]["repeats"]:
            return False
        # A machine that stalls (shared cores) must not turn a 1 ms case into minutes: past the
        # minimum number of rounds, stop once 3× the budget is spent (unless --repeats fixed it).
        least = min(settings.min_repeats, results[name]["repeats"])
        return settings.repeats is not None or len(times) < least or sum(times) < 3 * settings.budget_s

    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:          # rotate the order every round
            if wanted(name):
                results[name]["times_s"].append(time_call(live[name].run, device))
    for name in names:
        results[name]["repeats"] = len(results[name]["times_s"])
    for name in names:
        res = results[name]
        times = sorted(res["times_s"])
        res["median_s"] = statistics.median(times)
        res["min_s"] = times[0]
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        res["iqr_s"] = q[2] - q[0]
        if settings.memory != "off":
            try:
                res["peak_mem_bytes"] = peak_memory(live[name].run, device, settings.memory)
            except Exception as e:  # noqa: BLE001
                res["peak_mem_bytes"] = None
                res["peak_mem_error"] = str(e)[:200]
    return results


def _float32_oracle(case, oracle):
    """torch.nn's output in float32 from the same (rounded) low-precision weights and input."""
    import copy
    module = copy.deepcopy(oracle.module).float()
    x = oracle.x.float()
    with torch.no_grad():
        if oracle.lengths is None:
            return module(x)[0].cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, oracle.lengths, enforce_sorted=True)
        y = module(packed)[0]
        return nn.utils.rnn.pad_packed_sequence(y, total_length=case.seq_len)[0].cpu()


def check_outputs(case, impls, results):
    """Compare every implementation's forward output with torch.nn's before trusting its time.

    float32/float64: max |out − torch.nn out| ≤ CHECK_TOLERANCE. float16/bfloat16: relative error
    ‖out − ref‖ / ‖ref‖ ≤ CHECK_TOLERANCE against torch.nn run in float32 on the same weights and
    input (recorded as ``rel_err``)."""
    oracle = impls["torch"]
    oracle = getattr(oracle, "oracle", oracle)
    tolerance = CHECK_TOLERANCE[case.dtype]
    if case.dtype in ("float16", "bfloat16"):
        expected = _float32_oracle(case, oracle)
        for name, impl in impls.items():
            if isinstance(impl, Skip) or results[name]["status"] != "ok":
                continue
            got = impl.output().float().cpu()
            error = (float((got - expected).norm() / expected.norm())
                     if got.shape == expected.shape else math.inf)
            error = error if math.isfinite(error) else math.inf
            results[name]["rel_err"] = error
            if error > tolerance and name != "torch":
                results[name]["status"] = "wrong"
                results[name]["reason"] = f"‖out − float32 torch.nn‖/‖ref‖ = {error:.3g} > {tolerance}"
        return
    expected = oracle.output().float().cpu()
    for name, impl in impls.items():
        if isinstance(impl, Skip) or name == "torch" or results[name]["status"] != "ok":
            continue
        error = getattr(impl, "check_error", None)
        if error is None:
            got = impl.output().float().cpu()
            error = float((got - expected).abs().max()) if got.shape == expected.shape else math.inf
            if not math.isfinite(error):
                error = math.inf
        results[name]["max_abs_err"] = error
        if error > tolerance:
            results[name]["status"] = "wrong"
            results[name]["reason"] = f"max |out - torch.nn| = {error:.3g} > {tolerance}"


def gemm_peak(device, dtype=torch.float32, size=None, repeats=5):
    """GFLOP/s of a large torch.mm on ``device`` (median of ``repeats`` after one warm-up)."""
    device = torch.device(device)
    size = size or (2048 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    times = [time_call(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    return {"size": size, "dtype": str(dtype).replace("torch.", ""),
            "median_s": statistics.median(times),
            "gflops": 2 * size ** 3 / statistics.median(times) / 1e9}


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------
def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def machine_info(device):
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_num_threads": torch.get_num_threads(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "device": str(device),
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "fastrnn": _version("fastrnn"), "numba": _version("numba"),
                         "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
                         "onnx": _version("onnx"), "numpy": _version("numpy")},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------
# Ratios, comparison and reports
# --------------------------------------------------------------------------------------------
def ratios(results):
    """``{fastrnn impl: {baseline: baseline median / fastrnn median}}`` for one case."""
    out = {}
    for name, res in results.items():
        if not name.startswith("fastrnn-") or res.get("status") != "ok":
            continue
        out[name] = {b: results[b]["median_s"] / res["median_s"] for b in BASELINES
                     if results.get(b, {}).get("status") == "ok"}
    return out


def compare(previous, current):
    """Per case and implementation: previous and new median and the change (like
    ``pytest-benchmark compare``). Returns a list of dict rows."""
    old = {(c["id"], name): res["median_s"] for c in previous.get("cases", [])
           for name, res in c["results"].items() if res.get("status") == "ok"}
    rows = []
    for c in current["cases"]:
        for name, res in c["results"].items():
            if res.get("status") != "ok" or (c["id"], name) not in old:
                continue
            before = old[(c["id"], name)]
            rows.append({"case": c["id"], "impl": name, "previous_s": before,
                         "current_s": res["median_s"],
                         "change_pct": 100.0 * (res["median_s"] - before) / before})
    return rows


def _ms(seconds):
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _impl_label(name):
    return BASELINE_LABEL.get(name, name)


def noise_check(report):
    """How far ``fastrnn-native`` (torch.nn behind fastrnn's dispatch, the same computation)
    strays from torch.nn: a measure of the run's noise. None without both."""
    values = sorted(c["ratios"]["fastrnn-native"]["torch"] for c in report["cases"]
                    if "torch" in c["ratios"].get("fastrnn-native", {}))
    if not values:
        return None
    within = sum(0.9 <= v <= 1.1 for v in values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "within_10pct": within, "cases": len(values), "noisy": within < 0.8 * len(values)}


def _noise_line(noise):
    if noise is None:
        return "- noise check: needs the native backend and the torch.nn baseline"
    line = (f"- noise check: fastrnn-native / torch.nn (the same computation) median "
            f"{noise['median']:.2f}, range {noise['min']:.2f}–{noise['max']:.2f}, within ±10% in "
            f"{noise['within_10pct']}/{noise['cases']} cases")
    if noise["noisy"]:
        line += (" — **NOISY RUN: single ratios of this run are not reliable**; see the load "
                 "average (other processes on the cores stall torch's OpenMP threads; "
                 "`--threads 1` suffers less)")
    return line


def markdown(report):
    """results.md: ratios per case and backend, then every timing."""
    cases = report["cases"]
    machine = report["machine"]
    fast = [n for n in report["config"]["impls"] if n.startswith("fastrnn-")]
    lines = [f"# fastrnn benchmark: {report['config']['grid']} grid on {machine['device']}", "",
             f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
             f"torch threads {machine['torch_num_threads']}"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             f"- date {machine['date']}; wall time {report['wall_s']:.0f} s (CPU time of this "
             f"process {report.get('cpu_s', 0):.0f} s); load average at start "
             f"{machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}",
             f"- GEMM peak (torch.mm {report['gemm_peak']['size']}², {report['gemm_peak']['dtype']}): "
             f"{report['gemm_peak']['gflops']:.1f} GFLOP/s",
             _noise_line(noise_check(report)), "",
             "**ratio = baseline time / fastrnn time** (median of interleaved rounds; > 1 means "
             "fastrnn is faster). `fastrnn-native` is torch.nn behind fastrnn's dispatch: its "
             "ratio to torch.nn shows the dispatch overhead and the run's noise level. "
             "`skip`: not run (see results.json for why); `✗`: output differs from torch.nn.", ""]
    groups = {}
    for c in cases:
        groups.setdefault((c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"]), []).append(c)
    baselines = [b for b in BASELINES if b in report["config"]["impls"]]

    def cell_time(res, name):
        r = res.get(name, {})
        if r.get("status") == "ok":
            return _ms(r["median_s"])
        return {"wrong": "✗", "error": "error"}.get(r.get("status"), "skip")

    def cell_ratio(c, f, b):
        ratio = c["ratios"].get(f, {}).get(b)
        if ratio is not None:
            return f"{ratio:.2f}"
        return "✗" if c["results"].get(f, {}).get("status") == "wrong" else "–"

    for (cell, mode, dtype), group in groups.items():
        others = [b for b in baselines if b != "torch"
                  and any(g["results"].get(b, {}).get("status") == "ok" for g in group)]
        lines += [f"## {cell.upper()} {mode} ({dtype})", "",
                  "Times in ms; **×torch.nn** = torch.nn time / fastrnn time.", ""]
        head = ["T", "B", "H", "packed", "torch.nn ms"]
        for f in fast:
            head += [f"{f} ms", f"{f} ×torch.nn"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in group:
            k, res = c["case"], c["results"]
            row = [str(k["seq_len"]), str(k["batch"]), str(k["hidden"]),
                   "yes" if k["packed"] else "", cell_time(res, "torch")]
            for f in fast:
                row += [cell_time(res, f), cell_ratio(c, f, "torch")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if others:
            lines += [f"Against the other baselines ({', '.join(_impl_label(b) for b in others)}):",
                      ""]
            head = ["T", "B", "H", "packed"] + [f"{_impl_label(b)} ms" for b in others]
            head += [f"{f} ×{_impl_label(b)}" for f in fast for b in others]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for c in group:
                k, res = c["case"], c["results"]
                row = [str(k["seq_len"]), str(k["batch"]), str(k["hidden"]),
                       "yes" if k["packed"] else ""]
                row += [cell_time(res, b) for b in others]
                row += [cell_ratio(c, f, b) for f in fast for b in others]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += ["## Every timing", "",
              "median / IQR / first call (compile + first touch) in ms; GFLOP/s from the GEMM "
              "count (`Case.flops`) over the median, and its share of the GEMM peak; peak memory "
              f"({report['config']['memory']}) in MiB; max err: max |out − torch.nn| (float32), "
              "‖out − ref‖/‖ref‖ against torch.nn in float32 (bfloat16/float16).", "",
              "| case | impl | status | median ms | IQR ms | first ms | repeats | GFLOP/s | % peak "
              "| peak MiB | max err | note |", "|" + "---|" * 12]
    for c in cases:
        peak = ((report.get("gemm_peak_bf16") if c["case"]["dtype"] == "bfloat16" else None)
                or report["gemm_peak"])["gflops"]
        for name, r in c["results"].items():
            if r.get("status") in ("ok", "wrong"):
                gf = c["flops"] / r["median_s"] / 1e9 if r.get("median_s") else None
                mem = r.get("peak_mem_bytes")
                err = r.get("max_abs_err", r.get("rel_err"))
                lines.append(
                    f"| {c['id']} | {name} | {r['status']} | {_ms(r.get('median_s'))} | "
                    f"{_ms(r.get('iqr_s'))} | {_ms(r.get('first_call_s'))} | {r.get('repeats')} | "
                    f"{gf:.2f} | {100 * gf / peak:.1f} | "
                    f"{'–' if mem is None else f'{mem / 2**20:.1f}'} | "
                    f"{'' if err is None else f'{err:.1e}'} | {r.get('reason', '')} |")
            else:
                lines.append(f"| {c['id']} | {name} | {r['status']} | | | | | | | | | "
                             f"{r.get('reason', '')} |")
    if report.get("comparison") is not None:
        lines += ["", "## Change against the previous run", "",
                  f"previous: {report.get('previous_date')}; change = (new − previous) / previous "
                  "of the median.", "",
                  "| case | impl | previous ms | new ms | change |", "|---|---|---|---|---|"]
        for row in report["comparison"]:
            lines.append(f"| {row['case']} | {row['impl']} | {_ms(row['previous_s'])} | "
                         f"{_ms(row['current_s'])} | {row['change_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def plots(report, out):
    """PNG plots: time vs seq_len per batch size (rows: hidden size) for every implementation,
    one figure per cell, mode and dtype; and a heatmap of speed-up vs torch.nn (seq_len × batch)
    per fastrnn backend, mode and dtype (columns: cells, rows: hidden sizes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    cases = [c for c in report["cases"] if not c["case"]["packed"]]
    impls = report["config"]["impls"]
    styles = {name: dict(color=f"C{i}", marker="os^vDP*Xh"[i % 9]) for i, name in enumerate(impls)}
    keys = sorted({(c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"]) for c in cases})
    for cell, mode, dtype in keys:
        group = [c for c in cases if (c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"])
                 == (cell, mode, dtype)]
        hiddens = sorted({c["case"]["hidden"] for c in group})
        batches = sorted({c["case"]["batch"] for c in group})
        seq_lens = sorted({c["case"]["seq_len"] for c in group})
        fig, axes = plt.subplots(len(hiddens), len(batches), squeeze=False,
                                 figsize=(max(9.0, 4.2 * len(batches)), 3.3 * len(hiddens) + 1.2))
        handles = {}
        for i, h in enumerate(hiddens):
            for j, b in enumerate(batches):
                ax = axes[i][j]
                sub = sorted((c for c in group if c["case"]["hidden"] == h and c["case"]["batch"] == b),
                             key=lambda c: c["case"]["seq_len"])
                for name in impls:
                    pts = [(c["case"]["seq_len"], c["results"][name]["median_s"] * 1e3) for c in sub
                           if c["results"].get(name, {}).get("status") == "ok"]
                    if pts:
                        line, = ax.plot(*zip(*pts), label=_impl_label(name), **styles[name])
                        handles[name] = line
                ax.set_title(f"H={h}, B={b}", fontsize=10)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.grid(True, which="both", alpha=0.3)
                if not sub:
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"H={h}, B={b}: not in grid", ha="center", va="center",
                            transform=ax.transAxes, color="gray")
                    continue
                ax.set_xlabel("sequence length T (steps)")
                ax.set_ylabel("time per call (ms)")
        fig.suptitle(f"{cell.upper()} {mode}, {dtype}, {report['machine']['device']}: "
                     "median time per call (lower is better)", fontsize=11)
        fig.legend([handles[n] for n in impls if n in handles],
                   [_impl_label(n) for n in impls if n in handles],
                   loc="lower center", ncol=min(3 if len(batches) < 3 else 6, len(handles)),
                   frameon=False)
        bottom = 0.9 / fig.get_figheight()
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / fig.get_figheight()))
        path = out / f"time_{cell}_{mode}_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    fast = [n for n in impls if n.startswith("fastrnn-")]
    for name in fast:
        for mode in sorted({c["case"]["mode"] for c in cases}):
            for dtype in sorted({c["case"]["dtype"] for c in cases}):
                group = [c for c in cases if c["case"]["mode"] == mode and c["case"]["dtype"] == dtype]
                cells = [k for k in CELLS if any(c["case"]["cell"] == k for c in group)]
                hiddens = sorted({c["case"]["hidden"] for c in group})
                seq_lens = sorted({c["case"]["seq_len"] for c in group})
                batches = sorted({c["case"]["batch"] for c in group})
                if not group or not any(c["ratios"].get(name, {}).get("torch") for c in group):
                    continue
                fig, axes = plt.subplots(len(hiddens), len(cells), squeeze=False,
                                         figsize=(3.6 * len(cells) + 1, 2.9 * len(hiddens) + 0.6))
                norm = matplotlib.colors.LogNorm(vmin=0.1, vmax=10)
                image = None
                for i, h in enumerate(hiddens):
                    for j, cell in enumerate(cells):
                        ax = axes[i][j]
                        grid = [[math.nan] * len(batches) for _ in seq_lens]
                        for c in group:
                            k = c["case"]
                            if k["cell"] == cell and k["hidden"] == h:
                                r = c["ratios"].get(name, {}).get("torch")
                                if r:
                                    grid[seq_lens.index(k["seq_len"])][batches.index(k["batch"])] = r
                        image = ax.imshow(grid, cmap="RdYlGn", norm=norm, origin="lower",
                                          aspect="auto")
                        for a, row in enumerate(grid):
                            for b, v in enumerate(row):
                                if not math.isnan(v):
                                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=9)
                        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
                        ax.set_yticks(range(len(seq_lens)), [str(t) for t in seq_lens])
                        ax.set_xlabel("batch size B")
                        ax.set_ylabel("sequence length T")
                        ax.set_title(f"{cell.upper()}, H={h}", fontsize=10)
                fig.suptitle(f"{name} speed-up over torch.nn, {mode} {dtype} "
                             "(torch.nn time / fastrnn time; >1 = fastrnn faster)", fontsize=10)
                fig.tight_layout(rect=(0, 0, 0.9, 0.93))
                cax = fig.add_axes((0.92, 0.15, 0.02, 0.7))
                fig.colorbar(image, cax=cax, label="speed-up (×, log scale)")
                path = out / f"speedup_{name}_{mode}_{dtype}.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                written.append(path.name)
    return written


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _console():
    from rich.console import Console
    return Console(stderr=True)


def run_benchmark(cases, device, backends, baselines, settings, out, explicit_backends=False,
                  deadline=None, grid_name="custom", progress=True, argv=None):
    """Run ``cases``; write results.json, results.md and plots into ``out``. Returns the report."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = _console()
    previous = None
    if (out / "results.json").exists():
        try:
            previous = json.loads((out / "results.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            console.print(f"[yellow]ignoring unreadable previous results.json: {e}")
    started = time.perf_counter()
    cpu_started = time.process_time()
    machine = machine_info(device)
    load = machine.get("loadavg_start")
    if load and load[0] > 0.5 * (machine["affinity_cpus"] or machine["cpu_count"]):
        console.print(f"[yellow]warning: load average {load[0]:.1f} on "
                      f"{machine['cpu_count']} cores: other processes share the CPU; "
                      "timings will be noisy (the interleaving keeps ratios fairer than times)")
    if settings.memory == "rss" and device.type == "cpu" and not rss_peak_supported():
        settings.memory = "off"
    console.print(f"timing torch.mm for the GEMM peak on {device} …")
    peak = gemm_peak(device)
    impl_names = ["torch"] * ("torch" in baselines) + [f"fastrnn-{b}" for b in backends] + \
        [b for b in BASELINES if b in baselines and b != "torch"]
    report = {"schema": 1, "machine": machine, "gemm_peak": peak,
              "config": {"grid": grid_name, "device": str(device), "backends": list(backends),
                         "loop_max_training_work": LOOP_MAX_TRAINING_WORK,
                         "baselines": list(baselines), "impls": impl_names,
                         "settings": asdict(settings), "argv": argv,
                         "memory": settings.memory, "loop_max_steps": LOOP_MAX_STEPS,
                         "onnx_tolerance": ONNX_TOLERANCE, "check_tolerance": CHECK_TOLERANCE},
              "cases": []}
    if device.type == "cuda":
        report["gemm_peak_bf16"] = gemm_peak(device, torch.bfloat16)  # md: bf16 cases use it
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("cases", total=len(cases))
        for number, case in enumerate(cases, 1):
            bar.update(task, description=f"[cyan]{case.label()}")
            if not progress:
                console.print(f"[{number}/{len(cases)}] {case.label()} "
                              f"({time.perf_counter() - started:.0f} s)")
            entry = {"id": case.id, "case": asdict(case), "flops": case.flops()}
            case_started = time.perf_counter()
            if deadline is not None and time.perf_counter() > deadline:
                entry["results"] = {n: {"status": "skipped", "reason": "--max-minutes reached"}
                                    for n in impl_names}
            else:
                impls = build_impls(case, device, backends, baselines, explicit_backends)
                entry["results"] = measure(impls, device, settings)
                check_outputs(case, impls, entry["results"])
                for name, res in entry["results"].items():
                    if res["status"] in ("wrong", "error"):
                        console.print(f"[red]{case.id} {name}: {res['status']}: {res['reason']}")
            entry["ratios"] = ratios(entry["results"])
            entry["wall_s"] = time.perf_counter() - case_started
            report["cases"].append(entry)
            bar.advance(task)
    report["noise_check"] = noise_check(report)
    report["wall_s"] = time.perf_counter() - started
    report["cpu_s"] = time.process_time() - cpu_started  # this process's CPU time, all threads
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if previous is not None:
        report["comparison"] = compare(previous, report)
        report["previous_date"] = previous.get("machine", {}).get("date")
        (out / "results.previous.json").write_text(json.dumps(previous, indent=1))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    report["plots"] = plots(report, out)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    _print_summary(console, report)
    return report


def _print_summary(console, report):
    from rich.table import Table
    fast = [n for n in report["config"]["impls"] if n.startswith("fastrnn-")]
    table = Table(title="speed-up over torch.nn = torch.nn time / fastrnn time (> 1: fastrnn "
                        "faster); all baselines in results.md")
    table.add_column("case")
    table.add_column("torch.nn ms", justify="right")
    for f in fast:
        table.add_column(f.replace("fastrnn-", ""), justify="right")
    for c in report["cases"]:
        torch_res = c["results"].get("torch", {})
        row = [c["id"], _ms(torch_res.get("median_s"))]
        for f in fast:
            r = c["ratios"].get(f, {}).get("torch")
            status = c["results"].get(f, {}).get("status")
            row.append(f"{r:.2f}" if r is not None else {"wrong": "✗", "error": "error"}.get(status, "–"))
        table.add_row(*row)
    console.print(table)
    if report.get("comparison"):
        cmp = Table(title=f"change against the previous run ({report.get('previous_date')})")
        for col in ("case", "impl", "previous ms", "new ms", "change"):
            cmp.add_column(col, justify="left" if col in ("case", "impl") else "right")
        for row in report["comparison"]:
            pct = row["change_pct"]
            color = "red" if pct > 5 else "green" if pct < -5 else "white"
            cmp.add_row(row["case"], row["impl"], _ms(row["previous_s"]), _ms(row["current_s"]),
                        f"[{color}]{pct:+.1f}%")
        console.print(cmp)
    console.print(_noise_line(noise_check(report))[2:].replace("**", ""))
    console.print(f"wall time {report['wall_s']:.0f} s, CPU time {report['cpu_s']:.0f} s; "
                  f"load average {report['machine']['loadavg_start']} at start, "
                  f"{report['machine']['loadavg_end']} at end")


def _csv(text, allowed, what):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def parser():
    p = argparse.ArgumentParser(prog="fastrnn-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help="the quick grid (default; < 5 min on 2 CPU cores)")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help="the full grid (T∈{50,200,1000}×B∈{1,8,64}×H∈{32,128,512} on CPU; "
                           "T∈{64,256,1024}×B∈{1,8,32,128}×H∈{64..768}, fp32+bf16 on CUDA)")
    size.add_argument("--grid", dest="grid", choices=["tiny", "quick", "full", "gpu10"],
                      help=argparse.SUPPRESS)
    size.add_argument("--tiny", dest="grid", action="store_const", const="tiny",
                      help=argparse.SUPPRESS)
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma list of rnn,lstm,gru")
    p.add_argument("--backends", default=None,
                   help="fastrnn backends to time (comma list of numba,triton,native,reference; "
                        "default: every one available on the device)")
    p.add_argument("--baselines", default="torch,cell-loop,onnxruntime",
                   help="comma list of torch,cell-loop,onnxruntime")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--modes", default="inference,training", help="inference,training")
    p.add_argument("--dtypes", default=None, help="comma list (default: float32 on CPU, "
                                                  "float32,bfloat16 on CUDA)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<grid>)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per implementation (default: as many as fit "
                        "--budget seconds, between 5 and 50)")
    p.add_argument("--budget", type=float, default=0.25,
                   help="timed seconds per implementation and case when --repeats is not given")
    p.add_argument("--memory", choices=["rss", "profiler", "off"], default="rss",
                   help="CPU peak-memory method (GPU: torch.cuda.max_memory_allocated)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new cases after this many minutes (they are recorded as skipped)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before timing "
                        "(default: leave torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    grid_name = args.grid or "quick"
    if args.threads:
        # torch's only. fastrnn's numba kernels use no Numba threading layer (their threads follow
        # torch.get_num_threads()), and starting it (numba.get/set_num_threads) can make torch's
        # oneDNN LSTM run on two threads under torch.set_num_threads(1) (seen: CPU time 2x wall).
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    cells = _csv(args.cells, CELLS, "cells")
    modes = _csv(args.modes, MODES, "modes")
    dtypes = _csv(args.dtypes, tuple(DTYPES), "dtypes") if args.dtypes else None
    baselines = _csv(args.baselines, BASELINES, "baselines")
    explicit = args.backends is not None
    backends = (_csv(args.backends, KERNEL_BACKENDS, "backends") if explicit
                else default_backends(device))
    cases = build_grid(grid_name, device, cells, modes, dtypes)
    out = Path(args.out or f"{DEFAULT_OUT}/{device.type}-{grid_name}")
    settings = Settings(repeats=args.repeats, budget_s=args.budget, memory=args.memory)
    if args.repeats:
        settings.min_repeats = settings.max_repeats = args.repeats
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else None
    _console().print(f"fastrnn-bench: {len(cases)} cases ({grid_name} grid) on {device}; "
                     f"fastrnn backends {backends}; baselines {baselines}; out {out}")
    run_benchmark(cases, device, backends, baselines, settings, out, explicit, deadline,
                  grid_name, progress=not args.no_progress, argv=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
