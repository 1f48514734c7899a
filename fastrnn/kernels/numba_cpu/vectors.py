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


def _splat(builder, vector_type, scalar):
    """IR: a vector of ``vector_type`` with every lane ``scalar``."""
    lanes = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar,
                                   ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lanes, ir.Constant(vector_type, ir.Undefined), ir.Constant(
        ir.VectorType(ir.IntType(32), vector_type.count), 0))


@intrinsic
def _vsplat(typingctx, scalar):
    """A vector with every lane ``scalar``."""
    def codegen(context, builder, signature, args):
        return _splat(builder, context.get_value_type(signature.return_type), args[0])
    return _Vector(scalar)(scalar), codegen


@intrinsic
def _vfma(typingctx, x, y, z):
    """x * y + z, fused, lane by lane."""
    def codegen(context, builder, signature, args):
        vector = context.get_value_type(signature.return_type)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                            f"llvm.fma.v{vector.count}{_suffix(vector)}")
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


@intrinsic
def _vzeros(typingctx, array, rows):
    """A block of ``rows`` (a constant) rows of two zero vectors of ``array``'s dtype: a tuple of
    2 * rows vectors, as the panel kernels hold a product block in registers."""
    if not isinstance(rows, types.IntegerLiteral):
        return None
    block = types.UniTuple(_Vector(array.dtype), 2 * rows.literal_value)

    def codegen(context, builder, signature, args):
        zero = ir.Constant(context.get_value_type(block.dtype), None)
        return context.make_tuple(builder, block, [zero] * block.count)
    return block(array, rows), codegen


@intrinsic
def _vfma_rows(typingctx, a, bi, k, w0, w1, block):
    """``block`` (two vectors a row r) plus a[bi+r, k] * (w0, w1), fused, lane by lane."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        vector = args[3].type
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                             f"llvm.fma.v{vector.count}{_suffix(vector)}")
        out = []
        for r in range(len(signature.args[5]) // 2):
            row = builder.add(args[1], ir.Constant(args[1].type, r))
            x = _splat(builder, vector, builder.load(cgutils.get_item_pointer(
                context, builder, signature.args[0], array, [row, args[2]])))
            out += [builder.call(fma, [x, args[3], builder.extract_value(args[5], 2 * r)]),
                    builder.call(fma, [x, args[4], builder.extract_value(args[5], 2 * r + 1)])]
        return context.make_tuple(builder, signature.return_type, out)
    return block(a, types.intp, types.intp, w0, w1, block), codegen


def _suffix(vector):
    """The element type's suffix of LLVM's vector intrinsic names."""
    return "f32" if vector.element == ir.FloatType() else "f64"


def _row_vectors(context, builder, signature, args):
    """(pointer, mask) of each vector of a block at acc[ai+r, j:j+2v] (acc, ai, j, v, cols,
    block): the lanes of the first ``cols`` columns."""
    acc_type, acc = signature.args[0], context.make_array(signature.args[0])(context, builder,
                                                                            args[0])
    vector = context.get_value_type(signature.args[5].dtype)
    i32 = ir.IntType(32)
    lanes = ir.Constant(ir.VectorType(i32, vector.count), list(range(vector.count)))
    cols = builder.trunc(args[4], i32)
    masks = [builder.icmp_signed("<", lanes, _splat(builder, lanes.type, limit))
             for limit in (cols, builder.sub(cols, builder.trunc(args[3], i32)))]
    out = []
    for r in range(len(signature.args[5]) // 2):
        row = builder.add(args[1], ir.Constant(args[1].type, r))
        for half in range(2):
            column = builder.add(args[2], builder.mul(args[3], ir.Constant(args[3].type, half)))
            item = cgutils.get_item_pointer(context, builder, acc_type, acc, [row, column])
            out.append((builder.bitcast(item, vector.as_pointer()), masks[half]))
    return vector, out


def _align(vector):
    """An element's alignment (the arrays' guarantee), as the masked intrinsics take it."""
    return ir.Constant(ir.IntType(32), 4 if _suffix(vector) == "f32" else 8)


def _masked(builder, vector, name):
    """LLVM's masked load or store (``name``) of ``vector``'s type."""
    i1 = ir.VectorType(ir.IntType(1), vector.count)
    types_ = {"load": (vector, [vector.as_pointer(), ir.IntType(32), i1, vector]),
              "store": (ir.VoidType(), [vector, vector.as_pointer(), ir.IntType(32), i1])}[name]
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(*types_),
                                          f"llvm.masked.{name}.v{vector.count}{_suffix(vector)}.p0")


@intrinsic
def _vload_rows(typingctx, acc, ai, j, v, cols, block):
    """A block like ``block`` (two vectors a row r) loaded from acc[ai+r, j:j+2v]: the first
    ``cols`` columns, zeros past them (never read)."""
    def codegen(context, builder, signature, args):
        vector, places = _row_vectors(context, builder, signature, args)
        load, zero = _masked(builder, vector, "load"), ir.Constant(vector, None)
        return context.make_tuple(builder, signature.return_type, [
            builder.call(load, [pointer, _align(vector), mask, zero]) for pointer, mask in places])
    return block(acc, types.intp, types.intp, types.intp, types.intp, block), codegen


@intrinsic
def _vstore_rows(typingctx, acc, ai, j, v, cols, block):
    """acc[ai+r, j:j+cols] = the first ``cols`` lanes of row r of ``block`` (two vectors a row):
    plain stores where cols is both vectors' width, masked ones (nothing written past cols) in
    the last panel of a width that is no multiple of the panel's."""
    def codegen(context, builder, signature, args):
        vector, places = _row_vectors(context, builder, signature, args)
        store, align = _masked(builder, vector, "store"), _align(vector)
        full = builder.icmp_signed(">=", args[4], builder.mul(args[3], ir.Constant(
            args[3].type, 2)))
        values = [builder.extract_value(args[5], n) for n in range(len(places))]
        with builder.if_else(full) as (whole, part):
            with whole:
                for value, (pointer, _) in zip(values, places):
                    builder.store(value, pointer, align=align.constant)
            with part:
                for value, (pointer, mask) in zip(values, places):
                    builder.call(store, [value, pointer, align, mask])
        return context.get_dummy_value()
    return types.void(acc, types.intp, types.intp, types.intp, types.intp, block), codegen


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


