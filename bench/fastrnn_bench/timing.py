"""The method: every implementation of a case timed in one process, interleaved round by round
(order rotated each round), first call and a warm-up apart, the median of the rounds reported;
peak memory of one more call; the output check against torch.nn; the GEMM peak and the machine
description recorded beside the timings.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .baselines import Skip

# max |out - torch.nn out| allowed for a fastrnn backend before its timing is marked wrong.
# float32/64: max abs difference to torch.nn; float16/bfloat16: relative norm error to torch.nn
# in float32 (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-8, "float16": 1e-2, "bfloat16": 2e-2}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
@contextmanager
def background_load(processes):
    """``processes`` busy processes (a Python spin loop each, on the CPUs this process may use)
    for the duration of the block: the contention of a shared machine or a CPU quota, controlled.
    Yields their PIDs; they are killed on exit, whatever happens."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(processes)]
    try:
        yield [p.pid for p in busy]
    finally:
        for p in busy:
            p.kill()
        for p in busy:
            p.wait()

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
        if live[name].replayed:  # a graph replay allocates nothing
            res["peak_mem_bytes"] = None
            res["peak_mem_error"] = "not measured: replayed from a CUDA graph (its own pool)"
        elif settings.memory != "off":
            try:
                res["peak_mem_bytes"] = peak_memory(live[name].run, device, settings.memory)
            except Exception as e:  # noqa: BLE001
                res["peak_mem_bytes"] = None
                res["peak_mem_error"] = str(e)[:200]
    return results


def _upcast_oracle(case, oracle, dtype):
    """torch.nn's output computed in ``dtype`` from the same (rounded) weights and input."""
    import copy
    module = copy.deepcopy(oracle.module).to(dtype)
    x = oracle.x.to(dtype)
    with torch.no_grad():
        if oracle.lengths is None:
            return module(x)[0].float().cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, oracle.lengths, enforce_sorted=True)
        y = module(packed)[0]
        return nn.utils.rnn.pad_packed_sequence(y, total_length=case.seq_len)[0].float().cpu()


def check_outputs(case, impls, results):
    """Compare every implementation's forward output with torch.nn's before trusting its time.

    float32/float64: max |out − torch.nn out| ≤ CHECK_TOLERANCE (float32 on CUDA: torch.nn run
    in float64, since cuDNN's float32 default is TF32, ~5e-4 off on H=128, while the triton
    kernels' float32 products are tf32x3; torch.nn's own error is recorded, not judged).
    float16/bfloat16: relative error ‖out − ref‖ / ‖ref‖ ≤ CHECK_TOLERANCE against torch.nn run
    in float32 on the same weights and input (recorded as ``rel_err``)."""
    oracle = impls["torch"]
    oracle = getattr(oracle, "oracle", oracle)
    tolerance = CHECK_TOLERANCE[case.dtype]
    if case.dtype in ("float16", "bfloat16"):
        expected = _upcast_oracle(case, oracle, torch.float32)
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
    upcast = case.dtype == "float32" and oracle.x.is_cuda
    expected = (_upcast_oracle(case, oracle, torch.float64) if upcast
                else oracle.output().float().cpu())
    for name, impl in impls.items():
        if isinstance(impl, Skip) or (name == "torch" and not upcast) or results[name]["status"] != "ok":
            continue
        error = getattr(impl, "check_error", None)
        if error is None:
            got = impl.output().float().cpu()
            error = float((got - expected).abs().max()) if got.shape == expected.shape else math.inf
            if not math.isfinite(error):
                error = math.inf
        results[name]["max_abs_err"] = error
        if error > tolerance and name != "torch":
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


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine_line(threads, what):
    """The first line the profile scripts print: the CPU (:func:`cpu_info`), torch's thread count
    and version, the time (UTC), then ``what`` the table holds."""
    cpu = cpu_info()
    return (f"- machine: {cpu['cpu_model']} ({cpu.get('cpu_vendor')}, family/model "
            f"{cpu.get('cpu_family_model')}), torch threads {threads}; torch {torch.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {what}\n")


def cpu_info():
    """The CPU as /proc/cpuinfo names it: model, vendor, family/model numbers, the ISA flags the
    kernels care about (:data:`ISA_FLAGS`), and the BLAS torch was built with."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    blas = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return {"cpu_model": fields.get("model name") or platform.processor() or None,
            "cpu_vendor": fields.get("vendor_id"),
            "cpu_family_model": (f"{fields['cpu family']}/{fields['model']}"
                                 if "cpu family" in fields and "model" in fields else None),
            "isa": [f for f in ISA_FLAGS if f in flags],
            "blas": blas.group(1) if blas else None, "mkl": torch.backends.mkl.is_available()}


def machine_info(device):
    info = {**cpu_info(), "cpu_count": os.cpu_count(),
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
