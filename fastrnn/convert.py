"""Swap torch.nn recurrent modules inside a model for their fastrnn twins, and back."""
from __future__ import annotations

from torch import nn

from fastrnn import backends, modules

TWINS = {nn.RNN: modules.RNN, nn.LSTM: modules.LSTM, nn.GRU: modules.GRU,
         nn.RNNCell: modules.RNNCell, nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell}


def convert(model: nn.Module, *, backend: str = "auto", inverse: bool = False) -> nn.Module:
    """Turn every ``nn.RNN/LSTM/GRU/RNNCell/LSTMCell/GRUCell`` in ``model`` (``model`` itself
    included) into its fastrnn twin, in place, and return ``model``.

    The module objects stay the same: only their class changes (the twins share torch's
    attributes). So parameters (and the optimizer state that refers to them), buffers, device,
    dtype, training mode and registered hooks are kept. ``backend`` is set on each converted
    module. ``inverse=True`` turns fastrnn modules back into their torch.nn classes.
    Modules of user subclasses of the torch.nn classes are left alone.
    """
    backends.check_backend_name(backend)
    mapping = {v: k for k, v in TWINS.items()} if inverse else TWINS
    for module in model.modules():
        target = mapping.get(type(module))
        if target is None:
            continue
        module.__class__ = target
        if inverse:
            module.__dict__.pop("backend", None)
        else:
            module.backend = backend
    return model
