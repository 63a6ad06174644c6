"""Where Hira's Triton kernels load: on CUDA, with triton installed. Elsewhere every caller runs its tensor program
(the kernels' reference, which the tests compare them with)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def cuda_kernels(module: str) -> ModuleType | None:
    """The kernel module ``module`` (e.g. ``"hira.selection.search_kernel"``) where CUDA and triton are present,
    else None."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
