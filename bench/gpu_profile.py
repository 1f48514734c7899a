"""Where a GPU call's time goes: fastrnn's triton backend and torch.nn (cuDNN), one layer, per case
and mode: the eager call (CUDA events around it: launch gaps included), the same call replayed
from a CUDA graph (no launch cost), and the sum of its kernels' device time (torch.profiler),
with the number of kernels launched per call; then the Python functions an eager call's host
time goes to (cProfile).

    python bench/gpu_profile.py [--out FILE.json]

Eager / graph > 1 means the call is bound by launches (Python and driver cost per kernel); kernel
time / graph time near 1 means the GPU is busy for the whole replay.
"""
import argparse
import cProfile
import json
import pstats
import statistics

import torch
from torch import nn

import fastrnn
from fastrnn_bench.graphs import graphed

CASES = [  # cell, T, B, H, dtype: the fused strategy (H <= 128) and the step strategy (H = 512)
    ("lstm", 256, 32, 128, torch.bfloat16), ("lstm", 256, 32, 512, torch.bfloat16),
    ("lstm", 256, 32, 128, torch.float32), ("lstm", 256, 32, 512, torch.float32),
    ("gru", 256, 32, 512, torch.bfloat16), ("lstm", 1024, 128, 768, torch.bfloat16),
]
CLASSES = {"lstm": (nn.LSTM, fastrnn.LSTM), "gru": (nn.GRU, fastrnn.GRU)}


def _median_ms(fn, repeats=20):
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernels(fn, calls=5):
    """(device ms per call summed over kernels, kernels launched per call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return (sum(e.time_range.elapsed_us() for e in events) / 1e3 / calls, len(events) / calls)


def models(cell, T, B, H, dtype):
    """(torch.nn module, fastrnn triton module with its weights, call(model, mode)) on the GPU: one
    layer, input (T, B, H); call runs a forward (inference) or forward + backward (training)."""
    torch.manual_seed(0)
    ref_cls, fast_cls = CLASSES[cell]
    ref = ref_cls(H, H).cuda().to(dtype)
    fast = fast_cls(H, H, backend="triton").cuda().to(dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)

    def call(model, mode):
        if mode == "inference":
            with torch.no_grad():
                return model(x)[0]
        y = model(x)[0]
        y.float().sum().backward()
        return y
    return ref, fast, call


def profile(cell, T, B, H, dtype, mode):
    ref, fast, run = models(cell, T, B, H, dtype)
    rows = {}
    for name, model in (("triton", fast), ("cudnn", ref)):
        def call(model=model):
            run(model, mode)
        row = {"eager_ms": _median_ms(call)}
        try:
            row["graph_ms"] = _median_ms(graphed(call))
        except Exception as e:  # noqa: BLE001 - recorded: a call that cannot be captured
            row["graph_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        row["kernel_ms"], row["kernels"] = _kernels(call)
        if name == "triton":
            row["strategy"] = fast.backend_for().reason
        rows[name] = row
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = p.parse_args(argv)
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    print("| case | mode | impl | eager ms | graph ms | kernels ms | kernels/call |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for cell, T, B, H, dtype in CASES:
        for mode in ("inference", "training"):
            try:
                rows = profile(cell, T, B, H, dtype, mode)
            except Exception as e:  # noqa: BLE001 - printed; the other cases still run
                print(f"| {cell} T={T} B={B} H={H} {dtype} | {mode} | error | {type(e).__name__}: {e} |")
                continue
            for name, r in rows.items():
                graph = f"{r['graph_ms']:.3f}" if "graph_ms" in r else r["graph_error"]
                print(f"| {cell} T={T} B={B} H={H} {str(dtype)[6:]} | {mode} | {name} | "
                      f"{r['eager_ms']:.3f} | {graph} | {r['kernel_ms']:.3f} | {r['kernels']:.0f} |")
            out.append({"cell": cell, "T": T, "B": B, "H": H, "dtype": str(dtype), "mode": mode,
                        **{f"{k}": v for k, v in rows.items()}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    host_profile(*CASES[0], "inference")


def host_profile(cell, T, B, H, dtype, mode, calls=200):
    """The Python functions an eager triton call spends its host time in (cProfile, the top 20
    by own time): what makes eager calls slower than their CUDA-graph replay."""
    _, fast, run = models(cell, T, B, H, dtype)
    run(fast, mode)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run(fast, mode)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\nhost time of {calls} eager triton calls, {cell} T={T} B={B} H={H} {dtype} {mode}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
