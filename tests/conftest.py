"""Shared settings of the test suite: dynamo limits, hypothesis profiles, the device fixture."""

import os

import pytest
import torch

# Without CUDA, triton's kernels (where triton is installed) run in its interpreter: the kernel tests compare them
# with the tensor programs on the CPU too. Read when triton is first imported (torch._dynamo imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._dynamo  # noqa: E402
from hypothesis import settings  # noqa: E402

# Past the recompile limit flex_attention silently runs eager (DESIGN.md §3): fail instead, and allow the suite's
# shapes (each compiled shape is one cache entry of the shared compiled flex_attention).
torch._dynamo.config.fail_on_recompile_limit_hit = True
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 1024

settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session", params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Every core test runs on each device present; CUDA is skipped where there is none."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(request.param)
