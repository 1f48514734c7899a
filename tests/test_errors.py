"""Bad arguments and inputs: the same exception type and message as torch.nn, on every backend."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from _support import require

NN = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU, "RNNCell": nn.RNNCell,
      "LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell}
FAST = {name: getattr(fastrnn, name) for name in NN}
CELL = {"RNN": "rnn_tanh", "LSTM": "lstm", "GRU": "gru", "RNNCell": "rnn_tanh",
        "LSTMCell": "lstm", "GRUCell": "gru"}

x3, x2, x1 = torch.randn(3, 2, 4), torch.randn(3, 4), torch.randn(4)
z = torch.zeros


def packed(lengths=(3, 2), enforce_sorted=True):
    return pack_padded_sequence(torch.randn(3, len(lengths), 4), list(lengths),
                                enforce_sorted=enforce_sorted)


# name -> (class, constructor kwargs, forward args); every case is an error in torch.nn.
FORWARD_CASES = {
    "input 4-D": ("RNN", {}, (torch.randn(1, 3, 2, 4),)),
    "input 1-D": ("LSTM", {}, (x1,)),
    "gru input 4-D": ("GRU", {}, (torch.randn(1, 3, 2, 4),)),
    "input_size mismatch": ("LSTM", {}, (torch.randn(3, 2, 7),)),
    "input_size mismatch unbatched": ("GRU", {}, (torch.randn(3, 7),)),
    "input dtype": ("LSTM", {}, (x3.double(),)),
    "input int": ("RNN", {}, (torch.ones(3, 2, 4, dtype=torch.long),)),
    "hx layers": ("RNN", {"num_layers": 2}, (x3, z(1, 2, 5))),
    "hx batch": ("GRU", {}, (x3, z(1, 3, 5))),
    "hx hidden": ("GRU", {"bidirectional": True}, (x3, z(2, 2, 6))),
    "lstm h size": ("LSTM", {}, (x3, (z(1, 2, 6), z(1, 2, 5)))),
    "lstm c size": ("LSTM", {}, (x3, (z(1, 2, 5), z(1, 2, 6)))),
    "lstm proj h given hidden size": ("LSTM", {"proj_size": 3}, (x3, (z(1, 2, 5), z(1, 2, 5)))),
    "lstm proj c given proj size": ("LSTM", {"proj_size": 3}, (x3, (z(1, 2, 3), z(1, 2, 3)))),
    "batched input, 2-D hx": ("RNN", {}, (x3, z(1, 5))),
    "unbatched input, 3-D hx": ("GRU", {}, (x2, z(1, 1, 5))),
    "lstm batched input, 2-D hx": ("LSTM", {}, (x3, (z(1, 5), z(1, 5)))),
    "lstm unbatched input, 3-D hx": ("LSTM", {}, (x2, (z(1, 1, 5), z(1, 1, 5)))),
    "lstm hx is a tensor": ("LSTM", {}, (x3, z(1, 2, 5))),
    "gru hx is a tuple": ("GRU", {}, (x3, (z(1, 2, 5),))),
    "hx dtype": ("GRU", {}, (x3, z(1, 2, 5, dtype=torch.float64))),
    "rnn hx dtype": ("RNN", {}, (x3, z(1, 2, 5, dtype=torch.float64))),
    "empty sequence": ("LSTM", {}, (torch.randn(0, 2, 4),)),
    "packed hx batch": ("GRU", {}, (packed(), z(1, 3, 5))),
    "cell input 3-D": ("RNNCell", {}, (x3,)),
    "cell hx 3-D": ("GRUCell", {}, (x2, z(1, 3, 5))),
    "lstm cell hx[1] 3-D": ("LSTMCell", {}, (x2, (z(3, 5), z(1, 3, 5)))),
    "cell input_size": ("LSTMCell", {}, (torch.randn(2, 3),)),
    "cell hidden_size": ("GRUCell", {}, (torch.randn(2, 4), z(2, 6))),
    "cell batch": ("RNNCell", {}, (torch.randn(2, 4), z(3, 5))),
    "lstm cell c hidden_size": ("LSTMCell", {}, (torch.randn(2, 4), (z(2, 5), z(2, 6)))),
    "cell 1-D input, 2-D hx": ("RNNCell", {}, (x1, z(2, 5))),
    "cell 2-D input, 1-D hx": ("GRUCell", {}, (torch.randn(2, 4), z(5))),
    "cell input dtype": ("GRUCell", {}, (torch.randn(2, 4).double(),)),
    "cell hx dtype": ("LSTMCell", {}, (torch.randn(2, 4), (z(2, 5).double(), z(2, 5)))),
    "cell bad nonlinearity": ("RNNCell", {"nonlinearity": "sigmoid"}, (torch.randn(2, 4),)),
}
# torch.nn's message for these comes from an implementation detail (oneDNN's dtype table, an
# index_select inside aten): only the exception type is compared.
TYPE_ONLY = {"lstm hx dtype": ("LSTM", {}, (x3, (z(1, 2, 5, dtype=torch.float64), z(1, 2, 5)))),
             "lstm packed hx batch": ("LSTM", {}, (packed(), (z(1, 3, 5), z(1, 3, 5))))}


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def _check(name, kwargs, args, backend, compare_message=True):
    require(backend, CELL[name], torch.float32)
    torch_mod = NN[name](4, 5, **kwargs)
    fast_mod = FAST[name](4, 5, **kwargs, backend=backend)
    fast_mod.load_state_dict(torch_mod.state_dict())
    expected, actual = _raised(lambda: torch_mod(*args)), _raised(lambda: fast_mod(*args))
    assert type(actual) is type(expected), (actual, expected)
    if compare_message:
        assert str(actual) == str(expected)


BACKENDS = ["reference", "native", "numba"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_error_matches_torch(case, backend):
    _check(*FORWARD_CASES[case], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TYPE_ONLY))
def test_forward_error_type_matches_torch(case, backend):
    _check(*TYPE_ONLY[case], backend, compare_message=False)


CONSTRUCTOR_CASES = {
    "dropout negative": ("LSTM", {"dropout": -0.1}),
    "dropout above 1": ("GRU", {"dropout": 1.5}),
    "dropout bool": ("RNN", {"dropout": True}),
    "bad nonlinearity": ("RNN", {"nonlinearity": "sigmoid"}),
    "proj_size on RNN": ("RNN", {"proj_size": 2}),
    "proj_size on GRU": ("GRU", {"proj_size": 2}),
    "proj_size negative": ("LSTM", {"proj_size": -1}),
    "proj_size equal hidden": ("LSTM", {"proj_size": 5}),
    "bias not bool": ("LSTM", {"bias": 1}),
    "batch_first not bool": ("GRU", {"batch_first": "yes"}),
    "num_layers zero": ("RNN", {"num_layers": 0}),
}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES))
def test_constructor_error_matches_torch(case):
    name, kwargs = CONSTRUCTOR_CASES[case]
    expected = _raised(lambda: NN[name](4, 5, **kwargs))
    actual = _raised(lambda: FAST[name](4, 5, **kwargs))
    assert type(actual) is type(expected) and str(actual) == str(expected)


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("size", [("x", 5), (4, 0), (0, 5), (4.0, 5)])
def test_size_argument_errors_match_torch(name, size):
    expected = _raised(lambda: NN[name](*size))
    actual = _raised(lambda: FAST[name](*size))
    assert type(actual) is type(expected) and str(actual) == str(expected)


def test_dropout_with_one_layer_warns_as_torch():
    for cls in (nn.LSTM, fastrnn.LSTM):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cls(4, 5, dropout=0.5)
        assert [str(w.message) for w in caught] == [
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
            "expects num_layers greater than 1, but got dropout=0.5 and num_layers=1"]


@pytest.mark.parametrize("name", list(FAST))
def test_unknown_backend_is_a_value_error_naming_the_choices(name):
    with pytest.raises(ValueError, match="'auto', 'numba', 'triton', 'native', 'reference'"):
        FAST[name](4, 5, backend="cudnn")
