"""Swap torch.nn recurrent modules inside a model for their fastrnn twins, and back."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from fastrnn import backends, modules

TWINS = {nn.RNN: modules.RNN, nn.LSTM: modules.LSTM, nn.GRU: modules.GRU,
         nn.RNNCell: modules.RNNCell, nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell}


def _parametrized_twin(cls, target):
    """The class a parametrized module of class ``cls`` gets when its base becomes ``target``.

    ``torch.nn.utils.parametrize`` gives a parametrized module a class of its own, made on the fly
    (``Parametrized<Base>``, one per module, the base its only parent) that holds one property
    per parametrized tensor and the serialization guards. The twin is the same class built on
    ``target``: properties and guards kept, and ``remove_parametrizations`` still restores the
    base (now ``target``) when the last parametrization goes."""
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{target.__name__}", (target,), body)


def _target(module, mapping):
    """The class ``module`` converts to, or None. A parametrized module's class is made on the
    fly over its original class (see :func:`_parametrized_twin`): that one is looked up."""
    target = mapping.get(parametrize.type_before_parametrizations(module))
    if target is None or not parametrize.is_parametrized(module):
        return target
    return _parametrized_twin(type(module), target)


def convert(model: nn.Module, *, backend: str = "auto", inverse: bool = False) -> nn.Module:
    """Turn every ``nn.RNN/LSTM/GRU/RNNCell/LSTMCell/GRUCell`` in ``model`` (``model`` itself
    included) into its fastrnn twin, in place, and return ``model``.

    The module objects stay the same: only their class changes (the twins share torch's
    attributes). So parameters (and the optimizer state that refers to them), buffers, device,
    dtype, training mode and registered hooks are kept. Modules with parametrizations
    (``torch.nn.utils.parametrize``, ``torch.nn.utils.parametrizations.weight_norm`` /
    ``spectral_norm`` / ``orthogonal``) are converted too, their parametrizations kept; the old
    hook-based ``torch.nn.utils.weight_norm`` keeps working as well. ``backend`` is set on each
    converted module. ``inverse=True`` turns fastrnn modules back into their torch.nn classes.
    Modules of user subclasses of the torch.nn classes are left alone.
    """
    backends.check_backend_name(backend)
    mapping = {v: k for k, v in TWINS.items()} if inverse else TWINS
    for module in model.modules():
        target = _target(module, mapping)
        if target is None:
            continue
        module.__class__ = target
        if inverse:
            module.__dict__.pop("backend", None)
        else:
            module.backend = backend
    return model
