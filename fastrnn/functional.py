"""Functional API: whole recurrences (``rnn_tanh``, ``rnn_relu``, ``lstm``, ``gru``) and single
steps (``*_cell``), on any backend.

Argument order follows ``torch._VF`` (the functions behind ``torch.nn``), plus a keyword-only
``backend``. Layers, directions, inter-layer dropout, packing and projection are composed here,
once, around :func:`fastrnn.autograd.recurrence` (one layer, one direction).

Shapes: L = num_layers, D = 2 if bidirectional else 1, H = hidden_size, P = proj_size or H.

* ``input``: (T, B, I), or (B, T, I) with ``batch_first``; or the data (N, I) of a
  PackedSequence together with its ``batch_sizes`` (T,).
* ``hx``: h0 (L*D, B, P); for cells with a cell state (``lstm``, ``peephole_lstm``) a pair
  (h0, c0) with c0 (L*D, B, H).
* ``params``: flat list per layer and direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``
  (``nn.RNNBase._flat_weights``), then the cell's own weights (``peephole_lstm``: w_ci, w_cf,
  w_co, each (H,)).
* returns ``(output, h_n)`` (``lstm``: ``(output, h_n, c_n)``) with output (T, B, D*P)
  ((B, T, D*P) with ``batch_first``; (N, D*P) when packed).
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastrnn import autograd, backends, cells
from fastrnn.autograd import recurrence, route

_DTYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                torch.bfloat16: "BFloat16"}


def _dtype_name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_same_dtype(tensor, weight):
    """The error torch's matmul gives when a state's dtype differs from the weights'."""
    if tensor.dtype != weight.dtype:
        raise RuntimeError("mat1 and mat2 must have the same dtype, but got "
                           f"{_dtype_name(tensor.dtype)} and {_dtype_name(weight.dtype)}")


def input_projection(cell, x, w_ih, b_ih, b_hh, backend=None, out=None, fold_bias=False):
    """``x W_ih^T`` for all steps as one GEMM, and the bias the recurrence adds to it.

    x: (N, I), w_ih: (G*H, I), biases (G*H,) or None. Returns ``(xg, bias, b_hn)``: xg (N, G*H),
    bias (G*H,) = b_ih + b_hh or None (GRU: b_ih + b_hh of the r and z gates only), and, for GRU
    with bias, ``b_hn`` (H,), the n-gate part of ``b_hh`` that stays inside ``r ⊙ (…)``. The bias
    is left out of the GEMM: there it costs one more pass over the (N, G*H) result (measured:
    +25% at N=12800, I=128, G*H=512), and the kernels add it to each row for free.
    ``backend``: where no gradient is recorded, the kernel backend whose own projection runs
    where it has one for this input (numba: :mod:`fastrnn.kernels.numba_cpu.projection`, as its
    lean inference path), else torch's. ``out``: None, or an (N, G*H) tensor xg is written into
    (no gradient recorded). ``fold_bias``: the bias is added by the GEMM instead
    (``torch.addmm``; for backends whose device adds it in the GEMM's epilogue, such as cuBLASLt)
    and returned as None.
    """
    bias, b_hn = projection_bias(cell, b_ih, b_hh)
    if fold_bias and bias is not None:
        return torch.addmm(bias, x, w_ih.t(), out=out), None, b_hn
    project = getattr(backends.kernels(backend), "project", None) if backend else None
    xg = project(x, w_ih, out) if project is not None else None
    if xg is None:
        xg = x @ w_ih.t() if out is None else torch.mm(x, w_ih.t(), out=out)
    return xg, bias, b_hn


def projection_bias(cell, b_ih, b_hh):
    """``(bias, b_hn)`` of :func:`input_projection`."""
    if b_ih is None:
        return None, None
    if cell == "gru":
        hidden = b_hh.shape[0] // 3
        return b_ih + torch.cat([b_hh[: 2 * hidden], b_hh.new_zeros(hidden)]), b_hh[2 * hidden:]
    return b_ih + b_hh, None


