"""One training step of chosen pre-activation units, for Nsight Compute.

    python benchmarks/profile_units.py --units resnetv2_50:s1.1x1a [--provider triton] [--batch 64]
    python benchmarks/profile_units.py --summarize ncu.csv [--out summary.md]
    python benchmarks/profile_units.py --stalls ncu_raw.csv [--out stalls.md]

The first form builds each unit as ``fused_preact.bench`` does (bf16
autocast, channels_last, the unit's batch), runs warm-up steps (Triton
compile and autotune, cuDNN heuristics) and then one step between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that
``ncu --profile-from-start off`` profiles that step's kernels only
(``benchmarks/gpu_profile.sh`` runs it). The second turns the CSV of
``ncu --csv --page details`` into a table: per kernel its duration, compute
and memory throughput (% of peak), DRAM throughput, achieved and
theoretical occupancy, registers per thread and shared memory per block,
whichever of these the sections collected. The third reads the CSV of
``ncu --csv --page raw --metrics regex:smsp__average_warps_issue_stalled_...``
(what each warp waits on, per issued instruction) and lists each kernel's
largest stall reasons. Never asserts anything.

Why: kernel_times.py says which kernels are far from their floors (the
1x1a units' dgrad at 3-4x its memory floor, every wgrad at 7-23x:
benchmarks/RESULTS.md, session 5), not why; the hardware counters do.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

import torch

from fused_preact import bench

# (column label, ncu metric name) in the summary, in this order.
SUMMARY_METRICS = [
    ("us", "Duration"),
    ("SM %", "Compute (SM) Throughput"),
    ("memory %", "Memory Throughput"),
    ("DRAM %", "DRAM Throughput"),
    ("occupancy % (achieved / theoretical)", ("Achieved Occupancy", "Theoretical Occupancy")),
    ("issue slots busy %", "Issue Slots Busy"),
    ("no eligible warp %", "No Eligible"),
    ("registers", "Registers Per Thread"),
    ("shared KB / block", "Dynamic Shared Memory Per Block"),
    ("grid", "Grid Size"),
]


def profile(specs: list[str], provider: str, batch: int, dtype: torch.dtype, warmup: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in specs:
        shape = bench.unit_named(*spec.split(":"))
        n = batch or (128 if shape.model == "resnet164" else 64)
        _, step = bench._unit_closures(shape, provider, n, device, dtype, rotate=2)
        for i in range(warmup):
            step(i)
        bench._sync(device)
        if device == "cuda":
            torch.cuda.profiler.start()
        step(warmup)
        bench._sync(device)
        if device == "cuda":
            torch.cuda.profiler.stop()
        print(f"profiled one {provider} training step of {spec} (batch {n})", flush=True)


def summarize(path: str) -> list[str]:
    """A markdown table of ncu's details CSV (one row per profiled kernel)."""
    kernels: dict = collections.OrderedDict()
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu prints its own lines before the CSV
    for row in csv.DictReader(lines):
        key = (row.get("ID"), row.get("Kernel Name", "?"))
        metrics = kernels.setdefault(key, {"Grid Size": row.get("Grid Size", "")})
        name, unit = row.get("Metric Name", ""), row.get("Metric Unit", "")
        if metrics.get(name, ("", ""))[1] == "%" and unit != "%":
            continue  # "Memory Throughput" is a % in SpeedOfLight and bytes/s in MemoryWorkloadAnalysis
        metrics[name] = (row.get("Metric Value", ""), unit)

    def value(metrics, name):
        if isinstance(name, tuple):
            return " / ".join(value(metrics, n) for n in name)
        v = metrics.get(name, "")
        if isinstance(v, tuple):
            number, unit = v
            try:
                x = float(number.replace(",", ""))
            except ValueError:
                return number
            if name == "Duration":
                x *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1.0)
            if name == "Dynamic Shared Memory Per Block":
                x /= {"byte": 1024, "Kbyte": 1, "kbyte": 1}.get(unit, 1024)
            return f"{x:.1f}" if x != int(x) else f"{int(x)}"
        return v or "-"

    out = ["| # | kernel | " + " | ".join(label for label, _ in SUMMARY_METRICS) + " |",
           "|---|---|" + "---:|" * len(SUMMARY_METRICS)]
    for (kid, name), metrics in kernels.items():
        short = name.split("(")[0][:60]
        out.append(f"| {kid} | {short} | " + " | ".join(value(metrics, m) for _, m in SUMMARY_METRICS) + " |")
    return out


STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def stalls(path: str, top: int = 5) -> list[str]:
    """A markdown table of ncu's raw CSV with the stall-reason metrics: per
    kernel, the ``top`` reasons by warps stalled per issued instruction
    (Nsight Compute's Warp State Statistics; e.g. long_scoreboard: waiting
    for global/local memory, wait: a fixed-latency dependency, barrier,
    math_pipe_throttle)."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    out = ["| # | kernel | total | largest stall reasons (warps per issued instruction) |", "|---|---|---:|---|"]
    for row in csv.DictReader(lines):
        name = row.get("Kernel Name", "")
        if not name or not row.get("ID", "").strip().isdigit():
            continue  # the units row under the header
        reasons = {}
        for key, value in row.items():
            if key and key.startswith(STALL_PREFIX) and key.endswith(STALL_SUFFIX):
                try:
                    reasons[key[len(STALL_PREFIX):-len(STALL_SUFFIX)]] = float(value.replace(",", ""))
                except ValueError:
                    continue
        ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
        # (not_issued-style aggregates are not among the per-reason metrics)
        out.append(f"| {row['ID']} | {name.split('(')[0][:60]} | {sum(reasons.values()):.2f} | "
                   + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:top]) + " |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", default="resnetv2_50:s1.1x1a", help="model:unit,... (names as in bench)")
    parser.add_argument("--provider", default="triton")
    parser.add_argument("--batch", type=int, default=0, help="default: 128 (resnet164), 64 (resnetv2_50)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--summarize", metavar="CSV", help="summarise an ncu --csv --page details file instead")
    parser.add_argument("--stalls", metavar="CSV", help="list the stall reasons of an ncu --csv --page raw file")
    parser.add_argument("--out", help="with --summarize/--stalls: also write the table here")
    args = parser.parse_args(argv)
    if args.summarize or args.stalls:
        table = summarize(args.summarize) if args.summarize else stalls(args.stalls)
        print("\n".join(table))
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(table) + "\n")
        return 0
    profile(args.units.split(","), args.provider, args.batch, getattr(torch, args.dtype), args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
