"""Installs as users have them: a read-only package with a read-only HOME (a container image),
nothing writable at all, a backend that fails to load or compile, and the cost of
``import fastrnn``.

Read-only directories are emulated in the child processes by an audit hook that refuses every
write under them (as a read-only mount does, for root too), on top of ``chmod a-w`` (which alone
does not stop root)."""
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastrnn
from fastrnn import backends
from fastrnn.kernels import numba_cpu

PACKAGE = os.path.dirname(fastrnn.__file__)

# Prepended to the child scripts: writes under READ_ONLY raise PermissionError (EACCES).
READ_ONLY_PROLOGUE = """\
import errno, os, sys
READ_ONLY = tuple(os.path.realpath(p) + os.sep for p in {read_only!r})

def _under(path):
    try:
        path = os.path.realpath(os.fsdecode(path)) + os.sep
    except (TypeError, ValueError):
        return False
    return path.startswith(READ_ONLY)

def _refuse(path):
    raise PermissionError(errno.EACCES, "read-only file system (emulated)", os.fsdecode(path))

def _hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writes = (mode is not None and any(c in mode for c in "wax+")) or \\
                 (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and _under(args[0]):
            _refuse(args[0])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod") and _under(args[0]):
        _refuse(args[0])
    elif event in ("os.rename", "os.replace") and (_under(args[0]) or _under(args[1])):
        _refuse(args[1])

sys.addaudithook(_hook)
"""

# LSTM(10, 20) on a (5, 3, 10) input against torch.nn with the same weights; prints what
# dispatch chose and where the cache is.
FORWARD = """
import warnings
warnings.simplefilter("error", RuntimeWarning)  # a fallback or a cache problem fails the run
import torch
import fastrnn
from fastrnn.kernels.numba_cpu import jit
torch.manual_seed(0)
ref = torch.nn.LSTM(10, 20)
mod = fastrnn.LSTM(10, 20)
mod.load_state_dict(ref.state_dict())
x = torch.randn(5, 3, 10, requires_grad={train})
choice = mod.backend_for(x)
out, (h, c) = mod(x)
want, (h_want, c_want) = ref(x)
torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
if {train}:
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    want.sum().backward()
    torch.testing.assert_close(grad, x.grad, atol=1e-5, rtol=1e-4)
from fastrnn.kernels.numba_cpu import loops
stats = loops._forward_thread.stats
print("choice", choice.name, "|", choice.reason)
print("cache", jit.CACHING, *jit.cache_location(jit._SOURCE_DIRS[0]))
print("forward loop hits", sum(stats.cache_hits.values()),
      "misses", sum(stats.cache_misses.values()))
print("fastrnn from", fastrnn.__file__)
"""


def _install_copy(root, with_cache_from=None):
    """A copy of the fastrnn package under ``root`` (no __pycache__), read-only; optionally with
    the disk cache of another run (the numba_cpu and cells cache directories of ``with_cache_from``
    as their __pycache__: a pre-warmed install)."""
    target = os.path.join(root, "fastrnn")
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    if with_cache_from:
        for sub in os.listdir(with_cache_from):
            name = sub.rsplit("_", 1)[0]  # <source dir name>_<sha1 of its path>
            dest = {"numba_cpu": os.path.join(target, "kernels", "numba_cpu"),
                    "cells": os.path.join(target, "cells")}[name]
            shutil.copytree(os.path.join(with_cache_from, sub), os.path.join(dest, "__pycache__"))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    os.chmod(root, 0o555)
    return root


def _run(script, read_only, env_extra, tmp_path, prologue=""):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH"))}
    env.update(env_extra, PYTHONDONTWRITEBYTECODE="1")
    code = READ_ONLY_PROLOGUE.format(read_only=list(read_only)) + prologue + script
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


