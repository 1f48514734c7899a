"""fastrnn-bench: time fastrnn's backends against torch.nn, a Python loop of nn cells and
ONNX Runtime, over a grid of cell × seq_len × batch × hidden × mode.

    fastrnn-bench                      # the quick CPU grid (< 5 min on 2 cores) -> bench/results/cpu-quick
    fastrnn-bench --full               # the full grid of the Numba issue
    fastrnn-bench --device cuda        # CUDA grid, CUDA-event timed (fp32 and bf16)
    python -m fastrnn_bench --cells lstm --modes inference --out bench/results/mine

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
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .baselines import (BASELINES, FORCED_TRITON, KERNEL_BACKENDS, LOOP_MAX_STEPS,
                        LOOP_MAX_TRAINING_WORK, ONNX_TOLERANCE, build_impls, default_backends)
from .graphs import GRAPH
from .grid import CELLS, DTYPES, MODES, build_grid
from .plots import plots
from .report import _print_summary, compare, markdown, noise_check, ratios
from .timing import (CHECK_TOLERANCE, Settings, background_load, check_outputs, gemm_peak,
                     machine_info, measure, rss_peak_supported)

DEFAULT_OUT = "bench/results"


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def _console():
    from rich.console import Console
    return Console(stderr=True)


def run_benchmark(cases, device, backends, baselines, settings, out, explicit_backends=False,
                  deadline=None, grid_name="custom", progress=True, argv=None, background=0):
    """Run ``cases``; write results.json, results.md and plots into ``out``. Returns the report.
    ``background``: how many busy processes the caller runs meanwhile (recorded)."""
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
    machine["background_load"] = background
    load = machine.get("loadavg_start")
    if not background and load and load[0] > 0.5 * (machine["affinity_cpus"]
                                                     or machine["cpu_count"]):
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
    size.add_argument("--grid", dest="grid",
                      choices=["tiny", "quick", "full", "gpu10", "persistent"],
                      help=argparse.SUPPRESS)
    size.add_argument("--tiny", dest="grid", action="store_const", const="tiny",
                      help=argparse.SUPPRESS)
    p.add_argument("--cells", default="rnn,lstm,gru", help="comma list of rnn,lstm,gru")
    p.add_argument("--backends", default=None,
                   help="fastrnn backends to time (comma list of numba,triton,native,reference, "
                        "or triton-fused/triton-step/triton-persistent/triton-streamed: triton "
                        "with that strategy forced (streamed: persistent, W_hh not resident); "
                        "any of them +graph: the call replayed from a CUDA graph; default: every "
                        "backend available on the device)")
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
    p.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="run N busy processes on the same CPUs while timing (contention, as on a "
                        "shared machine); the report says so")
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
    names = KERNEL_BACKENDS + FORCED_TRITON
    backends = (_csv(args.backends, names + tuple(n + GRAPH for n in names), "backends")
                if explicit
                else default_backends(device))
    cases = build_grid(grid_name, device, cells, modes, dtypes)
    out = Path(args.out or f"{DEFAULT_OUT}/{device.type}-{grid_name}")
    settings = Settings(repeats=args.repeats, budget_s=args.budget, memory=args.memory)
    if args.repeats:
        settings.min_repeats = settings.max_repeats = args.repeats
    deadline = time.perf_counter() + 60 * args.max_minutes if args.max_minutes else None
    _console().print(f"fastrnn-bench: {len(cases)} cases ({grid_name} grid) on {device}; "
                     f"fastrnn backends {backends}; baselines {baselines}; out {out}")
    with background_load(args.background_load):
        run_benchmark(cases, device, backends, baselines, settings, out, explicit, deadline,
                      grid_name, progress=not args.no_progress, argv=argv,
                      background=args.background_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
