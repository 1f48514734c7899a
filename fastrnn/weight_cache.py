"""Whether weights changed since something was derived from them (the lean paths' prepared stack,
:mod:`fastrnn.inference`; numba's packed input weights,
:mod:`fastrnn.kernels.numba_cpu.projection`).

A cache entry holds the weight tensors themselves (so that no other tensor takes their memory;
the caller checks identity) and their :class:`Fingerprint`: the version counters and data
pointers, which in-place updates (optimizers, ``load_state_dict``, ``with torch.no_grad():
w.mul_(2)``) and ``.data =`` move, and a copy of the contents, since a write through ``.data``
(``p.data.add_(p.grad, alpha=-lr)`` in a hand-written SGD step, ``target.data.copy_(...)`` in a
soft target-network update) or through a numpy view moves neither: only the bytes tell. Checking
costs one memcmp per weight, a pass over twice the weights' bytes (2-core AMD EPYC Zen 4: LSTM
H=64 3.5 µs a call, H=256 44 µs, H=512 250 µs), and the copy as much memory as the weights; it
is taken only of weights seen unchanged from one call to the next (see :func:`fingerprint`).

:data:`CHECK_CONTENTS` = False drops the contents check (and the copies): for programs that never
write a weight through ``.data`` or a numpy view, where a call's cost counts (streamed LSTM H=256
inference: 106 µs a call with the check, 55 without; H=64 28 and 20). Then such a write leaves stale results.
"""
from __future__ import annotations

import ctypes
import operator
import os
from typing import NamedTuple, Optional

import torch

_VERSION = operator.attrgetter("_version")


def _memcmp():
    """The C library's ``memcmp`` through ctypes, or None where there is none."""
    try:
        libc = ctypes.cdll.msvcrt if os.name == "nt" else ctypes.CDLL(None)
        memcmp = libc.memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p] * 2 + [ctypes.c_size_t]
    return memcmp


_MEMCMP = _memcmp()
#: Compare the weights' contents each call (see above); False: versions and pointers only.
CHECK_CONTENTS = True


class Fingerprint(NamedTuple):
    stamp: tuple  # (versions, data pointers)
    copies: Optional[list]  # contiguous copies of the contents; None: not taken
    spans: Optional[list]  # the copies' (data pointer, bytes)


def _stamp(weights):
    return list(map(_VERSION, weights)), list(map(torch.Tensor.data_ptr, weights))


def fingerprint(weights, previous=None) -> Optional[Fingerprint]:
    """The :class:`Fingerprint` of CPU tensors ``weights``, None for an inference tensor (no
    version counter: nothing derived from them is reused). The contents are copied only where
    ``previous``, the fingerprint this one replaces, has the same versions and pointers: weights
    an optimizer steps between calls are never copied (nor reused), and weights that stay are
    prepared a second time, then copied once."""
    try:
        stamp = _stamp(weights)
    except RuntimeError:  # "Inference tensors do not track version counter."
        return None
    if not CHECK_CONTENTS or previous is None or previous.stamp != stamp:
        return Fingerprint(stamp, None, None)
    copies = [w.detach().clone(memory_format=torch.contiguous_format) for w in weights]
    return Fingerprint(stamp, copies, [(c.data_ptr(), c.nbytes) for c in copies])


def matches(fingerprint, weights, skip=()):
    """Whether ``weights`` (the tensors ``fingerprint`` was taken of) still have its versions,
    data pointers and contents (False where it has no copies, unless :data:`CHECK_CONTENTS` is
    off), the contents of those whose index is in ``skip`` not compared (what the caller reads
    in place)."""
    if fingerprint is None or _stamp(weights) != fingerprint.stamp:
        return False
    if not CHECK_CONTENTS:
        return True
    if fingerprint.copies is None:
        return False
    memcmp = _MEMCMP
    if memcmp is None:
        return all(i in skip or torch.equal(w.detach().contiguous().view(torch.uint8),
                                            c.view(torch.uint8))
                   for i, (w, c) in enumerate(zip(weights, fingerprint.copies)))
    for i, (weight, (address, size)) in enumerate(zip(weights, fingerprint.spans)):
        if i in skip:
            continue
        if not weight.is_contiguous():
            weight = weight.detach().contiguous()
        if memcmp(weight.data_ptr(), address, size):
            return False
    return True
