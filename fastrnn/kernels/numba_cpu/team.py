"""The threads of the numba loops' multi-threaded plans (:mod:`.launch`): a loop runs on each
thread of torch's own OpenMP team (``GOMP_parallel`` of the OpenMP runtime torch
loaded, called from compiled code: :func:`in_team`), so it shares the threads that torch's and
MKL's parallel regions use instead of fighting them for the cores (torch's workers spin for
milliseconds after each region; a thread of our own pool started then waited behind them at
every barrier: 0.1-0.6x), and a hand-off costs ~2 µs while they spin (a Python thread pool:
60-75 µs). The threads meet at :func:`barrier`s: an int64 counter that each thread increments
once per barrier (an atomic add) and then spins on until all have (acquire loads, the CPU's
pause hint, ``sched_yield`` every :data:`YIELD_EVERY` spins). Linux only (the runtime is found
in /proc/self/maps); elsewhere :data:`AVAILABLE` is False: no plan splits columns, and the row
splits run on :mod:`.launch`'s pool of Python threads."""
from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
import torch
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastrnn.kernels.numba_cpu.jit import _JIT

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
YIELD_EVERY = 4096
# The entry points of the OpenMP runtime, registered for compiled code under these names (a
# runtime other than torch's may be loaded too: numba's, another library's).
_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")


def _openmp_runtime():
    """The OpenMP runtime torch loaded (libgomp, or Intel's / LLVM's, which export the same GNU
    entry points), as a ctypes library, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    found = sorted((not path.startswith(os.path.dirname(torch.__file__)), path) for path in paths
                   if os.path.basename(path).startswith(names))
    for _, path in found:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(lib, name) for name in _SYMBOLS):
            return lib
    return None


def _register():
    lib = _openmp_runtime() if sys.platform.startswith("linux") else None
    if lib is None:
        return False
    for name in _SYMBOLS:
        address = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        binding.add_symbol("fastrnn_" + name, address)
    return True


#: Whether loops can run in torch's OpenMP team.
AVAILABLE = _register()
#: loop -> its compiled launcher in the team, ``launcher(nthreads, group, gemm, *args)`` for
#: ``loop(tid, nthreads, group, gemm, *args)`` (registered by the loops' modules).
LOOPS = {}


def in_team(loop):
    """An intrinsic ``run(code, args)`` for compiled code: ``loop(tid, *args)`` on each thread
    ``tid`` of an OpenMP team of ``args[0]`` (nthreads) threads (the calling thread is tid 0;
    returns when all are done), ``args`` = (nthreads, group, gemm, ...); ``code``: None, or an
    integer literal (a cell's) that a tuple would not keep, passed to the loop after ``args[3]``
    (the time loops': counter, code, ...). Should the runtime give another number of threads, the
    calling thread alone runs the loop (nthreads 1: every barrier passes at once, the rows are
    all its own; the same results)."""
    @intrinsic
    def run(typingctx, code, args):
        def codegen(context, builder, signature, llargs):
            module = builder.module
            i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
            tuple_type = signature.args[1]
            slot = cgutils.alloca_once_value(builder, llargs[1])
            fnty = ir.FunctionType(ir.VoidType(), [i8p])
            outlined = ir.Function(module, fnty, name=module.get_unique_name("fastrnn_team"))
            inner = ir.IRBuilder(outlined.append_basic_block())
            values = inner.load(inner.bitcast(outlined.args[0],
                                              context.get_value_type(tuple_type).as_pointer()))

            def omp(name):
                fn = cgutils.get_or_insert_function(module, ir.FunctionType(i32, []),
                                                    "fastrnn_" + name)
                return inner.sext(inner.call(fn, []), i64)

            # the loop's call spelled out (Numba does not bind a long tuple's star-call), the code
            # as a constant
            rest = [f"args[{i}]" for i in range(2, len(tuple_type))]
            if isinstance(code, types.IntegerLiteral):
                rest.insert(2, str(code.literal_value))
            scope = {"loop": loop}
            exec(f"def body(tid, size, args):\n"
                 f"    if size == args[0]:\n"
                 f"        loop(tid, args[0], args[1], {', '.join(rest)})\n"
                 f"    elif tid == 0:\n"
                 f"        loop(0, 1, args[1], {', '.join(rest)})\n", scope)
            body = scope["body"]

            sig = types.void(types.int64, types.int64, tuple_type)
            compiled = context.compile_subroutine(inner, body, sig)
            context.call_internal_no_propagate(
                inner, compiled.fndesc, sig,
                [omp("omp_get_thread_num"), omp("omp_get_num_threads"), values])
            inner.ret_void()
            parallel = cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), [fnty.as_pointer(), i8p, i32, i32]),
                "fastrnn_GOMP_parallel")
            builder.call(parallel, [outlined, builder.bitcast(slot, i8p),
                                    builder.trunc(builder.extract_value(llargs[1], 0), i32),
                                    ir.Constant(i32, 0)])
            return context.get_dummy_value()
        if not isinstance(code, (types.IntegerLiteral, types.NoneType)):
            return None
        return types.void(code, args), codegen
    return run


@intrinsic
def _atomic_add(typingctx, counter):
    """counter[0] += 1 as one atomic read-modify-write (sequentially consistent)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "seq_cst")
        return context.get_dummy_value()
    return types.void(counter), codegen


@intrinsic
def _atomic_load(typingctx, counter):
    """counter[0], an acquire load (what the other threads wrote before their add is seen)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.load_atomic(data, "acquire", 8)
    return types.int64(counter), codegen


@intrinsic
def _relax(typingctx, give_way):
    """The CPU's spin-wait hint (x86 ``pause``), then (Linux) ``sched_yield()`` where
    ``give_way``."""
    def codegen(context, builder, signature, args):
        module = builder.module
        if _X86:
            builder.call(cgutils.get_or_insert_function(
                module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"), [])
        if sys.platform.startswith("linux"):
            with builder.if_then(args[0]):
                builder.call(cgutils.get_or_insert_function(
                    module, ir.FunctionType(ir.IntType(32), []), "sched_yield"), [])
        return context.get_dummy_value()
    return types.void(types.boolean), codegen


@njit(inline="always", **_JIT)
def barrier(counter, arrivals):
    """Arrive at the barrier that is complete when ``counter[0]`` (int64 (≥1,), zero when the call
    starts) reaches ``arrivals`` (= threads × barriers passed so far, this one included), and wait
    for it."""
    _atomic_add(counter)
    spins = 0
    while _atomic_load(counter) < arrivals:
        spins += 1
        _relax(spins % YIELD_EVERY == 0)


def new_counter(split):
    """A fresh barrier counter for one call: (8,) int64 zeros (a cache line) when ``split``, else
    the shared (0,) array that says the loops run without barriers."""
    return np.zeros(8, np.int64) if split else _NONE


_NONE = np.zeros(0, np.int64)
