"""The modules' lean inference path: under ``torch.no_grad()`` or ``torch.inference_mode()``, a
dense CPU input whose backend offers one (numba: :mod:`fastrnn.kernels.numba_cpu.inference`) runs
the whole layer stack in one call, on weights prepared once per weight version (recurrent weights
transposed; made again when a weight changed by any route, :mod:`fastrnn.weight_cache`: in place
where the weights changed in place, as an optimizer's step changes them; the biases
summed again by each call; a call of a few rows reads every weight in place, and then only
their data pointers are looked at) and a step plan made once per shape: no autograd Function, no
checks beyond the input's and state's shapes (a state the last call returned, given back, is
read through the array kept with it). Same kernels, same buffers, same input projection as the
full path (:func:`fastrnn.functional.stack`; a long input's projection in the same chunks of
steps): bitwise the same results. Where the backend runs a shape's whole call compiled (numba: a
few rows, the loops on the calling thread), a contiguous input and states are passed by address
and the outputs allocated here (:func:`_express`).

A call that records a gradient takes the lean training path (:mod:`fastrnn.training`, on the same
prepared weights) where this one would apply. Anything else takes the full path, which also raises
torch.nn's errors: packed input, autocast, tracing, export, torch.compile, torch.func transforms,
inter-layer dropout in training mode, an input or state of another dtype, device or shape than the
module's.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import NamedTuple, Optional

import numpy as np
import torch

from fastrnn import backends, cells, functional, weight_cache


class _Prepared(NamedTuple):
    module: weakref.ref  # the module it was made for
    backend: str  # the module's ``backend`` attribute it was made for
    name: str  # the backend that attribute resolved to
    weights: list  # the tensors it was made from, held so that no other tensor takes their memory
    fingerprint: Optional[weight_cache.Fingerprint]  # theirs; None: not reusable
    kernels: object  # the backend's lean path functions, or None: the backend has none
    layers: object  # what the backend prepared (its lean path's stack), or None
    layer_weights: list  # the weights per layer and direction (functional.LayerWeights), or None
    in_place: frozenset  # indices of the weights a live call reads in place (contiguous ones)
    summed: frozenset  # ... every call reads in place (the contiguous biases: summed each call)
    inputs: frozenset  # ... and W_ih, a call whose input projection reads it in place
    pointers: list  # the weights' data pointers when prepared
    shapes: dict  # (input shape, batch_first) -> its _Shape, or None where the lean path declines
    # the final states the last call returned: (tensor, its data pointer, the kernels' numpy
    # array); given back as the next call's initial states (streaming), no new view is made
    last: list
    # [what the last call returned as its states (a tensor, or (h, c))]: given back as it is, its
    # tensors are looked up in ``last`` without a search
    returned: list


class _Shape(NamedTuple):
    """What an input shape decides for a module (:func:`_shape`): steps, batch, features,
    whether it is batched, whether x is (B, T, I) (batch_first), the initial states' shapes as
    given (h then c), the stack's layers and directions."""

    steps: int
    batch: int
    features: int
    batched: bool
    batch_first: bool
    states: tuple
    num_layers: int
    directions: int
    y: tuple  # the output's shape as the module returns it
    rows: int  # steps * batch
    flat: bool  # a contiguous input's rows in (T*B) order: not batch_first, or T or B is 1


# id(module) -> _Prepared, dropped when the module dies (a dict keyed by id: a WeakKeyDictionary
# lookup makes a weak reference each call)
_PREPARED = {}
_SHAPES_KEPT = 16


def _serves(entry, module, weights, rows):
    """Whether ``entry`` serves a call of ``rows`` rows (T*B) of ``module`` on ``weights``: made
    for these tensors and, where a lean path derived something from them, each of those the call
    does not read in place (``entry.summed``; ``entry.inputs`` where the kernels'
    ``projects_in_place`` says so; where their ``live`` says so, a few rows: ``entry.in_place``)
    unchanged by :func:`fastrnn.weight_cache.matches`, each it reads in place
    still where it was and contiguous (``w.data = w.data.t()`` keeps the pointer). A call that
    reads every weight in place looks at nothing else: no version counter (an optimizer's step
    between streamed calls, inference tensors), no copy."""
    if (entry is None or entry.module() is not module or entry.backend != module.backend
            or not all(map(operator.is_, weights, entry.weights))):
        return False
    if entry.kernels is None:
        return True
    kernels = entry.kernels
    skip = (entry.in_place if kernels.live(rows) else
            entry.inputs if kernels.projects_in_place(rows) else entry.summed)
    if len(skip) == len(weights):
        return (all(map(torch.Tensor.is_contiguous, weights))
                and list(map(torch.Tensor.data_ptr, weights)) == entry.pointers)
    return (all(weights[i].is_contiguous() for i in skip)  # matches compares the pointers
            and weight_cache.matches(entry.fingerprint, weights, skip))


