"""fastrnn.convert on a real multi-module model: identical outputs, kept parameters and hooks."""
import pytest
import torch
from torch import nn

import fastrnn
from _support import TOL


class Tagger(nn.Module):
    """embedding -> 2-layer bidirectional LSTM -> GRUCell over the last output -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = nn.GRUCell(12, 5)
        self.head = nn.Sequential(nn.Linear(5, 3))

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(self.cell(out[:, -1]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_convert_keeps_outputs_parameters_hooks_and_mode(backend):
    torch.manual_seed(0)
    model = Tagger().double().eval()
    tokens = torch.randint(0, 20, (4, 7))
    expected = model(tokens)
    params = list(model.parameters())
    calls = []
    model.lstm.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))

    assert fastrnn.convert(model, backend=backend) is model
    assert type(model.lstm) is fastrnn.LSTM and type(model.cell) is fastrnn.GRUCell
    assert model.lstm.backend == backend and not model.training
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert next(model.lstm.parameters()).dtype == torch.float64
    torch.testing.assert_close(model(tokens), expected, **TOL[torch.float64])
    assert calls == ["LSTM"]

    fastrnn.convert(model, inverse=True)
    assert type(model.lstm) is nn.LSTM and type(model.cell) is nn.GRUCell
    assert not hasattr(model.lstm, "backend")
    torch.testing.assert_close(model(tokens), expected, **TOL[torch.float64])


def test_convert_top_level_module_and_training_step():
    torch.manual_seed(1)
    rnn = nn.RNN(3, 4, nonlinearity="relu")
    twin = fastrnn.convert(nn.RNN(3, 4, nonlinearity="relu"), backend="reference")
    twin.load_state_dict(rnn.state_dict())
    assert isinstance(twin, fastrnn.RNN) and twin.nonlinearity == "relu"
    x = torch.randn(5, 2, 3)
    for module in (rnn, twin):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        module(x)[0].square().sum().backward()
        opt.step()
    for a, b in zip(twin.parameters(), rnn.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


class Doubled(nn.Module):
    """A user parametrization: the weight used is twice the stored one."""

    def forward(self, weight):
        return 2 * weight


def parametrized_model():
    """A Tagger with weight_norm on an LSTM weight, a user parametrization on another, and
    spectral_norm on the GRUCell."""
    model = Tagger().double().eval()
    nn.utils.parametrizations.weight_norm(model.lstm, "weight_hh_l0")
    nn.utils.parametrize.register_parametrization(model.lstm, "weight_ih_l1_reverse", Doubled())
    nn.utils.parametrizations.spectral_norm(model.cell, "weight_ih")
    return model


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_convert_keeps_parametrizations(backend):
    torch.manual_seed(2)
    model = parametrized_model()
    tokens = torch.randint(0, 20, (4, 7))
    expected = model(tokens)
    params = list(model.parameters())

    fastrnn.convert(model, backend=backend)
    for module, cls in ((model.lstm, fastrnn.LSTM), (model.cell, fastrnn.GRUCell)):
        assert isinstance(module, cls) and module.backend == backend
        assert type(module).__mro__[1] is cls  # torch's Parametrized<class>, now over fastrnn's
    assert nn.utils.parametrize.is_parametrized(model.lstm, "weight_hh_l0")
    assert nn.utils.parametrize.is_parametrized(model.lstm, "weight_ih_l1_reverse")
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(tokens), expected, **TOL[torch.float64])

    # gradients reach the parametrizations' own parameters, as in torch.nn
    model.zero_grad()
    model(tokens).sum().backward()
    original = model.lstm.parametrizations.weight_ih_l1_reverse.original
    assert original.grad is not None and original.grad.abs().sum() > 0
    assert model.lstm.parametrizations.weight_hh_l0.original1.grad is not None

    # removing the last parametrization leaves the fastrnn class; inverse gives torch's back
    nn.utils.parametrize.remove_parametrizations(model.lstm, "weight_ih_l1_reverse")
    nn.utils.parametrize.remove_parametrizations(model.lstm, "weight_hh_l0")
    assert type(model.lstm) is fastrnn.LSTM
    fastrnn.convert(model, inverse=True)
    assert type(model.lstm) is nn.LSTM and type(model.cell).__mro__[1] is nn.GRUCell
    torch.testing.assert_close(model(tokens), expected, **TOL[torch.float64])


def test_convert_inverse_of_a_module_parametrized_after_conversion():
    torch.manual_seed(3)
    rnn = fastrnn.RNN(3, 4, num_layers=2, backend="reference").double()
    nn.utils.parametrizations.orthogonal(rnn, "weight_hh_l1")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = rnn(x)[0]
    fastrnn.convert(rnn, inverse=True)
    assert type(rnn).__mro__[1] is nn.RNN and not hasattr(rnn, "backend")
    torch.testing.assert_close(rnn(x)[0], expected, **TOL[torch.float64])
