"""Shared test helpers: the tolerance table (one place, per dtype) and the
reference unit."""

import os
import shutil

# The Triton kernels run on CPU tensors only under the interpreter, which must
# be chosen before Triton is imported. With a GPU they run compiled on CUDA.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# (rtol, atol) for comparing a fused result with the reference computed in the
# same dtype. float64 is tight enough to catch any formula error; float32
# allows for a different summation order in reductions.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
}


def randomize_bn(model, bias=0.5):
    """Non-trivial BatchNorm affine parameters (gamma in [0.5, 1.5], beta in
    [-bias, bias]) so that every gradient path is exercised."""
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-bias, bias)
    return model


def forward_backward(models, x, seed=None):
    """For each model: clear its gradients, forward x, backward mean(out^2);
    returns the outputs. ``seed`` re-seeds before each forward (DropPath
    then draws the same masks in every model)."""
    outs = []
    for model in models:
        if seed is not None:
            torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
        outs.append(out)
    return outs


def triton_device():
    """Where the Triton kernels run here: "cuda" with a GPU, "cpu" under the
    interpreter; skips the test otherwise."""
    pytest.importorskip("triton")
    from fused_preact import triton_launch

    if not torch.cuda.is_available() and not triton_launch.INTERPRET:
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(actual, expected, dtype=None, msg=""):
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
