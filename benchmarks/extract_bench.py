#!/usr/bin/env python
"""`mvit-zoo extract` benchmark: videos per second and peak RSS of extracting pooled features of whole videos.

The files are data_bench.py's Kinetics-like kind (10 s, 30 fps, 340x256 H.264, a keyframe every 2 s, B-frames),
written once into a cache folder next to `--out`. The model is the full-size `mvit_v2_s_16x4` with random weights
(the speed does not depend on them), `--layer pooled`, one centre crop, back-to-back windows of 16 x 4 frames (five
per 10 s video: four, and one clamped to end on the last frame). The run goes through the engine of the command,
`mvit_zoo.extraction.extract_files`, in this process with `--workers 0`, so its time splits into waiting for decoded
and preprocessed clips (decode + preprocess) and the model's forward passes. Peak RSS is this process's VmHWM, and
its growth over the RSS after the imports and the model's creation.

    python benchmarks/extract_bench.py --videos 3 --results benchmarks/RESULTS.md
    python benchmarks/extract_bench.py --quick   # two tiny files and a tiny model: a smoke test
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import data_bench  # noqa: E402  (the generated files)
import host  # noqa: E402

MARK_END = "<!-- bench:end extract -->"
TITLE = "## Feature extraction (mvit-zoo extract)"
TINY = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32]}


def run(args: argparse.Namespace) -> str:
    """Extract the features of the generated files; returns the RESULTS.md section."""
    import timm
    import torch

    from mvit_zoo.data.transforms import resolve_data_config
    from mvit_zoo.extraction import extract_files, find_sources

    torch.set_num_threads(args.threads)
    kind = data_bench.file_kinds(args.quick)["kinetics"]
    kind = replace(kind, durations=kind.durations[:1] * args.videos)
    cache = Path(args.out).parent / "extract_bench_cache"
    data_bench.generate_files(cache, {kind.name: kind})
    folder = cache / kind.folder
    torch.manual_seed(0)
    model = timm.create_model("mvit_v2_s_16x4", pretrained=False, **(TINY if args.quick else {})).eval()
    data_cfg = resolve_data_config(model)
    base = host.status_mb("VmRSS") or 0.0
    host.reset_peak()
    sources, _ = find_sources(folder, videos=True, images=False)
    sources = [s for s in sources if Path(s.path).name.startswith(tuple(f"{i}-" for i in range(args.videos)))]
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as out:
        start = time.perf_counter()
        summary = extract_files(model, sources, out, {"model": "mvit_v2_s_16x4"}, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
    peak = host.peak_mb()
    share = summary.data_s + summary.model_s
    versions = data_bench.versions()
    lines = [
        f"{TITLE}, cpu: {data_bench.host_info()['cpu']}, {args.threads} threads",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python benchmarks/extract_bench.py {shlex.join(sys.argv[1:])}`",
        f"- python {platform.python_version()}, torch {versions.get('torch')}, av {versions.get('av')}, "
        f"torchcodec {versions.get('torchcodec')}, mvit-zoo {versions.get('mvit_zoo_commit')}",
        f"- files: {len(sources)} x {kind.title}; model: mvit_v2_s_16x4{' (tiny)' if args.quick else ''} with random "
        f"weights, --layer pooled, --views 1x1, windows of {data_cfg.num_frames} x {data_cfg.sampling_rate} frames "
        f"at 30 fps back to back, --batch-size {args.batch_size}, --workers 0, fp32, --decoder auto",
        "",
        "| videos | clips | seconds | videos/s | clips/s | decode + preprocess | model | peak RSS MB | RSS growth MB |",
        "|--------|-------|---------|----------|---------|---------------------|-------|-------------|---------------|",
        f"| {summary.written} | {summary.clips} | {seconds:.1f} | {summary.written / seconds:.3f} | "
        f"{summary.clips / seconds:.2f} | {100 * summary.data_s / share:.0f}% | {100 * summary.model_s / share:.0f}% | "
        f"{peak:.0f} | {peak - base:.0f} |",
        "",
        MARK_END,
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the extraction section of `path` (from its title to its end mark), or append it."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(TITLE), text.find(MARK_END)
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(MARK_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=3, help="generated 10 s files to extract (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=5, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "mvit-zoo-extract-bench" / "out"),
                        help="the cache of generated files goes next to it (default: %(default)s)")
    parser.add_argument("--results", default=None, metavar="PATH", help="write the section into this RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="tiny files and a tiny model: a smoke test")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    section = run(args)
    print(section)
    if args.results and not args.quick:
        write_section(Path(args.results), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
