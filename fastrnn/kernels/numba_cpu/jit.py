"""Compile settings shared by every jitted function of the numba backend: the ``@njit`` options,
the 512-bit vector request and a dtype-typed ``1`` for jitted code (``fastrnn.cells.scalar.one``
compiled)."""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from fastrnn.cells.scalar import one as _one

# Floating-point contraction (FMA) only: no reassociation, no finite-math assumptions, so results do
# not depend on vector width and NaN/inf propagate as in torch.
_FASTMATH = {"contract"}
# error_model="numpy": float division by zero gives inf/nan instead of raising, which keeps the
# ZeroDivisionError branch out of the gate loops so they vectorize.
_JIT = dict(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")


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


# 1 in an array's dtype for jitted code: the plain-Python stub lives in fastrnn.cells.scalar, where
# the cells' step math calls it.
@overload(_one, jit_options=dict(fastmath=_FASTMATH))
def _one_overload(a):
    if a.dtype == types.float32:
        return lambda a: np.float32(1)
    return lambda a: np.float64(1)

