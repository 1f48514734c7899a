"""Elman RNN with relu: ``h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)`` (G = 1)."""
from __future__ import annotations

import torch

from fastrnn.cells import elman, scalar
from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, H), h (b, H) -> (h' (b, H), None)."""
    return torch.relu(xg_t + h @ w_hh.t()), None


# ------------------------------------------------------------------------------ numba step math
# One batch row of one step for the numba backend's one forward and one backward time loop
# (fastrnn/kernels/numba_cpu/loops.py documents every argument): Numba-compilable plain Python,
# activations from fastrnn.cells.scalar, rows indexed in the 2-D arrays, each loop writing one
# array (so that they vectorize).

def numba_forward(a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    """h' = relu(h W_hh^T + (xg + bias)) in place of a[r, :H], the row's h W_hh^T, which is the
    output row (SPEC.gates_in_y: a is y, r = q); xg (N, H) row q, bias (H,); h (B, H). b_hn, c,
    w_cell, b, out, o: unused."""
    zero = scalar.one(a) - scalar.one(a)
    for u in range(h.shape[1]):
        v = a[r, u] + (xg[q, u] + bias[u])
        a[r, u] = zero if v <= zero else v  # NaN passes through, as in torch.relu


def numba_backward(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                   w_cell, d_xg, d_hn, dg):
    """d_xg[q] (d_xg: (N, H)) from dm[b] (dm: (B, H)), the gradient w.r.t. the row's h' = y[q]
    (y: (N, H)). The other arguments: unused."""
    zero = scalar.one(dm) - scalar.one(dm)
    for u in range(dm.shape[1]):
        # torch's threshold_backward: the gradient passes where y is not <= 0, NaN included
        d_xg[q, u] = zero if y[q, u] <= zero else dm[b, u]


SPEC = CellSpec(name="rnn_relu", gates=1, states=("h",), torch_mode="RNN_RELU", code=1,
                step=reference_step, gates_in_y=True)


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def triton_step_math():
    """The ``CELL`` of the Triton kernels: :func:`fastrnn.cells.elman.triton_step_math` with
    relu."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import cell_jit

    @cell_jit
    def relu(x):
        return tl.where(x <= 0.0, 0.0, x)  # NaN passes through (tl.maximum may drop it)

    @cell_jit
    def relu_grad(dh, h_new):
        return tl.where(h_new <= 0.0, 0.0, dh)  # as torch: the gradient passes where h' is NaN

    return elman.triton_step_math(SPEC, relu, relu_grad)
