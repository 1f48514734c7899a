"""What the Triton kernels ask of a cell, and the device helpers kernels and cells share.

The four kernels (:mod:`.kernels`) have one body for every cell. Everything cell-specific -- the
step math and the cell's own loads and stores of a step's tiles -- is a set of ``@triton.jit``
helpers written in the cell's file (``fastrnn/cells/<cell>.py``, ``triton_step_math()``) and
handed to the kernels as their ``CELL`` ``tl.constexpr``: a :class:`CellMath`, whose helpers the
kernels call as ``CELL.forward(...)``. Triton inlines them, so a kernel compiles as if the cell's
code were written in it; a different ``CELL`` is a different compiled kernel, like any constexpr.

The helpers a cell provides (tiles are float32 (BLOCK_B, BLOCK_H); ``p``, ``w``, ``stash``,
``d_xg`` and ``d_hidden`` are tuples of tiles, one per gate (G) or stash slot (S)):

``preacts(PRODUCT, h, w, x, b_hn) -> p``
    The gate pre-activations of a step from its G xg tiles ``x`` (loaded by the kernel before
    the step's products: :func:`load_inputs`), ``b_hn`` and the hidden
    products: ``PRODUCT(h, w[g], a)`` is ``a + h W_g^T``. The strategy picks ``PRODUCT``:
    :func:`mm` with the resident weight tiles ``w`` (fused) or :func:`add_product` with
    ``w`` the products the step kernel accumulated over chunks of H (``h`` is None).
    Default :func:`plain_preacts`: ``p[g] = x_g + h W_g^T`` for every gate.
``forward(p, h, c) -> (h', c', stash)``
    The step on float32 tiles; ``p`` the G pre-activations followed by the cell's K per-unit
    weight tiles (``cell_weights`` below; none for most cells); ``c`` is the cell state (cells
    without one: a stand-in, returned as is); ``stash`` the S tiles the backward needs (besides
    h, which it always gets).
``backward(dh, dc, stash, h_prev) -> (d_xg, d_hidden, direct, dc_prev)``
    BPTT of the step (``stash``: the S stash tiles, then the K per-unit weight tiles):
    ``dh``/``dc`` the gradients of h'/c'; ``d_xg`` the gradients of the G xg
    gate tiles (written to ``d_gates``), ``d_hidden`` those of the G hidden products
    ``h W_g^T (+ b)``, ``direct`` the part of the gradient of h that bypasses ``W_hh``
    (``dh_prev = direct + sum_g d_hidden[g] W_g``), ``dc_prev`` that of c (cells without c:
    ``dc``, returned as is, so that the kernels carry nothing for it).
``load_b_hn(ptrs, mask)``, ``store_d_hn(ptrs, d_hidden, mask)``
    A bias inside the hidden product and the gradient buffer of that product (GRU's ``b_hn``,
    ``d_hn``). Defaults: no bias, nothing stored.
``load_cell_weights(ptrs, mask, H) -> tuple``
    The cell's own per-unit weights (``CellSpec.cell_weights``, ``w_cell`` (K, H), ``ptrs`` its
    row 0 at the program's units) as K (1, BLOCK_H) float32 tiles, which the kernels append to
    ``p`` and ``stash``. Default: ``()`` (no such weights). Their gradient is not a kernel's: the
    launcher reduces it after the loop with ``CellSpec.cell_weight_grad``, from the c and c' of
    every row that the torch function ``saved_cell_states(stash, H) -> (c, c')`` (a CellMath
    argument, required with cell weights) reads out of the saved stash.

The cell state's load and store (:func:`load_state`, :func:`store_state`) follow the cell's spec
(``states``); the stash width S is :data:`.configs.STASH` (the launcher allocates with it, the
kernels check it against the stash tuple at compile time).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import types

import torch
import triton
import triton.language as tl

from fastrnn import cells
from fastrnn.kernels.triton_gpu.configs import STASH

#: tl.dot input precision of float32 operands (see "Precision" in the package docstring).
FP32_DOT_PRECISION = tl.constexpr("tf32x3")


# ----------------------------------------------------------------------------------------------
# Device helpers the kernels and the cells share.
# ----------------------------------------------------------------------------------------------
@triton.jit
def tanh(x):
    """tanh from tl.sigmoid (libdevice.tanh is missing in the interpreter): 2 sigmoid(2x) - 1,
    +1 from x = 8.3 on, and -1 (derivative 0) from torch's CPU point -9.01084 on by a select
    (alone it would reach -1 only where e^(-2x) overflows, x < -44). Absolute precision near 0
    (2.4e-7), not relative: the accurate alternatives tried spilled registers in fused kernels on
    sm_90."""
    return tl.where(x <= -9.01084041595459, -1.0, 2.0 * tl.sigmoid(2.0 * x) - 1.0)


@triton.jit
def sigmoid(x):
    """tl.sigmoid. The cells call this name (and :func:`tanh`) for their activations, so that
    :data:`FAST_ACTIVATIONS` can replace both (:meth:`CellMath.with_activations`)."""
    return tl.sigmoid(x)


@triton.jit
def fast_tanh(x):
    """tanh by the GPU's ``tanh.approx.f32`` (one MUFU instruction, sm_75+; largest relative
    error about 2^-11, below float16's rounding): the activations of 16-bit models on CUDA.
    Inline PTX: the interpreter cannot run it (it runs :func:`tanh`)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def fast_sigmoid(x):
    """sigmoid(x) = (1 + tanh(x/2)) / 2 by :func:`fast_tanh`: one MUFU instruction instead of
    tl.sigmoid's two (ex2, rcp)."""
    return 0.5 * fast_tanh(0.5 * x) + 0.5