def _chunked_layer(backend, cell, x, batch_sizes, h0, c0, weights, reverse, steps):
    """One layer and direction without autograd, its input projected one chunk of ``steps`` steps
    at a time (x: (N, I), the rest as in :func:`stack`). Chunks run in processing order; each
    continues from the state the previous one left (rows not yet active keep theirs)."""
    sizes = batch_sizes.tolist()
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    starts = list(range(0, len(sizes), steps))
    y = x.new_empty(x.shape[0], h0.shape[1])
    h, c = h0, c0
    bias, b_hn = projection_bias(cell, weights.b_ih, weights.b_hh)
    xg_all = x.new_empty(offsets[min(steps, len(sizes))], weights.w_ih.shape[0])  # each chunk's
    # the same weight tensors every chunk: a backend may prepare them once (numba: transposed,
    # packed in panels)
    with getattr(backends.kernels(backend), "reusing_weights", contextlib.nullcontext)():
        for t0 in reversed(starts) if reverse else starts:
            t1 = min(t0 + steps, len(sizes))
            r0, r1, rows = offsets[t0], offsets[t1], sizes[t0]
            xg = input_projection(cell, x[r0:r1], weights.w_ih, None, None, backend,
                                  xg_all[:r1 - r0])[0]
            y_c, h_c, c_c = recurrence(backend, cell, xg, h[:rows],
                                       None if c is None else c[:rows], weights.w_hh, b_hn,
                                       weights.w_hr, batch_sizes[t0:t1], reverse, bias,
                                       weights.w_cell, how="inference")
            y[r0:r1] = y_c
            h = h_c if rows == h.shape[0] else torch.cat([h_c, h[rows:]])
            if c is not None:
                c = c_c if rows == c.shape[0] else torch.cat([c_c, c[rows:]])
    return y, h, c


class LayerWeights(NamedTuple):
    """The parameters of one layer and direction (torch.nn's names without ``_l{k}``):
    w_ih (G*H, I), w_hh (G*H, P), b_ih/b_hh (G*H,) or None, w_hr (P, H) or None (proj_size),
    w_cell (K, H) or None (the cell's own per-unit weights, ``CellSpec.cell_weights``)."""

    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: Optional[torch.Tensor]
    b_hh: Optional[torch.Tensor]
    w_hr: Optional[torch.Tensor]
    w_cell: Optional[torch.Tensor]


def layer_weights(cell, params, has_biases, num_layers, num_directions):
    """Split ``params`` (per layer and direction: ``w_ih, w_hh[, b_ih, b_hh][, w_hr]`` as
    ``nn.RNNBase._flat_weights``, then the cell's own weights, ``CellSpec.cell_weights``) into one
    :class:`LayerWeights` per layer and direction."""
    own = len(cells.spec(cell).cell_weights)
    stride = len(params) // (num_layers * num_directions)
    has_proj = stride - own == (5 if has_biases else 3)
    out = []
    for k in range(num_layers * num_directions):
        w = params[k * stride:(k + 1) * stride]
        torch_part = w[:stride - own]
        b_ih, b_hh = (torch_part[2], torch_part[3]) if has_biases else (None, None)
        w_cell = torch.stack(w[stride - own:]) if own else None
        out.append(LayerWeights(w[0], w[1], b_ih, b_hh, torch_part[-1] if has_proj else None,
                                w_cell))
    return out