def _prepared(module, weights, entry):
    """The module's :class:`_Prepared` made anew for its current ``weights`` (``entry``: its
    current one or None: :func:`_serves` said it no longer serves them). For a backend without a
    lean path nothing is derived from them: other tensors only. Weights changed in place (the
    same tensors, each contiguous where it was when prepared: an optimizer's step) keep the
    prepared stack, its kernels' ``refresh_stack`` making again what was derived from them."""
    if (entry is not None and entry.kernels is not None and entry.module() is module
            and entry.backend == module.backend and all(map(operator.is_, weights, entry.weights))
            and len(entry.in_place) == len(weights) and all(map(_in_place, weights))
            and list(map(torch.Tensor.data_ptr, weights)) == entry.pointers):
        entry.kernels.refresh_stack(entry.layers)
        entry = _PREPARED[id(module)] = entry._replace(
            fingerprint=weight_cache.fingerprint(weights, entry.fingerprint))
        return entry
    weight, cell = weights[0], module.cell
    name = backends.resolve(module.backend, cell, weight.device, weight.dtype, module.proj_size,
                            hidden=module.hidden_size)
    lean = getattr(backends.KERNELS.get(name), "lean_path", None)
    kernels = lean() if lean is not None else None
    layers = per_layer_weights = None
    if kernels is not None:
        directions = 2 if module.bidirectional else 1
        per_layer, per_layer_weights = [], functional.layer_weights(
            cell, weights, module.bias, module.num_layers, directions)
        with torch.no_grad():
            for w in per_layer_weights:
                bias, b_hn = functional.projection_bias(cell, w.b_ih, w.b_hh)
                per_layer.append((w.w_ih, w.w_hh, b_hn, w.w_hr, bias, w.w_cell, w.b_ih,
                                  w.b_hh))
        layers = kernels.prepare_stack(cell, per_layer)
    if id(module) not in _PREPARED:
        weakref.finalize(module, _PREPARED.pop, id(module), None)
    # the shapes depend on the module's configuration only: kept when only weights changed
    same = (entry is not None and entry.module() is module and entry.backend == module.backend
            and all(map(operator.is_, weights, entry.weights)))
    stride = len(weights) // len(per_layer_weights) if per_layer_weights else 1
    biases = {i for i in range(len(weights)) if module.bias and i % stride in (2, 3)}
    summed = frozenset(i for i in biases if _in_place(weights[i]))
    inputs = summed | {i for i in range(0, len(weights), stride) if _in_place(weights[i])}
    entry = _Prepared(weakref.ref(module), module.backend, name, list(weights),
                      weight_cache.fingerprint(weights, entry.fingerprint if same else None)
                      if kernels is not None else None, kernels, layers, per_layer_weights,
                      summed | {i for i, w in enumerate(weights)
                                if w.dim() == 2 and _in_place(w)}, summed, inputs,
                      list(map(torch.Tensor.data_ptr, weights)), entry.shapes if same else {},
                      [], [None])
    _PREPARED[id(module)] = entry
    return entry


def _in_place(weight):
    """Whether the kernels read ``weight`` in place (a numpy view of it: contiguous, without its
    negative bit set)."""
    return weight.is_contiguous() and not weight.is_neg()


def _shape(module, shape):
    """The :class:`_Shape` of an input of ``shape`` (torch.Size) on ``module``, or None where the
    lean path declines it (the full path runs, and raises torch.nn's errors)."""
    dims = len(shape)
    if dims not in (2, 3):
        return None
    batched, batch_first = dims == 3, dims == 3 and module.batch_first
    steps, batch = (shape[1], shape[0]) if batch_first else (shape[0], shape[1] if batched else 1)
    features, hidden = shape[-1], module.hidden_size
    spec = cells.spec(module.cell)
    if steps == 0 or batch == 0 or features != module.input_size:
        return None
    directions = 2 if module.bidirectional else 1
    layers = module.num_layers * directions
    states = ((layers, batch, module.proj_size or hidden), (layers, batch, hidden))
    if not batched:
        states = tuple(s[::2] for s in states)
    width = directions * (module.proj_size or hidden)
    y = (((batch, steps) if batch_first else (steps, batch)) if batched else (steps,)) + (width,)
    return _Shape(steps, batch, features, batched, batch_first,
                  states if spec.has_c else states[:1], module.num_layers, directions, y,
                  steps * batch, not batch_first or steps == 1 or batch == 1)


