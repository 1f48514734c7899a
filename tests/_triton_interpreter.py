"""Test-harness changes to Triton's CPU interpreter (``TRITON_INTERPRET=1``).

bf16 dots: the interpreter keeps a bfloat16 tensor as its uint16 bit patterns (numpy has no
bfloat16), and its ``InterpreterBuilder.create_dot`` hands those to ``np.matmul`` as they are: a
bf16 x bf16 ``tl.dot`` multiplies the bit patterns as integers (Triton 3.6 and 3.9). conftest.py
calls :func:`install`, which widens bf16 operands exactly to float32 first, so that the dot
computes what a GPU does: exact products summed in the float32 accumulator. The kernels run
``tl.dot`` on their real operand dtypes, as compiled for a GPU.

Program order: :func:`program_order` runs every launch's programs in reversed or shuffled order
instead of the interpreter's x, y, z loop.
"""
from __future__ import annotations

import contextlib
import itertools
import random

import numpy as np
import pytest
import triton
import triton.language as tl
from triton.runtime import interpreter

_builder_cls = getattr(interpreter, "InterpreterBuilder", None)
_HOOKS = ("create_dot", "set_grid_dim", "set_grid_idx")
#: What this harness patches and the installed Triton lacks (empty: all there).
MISSING = [name for name in ("TensorHandle", "InterpreterBuilder", "interpreter_builder")
           if not hasattr(interpreter, name)] + [
    f"InterpreterBuilder.{name}" for name in _HOOKS if not hasattr(_builder_cls, name)]
_original_dot = getattr(_builder_cls, "create_dot", None)


def require():
    """Fail the calling test (not skip it) if this Triton's interpreter lacks a patch target."""
    if MISSING:
        pytest.fail(f"Triton {triton.__version__}: the interpreter has no {', '.join(MISSING)}; "
                    f"update tests/_triton_interpreter.py")


def _widened(x):
    """A bf16 TensorHandle as float32, exactly (bf16 is the upper half of a float32); others
    as they are."""
    if x.dtype.scalar != tl.bfloat16:
        return x
    bits = x.data.astype(np.uint32) << np.uint32(16)
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def _create_dot(self, a, b, d, *args, **kwargs):
    return _original_dot(self, _widened(a), _widened(b), d, *args, **kwargs)


def install():
    """Correct the interpreter's bf16 dot (module docstring); a no-op if MISSING."""
    if not MISSING:
        _builder_cls.create_dot = _create_dot


@contextlib.contextmanager
def original_dot():
    """The interpreter's own create_dot, for the duration (to show what :func:`install` fixes)."""
    require()
    patched, _builder_cls.create_dot = _builder_cls.create_dot, _original_dot
    try:
        yield
    finally:
        _builder_cls.create_dot = patched


@contextlib.contextmanager
def program_order(order, seed=0):
    """Run each launch's programs in ``order``: "reversed", or "shuffled" (by ``seed``).

    The interpreter still loops over the grid in x, y, z order; each program id it sets is
    mapped through a permutation of the grid drawn at the launch."""
    require()
    builder, rng, perm = interpreter.interpreter_builder, random.Random(seed), []

    def set_grid_dim(nx, ny, nz):
        _builder_cls.set_grid_dim(builder, nx, ny, nz)
        perm[:] = itertools.product(range(nx), range(ny), range(nz))
        if order == "reversed":
            perm.reverse()
        else:
            rng.shuffle(perm)

    def set_grid_idx(x, y, z):
        _, ny, nz = builder.grid_dim
        _builder_cls.set_grid_idx(builder, *perm[(x * ny + y) * nz + z])

    assert order in ("reversed", "shuffled"), order
    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        del builder.set_grid_dim, builder.set_grid_idx
