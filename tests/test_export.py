"""Export and scripting: fastrnn modules give what torch.nn's give.

* ``torch.onnx.export`` (dynamo=False and dynamo=True): the same ONNX graph as the torch.nn twin,
  node for node (standard LSTM/GRU/RNN nodes where torch.nn has them), which ONNX Runtime runs
  to fastrnn's eager output; for the plain modules, the cells and the models of examples/.
* ``torch.jit.trace``: torch.nn's graph (``aten::lstm`` …, not unrolled: a trace runs other
  sequence lengths too) and eager's values.
* ``torch.jit.script``: the torch.nn twins are scripted (``__prepare_scriptable__``), sharing the
  parameters; scripted outputs equal eager.
* What torch.nn cannot export: an LSTM with ``proj_size`` under ONNX (torch.nn raises) and
  PeepholeLSTM run fastrnn's reference loop, unrolled, with a warning; PeepholeLSTM refuses
  ``torch.jit.script`` with a clear error.
* Plain ``torch.export`` keeps the custom op ``fastrnn::recurrence``: a saved program loads where
  ``fastrnn.custom_ops`` is imported, and only there.
"""
from __future__ import annotations

import collections
import copy
import importlib.util
import io
import pathlib
import subprocess
import sys
import textwrap
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fastrnn
from _support import TOL, require

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",  # torch.jit.* and the TorchScript-based exporter
    "ignore::torch.jit.TracerWarning",  # torch.nn's own forward under the tracer
    "ignore::FutureWarning",
    "ignore:The tensor attributes .*_flat_weights:UserWarning",  # torch.nn's too, dynamo=True
    "ignore:Exporting a model to ONNX with a batch_size other than 1:UserWarning",
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
EXPORTERS = ["dynamo=False", pytest.param("dynamo=True", marks=pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None, reason="the dynamo exporter needs onnxscript"))]
NODE = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
VARIANTS = {"lstm": (fastrnn.LSTM, {}), "gru": (fastrnn.GRU, {}),
            "rnn_tanh": (fastrnn.RNN, {}), "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"})}
CELLS = {"rnn_cell": fastrnn.RNNCell, "lstm_cell": fastrnn.LSTMCell, "gru_cell": fastrnn.GRUCell}


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(value):
    """Nested tuples/lists of tensors -> flat list."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat(v)]
    return [value]


def torch_twin(model):
    """A deep copy of ``model`` with every fastrnn module turned into its torch.nn class."""
    return fastrnn.convert(copy.deepcopy(model), inverse=True)


def to_onnx(model, args, exporter):
    """The ONNX ModelProto that ``torch.onnx.export`` writes for ``model(*args)``."""
    if exporter == "dynamo=True":
        return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def op_counts(proto):
    return collections.Counter(node.op_type for node in proto.graph.node)


def run_onnx(proto, args):
    """ONNX Runtime's outputs for the (flattened) ``args``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    inputs = [t.detach().numpy() for t in flat(args)]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs)
    return [torch.from_numpy(o) for o in session.run(None, dict(zip(names, inputs)))]


def assert_outputs(actual, expected):
    expected = [t.detach() for t in flat(expected)]
    actual = flat(actual)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e, **TOL[torch.float32])


def sequence_case(variant, seed, **kwargs):
    """A 2-layer bidirectional fastrnn module on numba and its arguments (x, hx)."""
    require("numba", variant, torch.float32, proj_size=kwargs.get("proj_size", 0))
    cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    module = cls(4, 5, num_layers=2, bidirectional=True, backend="numba", **extra,
                 **kwargs).eval()
    P = kwargs.get("proj_size") or 5
    x, h0 = torch.randn(6, 3, 4), torch.randn(4, 3, P)
    hx = (h0, torch.randn(4, 3, 5)) if variant == "lstm" else h0
    return module, (x, hx)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_export_of_sequence_modules_is_torch_nns(variant, exporter):
    module, args = sequence_case(variant, 0)
    expected = module(*args)
    proto = to_onnx(module, args, exporter)
    counts = op_counts(proto)
    assert counts == op_counts(to_onnx(torch_twin(module), args, exporter))
    if exporter == "dynamo=True" and variant.startswith("rnn"):
        # torch.nn's too: the dynamo exporter has no ONNX RNN for aten::rnn_tanh/rnn_relu and
        # writes their decomposition, unrolled over the steps.
        assert "RNN" not in counts and counts["Tanh" if variant == "rnn_tanh" else "Relu"] > 0
    else:
        assert counts[NODE[variant]] == 2  # one node per layer, both directions in it
    assert_outputs(run_onnx(proto, args), expected)