def _numpy(tensor):
    """A numpy view of a CPU tensor (None where there is none: a tensor with its negative bit
    set)."""
    try:
        return (tensor.detach() if tensor.requires_grad else tensor).numpy()
    except RuntimeError:
        return None


def _given_states(hx, shape, dtype, entry):
    """The initial states ``hx`` (a tensor, or for cells with a cell state a pair), each paired
    with its entry of :attr:`_Prepared.last` ((tensor, address, array)) where it is the state the
    last call returned, still where it was, of its shape and contiguous, else with None; None
    unless each is a CPU tensor of ``dtype`` and of its shape in ``shape.states``."""
    expected, last = shape.states, entry.last
    if hx is entry.returned[0] and _unmoved(last, expected):
        return [(kept[0], kept) for kept in last]
    states = hx if len(expected) == 2 and isinstance(hx, (tuple, list)) else (hx,)
    if len(states) != len(expected):
        return None
    out = []
    for i, (state, size) in enumerate(zip(states, expected)):
        if (i < len(last) and state is last[i][0] and state.shape == size
                and state.data_ptr() == last[i][1] and state.is_contiguous()):
            out.append((state, last[i]))
        elif (type(state) is not torch.Tensor or state.dtype != dtype or not state.is_cpu
                or state.shape != size):
            return None
        else:
            out.append((state, None))
    return out


def _unmoved(last, sizes):
    """Whether the states the last call returned (:attr:`_Prepared.last`) are still where they
    were, contiguous and of ``sizes``."""
    for (state, address, _), size in zip(last, sizes):
        if state.shape != size or state.data_ptr() != address or not state.is_contiguous():
            return False
    return len(last) == len(sizes)


def _state_arrays(hx, shape, dtype, entry):
    """Numpy views (L*D, B, ·) of the initial states ``hx`` (:func:`_given_states`; one the last
    call returned: its kept array), else None."""
    if (given := _given_states(hx, shape, dtype, entry)) is None:
        return None
    out = []
    for state, kept in given:
        if kept is not None:
            out.append(kept[2])
        elif (array := _numpy(state)) is None:
            return None
        else:
            out.append(array if shape.batched else array[:, None])
    return out


def _found(module, input):
    """``(entry, shape)`` of a call ``module(input, ·)`` the lean paths take: the module's
    :class:`_Prepared` and the input's :class:`_Shape`; None where they do not apply."""
    if (type(input) is not torch.Tensor or not input.is_cpu
            or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting() or torch._C._are_functorch_transforms_active()
            or torch._C._is_any_autocast_enabled()
            or (module.training and module.dropout > 0 and module.num_layers > 1)):
        return None
    module._update_flat_weights()
    weights, entry = module._cell_params(), _PREPARED.get(id(module))
    # a shape's _Shape depends on the module's configuration alone (kept as weights change)
    key = (input.shape, module.batch_first)
    shape = entry.shapes.get(key, False) if entry is not None else False
    if shape is None:
        return None
    if not _serves(entry, module, weights, shape.rows if shape else math.prod(input.shape[:-1])):
        entry = _prepared(module, weights, entry)
    if entry.kernels is None or input.dtype != entry.weights[0].dtype:
        return None
    if shape is False:
        if len(entry.shapes) >= _SHAPES_KEPT:
            entry.shapes.clear()
        shape = entry.shapes[key] = _shape(module, input.shape)
    return None if shape is None else (entry, shape)


def lean_call(module, input, hx):
    """``(entry, shape, x, h0, c0)`` of a call ``module(input, hx)`` the lean paths take (this
    module's and :mod:`fastrnn.training`'s): :func:`_found`'s, numpy views of the input and the
    initial states as given (None: zeros; c0 None also for cells without a cell state); None where
    they do not apply."""
    found = _found(module, input)
    if found is None or (x := _numpy(input)) is None:
        return None
    return _with_states(*found, x, hx)