@triton.jit
def mm(a, b, acc):
    """acc + a @ b with float32 accumulation; float32 operands in FP32_DOT_PRECISION (tf32x3)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=FP32_DOT_PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tf32_products(a, b, acc):
    """a @ b for float32 ``a``, ``b`` as tf32x3 computes it, but on three accumulators ``acc`` =
    (hi*hi, lo*hi, hi*lo; the sum acc[0] + (acc[1] + acc[2])) that depend on nothing but their
    own last product: three independent chains of tf32 tensor-core products. hi: x with its
    low 13 mantissa bits cleared (exactly representable in tf32); lo = x - hi (exact)."""
    a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    b_hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return (tl.dot(a_hi, b_hi, acc[0], input_precision="tf32"),
            tl.dot(a - a_hi, b_hi, acc[1], input_precision="tf32"),
            tl.dot(a_hi, b - b_hi, acc[2], input_precision="tf32"))


@triton.jit
def add_product(h, hw, acc):
    """``PRODUCT`` of the step kernels: ``hw`` is h W_g^T, already accumulated (h is None)."""
    return hw + acc


@triton.jit
def load_f32(ptrs, mask):
    """A masked tile (0 outside ``mask``) as float32."""
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_weight_tile(w_ptr, gate, H, H_PAD: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Gate ``gate`` of w_hh (G*H, H) as an (H_PAD, H_PAD) tile, zero-padded.
    TRANSPOSE: tile[k, j] = w[gate*H + j, k] (for h @ W^T); else tile[j, k] = w[gate*H + j, k]."""
    a = tl.arange(0, H_PAD)[:, None]
    b = tl.arange(0, H_PAD)[None, :]
    mask = (a < H) & (b < H)
    if TRANSPOSE:
        return tl.load(w_ptr + (gate * H + b) * H + a, mask=mask, other=0.0)
    else:
        return tl.load(w_ptr + (gate * H + a) * H + b, mask=mask, other=0.0)


@triton.jit
def accumulate_products(hk, w_ptrs, w_mask, H, acc):
    """One chunk of the step kernels' hidden products: ``acc[g] + hk @ W_g[chunk]^T`` for each
    gate g, ``w_ptrs`` the chunk's pointers in gate 0 (tile[k, j] = w[j, k])."""
    out = ()
    for gate in tl.static_range(len(acc)):
        w = tl.load(w_ptrs + gate * H * H, mask=w_mask, other=0.0)
        out = out + (mm(hk, w, acc[gate]),)
    return out


@triton.jit
def load_inputs(x_ptrs, H, mask, G: tl.constexpr):
    """A step's G xg tiles (gate g at ``x_ptrs + g*H``), float32, a tuple: the G loads issued
    together before the step's products (before: each load just before its gate's product)."""
    x = ()
    for gate in tl.static_range(G):
        x = x + (load_f32(x_ptrs + gate * H, mask),)
    return x


@triton.jit
def step_inputs(xg_ptr, bs_ptr, off_ptr, t, rows, cols, col_ok, H, G: tl.constexpr):
    """Step ``t``'s G xg tiles of the fused kernels' ``rows`` (:func:`load_inputs`; inactive
    rows 0), for a step other than the current one (a prefetch)."""
    first, _, m = step_rows(bs_ptr, off_ptr, t, rows, col_ok)
    return load_inputs(xg_ptr + (first + rows)[:, None] * (G * H) + cols[None, :], H, m, G)