def stacked(states):
    """torch.stack of per-layer states; one state as a view (a fresh tensor of the kernel's)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


_SIDE_STREAMS = {}  # {CUDA device: the stream reverse directions run on}


def _side_stream(backend, x, directions):
    """The CUDA stream a bidirectional layer's reverse direction runs on, beside the forward
    direction on the current stream (triton on CUDA: its small-batch kernels fill a few SMs, two
    directions at once fill twice as many); None: one after the other. Made outside a CUDA graph
    capture (none is made during one: then the directions run one after the other)."""
    if directions != 2 or backend != "triton" or x.device.type != "cuda":
        return None
    stream = _SIDE_STREAMS.get(x.device)
    if stream is None and not torch.cuda.is_current_stream_capturing():
        stream = _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)
    return stream


def _beside(side, fn, inputs):
    """``fn()`` on stream ``side`` after the current stream's work so far; the current stream
    then waits for it. The allocator is told which stream uses what: ``inputs`` (tensors or
    None, made on the current stream) are used on ``side`` too, the results on the current one.
    Autograd runs each backward op on its forward op's stream, so the backward of the two
    directions overlaps as well."""
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    for t in inputs:
        if t is not None:
            t.record_stream(side)
    main.wait_stream(side)
    for t in out:
        if t is not None:
            t.record_stream(main)
    return out


def stack(cell, x, batch_sizes, h0, c0, params, has_biases, num_layers, dropout, train,
          bidirectional, backend):
    """Run a stack of layers over packed-layout data on a resolved backend name.

    x: (N, I); batch_sizes: CPU int64 (T,); h0: (L*D, B, P); c0: (L*D, B, H) or None.
    Returns (output (N, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None).
    """
    directions = 2 if bidirectional else 1
    layers = layer_weights(cell, params, has_biases, num_layers, directions)
    _check_same_dtype(h0, layers[0].w_hh)
    if c0 is not None:
        _check_same_dtype(c0, layers[0].w_hh)
    layer_input, h_n, c_n = x, [], []

    fold = backends.bias_in_projection(backend, x.device)  # the GEMM adds the bias

    def project(x, w_ih, *biases):  # (b_ih, b_hh) when the GEMM adds the bias
        return input_projection(cell, x, w_ih, *(biases or (None, None)), fold_bias=True)[0]

    def run(layer, direction):
        """(y, h, c) of one layer and direction."""
        k = layer * directions + direction
        weights = layers[k]
        h0_k, c0_k = h0[k], None if c0 is None else c0[k]
        chunks = functools.partial(autograd.chunk_steps, layer_input.shape[0], h0_k.shape[0],
                                   weights.w_ih.shape[0], weights.w_hh.shape[1],
                                   layer_input.element_size())
        how = route(backend, layer_input, chunks, (layer_input, h0_k, c0_k, *weights))
        if how == "chunked":
            return _chunked_layer(backend, cell, layer_input, batch_sizes, h0_k, c0_k, weights,
                                  direction == 1, chunks())
        xg, bias, b_hn = input_projection(cell, layer_input, weights.w_ih, weights.b_ih,
                                          weights.b_hh, backend if how == "inference" else None,
                                          fold_bias=fold)
        # How to make xg again, should a double backward need it (not kept meanwhile).
        recipe = None
        if how == "autograd":
            recipe = (project, layer_input, weights.w_ih) + (
                (weights.b_ih, weights.b_hh) if fold and weights.b_ih is not None else ())
        return recurrence(backend, cell, xg, h0_k, c0_k, weights.w_hh, b_hn, weights.w_hr,
                          batch_sizes, direction == 1, bias, weights.w_cell, how=how,
                          recipe=recipe)

    side = _side_stream(backend, x, directions)
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            if side is not None and direction == 1:
                y, h, c = _beside(side, functools.partial(run, layer, 1),
                                  (layer_input, h0, c0, *layers[layer * 2 + 1]))
            else:
                y, h, c = run(layer, direction)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, 1) if directions == 2 else outputs[0]
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, stacked(h_n), None if c0 is None else stacked(c_n)


def _recurrent(cell, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
               batch_first, batch_sizes, backend):
    has_c = cells.spec(cell).has_c
    h0, c0 = hx if has_c else (hx, None)
    w_hh = params[1]  # (G*H, P); P < H with proj_size (torch.nn: proj_size < hidden_size)
    proj_size = w_hh.shape[1] if w_hh.shape[1] * cells.spec(cell).gates < w_hh.shape[0] else 0
    amp = backends.autocast_dtype(params[0])
    backend = backends.resolve(backend, cell, params[0].device, amp or params[0].dtype, proj_size,
                               hidden=w_hh.shape[0] // cells.spec(cell).gates)
    if amp is not None and backend != "native":
        return _autocast(_recurrent, amp, cell, input, hx, params, has_biases, num_layers, dropout,
                         train, bidirectional, batch_first, batch_sizes, backend)
    if backend == "native":
        vf = getattr(torch._VF, cell)  # torch's own function of the same name
        if batch_sizes is None:
            return vf(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first)
        return vf(input, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
                  bidirectional)
    if batch_sizes is None:
        x = input.transpose(0, 1) if batch_first else input
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        # The reference loop takes the sizes as ints: a trace or export unrolls over them.
        sizes = ([batch] * steps if backend == "reference"
                 else torch.full((steps,), batch, dtype=torch.int64))
        out, h_n, c_n = stack(cell, x.reshape(steps * batch, x.shape[2]), sizes, h0, c0, params,
                              has_biases, num_layers, dropout, train, bidirectional, backend)
        out = out.view(steps, batch, out.shape[-1])
        if batch_first:
            out = out.transpose(0, 1)
    else:
        out, h_n, c_n = stack(cell, input, batch_sizes, h0, c0, params, has_biases, num_layers,
                              dropout, train, bidirectional, backend)
    return (out, h_n, c_n) if has_c else (out, h_n)


def _autocast(fn, dtype, cell, input, hx, params, *args):
    """``fn(cell, input, hx, params, *args)`` on the arguments cast to autocast's ``dtype`` (x,
    states, weights; differentiably), with autocast off inside: a kernel backend runs the whole
    recurrence in that dtype, as cuDNN does under autocast (``native`` is torch.nn's own op under
    torch's autocast)."""
    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    hx = tuple(map(cast, hx)) if isinstance(hx, (tuple, list)) else cast(hx)
    with torch.autocast(input.device.type, enabled=False):
        return fn(cell, cast(input), hx, [cast(p) for p in params], *args)


def _sequence_fn(cell):
    def fn(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False,
           bidirectional=False, batch_first=False, *, batch_sizes=None, backend="auto"):
        return _recurrent(cell, input, hx, list(params), has_biases, num_layers, dropout, train,
                          bidirectional, batch_first, batch_sizes, backend)

    fn.__name__ = fn.__qualname__ = cell
    fn.__doc__ = (f"The whole {cell} recurrence (``torch._VF.{cell}`` arguments plus ``backend``)."
                  " Shapes: see :mod:`fastrnn.functional`.")
    return fn


rnn_tanh = _sequence_fn("rnn_tanh")
rnn_relu = _sequence_fn("rnn_relu")
lstm = _sequence_fn("lstm")
gru = _sequence_fn("gru")
peephole_lstm = _sequence_fn("peephole_lstm")


def _check_cell_args(input, hx, input_size, hidden_size):
    """aten's checks of ``*_cell`` arguments, with its messages. hx: list of (B, H) states."""
    if input.shape[1] != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {input_size}")
    for label, h in enumerate(hx):
        if input.shape[0] != h.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{label} "
                               f"batch size {h.shape[0]}")
        if h.shape[1] != hidden_size:
            raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {h.shape[1]}, "
                               f"expected {hidden_size}")