def _with_states(entry, shape, x, hx):
    h0 = c0 = None
    if hx is not None:
        if (arrays := _state_arrays(hx, shape, entry.weights[0].dtype, entry)) is None:
            return None
        h0, c0 = arrays if len(arrays) == 2 else (arrays[0], None)
    return entry, shape, x, h0, c0


def forward(module, input, hx):
    """``module(input, hx)`` by the lean path (call it with gradients off), or None where it does
    not apply."""
    if (found := _found(module, input)) is None:
        return None
    entry, shape = found
    if shape.flat and (out := _express(entry, shape, input, hx)) is not None:
        return out
    if (x := _numpy(input)) is None or (call := _with_states(entry, shape, x, hx)) is None:
        return None
    return run(call)


def _state_addresses(hx, shape, dtype, entry):
    """The addresses of the initial states ``hx`` (:func:`_given_states`), each contiguous and
    without its negative bit set, else None."""
    if hx is entry.returned[0] and _unmoved(entry.last, shape.states):
        return [kept[1] for kept in entry.last]
    if (given := _given_states(hx, shape, dtype, entry)) is None:
        return None
    out = []
    for state, kept in given:
        if kept is not None:
            out.append(kept[1])
        elif not state.is_contiguous() or state.is_neg():
            return None
        else:
            out.append(state.data_ptr())
    return out


def _express(entry, shape, input, hx):
    """``module(input, hx)`` by one compiled call of the backend (its ``express`` for the shape,
    run by its ``forward_express``), or None where it has none for this shape or settings (then
    :func:`run`) or the input or a state is not a contiguous tensor of the module's dtype."""
    express = entry.kernels.express(entry.layers, shape.steps, shape.batch, shape.num_layers,
                                    shape.directions, (dtype := _NUMPY[entry.weights[0].dtype]))
    if express is None or not input.is_contiguous() or input.is_neg():
        return None
    h0 = c0 = 0
    if hx is not None:
        if (addresses := _state_addresses(hx, shape, input.dtype, entry)) is None:
            return None
        h0, c0 = addresses if len(addresses) == 2 else (addresses[0], 0)
    y, h_n = np.empty(shape.y, dtype), np.empty(shape.states[0], dtype)
    c_n = np.empty(shape.states[1], dtype) if len(shape.states) == 2 else None
    entry.kernels.forward_express(express, input.data_ptr(), h0, c0, y, h_n, c_n)
    h = torch.from_numpy(h_n)
    if not shape.batched:
        h_n = h_n[:, None]
    if c_n is None:
        entry.last[:] = ((h, h.data_ptr(), h_n),)
        entry.returned[0] = h
        return torch.from_numpy(y), h
    c = torch.from_numpy(c_n)
    entry.last[:] = ((h, h.data_ptr(), h_n), (c, c.data_ptr(), c_n if shape.batched else
                                              c_n[:, None]))
    states = entry.returned[0] = (h, c)
    return torch.from_numpy(y), states


_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def run(call):
    """The lean path's ``module(input, hx)`` of :func:`lean_call`'s ``call``."""
    entry, shape, x, h0, c0 = call
    steps, batch = shape.steps, shape.batch
    if shape.batch_first:
        x = x.transpose(1, 0, 2)
    y, h_n, c_n = entry.kernels.forward_stack(
        entry.layers, np.ascontiguousarray(x).reshape(steps * batch, shape.features),
        steps, batch, h0, c0, shape.num_layers, shape.directions)
    arrays = (h_n,) if c_n is None else (h_n, c_n)
    y, h_n, c_n = shaped(shape, y, h_n, c_n)
    states = [torch.from_numpy(h_n)] if c_n is None else [torch.from_numpy(h_n),
                                                          torch.from_numpy(c_n)]
    entry.last[:] = [(t, t.data_ptr(), a) for t, a in zip(states, arrays)]
    out, entry.returned[0] = torch.from_numpy(y), states[0] if c_n is None else tuple(states)
    return out, entry.returned[0]


def shaped(shape, y, h_n, c_n):
    """The stack's numpy outputs (y (T*B, D*P), h_n (L*D, B, P), c_n (L*D, B, H) or None) shaped
    as the module returns them for an input of ``shape``, as numpy views (a torch view costs
    several times more)."""
    steps, batch = shape.steps, shape.batch
    if not shape.batched:
        return (y.reshape(steps, -1), h_n[:, 0], c_n[:, 0] if c_n is not None else None)
    y = y.reshape(steps, batch, -1)
    return (y.transpose(1, 0, 2) if shape.batch_first else y), h_n, c_n
