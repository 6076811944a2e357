"""Fixtures that run a test on every implementation of the CE block this machine has: the
pure-PyTorch reference and the native kernels of each instruction set the CPU supports."""

from __future__ import annotations

import pytest
import torch

from cenet import kernels

NATIVE_ISAS = kernels.supported_isas()
PATHS = ("reference", *NATIVE_ISAS)
DEVICES = ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))


@pytest.fixture(params=PATHS)
def ce_path(request):
    """The CE implementation in force during the test: "reference" or a native ISA."""
    isa = None if request.param == "reference" else request.param
    with kernels.use_isa(isa):
        yield request.param


@pytest.fixture(params=NATIVE_ISAS)
def native_isa(request):
    """Each native instruction set this CPU runs, active during the test."""
    with kernels.use_isa(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device this machine has (CUDA only where present)."""
    return torch.device(request.param)
