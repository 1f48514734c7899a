"""Host cost of the step strategy's per-pass launches, without a GPU: Triton's JIT call
(``kernel[grid](...)``: binding, specialisation, cache lookup) against the compiled kernel's own
launcher (``launch._launch_passes``), with Triton's driver replaced by a stub whose launcher
records its arguments instead of calling ``cuLaunchKernel`` -- so the figures are the Python
cost each path adds on top of the CUDA launch itself (the same for both), on this CPU.

    python bench/launch_overhead.py [--passes 256] [--repeats 9]   # median µs per pass
    python bench/launch_overhead.py --check    # the launcher gets the same arguments both ways

The kernel is compiled for sm_90 (ahead of time, as bench/triton_aot.py does: no GPU needed);
run it without ``TRITON_INTERPRET``.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastrnn.kernels.triton_gpu import configs, kernels, launch  # noqa: E402
from fastrnn.kernels.triton_gpu.step_math import cell_math  # noqa: E402
from fastrnn_bench.timing import machine_line  # noqa: E402

LAUNCHES = []  # what the stub launcher was called with


class _StubUtils:
    @staticmethod
    def load_binary(name, kernel, shared, device):  # module, function, regs, spills, threads
        return 0, 0, configs.MAX_REGISTERS, 0, 1024

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": configs.ARCH_SHARED[90], "multiprocessor_count": 132}

    @staticmethod
    def unload_module(module):
        pass


class StubDriver:
    """Triton's active-driver interface, as far as the JIT and a compiled kernel use it, for an
    sm_90 device that is not there: its launcher appends its arguments to :data:`LAUNCHES`."""

    utils = _StubUtils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args: LAUNCHES.append(args)


def step_call(T=64, B=32, H=512, cell="lstm", dtype=torch.bfloat16):
    """(kernel, grid, (lead, tail), options): the arguments ``launch._tiled_passes`` gives the
    step strategy's forward kernel for one layer (CPU tensors standing in for CUDA ones)."""
    G, S = configs.GATES[cell], configs.STASH[cell]
    config = configs.select_config("forward", cell, dtype, H, strategy="step")
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_h))
    xg, w = torch.zeros(T * B, G * H, dtype=dtype), torch.zeros(G * H, H, dtype=dtype)
    lead = (xg, w, w, w, torch.zeros(2, B, H, dtype=dtype), torch.zeros(B, H), torch.zeros(B, H),
            torch.zeros(T * B, H, dtype=dtype), torch.zeros(T * B, H), torch.zeros(T * B, S * H),
            torch.zeros(1 + grid[0] * T, dtype=torch.int32), torch.full((T,), B, dtype=torch.int32),
            torch.arange(T, dtype=torch.int32) * B, T, B, H, 0)
    tail = launch.handoff(B, H, grid) + (launch.MAX_POLLS,)
    options = configs.kernel_options(config, cell_math(cell, fast=dtype != torch.float32), 90)
    return kernels._forward_tiled_kernel, grid, (lead, tail), options


def jit_passes(kernel, grid, args, options, passes):
    """Every pass through the JIT (what the step strategy did before ``_launch_passes``)."""
    lead, tail = args
    for s in range(passes):
        kernel[grid](*lead, s, s + 1, *tail, **options)


def _plain(args):
    """JSON of launcher arguments: tensors as their addresses, the launch metadata (a Triton
    ``LazyDict``, made per launch) as its contents, other objects by identity."""
    def plain(a):
        if isinstance(a, torch.Tensor):
            return a.data_ptr()
        if type(a).__name__ == "LazyDict":
            return {key: plain(value) for key, value in a.get().items()}
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, tuple):
            return [plain(b) for b in a]
        return f"{type(a).__name__}@{id(a)}"
    return [plain(a) for a in args]


def check(passes=5):
    """The stub launcher's arguments for ``passes`` passes, JIT-only and through
    ``_launch_passes``: {"jit": [...], "direct": [...], "triton": version} (tensors as their
    addresses)."""
    call = step_call()
    out = {"triton": triton.__version__}
    for name, run in (("jit", jit_passes), ("direct", launch._launch_passes)):
        LAUNCHES.clear()
        run(*call, passes)
        out[name] = [_plain(a) for a in LAUNCHES]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    triton.runtime.driver.set_active(StubDriver())
    if args.check:
        print(json.dumps(check()))
        return
    call = step_call()
    jit_passes(*call, 1)  # compile
    times = {"jit": [], "direct": []}
    for _ in range(args.repeats):  # interleaved
        for name, run in (("jit", jit_passes), ("direct", launch._launch_passes)):
            LAUNCHES.clear()
            start = time.perf_counter()
            run(*call, args.passes)
            times[name].append((time.perf_counter() - start) / args.passes * 1e6)
    print(machine_line(torch.get_num_threads(), f"Triton {triton.__version__}; load average "
                       f"{os.getloadavg()[0]:.2f}; step strategy forward pass (lstm bf16 B=32 "
                       f"H=512), host µs per pass on top of the CUDA launch, median of "
                       f"{args.repeats} x {args.passes} passes:"), end="")
    for name, values in times.items():
        print(f"  {name:6s} {statistics.median(values):7.2f}  (min {min(values):.2f})")


if __name__ == "__main__":
    main()
