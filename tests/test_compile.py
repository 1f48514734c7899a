"""torch.compile: the custom ops pass opcheck, and a model around fastrnn modules compiles with
fullgraph=True (torch.nn's RNN/GRU/LSTM cannot be compiled at all) and gives the same results
and gradients as eager."""
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import cells, custom_ops as ops
from _support import TOL, require, seed_of

OP_CASES = [("rnn_tanh", False), ("rnn_relu", False), ("lstm", False), ("lstm", True),
            ("gru", False)]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("cell,proj", OP_CASES)
def test_custom_op_passes_opcheck(cell, proj, backend):
    require(backend, cell, torch.float64)
    gen = torch.Generator().manual_seed(seed_of(cell, proj))
    H, P, G = 4, (3 if proj else 4), cells.GATES[cell]
    sizes = torch.tensor([3, 2, 2, 1])

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    args = (backend, cell, sizes, True, rand(8, G * H), rand(3, P),
            rand(3, H) if cell == "lstm" else None, rand(G * H, P),
            rand(H) if cell == "gru" else None, rand(P, H) if proj else None)
    torch.library.opcheck(ops.recurrence, args)


class Model(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lstm = fastrnn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True,
                                 backend=backend)
        self.gru = fastrnn.GRU(16, 5, backend=backend)
        self.cell = fastrnn.RNNCell(5, 5, nonlinearity="relu", backend=backend)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        out, h = self.gru(out.transpose(0, 1))
        return self.head(self.cell(out[-1], h[0]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_model_compiles_fullgraph_with_same_results_and_gradients(backend):
    require("numba" if backend == "auto" else backend, "lstm", torch.float32)
    torch.manual_seed(0)
    model = Model(backend)
    tokens = torch.randint(0, 11, (4, 7))

    def run(fn):
        model.zero_grad()
        out = fn(tokens)
        out.square().sum().backward()
        return [out] + [p.grad.clone() for p in model.parameters()]

    expected = run(model)
    actual = run(torch.compile(model, fullgraph=True))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


def test_torch_nn_lstm_is_refused_by_dynamo_which_is_why_fastrnn_subclasses_rnnbase():
    with pytest.raises(Exception, match="Attempted to wrap RNN, GRU, or LSTM"):
        torch.compile(nn.LSTM(3, 4), fullgraph=True)(torch.randn(2, 1, 3))
