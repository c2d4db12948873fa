"""benchmarks/data_bench.py: the generated files, the clip plan, the ratios and the RESULTS.md section in process,
and (slow: a dozen worker processes each importing torch) its `--quick` run end to end. Timings are not checked."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_bench.py"


@pytest.fixture(scope="module")
def db() -> Any:
    spec = importlib.util.spec_from_file_location("mvit_zoo_data_bench_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_generated_kinetics_file_has_the_kind_s_codec_keyframes_and_b_frames(db: Any, tmp_path: Path) -> None:
    kind = db.file_kinds(quick=True)["kinetics"]
    path = tmp_path / "k.mp4"
    db.write_video(path, kind, duration=2.0, seed=0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", *kind.size)
        assert float(stream.average_rate) == kind.fps
        packets = [p for p in container.demux(stream) if p.size]
    assert len(packets) == 2 * kind.fps
    keys = [i for i, p in enumerate(packets) if p.is_keyframe]
    assert keys == list(range(0, len(packets), kind.gop))
    assert any(p.pts != p.dts for p in packets), "no reordered (B-)frames"


def test_clip_plan_one_clip_of_the_long_file_for_today_and_the_same_seeds_for_every_loader(db: Any) -> None:
    kinds = db.file_kinds(quick=False)
    files = [Path(f"{i}.mp4") for i in range(3)]
    ours = db.clip_plan(kinds["kinetics"], files, "train", "ours-pyav", 1)
    assert ours == db.clip_plan(kinds["kinetics"], files, "train", "pytorchvideo", 1)
    assert [p for p, _ in ours] == [str(files[i % 3]) for i in range(kinds["kinetics"].clips)]
    assert len({seed for _, seed in ours}) == len(ours)
    assert db.clip_plan(kinds["long"], files, "train", "today", 0) == [(str(files[0]), 0)]
    assert db.clip_plan(kinds["long"], files, "train", "today", 1) == []
    assert len(db.clip_plan(kinds["long"], files, "train", "ours-pyav", 1)) == kinds["long"].clips
    assert [p for p, _ in db.clip_plan(kinds["ssv2"], files, "val", "today", 2)] == [str(f) for f in files]


def _row(task: str, loader: str, kind: str, per_s: float) -> dict[str, Any]:
    return dict(task=task, loader=loader, kind=kind, error=None, import_s=1.0, worker_rss_mb=900.0, per_s=per_s,
                ms_per_item=1000 / per_s, rss_growth_mb=100.0, stages_ms={"probe": 1.0, "sample": 0.1,
                                                                          "read": 10.0, "augment": 50.0})


def _result(db: Any, cpu: str = "Test CPU") -> dict[str, Any]:
    rows = [_row("train", "ours-pyav", "kinetics", 6.0), _row("train", "today", "kinetics", 1.5),
            _row("train", "pytorchvideo", "kinetics", 3.0), _row("val", "ours", "kinetics", 2.0),
            _row("val", "today", "kinetics", 0.5)]
    kind = db.file_kinds(quick=True)["kinetics"]
    return dict(date="2026-01-01T00:00:00+00:00", command="python benchmarks/data_bench.py --rounds 3",
                host=dict(cpu=cpu, logical_cores=2, usable_cores=2, memory_gb=8.0, platform="Linux"),
                versions=dict(python="3.11", torch="2", mvit_zoo_commit="abc1234"), quick=False, rounds=3,
                ref_commit="4f6b89c" + "0" * 33, rows=rows, ratios=db.ratios(rows),
                files={"kinetics": dict(title=kind.title, durations=list(kind.durations), mb=1.0)})


def test_ratios_divide_ours_by_each_reference_of_the_same_run(db: Any) -> None:
    ratios = _result(db)["ratios"]
    assert ratios["train"]["kinetics"] == {"ours-pyav/today": 4.0, "ours-pyav/pytorchvideo": 2.0}
    assert ratios["val"]["kinetics"] == {"ours/today": 4.0}


def test_results_section_replaces_only_its_own_host_s_section(db: Any, tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    other = ("<!-- bench:begin cpu: Test CPU, 2 threads -->\n## cpu: Test CPU\n\n| a |\n"
             "<!-- bench:end cpu: Test CPU, 2 threads -->")
    path.write_text(f"# header\n\n{other}\n")
    db.write_results(path, _result(db))
    db.write_results(path, _result(db, cpu="Other CPU"))
    first = path.read_text()
    assert first.startswith(f"# header\n\n{other}\n\n<!-- bench:begin data cpu: Test CPU, 2 cores -->")
    assert first.count("## Video data loading (CPU): Test CPU, 2 cores") == 1
    assert first.count("## Video data loading (CPU): Other CPU, 2 cores") == 1
    assert "| kinetics | 6.00" in first and "4.00x" in first and "2.00x" in first
    rerun = _result(db)
    rerun["rows"][0]["per_s"] = 9.0
    rerun["ratios"] = db.ratios(rerun["rows"])
    db.write_results(path, rerun)
    second = path.read_text()
    assert second.count("data cpu: Test CPU, 2 cores -->") == 2 and "| kinetics | 9.00" in second
    assert second.replace("9.00", "6.00").replace("6.00x", "4.00x").replace("3.00x", "2.00x") == first


def _worktrees() -> list[str]:
    listing = subprocess.run(["git", "-C", str(ROOT), "worktree", "list", "--porcelain"], capture_output=True,
                             text=True).stdout
    return [line for line in listing.splitlines() if line.startswith("worktree ")]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    results_md = ROOT / "benchmarks" / "RESULTS.md"
    before = results_md.read_text()
    worktrees = _worktrees()
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--results",
                           str(tmp_path / "R.md")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert results_md.read_text() == before
    assert _worktrees() == worktrees, "the reference worktree was not removed"
    rows = {(r["task"], r["loader"], r["kind"]): r for r in result["rows"]}
    kinds = ("kinetics", "ssv2", "long")
    expected = [("train", lo, k) for lo in ("ours-pyav", "ours-torchcodec", "today", "pytorchvideo") for k in kinds]
    expected += [("val", lo, k) for lo in ("ours", "today") for k in kinds]
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        if key[1] == "ours-torchcodec" and row["error"]:
            continue  # TorchCodec installed without a working FFmpeg: an error row, not a failed run
        assert row["error"] is None, (key, row["error"])
        # NOTE: the kernel syncs VmHWM from per-thread RSS counters lazily: on tiny files it can read a few MB under
        # the RSS read just after the reset
        assert row["per_s"] > 0 and row["rss_growth_mb"] > -16
        assert row["output_shape"] == ([3, 16, 224, 224] if key[0] == "train" else [5, 3, 16, 224, 224])
    assert rows[("train", "today", "long")]["items"] == 1
    assert set(rows[("train", "ours-pyav", "kinetics")]["stages_ms"]) == {"read", "augment"}
    assert set(result["ratios"]["train"]["kinetics"]) >= {"ours-pyav/today", "ours-pyav/pytorchvideo"}
    md = (tmp_path / "R.md").read_text()
    assert md.startswith("<!-- bench:begin data cpu: ") and md.rstrip().endswith("-->")
    assert "Training clips" in md and "Validation, 5x1 views" in md and "(1 clip)" in md
    assert (tmp_path / "data_bench_cache").is_dir()
