"""fastrnn's compute kernels, installed as ``fastrnn.kernels``.

Each backend module implements the kernel contract of :mod:`fastrnn.reference`:
``recurrence_forward(cell, xg, h0, c0, w_hh, b_hn, w_hr, batch_sizes, reverse)`` and
``recurrence_backward(...)``, and may define ``why_not(cell, device, dtype, proj_size)``.
"""
