"""Where the TMA-descriptor forms of the three GEMMs differ from their pointer
forms on a GPU: one small case per kernel, kernel size and dtype, each run
both ways on the same inputs, with the mismatching output positions
classified (image border or interior, which tap or channel block).

    python benchmarks/tma_diagnose.py [--kernels fwd,dgrad,wgrad] [--out FILE.jsonl]

Why: on an H200 (session 11) most of tests/test_triton.py::
test_gemms_through_tma_descriptors failed and the run's time limit cut the
report of which check; this prints, per case, how far the TMA form is from
the pointer form and where. A CUDA error (an illegal address, say) leaves
the process's context unusable: it is printed and the script stops, so
run one kernel per process (benchmarks/gpu_tma_check.sh does). Never
asserts anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch

from fused_preact import triton_launch as L

SWITCH = {"fwd": "FWD_TMA", "dgrad": "DGRAD_TMA", "wgrad": "WGRAD_TMA"}


def _where(diff: torch.Tensor, tol: float) -> dict:
    """Mismatching positions of a [N, C, H, W] difference: how many, how
    many on the image border, the first few (n, c, h, w)."""
    bad = (diff.abs() > tol).nonzero().tolist()
    h, w = diff.shape[2], diff.shape[3]
    border = sum(1 for _, _, i, j in bad if i in (0, h - 1) or j in (0, w - 1))
    return {"mismatches": len(bad), "of": diff.numel(), "on_border": border, "first": bad[:8]}


def run_case(kernel: str, ksize: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, c, h, w, k = 2, 16, 5, 7, 24
    pad = ksize // 2
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 1).to(device).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, ksize, ksize, generator=gen) / (c * ksize * ksize) ** 0.5).to(device).to(dtype)
    gamma, beta = torch.rand(c, generator=gen).to(device) + 0.5, torch.randn(c, generator=gen).to(device) + 1
    grad_y = torch.randn(n, k, h, w, generator=gen).to(device).to(dtype).contiguous(memory_format=torch.channels_last)
    bn = L.bn_prepare(x, None, gamma.to(dtype), beta.to(dtype), None, None, True, 0.1, 1e-5)
    results, taken = {}, []
    kernel_name = {"fwd": "conv_fwd_kernel", "dgrad": "conv_dgrad_kernel", "wgrad": "conv_wgrad_kernel"}[kernel]
    launch = L._launch

    def spy(name, grid, args, kwargs, config_key=None):  # which form each launch took
        if name == kernel_name:
            taken.append(bool(kwargs.get("TMA")) or bool(config_key and config_key[-4]))  # (keys end: tma, only, act, ...)
        return launch(name, grid, args, kwargs, config_key)

    L._launch = spy
    L.SMALL_WEIGHT_READS = 0  # the 3x3 weight packed, as the TMA forms read it (the tests do the same)
    for tma in (False, True):
        setattr(L, SWITCH[kernel], tma)
        if kernel == "fwd":
            results[tma] = L.conv_forward(x, weight, bn, 1, pad, None, False)[0]
        elif kernel == "dgrad":
            results[tma] = L.conv_backward(grad_y, x, weight, bn, True, 1, pad, True, False)[0]
        else:
            results[tma] = L.conv_backward(grad_y, x, weight, bn, True, 1, pad, False, True)[1]
        sync()
    setattr(L, SWITCH[kernel], False)
    L._launch = launch
    ptr, tma = results[False].float(), results[True].float()
    scale = ptr.abs().max().item() or 1.0
    tol = scale * (1e-2 if dtype == torch.bfloat16 else 1e-4)
    diff = tma - ptr
    out = {"kernel": kernel, "ksize": ksize, "dtype": str(dtype).replace("torch.", ""),
           "forms_taken": taken, "max_abs_diff": diff.abs().max().item(), "max_abs": scale,
           "tma_finite": bool(torch.isfinite(tma).all()), "tma_all_zero": bool((tma == 0).all())}
    if kernel == "wgrad":  # [K, C, KH, KW]: which taps, which channel blocks
        bad = (diff.abs() > tol)
        out["bad_taps"] = bad.any(0).any(0).nonzero().tolist()
        out["bad_k"] = bad.any(1).any(1).any(1).nonzero().flatten().tolist()[:32]
        out["mismatches"] = int(bad.sum())
    else:
        out.update(_where(diff, tol))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="fwd,dgrad,wgrad")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not L.INTERPRET:
        print("needs a GPU (compute capability 9+), or TRITON_INTERPRET=1 for a smoke run")
        return 0
    import triton
    print("torch", torch.__version__, "triton", triton.__version__,
          torch.cuda.get_device_name() if device == "cuda" else "interpreter", flush=True)
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    for kernel in args.kernels.split(","):
        for ksize in (1, 3):
            for dtype in dtypes:
                try:
                    row = run_case(kernel, ksize, dtype, device)
                except Exception as error:  # report it, and whether the context survived
                    row = {"kernel": kernel, "ksize": ksize, "dtype": str(dtype), "error": repr(error)[:2000],
                           "trace": traceback.format_exc()[-3000:]}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if "error" in row and "CUDA" in row["error"]:
                    print("CUDA error: the context is unusable, stopping this process", flush=True)
                    return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
