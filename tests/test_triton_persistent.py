"""The persistent strategy (the tiled kernels ``kernels._forward_tiled_kernel`` and
``_backward_tiled_kernel`` of the step strategy, launched once for all their passes instead of
once per pass, cooperatively; each step the programs of a batch block hand h (forward: a
ping-pong pair of global buffers) or the gate gradients (backward: rows of their own per step)
over, with a release arrival and an acquire poll) proven without a GPU:

- run concurrently under the interpreter (``_triton_interpreter.threaded_programs``: every
  program in its own thread), bitwise equal to the step strategy (the same tiles, products and
  order), with each program in turn lagging before every memory operation; the parity tests of
  ``test_kernels_triton.py`` run it against the float64 reference for every cell, dtype,
  direction, dense and packed;
- two mutants of the handoff that must be caught: one h buffer (a program overwrites h_{s-1}
  while a slower one still reads it) gives wrong outputs; a barrier that waits for one arrival
  too many (a deadlock) ends in the launcher's exception, as does the stock sequential
  interpreter, whose programs cannot wait for each other -- never a hang;
- the PTX of the AOT compiles (sm_80, sm_90): the arrival is a gpu-scope release add right after
  a CTA barrier, each poll an acquire load that a CTA barrier separates from every later global
  load; the only other atomic is the error count;
- its dispatch: only on a CUDA device whose SMs hold the grid at one program each. (Registers,
  spills and shared memory of every configuration, and the occupancy: ``test_triton_aot.py``.)
"""
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import unittest.mock
import warnings

import pytest
import torch

tg = pytest.importorskip("fastrnn.kernels.triton_gpu")
from fastrnn.kernels.triton_gpu import configs, launch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")
from test_kernels_triton import forced, launcher_inputs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = [19, 19, 17, 16, 3, 1]  # two batch blocks of 16 rows, the second partly masked
HIDDEN = 40                     # with 16-unit tiles: three hidden programs, three K chunks
TILES = dict(block_h=16, block_k=16)
RESIDENT = dict(block_h=16, block_k=16, k_pad=64)  # W_hh resident: H = 40 in 3 (of 4) chunks


def _forward(cell, strategy, reverse=False, lagging=None, dense=False, tiles=TILES,
             dtype=torch.float32):
    """Forward (save=True) then backward of ``strategy`` on a fixed case: (y, h_n, c_n, h_prev,
    stash) and the 8 gradients of the launchers."""
    sizes = torch.tensor([SIZES[0]] * 4 if dense else SIZES)
    a = {k: None if v is None else v.to(dtype)
         for k, v in launcher_inputs(cell, sizes.tolist(), HIDDEN).items()}
    with forced(strategy, tiles, lagging):
        y, h_n, c_n, saved = tg.recurrence_forward(
            cell, a["xg"], a["h0"], a["c0"], a["w_hh"], a["b_hn"], None, sizes, reverse,
            w_cell=a["w_cell"])
        grads = tg.recurrence_backward(
            cell, torch.cos(y), torch.sin(h_n), None if c_n is None else torch.sin(2 * c_n),
            a["h0"], a["c0"], a["w_hh"], a["b_hn"], None, sizes, reverse, y, saved,
            w_cell=a["w_cell"])
    return (y, h_n, c_n) + tuple(saved) + tuple(grads)


def _assert_equal(got, want):
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.equal(g, w)


@needs_interpreter
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", configs.CELLS)
def test_equals_the_step_strategy_bitwise(cell, reverse):
    """Outputs, final states, everything saved for backward and every gradient: bit for bit the
    step kernels'."""
    _assert_equal(_forward(cell, "persistent", reverse), _forward(cell, "step", reverse))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_16bit_models_equal_the_step_strategy_bitwise(cell, dtype):
    """float16 and bfloat16 (h crosses programs in float32, rounded to the dtype for the
    products, as in one step launch): the step kernels' results bit for bit."""
    _assert_equal(_forward(cell, "persistent", dtype=dtype), _forward(cell, "step", dtype=dtype))


@needs_interpreter
@pytest.mark.parametrize("lagging", [(0, 0, 0), (1, 1, 0), (0, 2, 0)], ids=str)
def test_a_lagging_program_changes_nothing(lagging):
    """One program (batch block, hidden block) sleeps before each of its memory operations, so
    the others run ahead and wait for it at every step, forward and backward: same bits."""
    _assert_equal(_forward("lstm", "persistent", lagging=lagging), _forward("lstm", "step"))


