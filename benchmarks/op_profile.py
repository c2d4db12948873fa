#!/usr/bin/env python
"""Where the time goes: torch.profiler on mvit-zoo and on the reference, same model, same weights.

    python benchmarks/op_profile.py --model mvit_tiny --batch 8 --iters 3
    python benchmarks/op_profile.py --model mvit_v2_s_16x4 --batch 1 --mode train --dtype bf16 --by-shape
    python benchmarks/op_profile.py --model mvit_tiny --ref-commit 85be2bd  # against mvit-zoo at that commit

Builds the pair as benchmarks/bench.py does (the same weights in both), warms each up, profiles
`--iters` calls (inference) or training steps, and prints for each implementation the top operators by
self time (CPU; CUDA kernels too with --device cuda), then one table with both side by side, per call.
--trace-dir writes Chrome traces (open in chrome://tracing or https://ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("mvit_zoo_bench", HERE / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mvit_tiny",
                   help=f"our model name (references for {', '.join(bench.REFERENCES)}; any with --ref-commit)")
    p.add_argument("--ref-commit", default=None, metavar="REV", help="reference: mvit-zoo at git revision REV")
    p.add_argument("--batch", type=int, default=None, help="samples per call (default: 8 images / 1 clip)")
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--impl", choices=["both", "ours", "ref"], default="both")
    p.add_argument("--iters", type=int, default=3, help="profiled calls per implementation")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--compile", action="store_true", help="profile torch.compile'd models")
    p.add_argument("--sdpa", choices=["auto", "default", "flash", "efficient", "cudnn", "math"], default="auto")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--row-limit", type=int, default=25, help="operators per table")
    p.add_argument("--by-shape", action="store_true", help="group operators by input shapes too")
    p.add_argument("--memory", action="store_true", help="also profile memory (self CPU/CUDA memory columns)")
    p.add_argument("--trace-dir", type=Path, default=None, help="write Chrome traces here")
    p.add_argument("--quick", action="store_true", help="tiny models, as bench.py --quick")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return args


def _self_time_us(evt: Any, device: bool) -> float:
    if device:
        return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))
    return float(evt.self_cpu_time_total)


def profile_impl(name: str, model: torch.nn.Module, x: torch.Tensor, num_classes: int,
                 args: argparse.Namespace) -> tuple[Any, float]:
    device = x.device
    step = bench.make_step(model, args.mode, args.dtype, x, num_classes, args)
    for _ in range(args.warmup + (1 if args.compile else 0)):
        step()
    bench._sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    bench._sync(device)
    wall_ms = (time.perf_counter() - t0) / args.iters * 1e3  # unprofiled, for reference
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.by_shape, profile_memory=args.memory) as prof:
        for _ in range(args.iters):
            step()
        bench._sync(device)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        path = args.trace_dir / f"{args.model}_{name}_{args.mode}_{args.dtype}.json"
        prof.export_chrome_trace(str(path))
        print(f"trace: {path}")
    return prof, wall_ms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    pair = bench.build_pair(args.model, quick=args.quick,
                            ref_commit=bench.resolve_commit(args.ref_commit) if args.ref_commit else None)
    batch = args.batch or (1 if pair.is_video else 8)
    torch.manual_seed(2)
    x = torch.randn((batch,) + pair.input_shape, device=device)
    models = {"ours": pair.ours.to(device), "ref": pair.ref.to(device)}
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    impls = ["ours", "ref"] if args.impl == "both" else [args.impl]
    title = {"ours": f"mvit-zoo {args.model}", "ref": pair.ref_name}
    sort_key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    per_impl: dict[str, dict[str, tuple[float, int]]] = {}
    walls: dict[str, float] = {}
    print(f"# {args.model} vs {pair.ref_name}: {args.mode}, {args.dtype}, batch {batch}, input {tuple(x.shape)}, "
          f"{args.threads} threads, {device}{', compiled' if args.compile else ''}; {args.iters} profiled calls")
    for impl in impls:
        prof, wall = profile_impl(impl, models[impl], x, pair.num_classes, args)
        walls[impl] = wall
        events = prof.key_averages(group_by_input_shape=args.by_shape)
        print(f"\n=== {title[impl]}: {wall:.1f} ms per call unprofiled; top {args.row_limit} operators by "
              f"{sort_key} ({args.iters} calls) ===")
        try:
            print(events.table(sort_by=sort_key, row_limit=args.row_limit, max_name_column_width=60))
        except Exception:  # noqa: BLE001 - older/newer key names
            print(events.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                               row_limit=args.row_limit, max_name_column_width=60))
        ops: dict[str, tuple[float, int]] = {}
        for evt in events:
            key = evt.key + (f" {evt.input_shapes}" if args.by_shape and evt.input_shapes else "")
            t, n = ops.get(key, (0.0, 0))
            ops[key] = (t + _self_time_us(evt, on_gpu) / 1e3 / args.iters, n + evt.count // max(args.iters, 1))
        per_impl[impl] = ops

    if len(impls) == 2:
        ours, ref = per_impl["ours"], per_impl["ref"]
        tot_o, tot_r = sum(t for t, _ in ours.values()), sum(t for t, _ in ref.values())
        keys = sorted(set(ours) | set(ref), key=lambda k: -max(ours.get(k, (0, 0))[0], ref.get(k, (0, 0))[0]))
        keys = keys[:args.row_limit]
        width = min(70, max(len("operator"), *(len(k) for k in keys))) if keys else 8
        kind = "GPU" if on_gpu else "CPU"
        print(f"\n=== side by side: self {kind} ms per call (and calls per call) ===")
        print(f"{'operator':<{width}}  {'ours ms':>9} {'n':>5}  {'ref ms':>9} {'n':>5}  {'ours-ref':>9}")
        for k in keys:
            to, no = ours.get(k, (0.0, 0))
            tr, nr = ref.get(k, (0.0, 0))
            print(f"{k[:width]:<{width}}  {to:9.2f} {no:5d}  {tr:9.2f} {nr:5d}  {to - tr:+9.2f}")
        total = "total self " + kind + " time"
        print(f"{total:<{width}}  {tot_o:9.2f} {'':5}  {tot_r:9.2f} {'':5}  {tot_o - tot_r:+9.2f}")
        print(f"{'wall ms per call (unprofiled)':<{width}}  {walls['ours']:9.2f} {'':5}  {walls['ref']:9.2f} {'':5}  "
              f"{walls['ours'] - walls['ref']:+9.2f}   speedup {walls['ref'] / walls['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
