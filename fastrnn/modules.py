"""Drop-in replacements for torch.nn's RNN, LSTM, GRU and their cells.

Parameters, their names, shapes and init, ``state_dict``, ``repr`` and ``flatten_parameters``
come from torch. The only new constructor argument is the keyword-only ``backend``
(``"auto" | "numba" | "triton" | "native" | "reference"``, see :mod:`fastrnn.backends`);
``module.backend_for(input)`` tells which backend an input will run on, and why.

The sequence modules subclass ``nn.RNNBase``, not ``nn.LSTM``/``nn.GRU``/``nn.RNN``:
``isinstance(m, nn.RNNBase)`` holds, ``isinstance(m, nn.LSTM)`` does not, because torch.compile's
Dynamo refuses to compile any module that is an ``nn.RNN``/``nn.GRU``/``nn.LSTM`` ("Attempted
to wrap RNN, GRU, or LSTM") while an ``nn.RNNBase`` subclass compiles. The cells subclass
``nn.RNNCell``/``nn.LSTMCell``/``nn.GRUCell``.

Under no_grad/inference_mode a dense CPU input takes the lean path of :mod:`fastrnn.inference`.
Under ``torch.jit.trace`` and ``torch.onnx.export`` (either exporter) every module runs torch.nn's
forward, whatever its ``backend``: the graph holds torch.nn's (``aten::lstm``, …; in ONNX the
standard LSTM/GRU/RNN nodes); ``torch.jit.script`` scripts the torch.nn twin
(``__prepare_scriptable__``). What torch.nn cannot export runs the reference loop, unrolled over
the traced steps (:class:`PeepholeLSTM`; under ONNX an LSTM with ``proj_size``). ``torch.export``
and ``torch.compile`` trace the custom op ``fastrnn::recurrence``.
"""
from __future__ import annotations

import math
import sys
from operator import is_
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from fastrnn import backends, cells, functional, inference, training
from fastrnn.cells import CELL_OF_MODE


