from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Triton chooses interpreted or compiled language functions (tl.zeros, ...) when `triton` is first imported, and
# anything may import it first (transformers does). Without a GPU its kernels can only run interpreted, so turn
# the interpreter on for the whole session before any import can happen; otherwise the Triton tests would pass
# or fail depending on test order. `auto` never picks Triton on CPU, so nothing else changes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fp32_exact():
    """SparseGPT's reference numerics are fp32 without TF32; keep every test in that regime."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
