"""Scalar functions the cells' compiled step math calls (``tanh``, ``sigmoid``, ``one``).

Plain Python here (numpy scalars), so a cell's step math also runs un-jitted; a compiled backend
registers its own implementation of each on these very functions (Numba: the ``@overload``s in
``fastrnn/kernels/numba_cpu/activations.py`` and ``jit.py``, which vectorize). Nothing here
imports Numba.
"""
from __future__ import annotations

import numpy as np


def tanh(x):
    """tanh of a float scalar, in its dtype."""
    return np.tanh(x)


def sigmoid(x):
    """1 / (1 + e^-x) of a float scalar, in its dtype."""
    return 1 / (1 + np.exp(-x))


def one(a):
    """1 in the dtype of array ``a`` (an int literal would promote float32 to float64 in
    compiled code)."""
    return a.dtype.type(1)