def onnx_exporting():
    """Whether ``torch.onnx.export`` runs (either exporter: dynamo=False traces with the JIT,
    dynamo=True runs ``torch.export`` under the flag). No export runs before torch.onnx is
    imported, so this never imports it."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def exporting():
    """Whether this call is being traced for a graph that leaves Python: ``torch.jit.trace`` or
    ``torch.onnx.export`` (either exporter; not plain ``torch.export`` and ``torch.compile``,
    which trace fastrnn's custom op). An eager call pays two flag reads, never torch.onnx's."""
    return torch.jit.is_tracing() or (torch.compiler.is_exporting() and onnx_exporting())


def _torch_twin(module, torch_class):
    """A ``torch_class`` module sharing ``module``'s parameters, buffers, submodules and hooks
    (its own containers of them, so that registering on one leaves the other alone)."""
    twin = torch_class.__new__(torch_class)
    state = {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in vars(module).items()}
    state.pop("backend", None)
    twin.__dict__.update(state)
    return twin


class _Backend:
    """The ``backend`` keyword of every fastrnn module: checked, stored, shown in repr when not
    "auto". Everything else goes to the torch.nn parent unchanged."""

    def __init__(self, *args, backend="auto", **kwargs):
        backends.check_backend_name(backend)
        super().__init__(*args, **kwargs)
        self.backend = backend

    def extra_repr(self):
        s = super().extra_repr()
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"

    def __prepare_scriptable__(self):
        """``torch.jit.script``'s hook: script the torch.nn twin of this module (same class as
        ``fastrnn.convert(..., inverse=True)`` gives), which shares its parameters, so the
        scripted module computes what torch.nn's does. torch.jit.script writes the twins it gets
        back into the model it scripts (``model.lstm`` is then a ``torch.nn.LSTM`` with the same
        parameters; ``fastrnn.convert(model)`` turns it back)."""
        if parametrize.is_parametrized(self):  # the twin would hold the last weights: refuse
            raise RuntimeError(
                f"fastrnn.{self._torch_class.__name__} with parametrizations "
                f"({', '.join(self.parametrizations)}) cannot be scripted: TorchScript does not "
                "support torch.nn.utils.parametrize (torch.nn's modules fail too). Bake them in "
                "first: parametrize.remove_parametrizations(module, name, "
                "leave_parametrized=True).")
        return _torch_twin(self, self._torch_class)


class _Recurrent(_Backend, nn.RNNBase):
    """The forward shared by :class:`RNN`, :class:`LSTM` and :class:`GRU`.

    input: (T, B, I) ((B, T, I) with batch_first), (T, I) unbatched, or a PackedSequence.
    hx: (L*D, B, P) ((L*D, P) unbatched); for LSTM a pair (h0, c0 with last dim H).
    Returns (output, h_n) (LSTM: (output, (h_n, c_n))) exactly as torch.nn does.
    """

    _torch_class: type[nn.RNNBase]  # the torch.nn class whose forward is the "native" backend
    _dim_error = "{name}: Expected input to be 2D or 3D, got {dim}D instead"

    @property
    def cell(self):
        """The recurrence this module runs: "rnn_tanh", "rnn_relu", "lstm" or "gru"."""
        return CELL_OF_MODE[self.mode]

    def backend_for(self, input=None):
        """The :class:`fastrnn.backends.Choice` (name, reason) that runs an input on this module:
        by the module's device and dtype (inputs must match them), under ``torch.autocast`` by
        autocast's dtype (:func:`fastrnn.backends.compute_dtype`)."""
        weight = getattr(self, self._flat_weights_names[0])
        return backends.choose(self.backend, *self._case(weight, input), hidden=self.hidden_size)

    def _case(self, weight, input):
        """(cell, device, dtype, proj_size, step) for the choice; a dense input of one time step
        eagerly is a cell step (``backends.AUTO_ORDER_STEP``: numba streamed training 0.5-1.6x)."""
        step = (not torch.compiler.is_compiling() and isinstance(input, torch.Tensor)
                and input.dim() in (2, 3)
                and input.shape[1 if self.batch_first and input.dim() == 3 else 0] == 1)
        return self.cell, weight.device, backends.compute_dtype(weight), self.proj_size, step

    def _cell_params(self):
        """The flat parameter list :func:`fastrnn.functional.stack` takes (torch.nn's order)."""
        return self._flat_weights

    def _update_flat_weights(self):
        """torch.nn's, only if a weight is not the tensor in ``_flat_weights`` (torch's: 18 µs)."""
        if not all(map(is_, map(self._parameters.get, self._flat_weights_names),
                       self._flat_weights)):
            super()._update_flat_weights()

    def _zero_state(self, batch, input):
        layers = self.num_layers * (2 if self.bidirectional else 1)
        h = input.new_zeros(layers, batch, self.proj_size or self.hidden_size)
        return (h, input.new_zeros(layers, batch, self.hidden_size)) if self.mode == "LSTM" else h

    def _check_hx_dims(self, hx, dims, batched):
        """torch.nn's check that hx is 3-D for batched and 2-D for unbatched input."""
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if self.mode == "LSTM":
            if hx[0].dim() != dims or hx[1].dim() != dims:
                raise RuntimeError(f"For {kind} input, hx and cx should also be {dims}-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        elif hx.dim() != dims:
            raise RuntimeError(f"For {kind} input, hx should also be {dims}-D but got "
                               f"{hx.dim()}-D tensor")

    def _export_with_torch(self):
        """Whether a traced or exported call (:func:`exporting`) runs torch.nn's forward (the
        graph torch.nn gives), else the reference loop, unrolled over the traced steps."""
        return True

    def forward(self, input, hx=None):
        if lean := (training if torch.is_grad_enabled() else inference).forward(self, input, hx):
            return lean  # a lean path (fastrnn.inference, fastrnn.training) took it
        unrolled = exporting()  # traced or exported: torch.nn's forward, else unrolled
        if unrolled and self._export_with_torch():
            return self._torch_class.forward(self, input, hx)
        backend = None
        self._update_flat_weights()  # current weights (functional_call, parametrizations)
        if not unrolled:
            case = self._case(self._flat_weights[0], input)
            if (backend := backends.resolve(self.backend, *case, self.hidden_size)) == "native":
                return self._torch_class.forward(self, input, hx)
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            hx = (self._zero_state(int(batch_sizes[0]), input) if hx is None
                  else self.permute_hidden(hx, sorted_indices))
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(self._dim_error.format(name=self._torch_class.__name__,
                                                        dim=input.dim()))
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is None:
                hx = self._zero_state(input.size(batch_dim), input)
            else:
                self._check_hx_dims(hx, 3 if is_batched else 2, is_batched)
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
        # torch.nn skips this for packed LSTM input and fails later, inside aten; we check here.
        self.check_forward_args(input, hx, batch_sizes)
        args = (self.cell, input, tuple(hx) if is_lstm else hx, self._cell_params(), self.bias,
                self.num_layers, self.dropout, self.training, self.bidirectional, self.batch_first,
                batch_sizes)
        if unrolled:
            steps = len(batch_sizes) if packed else input.shape[1 if self.batch_first else 0]
            warnings.warn(f"{type(self).__name__}: {self._unrolled_reason()}, so this trace/export "
                          f"runs fastrnn's reference loop, unrolled over the {steps} steps of "
                          "this input: the graph is valid for inputs of that length only",
                          stacklevel=2)
            result = functional._recurrent(*args, "reference")
        else:
            result = functional._recurrent(*args, backend)
        output = result[0]
        hidden = (result[1], result[2]) if is_lstm else result[1]
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if is_lstm else hidden.squeeze(1)
        return output, hidden


class RNN(_Recurrent):
    """Drop-in ``torch.nn.RNN`` (Elman RNN, tanh or relu) with a ``backend`` keyword."""

    _torch_class = nn.RNN
    _dim_error = "{name}: Expected input to be 2D or 3D, got {dim}D tensor instead"

    def __init__(self, *args, backend="auto", **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. "
                             "Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, backend=backend, **kwargs)


class LSTM(_Recurrent):
    """Drop-in ``torch.nn.LSTM`` (with ``proj_size``) with a ``backend`` keyword."""

    _torch_class = nn.LSTM
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, backend="auto", **kwargs):
        super().__init__("LSTM", *args, backend=backend, **kwargs)

    def _export_with_torch(self):
        # torch.nn's LSTM with proj_size traces and scripts, but no ONNX exporter takes it:
        # dynamo=False raises "LSTMs with projections", dynamo=True writes a model ONNX Runtime
        # refuses (a Concat of mismatched ranks).
        return not (self.proj_size > 0 and onnx_exporting())

    def _unrolled_reason(self):
        return "ONNX's LSTM node has no projection (proj_size)"


class PeepholeLSTM(_Recurrent):
    """LSTM with peephole connections (Gers & Schmidhuber 2000; :mod:`fastrnn.cells.peephole_lstm`):
    ``c`` feeds the input and forget gates, ``c'`` the output gate, through per-unit weights.

    Arguments, inputs, outputs and states as ``torch.nn.LSTM`` (no ``proj_size``), plus the
    keyword-only ``backend``. Parameters: torch.nn.LSTM's and ``weight_ci_l{k}``,
    ``weight_cf_l{k}``, ``weight_co_l{k}`` (``_reverse``), each (H,), from U(-1/sqrt(H),
    1/sqrt(H)). No ``native`` backend (torch.nn has no such module); ``torch.jit.trace`` and
    ``torch.onnx.export`` unroll the reference loop over the traced steps (warning: the graph
    fits inputs of that length only); ``torch.jit.script`` raises (no torch.nn twin)."""

    _torch_class = nn.LSTM
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, backend="auto", **kwargs):
        if kwargs.get("proj_size", 0):
            raise ValueError("proj_size argument is not supported for PeepholeLSTM")
        super().__init__("LSTM", *args, backend=backend, **kwargs)
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        weight = self._flat_weights[0]
        self._cell_weight_names = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                names = [f"{name}_l{layer}{suffix}" for name in cells.spec("peephole_lstm").cell_weights]
                for name in names:
                    value = torch.empty(self.hidden_size, dtype=weight.dtype, device=weight.device)
                    self.register_parameter(name, nn.Parameter(value.uniform_(-bound, bound)))
                self._cell_weight_names.append(names)

    @property
    def cell(self):
        return "peephole_lstm"

    def _export_with_torch(self):
        return False

    def _unrolled_reason(self):
        return "torch.nn has no peephole LSTM"

    def __prepare_scriptable__(self):
        raise RuntimeError("fastrnn.PeepholeLSTM cannot be scripted: torch.nn has no peephole "
                           "LSTM to script in its place, and fastrnn's forward is not "
                           "TorchScript. Use torch.jit.trace or torch.onnx.export (they run its "
                           "reference loop, unrolled over the traced steps) or torch.export.")

    def _cell_params(self):
        """torch.nn.LSTM's flat weights of each layer and direction, each group followed by its
        w_ci, w_cf, w_co."""
        flat = self._flat_weights
        stride = len(flat) // len(self._cell_weight_names)
        params = []
        for k, names in enumerate(self._cell_weight_names):
            params += flat[k * stride:(k + 1) * stride] + [getattr(self, n) for n in names]
        return params


