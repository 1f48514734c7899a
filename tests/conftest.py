"""Test-session set-up.

Without a CUDA device, Triton kernels are tested under its CPU interpreter, which must be
switched on before ``triton`` is first imported: that is done here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
