"""Elman RNN with relu: ``h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (G = 1)."""
from __future__ import annotations

import torch

from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, H), h (b, H) -> (h' (b, H), None)."""
    return torch.relu(xg_t + h @ w_hh.t()), None


SPEC = CellSpec(name="rnn_relu", gates=1, states=("h",), torch_mode="RNN_RELU", code=1,
                step=reference_step)


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def triton_step_math():
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`).
    Stash: h'. Tiles are float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import CellMath, cell_jit

    @cell_jit
    def forward(p, h, c):
        h_new = tl.maximum(p[0], 0.0)
        return h_new, c, (h_new,)

    @cell_jit
    def backward(dh, dc, stash, h_prev):
        d = tl.where(stash[0] > 0.0, dh, 0.0)
        return (d,), (d,), tl.zeros_like(dh), dc

    return CellMath(SPEC, forward=forward, backward=backward)
