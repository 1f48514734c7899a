"""The users' own programs (/work/shared/seeds/*.txt) run with fastrnn's classes in place of
torch.nn's and print the same numbers.

Each program is transcribed from its blog post into a function taking ``nn``: the real
``torch.nn``, or :class:`_FastNN`, a stand-in whose ``RNN``/``LSTM``/``GRU``/``RNNCell``/
``LSTMCell``/``GRUCell`` are fastrnn's (with one ``backend``) and whose every other name
(``Module``, ``Linear``, ``Embedding``, ``init``, ...) is torch.nn's. The code between is the
blog's, with its lost indentation restored; every other change is marked ``# CHANGED:``.

Every test runs its program twice from the same seed, once on torch.nn and once on fastrnn, and
compares what the program printed (text exactly, numbers within a tolerance, see
:func:`assert_same_printout`) and what it produced (tensors, losses, strings; see
:func:`assert_same`).
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn
import torch.optim as optim
import torch.utils.data as Data

import fastrnn
from fastrnn import backends

# Backends that run on a CPU. A kernel backend that cannot run here is skipped with its reason.
BACKENDS = ["reference", "native", "auto", "numba"]

# float32 values are compared with atol=1e-5: fastrnn's backends sum the same products in another
# order than torch.nn's oneDNN/aten kernels, which moves float32 results by a few ulps (~1e-7 for
# the O(1) values here) per step; 1e-5 leaves room for that to grow over the programs' short
# sequences and training runs, and is far below any difference a wrong recurrence would make.
ATOL = 1e-5

_RECURRENT = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")
_CELL_KINDS = {"RNN": "rnn_tanh", "RNNCell": "rnn_tanh", "LSTM": "lstm", "LSTMCell": "lstm",
               "GRU": "gru", "GRUCell": "gru"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The programs' tensors are tiny (at most 32 x 256): one intra-op thread runs them fastest,
    and keeps the file's runtime steady on a busy machine (several threads spinning for tiny
    ops on shared cores cost seconds per test). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _FastNN:
    """``torch.nn`` with its recurrent classes replaced by fastrnn's, all on one ``backend``."""

    def __init__(self, backend):
        self.backend = backend
        for name in _RECURRENT:
            setattr(self, name, functools.partial(getattr(fastrnn, name), backend=backend))

    def __getattr__(self, name):
        return getattr(torch.nn, name)


def require(backend, *classes):
    """Skip (visibly, with the reason) when ``backend`` cannot run the program's recurrences."""
    if backend in ("auto", "native", "reference"):
        return  # these run everything on a CPU
    for name in classes:
        cell = _CELL_KINDS[name]
        reason = backends.why_not(backend, cell, torch.device("cpu"), torch.float32)
        if reason is not None:
            pytest.skip(f"backend {backend!r} cannot run {cell} on CPU float32: {reason}")


