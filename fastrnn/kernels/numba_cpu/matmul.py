"""The recurrent matmul of one step from compiled code: the BLAS gemm torch exports (MKL on x86),
called through its address, or Numba micro-kernels: on weights packed in column panels
(:func:`panels`), explicit vectors (64 bytes with AVX-512, 32 with AVX2) held in registers
across the whole sum; else (weights not packed: CPUs without AVX2 + FMA, short calls) loops
LLVM vectorizes."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastrnn.kernels.numba_cpu import jit, vectors
from fastrnn.kernels.numba_cpu.jit import _JIT, PANEL_VECTOR_BYTES, _prefer_wide_vectors
from fastrnn.kernels.numba_cpu.vectors import (PANEL_ROWS, VECTOR_BYTES, _dot_row, _panel_row,
                                                _panel_rows, _vzeros)

# Bytes of a weight column tile kept in L2 (2 MiB per core here) while all row groups of a thread
# stream through it.
WEIGHT_TILE_BYTES = 1 << 20
# A panel: two vectors of weight columns (128 bytes with AVX-512: 32 float32 / 16 float64; 64
# with AVX2), stored (K, panel) contiguously: the panel kernels keep a block of the product,
# vectors.PANEL_ROWS rows x 2 vectors, in registers for the whole K-long sum. Used where the CPU
# has AVX-512 or AVX2 + FMA (jit.PANEL_VECTOR_BYTES). Measured on an AMD EPYC Zen 4, 1 thread,
# 4-row blocks, one step's (B x H) @ (H x 4H) against MKL's gemm call (bench/numba_profile.py
# --matmul): B=1 H=128 3.1 µs (MKL 6.4), B=8 H=128 11.7 (20.3), B=8 H=512 178 (418), B=64
# H=512 1382 (2036); bench/results/panel-kernels-zen4.md. A width that is no multiple of the
# panel's ends in a zero-padded panel, its product stored masked (LSTM H=200 B=20's backward
# step, W_hh (800, 200), on an Intel Xeon family 6 model 167: 70 -> 51 µs with the 8-row blocks,
# as fast as MKL's gemm; before, 8 of the 200 columns went through the loops below).
PANEL_BYTES = 2 * VECTOR_BYTES


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


# The panel kernels where the CPU has the vectors for them (tests force both ways).
USE_PANELS = PANEL_VECTOR_BYTES > 0


def _cpu_vendor():
    """The CPU vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"), or None."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


# Whether the BLAS is MKL on an Intel CPU, which it is tuned for: there its gemm beats the panel
# kernels on large products (elsewhere, e.g. AMD Zen 4, it ran at half their speed).
MKL_ON_INTEL = _MKL_SET_THREADS_LOCAL is not None and _cpu_vendor() == "GenuineIntel"


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
def _on_stack(typingctx, value, dtype):
    """The address (int64) of a slot on the calling function's stack holding ``value`` as
    ``dtype``: a by-reference scalar argument without a heap allocation."""
    item = dtype.dtype

    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(
            builder, context.cast(builder, args[0], signature.args[0], item))
        return builder.ptrtoint(slot, context.get_value_type(types.int64))
    return types.int64(value, dtype), codegen


