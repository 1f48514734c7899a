"""GRU, gates r, z, n (``W_hh`` rows stacked in this order, as torch.nn; ``b_hn``, the n-gate part
of ``b_hh``, stays inside ``r ⊙ (…)``)::

    r = σ(xg_r + h W_hr^T)      z = σ(xg_z + h W_hz^T)
    n = tanh(xg_n + r ⊙ (h W_hn^T + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h
"""
from __future__ import annotations

import torch

from fastrnn.cells import scalar
from fastrnn.cells.spec import CellSpec


def reference_step(xg_t, h, c, w_hh, b_hn=None, w_hr=None, w_cell=None):
    """One step on torch tensors: xg_t (b, 3H) (without the n gate's b_hh), h (b, H),
    b_hn (H,) or None -> (h' (b, H), None)."""
    x_r, x_z, x_n = xg_t.chunk(3, dim=1)
    h_r, h_z, h_n = (h @ w_hh.t()).chunk(3, dim=1)
    if b_hn is not None:
        h_n = h_n + b_hn
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h, None


# ------------------------------------------------------------------------------ numba step math
# One batch row of one step for the numba backend's one forward and one backward time loop
# (fastrnn/kernels/numba_cpu/loops.py documents every argument): Numba-compilable plain Python,
# activations from fastrnn.cells.scalar, rows indexed in the 2-D arrays, each loop writing one
# array (so that they vectorize).

def numba_forward(a, r, xg, q, bias, b_hn, w_cell, h, c, b, out, o):
    """a[r, :3H] (a: (., 4H)) holds the row's h W_hh^T and leaves with r, z, hn = h W_hn^T + b_hn,
    n; xg (N, 3H) row q, bias (3H,), b_hn (H,); h (B, H) row b: h; h' into out[o] (out: (., H)).
    w_cell, c: unused."""
    hidden = h.shape[1]
    for j in range(2 * hidden):  # r, z
        a[r, j] = scalar.sigmoid(a[r, j] + (xg[q, j] + bias[j]))
    for u in range(hidden):
        a[r, 2 * hidden + u] += b_hn[u]
    for u in range(hidden):  # n, kept in out until the update
        j = 2 * hidden + u
        out[o, u] = scalar.tanh((xg[q, j] + bias[j]) + a[r, u] * a[r, j])
    for u in range(hidden):
        a[r, 3 * hidden + u] = out[o, u]
    for u in range(hidden):
        n = out[o, u]
        out[o, u] = n + a[r, hidden + u] * (h[b, u] - n)


def numba_backward(gates, y, c_all, q, h_prev, hr, c_prev, cr, dm, dh, dc, b, tc, tr, proj,
                   w_cell, d_xg, d_hn, dg):
    """gates (N, 4H) row q: r, z, hn, n; h_prev[hr] (., H): h; dm (B, H) row b: the gradient
    w.r.t. h'; d_xg (N, 3H) row q: the gates' pre-activation gradient; d_hn (N, H) row q: the
    gradient w.r.t. hn; dg (B, 3H) row b: the gradient w.r.t. the step's h W_hh^T (the backward
    matmul's operand); dh (B, H) row b: receives dm z, the gradient w.r.t. h outside the matmul.
    w_cell, y, c_all, c_prev, cr, dc, tc, tr, proj: unused."""
    hidden = dh.shape[1]
    one = scalar.one(dh)
    for u in range(hidden):  # d n
        z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
        d_xg[q, 2 * hidden + u] = dm[b, u] * (one - z) * (one - n * n)
    for u in range(hidden):  # d r
        r, z, n = gates[q, u], gates[q, hidden + u], gates[q, 3 * hidden + u]
        d_xg[q, u] = (dm[b, u] * (one - z) * (one - n * n) * gates[q, 2 * hidden + u]
                      * r * (one - r))
    for u in range(hidden):  # d z
        z = gates[q, hidden + u]
        d_xg[q, hidden + u] = (dm[b, u] * (h_prev[hr, u] - gates[q, 3 * hidden + u])
                               * z * (one - z))
    for j in range(2 * hidden):
        dg[b, j] = d_xg[q, j]
    for u in range(hidden):
        z, n = gates[q, hidden + u], gates[q, 3 * hidden + u]
        d_hn[q, u] = dm[b, u] * (one - z) * (one - n * n) * gates[q, u]
    for u in range(hidden):
        dg[b, 2 * hidden + u] = d_hn[q, u]
    for u in range(hidden):
        dh[b, u] = dm[b, u] * gates[q, hidden + u]


SPEC = CellSpec(name="gru", gates=3, states=("h",), torch_mode="GRU", code=3,
                step=reference_step, has_b_hn=True, saved=("gates",),
                extra_blocks=1, direct_h=True)


# ----------------------------------------------------------------------------------------------
# Triton step math (built on first use: importing this file does not import triton).
# ----------------------------------------------------------------------------------------------
def triton_step_math():
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`).
    Pre-activations p = (x_r + h W_hr^T, x_z + h W_hz^T, x_n, hn = h W_hn^T + b_hn); stash: r, z,
    n and hn. The gradient of hn (d_hn, not that of x_n) has its own (N, H) buffer. Tiles are
    float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import CellMath, cell_jit, load_f32, sigmoid, tanh

    @cell_jit
    def preacts(PRODUCT: tl.constexpr, h, w, x, b_hn):
        x_r, x_z, x_n = x
        return (PRODUCT(h, w[0], x_r), PRODUCT(h, w[1], x_z), x_n,
                PRODUCT(h, w[2], b_hn + tl.zeros_like(x_n)))

    @cell_jit
    def forward(p, h, c):
        r = sigmoid(p[0])
        z = sigmoid(p[1])
        n = tanh(p[2] + r * p[3])
        return (1.0 - z) * n + z * h, c, (r, z, n, p[3])

    @cell_jit
    def backward(dh, dc, stash, h_prev):
        r, z, n, hn = stash
        d_n = dh * (1.0 - z) * (1.0 - n * n)
        d_r = d_n * hn * r * (1.0 - r)
        d_z = dh * (h_prev - n) * z * (1.0 - z)
        return (d_r, d_z, d_n), (d_r, d_z, d_n * r), dh * z, dc

    @cell_jit
    def load_b_hn(ptrs, mask):
        return load_f32(ptrs, mask)[None, :]

    @cell_jit
    def store_d_hn(ptrs, d_hidden, mask):
        tl.store(ptrs, d_hidden[2], mask=mask)

    return CellMath(SPEC, preacts=preacts, forward=forward, backward=backward,
                    load_b_hn=load_b_hn, store_d_hn=store_d_hn)
