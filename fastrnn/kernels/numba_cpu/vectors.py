"""The panel kernels of the step matmul (:func:`.matmul._matmul_rows`): a block of the product
held in registers as explicit vectors of :data:`VECTOR_BYTES` (64 with AVX-512: float32 x 16,
float64 x 8, one zmm register each; 32 with AVX2: one ymm) for the whole K-long sum, over weights
packed in column panels of two vectors (:func:`.matmul.panels`). Numba has no vector type: the
intrinsics below give the kernels one (load, store, broadcast, add, fused multiply-add, sum of
the lanes). Also here: :func:`_dot_row`, one row's product with a weight as given (N, K)."""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from fastrnn.kernels.numba_cpu.jit import _JIT, PANEL_VECTOR_BYTES, _prefer_wide_vectors

# The width the kernels are compiled with: jit.PANEL_VECTOR_BYTES, or 32 where the loops do not
# choose them (the tests still run them there).
VECTOR_BYTES = PANEL_VECTOR_BYTES or 32


class _Vector(types.Type):
    """A vector of VECTOR_BYTES of ``dtype`` (float32 or float64), an LLVM vector value."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"vector{VECTOR_BYTES}({dtype})")


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        width = VECTOR_BYTES // (fe_type.dtype.bitwidth // 8)
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(),
                                                     width))


def _vector_pointer(context, builder, arrty, array, i, j):
    data = context.make_array(arrty)(context, builder, array)
    item = cgutils.get_item_pointer(context, builder, arrty, data, [i, j])
    vector = context.get_value_type(_Vector(arrty.dtype))
    return builder.bitcast(item, vector.as_pointer())


@intrinsic
def _vload(typingctx, array, i, j):
    """The vector at ``array[i, j:j+width]`` (2-D, C-contiguous)."""
    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], args[0],
                                            args[1], args[2]), align=array.dtype.bitwidth // 8)
    return _Vector(array.dtype)(array, types.intp, types.intp), codegen


@intrinsic
def _vstore(typingctx, array, i, j, value):
    """``array[i, j:j+width] = value``."""
    def codegen(context, builder, signature, args):
        builder.store(args[3], _vector_pointer(context, builder, signature.args[0], args[0],
                                               args[1], args[2]), align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.void(array, types.intp, types.intp, value), codegen


@intrinsic
def _vsplat(typingctx, scalar):
    """A vector with every lane ``scalar``."""
    def codegen(context, builder, signature, args):
        vector = context.get_value_type(signature.return_type)
        lanes = builder.insert_element(ir.Constant(vector, ir.Undefined), args[0],
                                       ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(lanes, ir.Constant(vector, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), vector.count), 0))
    return _Vector(scalar)(scalar), codegen


@intrinsic
def _vfma(typingctx, x, y, z):
    """x * y + z, fused, lane by lane."""
    def codegen(context, builder, signature, args):
        vector = context.get_value_type(signature.return_type)
        name = f"llvm.fma.v{vector.count}{'f32' if vector.element == ir.FloatType() else 'f64'}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                            name)
        return builder.call(fn, args)
    return z(x, y, z), codegen


@intrinsic
def _vadd(typingctx, x, y):
    """x + y lane by lane."""
    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])
    return x(x, y), codegen


@intrinsic
def _vzero(typingctx, array):
    """A vector of zeros of ``array``'s dtype."""
    def codegen(context, builder, signature, args):
        return ir.Constant(context.get_value_type(signature.return_type), None)
    return _Vector(array.dtype)(array), codegen


@intrinsic
def _vsum(typingctx, x):
    """The sum of x's lanes, in a fixed order: the upper half added to the lower until one lane is
    left."""
    def codegen(context, builder, signature, args):
        value, lanes, i32 = args[0], args[0].type.count, ir.IntType(32)
        while lanes > 1:
            lanes //= 2
            low, high = (builder.shuffle_vector(value, value, ir.Constant(
                ir.VectorType(i32, lanes), list(range(start, start + lanes))))
                for start in (0, lanes))
            value = builder.fadd(low, high)
        return builder.extract_element(value, ir.Constant(i32, 0))
    return x.dtype(x), codegen


