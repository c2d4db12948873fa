"""Smoke test of benchmarks/bench.py: runs `--quick` (tiny models) in a subprocess and checks the
structure of what it prints and writes. Timings are not checked (the machine may be busy)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_text() if results_md.exists() else None
    cmd = [sys.executable, str(BENCH), "--quick", "--models", "mvit_tiny", "--modes", "infer", "train",
           "--dtypes", "fp32", "--threads", "1", "--json", str(out / "r.json"), "--results", str(out / "R.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = results_md.read_text() if results_md.exists() else None
    return dict(stdout=proc.stdout, json=json.loads((out / "r.json").read_text()), md=(out / "R.md").read_text(),
                repo_results_unchanged=before == after)


def test_quick_json_structure(quick_run: dict[str, Any]) -> None:
    r = quick_run["json"]
    assert r["quick"] is True
    for key in ("date", "command", "machine", "versions", "device_key", "matmul_peak", "agreement", "rows", "settings"):
        assert key in r
    assert {"torch", "timm", "torchvision"} <= set(r["versions"])
    assert r["machine"]["cpu"] and r["machine"]["torch_threads"] == 1
    assert r["matmul_peak"]["fp32"]["gflops"] > 0
    [agree] = r["agreement"]
    assert agree["ok"] and agree["max_abs_diff"] < 1e-4 and agree["reference"] == "timm mvitv2_tiny"
    assert [(row["mode"], row["dtype"], row["compiled"]) for row in r["rows"]] == [
        ("infer", "fp32", False), ("train", "fp32", False)]
    for row in r["rows"]:
        assert row["batch"] == 8
        for impl in ("ours", "ref"):
            d = row[impl]
            assert "error" not in d, d
            assert d["ms"] > 0 and d["samples_per_s"] > 0 and len(d["ms_all"]) == 2
            assert d["gflop"] > 0 and 0 < d["frac_of_peak"]
            assert "error" not in d["memory"], d["memory"]
            assert d["memory"]["peak_mb"] >= d["memory"]["baseline_mb"] > 0
        assert row["speedup"] == pytest.approx(row["ref"]["ms"] / row["ours"]["ms"])
        assert row["target"]["speedup_min"] in (1.5, 1.3) and isinstance(row["target"]["met"], bool)
    assert "mem_max" in r["rows"][1]["target"]  # training has a memory target


def test_quick_table_and_results(quick_run: dict[str, Any]) -> None:
    out = quick_run["stdout"]
    assert "| model" in out and "speedup" in out and "mem x" in out
    assert sum(1 for line in out.splitlines() if line.startswith("| mvit_tiny ")) == 2
    md = quick_run["md"]
    key = quick_run["json"]["device_key"]
    assert md.count(f"<!-- bench:begin {key} -->") == 1 and f"## {key}" in md
    assert "command: `python benchmarks/bench.py --quick" in md and "timm 1.0" in md
    # --quick never touches the repository's RESULTS.md unless asked to
    assert quick_run["repo_results_unchanged"]


def test_results_section_replaced_per_device(quick_run: dict[str, Any], tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("mvit_zoo_bench_test", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    path = tmp_path / "RESULTS.md"
    path.write_text(bench.RESULTS_HEADER + "\nNo results recorded yet: placeholder.\n")
    result = quick_run["json"]
    other = dict(result, device_key="cuda: Some GPU")
    bench.write_results(path, result)
    bench.write_results(path, other)
    bench.write_results(path, dict(result, command="python benchmarks/bench.py --again"))
    text = path.read_text()
    assert text.startswith("# mvit-zoo benchmark results")
    assert text.count(f"<!-- bench:begin {result['device_key']} -->") == 1
    assert text.count("<!-- bench:begin cuda: Some GPU -->") == 1
    assert "--again" in text and text.count("command: `") == 2
    assert "No results recorded yet" not in text
