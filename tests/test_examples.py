"""The examples in examples/ run end to end (shortened with --steps/--epochs) and print their
final metrics line.

Each runs as its own process, as a user would run it, on the default backend ("auto"); the
backend it reports must be the one fastrnn.backends.choose picks for its cell here.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fastrnn import backends

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

CASES = {  # example: (short-run arguments, its recurrence, pattern of its final line)
    "char_rnn.py": (["--steps", "20", "--length", "40", "--prompt", "The lamp"], "lstm",
                    r"final: train_loss=(\d+\.\d+) val_loss=(\d+\.\d+) "
                    r"val_bits_per_char=\d+\.\d+ time=\d+\.\ds"),
    "hello_ohlol.py": (["--epochs", "4"], "rnn_tanh",
                       r"final: predicted=([ehlo]{5}) target=ohlol loss=(\d+\.\d+) "
                       r"correct=(True|False)"),
    "seq2seq_reverse.py": (["--steps", "40"], "gru",
                           r"final: sequence_accuracy=([01]\.\d{3}) token_accuracy=([01]\.\d{3}) "
                           r"\(target sequence_accuracy >= 0\.90: (met|NOT met)\) time=\d+\.\ds"),
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
    assert re.fullmatch(final, lines[-1]), proc.stdout
    if example == "hello_ohlol.py":
        assert len([line for line in lines if line.startswith("Predicted string: ")]) == 4
    if example == "char_rnn.py":
        sample = proc.stdout.split("sample:\n", 1)[1].rsplit("\nfinal: ", 1)[0]
        assert sample.startswith("The lamp") and len(sample) == len("The lamp") + 40, sample