@triton.jit
def block_tiles(col0, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """A program's tile of the (B, H) state: batch rows of block program_id(0), hidden units
    [col0, col0 + BLOCK_H). Returns rows, cols, col_ok (cols < H), state_mask (the entries
    inside (B, H)) and state_off (their int32 offsets in it)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = col0 + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    state_mask = (rows < B)[:, None] & col_ok[None, :]
    return rows, cols, col_ok, state_mask, rows[:, None] * H + cols[None, :]


@triton.jit
def step_rows(bs_ptr, off_ptr, t, rows, col_ok):
    """Step ``t`` of the packed sequence for ``rows``: (its first packed row, active (the rows
    below its batch size), the mask of active rows and valid units)."""
    active = rows < tl.load(bs_ptr + t)
    return tl.load(off_ptr + t), active, active[:, None] & col_ok[None, :]


@triton.jit
def wait_arrivals(counter_ptr, target, max_polls, ok, error_ptr):
    """Wait until the int32 at ``counter_ptr`` reaches ``target`` (every program of the batch
    block arrived), polling with acquire atomics (Triton 3.6 has no ``tl.atomic_poll``) at most
    ``max_polls`` times; then a CTA barrier, so that every warp's later loads see what the
    arrivals released. A wait that gives up adds 1 at ``error_ptr`` and returns 0 (``ok`` 0:
    an earlier wait gave up; do not wait again, so a launch that lost a program still ends)."""
    n = target
    if ok:
        n = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls = 1
        while (n < target) & (polls < max_polls):
            n = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            polls += 1
        if n < target:
            tl.atomic_add(error_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return ok & (n >= target)


@triton.jit
def arrive(counter_ptr):
    """Count this program in at ``counter_ptr``: a CTA barrier (every warp's stores of the step
    are done), then one release atomic add (they are visible to whoever acquires the count)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def zero_tiles(N: tl.constexpr, SHAPE: tl.constexpr):
    """N float32 zero tiles of SHAPE, a tuple."""
    tiles = ()
    for _ in tl.static_range(N):
        tiles = tiles + (tl.zeros(SHAPE, tl.float32),)
    return tiles


# ----------------------------------------------------------------------------------------------
# Defaults of the cell helpers.
# ----------------------------------------------------------------------------------------------
@triton.jit
def plain_preacts(PRODUCT: tl.constexpr, h, w, x, b_hn):
    """``p[g] = x_g + h W_g^T`` for every gate g (rnn, lstm)."""
    p = ()
    for gate in tl.static_range(len(w)):
        p = p + (PRODUCT(h, w[gate], x[gate]),)
    return p


@triton.jit
def load_state(ptrs, mask, other):
    """The cell state tile (or its gradient) as float32; ``other`` unused."""
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_state(ptrs, value, mask):
    """The cell state tile (or its gradient) in the pointer's dtype."""
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def no_state(ptrs, mask, other):
    """A cell without a cell state: ``other`` stands in for it (and is never used)."""
    return other


@triton.jit
def no_store(ptrs, value, mask):
    """Nothing to store for this cell."""
    pass


@triton.jit
def no_b_hn(ptrs, mask):
    """A cell without a bias inside its hidden products: zero."""
    return tl.zeros([1, 1], tl.float32)


@triton.jit
def no_cell_weights(ptrs, mask, H):
    """A cell without per-unit weights of its own: no tiles."""
    return ()


# ----------------------------------------------------------------------------------------------
# The CELL constexpr.
# ----------------------------------------------------------------------------------------------
def cell_jit(fn, swap=()):
    """``triton.jit`` for a helper a cell file defines inside its ``triton_step_math()``.

    The names it takes from there (``tl``, the helpers of this module, the cell's other helpers)
    become its globals: Triton's compiler reads closure variables, but its interpreter re-runs a
    helper's source in the helper's globals (and wants ``triton.language`` among them).
    ``swap``: ((old, new), ...) helpers replaced wherever the helper refers to them, in its
    globals and its closure, and in the cell helpers it calls (:data:`FAST_ACTIVATIONS`)."""
    def swapped(value):
        for old, new in swap:
            if value is old:
                return new
        source = getattr(value, "cell_source", None)
        return cell_jit(source, swap) if swap and source is not None else value

    scope = {name: swapped(value) for name, value in
             {**fn.__globals__, "tl": tl, **inspect.getclosurevars(fn).nonlocals}.items()}
    closure = fn.__closure__
    if swap and closure:
        closure = tuple(types.CellType(swapped(cell.cell_contents)) for cell in closure)
    helper = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, closure)
    helper.__qualname__, helper.__doc__ = fn.__qualname__, fn.__doc__
    helper.__annotations__ = fn.__annotations__
    jitted = triton.jit(helper)
    jitted.cell_source = fn
    return jitted


