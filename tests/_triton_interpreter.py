"""Test-harness changes to Triton's CPU interpreter (``TRITON_INTERPRET=1``).

bf16 dots: the interpreter keeps a bfloat16 tensor as its uint16 bit patterns (numpy has no
bfloat16), and its ``InterpreterBuilder.create_dot`` hands those to ``np.matmul`` as they are: a
bf16 x bf16 ``tl.dot`` multiplies the bit patterns as integers (Triton 3.6 and 3.9). conftest.py
calls :func:`install`, which widens bf16 operands exactly to float32 first, so that the dot
computes what a GPU does: exact products summed in the float32 accumulator. The kernels run
``tl.dot`` on their real operand dtypes, as compiled for a GPU. Casts from float32 to bf16: the
interpreter drops the low 16 bits (rounds toward zero); :func:`install` rounds them to nearest
even, as a GPU's ``cvt.rn.bf16.f32`` (and torch) do.

Program order: :func:`program_order` runs every launch's programs in reversed or shuffled order
instead of the interpreter's x, y, z loop.

Concurrency: :func:`threaded_programs` runs every program of a launch at once, each in its own
thread (the persistent kernel's programs wait for each other within the launch, which the
sequential loop cannot run), one of them optionally lagging before every memory operation.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import random
import sys
import threading
import time

import numpy as np
import pytest
import triton
import triton.language as tl
from triton.runtime import interpreter

_builder_cls = getattr(interpreter, "InterpreterBuilder", None)
_MEMORY_OPS = ("create_load", "create_masked_load", "create_store", "create_masked_store",
               "create_atomic_rmw", "create_atomic_cas")
_HOOKS = ("create_dot", "cast_impl", "set_grid_dim", "set_grid_idx",
          "create_get_program_id") + _MEMORY_OPS
_executor_cls = getattr(interpreter, "GridExecutor", None)
_function_cls = getattr(interpreter, "InterpretedFunction", None)
#: What this harness patches and the installed Triton lacks (empty: all there).
MISSING = [name for name in ("TensorHandle", "InterpreterBuilder", "interpreter_builder",
                             "GridExecutor", "InterpretedFunction", "InterpreterError",
                             "_patch_lang", "_implicit_cvt")
           if not hasattr(interpreter, name)] + [
    f"InterpreterBuilder.{name}" for name in _HOOKS if not hasattr(_builder_cls, name)] + [
    f"GridExecutor.{name}" for name in ("_init_args_hst", "_restore_args_dev")
    if not hasattr(_executor_cls, name)] + (
    [] if hasattr(_function_cls, "rewrite") else ["InterpretedFunction.rewrite"])
_original_dot = getattr(_builder_cls, "create_dot", None)
_original_cast = getattr(_builder_cls, "cast_impl", None)


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


def _cast_impl(self, src, dst_type):
    """float32 -> bf16 rounded to nearest even (NaN stays NaN); other casts as the interpreter's."""
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
        return interpreter.TensorHandle(rounded, tl.bfloat16)
    return _original_cast(self, src, dst_type)


def install():
    """Correct the interpreter's bf16 dot and float32 -> bf16 cast (module docstring); a no-op
    if MISSING."""
    if not MISSING:
        _builder_cls.create_dot = _create_dot
        _builder_cls.cast_impl = _cast_impl


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


def _threaded_call(self, *args_dev, **kwargs):
    """``GridExecutor.__call__`` with every program of the grid in its own thread (the stock
    one's steps otherwise: arguments to host tensors, pre-run hooks, the language patched,
    results copied back)."""
    spec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    scope = interpreter._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {n: a if n in self.constexprs else interpreter._implicit_cvt(a)
                for n, a in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        interpreter.interpreter_builder.set_grid_dim(*grid)
        errors = []

        def program(idx):
            try:
                _THREAD.idx = idx
                self.fn(**args)
            except BaseException as error:  # noqa: BLE001 -- re-raised below, first one
                errors.append(error)

        threads = [threading.Thread(target=program, args=(idx,), daemon=True)
                   for idx in itertools.product(*map(range, grid))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + _STATE["join_s"]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise TimeoutError(f"a program of {self.fn.__name__} still runs after "
                               f"{_STATE['join_s']} s: a deadlock")
        if errors:
            raise errors[0]
    finally:
        scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def _device_call(self, *args, **kwargs):
    """``InterpretedFunction.__call__`` (a ``@triton.jit`` helper called from a kernel) with
    its language patching and first-call AST rewrite under a lock: unguarded, programs calling
    helpers at once change the globals another one iterates over."""
    with _PATCHING:
        interpreter._patch_lang(self.fn)
        fn = self.rewrite()
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        raise interpreter.InterpreterError(repr(error)) from error


_THREAD = threading.local()
_ATOMIC = threading.Lock()
_PATCHING = threading.Lock()
_STATE = {"lagging": None, "delay_s": 0.0, "join_s": 600.0, "poll_s": 1e-4}


def _memory_op(original, atomic):
    def op(self, *args, **kwargs):
        if _STATE["lagging"] is not None and getattr(_THREAD, "idx", None) == _STATE["lagging"]:
            time.sleep(_STATE["delay_s"])
        if not atomic:
            return original(self, *args, **kwargs)
        with _ATOMIC:  # one read-modify-write at a time, as the hardware does
            result = original(self, *args, **kwargs)
        time.sleep(_STATE["poll_s"])  # a polling program lets the others run
        return result
    return op


@contextlib.contextmanager
def threaded_programs(lagging=None, delay_s=0.002, join_s=600.0):
    """Within the block, every launch runs its programs concurrently, each in its own thread
    with its own program id; ``lagging`` (a grid index (x, y, z)) sleeps ``delay_s`` before each
    of its loads, stores and atomics, so that the others run ahead of it; every atomic (a poll)
    then sleeps 0.1 ms, letting the others run. A launch whose programs do not all end within
    ``join_s`` seconds raises TimeoutError (a deadlock)."""
    require()
    saved = {name: _builder_cls.__dict__[name] for name in _MEMORY_OPS}
    saved_call, saved_switch = _executor_cls.__call__, sys.getswitchinterval()
    saved_device_call = _function_cls.__call__
    _STATE.update(lagging=lagging, delay_s=delay_s, join_s=join_s)
    for name in _MEMORY_OPS:
        setattr(_builder_cls, name, _memory_op(saved[name], name.startswith("create_atomic")))
    _builder_cls.grid_idx = property(lambda self: getattr(_THREAD, "idx", None),
                                     lambda self, value: setattr(_THREAD, "idx", value))
    _executor_cls.__call__ = _threaded_call
    _function_cls.__call__ = _device_call
    sys.setswitchinterval(1e-4)  # switch threads often: more interleavings
    try:
        yield
    finally:
        sys.setswitchinterval(saved_switch)
        _executor_cls.__call__ = saved_call
        _function_cls.__call__ = saved_device_call
        del _builder_cls.grid_idx
        for name, op in saved.items():
            setattr(_builder_cls, name, op)
        _STATE.update(lagging=None)