def _cell(cell, input, hx, w_ih, w_hh, b_ih, b_hh, backend):
    states = list(hx) if cell == "lstm" else [hx]
    _check_cell_args(input, states, w_ih.shape[1], w_hh.shape[1])
    for t in [input] + states:
        _check_same_dtype(t, w_ih)
    amp = backends.autocast_dtype(w_ih)
    backend = backends.resolve(backend, cell, w_ih.device, amp or w_ih.dtype, step=True)
    if amp is not None and backend != "native":
        def cell_fn(cell, input, hx, weights, backend):
            return _cell(cell, input, hx, *weights, backend)
        return _autocast(cell_fn, amp, cell, input, hx, [w_ih, w_hh, b_ih, b_hh], backend)
    if backend == "native":
        return getattr(torch._VF, f"{cell}_cell")(input, hx, w_ih, w_hh, b_ih, b_hh)
    xg, bias, b_hn = input_projection(cell, input, w_ih, b_ih, b_hh)
    sizes = torch.tensor([input.shape[0]], dtype=torch.int64)
    h, _, c = recurrence(backend, cell, xg, states[0], states[1] if cell == "lstm" else None,
                         w_hh, b_hn, None, sizes, False, bias)
    return (h, c) if cell == "lstm" else h


def _cell_fn(cell):
    def fn(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend="auto"):
        return _cell(cell, input, hx, w_ih, w_hh, b_ih, b_hh, backend)

    fn.__name__ = fn.__qualname__ = f"{cell}_cell"
    fn.__doc__ = (f"One {cell} step (``torch._VF.{cell}_cell`` arguments plus ``backend``): "
                  "input (B, I), hx (B, H)" + (" pair" if cell == "lstm" else "") +
                  "; returns h' (B, H)" + (" and c' (B, H)." if cell == "lstm" else "."))
    return fn


rnn_tanh_cell = _cell_fn("rnn_tanh")
rnn_relu_cell = _cell_fn("rnn_relu")
lstm_cell = _cell_fn("lstm")
gru_cell = _cell_fn("gru")

__all__ = ["rnn_tanh", "rnn_relu", "lstm", "gru", "peephole_lstm", "rnn_tanh_cell", "rnn_relu_cell", "lstm_cell",
           "gru_cell", "input_projection", "stack"]