@needs_interpreter
@pytest.mark.parametrize("lagging", [(0, 0, 0), (1, 2, 0)], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resident_weights_with_a_lagging_program_change_nothing(cell, lagging):
    """With W_hh resident (each product's reduction split in chunks, a batched tl.dot) and a
    program lagging: the same bits as without the lag, and the step kernels' results within
    float32 rounding (the chunks are summed in another order than the step kernels' running
    sum; the parity tests check it against the float64 reference)."""
    got = _forward(cell, "persistent", lagging=lagging, tiles=RESIDENT)
    if lagging != (0, 0, 0):
        _assert_equal(got, _forward(cell, "persistent", tiles=RESIDENT))
    for g, w in zip(got, _forward(cell, "step")):
        assert (g is None and w is None) or torch.allclose(g, w, rtol=1e-5, atol=1e-5)


def _one_buffer(B, H, grid):
    return 0, grid[1]


def _one_arrival_too_many(B, H, grid):
    return B * H, grid[1] + 1


@needs_interpreter
@pytest.mark.parametrize("tiles", [TILES, RESIDENT], ids=["streamed", "resident"])
@pytest.mark.parametrize("lagging", [(0, 0, 0), (0, 1, 0)], ids=str)
def test_single_buffer_mutant_is_caught(lagging, tiles):
    """Mutant: h_s written over h_{s-1} (one buffer): while the lagging program still reads
    h_{s-1}, the others overwrite it -- the harness shows wrong outputs."""
    want = _forward("rnn_tanh", "step", dense=True)[0]
    with unittest.mock.patch.object(launch, "handoff", _one_buffer):
        got = _forward("rnn_tanh", "persistent", lagging=lagging, dense=True, tiles=tiles)[0]
    assert (got - want).abs().max() > 0.1


@needs_interpreter
def test_miscounted_barrier_mutant_raises_instead_of_hanging():
    """Mutant: each step waits for one arrival more than there are programs (here the forward's
    launch; the backward's uses the same arguments). Every program gives up after MAX_POLLS
    polls, counts the error and no longer waits; the launcher raises."""
    with unittest.mock.patch.object(launch, "handoff", _one_arrival_too_many), \
            pytest.raises(RuntimeError, match="waited over 2000 polls"):
        with unittest.mock.patch.object(launch, "MAX_POLLS", 2000):
            _forward("rnn_tanh", "persistent", dense=True)


@needs_interpreter
def test_programs_that_cannot_all_run_at_once_raise():
    """The stock interpreter runs one program after another (what a grid larger than the
    device's resident capacity would do without a cooperative launch): the first program's
    wait for the others times out and the call raises, not hangs."""
    a = launcher_inputs("gru", SIZES, HIDDEN)
    with tg.forced_strategy("persistent", **TILES), \
            unittest.mock.patch.object(launch, "MAX_POLLS", 300), \
            pytest.raises(RuntimeError, match="not all resident"):
        tg.recurrence_forward("gru", a["xg"], a["h0"], None, a["w_hh"], a["b_hn"], None,
                              torch.tensor(SIZES), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_refused_cooperative_launch_falls_back_to_step(monkeypatch):
    """A device that refuses the cooperative launch (fewer SMs than it reports under MPS, say):
    a warning, the step kernels' results, and no persistent launch there again."""
    class Refusing:  # the kernel, but a cooperative launch fails
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch_or_refuse(*args, **kwargs):
                if kwargs.get("launch_cooperative_grid"):
                    raise RuntimeError("CUDA error: too many blocks in cooperative launch")
                return self.kernel[grid](*args, **kwargs)
            return launch_or_refuse
    monkeypatch.setattr(launch, "PERSISTENT_FAILED", {})
    want = _forward("lstm", "step", tiles={})
    for name in ("_forward_tiled_kernel", "_backward_tiled_kernel"):
        monkeypatch.setattr(launch, name, Refusing(getattr(launch, name)))
    with pytest.warns(RuntimeWarning, match="persistent launch failed"):
        got = _forward("lstm", "persistent", tiles={})
    _assert_equal(got, want)
    assert list(launch.PERSISTENT_FAILED) == [got[0].device]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked no more: step, without a warning
        _assert_equal(_forward("lstm", "persistent", tiles={}), want)


# ----------------------------------------------------------------------------------------------
# Dispatch (no kernel runs).
# ----------------------------------------------------------------------------------------------
H200 = configs.DeviceLimits(90, 232448, 65536, 132)


def test_dispatch_where_the_grid_fits_the_sms():
    """Beyond the fused limit: persistent while ceil(B/16) * ceil(H/32) <= SMs, step
    otherwise; never on the interpreter (no cooperative launch there) unless forced."""
    def strategy(direction, hidden, batch, limits=H200, dtype=torch.bfloat16):
        return configs.select_config(direction, "lstm", dtype, hidden, limits=limits,
                                     batch=batch).strategy
    assert strategy("forward", 128, 64) == "fused"
    assert strategy("forward", 1024, 64) == "persistent"      # 4 x 32 = 128 programs
    assert strategy("forward", 1024, 65) == "step"            # 5 x 32 = 160 > 132
    assert strategy("forward", 512, 128) == "persistent"      # 8 x 16 = 128
    assert strategy("forward", 1024, 64, H200._replace(sms=127)) == "step"
    assert strategy("forward", 1024, 16, None) == "step"
    assert strategy("backward", 1024, 16) == "persistent"
    assert strategy("backward", 65, 8) == "persistent"         # over the bf16 lstm backward's 64
    assert strategy("forward", 65, 8) == "fused"
    assert strategy("forward", 65, 8, dtype=torch.float32) == "persistent"
    with tg.forced_strategy("persistent"):
        assert strategy("forward", 16, 1, None) == strategy("backward", 16, 1, None) == \
            "persistent"
    note = configs.strategy_note("lstm", torch.bfloat16, H200)
    assert "persistent launch" in note and "<= 132 SMs" in note


def test_dispatch_keeps_the_weights_resident_where_they_fit():
    """Persistent calls keep W_hh resident (the least bucket >= H) where the device's class has
    such a kernel and its grid, ceil(B/16) * ceil(H/16), fits the SMs; else they stream it."""
    def config(direction, hidden, batch, dtype=torch.bfloat16, limits=H200, cell="lstm"):
        c = configs.select_config(direction, cell, dtype, hidden, limits=limits, batch=batch)
        return c.strategy, c.k_pad, c.block_h
    assert config("forward", 1024, 16) == ("persistent", 1024, 16)   # 64 programs
    assert config("forward", 1024, 32) == ("persistent", 1024, 16)   # 2 x 64 = 128
    assert config("forward", 1024, 64) == ("persistent", 0, 32)      # 4 x 64 > 132: streamed
    assert config("forward", 300, 64) == ("persistent", 512, 16)     # 4 x 19
    assert config("backward", 1024, 16) == ("persistent", 1024, 16)
    assert config("backward", 512, 64) == ("persistent", 512, 16)    # 4 x 32
    assert config("backward", 512, 8, torch.float32) == ("persistent", 512, 16)
    assert config("forward", 256, 8, torch.float32) == ("persistent", 256, 16)
    assert config("forward", 257, 8, torch.float32) == ("persistent", 0, 32)
    assert config("forward", 1024, 16, cell="rnn_tanh") == ("persistent", 1024, 16)
    sm86 = configs.DeviceLimits(86, 101376, 65536, 84)
    assert config("forward", 1024, 16, limits=sm86) == ("persistent", 0, 32)
    assert config("forward", 512, 16, limits=sm86) == ("persistent", 512, 16)
    with pytest.raises(ValueError, match="k_pad 64 < H=65"), \
            tg.forced_strategy("persistent", **RESIDENT):
        configs.select_config("forward", "lstm", torch.float32, 65)


def test_launch_options_are_cooperative_with_every_register():
    """A persistent launch is cooperative (all programs resident or no launch) with maxnreg
    255 (one program per SM: without it ptxas stopped 16-bit kernels at 128 and spilled)."""
    config = configs.select_config("forward", "gru", torch.float16, 4096, limits=H200, batch=1)
    assert config.strategy == "persistent"
    assert configs.launch_options(config) == dict(
        num_warps=config.num_warps, enable_fp_fusion=configs.FP_FUSION,
        launch_cooperative_grid=True, maxnreg=configs.MAX_REGISTERS)
    step = configs.select_config("forward", "gru", torch.float16, 4096, limits=H200, batch=999)
    assert "launch_cooperative_grid" not in configs.launch_options(step)


# ----------------------------------------------------------------------------------------------
# The handoff in the PTX of the AOT compile.
# ----------------------------------------------------------------------------------------------
def handoff_problems(ptx):
    """What is wrong with the cross-program handoff in ``ptx`` (empty: nothing): exactly one
    arrival, a ``red.global.gpu.release.add`` after a ``bar.sync`` with no global store between;
    every acquire (the polls) a ``ld.global.gpu.acquire`` with a ``bar.sync`` before the next
    global load or ``cp.async``; the only other atomic a relaxed add (the error count)."""
    code = [line.strip() for line in ptx.splitlines()]
    code = [line for line in code if line and not line.startswith(("//", ".loc", "$L__tmp"))]
    atomics = [i for i, line in enumerate(code) if re.search(r"\b(red|atom)\.", line)]
    releases = [i for i in atomics if ".release." in code[i]]
    relaxed = [i for i in atomics if ".relaxed." in code[i]]
    polls = [i for i, line in enumerate(code) if ".acquire." in line]
    problems = []
    if len(releases) != 1 or not all("red.global.gpu.release.add" in code[i] for i in releases):
        problems.append(f"arrivals: {[code[i] for i in releases]}")
    if len(relaxed) != 1 or len(atomics) != 2:
        problems.append(f"atomics other than one arrival and the error count: "
                        f"{[code[i] for i in atomics]}")
    for i in releases:
        barrier = max((j for j in range(i) if code[j].startswith("bar.sync")), default=-1)
        if barrier < 0 or any("st.global" in line for line in code[barrier:i]):
            problems.append(f"no bar.sync right before the arrival at instruction {i}")
    if not polls or not all("ld.global.gpu.acquire" in code[i] for i in polls):
        problems.append(f"polls: {[code[i] for i in polls]}")
    for i in polls:
        later = [j for j in range(i + 1, len(code)) if "cp.async." in code[j] or (
            "ld.global" in code[j] and ".acquire." not in code[j])]
        if later and not any(code[j].startswith("bar.sync") for j in range(i, later[0])):
            problems.append(f"global load {code[later[0]]!r} follows the poll at {i} "
                            f"without a bar.sync")
    return problems


@pytest.fixture(scope="module")
def persistent_ptx():
    """{(kernel, cell, dtype, resident, cc): PTX} of the persistent kernels (the forward with
    stash; resident: the largest bucket), compiled for sm_80 and sm_90 in one worker process
    (no interpreter there)."""
    largest = {}
    for c in configs.CONFIGS:
        if c.strategy == "persistent" and c.save and c.dtype != "float16":
            key = (c.kernel, c.cell, c.dtype, bool(c.k_pad))
            largest[key] = max(largest.get(key, c), c, key=lambda c: c.k_pad)
    work = [(dataclasses.asdict(c), cc) for c in largest.values() for cc in (80, 90)]
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import triton_aot as a; "
            "from fastrnn.kernels.triton_gpu.configs import KernelConfig; "
            "print(json.dumps([a.compile_config(KernelConfig(**f), cc).asm['ptx'] "
            "for f, cc in json.load(sys.stdin)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], env=env,
                          input=json.dumps(work), capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"AOT compile failed:\n{proc.stderr[-3000:]}")
    texts = json.loads(proc.stdout)
    return {(f["kernel"], f["cell"], f["dtype"], bool(f["k_pad"]), cc): ptx
            for (f, cc), ptx in zip(work, texts)}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cell", configs.CELLS)
@pytest.mark.parametrize("kernel", ["forward_persistent", "backward_persistent"])
def test_handoff_in_ptx(persistent_ptx, kernel, cell, dtype, resident, cc):
    assert handoff_problems(persistent_ptx[(kernel, cell, dtype, resident, cc)]) == []


def test_handoff_check_catches_a_missing_barrier_and_a_relaxed_arrival(persistent_ptx):
    """The PTX check fails the two weak-memory mutants a CPU cannot run: the arrival without
    the CTA barrier before it, and a relaxed arrival."""
    ptx = persistent_ptx[("forward_persistent", "lstm", "bfloat16", False, 90)]
    lines = ptx.splitlines()
    at = next(i for i, line in enumerate(lines) if "red.global.gpu.release" in line)
    no_barrier = [line for i, line in enumerate(lines)
                  if not (at - 12 <= i < at and "bar.sync" in line)]  # the barriers right before
    assert len(no_barrier) < len(lines) and handoff_problems("\n".join(no_barrier))
    assert handoff_problems(ptx.replace("red.global.gpu.release", "red.global.gpu.relaxed"))
    assert handoff_problems(ptx.replace("ld.global.gpu.acquire", "ld.global.gpu.relaxed"))