def run(program, nn, seed=0, **kwargs):
    """Run ``program(nn, **kwargs)`` from a fixed seed; return (what it printed, what it returned)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        produced = program(nn, **kwargs)
    return out.getvalue(), produced


def run_both(program, backend, **kwargs):
    """The program on torch.nn, then on fastrnn with ``backend``, from the same seed."""
    expected = run(program, torch.nn, **kwargs)
    actual = run(program, _FastNN(backend), **kwargs)
    return expected, actual


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")
# torch prints a tensor's grad_fn, the name of the autograd node that made it; fastrnn's backends
# build their results with other ops than aten's fused cells (e.g. CatBackward0 for
# TanhBackward0), a name that is no number the program computed: it is left out of the comparison.
_GRAD_FN = re.compile(r"grad_fn=<\w+>")


def _normalize(text, backend):
    text = _GRAD_FN.sub("grad_fn=<...>", text)
    # A module made with an explicit backend says so in its repr (torch.nn's repr plus
    # ", backend='name'"); with backend="auto" the repr is torch.nn's own, character for character.
    if backend != "auto":
        text = text.replace(f", backend={backend!r}", "")
    return text


def assert_same_printout(expected, actual, backend):
    """The text the program printed is the same, numbers aside; each number printed with d > 0
    decimals is within ATOL + 10**-d of torch.nn's (two values within ATOL can round to d
    decimals one unit apart); integers, numbers printed without decimals ("1.") and numbers in
    scientific notation are equal as printed."""
    expected, actual = _normalize(expected, backend), _normalize(actual, backend)
    assert _NUMBER.split(expected) == _NUMBER.split(actual), (expected, actual)
    exp_numbers, act_numbers = _NUMBER.findall(expected), _NUMBER.findall(actual)
    assert len(exp_numbers) == len(act_numbers), (expected, actual)
    for e, a in zip(exp_numbers, act_numbers):
        mantissa = re.split("[eE]", e)[0]
        if "." not in mantissa or mantissa.endswith(".") or "e" in e.lower():
            assert e == a, f"printed {a}, torch.nn printed {e}\n--- torch.nn:\n{expected}\n--- fastrnn:\n{actual}"
        else:
            decimals = len(mantissa.split(".")[1])
            assert abs(float(e) - float(a)) <= ATOL + 10.0 ** -decimals, (
                f"printed {a}, torch.nn printed {e}\n--- torch.nn:\n{expected}\n--- fastrnn:\n{actual}")


def assert_same(expected, actual, path="produced"):
    """What the program produced is the same: tensors of one shape and dtype with values within
    ATOL (float32, see ATOL), floats within ATOL, strings/ints/shapes equal."""
    assert type(expected) is type(actual), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(expected) == list(actual), path
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)) and not isinstance(expected, torch.Size):
        assert len(expected) == len(actual), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert expected.shape == actual.shape, f"{path}: {actual.shape} != {expected.shape}"
        assert expected.dtype == actual.dtype, path
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{path}: {m}")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=0, abs_tol=ATOL), f"{path}: {actual} != {expected}"
    else:
        assert expected == actual, f"{path}: {actual!r} != {expected!r}"


def check_program(program, backend, **kwargs):
    """Run on both, compare, and return (torch.nn's run, fastrnn's run) for program-specific checks."""
    (exp_text, exp_produced), (act_text, act_produced) = run_both(program, backend, **kwargs)
    assert exp_text.strip(), "the program printed nothing"
    assert_same_printout(exp_text, act_text, backend)
    assert_same(exp_produced, act_produced)
    return (exp_text, exp_produced), (act_text, act_produced)


def _detached(tensors):
    return [t.detach().clone() for t in tensors]


# --------------------------------------------------------------------------------------------
# Seed 000 (形象描述RNN的输入): RNNModel (Embedding -> RNN/GRU -> Linear) trained with Adam and
# clip_grad_norm_ on consecutive mini-batches of a syllable table.

# CHANGED: the blog reads the first line of '汉语音节表.txt' (a table of Chinese syllables); here
# is a small one, inline: pinyin syllables, one line.
SYLLABLES = (
    "a ai an ang ao ba bai ban bang bao bei ben beng bi bian biao bie bin bing bo bu ca cai can "
    "cang cao ce cen ceng cha chai chan chang chao che chen cheng chi chong chou chu chua chuai "
    "chuan chuang chui chun chuo ci cong cou cu cuan cui cun cuo da dai dan dang dao de dei den "
    "deng di dian diao die ding diu dong dou du duan dui dun duo e ei en eng er fa fan fang fei "
    "fen feng fo fou fu ga gai gan gang gao ge gei gen geng gong gou gu gua guai guan guang gui "
    "gun guo ha hai han hang hao he hei hen heng hong hou hu hua huai huan huang hui hun huo\n"
)


def data_iter_consecutive(corpus_indices, batch_size, num_steps, device=None):
    """The blog calls this without defining it; it is d2l's ("Dive into Deep Learning", PyTorch
    edition): consecutive mini-batches of ``num_steps`` indices from ``batch_size`` rows.

    CHANGED: d2l's yields float32 (batch_size, num_steps) tensors, which the blog's model cannot
    take under torch.nn itself (nn.Embedding needs integer indices, and its nn.RNN is not
    batch_first, so (batch, steps) would be read as (steps, batch) against a (1, batch_size, H)
    hidden). The minimal fix: int64 indices, time-major (num_steps, batch_size), contiguous so that
    the blog's ``Y.view(-1)`` lines up with its ``output.view(-1, hidden_size)``."""
    corpus_indices = torch.tensor(corpus_indices, dtype=torch.long, device=device)
    data_len = len(corpus_indices)
    batch_len = data_len // batch_size
    indices = corpus_indices[0: batch_size * batch_len].view(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    for i in range(epoch_size):
        i = i * num_steps
        X = indices[:, i: i + num_steps]
        Y = indices[:, i + 1: i + num_steps + 1]
        yield X.t().contiguous(), Y.t().contiguous()


def seed000_program(nn, rnn_type="RNN", num_epochs=100):
    # 定义基本循环神经网络模型
    # (the blog's "def init" / "super().init()" are its markdown's eaten double underscores)
    class RNNModel(nn.Module):
        def __init__(self, rnn_type, input_size, hidden_size, output_size, num_layers=1):
            super(RNNModel, self).__init__()
            self.rnn_type = rnn_type
            self.input_size = input_size
            self.hidden_size = hidden_size
            self.output_size = output_size
            self.num_layers = num_layers
            self.encoder = nn.Embedding(input_size, hidden_size)
            if rnn_type == 'RNN':
                self.rnn = nn.RNN(hidden_size, hidden_size, num_layers)
            elif rnn_type == 'GRU':
                self.rnn = nn.GRU(hidden_size, hidden_size, num_layers)
            self.decoder = nn.Linear(hidden_size, output_size)

        def forward(self, input, hidden):
            input = self.encoder(input)
            output, hidden = self.rnn(input, hidden)
            output = output.view(-1, self.hidden_size)
            output = self.decoder(output)
            return output, hidden

        def init_hidden(self, batch_size):
            if self.rnn_type == 'RNN':
                return torch.zeros(self.num_layers, batch_size, self.hidden_size)
            elif self.rnn_type == 'GRU':
                return torch.zeros(self.num_layers, batch_size, self.hidden_size)

    # 定义数据集
    chars = io.StringIO(SYLLABLES).readline()  # CHANGED: open('汉语音节表.txt').readline()
    chars = list(chars)
    idx_to_char = sorted(set(chars))  # CHANGED: list(set(chars)), sorted: one order in every process
    char_to_idx = dict([(char, i) for i, char in enumerate(idx_to_char)])
    corpus_indices = [char_to_idx[char] for char in chars]

    # 定义超参数
    input_size = len(idx_to_char)
    hidden_size = 256
    output_size = len(idx_to_char)
    num_layers = 1
    batch_size = 32
    num_steps = 5
    learning_rate = 0.01
    num_epochs = num_epochs  # CHANGED: the blog's 100, a parameter (the test runs a few)

    # 定义模型、损失函数和优化器
    model = RNNModel(rnn_type, input_size, hidden_size, output_size, num_layers)  # CHANGED: 'RNN' -> rnn_type
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=learning_rate)

    losses = []  # CHANGED: also keep every step's loss (the blog prints one per 10 epochs)
    # 训练模型
    for epoch in range(num_epochs):
        model.train()
        hidden = model.init_hidden(batch_size)
        loss = 0
        for X, Y in data_iter_consecutive(corpus_indices, batch_size, num_steps):
            optimizer.zero_grad()
            hidden = hidden.detach()
            output, hidden = model(X, hidden)
            loss = criterion(output, Y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            losses.append(loss.item())
        if epoch % 10 == 0:
            print(f"Epoch {epoch}, Loss: {loss.item()}")
    # The losses are compared, not the trained parameters: clip_grad_norm_ scales the gradient
    # to norm 1 over ~150k (RNN) / ~410k (GRU) parameters, and Adam then moves each parameter by
    # ~lr * g / (|g| + 1e-8), which for the many elements with |g| near 1e-8 turns float32
    # rounding differences of the gradient (relative 1e-7: fastrnn's and torch.nn's gradients
    # agree that closely) into parameter differences of ~1e-5 per step (3.6e-5 in weight_ih
    # after 3 steps, for torch.nn vs reference); the losses stay within 1e-6 of torch.nn's.
    return {"losses": losses}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnn_type", ["RNN", "GRU"])
def test_seed000_rnn_model_training(backend, rnn_type):
    require(backend, rnn_type)
    (_, expected), _ = check_program(seed000_program, backend, rnn_type=rnn_type, num_epochs=3)
    assert len(expected["losses"]) == 3 * 3  # 3 epochs of 3 (32 x 5) mini-batches each
    assert expected["losses"][-1] < expected["losses"][0]  # it trains


# --------------------------------------------------------------------------------------------
# Seed 001 ([PyTorch][chapter 44][RNN]): nn.RNN's parameters and shapes, a 2-layer nn.RNN, and
# RNNCell loops (one layer, two layers). Four scripts of the blog, run one after the other.

def seed001_program(nn):
    produced = {}
    # 4.1 参数
    rnn = nn.RNN(input_size=100, hidden_size=5)
    param = rnn._parameters

    print("\n 权重系数", param.keys())

    print(rnn.weight_ih_l0.shape)
    produced["parameters"] = {name: p.detach().clone() for name, p in param.items()}

    # 4.2 单层例子
    rnn = nn.RNN(input_size=100, hidden_size=20, num_layers=1)

    X = torch.randn(10, 3, 100)

    h_0 = torch.zeros(1, 3, 20)

    out, h = rnn(X, h_0)

    print("\n out.shape", out.shape)

    print("\n h.shape", h.shape)
    produced["one_layer"] = _detached([out, h])

    # 4.3 多层RNN
    rnn = nn.RNN(input_size=100, hidden_size=20, num_layers=2)
    print(rnn)

    x = torch.randn(10, 3, 100)  # 默认是[L,N,d]结构

    out, h = rnn(x)

    print(out.shape, h.shape)
    produced["two_layers"] = _detached([out, h])

    # 5.1 单层RNN (nn.RNNCell)
    def main():
        model = nn.RNNCell(input_size=10, hidden_size=20)

        h1 = torch.zeros(3, 20)

        trainData = torch.randn(8, 3, 10)

        for xt in trainData:

            h1 = model(xt, h1)

        print(h1.shape)
        return h1  # CHANGED: returned, to compare its values too

    produced["cell_loop"] = _detached([main()])

    # 6.2 多层RNN (two nn.RNNCell)
    def main():
        layer1 = nn.RNNCell(input_size=40, hidden_size=30)
        layer2 = nn.RNNCell(input_size=30, hidden_size=20)

        h1 = torch.zeros(3, 30)
        h2 = torch.zeros(3, 20)

        trainData = torch.randn(8, 3, 40)

        for xt in trainData:

            h1 = layer1(xt, h1)
            h2 = layer2(h1, h2)

        print(h1.shape)
        print(h2.shape)
        return h1, h2  # CHANGED: returned, to compare their values too

    produced["two_cell_loop"] = _detached(main())
    return produced


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed001_shapes_parameters_and_cell_loops(backend):
    require(backend, "RNN", "RNNCell")
    (expected_text, _), (actual_text, produced) = check_program(seed001_program, backend)
    lines = _normalize(actual_text, backend).split("\n")
    # What the blog shows for torch.nn, and what fastrnn must print too.
    assert " 权重系数 dict_keys(['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0'])" in lines
    assert "torch.Size([5, 100])" in lines
    assert " out.shape torch.Size([10, 3, 20])" in lines
    assert " h.shape torch.Size([1, 3, 20])" in lines
    assert "RNN(100, 20, num_layers=2)" in lines
    assert "torch.Size([10, 3, 20]) torch.Size([2, 3, 20])" in lines
    assert lines[-4:] == ["torch.Size([3, 20])", "torch.Size([3, 30])", "torch.Size([3, 20])", ""]
    if backend == "auto":
        assert actual_text == expected_text  # no grad_fn printed, the repr is torch.nn's: all of it
    assert list(produced["parameters"]) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]


