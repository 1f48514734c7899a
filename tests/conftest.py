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
