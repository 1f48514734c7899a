"""Numba CPU kernels: the whole time loop of rnn_tanh / rnn_relu / lstm (optionally projected) / gru,
forward and hand-written BPTT, compiled with Numba (float32 and float64).

Implements the kernel contract of :mod:`fastrnn.kernels.reference` (:func:`recurrence_forward`,
:func:`recurrence_backward`). Layout and design:

* Packed layout throughout: step t owns rows ``offsets[t] : offsets[t] + batch_sizes[t]`` of xg / y;
  at step t only the rows ``b < batch_sizes[t]`` are computed (no padding, no masks). The loop runs
  over the steps in *processing order* (``T-1 … 0`` when ``reverse``); the state buffers ``h``/``c``
  (B, ·) always hold each row's latest state, so inactive rows keep theirs.
* Threads (``torch.get_num_threads()`` in all, see :class:`_Plan` and the thresholds below): one
  loop thread whose per-step BLAS call uses them where a step is large; or, for large batches,
  the **batch rows** split over threads (rows are independent sequences), each running the whole
  time loop for its rows: one hand-off per call, no barrier per step. The loops are compiled
  ``nogil`` and run on the calling thread plus a small pool of Python threads.
* The recurrent matmul of each step, ``acc[rows] = h[rows] @ W`` (W pre-transposed to (K, N)),
  is one call per thread and step of the Fortran BLAS ``sgemm_``/``dgemm_`` that torch exports
  (MKL on x86), called **from the compiled loop** through its address (no Python and no heap
  allocation per step; the address is a runtime argument, so the loops stay cacheable), with
  MKL's thread-local thread count set per call so threads never multiply; or Numba micro-kernels
  (``vectors.py``), where that call would run on one thread (every batch size with the panel
  kernels, at most 8 rows a thread without: launch.py's thresholds, measured) or torch exports no
  BLAS: on CPUs with AVX-512 or AVX2 + FMA, W packed in panels of two 64- or 32-byte vectors
  of columns, an 8-row (AVX-512) or 4-row (AVX2) x 2-vector block of the product kept in
  registers for the whole sum (``jit.panel_vector_bytes``); elsewhere register-blocked
  loops LLVM vectorizes (4 rows x 4 k per pass), column-tiled so a weight tile stays in L2.
* Gate math is fused after the matmul of each row group, as short loops that each write one
  array (so LLVM vectorizes them). Both dtypes use branch-free activations that vectorize (there
  is no SVML) and saturate exactly where torch's do: float32 tanh Eigen's rational function,
  the rest through an exponential of our own (``activations.py``).
* Forward saves only what BPTT needs, and nothing under inference (``save=False``): activated
  gates (LSTM i,f,g,o; GRU r,z, the n-gate's recurrent part ``h W_hn^T + b_hn``, n) and, for LSTM,
  the cell states. RNN saves nothing (its derivative is read from y). Weight gradients are reduced
  once after the backward loop, as GEMMs over all steps (``torch.mm``), in a fixed order:
  deterministic, no atomics.

Files: ``jit.py`` (compile settings), ``activations.py`` (tanh/sigmoid that vectorize),
``matmul.py`` (the step matmul: BLAS from compiled code, micro-kernels), ``vectors.py`` (its panel
kernels), ``loops.py`` (one forward and one BPTT time loop, each inlining the cell's own step math
from its file in ``fastrnn/cells/``), ``buffers.py`` (aligned buffers, numpy views),
``launch.py`` (checks, thread plan: the contract's functions), ``inference.py`` (the lean
inference path: a whole layer stack on prepared weights), ``training.py`` (the lean training
path: the same stack's forward with BPTT's tensors saved, and its backward), ``projection.py``
(the input projection without gradients in the panel kernels). Importing this package
does not import Numba; :func:`load` does (the first kernel call, or ``auto`` choosing a backend).
Compiled code is cached on disk where a directory is writable, and a cache problem is never an
exception (``jit.py`` says where and how).
"""
from __future__ import annotations

import importlib
import sys

import torch

from fastrnn import cells
from fastrnn.kernels import Capabilities, contract_on_first_use

CAPABILITIES = Capabilities("numba", devices=("cpu",), dtypes=(torch.float32, torch.float64),
                            cells=("rnn_tanh", "rnn_relu", "lstm", "gru", "peephole_lstm"),
                            projection=True)

why_not = CAPABILITIES.why_not
_LAUNCH = None


def load():
    """The launcher module (:mod:`.launch`), imported on the first call: Numba loads then, and
    every jitted function of the backend gets a disk cache that never raises
    (:func:`.jit.guard_caches`). Raises whatever importing raises."""
    global _LAUNCH
    if _LAUNCH is None:
        launch = importlib.import_module(__name__ + ".launch")
        for name in ("projection", "express"):  # their kernels' caches guarded too
            importlib.import_module(f"{__name__}.{name}")
        from fastrnn.kernels.numba_cpu import jit
        jit.guard_caches([m for name, m in list(sys.modules.items())
                          if name.startswith(__name__ + ".") and m is not None])
        _LAUNCH = launch
    return _LAUNCH


def reusing_weights():
    """A context within which :func:`.launch.recurrence_forward` prepares the weights of the
    same tensors once (a long input's chunks: ``functional._chunked_layer``)."""
    load()
    return importlib.import_module(__name__ + ".buffers").reusing_weights()


def lean_path():
    """The functions of the lean inference path (:mod:`.inference`, used by
    :mod:`fastrnn.inference`), loading Numba first."""
    load()
    return importlib.import_module(__name__ + ".inference")


def lean_training():
    """The functions of the lean training path (:mod:`.training`, used by
    :mod:`fastrnn.training`), loading Numba first."""
    load()
    return importlib.import_module(__name__ + ".training")


def project(x, w_ih, out=None):
    """A layer's input projection without gradients, ``x @ w_ih.t()`` (into ``out`` where given),
    where this backend makes it (:func:`.projection.project`), else None: the caller uses
    torch.mm."""
    load()
    return importlib.import_module(__name__ + ".projection").project(x, w_ih, out)


def prepare(cell, dtype, proj_size=0):
    """Load (from the disk cache) or compile what the first forward call of ``cell`` in ``dtype``
    runs -- the forward time loop and its helpers, nothing else -- by running it on a one-step,
    one-row input. Raises whatever loading or compiling raises: :func:`fastrnn.backends.choose`
    calls it before ``auto`` picks this backend, and falls back, saying why. (The backward loop
    loads at the first backward.)"""
    spec = cells.spec(cell)
    hidden, proj = 2, (1 if proj_size else 2)

    def zeros(*shape):  # on the CPU whatever torch's default device
        return torch.zeros(shape, dtype=dtype, device="cpu")

    # plain tensors also where the first call is traced (torch.export's fake tensors)
    with torch.utils._python_dispatch._disable_current_modes():
        extra = {"w_cell": zeros(len(spec.cell_weights), hidden)} if spec.cell_weights else {}
        load().recurrence_forward(
            cell, zeros(1, spec.gates * hidden), zeros(1, proj),
            zeros(1, hidden) if spec.has_c else None, zeros(spec.gates * hidden, proj),
            zeros(hidden) if spec.has_b_hn else None, zeros(proj, hidden) if proj_size else None,
            torch.ones(1, dtype=torch.int64, device="cpu"), False, save=False, **extra)


__getattr__ = contract_on_first_use(__name__, load)  # the contract: Numba loads then