@pytest.mark.parametrize("variant", ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"])
def test_jit_trace_records_torch_nns_op_and_equals_eager(variant):
    proj = {"proj_size": 3} if variant == "lstm_proj" else {}
    module, args = sequence_case(variant.replace("_proj", ""), 1, **proj)
    traced = torch.jit.trace(module, args)
    assert_outputs(traced(*args), module(*args))
    op = "aten::" + variant.replace("_proj", "")
    assert op in {n.kind() for n in traced.inlined_graph.nodes()}
    # torch.nn's op takes the length from its input: the trace runs other lengths too.
    longer = (torch.randn(11, 3, 4), args[1])
    assert_outputs(traced(*longer), module(*longer))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_lstm_with_projection_unrolls_the_reference_loop(exporter):
    module, args = sequence_case("lstm", 2, proj_size=3)
    expected = module(*args)
    if exporter == "dynamo=False":
        with pytest.raises(Exception, match="LSTMs with projections"):
            to_onnx(torch_twin(module), args, exporter)  # torch.nn's refusal
    with pytest.warns(UserWarning, match=r"no projection .* unrolled over the 6 steps"):
        proto = to_onnx(module, args, exporter)
    assert not {"LSTM", "Loop", "Scan"} & set(op_counts(proto))
    assert_outputs(run_onnx(proto, args), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_peephole_lstm_exports_through_its_reference_loop(exporter):
    torch.manual_seed(3)
    module = fastrnn.PeepholeLSTM(4, 5, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 3, 4)
    hx = (torch.randn(4, 3, 5), torch.randn(4, 3, 5))
    expected = module(x, hx)
    with pytest.warns(UserWarning, match="no peephole LSTM.* unrolled over the 6 steps"):
        proto = to_onnx(module, (x, hx), exporter)
    assert_outputs(run_onnx(proto, (x, hx)), expected)


def test_peephole_lstm_traces_unrolled_and_refuses_scripting():
    torch.manual_seed(4)
    module = fastrnn.PeepholeLSTM(4, 5, batch_first=True).eval()
    x = torch.randn(3, 6, 4)
    with pytest.warns(UserWarning, match="unrolled over the 6 steps"):
        traced = torch.jit.trace(module, (x,))
    assert_outputs(traced(x), module(x))
    with pytest.raises(RuntimeError, match="PeepholeLSTM cannot be scripted"):
        torch.jit.script(nn.Sequential(module))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(CELLS))
def test_cells_export_and_trace_as_torch_nns(name, exporter):
    cell = {"rnn_cell": "rnn_tanh", "lstm_cell": "lstm", "gru_cell": "gru"}[name]
    require("numba", cell, torch.float32)
    torch.manual_seed(5)
    module = CELLS[name](4, 5, backend="numba").eval()  # "auto" runs cells on native already
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    args = (x, (h, torch.randn(3, 5))) if name == "lstm_cell" else (x, h)
    expected = module(*args)
    proto = to_onnx(module, args, exporter)
    assert op_counts(proto) == op_counts(to_onnx(torch_twin(module), args, exporter))
    assert_outputs(run_onnx(proto, args), expected)
    assert_outputs(torch.jit.trace(module, args)(*args), expected)


class Packed(nn.Module):
    """A GRU over a PackedSequence (as seq2seq_reverse's encoder)."""

    def __init__(self):
        super().__init__()
        self.gru = fastrnn.GRU(4, 5, backend="numba")

    def forward(self, x, lengths):
        return self.gru(nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))[1]


def test_packed_input_exports_to_onnx_as_torch_nns_does():
    """torch 2.13's TorchScript-based exporter fails on a PackedSequence, for torch.nn too: the
    same error, or, where torch exports it, the same graph."""
    require("numba", "gru", torch.float32)
    model = Packed().eval()
    args = (torch.randn(6, 3, 4), torch.tensor([4, 6, 2]))
    results = []
    for m in (model, torch_twin(model)):
        try:
            results.append(op_counts(to_onnx(m, args, "dynamo=False")))
        except Exception as e:  # noqa: BLE001 - compared below
            results.append((type(e), str(e).split("\n")[0]))
    assert results[0] == results[1]


