"""Where the numba backend's time goes, beside torch.nn's total, for single-layer modules on the CPU.

    python bench/numba_profile.py                       # the default cases, 1 thread
    python bench/numba_profile.py --cases lstm:50:1:32,gru:1000:64:512 --threads 2

A case is ``cell:T:B:H`` (input size = H). Each part is timed on its own, the median of
``--repeats`` calls (torch.nn and fastrnn interleaved), so parts need not add up exactly:

* ``GEMMs``: the whole-sequence GEMMs, alone: inference the input projection ``x W_ih^T``
  (N x I x G*H; as the backend makes it without gradients: in the panel kernels where the CPU
  runs them, ``numba_cpu/projection.py``, else torch.mm); training torch.mm's projection and
  also d_x, d_W_ih and d_W_hh (each as large).
* ``rec GEMM``: the T per-step matmuls alone (the kernel's own BLAS calls in a compiled loop with
  no gate math); twice for training (forward and backward run one each per step).
* ``pointwise``: the compiled loops minus ``rec GEMM`` (gate math, state updates); the loops'
  time is a kernel call minus the same call with the loops skipped.
* ``rest``: the module call minus the three above: Python (argument checks, allocation, the
  launchers, dispatch), autograd, bias gradients, copies.

GFLOP/s columns count the multiply-adds of the GEMMs (2 flops each) over the whole call.
Prints a Markdown table and writes it to ``--out`` (default bench/results/cpu-profile.md).

``--matmul`` instead times one step's recurrent matmul (B x P) @ (P x G*H) through the BLAS gemm
call and through the Numba micro-kernel for each case's B and H, and names the one the loops pick
(``launch.MICROKERNEL_MAX_ROWS``): the crossover on this CPU.
"""
import argparse
import pathlib
import statistics
import time

import numpy as np
import torch
from numba import njit

import fastrnn
from fastrnn import functional
from fastrnn.cells import GATES
from fastrnn.kernels.numba_cpu import buffers, jit, launch, matmul, projection
from fastrnn_bench.timing import machine_info

DEFAULT_CASES = ("lstm:50:1:32,lstm:200:8:128,lstm:200:64:128,lstm:50:64:512,gru:50:1:512,"
                 "gru:200:64:512,rnn:200:8:128")  # about 5 minutes
OUT = pathlib.Path(__file__).resolve().parent / "results" / "cpu-profile.md"
CLASSES = {"rnn": (torch.nn.RNN, fastrnn.RNN, "rnn_tanh"), "lstm": (torch.nn.LSTM, fastrnn.LSTM, "lstm"),
           "gru": (torch.nn.GRU, fastrnn.GRU, "gru")}


# Not disk-cached: this script is also loaded under another module name (the tests load it from its
# file), and a cache entry written under one name fails to load under the other.
@njit(**{**jit._JIT, "cache": False})
def _gemm_loop(gemm, steps, h, w_t, w_p, acc):
    """The forward kernel's per-step matmul ``acc = h @ w_t``, ``steps`` times, nothing else."""
    batch = h.shape[0]
    for _ in range(steps):
        matmul._matmul_rows(acc, 0, h, 0, w_t, w_p, 0, 1, batch, batch, gemm, True)


def _median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(cell, steps, batch, hidden, repeats):
    """Times in seconds of one case: a dict per mode."""
    torch_cls, fast_cls, kernel_cell = CLASSES[cell]
    torch.manual_seed(0)
    ref = torch_cls(hidden, hidden)
    mod = fast_cls(hidden, hidden, backend="numba")
    mod.load_state_dict(ref.state_dict())
    gates = GATES[kernel_cell]
    x = torch.randn(steps, batch, hidden)
    x2 = x.view(steps * batch, hidden)
    w_ih, w_hh = mod.weight_ih_l0.detach(), mod.weight_hh_l0.detach()
    xg, bias, b_hn = functional.input_projection(kernel_cell, x2, w_ih, mod.bias_ih_l0.detach(),
                                                 mod.bias_hh_l0.detach())
    h0 = torch.zeros(batch, hidden)
    c0 = torch.zeros(batch, hidden) if cell == "lstm" else None
    sizes = torch.full((steps,), batch, dtype=torch.int64)
    plan = launch._schedule(sizes, False, batch, gates * hidden, hidden, 4)
    h_a = buffers.owned(torch.randn(batch, hidden))  # aligned, as the kernel's
    w_t = buffers.transposed(w_hh)
    w_p = matmul.panels(w_t, plan.gemm == 0)
    acc = buffers.alloc((batch, gates * hidden), np.float32)

    def kernel_forward(save):
        return launch.recurrence_forward(kernel_cell, xg, h0, c0, w_hh, b_hn, None, sizes, False,
                                    save=save, bias=bias)

    y, h_n, c_n, saved = kernel_forward(True)
    grad_y, grad_h = torch.randn_like(y), torch.zeros_like(h_n)

    def kernel_backward():
        launch.recurrence_backward(kernel_cell, grad_y, grad_h, None if c_n is None else torch.zeros_like(c_n),
                              h0, c0, w_hh, b_hn, None, sizes, False, y, saved, bias=bias)

    xt = x.clone().requires_grad_(True)

    def inference(module):
        with torch.no_grad():
            module(x)

    def training(module):
        out, _ = module(xt)
        out.sum().backward()

    x_a, xg_a, w_ih_p = buffers.array(x2), buffers.alloc(tuple(xg.shape), np.float32), \
        projection.packed(w_ih)

    def gemms(training):  # the projection-sized GEMMs: forward projection; d_x, d_W_ih, d_W_hh
        if training or not projection.applies(x2.shape[0]):
            x2 @ w_ih.t()
        else:
            projection.run(xg_a, x_a, *w_ih_p)
        if training:
            xg @ w_ih
            xg.t() @ x2
            xg.t() @ y

    def loops(fn):
        """Seconds of the compiled loops inside ``fn``: fn minus fn with ``launch._run`` skipped."""
        run = launch._run
        launch._run = lambda *args: None
        try:
            launcher = _median(fn, repeats)
        finally:
            launch._run = run
        return _median(fn, repeats) - launcher

    t = {}
    for _ in range(2):  # interleave torch.nn and fastrnn
        t["torch inf"] = _median(lambda: inference(ref), repeats)
        t["numba inf"] = _median(lambda: inference(mod), repeats)
        t["torch train"] = _median(lambda: training(ref), repeats)
        t["numba train"] = _median(lambda: training(mod), repeats)
    t["gemm inf"] = _median(lambda: gemms(False), repeats)
    t["gemm train"] = _median(lambda: gemms(True), repeats)
    def rec_gemms():
        launch._run_one(lambda *a: _gemm_loop(plan.gemm, steps, h_a, w_t, w_p, acc), 0, plan, ())

    t["rec"] = _median(rec_gemms, repeats)
    t["loops inf"] = loops(lambda: kernel_forward(False))
    t["loops train"] = loops(lambda: kernel_forward(True)) + loops(kernel_backward)
    macs = steps * batch * gates * hidden * hidden
    out = {}
    for mode, rec, flops in (("inference", t["rec"], 4 * macs), ("training", 2 * t["rec"], 12 * macs)):
        key = "inf" if mode == "inference" else "train"
        total = t[f"numba {key}"]
        pointwise = t[f"loops {key}"] - rec
        out[mode] = dict(torch=t[f"torch {key}"], numba=total, gemm=t[f"gemm {key}"], rec=rec,
                         pointwise=pointwise, rest=total - t[f"gemm {key}"] - rec - pointwise,
                         gflops=flops / total / 1e9)
    return out