# Rows of a block the panel kernels hold in registers, two vectors a row: 16 of the 32 vector
# registers with AVX-512, 8 of the 16 with AVX2. A row's sum is the same whatever its block (each
# lane one chain of multiply-adds over k), so the split of a step's rows never changes a result.
# Intel Xeon (family 6 model 167), 1 thread, one step (B x K) @ (K x N), 8-row against 4-row
# blocks: 1.04-1.13x (B=8-64, K and N 128-2048, 134-143 -> 138-159 GFLOP/s).
PANEL_ROWS = 8 if VECTOR_BYTES == 64 else 4


@njit(**_JIT)
def _panel_rows(acc, ai, a, bi, panel, j, cols, overwrite, block):
    """acc[ai+r, j:j+cols] (+)= a[bi+r, :K] @ panel[:, :cols] for each row r of ``block``
    (:func:`_vzeros`: two zero vectors a row; its length gives the row count) (panel: (K, P), P two
    vectors; cols <= P: the last panel of a width that is no multiple of P)."""
    _prefer_wide_vectors()
    v = panel.shape[1] // 2
    if not overwrite:
        block = _vload_rows(acc, ai, j, v, cols, block)
    for k in range(panel.shape[0]):
        block = _vfma_rows(a, bi, k, _vload(panel, k, 0), _vload(panel, k, v), block)
    _vstore_rows(acc, ai, j, v, cols, block)


@njit(**_JIT)
def _panel_row(acc, ai, a, bi, panel, j, cols, overwrite):
    """acc[ai, j:j+cols] (+)= a[bi, :K] @ panel[:, :cols] (as :func:`_panel_rows`): the even and
    odd k in two sums (one sum's chain of dependent multiply-adds would bound it by their
    latency), added at the end."""
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
        d0, d1 = _vload_rows(acc, ai, j, v, cols, (zero, zero))
        c0, c1 = _vadd(d0, c0), _vadd(d1, c1)
    _vstore_rows(acc, ai, j, v, cols, (c0, c1))
