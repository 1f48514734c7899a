"""tanh and sigmoid for jitted code that vectorize (there is no SVML in Numba here, so np.tanh /
np.exp are scalar library calls that keep a loop from vectorizing: float64 LSTM gates cost 8 ns an
element). float32: Eigen's rational tanh (~2e-7); float64: through an expm1 of our own (~1e-16).
NaN propagates as in torch, +-inf saturate."""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fastrnn.cells.scalar import sigmoid as _sigmoid
from fastrnn.cells.scalar import tanh as _tanh
from fastrnn.kernels.numba_cpu.jit import _FASTMATH, _JIT

# The overloads at the end register these on the plain-Python stubs of fastrnn.cells.scalar (which
# the cells' step math calls): tanh is Eigen's rational approximation in float32 (~2e-7), float64
# through expm1 (error ~1e-16); sigmoid 0.5 tanh(x/2) + 0.5 in float32, 1 / (1 + e^-x) through
# expm1 in float64 (full relative precision, also for x << 0).

_F32 = np.float32
# Eigen's float32 tanh: x P(x^2) / Q(x^2) on x clamped to [-c, c] (where it reaches 1); the
# coefficients of P and Q highest degree first, as _horner takes them.
_T_CLAMP = _F32(7.90531110763549805)
_TANH_P = tuple(_F32(a) for a in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
_TANH_Q = tuple(_F32(b) for b in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))
_HALF32 = _F32(0.5)
_TINY32 = _F32(0.0004)


@njit(**_JIT)
def _horner(x, coeffs):
    """The polynomial with coefficients ``coeffs`` (highest degree first) at x: one multiply-add
    per coefficient, which LLVM unrolls (the tuple is a constant) and vectorizes."""
    p = coeffs[0]
    for k in range(1, len(coeffs)):
        p = x * p + coeffs[k]
    return p


def _tanh_f32(x):
    ax = x if x >= 0 else -x
    # clamps written so that NaN passes through (a comparison with NaN is false)
    xc = _T_CLAMP if x > _T_CLAMP else x
    xc = -_T_CLAMP if xc < -_T_CLAMP else xc
    x2 = xc * xc
    r = xc * _horner(x2, _TANH_P) / _horner(x2, _TANH_Q)
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


@njit(**_JIT)
def _expm1_neg_f64(y):
    """e^y - 1 for y <= 0 (y < -708 is read as -708, where e^y is already below 3e-308), to
    ~1 ulp of the result; NaN gives NaN."""
    y = -708.0 if y < -708.0 else y
    n = np.floor(y * _LOG2E + 0.5)
    n = n if n <= 0.0 else 0.0  # NaN -> 0 (the result is NaN through r anyway)
    r = (y - n * _LN2_HI) - n * _LN2_LO
    q = _horner(r, _EXPM1_TAYLOR)
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

