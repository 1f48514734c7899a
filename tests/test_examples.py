"""The examples in examples/ run end to end, as a user runs them, and reach their targets.

Each runs as its own process on the default backend ("auto"); the backend it reports must be the
one fastrnn.backends.choose picks for its cell here. Each is shortened only as far as it still
reaches its target (every example is seeded, so a run is reproducible on one machine; the
thresholds leave margin for another CPU's rounding):

* hello_ohlol.py: the RNNCell model predicts "ohlol" exactly (15 epochs, its default);
* seq2seq_reverse.py: sequence accuracy >= 0.90, the target it prints (400 steps: 0.960 measured;
  250 steps reach only 0.902);
* char_rnn.py: after 150 steps the training loss is below 1.2 nats a character (a uniform guess
  over its 42-character vocabulary costs ln 42 = 3.7; measured 0.85) and the validation
  loss is below the uniform guess (measured 2.73 bits a character vs log2 42 = 5.4).
"""
from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fastrnn import backends

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

CASES = {  # example: (arguments, its recurrence, pattern of its final line)
    "char_rnn.py": (["--steps", "150", "--length", "40", "--prompt", "The lamp"], "lstm",
                    r"final: train_loss=(?P<train>\d+\.\d+) val_loss=\d+\.\d+ "
                    r"val_bits_per_char=(?P<bits>\d+\.\d+) time=\d+\.\ds"),
    "hello_ohlol.py": ([], "rnn_tanh",
                       r"final: predicted=(?P<predicted>[ehlo]{5}) target=ohlol loss=\d+\.\d+ "
                       r"correct=(?P<correct>True|False)"),
    "seq2seq_reverse.py": (["--steps", "400"], "gru",
                           r"final: sequence_accuracy=(?P<accuracy>[01]\.\d{3}) "
                           r"token_accuracy=[01]\.\d{3} "
                           r"\(target sequence_accuracy >= 0\.90: (?P<met>met|NOT met)\) "
                           r"time=\d+\.\ds"),
}


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_runs(example):
    args, cell, final = CASES[example]
    proc = subprocess.run([sys.executable, str(EXAMPLES / example), *args],
                          capture_output=True, text=True, timeout=180, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.rstrip("\n").split("\n")
    step = example == "hello_ohlol.py"  # an RNNCell model: auto dispatches cell steps
    expected = backends.choose("auto", cell, torch.device("cpu"), torch.float32, step=step).name
    assert lines[0].startswith(f"backend: {expected} ("), lines[0]
    found = re.fullmatch(final, lines[-1])
    assert found, proc.stdout
    if example == "hello_ohlol.py":
        assert len([line for line in lines if line.startswith("Predicted string: ")]) == 15
        assert found["predicted"] == "ohlol" and found["correct"] == "True", lines[-1]
    if example == "seq2seq_reverse.py":
        assert float(found["accuracy"]) >= 0.90 and found["met"] == "met", lines[-1]
    if example == "char_rnn.py":
        vocab = int(re.search(r"vocabulary (\d+)", proc.stdout).group(1))
        assert float(found["train"]) < 1.2, lines[-1]
        assert float(found["bits"]) < math.log2(vocab), lines[-1]
        sample = proc.stdout.split("sample:\n", 1)[1].rsplit("\nfinal: ", 1)[0]
        assert sample.startswith("The lamp") and len(sample) == len("The lamp") + 40, sample
