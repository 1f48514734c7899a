"""Cells in a Python loop on the CPU: ``fastrnn.RNNCell`` / ``LSTMCell`` / ``GRUCell`` (backend
``auto``, or ``--backend``) against torch.nn's cells, T steps a sequence, the state carried, as
users' own programs loop over them: forward (no gradient) and forward + backward (a weighted sum
of every step's output, then ``backward()``).

    python bench/cell_profile.py                      # B 1, 97; H 51, 256; float32, float64
    python bench/cell_profile.py --threads 2 --backend numba

The engines run interleaved, ``--rounds`` rounds of one sequence each; the median round is
printed, in µs per step, and the ratio torch.nn / fastrnn (> 1: fastrnn faster).
"""
import argparse
import pathlib
import statistics
import sys
import time

import torch

import fastrnn

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # fastrnn_bench, beside this file
from fastrnn_bench.timing import machine_line  # noqa: E402

CELLS = {"rnn": "RNNCell", "lstm": "LSTMCell", "gru": "GRUCell"}


def _sequence(cell, steps, x, grad):
    """One pass of ``cell`` over the steps of x (T, B, H); with ``grad``, then backward."""
    state = None
    total = 0
    for t in range(steps):
        state = cell(x[t], state)
        h = state[0] if isinstance(state, tuple) else state
        if grad:
            total = total + h.sum()
    if grad:
        total.backward()


def profile(name, hidden, batch, dtype, steps, rounds, backend):
    """Median µs per step of fastrnn's and torch.nn's cell, forward and forward + backward."""
    torch.manual_seed(0)
    ours = getattr(fastrnn, CELLS[name])(hidden, hidden, dtype=dtype, backend=backend)
    ref = getattr(torch.nn, CELLS[name])(hidden, hidden, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(steps, batch, hidden, dtype=dtype)
    out = {}
    for grad in (False, True):
        times = {"fastrnn": [], "torch.nn": []}
        with torch.set_grad_enabled(grad):
            for _ in range(2):  # warm-up
                _sequence(ours, steps, x, grad)
                _sequence(ref, steps, x, grad)
            for _ in range(rounds):
                for engine, cell in (("fastrnn", ours), ("torch.nn", ref)):
                    start = time.perf_counter()
                    _sequence(cell, steps, x, grad)
                    times[engine].append((time.perf_counter() - start) / steps * 1e6)
        out["training" if grad else "inference"] = {k: statistics.median(v)
                                                    for k, v in times.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="rnn,lstm,gru")
    parser.add_argument("--hidden", default="51,256")
    parser.add_argument("--batch", default="1,97")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line(args.threads, f"backend {args.backend!r}; µs per step of a {args.steps}-"
                                     f"step loop, median of {args.rounds} interleaved rounds"))
    print("| cell | dtype | B | H | forward fastrnn | torch.nn | ×torch | fwd+bwd fastrnn | "
          "torch.nn | ×torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.cells.split(","):
        for dtype_name in args.dtypes.split(","):
            for batch in map(int, args.batch.split(",")):
                for hidden in map(int, args.hidden.split(",")):
                    t = profile(name, hidden, batch, getattr(torch, dtype_name), args.steps,
                                args.rounds, args.backend)
                    cells = []
                    for mode in ("inference", "training"):
                        ours, ref = t[mode]["fastrnn"], t[mode]["torch.nn"]
                        cells += [f"{ours:.1f}", f"{ref:.1f}", f"{ref / ours:.2f}"]
                    print(f"| {name} | {dtype_name} | {batch} | {hidden} | " + " | ".join(cells)
                          + " |")


if __name__ == "__main__":
    main()
