"""Smoke test of benchmarks/bench.py: runs `--quick` (tiny models) in a subprocess, against the upstream
reference and as an A/B against an older commit, and checks the structure of what it prints and writes.
Timings are not checked (the machine may be busy)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


# the code before the model redesign: same state-dict keys, mvit_zoo/__init__.py exports MViT, MODEL_CFGS, make_cfg
REF_COMMIT = "85be2bd"


def _quick(out: Path, *extra: str) -> dict[str, Any]:
    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_text() if results_md.exists() else None
    cmd = [sys.executable, str(BENCH), "--quick", "--models", "mvit_tiny", "--modes", "infer", "train",
           "--dtypes", "fp32", "--threads", "1", "--json", str(out / "r.json"), "--results", str(out / "R.md"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = results_md.read_text() if results_md.exists() else None
    return dict(stdout=proc.stdout, json=json.loads((out / "r.json").read_text()), md=(out / "R.md").read_text(),
                repo_results_unchanged=before == after)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _quick(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def ab_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", REF_COMMIT + "^{commit}"]).returncode != 0:
        pytest.skip(f"{REF_COMMIT} is not in this clone's history (a shallow clone?)")
    return _quick(tmp_path_factory.mktemp("bench_ab"), "--ref-commit", REF_COMMIT)


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("mvit_zoo_bench_test", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_quick_json_structure(quick_run: dict[str, Any]) -> None:
    r = quick_run["json"]
    assert r["quick"] is True and r["ref_commit"] is None
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
        assert row["mem_ratio"] == pytest.approx(row["ours"]["memory"]["growth_mb"] / row["ref"]["memory"]["growth_mb"])
        assert "ab_ok" not in row


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
    bench = _load_bench()
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


def test_ab_against_an_older_commit(ab_run: dict[str, Any]) -> None:
    r = ab_run["json"]
    assert len(r["ref_commit"]) == 40 and r["ref_commit"].startswith(REF_COMMIT)
    [agree] = r["agreement"]
    # the old code loads the working tree's state dict strictly and computes the same logits
    assert agree["ok"] and agree["max_abs_diff"] < 1e-4 and agree["reference"] == f"mvit-zoo {REF_COMMIT}"
    assert [(row["mode"], row["dtype"]) for row in r["rows"]] == [("infer", "fp32"), ("train", "fp32")]
    for row in r["rows"]:
        for impl in ("ours", "ref"):
            assert "error" not in row[impl] and "error" not in row[impl]["memory"], row[impl]
        assert row["speedup"] == pytest.approx(row["ref"]["ms"] / row["ours"]["ms"])
        assert isinstance(row["ab_ok"], bool)
    assert isinstance(r["ab_ok"], bool)
    out = ab_run["stdout"]
    assert "| new ms | old ms |" in out and "| check" in out and "A/B (new within 5% of old" in out
    md = ab_run["md"]
    key = f"A/B {r['device_key']}, fp32 infer+train"
    assert md.count(f"<!-- bench:begin {key} -->") == 1
    assert f"## A/B: new (working tree) vs old ({r['ref_commit'][:12]})" in md
    assert "speedup = old ms / new ms; mem x = new peak-memory growth / old" in md
    assert f"--ref-commit {REF_COMMIT}" in md and ab_run["repo_results_unchanged"]


def test_ab_import_leaves_timm_registry_alone(ab_run: dict[str, Any]) -> None:
    """Importing the old package registers nothing: timm still builds the working tree's models."""
    import timm

    import mvit_zoo

    bench = _load_bench()
    old = bench.ref_package(ab_run["json"]["ref_commit"])
    assert old.__name__ != "mvit_zoo" and old.MViT is not mvit_zoo.MViT
    model = timm.create_model("mvit_tiny", depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32)
    assert type(model) is mvit_zoo.MViT


def test_ab_and_reference_sections_side_by_side(quick_run: dict[str, Any], ab_run: dict[str, Any],
                                                tmp_path: Path) -> None:
    bench = _load_bench()
    path = tmp_path / "RESULTS.md"
    bench.write_results(path, quick_run["json"])
    bench.write_results(path, ab_run["json"])
    bench.write_results(path, dict(ab_run["json"], command="python benchmarks/bench.py --ab-again"))
    # a bf16 A/B run gets a section of its own, next to the float32 one
    bench.write_results(path, dict(ab_run["json"], rows=[dict(row, dtype="bf16") for row in ab_run["json"]["rows"]]))
    text = path.read_text()
    key = quick_run["json"]["device_key"]
    assert text.count(f"<!-- bench:begin {key} -->") == 1
    assert text.count(f"<!-- bench:begin A/B {key}, fp32 infer+train -->") == 1
    assert text.count(f"<!-- bench:begin A/B {key}, bf16 infer+train -->") == 1
    assert "--ab-again" in text and text.count("command: `") == 3