def matmul_step(cell, batch, hidden, repeats, steps=200):
    """Seconds per step of the recurrent matmul through (BLAS gemm, micro-kernel), and the plan's
    choice (True: micro-kernel), at the current thread count."""
    row_work = GATES[CLASSES[cell][2]] * hidden * hidden
    plan = launch._schedule(torch.full((steps,), batch, dtype=torch.int64), False, batch,
                            row_work // hidden, hidden, 4)
    h = buffers.owned(torch.randn(batch, hidden))
    w_t = buffers.transposed(torch.randn(row_work // hidden, hidden))
    w_p = matmul.panels(w_t)
    acc = buffers.alloc((batch, row_work // hidden), np.float32)
    gemm = matmul._gemm_address(torch.float32)
    times = {}
    for _ in range(3):  # interleaved
        for address in (gemm, 0):
            times.setdefault(address, []).append(_median(
                lambda: _gemm_loop(address, steps, h, w_t, w_p, acc), repeats))
    blas, micro = (statistics.median(times[a]) / steps for a in (gemm, 0))
    return blas, micro, plan.gemm == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--matmul", action="store_true",
                        help="time one step's matmul, BLAS vs micro-kernel, per case's B and H")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    versions = info["versions"]
    if args.matmul:
        print(f"# {info['cpu_model']}, torch threads {args.threads}: one step's recurrent matmul, "
              f"us (BLAS gemm call / micro-kernel)")
        for spec in args.cases.split(","):
            cell, _, batch, hidden = spec.split(":")
            blas, micro, picked = matmul_step(cell, int(batch), int(hidden), args.repeats)
            kind = "panel kernels" if matmul.USE_PANELS else "micro-kernel"
            print(f"{cell} B={batch} H={hidden}: BLAS {blas * 1e6:.2f}  {kind} "
                  f"{micro * 1e6:.2f}  BLAS/micro {blas / micro:.2f}  loops use "
                  f"{kind if picked else 'BLAS'}", flush=True)
        return
    lines = [
        "# Where the numba backend's time goes (CPU, single-layer modules, input size = H)", "",
        f"- machine: {info['cpu_model']}, {info['cpu_count']} cores, torch threads {args.threads}; "
        f"torch {versions['torch']}, numba {versions['numba']}; {info['date']}",
        "- generated by `python bench/numba_profile.py` (columns: see its docstring); times in ms,"
        " ×torch = torch.nn time / numba time", "",
        "| case | mode | torch.nn | numba | ×torch | GEMMs | rec GEMM | pointwise | rest | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in args.cases.split(","):
        cell, steps, batch, hidden = spec.split(":")
        result = profile(cell, int(steps), int(batch), int(hidden), args.repeats)
        for mode, r in result.items():
            ms = {k: v * 1e3 for k, v in r.items() if k != "gflops"}
            cells = " | ".join(f"{ms[k]:.3f}" for k in ("gemm", "rec", "pointwise", "rest"))
            lines.append(f"| {cell} T={steps} B={batch} H={hidden} | {mode} | {ms['torch']:.3f} | "
                         f"{ms['numba']:.3f} | {r['torch'] / r['numba']:.2f} | {cells} | "
                         f"{r['gflops']:.0f} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