@pytest.fixture(scope="module")
def read_only_runs(tmp_path_factory):
    """Two processes on a read-only copy of the package with a read-only HOME:
    1. with a writable temporary directory (a cold cache: compiles into it);
    2. with nothing writable at all, the copy pre-warmed with the cache run 1 made."""
    base = tmp_path_factory.mktemp("install")
    home = base / "home"
    home.mkdir()
    tmp = base / "tmp"
    tmp.mkdir()
    site = _install_copy(str(base / "site"))
    first = _run(FORWARD.format(train=False), [site, str(home)],
                 {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": site}, base)
    temp_cache = os.path.join(str(tmp), f"fastrnn-cache-{os.geteuid()}")
    warm_site = _install_copy(str(base / "site-warm"), with_cache_from=temp_cache)
    nothing = str(base / "nowhere")
    second = _run(FORWARD.format(train=True), [warm_site, str(home), str(tmp)],
                  {"HOME": str(home), "TMPDIR": nothing, "PYTHONPATH": warm_site}, base,
                  prologue=f"import tempfile\ntempfile.tempdir = {nothing!r}\n")
    yield first, second, site, warm_site, str(tmp)
    for root in (site, warm_site):
        for dirpath, dirnames, _ in os.walk(root):
            os.chmod(dirpath, 0o755)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX temporary directory naming")
def test_read_only_install_and_home_caches_in_a_private_temporary_directory(read_only_runs):
    first, _, site, _, tmp = read_only_runs
    assert first["fastrnn"].startswith("from " + site)
    assert first["choice"].startswith("numba |"), first
    caching, kind, where = first["cache"].split()
    assert (caching, kind) == ("True", "temp")
    assert where.startswith(os.path.join(tmp, f"fastrnn-cache-{os.geteuid()}"))
    assert stat.S_IMODE(os.stat(os.path.dirname(where)).st_mode) == 0o700
    assert any(name.endswith(".nbi") for name in os.listdir(where))


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX temporary directory naming")
def test_nothing_writable_loads_a_prewarmed_read_only_cache_and_compiles_the_rest(read_only_runs):
    """No writable directory at all: nothing is saved, the forward loop loads from the read-only
    cache shipped in the package, the backward loop compiles uncached, no error, no warning."""
    _, second, _, warm_site, _ = read_only_runs
    assert second["fastrnn"].startswith("from " + warm_site)
    assert second["choice"].startswith("numba |"), second
    assert second["cache"].split() == ["False", "None", "None"]
    assert second["forward"] == "loop hits 1 misses 0"


def test_a_backend_that_fails_to_load_makes_auto_fall_back_to_native_saying_why(monkeypatch):
    def broken():
        raise RuntimeError("cannot cache function '_expm1_neg_f64': no locator available")

    monkeypatch.setattr(numba_cpu, "load", broken)
    backends.forget()
    try:
        torch.manual_seed(0)
        ref = torch.nn.GRU(4, 3)
        mod = fastrnn.GRU(4, 3)
        mod.load_state_dict(ref.state_dict())
        with pytest.warns(RuntimeWarning, match="numba failed to load"):
            choice = mod.backend_for(None)
        assert choice.name == "native"
        assert "numba failed to load (RuntimeError: cannot cache function" in choice.reason
        x = torch.randn(5, 2, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.testing.assert_close(mod(x)[0], ref(x)[0])
            with pytest.raises(fastrnn.BackendUnavailable, match="no locator available"):
                backends.choose("numba", "gru", "cpu", torch.float32)
    finally:
        monkeypatch.undo()
        backends.forget()
    assert fastrnn.GRU(4, 3).backend_for(None).name == "numba"


def test_a_compile_failure_makes_auto_fall_back_to_native_saying_why(monkeypatch):
    def fails(cell, dtype, proj_size=0):
        raise RuntimeError(f"LLVM ERROR: cannot select (compiling {cell})")

    monkeypatch.setattr(numba_cpu, "prepare", fails)
    backends.forget()
    try:
        with pytest.warns(RuntimeWarning, match="numba failed to compile the lstm forward"):
            choice = fastrnn.LSTM(3, 2).backend_for(None)
        assert choice.name == "native"
        assert "numba failed to compile the lstm forward for float32 (RuntimeError: LLVM ERROR" \
            in choice.reason
        with pytest.raises(fastrnn.BackendUnavailable, match="LLVM ERROR") as info:
            fastrnn.LSTM(3, 2, backend="numba")(torch.randn(2, 1, 3))
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        monkeypatch.undo()
        backends.forget()


def test_a_cache_that_fails_is_a_miss_and_an_unsaved_entry_never_an_error():
    from fastrnn.kernels.numba_cpu import jit

    class Broken:
        cache_path = "/broken"

        def _load_overload(self, sig, target_context):  # what GuardedCache calls
            raise EOFError("Ran out of input")  # a truncated index file

        def save_overload(self, sig, data):
            raise OSError(28, "No space left on device")

    class Warm(Broken):
        def _load_overload(self, sig, target_context):
            return "compiled"

    from numba.core.registry import cpu_target
    context = cpu_target.target_context
    jit._WARNED.clear()
    with pytest.warns(jit.CacheWarning) as record:
        assert jit.GuardedCache(Broken()).load_overload(None, context) is None
        jit.GuardedCache(Broken()).save_overload(None, None)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "fastrnn: cannot read the numba disk cache in /broken",
        "fastrnn: cannot write the numba disk cache in /broken"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jit.GuardedCache(Broken(), Warm()).load_overload(None, context) == "compiled"
        jit.GuardedCache(None, Warm()).save_overload(None, None)  # read only: nothing to save


# Every cell's forward and backward (float32: dense, packed, inference) against torch.nn, the
# forward and backward loops loaded (the backward's on one thread inside bptt's one call), then
# whether numba had to load its typing and lowering registries (numba.np.linalg is one of the
# modules only that loads), then a float64 call that may compile (a miss after cached loads).
WARM_CALLS = """
import sys, torch, fastrnn
from torch.nn.utils.rnn import pack_padded_sequence
from fastrnn.kernels.numba_cpu import bptt, loops
torch.manual_seed(0)
for mine, theirs in ((fastrnn.LSTM, torch.nn.LSTM), (fastrnn.GRU, torch.nn.GRU),
                     (fastrnn.RNN, torch.nn.RNN)):
    ref = theirs(6, 8, num_layers=2, bidirectional=True)
    mod = mine(6, 8, num_layers=2, bidirectional=True)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6)
    for inp in (x, pack_padded_sequence(x, [5, 4, 2])):
        got, want = mod(inp)[0], ref(inp)[0]
        got, want = (got.data, want.data) if inp is not x else (got, want)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        got.sum().backward()
        want.sum().backward()
        for p, q in zip(mod.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(mod(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)
loops_of = ((loops._forward_thread,), (loops._backward_thread, bptt._bptt))  # forward, backward
loaded = [sum(sum(f.stats.cache_hits.values()) for f in fs) for fs in loops_of]
compiled = [sum(sum(f.stats.cache_misses.values()) for f in fs) for fs in loops_of]
from numba.core.runtime import rtsys
print("loaded", loaded, "compiled", compiled, "registries", "numba.np.linalg" in sys.modules,
      "array module", "numba.np.arrayobj" in sys.modules, "runtime", rtsys._init)
ref, mod = torch.nn.GRU(3, 5).double(), fastrnn.GRU(3, 5).double()
mod.load_state_dict(ref.state_dict())
x = torch.randn(4, 2, 3, dtype=torch.float64)
torch.testing.assert_close(mod(x)[0], ref(x)[0])
print("float64 ok")
"""


def test_a_warm_cache_loads_without_numbas_registries_and_compiles_after():
    """With the loops cached, a process's first calls load them without numba's typing and
    lowering registries (0.55 s of a first call: fastrnn's cache skips numba's refresh of them
    on a load), its array module (0.05 s) or its runtime (0.05 s: no compiled code of ours
    allocates), with results equal to torch.nn's; a compile after such loads still works."""
    def run():
        return subprocess.run([sys.executable, "-c", WARM_CALLS], capture_output=True, text=True,
                              timeout=900)

    first = run()  # warms whatever the cache lacks
    assert first.returncode == 0, first.stderr[-4000:]
    warm = run()
    assert warm.returncode == 0, warm.stderr[-4000:]
    lines = warm.stdout.splitlines()
    assert lines[0] == ("loaded [3, 3] compiled [0, 0] registries False array module False "
                        "runtime False"), lines
    assert lines[1] == "float64 ok"


def test_cache_entries_are_keyed_by_the_compile_settings_and_inlined_files():
    """Numba keys a cache entry by the function's own file; ours also by the compile settings
    (jit.py) and, for the loops, the files they inline: code cached with other settings (say
    with the runtime, which a load no longer initializes) must never load."""
    numba_cpu.load()
    from numba import float32, types
    from numba.core.dispatcher import Dispatcher

    from fastrnn.kernels.numba_cpu import (buffers, express, jit, loops, matmul, projection,
                                           team, vectors)
    ours = [value for module in (buffers, loops, express, matmul, projection)
            for value in vars(module).values()
            if isinstance(value, Dispatcher) and jit._ours(value.py_func.__code__.co_filename)]
    assert buffers._aligned_start in ours and loops._forward_thread in ours
    assert express._express_forward in ours and matmul._matmul_rows in ours
    inlined = {loop: loops._INLINED for loop in (
        loops._forward_thread, loops._layer_start, loops._backward_thread, loops._forward_team,
        loops._backward_team)}
    inlined[express._express_forward] = (*loops._INLINED, loops.__file__, projection.__file__)
    inlined[matmul._matmul_rows] = inlined[matmul._project_in_place] = (vectors.__file__,)
    inlined[projection._project_thread] = inlined[projection._project_team] = (
        matmul.__file__, team.__file__, vectors.__file__)
    sig = (types.Array(float32, 1, "C"),)
    for dispatcher in ours:
        cache = dispatcher._cache._caches[0]
        assert isinstance(cache, jit.KeyedCache), dispatcher
        files = tuple(map(str, inlined.get(dispatcher, ())))
        key = cache._index_key(sig, dispatcher.targetctx.codegen())
        assert key[-1] == jit._digest((jit.__file__, *files)), dispatcher
    assert jit._JIT["_nrt"] is False  # no runtime in our compiled code: see the warm test


def test_import_loads_no_dynamo_triton_or_numba_and_leaves_the_environment_alone():
    script = textwrap.dedent("""
        import os, sys
        import torch
        before = dict(os.environ)
        import fastrnn
        lstm = fastrnn.LSTM(3, 4)
        heavy = [m for m in ("torch._dynamo", "torch._inductor", "triton", "numba")
                 if m in sys.modules]
        print(heavy, sorted(set(os.environ.items()) ^ set(before.items())))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[] []"


def test_resolve_is_a_constant_to_torch_compile_as_torchs_decorator_makes_it():
    """``backends.resolve`` is marked as ``torch.compiler.assume_constant_result`` marks a
    function (without importing Dynamo): that decorator must still only set this attribute."""
    import torch._dynamo

    def fn():
        return 0

    before = set(vars(fn))
    torch._dynamo.assume_constant_result(fn)
    assert {k: v for k, v in vars(fn).items() if k not in before} == {
        "_dynamo_marked_constant": True}
    assert backends.resolve._dynamo_marked_constant is True
