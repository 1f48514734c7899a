"""Numba CPU kernels: the whole time loop of rnn_tanh / rnn_relu / lstm (optionally projected) / gru,
forward and hand-written BPTT, compiled with Numba (float32 and float64).

Implements the kernel contract of :mod:`fastrnn.reference` (:func:`recurrence_forward`,
:func:`recurrence_backward`). Layout and design:

* Packed layout throughout: step t owns rows ``offsets[t] : offsets[t] + batch_sizes[t]`` of xg / y;
  at step t only the rows ``b < batch_sizes[t]`` are computed (no padding, no masks). The loop runs
  over the steps in *processing order* (``T-1 … 0`` when ``reverse``); the state buffers ``h``/``c``
  (B, ·) always hold each row's latest state, so inactive rows keep theirs.
* Threads (``torch.get_num_threads()`` in all, see :class:`_Plan` and the thresholds below): one
  loop thread whose per-step BLAS call uses them where a step is large; or, for large batches,
  the **batch rows** split over threads (rows are independent sequences), each running the whole
  time loop for its rows: one hand-off per call, no barrier per step. The loops are compiled
  ``nogil`` and run on the calling thread plus a small pool of Python threads.
* The recurrent matmul of each step, ``acc[rows] = h[rows] @ W`` (W pre-transposed to (K, N)),
  is one call per thread and step of the Fortran BLAS ``sgemm_``/``dgemm_`` that torch exports
  (MKL on x86), called **from the compiled loop** through its address (no Python and no heap
  allocation per step; the address is a runtime argument, so the loops stay cacheable), with
  MKL's thread-local thread count set per call so threads never multiply. Where torch exports no
  BLAS, a Numba micro-kernel takes over: register-blocked (4 rows x 4 k per pass, vectorized over
  the output columns), column-tiled so a weight tile stays in L2 across row groups.
* Gate math is fused after the matmul of each row group, as short loops that each write one
  array (so LLVM vectorizes them). Both dtypes use branch-free activations that vectorize (there
  is no SVML): float32 Eigen's rational tanh, float64 an expm1 of its own (error ~1e-16).
* Forward saves only what BPTT needs, and nothing under inference (``save=False``): activated
  gates (LSTM i,f,g,o; GRU r,z, the n-gate's recurrent part ``h W_hn^T + b_hn``, n) and, for LSTM,
  the cell states. RNN saves nothing (its derivative is read from y). Weight gradients are reduced
  once after the backward loop, as GEMMs over all steps (``torch.mm``), in a fixed order:
  deterministic, no atomics.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
CELL_CODES = {"rnn_tanh": 0, "rnn_relu": 1}

# Floating-point contraction (FMA) only: no reassociation, no finite-math assumptions, so results do
# not depend on vector width and NaN/inf propagate as in torch.
_FASTMATH = {"contract"}
# error_model="numpy": float division by zero gives inf/nan instead of raising, which keeps the
# ZeroDivisionError branch out of the gate loops so they vectorize.
_JIT = dict(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")

# How a call uses torch.get_num_threads() threads (measured on the 2-core machine, module calls,
# where torch's OpenMP workers keep spinning for milliseconds after the input projection and slow
# down a thread of ours on the other core):
# * split the batch rows over threads of ours (each runs the whole time loop for its rows) when the
#   batch has at least PARALLEL_MIN_BATCH rows and the recurrent matmul at least PARALLEL_MIN_WORK
#   multiply-adds (T*B*G*H*P) in all: LSTM T=200 B=64 H=128 training 1.1x one thread (torch's
#   spinning workers take most of the second core: without them, 1.6x);
# * else run one loop thread and let its per-step BLAS call use torch's threads (MKL runs them on
#   torch's own OpenMP team) when the recurrent weights take at least BLAS_PARALLEL_MIN_WEIGHT_BYTES
#   (more than one core's L2 holds well: each core then streams half) or one step has at least
#   BLAS_PARALLEL_MIN_STEP_WORK multiply-adds (B*G*H*P): LSTM B=1 H=512 2.0x, B=1 H=256 1.2x,
#   B=8 H=512 1.5x faster than one thread; compute-bound steps of up to 1M multiply-adds with
#   cache-resident weights lost (RNN B=64 H=128 0.5x, LSTM B=64 H=32 0.7x);
# * else one thread.
PARALLEL_MIN_BATCH = 32
PARALLEL_MIN_WORK = 250_000_000
BLAS_PARALLEL_MIN_WEIGHT_BYTES = 1 << 20
BLAS_PARALLEL_MIN_STEP_WORK = 4_000_000
# Rows dealt to a thread at a time (the matmul micro-kernel handles 4 rows per pass).
ROW_GROUP = 4
# Bytes of a weight column tile kept in L2 (2 MiB per core here) while all row groups of a thread
# stream through it.
WEIGHT_TILE_BYTES = 1 << 20


# --------------------------------------------------------------------------- activations
# There is no SVML in Numba here, so np.tanh / np.exp are scalar library calls that keep a loop
# from vectorizing (float64 LSTM gates: 8 ns an element). Both dtypes use branch-free formulas
# instead, which LLVM vectorizes; NaN propagates as in torch, +-inf saturate.
def _tanh(x):
    """tanh for jitted code: Eigen's rational approximation in float32 (~2e-7), float64 through
    expm1 (error ~1e-16)."""
    raise NotImplementedError  # replaced by the overload below inside jitted code


def _sigmoid(x):
    """sigmoid for jitted code: 0.5 tanh(x/2) + 0.5 in float32; 1 / (1 + e^-x) through expm1
    in float64 (full relative precision, also for x << 0)."""
    raise NotImplementedError


_F32 = np.float32
# Eigen's float32 tanh: odd/even polynomial ratio on x clamped to [-c, c] (where it reaches 1).
_T_CLAMP = _F32(7.90531110763549805)
_A1, _A3, _A5, _A7 = _F32(4.89352455891786e-03), _F32(6.37261928875436e-04), \
    _F32(1.48572235717979e-05), _F32(5.12229709037114e-08)
_A9, _A11, _A13 = _F32(-8.60467152213735e-11), _F32(2.00018790482477e-13), \
    _F32(-2.76076847742355e-16)
_B0, _B2, _B4, _B6 = _F32(4.89352518554385e-03), _F32(2.26843463243900e-03), \
    _F32(1.18534705686654e-04), _F32(1.19825839466702e-06)
_HALF32 = _F32(0.5)
_TINY32 = _F32(0.0004)


def _tanh_f32(x):
    ax = x if x >= 0 else -x
    # clamps written so that NaN passes through (a comparison with NaN is false)
    xc = _T_CLAMP if x > _T_CLAMP else x
    xc = -_T_CLAMP if xc < -_T_CLAMP else xc
    x2 = xc * xc
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = xc * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    r = p / q
    return x if ax < _TINY32 else r


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bits are the int64 ``bits`` (one bitcast: vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # Cody-Waite split
# 1/k! for k = 13 … 2: Taylor series of expm1(r) - r on |r| <= ln2/2 (remainder < 1e-17 r)
_EXPM1_TAYLOR = tuple(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64)))
                      for k in range(13, 1, -1))
_C13, _C12, _C11, _C10, _C9, _C8, _C7, _C6, _C5, _C4, _C3, _C2 = _EXPM1_TAYLOR


@njit(**_JIT)
def _expm1_neg_f64(y):
    """e^y - 1 for y <= 0 (y < -708 is read as -708, where e^y is already below 3e-308), to
    ~1 ulp of the result; NaN gives NaN."""
    y = -708.0 if y < -708.0 else y
    n = np.floor(y * _LOG2E + 0.5)
    n = n if n <= 0.0 else 0.0  # NaN -> 0 (the result is NaN through r anyway)
    r = (y - n * _LN2_HI) - n * _LN2_LO
    q = r * _C13 + _C12
    q = r * q + _C11
    q = r * q + _C10
    q = r * q + _C9
    q = r * q + _C8
    q = r * q + _C7
    q = r * q + _C6
    q = r * q + _C5
    q = r * q + _C4
    q = r * q + _C3
    q = r * q + _C2
    q = r + r * r * q  # expm1(r)
    scale = _f64_from_bits((np.int64(n) + 1023) << 52)  # 2^n
    return scale * q + (scale - 1.0)  # 2^n (1 + q) - 1, exact in q when n = 0


def _tanh_f64(x):
    e = _expm1_neg_f64(-2.0 * (x if x >= 0 else -x))
    t = -e / (2.0 + e)
    return t if x >= 0 else -t


def _sigmoid_f64(x):
    e = _expm1_neg_f64(x if x <= 0 else -x)  # e^-|x| - 1
    return (1.0 / (2.0 + e)) if x >= 0 else (1.0 + e) / (2.0 + e)


@overload(_tanh, jit_options=dict(fastmath=_FASTMATH, error_model="numpy"))
def _tanh_overload(x):
    return _tanh_f32 if x == types.float32 else _tanh_f64


@overload(_sigmoid, jit_options=dict(fastmath=_FASTMATH, error_model="numpy"))
def _sigmoid_overload(x):
    if x == types.float32:
        def sigmoid_f32(x):
            return _HALF32 * _tanh(_HALF32 * x) + _HALF32
        return sigmoid_f32
    return _sigmoid_f64


# --------------------------------------------------------------------------- vector width
def _host_cpu():
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


# LLVM vectorizes with 256-bit vectors on every AVX-512 CPU unless a function asks for 512 (the
# attribute clang's -mprefer-vector-width=512 sets): on the first AVX-512 cores (Skylake-SP to
# Cooper Lake) 512-bit code lowered the clock. Newer ones do not, and there our loops ask for it:
# measured on Emerald Rapids, the activations run 1.2x (float32) and 1.5x (float64) faster.
WIDE_VECTORS = _host_cpu() not in ("skylake-avx512", "cascadelake", "cooperlake")


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit vectors where the CPU has them (no
    code: it sets the function attribute ``prefer-vector-width``, which llvmlite's attribute set
    does not list, hence the plain set.add)."""
    def codegen(context, builder, signature, args):
        if WIDE_VECTORS:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.void(), codegen


