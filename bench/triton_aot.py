"""Ahead-of-time compilation of the triton backend's kernel configurations for real GPUs, without a
GPU: the resource check (registers, spills, shared memory) that ``tests/test_triton_aot.py`` and
``bench/triton_resources.py`` run. Tooling, not runtime: nothing in ``fastrnn`` imports it.

Run as a script only as the compile worker (``python bench/triton_aot.py --worker``)."""
from __future__ import annotations

import os

import triton

from fastrnn.kernels.triton_gpu import kernels
from fastrnn.kernels.triton_gpu.configs import (ARCH_SHARED, FP_FUSION,  # noqa: F401
                                                MAX_REGISTERS, TRITON_DTYPE, KernelConfig,
                                                dispatchable, kernel_options, launch_options,
                                                programmatic_launch)
from fastrnn.kernels.triton_gpu.step_math import cell_math

_KERNELS = {
    "forward_fused": "_forward_fused_kernel", "backward_fused": "_backward_fused_kernel",
    "forward_step": "_forward_tiled_kernel", "backward_step": "_backward_tiled_kernel",
    "forward_persistent": "_forward_tiled_kernel", "backward_persistent": "_backward_tiled_kernel",
}
# Pointer arguments that are float32 workspaces whatever the input dtype (the rest are the
# input dtype, except the int32 step tables).
_FP32_POINTERS = {"hprev_ptr", "stash_ptr", "hst_ptr", "c_ptr", "dgate_ptr", "dhn_ptr", "dh_ptr",
                  "dc_ptr", "dh0_ptr", "dc0_ptr"}
_INT_POINTERS = {"bs_ptr", "off_ptr", "sync_ptr"}
# Pointer arguments the caller provides (views such as h0[k] may start at any element); the rest
# are the launcher's own allocations and step tables, always 16-byte aligned.
CALLER_POINTERS = {"xg_ptr", "h0_ptr", "c0_ptr", "w_ptr", "bhn_ptr", "wcell_ptr", "gy_ptr",
                   "ghn_ptr", "gcn_ptr"}


def aot_source(config, cc, aligned=True):
    """The ``triton.compiler.ASTSource`` of ``config`` as the launchers run it on an ``sm_<cc>``
    GPU (its constexprs from :func:`~fastrnn.kernels.triton_gpu.configs.kernel_options`, 16-bit
    with the fast activations as ``make_plan`` gives them on CUDA): runtime integers
    unspecialised (the kernels declare them ``do_not_specialize``). ``aligned``: every
    pointer 16-byte aligned (``tt.divisibility`` 16, what Triton specialises on for torch
    allocations); False: the :data:`CALLER_POINTERS` without it (the variant Triton compiles
    when they are all unaligned)."""
    from triton.compiler import ASTSource

    fn = getattr(kernels, _KERNELS[config.kernel])
    if not hasattr(fn, "cache_key"):
        raise RuntimeError("AOT compilation needs the compiled Triton frontend: run it in a "
                           "process without TRITON_INTERPRET=1 (see aot_resources)")
    options = kernel_options(config, cell_math(config.cell, fast=config.dtype != "float32"), cc)
    constexprs = {name: options[name] for name in fn.arg_names if name in options}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = ("i32" if name in _INT_POINTERS else
                    "fp32" if name in _FP32_POINTERS else TRITON_DTYPE[config.dtype])
            signature[name] = "*" + kind
            if aligned or name not in CALLER_POINTERS:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_config(config, cc, aligned=True):
    """Compile ``config`` for ``sm_<cc>`` without a GPU, with the launch options of the launchers
    (:func:`~fastrnn.kernels.triton_gpu.configs.launch_options`); returns the compiled kernel
    (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata``). Raises under ``TRITON_INTERPRET=1``."""
    from triton.backends.compiler import GPUTarget

    return triton.compile(aot_source(config, cc, aligned), target=GPUTarget("cuda", cc, 32),
                          options=launch_options(config, cc))


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(config, cc, aligned=True):
    """Compile ``config`` for ``sm_<cc>`` (pointer variant ``aligned``, see :func:`aot_source`)
    and read its resources from the cubin.

    Returns a dict: config (name), cc, aligned, REG, STACK (bytes; > 0 means spills), SHARED
    (static shared memory, bytes), metadata_shared (dynamic shared memory the launch requests,
    bytes), shared_limit (bytes), compile_s, triton (the version that compiled it), tanh_approx
    (``tanh.approx.f32`` instructions in its PTX: the fast activations), griddepcontrol (its
    ``griddepcontrol`` instructions: programmatic dependent launch), launch_pdl (whether its
    metadata asks the launcher for it) and before_wait (memory instructions, kernel parameters
    aside, ahead of its first ``griddepcontrol.wait``: what may overlap the previous kernel; 0
    without one).
    """
    import re
    import subprocess
    import tempfile
    import time

    start = time.perf_counter()
    kernel = compile_config(config, cc, aligned)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    found = {key: int(re.search(rf"\b{key}:(\d+)", dump).group(1))
             for key in ("REG", "STACK", "SHARED")}
    ptx = kernel.asm["ptx"]
    head = ptx.split("griddepcontrol.wait")[0] if "griddepcontrol.wait" in ptx else ""
    return dict(config=config.name, cc=cc, aligned=aligned, **found,
                metadata_shared=int(kernel.metadata.shared), shared_limit=ARCH_SHARED[cc],
                compile_s=round(seconds, 2), triton=triton.__version__,
                tanh_approx=ptx.count("tanh.approx.f32"),
                griddepcontrol=ptx.count("griddepcontrol."),
                launch_pdl=bool(getattr(kernel.metadata, "launch_pdl", False)),
                before_wait=len(re.findall(  # predicated or not, kernel parameters aside
                    r"^\s*(?:@!?%p\w*\s+)?(?:ld|st|atom|red|cp|ldmatrix|stmatrix)\.(?!param)",
                    head, flags=re.M)))


