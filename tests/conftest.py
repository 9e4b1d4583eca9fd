"""Shared test set-up: Triton's CPU interpreter, and the torch.func per-sample oracle."""

import os

# Must precede any import of triton kernels: triton.jit reads it when a kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