# --------------------------------------------------------------------------- BLAS from compiled code
_TORCH_CPU_LIBRARY = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def _find_blas():
    """Addresses of the Fortran ``sgemm_``/``dgemm_`` torch links (MKL on x86 builds) and
    MKL's ``mkl_set_num_threads_local``, or None where torch exports no such symbols."""
    try:
        lib = ctypes.CDLL(_TORCH_CPU_LIBRARY)
        addresses = {dt: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for dt, name in ((np.float32, "sgemm_"), (np.float64, "dgemm_"))}
        set_threads = lib.mkl_set_num_threads_local
    except (OSError, AttributeError):
        return None, None
    # The exported symbol is MKL's Fortran interface (same address as the trailing-underscore
    # name): the thread count is passed by reference.
    set_threads.argtypes, set_threads.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int

    def set_threads_local(count):
        return set_threads(ctypes.byref(ctypes.c_int(count)))
    return addresses, set_threads_local


_GEMM, _MKL_SET_THREADS_LOCAL = _find_blas()


def _find_omatcopy():
    """MKL's out-of-place transposes ``MKL_Somatcopy``/``MKL_Domatcopy`` (C interface, by value)
    as ctypes functions per numpy dtype, or None where torch exports no such symbols."""
    size, ptr, char = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char
    found = {}
    try:
        lib = ctypes.CDLL(_TORCH_CPU_LIBRARY)
        for dt, name, alpha in ((np.float32, "MKL_Somatcopy", ctypes.c_float),
                                (np.float64, "MKL_Domatcopy", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.argtypes = [char, char, size, size, alpha, ptr, size, ptr, size]
            fn.restype = None
            found[np.dtype(dt)] = fn
    except (OSError, AttributeError):
        return None
    return found


# The recurrent weights (G*H, P) are transposed once per forward call for the step GEMM; MKL's
# transpose is 1.8-2.8x faster than torch's copy (2048x512: 0.60 vs 1.09 ms; 512x128: 18 vs 51 µs).
_OMATCOPY = _find_omatcopy()
# Use BLAS gemm (called from the compiled loop: no Python per step) for the recurrent matmul where
# torch exports it; the Numba micro-kernel below is the fallback.
USE_BLAS = _GEMM is not None


@intrinsic
def _call_gemm(typingctx, fn, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran gemm at address ``fn`` with 13 pointer arguments (all int64 addresses).
    The address is a runtime value, so functions using this stay cacheable."""
    sig = types.void(*([types.int64] * 14))

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [ptr] * 13)
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(callee, [builder.inttoptr(x, ptr) for x in args[1:]])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _stack_array(typingctx, size, dtype):
    """A pointer to ``size`` (a literal int) uninitialized elements of ``dtype`` on the calling
    function's stack: scratch without a heap allocation (wrap it with ``numba.carray``)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count, item = size.literal_value, dtype.dtype

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(item),
                                   size=context.get_constant(types.intp, count))
    return types.CPointer(item)(size, dtype), codegen


@njit(**_JIT)
def _gemm_rows(gemm, acc, ai, a, bi, nrows, w, overwrite):
    """acc[ai:ai+nrows, :N] (+)= a[bi:bi+nrows, :K] @ w (w: (K, N); ``overwrite``: =, acc is not
    read) through the Fortran gemm at address ``gemm``: column-major, so it computes
    acc^T += w^T a^T with no transposes. The by-reference scalars live on the stack (a heap
    allocation per step cost 0.1 µs each)."""
    k_total, n_total = w.shape
    ints = carray(_stack_array(6, np.int32), 6)
    ints[0], ints[1], ints[2] = n_total, nrows, k_total
    ints[3], ints[4], ints[5] = n_total, a.shape[1], acc.shape[1]
    trans = carray(_stack_array(1, np.uint8), 1)
    trans[0] = 78  # 'N'
    one = carray(_stack_array(2, w.dtype), 2)
    one[0] = 1
    one[1] = 0 if overwrite else 1  # beta
    ip = np.int64(ints.ctypes.data)
    item = np.int64(4)
    _call_gemm(gemm, np.int64(trans.ctypes.data), np.int64(trans.ctypes.data), ip, ip + item,
               ip + 2 * item, np.int64(one.ctypes.data), np.int64(w.ctypes.data), ip + 3 * item,
               np.int64(a.ctypes.data) + np.int64(bi * a.strides[0]), ip + 4 * item,
               np.int64(one.ctypes.data) + np.int64(w.itemsize),
               np.int64(acc.ctypes.data) + np.int64(ai * acc.strides[0]),
               ip + 5 * item)


# --------------------------------------------------------------------------- matmul micro-kernels
@njit(**_JIT)
def _rows4(acc, ai, a, bi, w, j0, j1):
    """acc[ai+r, j0:j1] += a[bi+r, :K] @ w[:K, j0:j1] for r = 0..3 (w: (K, N))."""
    _prefer_wide_vectors()
    k_total = w.shape[0]
    n = j1 - j0
    c0, c1, c2, c3 = acc[ai, j0:j1], acc[ai + 1, j0:j1], acc[ai + 2, j0:j1], acc[ai + 3, j0:j1]
    x0, x1, x2, x3 = a[bi], a[bi + 1], a[bi + 2], a[bi + 3]
    k = 0
    while k + 4 <= k_total:
        a00, a01, a02, a03 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
        a10, a11, a12, a13 = x1[k], x1[k + 1], x1[k + 2], x1[k + 3]
        a20, a21, a22, a23 = x2[k], x2[k + 1], x2[k + 2], x2[k + 3]
        a30, a31, a32, a33 = x3[k], x3[k + 1], x3[k + 2], x3[k + 3]
        w0, w1, w2, w3 = w[k, j0:j1], w[k + 1, j0:j1], w[k + 2, j0:j1], w[k + 3, j0:j1]
        for j in range(n):
            v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
            c0[j] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
            c1[j] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
            c2[j] += a20 * v0 + a21 * v1 + a22 * v2 + a23 * v3
            c3[j] += a30 * v0 + a31 * v1 + a32 * v2 + a33 * v3
        k += 4
    while k < k_total:
        a00, a10, a20, a30 = x0[k], x1[k], x2[k], x3[k]
        w0 = w[k, j0:j1]
        for j in range(n):
            v0 = w0[j]
            c0[j] += a00 * v0
            c1[j] += a10 * v0
            c2[j] += a20 * v0
            c3[j] += a30 * v0
        k += 1


@njit(**_JIT)
def _rows2(acc, ai, a, bi, w, j0, j1):
    """acc[ai+r, j0:j1] += a[bi+r, :K] @ w[:K, j0:j1] for r = 0, 1."""
    _prefer_wide_vectors()
    k_total = w.shape[0]
    n = j1 - j0
    c0, c1 = acc[ai, j0:j1], acc[ai + 1, j0:j1]
    x0, x1 = a[bi], a[bi + 1]
    k = 0
    while k + 4 <= k_total:
        a00, a01, a02, a03 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
        a10, a11, a12, a13 = x1[k], x1[k + 1], x1[k + 2], x1[k + 3]
        w0, w1, w2, w3 = w[k, j0:j1], w[k + 1, j0:j1], w[k + 2, j0:j1], w[k + 3, j0:j1]
        for j in range(n):
            v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
            c0[j] += a00 * v0 + a01 * v1 + a02 * v2 + a03 * v3
            c1[j] += a10 * v0 + a11 * v1 + a12 * v2 + a13 * v3
        k += 4
    while k < k_total:
        a00, a10 = x0[k], x1[k]
        w0 = w[k, j0:j1]
        for j in range(n):
            v0 = w0[j]
            c0[j] += a00 * v0
            c1[j] += a10 * v0
        k += 1


@njit(**_JIT)
def _rows1(acc, ai, a, bi, w, j0, j1):
    """acc[ai, j0:j1] += a[bi, :K] @ w[:K, j0:j1]."""
    _prefer_wide_vectors()
    k_total = w.shape[0]
    n = j1 - j0
    c0 = acc[ai, j0:j1]
    x0 = a[bi]
    k = 0
    while k + 4 <= k_total:
        a00, a01, a02, a03 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
        w0, w1, w2, w3 = w[k, j0:j1], w[k + 1, j0:j1], w[k + 2, j0:j1], w[k + 3, j0:j1]
        for j in range(n):
            c0[j] += a00 * w0[j] + a01 * w1[j] + a02 * w2[j] + a03 * w3[j]
        k += 4
    while k < k_total:
        a00 = x0[k]
        w0 = w[k, j0:j1]
        for j in range(n):
            c0[j] += a00 * w0[j]
        k += 1


@njit(**_JIT)
def _matmul_rows(acc, acc_base, a, a_base, w, tid, nthreads, group, rows, gemm, overwrite):
    """For this thread's rows ``b < rows`` (groups of ``group`` dealt round-robin over
    ``nthreads``): ``acc[acc_base + b, :N] += a[a_base + b, :K] @ w`` with w: (K, N), or ``=``
    when ``overwrite`` (acc's old values are not read).

    ``gemm``: address of a Fortran BLAS gemm of w's dtype (one call per row group), or 0 for the
    Numba micro-kernel, column-tiled so one (K, tile) slice of w stays in cache across all the
    thread's row groups."""
    if gemm != 0:
        g0 = tid * group
        while g0 < rows:
            g1 = min(g0 + group, rows)
            _gemm_rows(gemm, acc, acc_base + g0, a, a_base + g0, g1 - g0, w, overwrite)
            g0 += nthreads * group
        return
    k_total, n_total = w.shape
    if overwrite:
        g0 = tid * group
        while g0 < rows:
            for b in range(g0, min(g0 + group, rows)):
                acc[acc_base + b, :n_total] = 0
            g0 += nthreads * group
    tile = WEIGHT_TILE_BYTES // max(1, k_total * w.itemsize)
    tile = max(64, tile - tile % 16)
    for j0 in range(0, n_total, tile):
        j1 = min(n_total, j0 + tile)
        g0 = tid * group
        while g0 < rows:
            g1 = min(g0 + group, rows)
            b = g0
            while b + 4 <= g1:
                _rows4(acc, acc_base + b, a, a_base + b, w, j0, j1)
                b += 4
            if b + 2 <= g1:
                _rows2(acc, acc_base + b, a, a_base + b, w, j0, j1)
                b += 2
            if b < g1:
                _rows1(acc, acc_base + b, a, a_base + b, w, j0, j1)
            g0 += nthreads * group


# --------------------------------------------------------------------------- time loops
# How the pointwise work is written (each choice measured here, LSTM/GRU rows of H = 32 … 128):
# * rows are indexed in the 2-D arrays (``a[r, j]``), never taken as row views: a view costs a
#   reference-count increment and decrement per row (atomics), which was 6x the LSTM backward's
#   arithmetic at H = 32;
# * each loop writes one array and never reads the array it writes at another offset, so LLVM
#   vectorizes it with a few runtime alias checks (a loop writing several arrays stayed scalar,
#   4x slower on the LSTM gates);
# * constants are of the array's dtype (``_one``): an int literal would promote float32 to float64.
#
# Arguments shared by the loops: ``order`` (T,) steps in processing order, ``offsets``/``sizes``
# (T,) packed row offset and batch size of each step; (tid, nthreads, group) pick this thread's
# rows. Forward: ``save`` keeps what backward needs (training); without it (inference) the
# pre-activations go to the per-row scratch ``acc`` instead of the saved ``gates``.
# Backward: ``prev`` (N,) is the packed row of each row's previous state in processing order, or
# -1 - b when it is the initial state h0[b] / c0[b]; ``dh``/``dc`` (B, ·) carry the gradient
# w.r.t. each row's current state: on entry grad_h_n / grad_c_n, on exit d_h0 / d_c0.

def _one(a):
    """1 in the dtype of array ``a``, for jitted code."""
    raise NotImplementedError  # replaced by the overload below inside jitted code


@overload(_one, jit_options=dict(fastmath=_FASTMATH))
def _one_overload(a):
    if a.dtype == types.float32:
        return lambda a: np.float32(1)
    return lambda a: np.float64(1)


@njit(**_JIT)
def _thread_rows(tid, nthreads, group, batch):
    """The batch rows of thread ``tid``, ascending: groups of ``group`` rows dealt round-robin over
    ``nthreads``. At a step with ``rows`` active rows, a thread's active rows are a prefix."""
    count = 0
    for b in range(batch):
        if (b // group) % nthreads == tid:
            count += 1
    mine = np.empty(count, np.int64)
    count = 0
    for b in range(batch):
        if (b // group) % nthreads == tid:
            mine[count] = b
            count += 1
    return mine


@njit(**_JIT)
def _rnn_forward_thread(tid, nthreads, group, gemm, relu, xg, bias, h, w_t, y, order, offsets,
                        sizes):
    _prefer_wide_vectors()
    hidden = h.shape[1]
    zero = _one(y) - _one(y)
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        _matmul_rows(y, off, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if relu:
                for u in range(hidden):
                    v = y[q, u] + (xg[q, u] + bias[u])
                    y[q, u] = zero if v <= zero else v  # NaN passes through, as in torch.relu
            else:
                for u in range(hidden):
                    y[q, u] = _tanh(y[q, u] + (xg[q, u] + bias[u]))
            for u in range(hidden):
                h[b, u] = y[q, u]


@njit(**_JIT)
def _lstm_forward_thread(tid, nthreads, group, gemm, save, xg, bias, h, c, w_t, wr_t, has_proj, y,
                         gates, c_all, acc, m, order, offsets, sizes):
    _prefer_wide_vectors()
    hidden = c.shape[1]
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    out = m if has_proj else y  # o tanh(c): the projection's input, or the output itself
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        a, base = (gates, off) if save else (acc, 0)
        _matmul_rows(a, base, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            r, q = base + b, off + b
            o = b if has_proj else q
            for j in range(2 * hidden):  # i, f
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):  # g (a loop from a nonzero start stayed scalar: 8x slower)
                j = 2 * hidden + u
                a[r, j] = _tanh(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):  # o
                j = 3 * hidden + u
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):
                c[b, u] = a[r, hidden + u] * c[b, u] + a[r, u] * a[r, 2 * hidden + u]
            for u in range(hidden):
                out[o, u] = a[r, 3 * hidden + u] * _tanh(c[b, u])
            if save:
                for u in range(hidden):
                    c_all[q, u] = c[b, u]
            if not has_proj:
                for u in range(hidden):
                    h[b, u] = y[q, u]
        if has_proj:
            _matmul_rows(y, off, m, 0, wr_t, tid, nthreads, group, rows, gemm, True)
            for b in mine:
                if b >= rows:
                    break
                for k in range(h.shape[1]):
                    h[b, k] = y[off + b, k]


@njit(**_JIT)
def _gru_forward_thread(tid, nthreads, group, gemm, save, xg, bias, h, w_t, b_hn, y, gates, acc,
                        order, offsets, sizes):
    """Row of ``a`` after a step: (r, z, hn = h W_hn^T + b_hn, n), the saved gates."""
    _prefer_wide_vectors()
    hidden = h.shape[1]
    mine = _thread_rows(tid, nthreads, group, h.shape[0])
    for p in range(order.shape[0]):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        a, base = (gates, off) if save else (acc, 0)
        _matmul_rows(a, base, h, 0, w_t, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            r, q = base + b, off + b
            for j in range(2 * hidden):  # r, z
                a[r, j] = _sigmoid(a[r, j] + (xg[q, j] + bias[j]))
            for u in range(hidden):
                a[r, 2 * hidden + u] += b_hn[u]
            for u in range(hidden):  # n, kept in y until the update
                j = 2 * hidden + u
                y[q, u] = _tanh((xg[q, j] + bias[j]) + a[r, u] * a[r, j])
            if save:
                for u in range(hidden):
                    a[r, 3 * hidden + u] = y[q, u]
            for u in range(hidden):
                n = y[q, u]
                y[q, u] = n + a[r, hidden + u] * (h[b, u] - n)
            for u in range(hidden):
                h[b, u] = y[q, u]


@njit(**_JIT)
def _rnn_backward_thread(tid, nthreads, group, gemm, relu, grad_y, y, w, dh, d_xg, order, offsets,
                         sizes):
    _prefer_wide_vectors()
    hidden = dh.shape[1]
    one = _one(dh)
    zero = one - one
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if relu:
                for u in range(hidden):
                    d_xg[q, u] = (dh[b, u] + grad_y[q, u]) if y[q, u] > zero else zero
            else:
                for u in range(hidden):
                    d_xg[q, u] = (dh[b, u] + grad_y[q, u]) * (one - y[q, u] * y[q, u])
        _matmul_rows(dh, 0, d_xg, off, w, tid, nthreads, group, rows, gemm, True)


@njit(**_JIT)
def _lstm_backward_thread(tid, nthreads, group, gemm, grad_y, c0, w, wr, has_proj, gates, c_all, dh,
                          dc, dm, d_xg, dy_all, m_all, tc, prev, order, offsets, sizes):
    """``dm`` (B, H): gradient w.r.t. o tanh(c); ``tc``: tanh(c) of the step (per batch row, or
    per packed row in ``m_all`` with a projection, which then holds m = o tanh(c) for d_w_hr)."""
    _prefer_wide_vectors()
    hidden = dc.shape[1]
    one = _one(dc)
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    tanh_c = m_all if has_proj else tc
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            if has_proj:  # carry + grad_y, kept per packed row for d_w_hr; dm = that @ w_hr
                for k in range(dh.shape[1]):
                    dy_all[q, k] = dh[b, k] + grad_y[q, k]
            else:
                for u in range(hidden):
                    dm[b, u] = dh[b, u] + grad_y[q, u]
        if has_proj:
            _matmul_rows(dm, 0, dy_all, off, wr, tid, nthreads, group, rows, gemm, True)
        for b in mine:
            if b >= rows:
                break
            q = off + b
            tr = q if has_proj else b
            pr = prev[q]
            c_prev, cr = (c_all, pr) if pr >= 0 else (c0, -1 - pr)
            for u in range(hidden):
                tanh_c[tr, u] = _tanh(c_all[q, u])
            for u in range(hidden):
                o, tcu = gates[q, 3 * hidden + u], tanh_c[tr, u]
                dc[b, u] += dm[b, u] * o * (one - tcu * tcu)
            for u in range(hidden):  # d o
                o = gates[q, 3 * hidden + u]
                d_xg[q, 3 * hidden + u] = dm[b, u] * tanh_c[tr, u] * o * (one - o)
            for u in range(hidden):  # d i
                i = gates[q, u]
                d_xg[q, u] = dc[b, u] * gates[q, 2 * hidden + u] * i * (one - i)
            for u in range(hidden):  # d f
                f = gates[q, hidden + u]
                d_xg[q, hidden + u] = dc[b, u] * c_prev[cr, u] * f * (one - f)
            for u in range(hidden):  # d g
                g = gates[q, 2 * hidden + u]
                d_xg[q, 2 * hidden + u] = dc[b, u] * gates[q, u] * (one - g * g)
            for u in range(hidden):
                dc[b, u] *= gates[q, hidden + u]
            if has_proj:
                for u in range(hidden):
                    m_all[q, u] *= gates[q, 3 * hidden + u]
        _matmul_rows(dh, 0, d_xg, off, w, tid, nthreads, group, rows, gemm, True)


@njit(**_JIT)
def _gru_backward_thread(tid, nthreads, group, gemm, grad_y, h0, y, w, gates, dh, d_xg, d_hn, dg,
                         prev, order, offsets, sizes):
    """``gates`` rows (r, z, hn, n); ``d_hn`` (N, H) receives the gradient w.r.t.
    hn = h W_hn^T + b_hn; ``dg`` (B, 3H) is the step's gradient w.r.t. (h W_hr^T, h W_hz^T, hn),
    the left operand of the step's matmul (scratch: an (N, 3H) copy would cost a fresh 3H per
    row)."""
    _prefer_wide_vectors()
    hidden = dh.shape[1]
    one = _one(dh)
    mine = _thread_rows(tid, nthreads, group, dh.shape[0])
    for p in range(order.shape[0] - 1, -1, -1):
        t = order[p]
        rows, off = sizes[t], offsets[t]
        for b in mine:
            if b >= rows:
                break
            q = off + b
            pr = prev[q]
            h_prev, hr = (y, pr) if pr >= 0 else (h0, -1 - pr)
            for u in range(hidden):
                dh[b, u] += grad_y[q, u]
            for u in range(hidden):  # d n
                z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_xg[q, 2 * hidden + u] = dh[b, u] * (one - z) * (one - n * n)
            for u in range(hidden):  # d r
                r, z, n = gates[q, u], gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_xg[q, u] = (dh[b, u] * (one - z) * (one - n * n) * gates[q, 2 * hidden + u]
                              * r * (one - r))
            for u in range(hidden):  # d z
                z = gates[q, hidden + u]
                d_xg[q, hidden + u] = (dh[b, u] * (h_prev[hr, u] - gates[q, 3 * hidden + u])
                                       * z * (one - z))
            for j in range(2 * hidden):
                dg[b, j] = d_xg[q, j]
            for u in range(hidden):
                z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
                d_hn[q, u] = dh[b, u] * (one - z) * (one - n * n) * gates[q, u]
            for u in range(hidden):
                dg[b, 2 * hidden + u] = d_hn[q, u]
            for u in range(hidden):
                dh[b, u] *= gates[q, hidden + u]
        _matmul_rows(dh, 0, dg, 0, w, tid, nthreads, group, rows, gemm, False)


@njit(**_JIT)
def _previous_rows(order, offsets, sizes, prev):
    """prev[offsets[t] + b] = packed row of row b's state before step t (the row it had at the
    previous step in processing order), or -1 - b where that is the initial state."""
    for p in range(order.shape[0]):
        t = order[p]
        off = offsets[t]
        if p == 0:
            for b in range(sizes[t]):
                prev[off + b] = -1 - b
        else:
            tp = order[p - 1]
            for b in range(sizes[t]):
                prev[off + b] = offsets[tp] + b if b < sizes[tp] else -1 - b


@njit(**_JIT)
def _gather_rows(src, init, prev, out):
    """out[n] = src[prev[n]] if prev[n] >= 0 else init[-1 - prev[n]] (out: (N, P))."""
    _prefer_wide_vectors()
    for n in range(prev.shape[0]):
        pr = prev[n]
        rows, row = (src, pr) if pr >= 0 else (init, -1 - pr)
        for k in range(out.shape[1]):
            out[n, k] = rows[row, k]


# --------------------------------------------------------------------------- launchers
def why_not(cell, device, dtype, proj_size=0):
    """Why this backend cannot run ``cell`` on ``device``/``dtype``, or None if it can."""
    if cell not in CELLS:
        return f"unknown cell {cell!r}; expected one of {CELLS}"
    if torch.device(device).type != "cpu":
        return f"numba runs on CPU tensors only, got a {torch.device(device).type} tensor"
    if dtype not in (torch.float32, torch.float64):
        return f"numba supports float32 and float64, got {dtype}"
    if proj_size and cell != "lstm":
        return f"proj_size is supported for lstm only, got {cell}"
    return None


_POOL = None
_POOL_LOCK = threading.Lock()
# CPUs this process may run on (the affinity mask, as torch counts them).
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Plan(NamedTuple):
    """How one call runs: the steps (``order``, ``offsets``, ``sizes``: int64 (T,)) and the threads
    (``nthreads`` loop threads splitting the rows in groups of ``group``; ``blas_threads`` threads
    for each BLAS call, 0 for MKL's global setting, which is torch's thread count)."""

    order: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    nthreads: int
    group: int
    blas_threads: int
    rows: int  # N = sum(sizes), rows of the packed layout


def _run(loop, plan, gemm, *args):
    """Run ``loop(tid, nthreads, group, gemm, *args)`` for tid = 0 … nthreads-1 of ``plan``: tid 0
    on the calling thread, the others on a persistent pool of Python threads (the loops are
    compiled ``nogil``, each owns its rows for the whole sequence: one hand-off per call, no
    barrier per step). Each thread's BLAS calls use ``plan.blas_threads`` threads (MKL's
    thread-local setting), so threads never multiply."""
    global _POOL
    nthreads, group = plan.nthreads, plan.group
    if nthreads == 1:
        _run_one(loop, 0, plan, gemm, args)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < nthreads - 1:
            _POOL = ThreadPoolExecutor(max_workers=nthreads - 1, thread_name_prefix="fastrnn-numba")
        pool = _POOL
    futures = [pool.submit(_run_one, loop, tid, plan, gemm, args) for tid in range(1, nthreads)]
    try:
        _run_one(loop, 0, plan, gemm, args)
    finally:
        for future in futures:
            future.result()


def _run_one(loop, tid, plan, gemm, args):
    if gemm and plan.blas_threads and _MKL_SET_THREADS_LOCAL is not None:
        previous = _MKL_SET_THREADS_LOCAL(plan.blas_threads)
        try:
            loop(tid, plan.nthreads, plan.group, gemm, *args)
        finally:
            _MKL_SET_THREADS_LOCAL(previous)
    else:
        loop(tid, plan.nthreads, plan.group, gemm, *args)


def _gemm_address(dtype):
    """Address of the BLAS gemm for ``dtype`` (torch dtype) when :data:`USE_BLAS`, else 0."""
    if not USE_BLAS:
        return 0
    return _GEMM[np.float32 if dtype == torch.float32 else np.float64]


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_NUMPY_DTYPES = {t: n for n, t in _TORCH_DTYPES.items()}
_NUMPY_ALLOC_MAX_BYTES = 1 << 20
_ALIGN = 64
_NUMPY_TRANSPOSE_MAX_NUMEL = 1 << 13


def _alloc(shape, dtype):
    """Uninitialized float buffer for outputs and scratch, 64-byte aligned (MKL's gemm ran 1.7x
    slower per step on a 16-byte aligned weight, B=1 H=128). Every element is written before it
    is read (tests replace this with a NaN-filled allocator to prove it). Small ones from numpy
    (under 1 µs, a third of a torch tensor's cost: it counts at small sizes, where a call
    allocates five). Large ones from torch: numpy asks the kernel for transparent huge pages on
    large arrays, and here a first touch of those stalled now and then in page compaction (GRU
    training T=1000 B=64 H=128: 2 calls in 3 took 1.9x longer)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes >= _NUMPY_ALLOC_MAX_BYTES:
        return torch.empty(shape, dtype=_TORCH_DTYPES[dtype]).numpy()
    if nbytes == 0:  # an argument the loop does not use
        return np.empty(shape, dtype)
    count = nbytes // dtype.itemsize
    raw = np.empty(count + _ALIGN // dtype.itemsize, dtype)
    start = _aligned_start(raw)
    return raw[start:start + count].reshape(shape)


@njit(**_JIT)
def _aligned_start(a):
    """The first index of 1-D ``a`` at a 64-byte boundary (a jitted call: 4x faster than reading
    the address through numpy's ctypes)."""
    return (-a.ctypes.data % 64) // a.itemsize


def _owned(tensor):
    """A C-contiguous, aligned numpy array owning a copy of ``tensor`` (a state the loop updates
    in place)."""
    out = _alloc(tuple(tensor.shape), _NUMPY_DTYPES[tensor.dtype])
    out[...] = tensor.detach().numpy()
    return out


def _array(tensor):
    """A C-contiguous numpy view (zero copy when already contiguous) of a CPU tensor."""
    return tensor.detach().contiguous().numpy()


def _transposed(tensor):
    """A C-contiguous, aligned numpy copy of ``tensor.t()`` (2-D). Small ones by numpy (3 µs; a
    ctypes call costs 8), large ones by MKL's transpose where torch exports it, else by torch
    (numpy's took 4.4 ms at 2048x512, torch's 1.0 ms, MKL's 0.6 ms)."""
    a = _array(tensor)
    rows, cols = a.shape
    if a.size > _NUMPY_TRANSPOSE_MAX_NUMEL and _OMATCOPY is None:
        return tensor.detach().t().contiguous().numpy()
    out = _alloc((cols, rows), a.dtype)
    if a.size <= _NUMPY_TRANSPOSE_MAX_NUMEL:
        out[...] = a.T
    else:
        _OMATCOPY[a.dtype](b"R", b"T", rows, cols, 1.0, a.ctypes.data, cols, out.ctypes.data,
                           rows)
    return out


@njit(**_JIT)
def _plan_steps(sizes, batch, reverse):
    """(ok, order, offsets) of batch sizes (T,): ok when they are non-increasing, none negative and
    the first equals ``batch``; order (T,) the steps in processing order; offsets (T,) the packed
    row offset of each step."""
    steps = sizes.shape[0]
    order = np.empty(steps, np.int64)
    offsets = np.empty(steps, np.int64)
    ok = steps == 0 or sizes[0] == batch
    total = 0
    for t in range(steps):
        if sizes[t] < 0 or (t > 0 and sizes[t] > sizes[t - 1]):
            ok = False
        offsets[t] = total
        total += sizes[t]
        order[t] = steps - 1 - t if reverse else t
    return ok, order, offsets


def _schedule(batch_sizes, reverse, batch, row_work, itemsize):
    """The :class:`_Plan` of a call whose recurrent matmul costs ``row_work`` multiply-adds per
    row and step (G*H*P, also the number of recurrent weights, of ``itemsize`` bytes).

    Checks the batch sizes (the loops index without bounds checks): non-increasing, the first equal
    to ``batch``, none negative."""
    if isinstance(batch_sizes, torch.Tensor) and batch_sizes.dtype == torch.int64:
        sizes = batch_sizes.contiguous().numpy()
    else:
        sizes = np.ascontiguousarray(np.asarray(batch_sizes), dtype=np.int64)
    ok, order, offsets = _plan_steps(sizes.reshape(-1), batch, reverse)
    if sizes.ndim != 1 or not ok:
        raise ValueError(f"batch_sizes must be non-increasing with batch_sizes[0] = {batch} "
                         f"(rows of h0), got {sizes.tolist()}")
    threads = min(torch.get_num_threads(), _CPUS)
    rows = int(offsets[-1] + sizes[-1]) if len(sizes) else 0
    if threads >= 2 and batch >= PARALLEL_MIN_BATCH and rows * row_work >= PARALLEL_MIN_WORK:
        # BLAS: one contiguous block of rows per thread (one gemm per step); micro-kernel: groups
        # of ROW_GROUP rows dealt round-robin, which balances packed batches.
        group = (ROW_GROUP if batch >= ROW_GROUP * threads and not USE_BLAS
                 else -(-batch // threads))
        return _Plan(order, offsets, sizes, min(threads, -(-batch // group)), group, 1, rows)
    # MKL's global thread count is torch's: leave it (0) on one thread or where BLAS threads pay.
    keep = threads == 1 or (row_work * itemsize >= BLAS_PARALLEL_MIN_WEIGHT_BYTES
                            or batch * row_work >= BLAS_PARALLEL_MIN_STEP_WORK)
    return _Plan(order, offsets, sizes, 1, max(1, batch), 0 if keep else 1, rows)


def _check(cell, xg, h0, c0, w_hh, b_hn, w_hr, n_rows, bias=None):
    """Shapes and dtypes of the forward arguments (the loops index without bounds checks);
    ``n_rows`` = sum(batch_sizes)."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; expected one of {CELLS}")
    dtype = xg.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        raise TypeError(f"numba kernels support float32 and float64, got {dtype}")
    for name, t in (("xg", xg), ("h0", h0), ("c0", c0), ("w_hh", w_hh), ("b_hn", b_hn),
                    ("w_hr", w_hr), ("bias", bias)):
        if t is not None and t.dtype is not dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} like xg")
        if t is not None and not t.is_cpu:
            raise ValueError(f"numba kernels run on CPU tensors, {name} is on {t.device}")
    if (cell == "lstm") != (c0 is not None):
        raise ValueError("c0 is required for lstm and must be None otherwise")
    if w_hr is not None and cell != "lstm":
        raise ValueError("w_hr (projection) is supported for lstm only")
    gates = GATES[cell]
    if w_hh.dim() != 2 or w_hh.shape[0] % gates:
        raise ValueError(f"w_hh must be ({gates}*H, P), got {tuple(w_hh.shape)}")
    hidden, proj = w_hh.shape[0] // gates, w_hh.shape[1]
    if w_hr is None and cell == "lstm" and proj != hidden:
        raise ValueError(f"w_hh is {tuple(w_hh.shape)}: P != H needs w_hr")
    batch = h0.shape[0]
    for name, t, shape in (("xg", xg, (n_rows, gates * hidden)), ("h0", h0, (batch, proj)),
                           ("c0", c0, (batch, hidden)), ("b_hn", b_hn, (hidden,)),
                           ("w_hr", w_hr, (proj, hidden)), ("bias", bias, (gates * hidden,))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _weight_grad(d_pre, y, h0, plan, reverse, prev):
    """``d_pre^T @ h_prev``: a weight gradient summed over all steps (fixed order, no atomics).

    d_pre: (N, K) gradient of each row's pre-activations; h_prev (N, P): the state each row had
    before its step, y's row of the previous step or h0. Dense input (every step B rows) reads y
    in place (two GEMMs: the B first-processed rows against h0, the rest against y shifted one
    step); packed input gathers h_prev (an (N, P) copy)."""
    batch, n_rows = h0.shape[0], d_pre.shape[0]
    sizes = plan.sizes
    if len(sizes) and sizes[-1] == batch:  # dense: step t owns rows t*B … t*B+B-1
        first, rest = (slice(n_rows - batch, n_rows), slice(0, n_rows - batch)) if reverse \
            else (slice(0, batch), slice(batch, n_rows))
        before = slice(batch, n_rows) if reverse else slice(0, n_rows - batch)
        return torch.addmm(d_pre[first].t() @ h0, d_pre[rest].t(), y[before])
    y_a = _array(y)
    h_prev = _alloc((n_rows, h0.shape[1]), y_a.dtype)
    _gather_rows(y_a, _array(h0), prev, h_prev)
    return d_pre.t() @ torch.from_numpy(h_prev)


def recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse, save=True,
                       bias=None):
    """One layer, one direction, whole (possibly packed) sequence (kernel contract of
    :func:`fastrnn.reference.recurrence_forward`).

    xg: (N, G*H); h0: (B, P); c0: (B, H) (lstm) or None; w_hh: (G*H, P); b_hn: (H,) (gru) or None;
    w_hr: (P, H) (lstm with projection) or None; batch_sizes: int64 (T,), non-increasing, B =
    batch_sizes[0], N = sum(batch_sizes); bias: (G*H,) or None, added to every row of xg.
    float32 or float64 CPU tensors, all of one dtype.

    Returns ``(y, h_n, c_n, saved)``: y (N, P), h_n (B, P), c_n (B, H) or None, and ``saved``:
    () for rnn_* and whenever ``save`` is False (no backward follows); (gates (N, 4H) = i, f, g, o
    after activation; c (N, H) cell state after each step) for lstm; (gates (N, 4H) = r, z,
    h W_hn^T + b_hn, n) for gru.
    """
    batch, proj = h0.shape
    plan = _schedule(batch_sizes, reverse, batch, w_hh.shape[0] * proj, w_hh.element_size())
    _check(cell, xg, h0, c0, w_hh, b_hn, w_hr, plan.rows, bias)
    gemm = _gemm_address(xg.dtype)
    hidden = w_hh.shape[0] // GATES[cell]
    xg_a = _array(xg)
    dtype = xg_a.dtype
    b_x = _array(bias) if bias is not None else np.zeros(w_hh.shape[0], dtype)
    n_rows = xg_a.shape[0]
    h = _owned(h0)
    y = _alloc((n_rows, proj), dtype)
    # (K, N) for the matmul; MKL's gemm reading W_hh in place with transa='T' measured 1.7x slower
    # per step (B=8, H=128) than this one copy per call.
    w_t = _transposed(w_hh)
    c_n, saved = None, ()
    schedule = plan[:3]
    if cell in CELL_CODES:
        _run(_rnn_forward_thread, plan, gemm, cell == "rnn_relu", xg_a, b_x, h, w_t, y,
             *schedule)
        return torch.from_numpy(y), torch.from_numpy(h), None, ()
    # Pre-activations go straight into the saved gates when training, else into a scratch row per
    # batch row.
    gates = _alloc((n_rows if save else 0, 4 * hidden), dtype)
    acc = _alloc((0 if save else batch, 4 * hidden), dtype)
    if cell == "lstm":
        c = _owned(c0)
        c_all = _alloc((n_rows if save else 0, hidden), dtype)
        has_proj = w_hr is not None
        wr_t = _transposed(w_hr) if has_proj else np.zeros((0, 0), dtype)
        m = _alloc((batch if has_proj else 0, hidden), dtype)
        _run(_lstm_forward_thread, plan, gemm, save, xg_a, b_x, h, c, w_t, wr_t, has_proj,
             y, gates, c_all, acc, m, *schedule)
        c_n = torch.from_numpy(c)
        saved = (torch.from_numpy(gates), torch.from_numpy(c_all))
    else:
        b = _array(b_hn) if b_hn is not None else np.zeros(hidden, dtype)
        _run(_gru_forward_thread, plan, gemm, save, xg_a, b_x, h, w_t, b, y, gates, acc,
             *schedule)
        saved = (torch.from_numpy(gates),)
    return torch.from_numpy(y), torch.from_numpy(h), c_n, saved if save else ()


def recurrence_backward(cell, grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, b_hn, w_hr,
                        batch_sizes, reverse, y, saved, bias=None):
    """Hand-written BPTT for :func:`recurrence_forward` (kernel contract of
    :func:`fastrnn.reference.recurrence_backward`).

    grad_y: (N, P); grad_h_n: (B, P); grad_c_n: (B, H) or None (None is read as zeros for lstm);
    the rest as given to / returned by :func:`recurrence_forward`. Returns
    ``(d_xg (N, G*H), d_h0 (B, P), d_c0 (B, H) or None, d_w_hh (G*H, P), d_b_hn (H,) or None,
    d_w_hr (P, H) or None, d_bias (G*H,) or None)``. Weight gradients are reduced once, after the
    time loop, as GEMMs (d_bias as one sum over rows).
    """
    hidden = w_hh.shape[0] // GATES[cell]
    batch, proj = h0.shape
    n_rows = grad_y.shape[0]
    gy = _array(grad_y)
    dtype = gy.dtype
    y_a = _array(y)
    w = _array(w_hh)
    dh = _owned(grad_h_n)
    d_xg = torch.from_numpy(_alloc((n_rows, w_hh.shape[0]), dtype))
    plan = _schedule(batch_sizes, reverse, batch, w_hh.shape[0] * proj, w_hh.element_size())
    order, offsets, sizes = plan[:3]
    _check(cell, d_xg, h0, c0, w_hh, b_hn, w_hr, plan.rows, bias)
    gemm = _gemm_address(grad_y.dtype)
    expected = {"grad_y": (grad_y, (n_rows, proj)), "y": (y, (n_rows, proj)),
                "grad_h_n": (grad_h_n, (batch, proj)), "grad_c_n": (grad_c_n, (batch, hidden))}
    expected.update({f"saved[{i}]": (t, (n_rows, 4 * hidden if i == 0 else hidden))
                     for i, t in enumerate(saved)})
    for name, (t, shape) in expected.items():
        if t is not None and (tuple(t.shape) != shape or t.dtype != grad_y.dtype):
            raise ValueError(f"{name} must be {shape} {grad_y.dtype}, got {tuple(t.shape)} {t.dtype}")
    d_xg_t, d_xg = d_xg, d_xg.numpy()
    prev = np.empty(n_rows, np.int64)
    _previous_rows(order, offsets, sizes, prev)

    def weight_grad(d_pre):
        """d_pre^T @ h_prev (h_prev (N, P): each row's state before its step)."""
        return _weight_grad(d_pre, y, h0, plan, reverse, prev)

    d_c0 = d_b_hn = d_w_hr = None
    if cell in CELL_CODES:
        relu = cell == "rnn_relu"
        args = (relu, gy, y_a, w, dh, d_xg, order, offsets, sizes)
        _run(_rnn_backward_thread, plan, gemm, *args)
        d_w_hh = weight_grad(d_xg_t)
    elif cell == "lstm":
        gates, c_all = (_array(s) for s in saved)
        dc = (np.zeros((batch, hidden), dtype) if grad_c_n is None
              else _owned(grad_c_n))
        has_proj = w_hr is not None
        empty = np.zeros((0, 0), dtype)
        wr = _array(w_hr) if has_proj else empty
        dm = _alloc((batch, hidden), dtype)
        dy_all = _alloc((n_rows, proj), dtype) if has_proj else empty
        m_all = _alloc((n_rows, hidden), dtype) if has_proj else empty
        tc = _alloc((0 if has_proj else batch, hidden), dtype)
        args = (gy, _array(c0), w, wr, has_proj, gates, c_all, dh, dc, dm, d_xg, dy_all, m_all,
                tc, prev, order, offsets, sizes)
        _run(_lstm_backward_thread, plan, gemm, *args)
        d_w_hh = weight_grad(d_xg_t)
        d_c0 = torch.from_numpy(dc)
        if has_proj:
            d_w_hr = torch.mm(torch.from_numpy(dy_all).t(), torch.from_numpy(m_all))
    else:
        (gates,) = (_array(s) for s in saved)
        d_hn = _alloc((n_rows, hidden), dtype)
        dg = _alloc((batch, 3 * hidden), dtype)
        args = (gy, _array(h0), y_a, w, gates, dh, d_xg, d_hn, dg, prev, order, offsets, sizes)
        _run(_gru_backward_thread, plan, gemm, *args)
        d_hn_t = torch.from_numpy(d_hn)
        d_w_hh = torch.cat([weight_grad(d_xg_t[:, :2 * hidden]), weight_grad(d_hn_t)])
        if b_hn is not None:
            d_b_hn = d_hn_t.sum(0)
    d_bias = d_xg_t.sum(0) if bias is not None else None
    return d_xg_t, torch.from_numpy(dh), d_c0, d_w_hh, d_b_hn, d_w_hr, d_bias