def test_unknown_ref_commit_is_refused() -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--ref-commit", "no-such-rev", "--no-results"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "is not a commit" in proc.stderr


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _quick(tmp_path_factory.mktemp("bench_ablation"), "--ablate")


def test_ablation_times_each_path_the_dispatch_chose(ablation_run: dict[str, Any]) -> None:
    from mvit_zoo.ops.dispatch import HAS_CPU_FLASH

    bench = _load_bench()
    r = ablation_run["json"]
    paths = {(row["mode"], row["without"]) for row in r["rows"]}
    assert {("infer", "sdpa_mask_rows"), ("infer", "norm_mlp"), ("infer", "memory_efficient"),
            ("train", "norm_linears"), ("train", "norm_mlp"), ("train", "residual_linear")} <= paths
    assert (("train", "cpu_flash") in paths) == HAS_CPU_FLASH
    for row in r["rows"]:
        assert row["without"] in bench.ABLATIONS and row["reference"] == "mvit-zoo without a path"
        for impl in ("ours", "ref"):
            assert "error" not in row[impl] and "error" not in row[impl]["memory"], row[impl]
        assert isinstance(row["pays"], bool)
    assert "| path" in ablation_run["stdout"] and "| gain |" in ablation_run["stdout"]
    md = ablation_run["md"]
    assert md.count(f"<!-- bench:begin ablation {r['device_key']}, fp32 infer+train -->") == 1
    assert "## Ablation: each fast path against what runs without it" in md and ablation_run["repo_results_unchanged"]


def test_dispatch_patch_replaces_one_path_and_restores_the_dispatch() -> None:
    import torch

    import mvit_zoo
    from mvit_zoo.model.mvit import MultiScaleBlock
    from mvit_zoo.ops import attention, dispatch, memory

    bench = _load_bench()
    model = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    blocks = [m for m in model.modules() if isinstance(m, MultiScaleBlock)]
    with torch.no_grad():
        expected = model(x)
        with bench.dispatch_patch(model, without="sdpa_mask_rows"):
            assert attention.select("attention", x) == "sdpa_augmented"
            assert all(b.memory_efficient for b in blocks)
            torch.testing.assert_close(model(x), expected)
        with bench.dispatch_patch(model, without="sdpa_mask_rows+sdpa_augmented"):  # followed: -> augmented -> mask
            assert attention.select("attention", x) == "sdpa_mask"
        with bench.dispatch_patch(model, without="memory_efficient+norm_mlp"):
            assert not any(b.memory_efficient for b in blocks)
            assert memory.select("norm_mlp", x) == "plain"
            torch.testing.assert_close(model(x), expected)
        assert memory.select("norm_mlp", x) == "rows"
    assert all(b.memory_efficient for b in blocks)
    with bench.dispatch_patch(model, without="cpu_flash+sdpa_augmented"):  # followed: cpu_flash -> augmented -> mask
        assert attention.select("attention", x.requires_grad_()) == "sdpa_mask"
    x16 = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    assert dispatch.select("depthwise_conv", x16, conv_3d_or_strided=True) == "float32_backward"
    with bench.dispatch_patch(model, without="depthwise_conv"):
        assert memory.select("depthwise_conv", x16, conv_3d_or_strided=True) == "plain"
    assert memory.select is dispatch.select and attention.select is dispatch.select
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablate", "--ref-commit", "HEAD"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablate", "gemm+no_such_path"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the processes' CPU time from /proc")
def test_contention_runs_busy_processes_and_stops_them() -> None:
    """`--contention N`: N processes spin beside the timing (each one core busy) and are gone afterwards."""
    bench = _load_bench()
    assert bench.parse_args(["--contention", "2"]).contention == 2 and bench.parse_args([]).contention == 0
    with bench.contention(2, 60) as spinners:
        time.sleep(0.5)
        assert len(spinners) == 2 and all(s.poll() is None for s in spinners)
        cpu = [float(Path(f"/proc/{s.pid}/stat").read_text().split()[13]) for s in spinners]  # utime, clock ticks
    assert all(s.poll() is not None for s in spinners)
    assert all(ticks > 0 for ticks in cpu)  # they ran, not slept
