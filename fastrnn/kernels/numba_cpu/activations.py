"""tanh and sigmoid for jitted code that vectorize (there is no SVML in Numba here, so np.tanh /
np.exp are scalar library calls that keep a loop from vectorizing: float64 LSTM gates cost 8 ns an
element): branch-free (selects only), on an exponential of our own, except float32 tanh, Eigen's
rational function (cheaper).

They saturate where torch's CPU functions do, so that a shut gate is exactly 0 or 1 and its
derivative (1 - y^2, s (1 - s)) exactly 0: tanh is +-1 from torch's first +-1 on, sigmoid is
1 / (1 + e^-x) as torch computes it, so 0 where e^-x overflows (x < -88.72 in float32; denormal
in (-88.72, -87.34), as torch's) and 1 where e^-x is below half an ulp of 1. NaN
propagates, +-inf and huge finite inputs saturate (no NaN, no integer overflow). Largest
distance to torch's results, swept: float32 tanh 5 ulp, sigmoid 4; float64 tanh 2, sigmoid 4
(the sigmoids are 2 ulp from the exact value, as torch's own).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fastrnn.cells.scalar import sigmoid as _sigmoid
from fastrnn.cells.scalar import tanh as _tanh
from fastrnn.kernels.numba_cpu.jit import _FASTMATH, _JIT


class _ExpConsts(NamedTuple):
    """One float dtype's constants, all of that dtype (a float64 constant would promote float32
    code to float64, halving its vector width)."""
    log2e: float
    shifter: float       # 1.5 2^p (p mantissa bits): y/ln2 + shifter rounds y/ln2 to an integer
    ln2_hi: float        # Cody-Waite split of ln 2: n * ln2_hi is exact for every n used
    ln2_lo: float
    taylor: tuple        # 1/k! for k = K … 2: expm1(r) = r + r^2 P(r) on |r| <= ln2/2
    y_min: float         # sigmoid reads e^-x for -x < y_min as e^y_min (2^(n-1) stays normal)
    y_max: float         # ... for -x > y_max as e^y_max: past the overflow to inf
    tanh_split: float    # |x| from which tanh is computed as 1 - ... (tanh = 1/2)
    tanh_one: float      # |x| from which torch's tanh(x) is +-1
    one: float
    two: float


def _consts(f, ln2_hi, ln2_lo, degree, y_min, y_max, tanh_one):
    return _ExpConsts(
        log2e=f(1 / math.log(2)), shifter=f(1.5 * 2.0 ** (np.finfo(f).nmant)),
        ln2_hi=f(ln2_hi), ln2_lo=f(ln2_lo),
        taylor=tuple(f(1 / math.factorial(k)) for k in range(degree, 1, -1)),
        y_min=f(y_min), y_max=f(y_max), tanh_split=f(math.log(3) / 2), tanh_one=f(tanh_one),
        one=f(1), two=f(2))


# Taylor degree K: the remainder r^(K+1)/(K+1)! is below a quarter ulp of expm1(r) ~ r on
# |r| <= 0.347. y_max is past ln(max float) (88.72, 709.78), so that e^y overflows where torch's
# does; y_min keeps n - 1 >= the smallest normal exponent (-126, -1022). tanh_one: torch's first
# float whose tanh is 1 (swept; near (p + 2) ln2 / 2, where 1 - tanh x ~ 2 e^-2x falls below half
# an ulp of 1): the formula is 1 from about there too, the select makes the point exact.
_CONSTS = {
    types.float32: _consts(np.float32, 0.693359375, -2.12194440e-4, 7, -86.0, 89.0,
                           9.01084041595459),
    types.float64: _consts(np.float64, 6.93147180369123816490e-01, 1.90821492927058770002e-10,
                           13, -708.0, 710.0, 19.061547465468465),
}


@intrinsic
def _half_pow2(typingctx, t):
    """2^(n-1) from ``t = n + 1.5 2^p`` (p the dtype's mantissa bits, |n| < 2^(p-1), n - 1 a
    normal exponent): n's two's complement, in t's low mantissa bits, shifted to the exponent
    field, plus the bias. Integer shift and add on t's bits: vectorizes, and any t (NaN, huge) is
    defined behaviour (a garbage result, where the caller's result is NaN or selected away)."""
    width, bias, mantissa = (32, 127, 23) if t == types.float32 else (64, 1023, 52)

    def codegen(context, builder, signature, args):
        int_type = ir.IntType(width)
        bits = builder.shl(builder.bitcast(args[0], int_type), int_type(mantissa))
        return builder.bitcast(builder.add(bits, int_type((bias - 1) << mantissa)), args[0].type)
    return t(t), codegen


@njit(**_JIT)
def _horner(x, coeffs):
    """The polynomial with coefficients ``coeffs`` (highest degree first) at x: one multiply-add
    per coefficient, which LLVM unrolls (the tuple is a constant) and vectorizes."""
    p = coeffs[0]
    for k in range(1, len(coeffs)):
        p = x * p + coeffs[k]
    return p


@njit(**_JIT)
def _exp_parts(y, c):
    """e^y = 2 h (1 + q): returns (h, q) = (2^(n-1), expm1(r)), y = n ln2 + r, |r| <= ln2/2, for
    y in [c.y_min, c.y_max] (other y: garbage). Half of 2^n so that float32's largest n (128, e^y
    up to its overflow) still has an exponent. NaN gives q = NaN."""
    t = y * c.log2e + c.shifter  # n + 1.5 2^p: adding the shifter rounds y / ln2 to an integer
    n = t - c.shifter
    r = (y - n * c.ln2_hi) - n * c.ln2_lo
    return _half_pow2(t), r + r * r * _horner(r, c.taylor)


@njit(**_JIT)
def _tanh_exp(x, c):
    """tanh|x| = -m / (2 + m) with m = expm1(-2|x|) = E - 1 (full relative precision near 0)
    or, once over 1/2, 1 - 2E / (2 + m) (resolves the last ulps below 1, where m is -1 to its
    precision): one division, of the picked numerator. +-1 from c.tanh_one on (also where
    |x| is out of _exp_parts' range, inf included); the sign copied from x."""
    a = abs(x)
    h, q = _exp_parts(-(a + a), c)
    s = h + h  # 2^n: E = e^-2|x| = s (1 + q)
    m = s * q + (s - c.one)  # exact in q when n = 0
    near_one = a > c.tanh_split
    d = ((s * q + s) * c.two if near_one else -m) / (c.two + m)
    t = c.one - d if near_one else d
    return math.copysign(c.one if a >= c.tanh_one else t, x)  # NaN: t is NaN


# Eigen's float32 tanh: x P(x^2) / Q(x^2), the coefficients highest degree first (as _horner
# takes them); x itself below _TANH_TINY. As a function within 1.6 2^-24 (relative) of tanh all
# the way to tanh_one (Eigen clamps at 7.905, which flattened the last ulps below 1); 4-5 ulp of
# torch's in float32 arithmetic.
_TANH_P = tuple(np.float32(a) for a in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
_TANH_Q = tuple(np.float32(b) for b in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))
_TANH_TINY = np.float32(0.0004)


@njit(**_JIT)
def _tanh_rational(x, c):
    """float32 tanh: Eigen's rational, +-1 from c.tanh_one on. Two thirds of the exponential
    form's vector instructions (_tanh_exp would be 2 ulp of torch's, at 1.8x the time on AVX2).
    No clamp: the select also replaces what the rational gives out there (inf / inf = NaN from
    |x| ~ 1e19 on)."""
    a = abs(x)
    x2 = x * x
    t = x * _horner(x2, _TANH_P) / _horner(x2, _TANH_Q)
    t = x if a < _TANH_TINY else t
    return math.copysign(c.one, x) if a >= c.tanh_one else t  # NaN: t is NaN


@njit(**_JIT)
def _sigmoid_impl(x, c):
    """1 / (1 + e^-x), as torch computes it (its zero, one and denormals included)."""
    y = -x
    y = c.y_max if y > c.y_max else y  # selects that NaN passes through (its comparisons fail)
    y = c.y_min if y < c.y_min else y
    h, q = _exp_parts(y, c)
    return c.one / (c.one + (h * q + h) * c.two)  # e^-x = 2h (1 + q): inf past the overflow


@overload(_tanh, jit_options=dict(fastmath=_FASTMATH, error_model="numpy"))
def _tanh_overload(x):
    c = _CONSTS[x]
    tanh = _tanh_rational if x == types.float32 else _tanh_exp
    return lambda x: tanh(x, c)


@overload(_sigmoid, jit_options=dict(fastmath=_FASTMATH, error_model="numpy"))
def _sigmoid_overload(x):
    c = _CONSTS[x]
    return lambda x: _sigmoid_impl(x, c)