class GRU(_Recurrent):
    """Drop-in ``torch.nn.GRU`` with a ``backend`` keyword."""

    _torch_class = nn.GRU

    def __init__(self, *args, backend="auto", **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, backend=backend, **kwargs)


class _Cell(_Backend):
    """The forward shared by the cells: input (B, I) or (I,), hx (B, H) or (H,) (LSTM: a pair)."""

    _name: str

    @property
    def cell(self):
        if self._name == "RNNCell":
            return "rnn_relu" if self.nonlinearity == "relu" else "rnn_tanh"
        return "lstm" if self._name == "LSTMCell" else "gru"

    def backend_for(self, input=None):
        """The :class:`fastrnn.backends.Choice` (name, reason) that runs an input on this cell."""
        return backends.choose(self.backend, self.cell, self.weight_ih.device,
                               backends.compute_dtype(self.weight_ih), step=True)

    def forward(self, input, hx=None):
        if exporting():  # the graph torch.nn gives
            return super().forward(input, hx)
        # torch.nn's forward (checks, messages) around the backend's step (native: its _VF op), the
        # weights read from _parameters (a Module attribute: 0.5 µs), else (parametrized) as such
        params = self._parameters
        try:
            w_ih, w_hh = params["weight_ih"], params["weight_hh"]
            b_ih, b_hh = params["bias_ih"], params["bias_hh"]
        except KeyError:
            w_ih, w_hh, b_ih, b_hh = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        backend = backends.resolve(self.backend, self.cell, w_ih.device,
                                   backends.compute_dtype(w_ih), step=True)
        is_lstm = self._name == "LSTMCell"
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for idx, value in enumerate(() if hx is None else hx if is_lstm else (hx,)):
            if value.dim() not in (1, 2):
                raise ValueError(f"{self._name}: Expected {f'hx[{idx}]' if is_lstm else 'hidden'}"
                                 f" to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                                device=input.device)
            hx = (zeros, zeros) if is_lstm else zeros
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if is_lstm else hx.unsqueeze(0)
        if self._name == "RNNCell" and self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        ret = (getattr(torch._VF, f"{self.cell}_cell")(input, hx, w_ih, w_hh, b_ih, b_hh)
               if backend == "native" else functional._cell(
                   self.cell, input, tuple(hx) if is_lstm else hx, w_ih, w_hh, b_ih, b_hh, backend))
        if not is_batched:
            ret = (ret[0].squeeze(0), ret[1].squeeze(0)) if is_lstm else ret.squeeze(0)
        return ret


class RNNCell(_Cell, nn.RNNCell):
    """Drop-in ``torch.nn.RNNCell`` (same arguments) with a keyword-only ``backend``."""

    _name = "RNNCell"
    _torch_class = nn.RNNCell


class LSTMCell(_Cell, nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` (same arguments) with a keyword-only ``backend``."""

    _name = "LSTMCell"
    _torch_class = nn.LSTMCell


class GRUCell(_Cell, nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` (same arguments) with a keyword-only ``backend``."""

    _name = "GRUCell"
    _torch_class = nn.GRUCell