@njit(**_JIT)
def _gemm_rows(gemm, acc, ai, a, bi, nrows, w, overwrite, transposed=False):
    """acc[ai:ai+nrows, :N] (+)= a[bi:bi+nrows, :K] @ w (``overwrite``: =, acc is not read)
    through the Fortran gemm at address ``gemm``; w: (K, N), or with ``transposed`` (N, K), read
    as w^T in place: the very call torch.mm(a, w.t()) makes, so bitwise its result. Column-major,
    so it computes acc^T += w^T a^T with no copies. The by-reference scalars live on the stack (a
    heap allocation per step cost 0.1 µs each)."""
    if transposed:
        n_total, k_total = w.shape
    else:
        k_total, n_total = w.shape
    _call_gemm(gemm, _on_stack(84 if transposed else 78, np.uint8),  # 'T' / 'N'
               _on_stack(78, np.uint8), _on_stack(n_total, np.int32), _on_stack(nrows, np.int32),
               _on_stack(k_total, np.int32), _on_stack(1, w.dtype), np.int64(w.ctypes.data),
               _on_stack(w.shape[1], np.int32),
               np.int64(a.ctypes.data) + np.int64(bi * a.strides[0]),
               _on_stack(a.shape[1], np.int32), _on_stack(0 if overwrite else 1, w.dtype),
               np.int64(acc.ctypes.data) + np.int64(ai * acc.strides[0]),
               _on_stack(acc.shape[1], np.int32))


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
def _matmul_rows(acc, acc_base, a, a_base, w, w_p, tid, nthreads, group, rows, gemm, overwrite,
                 part=0, parts=1, transposed=False):
    """For this thread's rows ``b < rows`` (groups of ``group`` dealt round-robin over
    ``nthreads``): ``acc[acc_base + b, :N] += a[a_base + b, :K] @ w`` with w: (K, N), or ``=``
    when ``overwrite`` (acc's old values are not read); with ``parts`` > 1 (micro-kernels only),
    only the columns of part ``part`` of ``parts``: its share of the panels, in order (without
    panels: all columns to the last part). Each element's sum is the same whatever the split.

    ``gemm``: address of a Fortran BLAS gemm of w's dtype (one call per row group; with
    ``transposed`` w is given as w^T (N, K), read in place, and a single row goes to
    :func:`.vectors._dot_row` instead), or 0 for the Numba micro-kernels: the panel kernels over
    ``w_p`` (:func:`panels` of w), blocks of :data:`.vectors.PANEL_ROWS` rows, then 4, then
    single rows; where ``w_p`` has no panels, the loops below, column-tiled so one (K, tile)
    slice of w stays in cache across all the thread's row groups."""
    if transposed and rows == 1:
        if tid == 0:
            _dot_row(acc, acc_base, a, a_base, w, overwrite)
        return
    if gemm != 0:
        g0 = tid * group
        while g0 < rows:
            g1 = min(g0 + group, rows)
            _gemm_rows(gemm, acc, acc_base + g0, a, a_base + g0, g1 - g0, w, overwrite,
                       transposed)
            g0 += nthreads * group
        return
    k_total, n_total = w.shape
    count, width = w_p.shape[0], w_p.shape[2]
    for p in range(part * count // parts, (part + 1) * count // parts):
        j = p * width
        cols = min(width, n_total - j)
        g0 = tid * group
        while g0 < rows:
            g1 = min(g0 + group, rows)
            b = g0
            while b + PANEL_ROWS <= g1:
                _panel_rows(acc, acc_base + b, a, a_base + b, w_p[p], j, cols, overwrite,
                            _vzeros(a, PANEL_ROWS))
                b += PANEL_ROWS
            while b + 4 <= g1:
                _panel_rows(acc, acc_base + b, a, a_base + b, w_p[p], j, cols, overwrite,
                            _vzeros(a, 4))
                b += 4
            while b < g1:
                _panel_row(acc, acc_base + b, a, a_base + b, w_p[p], j, cols, overwrite)
                b += 1
            g0 += nthreads * group
    if count or part != parts - 1:  # the panels cover every column
        return
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
            while b < g1:  # the last 1-3 rows one at a time (same sums as _rows4's, per row)
                _rows1(acc, acc_base + b, a, a_base + b, w, j0, j1)
                b += 1
            g0 += nthreads * group



@njit(**_JIT)
def _project_in_place(gemm, xg, x, w_ih):
    """xg = x @ w_ih^T with w_ih (G*H, I) read in place (a call of a few rows,
    :func:`.launch.live`), as :func:`_matmul_rows` with ``transposed``: one row by
    :func:`.vectors._dot_row`, more by the gemm at address ``gemm`` (torch.mm's own call)."""
    if x.shape[0] == 1:
        _dot_row(xg, 0, x, 0, w_ih, True)
    else:
        _gemm_rows(gemm, xg, 0, x, 0, x.shape[0], w_ih, True, True)


# Their cache entries keyed also by the file they compile in (as the loops': .loops._INLINED)
for _fn in (_matmul_rows, _project_in_place):
    _fn._cache = jit.KeyedCache(_fn.py_func, (str(vectors.__file__),))


def panels(w, use=True, out=None):
    """``w`` (K, N) numpy, packed for the panel kernels: (ceil(N / P), K, P), P columns of
    :data:`PANEL_BYTES` each, the last panel padded with zeros (the kernels write only its first
    N % P columns), 64-byte aligned; (0, K, P) unless ``use`` and the CPU has the vectors for them
    (:data:`USE_PANELS`): the loops then read w itself. Written into ``out`` (an earlier call's
    result for a w of this shape) where given."""
    from fastrnn.kernels.numba_cpu import buffers
    k_total, n_total = w.shape
    width = PANEL_BYTES // w.itemsize
    count = -(-n_total // width) if use and USE_PANELS else 0
    if out is None:
        out = buffers.alloc((count, k_total, width), w.dtype)
    count = out.shape[0]
    if count:
        full = n_total // width
        out[:full] = w[:, :full * width].reshape(k_total, full, width).transpose(1, 0, 2)
        if full < count:
            out[full] = 0
            out[full, :, :n_total - full * width] = w[:, full * width:]
    return out


def _gemm_address(dtype):
    """Address of the BLAS gemm for ``dtype`` (torch dtype) when :data:`USE_BLAS`, else 0."""
    if not USE_BLAS:
        return 0
    return _GEMM[np.float32 if dtype == torch.float32 else np.float64]