def fits(row):
    """Whether a :func:`resource_usage` row runs on its arch: no spills, at most
    :data:`MAX_REGISTERS` registers, dynamic shared memory within the arch's opt-in limit."""
    return (row["STACK"] == 0 and 0 < row["REG"] <= MAX_REGISTERS
            and row["metadata_shared"] <= row["shared_limit"])


def pdl_as_launched(config, row):
    """Whether a :func:`resource_usage` row of ``config`` has programmatic dependent launch
    exactly where the launchers use it (:func:`~fastrnn.kernels.triton_gpu.configs.
    programmatic_launch`): there one ``griddepcontrol.wait`` and one ``.launch_dependents``, no
    memory access before the wait (it could see the previous pass unfinished) and the launch
    flag in the metadata; elsewhere neither."""
    if programmatic_launch(config, row["cc"]):
        return (row["griddepcontrol"], row["launch_pdl"], row["before_wait"]) == (2, True, 0)
    return (row["griddepcontrol"], row["launch_pdl"]) == (0, False)


def blocks_per_sm(row, num_warps):
    """How many programs of a :func:`resource_usage` row (compiled with ``num_warps`` warps) one
    SM holds at once: registers (65536 per SM, allocated per warp in units of 256) and shared
    memory (the arch's opt-in limit per block plus the 1 KB the driver reserves per block, per
    SM on sm_80-sm_90), at most 32 blocks."""
    per_warp = -(-row["REG"] * 32 // 256) * 256
    by_registers = 65536 // per_warp // num_warps
    by_shared = (row["shared_limit"] + 1024) // (row["metadata_shared"] + 1024)
    return min(by_registers, by_shared, 32)


def _aot_worker():
    """Subprocess entry: reads [[KernelConfig fields, cc, aligned], ...] as JSON on stdin,
    prints one JSON resource dict per line."""
    import json
    import sys

    for fields, cc, aligned in json.load(sys.stdin):
        config = KernelConfig(**fields)
        # Named on stderr first, so that a compiler crash (an abort) says which config it was.
        print(f"compiling {config.name} for sm_{cc} aligned={aligned}", file=sys.stderr,
              flush=True)
        print(json.dumps(resource_usage(config, cc, aligned)), flush=True)


def cases(ccs=tuple(ARCH_SHARED), variants=(True,)):
    """[(config, cc, aligned)]: every configuration the dispatcher can choose on each arch
    (:func:`dispatchable`), in each pointer variant (``aligned`` values; default: the aligned
    variant, the only one the launchers run)."""
    return [(c, cc, aligned) for cc in ccs for c in dispatchable(ARCH_SHARED[cc])
            for aligned in variants]


def aot_resources(work, jobs=2, cache_dir=None, pythonpath=None):
    """Resource usage of every (config, cc, aligned) of ``work``, compiled in ``jobs`` worker
    processes.

    The workers run without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit``
    functions cannot be compiled) and, when ``cache_dir`` is given, with that Triton cache
    (pass a fresh directory to measure cold compile time); ``pythonpath``: a directory put first
    on their ``PYTHONPATH`` (e.g. another Triton version installed with ``pip --target``).
    Returns a list of dicts (see :func:`resource_usage`) in the order of ``work``.
    """
    import dataclasses
    import json
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    work = [[dataclasses.asdict(c), cc, aligned] for c, cc, aligned in work]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    jobs = max(1, jobs)

    def compile_share(share):  # one worker process, run from its own thread: all run at once
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                              input=json.dumps(share), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (rc {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return [json.loads(line) for line in proc.stdout.splitlines()]

    shares = [work[j::jobs] for j in range(jobs)]
    with ThreadPoolExecutor(jobs) as pool:
        rows = [row for share in pool.map(compile_share, shares) for row in share]
    results = {(row["config"], row["cc"], row["aligned"]): row for row in rows}
    return [results[(KernelConfig(**fields).name, cc, aligned)] for fields, cc, aligned in work]

if __name__ == "__main__":
    _aot_worker()
