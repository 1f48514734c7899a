"""The Triton step math the two Elman cells share (``rnn_tanh.py``, ``rnn_relu.py``): ``h' =
act(p)``, p the one gate's pre-activation; the cells differ only by ``act``.

Their numba step math stays in the cell files: the numba loops' disk cache is keyed by the cell
files' text (``fastrnn/kernels/numba_cpu/loops.py``), which a row step built here would escape.
"""
from __future__ import annotations


def triton_step_math(spec, act, act_grad):
    """The ``CELL`` of the Triton kernels (:mod:`fastrnn.kernels.triton_gpu.step_math`) for the
    Elman cell ``spec``: ``act(x)`` the activation and ``act_grad(dh, h_new)`` the gradient of its
    input from that of its output, both ``@cell_jit`` helpers of the cell. Stash: h'. Tiles are
    float32."""
    import triton.language as tl

    from fastrnn.kernels.triton_gpu.step_math import CellMath, cell_jit

    @cell_jit
    def forward(p, h, c):
        h_new = act(p[0])
        return h_new, c, (h_new,)

    @cell_jit
    def backward(dh, dc, stash, h_prev):
        d = act_grad(dh, stash[0])
        return (d,), (d,), tl.zeros_like(dh), dc

    return CellMath(spec, forward=forward, backward=backward)