class Decoder(nn.Module):
    """seq2seq_reverse's decoder step (what greedy decoding runs): tokens, h -> logits, h."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, dec_in, h):
        return self.model.decode(dec_in, h)


class Encoder(nn.Module):
    """seq2seq_reverse's encoder on a batch of equal-length strings (no packing)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src):
        return self.model.encoder(self.model.src_embedding(src))[1]


def example_cases():
    """(name, model, args, its recurrent ONNX node or None) for the models of examples/, small,
    on numba (cells: numba too; "auto" runs a cell on native)."""
    torch.manual_seed(6)
    char_rnn = load_example("char_rnn")
    lm = char_rnn.CharLM(20, 8, 16, 2, "numba").eval()
    tokens = torch.randint(0, 20, (3, 7))
    with torch.no_grad():  # unbatched, as its generate() feeds the LSTM
        _, state = lm(torch.randint(0, 20, (5,)))
    seq2seq = load_example("seq2seq_reverse")
    s2s = seq2seq.Seq2Seq(8, 16, "numba").eval()
    src, _, dec_in, _ = seq2seq.make_batch(4, 5, 5, torch.Generator().manual_seed(0))
    hello = load_example("hello_ohlol")
    ohlol = hello.Model(4, 4, 1, "numba").eval()
    return [("char_rnn", lm, (tokens,), "LSTM"),
            ("char_rnn_generate", lm, (torch.randint(0, 20, (1,)), state), "LSTM"),
            ("seq2seq_encoder", Encoder(s2s).eval(), (src,), "GRU"),
            ("seq2seq_decoder", Decoder(s2s).eval(), (dec_in, torch.randn(1, 4, 16)), "GRU"),
            ("hello_ohlol", ohlol, (torch.eye(4)[[1]], torch.zeros(1, 4)), None)]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_the_example_models_runs_in_onnx_runtime(exporter):
    require("numba", "lstm", torch.float32)
    for name, model, args, node in example_cases():
        expected = model(*args)
        proto = to_onnx(model, args, exporter)
        counts = op_counts(proto)
        assert counts == op_counts(to_onnx(torch_twin(model), args, exporter)), name
        if node is None:  # an RNNCell: ONNX has no cell op; torch.nn writes Gemm/MatMul + Tanh
            assert not {"LSTM", "GRU", "RNN"} & set(counts), name
        else:
            assert counts[node] >= 1, name
        assert_outputs(run_onnx(proto, args), expected)
        assert_outputs(torch.jit.trace(model, args)(*args), expected)


class Stack(nn.Module):
    """Every fastrnn module with a torch.nn twin, in one scriptable model."""

    def __init__(self):
        super().__init__()
        self.lstm = fastrnn.LSTM(4, 5, 2, bidirectional=True, proj_size=3, backend="numba")
        self.gru = fastrnn.GRU(6, 5, batch_first=True, backend="numba")
        self.rnn = fastrnn.RNN(5, 5, nonlinearity="relu", backend="reference")
        self.lstm_cell = fastrnn.LSTMCell(5, 5, backend="numba")
        self.gru_cell = fastrnn.GRUCell(5, 5, backend="numba")
        self.rnn_cell = fastrnn.RNNCell(5, 5, backend="numba")

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        y, h = self.rnn(y.transpose(0, 1), None)
        h, c = self.lstm_cell(y[-1])
        return self.rnn_cell(self.gru_cell(h, c), None)


def test_jit_script_scripts_the_torch_nn_twins_sharing_parameters():
    require("numba", "lstm", torch.float32, proj_size=3)
    torch.manual_seed(7)
    model = Stack().eval()
    x, longer = torch.randn(6, 3, 4), torch.randn(9, 3, 4)
    expected, expected_longer = model(x), model(longer)
    params = dict(model.named_parameters())
    scripted = torch.jit.script(model)
    assert_outputs(scripted(x), expected)
    assert_outputs(scripted(longer), expected_longer)
    # torch.jit.script writes the prepared twins back into the model it scripts:
    assert [type(m) for m in model.children()] == [nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell,
                                                   nn.GRUCell, nn.RNNCell]
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(p is params[n] for n, p in scripted.named_parameters())
    assert_outputs(model(x), expected)
    fastrnn.convert(model, backend="numba")  # and back
    assert type(model.lstm) is fastrnn.LSTM and model.lstm.backend == "numba"


