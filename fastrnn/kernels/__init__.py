"""fastrnn's compute: the reference recurrence (the oracle, :mod:`.reference`) and the compiled
backends, each a package that implements the kernel contract of :mod:`.reference`
(``make_plan``, ``recurrence_forward``, ``recurrence_backward``) and declares what it can run as
:class:`Capabilities` data (``CAPABILITIES``), read by :mod:`fastrnn.backends` without compiling
anything:

* :mod:`.numba_cpu`: compiled CPU time loops (Numba), float32/float64;
* :mod:`.triton_gpu`: fused GPU kernels (Triton), float32/float16/bfloat16.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from fastrnn import cells


@dataclass(frozen=True)
class Capabilities:
    """What kernel backend ``name`` runs: ``devices`` (device types), ``dtypes``, ``cells`` (names)
    and whether it implements LSTM's ``proj_size`` (``projection``). ``bias_in_projection``: the
    device types on which the layers add the recurrence bias in the input projection's GEMM
    (``torch.addmm``: a GEMM epilogue there) and pass the kernels no ``bias``."""

    name: str
    devices: tuple
    dtypes: tuple
    cells: tuple
    projection: bool
    device_note: str = ""  # said after the device list when a device is refused
    bias_in_projection: tuple = ()

    def why_not(self, cell, device, dtype, proj_size=0):
        """Why this backend cannot run ``cell`` on ``device``/``dtype`` (``proj_size``), or None."""
        backend = self.name
        if cell not in self.cells:
            return f"{backend} does not implement the {cell!r} cell (it runs {', '.join(self.cells)})"
        device = torch.device(device)
        if device.type not in self.devices:
            return (f"{backend} runs on {' and '.join(d.upper() for d in self.devices)} tensors"
                    f"{self.device_note}, got a {device.type} tensor")
        if dtype not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            return f"{backend} supports {', '.join(names[:-1])} and {names[-1]}, got {dtype}"
        if proj_size and not cells.spec(cell).projection:
            return f"proj_size is supported for lstm only, got {cell}"
        if proj_size and not self.projection:
            return f"the {backend} backend does not implement LSTM proj_size (w_hr)"
        return None


#: The functions of the kernel contract (:mod:`fastrnn.kernels.reference`).
CONTRACT = ("make_plan", "recurrence_forward", "recurrence_backward")


def contract_on_first_use(package, load=None):
    """A module ``__getattr__`` for backend package ``package`` (its ``__name__``) that hands out
    the contract's functions from the launcher module ``load()`` returns (default: imports
    ``<package>.launch``), on first use: importing a backend package stays cheap, Numba or Triton
    load only when a kernel first runs (or when :func:`fastrnn.backends.choose` checks that the
    backend loads, through the package's ``load``)."""
    if load is None:
        def load():
            return importlib.import_module(package + ".launch")

    def module_getattr(name):
        if name not in CONTRACT:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(load(), name)
    return module_getattr