# --------------------------------------------------------------------------------------------
# Seed 002 (如何搭建LSTM(pytorch版)): a 2-layer LSTM and a 2-layer bidirectional LSTM with (h0, c0).

def seed002_program(nn):
    rnn = nn.LSTM(10, 20, 2)  # (input_size,hidden_size,num_layers)
    input = torch.randn(5, 3, 10)  # (seq_len, batch, input_size)
    h0 = torch.randn(2, 3, 20)  # (num_layers,batch,output_size)
    c0 = torch.randn(2, 3, 20)  # (num_layers,batch,output_size)
    output, (hn, cn) = rnn(input, (h0, c0))
    print(output.shape, hn.shape, cn.shape)  # CHANGED: the blog prints nothing; shapes printed
    produced = {"lstm": _detached([output, hn, cn])}

    rnn = nn.LSTM(input_size=10, hidden_size=20, num_layers=2, bidirectional=True)  # (input_size,hidden_size,num_layers)
    input = torch.randn(5, 3, 10)  # (seq_len, batch, input_size)
    h0 = torch.randn(4, 3, 20)  # (num_layers,batch,output_size)
    c0 = torch.randn(4, 3, 20)  # (num_layers,batch,output_size)
    output, (hn, cn) = rnn(input, (h0, c0))
    print(output.shape, hn.shape, cn.shape)  # CHANGED: as above
    produced["bidirectional_lstm"] = _detached([output, hn, cn])
    return produced


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed002_two_layer_and_bidirectional_lstm(backend):
    require(backend, "LSTM")
    _, (text, produced) = check_program(seed002_program, backend)
    assert text == ("torch.Size([5, 3, 20]) torch.Size([2, 3, 20]) torch.Size([2, 3, 20])\n"
                    "torch.Size([5, 3, 40]) torch.Size([4, 3, 20]) torch.Size([4, 3, 20])\n")
    # The last step of the forward direction of the top layer is its h_n.
    output, hn, _ = produced["bidirectional_lstm"]
    torch.testing.assert_close(output[-1, :, :20], hn[2], atol=0, rtol=0)
    torch.testing.assert_close(output[0, :, 20:], hn[3], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Seed 003 (基于代码一步一步教你深度学习中循环神经网络(RNN)的原理): char-level text generation
# with nn.RNN, trained on "Hello, how are you?".

def seed003_program(nn):
    # 定义文本数据集
    text = "Hello, how are you?"  # (the blog's curly quotes made straight)

    # 创建字符索引映射表
    chars = sorted(set(text))  # CHANGED: list(set(text)), sorted: one order in every process
    char2idx = {c: i for i, c in enumerate(chars)}
    idx2char = {i: c for i, c in enumerate(chars)}

    # 将文本转换为数字序列
    data = [char2idx[c] for c in text]

    # 定义RNN模型
    class RNN(nn.Module):
        def __init__(self, input_size, hidden_size, output_size):
            super(RNN, self).__init__()
            self.hidden_size = hidden_size
            self.embedding = nn.Embedding(input_size, hidden_size)
            self.rnn = nn.RNN(hidden_size, hidden_size)
            self.fc = nn.Linear(hidden_size, output_size)

        def forward(self, x, hidden):
            x = self.embedding(x)
            x, hidden = self.rnn(x, hidden)
            x = self.fc(x)
            return x, hidden

    # 定义模型参数
    input_size = len(chars)
    hidden_size = 32
    output_size = len(chars)

    # 实例化模型和损失函数
    rnn = RNN(input_size, hidden_size, output_size)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(rnn.parameters(), lr=0.01)

    losses = []
    # 训练模型
    # (inputs (1, 18) reach the non-batch_first nn.RNN as 1 time step of a batch of 18: that is
    # what the blog's program does under torch.nn, and what it must do under fastrnn; kept.)
    num_epochs = 100
    hidden = None
    for epoch in range(num_epochs):
        inputs = torch.tensor(data[:-1]).unsqueeze(0)
        targets = torch.tensor(data[1:]).unsqueeze(0)

        optimizer.zero_grad()

        outputs, hidden = rnn(inputs, hidden)
        # CHANGED: the blog feeds each epoch's hidden to the next epoch's forward still attached
        # to the previous (already backpropagated) graph, and torch.nn itself then fails in the
        # 2nd epoch ("Trying to backward through the graph a second time"); detached.
        hidden = hidden.detach()
        loss = criterion(outputs.squeeze(), targets.squeeze())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

        if (epoch + 1) % 10 == 0:
            print(f'Epoch [{epoch+1}/{num_epochs}], Loss: {loss.item():.4f}')

    # 生成文本
    # Unbatched, as the blog intends: a 1-element index -> embedding (1, 32) -> nn.RNN sees an
    # unbatched 2-D (seq_len=1, 32) input and an unbatched (1, 32) hidden.
    with torch.no_grad():
        input_char = text[0]
        result = input_char
        hidden = None

        for _ in range(len(text) - 1):
            input_idx = torch.tensor(char2idx[input_char]).unsqueeze(0)
            output, hidden = rnn(input_idx, hidden)
            # CHANGED: torch.max(output.squeeze(), dim=1): output is (1, n_chars), squeezed to
            # 1-D, has no dim 1 (IndexError under torch.nn itself); the max over dim 1 of output.
            _, top_idx = torch.max(output, dim=1)
            predicted_char = idx2char[top_idx.item()]
            result += predicted_char
            input_char = predicted_char
    print("Generated Text:", result)
    # The losses and the generated text are compared; the last hidden state is not: 100 steps of
    # Adam leave parameters 1e-7 apart (float32 rounding), and 18 steps of the trained, expansive
    # recurrence amplify that past ATOL (the same happens between two float32 orders of summation
    # in torch.nn itself), while the argmax characters stay the same.
    return {"losses": losses, "generated": result, "hidden_shape": tuple(hidden.shape)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed003_char_rnn_generation(backend):
    require(backend, "RNN")
    (_, expected), (text, produced) = check_program(seed003_program, backend)
    assert produced["generated"] == expected["generated"]  # the same text, character for character
    assert f"Generated Text: {expected['generated']}\n" in text
    assert len(produced["generated"]) == len("Hello, how are you?")
    assert produced["hidden_shape"] == (1, 32)  # the unbatched hidden of unbatched input
    assert expected["losses"][-1] < expected["losses"][0] / 2  # it trains


# --------------------------------------------------------------------------------------------
# Seed 004 (【作业九】RNN-SRN-Seq2Seq): a simple recurrent network with all weights 1 and biases 0,
# by nn.RNNCell and by nn.RNN; the hello -> ohlol RNNCell model; a seq2seq encoder-decoder.

def srn_numpy_program():
    """The blog's numpy SRN with tanh (1(2)): the numbers the torch programs must reproduce."""
    inputs = np.array([[1., 1.], [1., 1.], [2., 2.]])
    state_t = np.zeros(2)
    w1, w2, w3, w4, w5, w6, w7, w8 = 1., 1., 1., 1., 1., 1., 1., 1.
    U1, U2, U3, U4 = 1., 1., 1., 1.
    outputs = []
    for t, input_t in enumerate(inputs):
        input_h1 = np.dot([w1, w3], input_t) + np.dot([U2, U4], state_t)
        input_h2 = np.dot([w2, w4], input_t) + np.dot([U1, U3], state_t)
        state_t = np.tanh(input_h1), np.tanh(input_h2)
        output_y1 = np.dot([w5, w7], state_t)
        output_y2 = np.dot([w6, w8], state_t)
        outputs.append([output_y1, output_y2])
    return outputs


def srn_rnncell_program(nn):
    batch_size = 1
    seq_len = 3  # 序列长度(多少时间步)
    input_size = 2  # 输入序列维度
    hidden_size = 2  # 隐藏层维度
    output_size = 2  # 输出层维度

    # 创建RNNCell实例
    cell = nn.RNNCell(input_size=input_size, hidden_size=hidden_size)  # (blog: torch.nn.RNNCell)
    for name, param in cell.named_parameters():
        if name.startswith('weight'):  # 初始化weight
            torch.nn.init.ones_(param)
        else:  # 初始化bias
            torch.nn.init.zeros_(param)

    # 线性层-> 将隐藏状态映射到输出
    linear = torch.nn.Linear(hidden_size, output_size)
    linear.weight.data = torch.Tensor([[1, 1], [1, 1]])
    linear.bias.data = torch.Tensor([0.0])

    seq = torch.Tensor([[[1, 1]], [[1, 1]], [[2, 2]]])
    hidden = torch.zeros(batch_size, hidden_size)
    output = torch.zeros(batch_size, output_size)
    outputs = []
    for idx, input in enumerate(seq):
        print('===========================')
        print(f"第{idx+1}时刻:")
        print(f'Input :{input}')
        print(f'hidden :{hidden}')
        hidden = cell(input, hidden)  # 使用RNNCell处理当前输入,并更新隐藏状态
        output = linear(hidden)  # 使用线性层将隐藏状态转换为输出
        print(f"output :{output}")
        outputs.append(output.detach())
    return {"outputs": outputs}


def srn_rnn_program(nn):
    batch_size = 1
    seq_len = 3
    input_size = 2
    hidden_size = 2
    output_size = 2
    num_layers = 1

    # 创建RNN实例
    cell = nn.RNN(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)  # (blog: torch.nn.RNN)
    for name, param in cell.named_parameters():
        if name.startswith('weight'):
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.zeros_(param)

    linear = torch.nn.Linear(hidden_size, output_size)
    linear.weight.data = torch.Tensor([[1, 1], [1, 1]])
    linear.bias.data = torch.Tensor([0.0])

    inputs = torch.Tensor([[[1, 1]], [[1, 1]], [[2, 2]]])
    hidden = torch.zeros(num_layers, batch_size, hidden_size)
    out, hidden = cell(inputs, hidden)

    print("第1时刻:")
    print(f'Input : {inputs[0]}')
    print(f'hidden: {[0 , 0]}')
    print(f'Output: {linear(out[0])}')
    print('======================================')
    print("第2时刻:")
    print(f'Input : {inputs[1]}')
    print(f'hidden: {out[0]}')
    print(f'Output: {linear(out[1])}')
    print('=======================================')
    print("第3时刻:")
    print(f'Input : {inputs[2]}')
    print(f'hidden: {out[1]}')
    print(f'Output: {linear(out[2])}')
    return {"outputs": [linear(o).detach() for o in out], "hidden": hidden.detach()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed004_srn_all_ones(backend):
    require(backend, "RNN", "RNNCell")
    published = ["1.9281, 1.9281", "1.9985, 1.9985", "2.0000, 2.0000"]  # the blog's numbers
    numpy_outputs = torch.tensor(srn_numpy_program(), dtype=torch.float32)
    for program, label in [(srn_rnncell_program, "output :"), (srn_rnn_program, "Output: ")]:
        _, (text, produced) = check_program(program, backend)
        printed = re.findall(re.escape(label) + r"tensor\(\[\[(.*?)\]\]", text)
        assert printed == published, (program.__name__, text)
        # and the values themselves: the blog's numpy SRN's (float64), within float32's rounding
        torch.testing.assert_close(torch.cat(produced["outputs"]), numpy_outputs, atol=ATOL, rtol=0)


def hello_ohlol_program(nn):
    # 定义参数
    input_size = 4  # 输入特征的维度:对应的是 one-hot 编码的大小(4个字符)
    hidden_size = 4  # 隐藏层维度
    batch_size = 1  # 批次大小(这里是1,表示一次只处理一个字符)

    idx2char = ['e', 'h', 'l', 'o']

    x_data = [1, 0, 2, 2, 3]  # 对应字符 ['h', 'e', 'l', 'l', 'o']
    y_data = [3, 1, 2, 3, 2]  # 对应目标字符 ['o', 'h', 'l', 'o', 'l']

    one_hot_lookup = [
        [1, 0, 0, 0],  # 'e'
        [0, 1, 0, 0],  # 'h'
        [0, 0, 1, 0],  # 'l'
        [0, 0, 0, 1],  # 'o'
    ]
    x_one_hot = [one_hot_lookup[x] for x in x_data]

    inputs = torch.Tensor(x_one_hot).view(-1, batch_size, input_size)  # (序列长度, 批次大小, 输入维度)
    labels = torch.LongTensor(y_data).view(-1, 1)  # (序列长度, 1)

    # 定义RNN模型
    class Model(nn.Module):
        def __init__(self, input_size, hidden_size, batch_size):
            super(Model, self).__init__()
            self.batch_size = batch_size
            self.input_size = input_size
            self.hidden_size = hidden_size
            self.rnncell = nn.RNNCell(input_size=self.input_size, hidden_size=self.hidden_size)

        def forward(self, input, hidden):
            hidden = self.rnncell(input, hidden)
            return hidden

        def init_hidden(self):
            return torch.zeros(self.batch_size, self.hidden_size)

    net = Model(input_size, hidden_size, batch_size)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(net.parameters(), lr=0.1)

    losses, predicted = [], []  # CHANGED: kept as well as printed
    for epoch in range(15):
        loss = 0
        optimizer.zero_grad()
        hidden = net.init_hidden()  # 初始化隐藏状态
        print('Predicted string: ', end='')
        string = ''
        for input, label in zip(inputs, labels):
            hidden = net(input, hidden)
            loss += criterion(hidden, label)
            _, idx = hidden.max(dim=1)
            print(idx2char[idx.item()], end='')
            string += idx2char[idx.item()]
        loss.backward()
        optimizer.step()
        print(', Epoch [%d/15] loss=%.4f' % (epoch + 1, loss.item()))
        losses.append(loss.item())
        predicted.append(string)
    return {"losses": losses, "predicted": predicted}


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed004_hello_ohlol(backend):
    require(backend, "RNNCell")
    (_, expected), (text, produced) = check_program(hello_ohlol_program, backend)
    assert produced["predicted"] == expected["predicted"]  # the same strings, every epoch
    printed = re.findall(r"Predicted string: (\w+), Epoch \[(\d+)/15\]", text)
    assert printed == [(s, str(i + 1)) for i, s in enumerate(expected["predicted"])]
    assert len(expected["losses"]) == 15
    assert expected["losses"][-1] < expected["losses"][0]  # it trains


def seq2seq_program(nn, num_epochs=5000, print_every=1000):
    # CHANGED: the blog picks cuda when there is one; these are the CPU backends' tests
    device = torch.device('cpu')
    # S: 表示解码输入的开始符号  E: 表示解码输出的结束符号  ?: 用于填充空白序列
    letter = [c for c in 'SE?abcdefghijklmnopqrstuvwxyz']
    letter2idx = {n: i for i, n in enumerate(letter)}

    seq_data = [
        ['hello', 'hola'],
        ['cat', 'gato'],
        ['good', 'bueno'],
    ]

    # Seq2Seq 参数
    n_step = max([max(len(i), len(j)) for i, j in seq_data])  # 最大长度(=5)
    n_hidden = 128  # 隐藏层维度
    n_class = len(letter2idx)  # 类别数(即字符集大小)
    batch_size = 3  # 批次大小

    def make_data(seq_data):
        enc_input_all, dec_input_all, dec_output_all = [], [], []

        for seq in seq_data:
            for i in range(2):
                seq[i] = seq[i] + '?' * (n_step - len(seq[i]))

            enc_input = [letter2idx[n] for n in (seq[0] + 'E')]
            dec_input = [letter2idx[n] for n in ('S' + seq[1])]
            dec_output = [letter2idx[n] for n in (seq[1] + 'E')]

            enc_input_all.append(np.eye(n_class)[enc_input])
            dec_input_all.append(np.eye(n_class)[dec_input])
            dec_output_all.append(dec_output)

        # CHANGED: torch.Tensor(list of arrays) -> torch.Tensor(np.array(...)): same values,
        # without torch's "extremely slow" list-of-ndarrays warning
        return (torch.Tensor(np.array(enc_input_all)), torch.Tensor(np.array(dec_input_all)),
                torch.LongTensor(dec_output_all))

    enc_input_all, dec_input_all, dec_output_all = make_data(seq_data)

    class TranslateDataSet(Data.Dataset):
        def __init__(self, enc_input_all, dec_input_all, dec_output_all):
            self.enc_input_all = enc_input_all
            self.dec_input_all = dec_input_all
            self.dec_output_all = dec_output_all

        def __len__(self):
            return len(self.enc_input_all)

        def __getitem__(self, idx):
            return self.enc_input_all[idx], self.dec_input_all[idx], self.dec_output_all[idx]

    loader = Data.DataLoader(TranslateDataSet(enc_input_all, dec_input_all, dec_output_all), batch_size, True)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super(Seq2Seq, self).__init__()
            # (dropout=0.5 on a 1-layer nn.RNN does nothing; torch.nn warns, and so does fastrnn)
            self.encoder = nn.RNN(input_size=n_class, hidden_size=n_hidden, dropout=0.5)
            self.decoder = nn.RNN(input_size=n_class, hidden_size=n_hidden, dropout=0.5)
            self.fc = nn.Linear(n_hidden, n_class)

        def forward(self, enc_input, enc_hidden, dec_input):
            enc_input = enc_input.transpose(0, 1)  # [n_step+1, batch_size, n_class]
            dec_input = dec_input.transpose(0, 1)  # [n_step+1, batch_size, n_class]

            _, h_t = self.encoder(enc_input, enc_hidden)
            outputs, _ = self.decoder(dec_input, h_t)

            model = self.fc(outputs)  # [n_step+1, batch_size, n_class]
            return model

    model = Seq2Seq().to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    losses = []  # CHANGED: every epoch's loss kept (the blog prints one per 1000 epochs)
    # 训练过程
    for epoch in range(num_epochs):  # CHANGED: the blog's 5000, a parameter
        for enc_input_batch, dec_input_batch, dec_output_batch in loader:
            h_0 = torch.zeros(1, batch_size, n_hidden).to(device)

            enc_input_batch, dec_input_batch, dec_output_batch = (
                enc_input_batch.to(device), dec_input_batch.to(device), dec_output_batch.to(device))

            pred = model(enc_input_batch, h_0, dec_input_batch)

            pred = pred.transpose(0, 1)  # [batch_size, n_step+1, n_class]
            loss = 0
            for i in range(len(dec_output_batch)):
                loss += criterion(pred[i], dec_output_batch[i])

            if (epoch + 1) % print_every == 0:  # CHANGED: the blog's 1000, a parameter
                print('Epoch:', '%04d' % (epoch + 1), 'lost =', '{:.6f}'.format(loss))

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    # 测试函数:翻译单词
    def translate(word):
        enc_input, dec_input, _ = make_data([[word, '?' * n_step]])
        enc_input, dec_input = enc_input.to(device), dec_input.to(device)
        hidden = torch.zeros(1, 1, n_hidden).to(device)
        output = model(enc_input, hidden, dec_input)

        predict = output.data.max(2, keepdim=True)[1]
        decoded = [letter[i] for i in predict]
        translated = ''.join(decoded[:decoded.index('E')])

        return translated.replace('?', '')

    print('测试')
    translations = {}
    for seq in seq_data:
        word = seq[0]
        translated_word = translate(word)
        print(f'{word} -> {translated_word}')
        translations[word] = translated_word
    return {"losses": losses, "translations": translations}


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed004_seq2seq(backend):
    require(backend, "RNN")
    # 300 of the blog's 5000 epochs (each a step of Adam on the 3 pairs) keep the test short;
    # they are enough to learn the 3 translations.
    with pytest.warns(UserWarning, match="dropout option adds dropout after all but last"):
        (_, expected), (text, produced) = check_program(seq2seq_program, backend,
                                                        num_epochs=300, print_every=100)
    assert produced["translations"] == expected["translations"]
    assert expected["translations"] == {"hello": "hola", "cat??": "gato", "good?": "bueno"}
    assert text.endswith("测试\nhello -> hola\ncat?? -> gato\ngood? -> bueno\n")
