"""The recurrent cells fastrnn runs: one file per cell, one registry.

A cell file (``rnn_tanh.py``, ``rnn_relu.py``, ``lstm.py``, ``gru.py``, ``peephole_lstm.py``) holds everything that is
the cell's own: its :class:`CellSpec` ``SPEC`` (gate count, states, the torch.nn mode it
replaces), the reference step (readable torch, the oracle), and the step math the compiled
backends inline into their one generic time loop. Adding a cell is a new file here plus its entry
in ``_MODULES`` below (and its test entry).

>>> from fastrnn import cells
>>> cells.spec("lstm").gates
4
"""
from __future__ import annotations

from fastrnn.cells import gru, lstm, peephole_lstm, rnn_relu, rnn_tanh
from fastrnn.cells.spec import CellSpec

_MODULES = (rnn_tanh, rnn_relu, lstm, gru, peephole_lstm)

#: name -> :class:`CellSpec` of every cell, in registry order.
SPECS = {m.SPEC.name: m.SPEC for m in _MODULES}
#: name -> the cell's module (its SPEC, reference step and the backends' step math).
MODULES = {m.SPEC.name: m for m in _MODULES}
#: The cell names.
CELLS = tuple(SPECS)
#: name -> G, the gate count (rows of ``W_hh`` per hidden unit).
GATES = {name: s.gates for name, s in SPECS.items()}
#: torch.nn ``mode`` (``nn.RNNBase.mode``) -> cell name.
CELL_OF_MODE = {s.torch_mode: name for name, s in SPECS.items() if s.torch_mode}


def spec(name):
    """The :class:`CellSpec` of cell ``name``; ValueError for an unknown name."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown cell {name!r}; expected one of {CELLS}") from None


__all__ = ["CellSpec", "SPECS", "MODULES", "CELLS", "GATES", "CELL_OF_MODE", "spec"]
