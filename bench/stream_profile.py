"""The cost of one streamed call (T=1, B=1 or ``--batch``, the state carried) on the CPU, split:
the module call of fastrnn's numba backend, its compiled call alone (``numba_cpu/express.py``: the
kernels plus Numba's dispatch) and the rest (Python: torch's Module call, the lean path's checks,
the outputs), beside torch.nn's call and ONNX Runtime's (one session run per step, where it is
installed).

    python bench/stream_profile.py                      # LSTM, GRU, RNN at H=64 and 256, 1 thread
    python bench/stream_profile.py --cells lstm --hidden 64 --threads 2
    python bench/stream_profile.py --cells lstm --hidden 128 --batch 8

Each engine runs ``--calls`` calls per round, the engines interleaved, ``--rounds`` rounds; the
median round is printed, in µs per call. Warm: the same module and input every call (the
benchmark grid's streamed rows interleave other work and run colder). The compiled call is timed
alone, so the rest also holds what it loses to the Python around it (caches: at H=256 its 2 MiB
of weights and the interpreter's state evict each other).
"""
import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

import fastrnn
from fastrnn import inference

CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


sys.path.insert(0, str(pathlib.Path(__file__).parent))  # fastrnn_bench, beside this file
from fastrnn_bench.timing import machine_line  # noqa: E402


def _onnx(cell, module, batch):
    """A per-step runner of ONNX Runtime for ``module``, or None without onnxruntime."""
    try:
        import onnxruntime as ort

        from fastrnn_bench.baselines import onnx_model
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(onnx_model(cell, module, stream=True).SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    names = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    x = np.random.rand(1, batch, module.input_size).astype(np.float32)
    state = [np.zeros((1, batch, module.hidden_size), np.float32)] * (len(names) - 1)

    def step():
        feed = {"X": x, "initial_h": state[0]}
        if cell == "lstm":
            feed["initial_c"] = state[1]
        state[:] = session.run(names, feed)[1:]
    return step


def profile(cell, hidden, calls, rounds, batch=1):
    """Median µs per call of each engine for one cell, hidden size and batch."""
    torch.manual_seed(0)
    mod = getattr(fastrnn, CLASSES[cell])(hidden, hidden, backend="numba")
    ref = getattr(torch.nn, CLASSES[cell])(hidden, hidden)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(1, batch, hidden)
    carried = {"fastrnn": None, "torch.nn": None}

    def streamed(name, module):
        def step():
            carried[name] = module(x, carried[name])[1]
        return step

    engines = {"fastrnn": streamed("fastrnn", mod), "torch.nn": streamed("torch.nn", ref)}
    with torch.inference_mode():
        engines["fastrnn"]()
        entry, shape = inference._found(mod, x)
        express = entry.kernels.express(entry.layers, 1, batch, 1, 1, np.dtype(np.float32))
        if express is not None:  # the compiled call alone, on the outputs of one call
            y, h = np.empty(shape.y, np.float32), np.empty(shape.states[0], np.float32)
            c = np.empty(shape.states[1], np.float32) if len(shape.states) == 2 else None
            address = x.data_ptr()
            engines["compiled call"] = lambda: entry.kernels.forward_express(
                express, address, 0, 0, y, h, c)
        if (onnx := _onnx(cell, ref, batch)) is not None:
            engines["ONNX Runtime"] = onnx
        times = {name: [] for name in engines}
        for _ in range(rounds):
            for name, step in engines.items():
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--hidden", default="64,256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads, f"numba {__import__('numba').__version__}; µs per streamed "
                                     f"call (T=1, B={args.batch}), median of interleaved rounds"))
    print("| cell | H | fastrnn | compiled call | rest (Python) | torch.nn | ONNX Runtime | ×ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in args.cells.split(","):
        for hidden in map(int, args.hidden.split(",")):
            t = profile(cell, hidden, args.calls, args.rounds, args.batch)
            ours, compiled, ort = t["fastrnn"], t.get("compiled call"), t.get("ONNX Runtime")
            cells = [f"{ours:.1f}", f"{compiled:.1f}" if compiled else "–",
                     f"{ours - compiled:.1f}" if compiled else "–", f"{t['torch.nn']:.1f}",
                     f"{ort:.1f}" if ort else "–", f"{ort / ours:.2f}" if ort else "–"]
            print(f"| {cell} | {hidden} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
