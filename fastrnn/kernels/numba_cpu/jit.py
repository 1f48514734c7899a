"""Compile settings shared by every jitted function of the numba backend: the ``@njit`` options,
the disk cache's directory, the 512-bit vector request and a dtype-typed ``1`` for jitted code
(``fastrnn.cells.scalar.one`` compiled).

Disk cache
----------
Numba's own choice of a cache directory (``NUMBA_CACHE_DIR``, else the source file's
``__pycache__``, else ``~/.cache/numba``) raises ``RuntimeError: cannot cache function ...: no
locator available`` at import when none is writable (a read-only install with a read-only HOME).
fastrnn's jitted functions (those whose source is in the fastrnn package; no other function's
caching changes) are cached in the first writable of:

1. ``$NUMBA_CACHE_DIR/<dir>_<hash>`` when the user set ``NUMBA_CACHE_DIR``;
2. the source file's ``__pycache__`` (numba's default; a dev checkout, a user-writable install);
3. the user cache directory, ``$XDG_CACHE_HOME/fastrnn`` (``~/.cache/fastrnn`` on Linux);
4. ``<tempdir>/fastrnn-cache-<uid>``, a directory private to the user (made 0700; one that another
   user owns or may write is refused: cache files are pickles, loading them runs code);
5. none: nothing is saved and every process compiles what it runs.

Whatever the directory, a read-only ``__pycache__`` next to the source that holds a cache
(pre-warmed when the package was installed or the image built) is also read. A cache problem
(I/O error, a corrupt or foreign file) is never an exception: the entry counts as a miss, or is
not saved, with one :class:`CacheWarning`. Nothing is written to the environment.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import os
import pathlib
import stat
import sys
import tempfile
import warnings
from functools import lru_cache

import numpy as np
from numba import types
from numba.core import caching, config
from numba.extending import intrinsic, overload

from fastrnn.cells.scalar import one as _one

# Floating-point contraction (FMA) only: no reassociation, no finite-math assumptions, so results do
# not depend on vector width and NaN/inf propagate as in torch.
_FASTMATH = {"contract"}
# error_model="numpy": float division by zero gives inf/nan instead of raising, which keeps the
# ZeroDivisionError branch out of the gate loops so they vectorize.
# cache: see the module docstring (CACHE_ROOT, FastrnnCacheLocator); False where no directory
# is writable, so that no function of ours tries to save.
# _nrt=False: no Numba runtime (NRT) in our code: it allocates nothing (the launchers pass every
# buffer) and keeps no reference counts, so loading it from the cache needs no runtime, whose
# initialisation compiles for 0.05 s in a process's first call. A function that would allocate
# fails to compile.
_JIT = dict(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy", _nrt=False)


def _host_cpu():
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


# LLVM vectorizes with 256-bit vectors on every AVX-512 CPU unless a function asks for 512 (the
# attribute clang's -mprefer-vector-width=512 sets): on the first AVX-512 cores (Skylake-SP to
# Cooper Lake) 512-bit code lowered the clock. Newer ones do not, and there our loops ask for it:
# measured on Emerald Rapids, the activations run 1.2x (float32) and 1.5x (float64) faster.
WIDE_VECTORS = _host_cpu() not in ("skylake-avx512", "cascadelake", "cooperlake")


def panel_vector_bytes(features, cpu_name=None, wide=WIDE_VECTORS):
    """Bytes of one explicit vector of the panel kernels (vectors.py) for the CPU Numba compiles
    for, given its LLVM ``features`` ("+avx2,+fma,...": NUMBA_CPU_FEATURES, else the host's) and
    ``cpu_name`` (NUMBA_CPU_NAME): 64 where 512-bit code is wanted (AVX-512, ``wide``, no
    target CPU set), 32 with AVX2 and FMA (a 4-row x 2-vector block is then 8 of the 16 ymm
    registers), else 0: no panel kernels."""
    has = set(features.split(","))
    if wide and not cpu_name and "+avx512f" in has:
        return 64
    return 32 if {"+avx2", "+fma"} <= has else 0


def _target_features():
    import llvmlite.binding as llvm
    return config.CPU_FEATURES if config.CPU_FEATURES is not None else \
        llvm.get_host_cpu_features().flatten()


PANEL_VECTOR_BYTES = panel_vector_bytes(_target_features(), config.CPU_NAME)


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



# --------------------------------------------------------------------------- disk cache
_PACKAGE_DIR = os.path.realpath(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
# The directories holding jitted functions of ours: this backend's and the cells' (step math).
_SOURCE_DIRS = (os.path.realpath(os.path.dirname(__file__)),
                os.path.realpath(os.path.dirname(sys.modules["fastrnn.cells"].__file__)))


class CacheWarning(RuntimeWarning):
    """fastrnn's disk cache of compiled code could not be read or written (the code still runs)."""


@lru_cache(maxsize=None)
def _ours(py_file):
    """Whether ``py_file`` is a source file of the fastrnn package."""
    return os.path.realpath(py_file).startswith(_PACKAGE_DIR + os.sep) and os.path.exists(py_file)


def _writable(path):
    """Whether ``path`` is, or could be made, a directory this process creates files in."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _private(path):
    """Whether ``path`` is (made here, mode 0700) a real directory of this user that no other may
    write: a shared temporary directory must not let anyone plant cache files for us to load."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if os.name == "nt":  # per-user temporary directories; no POSIX modes
        return True
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _roots():
    """The candidate cache roots in order, as (kind, directory); "in-tree" is per source dir."""
    roots = [("NUMBA_CACHE_DIR", config.CACHE_DIR)] if config.CACHE_DIR else []
    roots.append(("in-tree", None))
    with contextlib.suppress(Exception):
        from numba.misc.appdirs import AppDirs
        roots.append(("user", AppDirs(appname="fastrnn", appauthor=False).user_cache_dir))
    with contextlib.suppress(Exception):  # gettempdir() raises where no temporary directory works
        user = os.geteuid() if hasattr(os, "geteuid") else os.environ.get("USERNAME", "user")
        roots.append(("temp", os.path.join(tempfile.gettempdir(), f"fastrnn-cache-{user}")))
    return roots


@lru_cache(maxsize=None)
def cache_location(source_dir):
    """``(kind, directory)`` where the jitted functions of ``source_dir`` are cached: the first
    writable of the module docstring's list (kind "NUMBA_CACHE_DIR", "in-tree", "user" or
    "temp"), or ``(None, None)`` where none is."""
    for kind, root in _roots():
        if kind == "in-tree":
            path = os.path.join(source_dir, "__pycache__")
        elif kind == "temp" and not _private(root):
            continue
        else:  # numba's own layout under NUMBA_CACHE_DIR: <source dir name>_<sha1 of its path>
            path = os.path.join(root, caching._CacheLocator.get_suitable_cache_subpath(
                os.path.join(source_dir, "_")))
        if _writable(path):
            return kind, path
    return None, None


def cache_dir():
    """The directory the numba backend's compiled loops are cached in, or None (not cached)."""
    return cache_location(_SOURCE_DIRS[0])[1]


#: Whether compiled code of ours is saved at all (some directory is writable).
CACHING = all(cache_location(d)[1] is not None for d in _SOURCE_DIRS)
_JIT["cache"] = CACHING


class FastrnnCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba's cache locator for fastrnn's own jitted functions (no other function's): the
    directory :func:`cache_location` picks or, where none is writable, the ``__pycache__`` next
    to the source, read only (a pre-warmed cache). Numba tries it before its own locators."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        source_dir = os.path.realpath(os.path.dirname(py_file))
        path = cache_location(source_dir)[1]
        self.writable = path is not None
        self._cache_path = path or os.path.join(source_dir, "__pycache__")

    def get_cache_path(self):
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        return cls(py_func, py_file) if _ours(py_file) else None


_LOCATORS = getattr(caching, "CacheImpl", None) or caching._CacheImpl
_LOCATORS._locator_classes[:] = [FastrnnCacheLocator] + [
    c for c in _LOCATORS._locator_classes if c.__qualname__ != FastrnnCacheLocator.__qualname__]

_WARNED = set()


def _warn(action, path, exc):
    if (action, path) not in _WARNED:
        _WARNED.add((action, path))
        warnings.warn(f"fastrnn: cannot {action} the numba disk cache in {path} "
                      f"({type(exc).__name__}: {exc}); compiled code runs uncached",
                      CacheWarning, stacklevel=4)


class GuardedCache(caching._Cache):
    """A jitted function's disk cache that never raises: loads from ``cache`` (numba's, in the
    directory :class:`FastrnnCacheLocator` picked; None if none is writable), then from
    ``readonly`` (a read-only cache next to the source, pre-warmed), and saves to ``cache``. A
    load error is a miss and a save error a skipped save, each with one :class:`CacheWarning`."""

    def __init__(self, cache, readonly=None):
        self._caches = tuple(c for c in (cache, readonly) if c is not None)
        self._writable = cache

    @property
    def cache_path(self):
        return self._caches[0].cache_path if self._caches else None

    def load_overload(self, sig, target_context):
        # Not numba's Cache.load_overload, which first refreshes target_context: that imports
        # and installs all of numba's typing and lowering registries (0.55 s of a process's first
        # call on a 2-core AMD EPYC), of which our cached machine code needs none (nor the
        # runtime: _JIT). A compile (a miss) refreshes the contexts itself.
        for cache in self._caches:
            try:
                data = cache._load_overload(sig, target_context)
            except Exception as exc:  # a corrupt, foreign or unreadable file
                _warn("read", cache.cache_path, exc)
                continue
            if data is not None:
                return data
        return None

    def save_overload(self, sig, data):
        if self._writable is not None:
            try:
                self._writable.save_overload(sig, data)
            except Exception as exc:  # disk full, directory gone or made read-only
                _warn("write", self._writable.cache_path, exc)

    def enable(self):
        for cache in self._caches:
            cache.enable()

    def disable(self):
        for cache in self._caches:
            cache.disable()

    def flush(self):
        if self._writable is not None:
            with contextlib.suppress(Exception):
                self._writable.flush()


class KeyedCache(caching.FunctionCache):
    """Numba's disk cache of a jitted function of ours, each entry keyed also by the contents of
    this file (the compile settings, ``_JIT``) and of ``files`` (what the function compiles in from
    other files): Numba keys it by the function's own file and bytecode only, so a change of
    either would load stale code (code compiled with the runtime, loaded without it, crashes)."""

    def __init__(self, py_func, files=()):
        super().__init__(py_func)
        self._extra_key = _digest((__file__, *files))

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (self._extra_key,)


@lru_cache(maxsize=None)
def _digest(files):
    return hashlib.sha256(b"".join(pathlib.Path(f).read_bytes() for f in files)).hexdigest()


def _reading(cache, path):
    """numba cache ``cache`` reading directory ``path`` instead (same keys and source stamp)."""
    twin = copy.copy(cache)
    twin._cache_path = path
    twin._cache_file = caching.IndexDataCacheFile(path, cache._impl.filename_base,
                                                  cache._cache_file._source_stamp)
    return twin


def guard_cache(dispatcher):
    """Give ``dispatcher`` (a jitted function of ours) a :class:`GuardedCache`: its cache, made
    safe, plus the read-only ``__pycache__`` next to its source where that holds files and is
    not the cache itself. Where nothing is writable (``cache=False``), the read-only one alone."""
    cache = dispatcher._cache
    if isinstance(cache, GuardedCache):
        return
    if isinstance(cache, caching.NullCache) and CACHING:
        return  # compiled without cache=True on purpose
    if isinstance(cache, caching.NullCache) or type(cache) is caching.FunctionCache:
        cache = KeyedCache(dispatcher.py_func)  # without cache=True: FastrnnCacheLocator, read only
    if not isinstance(cache, caching.Cache):
        return
    locator = cache._impl.locator
    if isinstance(locator, FastrnnCacheLocator) and not locator.writable:
        dispatcher._cache = GuardedCache(None, cache)
        return
    in_tree = os.path.join(os.path.realpath(os.path.dirname(inspect.getfile(dispatcher.py_func))),
                           "__pycache__")
    readonly = None
    if os.path.isdir(in_tree) and os.path.realpath(cache.cache_path) != in_tree:
        readonly = _reading(cache, in_tree)
    dispatcher._cache = GuardedCache(cache, readonly)


def guard_caches(modules):
    """:func:`guard_cache` for every jitted function at module level in ``modules``."""
    from numba.core.dispatcher import Dispatcher
    for module in modules:
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and _ours(inspect.getfile(value.py_func)):
                guard_cache(value)
