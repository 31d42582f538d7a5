"""Device time of each pre-activation unit's training step, kernel by kernel,
from the PyTorch profiler (CUPTI) rather than from CUDA-graph replay.

    python benchmarks/kernel_times.py --out OUTDIR [--providers eager_cl,native,triton]
           [--units resnet164,resnetv2_50] [--batch 128/64] [--steps 10] [--dtype bfloat16]
    python benchmarks/kernel_times.py --out OUTDIR --from-json kernel_times.json   # report only

Why: on the H200 every provider was host-bound (benchmarks/RESULTS.md), so
wall-clock time says little about the kernels, and the CUDA-graph timing of
the benchmark failed at capture. The profiler records every kernel's start
and end on the GPU whatever the host does; the sum of a step's kernel
durations is the time the GPU was busy with it ("device ms"). Compared side
by side, it is the kernels' speed-up, next to the unit's memory/FLOP floor
(measured copy bandwidth and bf16 matmul rate, as in ``fused_preact.bench``),
and each Triton GEMM kernel's time next to its own floor.
Per unit and provider it writes: device ms per step, kernels per step,
host-timed ms per step, and the heaviest kernels; and what the Triton
autotuner measured and chose per kernel and shape (among them the flat or
unrolled reduction loop of the 3x3 kernels). Never asserts anything.

On a CPU it runs as a smoke test (``--device cpu``: tiny batch, CPU ops'
self time instead of kernels; Triton needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fused_preact import bench


def _kernel_events(prof, device: str):
    """(name, microseconds) of every device kernel (CUDA) or every top-level
    CPU op (CPU smoke test) the profiler saw."""
    out = []
    for e in prof.events():
        if device == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
        elif e.cpu_parent is None and e.name.startswith(("aten::", "fused_preact::")):
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def profile_unit(shape, provider: str, batch: int, device: str, dtype: torch.dtype, steps: int) -> dict:
    _, step = bench._unit_closures(shape, provider, batch, device, dtype, rotate=2)
    for i in range(3):  # warm-up: Triton compile and autotune, cuDNN heuristics
        step(i)
    bench._sync(device)
    host = bench.time_ms(step, device, warmup=0, repeats=steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(i)
        bench._sync(device)
    kernels = _kernel_events(prof, device)
    per_name = collections.defaultdict(float)
    for name, us in kernels:
        per_name[name] += us / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:6]
    return {"device_ms": sum(us for _, us in kernels) / steps / 1e3, "kernels_per_step": len(kernels) / steps,
            "host_ms": statistics.median(host), "top": [(name[:90], us / 1e3) for name, us in top]}


def _autotuned() -> list:
    """The Triton autotuner's measurements and choices in this process (the
    flat vs unrolled reduction loop among them), if Triton was used."""
    launch = sys.modules.get("fused_preact.triton_launch")
    return list(launch.AUTOTUNED) if launch is not None else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", default="eager_cl,native,triton")
    parser.add_argument("--units", default="resnet164,resnetv2_50")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (resnet164), 64 (resnetv2_50); CPU 2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-units", type=int, default=None, help="only the first N units of each set (smoke)")
    parser.add_argument("--only", default=None, help="only units whose name contains one of these (comma-separated)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="measure nothing: write OUT/kernel_times.md from a saved kernel_times.json")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        write_report(data, [p for p in data["rows"][0] if p not in ("unit", "batch", "floor_ms")], args.out)
        print(f"wrote {os.path.join(args.out, 'kernel_times.md')}")
        return 0
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    if device == "cpu" and "triton" in args.providers and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("Triton on CPU tensors needs TRITON_INTERPRET=1")
    ceilings = bench.device_ceilings(device)
    rows = []
    for set_name in args.units.split(","):
        units = [u for u in bench.UNIT_SETS[set_name]() if not args.only or any(s in u.name for s in args.only.split(","))]
        units = units[: args.max_units]
        batch = args.batch or (2 if device == "cpu" else (128 if set_name == "resnet164" else 64))
        for shape in units:
            row = {"unit": f"{shape.model} {shape.name} {shape.cin}->{shape.cout} @{shape.size}", "batch": batch,
                   "floor_ms": sum(shape.floor_ms(batch, torch.finfo(dtype).bits // 8, ceilings)) if ceilings
                   else None}
            for provider in args.providers.split(","):
                t0 = time.perf_counter()
                try:
                    row[provider] = profile_unit(shape, provider, batch, device, dtype, args.steps)
                except Exception as exc:  # noqa: BLE001  (reported in the table, the run goes on)
                    row[provider] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{row['unit']:45s} {provider:9s} {time.perf_counter() - t0:6.1f} s", flush=True)
            rows.append(row)
    import triton

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda,
           "dtype": str(dtype), "steps": args.steps, "ceilings": ceilings, "command": " ".join(sys.argv)}
    data = {"env": env, "rows": rows, "autotuned": _autotuned()}
    with open(os.path.join(args.out, "kernel_times.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    lines = write_report(data, args.providers.split(","), args.out)
    print("\n".join(lines[:len(rows) + 6]))
    return 0


# The Triton unit's three GEMM kernels, for their floors.
GEMMS = ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")


def gemm_floors(shape, batch: int, ceilings: dict, elem: int = 2) -> dict:
    """Floor (ms) of each Triton GEMM kernel of a unit's training step:
    max(FLOPs / matmul rate, fewest bytes / copy bandwidth), with bf16
    activations (``elem`` bytes) and the fp32 weight autocast keeps. Forward:
    reads x, the weight (and the residual), writes y; dgrad: reads gy, the
    weight and x (ReLU mask and x-hat), writes gz; wgrad: reads x and gy,
    writes the weight gradient. Each does the forward's FLOPs."""
    o, flops = shape.out_size(), shape.flops(batch)
    x, y = batch * shape.size ** 2 * shape.cin * elem, batch * o * o * shape.cout * elem
    w = shape.cout * shape.cin * shape.kernel ** 2 * 4
    moved = {"conv_fwd_kernel": x + w + y + (y if shape.residual else 0),
             "conv_dgrad_kernel": y + w + 2 * x, "conv_wgrad_kernel": x + y + w}
    return {k: max(flops / ceilings["bf16_flops_per_s"], b / ceilings["copy_bytes_per_s"]) * 1e3
            for k, b in moved.items()}