@njit(**_JIT)
def _dot_row(acc, ai, a, bi, w, overwrite):
    """acc[ai, :N] (+)= a[bi, :K] @ w^T with w (N, K) as given: each element a dot product of rows
    (four of w at a time, each sum in vector lanes, then :func:`_vsum`; the last K % lanes terms
    added one by one; so, unlike the panel kernels' sums, they depend on the vector width, as a
    BLAS's do: the same bits on one machine). One row reads each weight once, as the gemm would,
    with no call's cost (LSTM H=256, W (1024, 256) float32: 14.7 µs against MKL's gemm 22.0 on
    the AMD EPYC Zen 4)."""
    _prefer_wide_vectors()
    n_total, k_total = w.shape
    lanes = VECTOR_BYTES // w.itemsize
    kv = k_total - k_total % lanes
    zero = _vzero(w)
    j = 0
    while j + 4 <= n_total:
        s0 = s1 = s2 = s3 = zero
        for k in range(0, kv, lanes):
            x = _vload(a, bi, k)
            s0, s1 = _vfma(x, _vload(w, j, k), s0), _vfma(x, _vload(w, j + 1, k), s1)
            s2, s3 = _vfma(x, _vload(w, j + 2, k), s2), _vfma(x, _vload(w, j + 3, k), s3)
        t0, t1, t2, t3 = _vsum(s0), _vsum(s1), _vsum(s2), _vsum(s3)
        for k in range(kv, k_total):
            x = a[bi, k]
            t0, t1, t2, t3 = (t0 + x * w[j, k], t1 + x * w[j + 1, k], t2 + x * w[j + 2, k],
                              t3 + x * w[j + 3, k])
        _put(acc, ai, j, t0, overwrite)
        _put(acc, ai, j + 1, t1, overwrite)
        _put(acc, ai, j + 2, t2, overwrite)
        _put(acc, ai, j + 3, t3, overwrite)
        j += 4
    while j < n_total:
        s0 = zero
        for k in range(0, kv, lanes):
            s0 = _vfma(_vload(a, bi, k), _vload(w, j, k), s0)
        t0 = _vsum(s0)
        for k in range(kv, k_total):
            t0 += a[bi, k] * w[j, k]
        _put(acc, ai, j, t0, overwrite)
        j += 1


@njit(inline="always", **_JIT)
def _put(acc, i, j, value, overwrite):
    """acc[i, j] = value, or += with not ``overwrite``."""
    acc[i, j] = value if overwrite else acc[i, j] + value


@njit(**_JIT)
def _panel_rows4(acc, ai, a, bi, panel, j, overwrite):
    """acc[ai+r, j:j+P] (+)= a[bi+r, :K] @ panel for r = 0..3 (panel: (K, P), P two vectors)."""
    _prefer_wide_vectors()
    v = panel.shape[1] // 2
    zero = _vzero(a)
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = zero
    if not overwrite:
        c00, c01 = _vload(acc, ai, j), _vload(acc, ai, j + v)
        c10, c11 = _vload(acc, ai + 1, j), _vload(acc, ai + 1, j + v)
        c20, c21 = _vload(acc, ai + 2, j), _vload(acc, ai + 2, j + v)
        c30, c31 = _vload(acc, ai + 3, j), _vload(acc, ai + 3, j + v)
    for k in range(panel.shape[0]):
        w0, w1 = _vload(panel, k, 0), _vload(panel, k, v)
        x = _vsplat(a[bi, k])
        c00, c01 = _vfma(x, w0, c00), _vfma(x, w1, c01)
        x = _vsplat(a[bi + 1, k])
        c10, c11 = _vfma(x, w0, c10), _vfma(x, w1, c11)
        x = _vsplat(a[bi + 2, k])
        c20, c21 = _vfma(x, w0, c20), _vfma(x, w1, c21)
        x = _vsplat(a[bi + 3, k])
        c30, c31 = _vfma(x, w0, c30), _vfma(x, w1, c31)
    _vstore(acc, ai, j, c00)
    _vstore(acc, ai, j + v, c01)
    _vstore(acc, ai + 1, j, c10)
    _vstore(acc, ai + 1, j + v, c11)
    _vstore(acc, ai + 2, j, c20)
    _vstore(acc, ai + 2, j + v, c21)
    _vstore(acc, ai + 3, j, c30)
    _vstore(acc, ai + 3, j + v, c31)


@njit(**_JIT)
def _panel_row(acc, ai, a, bi, panel, j, overwrite):
    """acc[ai, j:j+P] (+)= a[bi, :K] @ panel: the even and odd k in two sums (one sum's chain of
    dependent multiply-adds would bound it by their latency), added at the end."""
    _prefer_wide_vectors()
    v = panel.shape[1] // 2
    zero = _vzero(a)
    c0 = c1 = e0 = e1 = zero
    k_total = panel.shape[0]
    for k in range(0, k_total - 1, 2):
        x, y = _vsplat(a[bi, k]), _vsplat(a[bi, k + 1])
        c0, c1 = _vfma(x, _vload(panel, k, 0), c0), _vfma(x, _vload(panel, k, v), c1)
        e0, e1 = _vfma(y, _vload(panel, k + 1, 0), e0), _vfma(y, _vload(panel, k + 1, v), e1)
    if k_total % 2:
        x = _vsplat(a[bi, k_total - 1])
        c0 = _vfma(x, _vload(panel, k_total - 1, 0), c0)
        c1 = _vfma(x, _vload(panel, k_total - 1, v), c1)
    c0, c1 = _vadd(c0, e0), _vadd(c1, e1)
    if not overwrite:
        c0, c1 = _vadd(_vload(acc, ai, j), c0), _vadd(_vload(acc, ai, j + v), c1)
    _vstore(acc, ai, j, c0)
    _vstore(acc, ai, j + v, c1)
