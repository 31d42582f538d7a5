"""The runnable examples and the benchmark entry point, on tiny settings."""

import json
import pathlib

import pytest

import fused_preact


def test_train_example_runs_and_the_two_models_agree(tmp_path):
    pytest.importorskip("sklearn", reason="the example's data ships with scikit-learn")
    from fused_preact.examples import train

    # float64: the reference and fused runs are the same function, so the
    # per-step losses agree to rounding; --tolerance is relative per epoch.
    assert train.main(["--dtype", "float64", "--limit", "200", "--epochs", "1", "--depth", "8", "--size", "8",
                       "--batch", "32", "--tolerance", "1e-9", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "loss_curves.png").exists()


@pytest.mark.skipif(not fused_preact.backends()["native"]["available"], reason="fused_preact._C is not built")
def test_bench_writes_table_json_report_and_plots(tmp_path):
    from fused_preact import bench

    assert bench.main(["--suite", "units,cifar", "--units", "resnet164", "--providers", "eager,native",
                       "--repeats", "2", "--warmup", "1", "--batch", "2", "--no-progress", "--out",
                       str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["env"]["torch"] and results["args"]["providers"] == ["eager", "native"]
    assert len(results["units"]) == 11 and set(results["models"]["cifar"]) == {"eager", "native"}
    for unit in results["units"]:
        for provider in ("eager", "native"):
            r = unit["providers"][provider]
            assert r["train_step"]["median_ms"] > 0 and r["saved_bytes"] > 0
        # the fused unit saves at most ~half of what eager saves (weights included at batch 2)
        assert unit["providers"]["native"]["saved_bytes"] < unit["providers"]["eager"]["saved_bytes"]
    assert (tmp_path / "report.md").read_text().startswith("# fused_preact benchmark")
    assert (tmp_path / "units_time_vs_floor.png").exists() and (tmp_path / "cifar_throughput_memory.png").exists()


def test_stall_table_ranks_each_kernels_reasons(tmp_path, monkeypatch):
    """benchmarks/profile_units.py --stalls on a raw ncu CSV: ncu's own lines
    and the units row skipped, numbers with thousands separators, reasons
    ranked per kernel (largest first), the total beside them."""

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import profile_units

    metric = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name"] + [metric.format(r) for r in ("long_scoreboard", "wait", "barrier")]
    rows = [["", "", "ratio", "ratio", "ratio"], ["0", "conv_fwd_kernel", "1.50", "0.70", "2,100.25"],
            ["1", "bn_finalize_kernel(x)", "0.10", "0.20", "0.05"]]
    path = tmp_path / "raw.csv"
    path.write_text("==PROF== Connected to process 1\n"
                    + "\n".join(",".join(f'"{c}"' for c in row) for row in [header] + rows) + "\n")
    table = profile_units.stalls(str(path), top=2)
    assert table[2] == "| 0 | conv_fwd_kernel | 2102.45 | barrier 2100.25, long_scoreboard 1.50 |"
    assert table[3] == "| 1 | bn_finalize_kernel | 0.35 | wait 0.20, long_scoreboard 0.10 |"
    assert len(table) == 4
