"""Shared test helpers: the tolerance table (one place, per dtype) and the
reference unit."""

import pytest
import torch

# (rtol, atol) for comparing a fused result with the reference computed in the
# same dtype. float64 is tight enough to catch any formula error; float32
# allows for a different summation order in reductions.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
}


def assert_close(actual, expected, dtype=None, msg=""):
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