def test_jit_script_of_a_parametrized_module_raises_clearly():
    model = nn.Sequential(fastrnn.GRU(3, 4))
    nn.utils.parametrizations.weight_norm(model[0], "weight_hh_l0")
    with pytest.raises(RuntimeError, match=r"GRU with parametrizations \(weight_hh_l0\) cannot be "
                                           "scripted"):
        torch.jit.script(model)


class ScriptableCharLM(nn.Module):
    """char_rnn's CharLM with its ``state`` annotated, as TorchScript needs (torch.nn's LSTM
    cannot be called with an unannotated ``state=None`` in a scripted forward either)."""

    def __init__(self, lm):
        super().__init__()
        self.embedding, self.lstm, self.head = lm.embedding, lm.lstm, lm.head

    def forward(self, x, state: Optional[Tuple[Tensor, Tensor]] = None):
        out, state = self.lstm(self.embedding(x), state)
        return self.head(out), state


def test_jit_script_of_the_example_models_equals_eager():
    require("numba", "lstm", torch.float32)
    torch.manual_seed(8)
    char_rnn, seq2seq, hello = (load_example(n) for n in ("char_rnn", "seq2seq_reverse",
                                                           "hello_ohlol"))
    lm = ScriptableCharLM(char_rnn.CharLM(20, 8, 16, 2, "numba")).eval()
    tokens = torch.randint(0, 20, (3, 7))
    s2s = seq2seq.Seq2Seq(8, 16, "numba").eval()
    src, lengths, dec_in, _ = seq2seq.make_batch(4, 3, 6, torch.Generator().manual_seed(1))
    ohlol = hello.Model(4, 4, 1, "numba").eval()
    cases = [(lm, (tokens,)), (s2s, (src, lengths, dec_in)),  # packed, unsorted lengths
             (ohlol, (torch.eye(4)[[1]], torch.zeros(1, 4)))]
    for model, args in cases:
        expected = model(*args)
        assert_outputs(torch.jit.script(model)(*args), expected)


def test_torch_export_keeps_the_custom_op_and_a_saved_program_needs_fastrnn_custom_ops(tmp_path):
    require("numba", "lstm", torch.float32)
    torch.manual_seed(9)
    module = fastrnn.LSTM(4, 5, 2, bidirectional=True, backend="numba").eval()
    x = torch.randn(6, 3, 4)
    steps = torch.export.Dim("steps")
    program = torch.export.export(module, (x,), dynamic_shapes=({0: steps},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fastrnn.recurrence.default" in targets and "aten.lstm.input" not in targets
    longer = torch.randn(9, 3, 4)
    torch.export.save(program, tmp_path / "lstm.pt2")
    torch.save({"x": longer, "y": module(longer)[0]}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        path = {str(tmp_path / "lstm.pt2")!r}
        try:
            torch.export.load(path)
        except Exception:
            print("without fastrnn: not loadable")
        import fastrnn.custom_ops  # registers fastrnn::recurrence
        io = torch.load({str(tmp_path / "io.pt")!r})
        y = torch.export.load(path).module()(io["x"])[0]
        torch.testing.assert_close(y, io["y"], atol=1e-5, rtol=1e-4)
        print("with fastrnn.custom_ops: loaded, same output")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["without fastrnn: not loadable",
                                            "with fastrnn.custom_ops: loaded, same output"]


def test_export_as_a_fresh_process_first_call():
    """torch.export as the first call of a numba module in a process: choosing the backend loads
    and runs its forward loop on plain tensors, not on export's fake tensors (it raised
    BackendUnavailable: '.numpy() is not supported for tensor subclasses')."""
    require("numba", "lstm", torch.float32)
    script = textwrap.dedent("""
        import torch, fastrnn
        module = fastrnn.LSTM(4, 5, backend="numba").eval()
        program = torch.export.export(module, (torch.randn(6, 3, 4),),
                                      dynamic_shapes=({0: torch.export.Dim("steps")},))
        x = torch.randn(9, 3, 4)
        torch.testing.assert_close(program.module()(x)[0], module(x)[0])
        print("exported")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == "exported"