#: The activations of 16-bit models on CUDA: (exact, fast) pairs (CellMath.with_activations).
FAST_ACTIVATIONS = ((tanh, fast_tanh), (sigmoid, fast_sigmoid))


class CellMath:
    """A cell's step math for the Triton kernels, their ``CELL`` constexpr (module docstring).

    ``spec``: the cell's :class:`fastrnn.cells.CellSpec`; the keyword arguments are its
    ``@triton.jit`` helpers (``forward`` and ``backward`` required; ``load_cell_weights`` too
    when the spec has ``cell_weights``) and, for such cells, ``saved_cell_states`` (plain
    torch, not compiled). Attributes ``n_gates`` (G) and ``n_stash`` (S) size the kernels' tuples
    and strides. Compared, and keyed in Triton's caches, by the helpers' sources
    (``cache_key``), like a ``JITFunction``.
    """

    _DEFAULTS = dict(preacts=plain_preacts, load_b_hn=no_b_hn, store_d_hn=no_store,
                     load_cell_weights=no_cell_weights)

    def __init__(self, spec, saved_cell_states=None, **helpers):
        required = {"forward", "backward"} | ({"load_cell_weights"} if spec.cell_weights else set())
        unknown = set(helpers) - set(self._DEFAULTS) - required
        if unknown or not required <= set(helpers) or (saved_cell_states is None) != (
                not spec.cell_weights):
            raise TypeError(f"CellMath({spec.name}): {sorted(required)} are required (and "
                            f"saved_cell_states with cell weights); unknown helpers: "
                            f"{sorted(unknown)}")
        self.spec, self.own = spec, helpers
        self.name, self.n_gates, self.n_stash = spec.name, spec.gates, STASH[spec.name]
        self.saved_cell_states = saved_cell_states
        state = (load_state, store_state) if spec.has_c else (no_state, no_store)
        self.helpers = {**self._DEFAULTS, "load_c": state[0], "store_c": state[1], **helpers}
        for name, helper in self.helpers.items():
            setattr(self, name, helper)

    def with_activations(self, swap):
        """This cell math with helpers ``swap`` replaced in every helper of the cell
        (``((exact, fast), ...)``, :data:`FAST_ACTIVATIONS`): another ``CELL``, other kernels."""
        return CellMath(self.spec, self.saved_cell_states, **{
            name: cell_jit(fn.cell_source, swap) if hasattr(fn, "cell_source") else fn
            for name, fn in self.own.items()})

    @functools.cached_property
    def cache_key(self):
        # (interpreted helpers have no cache_key, and no cache needs one)
        keys = ";".join(f"{name}={getattr(fn, 'cache_key', fn.__name__)}"
                        for name, fn in sorted(self.helpers.items()))
        text = f"{self.name};G={self.n_gates};S={self.n_stash};{keys}"
        return hashlib.sha256(text.encode()).hexdigest()

    def __eq__(self, other):
        return isinstance(other, CellMath) and self.cache_key == other.cache_key

    def __hash__(self):
        return hash((self.name, self.n_gates, self.n_stash))

    def __repr__(self):
        return f"CellMath({self.name}, {self.cache_key[:16]})"


@functools.cache
def cell_math(name, fast=False):
    """The :class:`CellMath` of cell ``name``: its file's ``triton_step_math()``, built once;
    ``fast``: with :data:`FAST_ACTIVATIONS` (what 16-bit models run on CUDA)."""
    if fast:
        return cell_math(name).with_activations(FAST_ACTIVATIONS)
    return cells.MODULES[name].triton_step_math()


def fast_activations(dtype, device):
    """Whether kernels for ``dtype`` on ``device`` take :data:`FAST_ACTIVATIONS`: 16-bit on a
    CUDA device (their error is below the dtype's rounding; the interpreter runs the exact
    ones)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