def write_report(data: dict, providers: list, out_dir: str) -> list:
    """kernel_times.md from the measured data (also from a saved
    kernel_times.json: --from-json)."""
    env, rows, tuned = data["env"], data["rows"], data["autotuned"]
    base = providers[0]
    lines = [f"# Device time per unit training step ({env['device']}, torch {env['torch']}, "
             f"triton {env.get('triton', '?')}, {env['dtype']})", "",
             f"Command: `{env['command']}`. device ms = sum of the step's kernel durations (profiler), "
             f"host ms = wall time per step; ratios are {base} device ms / provider device ms.", "",
             "| unit | batch | floor ms | " + " | ".join(f"{p} device ms (kernels) | {p} host ms" for p in providers)
             + " | " + " | ".join(f"{base}/{p}" for p in providers[1:]) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(providers) + "---:|" * (len(providers) - 1)]
    for row in rows:
        cells = [row["unit"], str(row["batch"]), "-" if row["floor_ms"] is None else f"{row['floor_ms']:.3f}"]
        for p in providers:
            r = row[p]
            cells += (["error", "error"] if "error" in r else
                      [f"{r['device_ms']:.3f} ({r['kernels_per_step']:.0f})", f"{r['host_ms']:.3f}"])
        for p in providers[1:]:
            ok = "error" not in row[base] and "error" not in row[p] and row[p]["device_ms"] > 0
            cells.append(f"{row[base]['device_ms'] / row[p]['device_ms']:.2f}x" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if "triton" in providers and env.get("ceilings"):
        lines += ["", "## Triton GEMM kernels beside their floors (us per step; floor = max(FLOPs / matmul "
                  "rate, fewest bytes / copy bandwidth), x = time / floor)", "",
                  "| unit | forward | dgrad | wgrad |", "|---|---:|---:|---:|"]
        for row in rows:
            top = dict(row["triton"].get("top", []))
            # The row's label: "resnet164 s1.3x3 16->16 @32".
            floors = gemm_floors(bench.unit_named(*row["unit"].split()[:2]), row["batch"], env["ceilings"])
            cells = [f"{top[k] * 1e3:.1f} ({floors[k] * 1e3:.1f}, {top[k] / floors[k]:.1f}x)" if k in top else "-"
                     for k in GEMMS]
            lines.append(f"| {row['unit']} | " + " | ".join(cells) + " |")
    lines += ["", "## Heaviest kernels per step (ms)", ""]
    for row in rows:
        for p in providers:
            if "top" in row[p]:
                lines.append(f"- {row['unit']} / {p}: " + "; ".join(f"{n} {ms:.3f}" for n, ms in row[p]["top"]))
    if tuned:
        lines += ["", "## Autotuner choices (Triton)", ""]
        for t in tuned:
            times = "; ".join(f"{cfg} -> {ms if isinstance(ms, (int, float)) else ms}"
                              for cfg, ms in t["timings_ms"].items())
            lines.append(f"- {t['kernel']} {t['shape']}: **{t['best']}** (measured: {times})")
    errors = [f"- {row['unit']} / {p}: {row[p]['error']}" for row in rows for p in providers if "error" in row[p]]
    if errors:
        lines += ["", "## Errors", ""] + errors
    with open(os.path.join(out_dir, "kernel_times.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    sys.exit(main())
