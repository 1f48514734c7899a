"""Test-session set-up.

Without a CUDA device, Triton kernels are tested under its CPU interpreter, which must be
switched on before ``triton`` is first imported: that is done here, at collection time, and the
interpreter's bf16 dot is corrected (``_triton_interpreter.py``).
"""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    import _triton_interpreter

    _triton_interpreter.install()
if os.environ.get("FASTRNN_EXPECT_TRITON"):  # test_triton36.py runs a subset under Triton 3.6
    import triton

    if triton.__version__ != os.environ["FASTRNN_EXPECT_TRITON"]:
        raise RuntimeError(f"Triton {triton.__version__} imported, "
                           f"{os.environ['FASTRNN_EXPECT_TRITON']} expected")


if torch.cuda.is_available():
    import functools

    import pytest

    def _no_host_sync(fn):
        """``fn`` run under ``torch.cuda.set_sync_debug_mode("error")``: any host sync it makes
        (a device-to-host copy, a pageable host-to-device copy, an item()) raises."""
        @functools.wraps(fn)
        def call(*args, **kwargs):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return call

    @pytest.fixture(autouse=True)
    def triton_calls_never_sync(monkeypatch):
        """With CUDA, every call of the triton backend's contract in every test (plan, forward,
        backward) runs in sync debug mode "error": the whole CUDA suite proves that the
        launchers never wait for the device (the tests' own checks may)."""
        if importlib.util.find_spec("triton") is None:
            yield
            return
        from fastrnn.kernels.triton_gpu import launch
        for name in ("make_plan", "recurrence_forward", "recurrence_backward"):
            monkeypatch.setattr(launch, name, _no_host_sync(getattr(launch, name)))
        yield
