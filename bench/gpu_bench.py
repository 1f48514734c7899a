"""The GPU benchmark: fastrnn's triton backend against cuDNN (torch.nn) and a Python loop of nn
cells, forward (inference) and forward + backward (training), float32 and bfloat16, timed with
CUDA events; fits in 10 minutes on one GPU.

    python bench/gpu_bench.py                      # -> bench/results/cuda-gpu10/{results.json,results.md,*.png}
    python bench/gpu_bench.py --cells lstm --out bench/results/gpu-lstm

It is ``fastrnn-bench --device cuda`` on the ``gpu10`` grid (T ∈ {64, 256, 1024} ×
B ∈ {1, 32, 128} × H ∈ {128, 512, 768} × {float32, bfloat16} plus a packed case), with the
``native`` and ``triton`` backends, each also replayed from a CUDA graph (``+graph``: the call
without its launch cost; its peak memory is not measured, a replay allocates nothing), the
torch.nn (cuDNN) and cell-loop baselines (the loop is skipped beyond T = 256), and a 9.5-minute
stop: cases left when it is reached are recorded as skipped. Peak memory per call:
``torch.cuda.max_memory_allocated`` over one more eager call. The whole CUDA grid of the issue
is ``fastrnn-bench --device cuda --full``.
Extra arguments are passed on to ``fastrnn-bench`` (later ones win).
"""
import sys

from fastrnn_bench import cli, grid

GRID = "gpu10"
DEFAULT_ARGS = ["--device", "cuda", "--grid", GRID,
                "--backends", "triton,native,triton+graph,native+graph",
                "--baselines", "torch,cell-loop", "--budget", "0.1", "--max-minutes", "9.5",
                "--out", f"{cli.DEFAULT_OUT}/cuda-{GRID}"]


def cases(cells=grid.CELLS, modes=grid.MODES):
    """The cases this script runs (for tests and for planning)."""
    return grid.build_grid(GRID, "cuda", cells, modes)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli.main(DEFAULT_ARGS + argv)


if __name__ == "__main__":
    sys.exit(main())
