#!/usr/bin/env python
"""mvit-zoo vs a reference: same architecture, same weights, timed side by side in one process.

The reference is the upstream implementation (timm `mvitv2_*` for images, torchvision `mvit_v2_s` /
`mvit_v1_b` for video) or, with `--ref-commit REV`, mvit-zoo itself at git revision REV (an A/B run of
the working tree against older code: `git archive REV mvit_zoo` imported under another package name,
its models built directly, never registered with timm). For each model the script builds ours and the
reference, copies the weights across (strict), checks that the fp32 outputs agree (abort otherwise),
then measures, alternating ours / reference round by round (warm-up, several rounds, median):

    infer     inference at --batch images / --clip-batch clips: ms per batch and samples/s
    latency   inference at batch 1: ms per sample
    train     one training step: forward + cross-entropy + backward + optimizer step, --batch / --clip-batch

in fp32 and under bf16 autocast (`--dtypes`), eager and, with `--compile`, torch.compile'd. Peak memory
of each (model, implementation, mode, dtype, compile) runs in a fresh subprocess (this script with
`--child`): on CPU the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs
after the warm-up) over the RSS before the measured steps; on CUDA torch.cuda.max_memory_allocated over
memory_allocated. FLOPs come from FlopCounterMode (attention through the explicit matmul path, which
the counter sees) and are divided by the median time, then by the machine's matmul peak (a large
torch.mm or F.linear, the faster, timed in the same run).

Prints a table with ratios (speedup = reference time / our time; memory = ours / reference; an A/B
run says new / old and checks both against --ab-tolerance), writes benchmarks/RESULTS.md (the section of
this device and comparison only) and, with --json, the raw results.

    python benchmarks/bench.py --models mvit_tiny mvit_small mvit_v2_s_16x4 --batch 8 --clip-batch 1 \\
        --rounds 5 --modes infer train --dtypes fp32 bf16 [--ref-commit REV] [--compile] [--device cuda] [--quick]

`--contention N` runs N busy processes (one core each, a bounded pure-Python spin) beside the timing, as on a
machine another job shares: it measures how each implementation's parallel regions cope with a core that is
not theirs. Such runs write RESULTS.md only where --results says.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import functools
import gc
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):  # mvit_zoo from this checkout; host beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import host  # noqa: E402

# our name -> (reference library, reference constructor name)
REFERENCES: dict[str, tuple[str, str]] = {
    "mvit_tiny": ("timm", "mvitv2_tiny"),
    "mvit_small": ("timm", "mvitv2_small"),
    "mvit_base": ("timm", "mvitv2_base"),
    "mvit_large": ("timm", "mvitv2_large"),
    "mvit_small_cls": ("timm", "mvitv2_small_cls"),
    "mvit_base_cls": ("timm", "mvitv2_base_cls"),
    "mvit_large_cls": ("timm", "mvitv2_large_cls"),
    "mvit_huge_cls": ("timm", "mvitv2_huge_cls"),
    "mvit_v2_s_16x4": ("torchvision", "mvit_v2_s"),
    "mvit_b_16x4": ("torchvision", "mvit_v1_b"),
}

# --quick: every model shrunk to this (same code paths, tiny sizes)
QUICK_ARCH = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)
QUICK_IMAGE = 32
QUICK_VIDEO = (4, 32, 32)
QUICK_CLASSES = 10

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("infer", "latency", "train")

# --ablate: each fast path of `mvit_zoo.ops.dispatch.select` -> what runs in its place without it (the
# choice of the row below it in select's table). Attention paths go by implementation, the others by op
# (norm_linears ... max_pool: the memory-saving "recompute" functions; depthwise_conv: float32_backward).
# memory_efficient: the blocks' forward through those functions (`MViT.set_memory_efficient`) -> "modules",
# the blocks calling their modules (one qkv GEMM, the whole MLP hidden tensor).
ABLATIONS: dict[str, str] = {
    "cpu_flash": "sdpa_augmented", "sdpa_augmented": "sdpa_mask",
    "sdpa_mask_rows": "sdpa_augmented", "gemm": "kernel", "norm_linears": "plain",
    "norm_mlp": "plain", "residual_linear": "plain", "max_pool": "plain", "depthwise_conv": "plain",
    "memory_efficient": "modules",
}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

# --ref-commit REV: the package at REV, imported once per process (rev -> module)
_REF_PACKAGES: dict[str, types.ModuleType] = {}


def resolve_commit(rev: str) -> str:
    """The full hash of git revision `rev` in this repository (SystemExit naming the fix otherwise)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", rev + "^{commit}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--ref-commit {rev!r} is not a commit of {ROOT}; give a hash, tag or branch (git log)")
    return proc.stdout.strip()


def ref_package(commit: str) -> types.ModuleType:
    """mvit_zoo as of `commit`, imported as package `mvit_zoo_<hash>` from `git archive` (a temporary
    folder for the life of the process). Its model registrations are skipped, so timm's registry keeps
    the working tree's models."""
    if commit in _REF_PACKAGES:
        return _REF_PACKAGES[commit]
    import importlib

    import timm.models
    import timm.models._registry

    tmp = tempfile.mkdtemp(prefix="mvit_zoo_ref_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "mvit_zoo"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # our own tree; the "data" filter where Python has it
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    package = f"mvit_zoo_{commit[:12]}"
    os.rename(os.path.join(tmp, "mvit_zoo"), os.path.join(tmp, package))
    sys.path.insert(0, tmp)
    saved = timm.models.register_model, timm.models._registry.register_model
    timm.models.register_model = timm.models._registry.register_model = lambda fn: fn
    try:
        module = importlib.import_module(package)  # relative imports inside resolve to this copy
    finally:
        timm.models.register_model, timm.models._registry.register_model = saved
        sys.path.remove(tmp)
    for attr in ("MViT", "MODEL_CFGS", "make_cfg"):
        if not hasattr(module, attr):
            raise SystemExit(f"mvit_zoo at {commit[:12]} has no {attr}: --ref-commit needs a revision whose "
                             f"mvit_zoo/__init__.py exports MViT, MODEL_CFGS and make_cfg")
    _REF_PACKAGES[commit] = module
    return module


@dataclasses.dataclass
class Pair:
    name: str
    ref_name: str  # e.g. "timm mvitv2_tiny" or "mvit-zoo 85be2bd"
    ours: nn.Module
    ref: nn.Module
    input_shape: tuple[int, ...]  # one sample: (C, H, W) or (C, T, H, W)
    num_classes: int
    is_video: bool


def _torchvision_block_setting(cfg: Any) -> list:
    """torchvision MSBlockConfig list equal to the blocks of our config (for the shrunken --quick models)."""
    from torchvision.models.video.mvit import MSBlockConfig

    from mvit_zoo.model.mvit import block_specs

    out = []
    for stage in block_specs(cfg):
        for s in stage:
            pool_q = s.kernel_q is not None
            out.append(MSBlockConfig(
                num_heads=s.num_heads, input_channels=s.dim, output_channels=s.dim_out,
                kernel_q=list(s.kernel_q) if pool_q else [], stride_q=list(s.stride_q) if pool_q else [],
                kernel_kv=list(s.kernel_kv) if s.kernel_kv is not None else [],
                stride_kv=list(s.stride_kv) if s.kernel_kv is not None else [],
            ))
    return out


def is_video(name: str) -> bool:
    import mvit_zoo

    return mvit_zoo.MODEL_CFGS[name].ndim == 3


def num_classes_for(name: str, quick: bool) -> int:
    """Classifier size of the reference (ours is built to match): images 1000 (ImageNet, timm), video 400
    (Kinetics, torchvision)."""
    return QUICK_CLASSES if quick else (400 if is_video(name) else 1000)


def input_shape_for(name: str, quick: bool) -> tuple[int, ...]:
    """One sample: (3, H, W) or (3, T, H, W) at the build size."""
    import mvit_zoo

    if quick:
        return (3,) + (QUICK_VIDEO if is_video(name) else (QUICK_IMAGE, QUICK_IMAGE))
    return (3,) + tuple(mvit_zoo.MODEL_CFGS[name].img_size)


def build_ours(name: str, quick: bool) -> nn.Module:
    import mvit_zoo

    kwargs: dict[str, Any] = dict(drop_path_rate=0.0, num_classes=num_classes_for(name, quick))
    if quick:
        kwargs.update(QUICK_ARCH, img_size=QUICK_VIDEO if is_video(name) else QUICK_IMAGE)
    return mvit_zoo.create_model(name, **kwargs)


def build_ref(name: str, quick: bool) -> nn.Module:
    """The reference model for our `name` (drop path / stochastic depth off, as ours)."""
    lib, ref_name = REFERENCES[name]
    if lib == "timm":
        import timm

        if not quick:
            return timm.create_model(ref_name, drop_path_rate=0.0)
        from timm.models import mvitv2 as tm

        cfg = dataclasses.replace(tm.model_cfgs[ref_name], **QUICK_ARCH)
        return tm.MultiScaleVit(cfg, img_size=(QUICK_IMAGE, QUICK_IMAGE), num_classes=QUICK_CLASSES)
    import torchvision.models.video as tvv

    if not quick:
        return getattr(tvv, ref_name)(stochastic_depth_prob=0.0)
    import mvit_zoo
    from torchvision.models.video.mvit import MViT as TVMViT

    cfg = mvit_zoo.make_cfg(mvit_zoo.MODEL_CFGS[name], **QUICK_ARCH, img_size=QUICK_VIDEO)
    v2 = ref_name.startswith("mvit_v2")
    return TVMViT(
        spatial_size=QUICK_VIDEO[1:], temporal_size=QUICK_VIDEO[0], block_setting=_torchvision_block_setting(cfg),
        residual_pool=v2, residual_with_cls_embed=False, rel_pos_embed=v2, proj_after_attn=v2,
        stochastic_depth_prob=0.0, num_classes=QUICK_CLASSES,
    )


def build_old(name: str, quick: bool, commit: str) -> nn.Module:
    """Our `name` as the code at `commit` builds it (same config overrides and head as build_ours)."""
    old = ref_package(commit)
    if name not in old.MODEL_CFGS:
        raise SystemExit(f"{name!r} is not a model of mvit_zoo at {commit[:12]}; it has {', '.join(old.MODEL_CFGS)}")
    overrides: dict[str, Any] = {}
    if quick:
        overrides.update(QUICK_ARCH, img_size=QUICK_VIDEO if is_video(name) else QUICK_IMAGE)
    return old.MViT(old.make_cfg(old.MODEL_CFGS[name], **overrides), num_classes=num_classes_for(name, quick),
                    drop_path_rate=0.0)


def build_model(name: str, impl: str, quick: bool, ref_commit: Optional[str] = None) -> nn.Module:
    if impl == "ours":
        return build_ours(name, quick)
    return build_old(name, quick, ref_commit) if ref_commit else build_ref(name, quick)


def build_pair(name: str, quick: bool = False, load_weights: bool = True, seed: int = 0,
               ref_commit: Optional[str] = None) -> Pair:
    """Ours and the reference with the same (random) weights: the upstream reference's copied into ours,
    or, with `ref_commit` (a full hash), ours copied into the model of the code at that commit."""
    import mvit_zoo

    if ref_commit:
        torch.manual_seed(seed)
        ours = build_ours(name, quick)
        ref = build_old(name, quick, ref_commit)
        if load_weights:
            ref.load_state_dict(ours.state_dict(), strict=True)
        return Pair(name=name, ref_name=f"mvit-zoo {ref_commit[:7]}", ours=ours, ref=ref,
                    input_shape=input_shape_for(name, quick), num_classes=num_classes_for(name, quick),
                    is_video=is_video(name))
    if name not in REFERENCES:
        raise SystemExit(f"no reference for {name!r}; benchmarkable models: {', '.join(REFERENCES)} "
                         f"(any model with --ref-commit)")
    lib, ref_name = REFERENCES[name]
    torch.manual_seed(seed)
    ref = build_ref(name, quick)
    ours = build_ours(name, quick)
    if load_weights:
        sd = ref.state_dict()
        if lib == "torchvision":
            sd = mvit_zoo.convert_state_dict(sd, ours)
        ours.load_state_dict(sd, strict=True)
    return Pair(name=name, ref_name=f"{lib} {ref_name}", ours=ours, ref=ref, input_shape=input_shape_for(name, quick),
                num_classes=num_classes_for(name, quick), is_video=is_video(name))


def batch_for(video: bool, mode: str, args: argparse.Namespace) -> int:
    """Samples per call: 1 for latency; images --batch; clips --clip-batch (infer) / --train-clip-batch."""
    if mode == "latency":
        return 1
    if not video:
        return args.batch
    return args.train_clip_batch if mode == "train" else args.clip_batch


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def dispatch_patch(model: nn.Module, without: Optional[str] = None, seen: Optional[set[str]] = None) -> Any:
    """Run `model` with the path `without` ("a+b": each of them) replaced by what runs without it
    (ABLATIONS, followed while the replacement is removed too); every path the dispatch chooses meanwhile
    is added to `seen`."""
    from mvit_zoo.ops import attention, dispatch, memory

    removed = set(without.split("+")) if without else set()

    def select(op: str, *a: Any, **kw: Any) -> str:
        impl = dispatch.select(op, *a, **kw)
        path = impl if op.startswith("attention") else op
        if impl == "plain":
            return impl
        if seen is not None:
            seen.add(path)
        if path not in removed:
            return impl
        impl = ABLATIONS[path]
        while op.startswith("attention") and impl in removed:  # (its replacement removed too: the next one)
            impl = ABLATIONS[impl]
        return impl

    if seen is not None and any(getattr(m, "memory_efficient", False) for m in model.modules() if m is not model):
        seen.add("memory_efficient")
    modules = getattr(model, "memory_efficient", False) and "memory_efficient" in removed
    attention.select = memory.select = select
    if modules:
        model.set_memory_efficient(False)
    try:
        yield
    finally:
        attention.select = memory.select = dispatch.select
        if modules:
            model.set_memory_efficient(True)


def ablated(step: Callable[[], Any], model: nn.Module, without: Optional[str]) -> Callable[[], Any]:
    """`step` run with the implementation `without` replaced (see `dispatch_patch`); `step` itself if None."""
    if without is None:
        return step

    def run() -> Any:
        with dispatch_patch(model, without):
            return step()

    return run


def _sdpa_context(device: torch.device, choice: str) -> contextlib.AbstractContextManager:
    """Restrict scaled_dot_product_attention to the chosen kernels (ours uses SDPA; the references do not)."""
    if choice == "default" or (choice == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"auto": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"], "flash": ["FLASH_ATTENTION"],
             "efficient": ["EFFICIENT_ATTENTION"], "cudnn": ["CUDNN_ATTENTION"], "math": ["MATH"]}[choice]
    return sdpa_kernel([getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)])


def make_step(model: nn.Module, mode: str, dtype: str, x: torch.Tensor, num_classes: int,
              args: argparse.Namespace) -> Callable[[], Any]:
    """A closure running one inference call or one training step of `model` on `x`."""
    device = x.device

    def autocast() -> contextlib.AbstractContextManager:
        if dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    sdpa = args.sdpa
    if mode in ("infer", "latency"):
        model.eval()

        def step() -> Any:
            with torch.inference_mode(), autocast(), _sdpa_context(device, sdpa):
                return model(x)

        return step
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(params, lr=1e-5)
    target = torch.randint(0, num_classes, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)

    def train_step() -> Any:
        with autocast(), _sdpa_context(device, sdpa):
            loss = F.cross_entropy(model(x), target)
        with _sdpa_context(device, sdpa):
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def count_flops(model: nn.Module, mode: str, dtype: str, x: torch.Tensor, num_classes: int,
                args: argparse.Namespace) -> Optional[float]:
    """FLOPs of one call / training step (FlopCounterMode; our attention via the explicit matmul path,
    which the counter sees, where the CPU SDPA kernels are not counted). Weights are left untouched."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = None
    if hasattr(model, "set_fused_attn"):
        fused = any(getattr(m, "fused_attn", False) for m in model.modules())
        model.set_fused_attn(False)
    was_training = model.training
    try:
        counter = FlopCounterMode(display=False)
        if mode == "train":
            model.train()
            target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            with counter:
                F.cross_entropy(model(x), target).backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with counter, torch.no_grad():
                model(x)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a counter failure must not stop the benchmark
        return None
    finally:
        model.train(was_training)
        if fused is not None:
            model.set_fused_attn(fused)


def matmul_peak(device: torch.device, dtype: str, quick: bool) -> dict[str, Any]:
    """GFLOP/s of a large square matmul (best of a few), the machine's practical matmul peak: the faster of
    torch.mm and F.linear, which can take different kernels (bf16 on a CPU without native bf16: torch.mm
    runs at ~1 GFLOP/s there, F.linear through oneDNN at 15-20)."""
    dt = DTYPES[dtype]
    limit = 512 if quick else (8192 if device.type == "cuda" else 4096)
    budget = 0.02 if quick else 0.25  # seconds per call to aim for
    reps = 2 if quick else 5
    best: dict[str, Any] = {}
    for op, fn in (("mm", torch.mm), ("linear", F.linear)):  # F.linear(a, b) = a @ b.T: the same FLOPs
        n = 256 if quick else 512
        while True:
            a = torch.randn(n, n, device=device).to(dt)
            b = torch.randn(n, n, device=device).to(dt)
            mm = functools.partial(fn, a, b)
            mm()
            t = _timed(mm, 2, device)
            if t >= budget or n >= limit:
                break
            n = min(limit, n * 2)
        fastest = min(_timed(mm, max(1, int(budget / max(t, 1e-6))), device) for _ in range(reps))
        gflops = 2 * n ** 3 / fastest / 1e9
        if gflops > best.get("gflops", 0.0):
            best = dict(n=n, gflops=gflops, op=op)
    return best


# --------------------------------------------------------------------------------------------------
# Peak memory (child processes)
# --------------------------------------------------------------------------------------------------

def _measure_one(model: nn.Module, spec: dict[str, Any], args: argparse.Namespace, device: torch.device,
                 compiled: dict[bool, nn.Module]) -> dict[str, Any]:
    """Peak memory of one configuration's step, above the memory in use just before it."""
    if spec["compiled"] and True not in compiled:
        compiled[True] = torch.compile(model)
    m = compiled[True] if spec["compiled"] else model
    torch.manual_seed(2)
    x = torch.randn((spec["batch"],) + tuple(spec["input_shape"]), device=device)
    step = make_step(m, spec["mode"], spec["dtype"], x, num_classes_for(spec["model"], args.quick), args)
    step = ablated(step, m, spec.get("without"))
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(spec["iters"]):
            step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return dict(method="torch.cuda.max_memory_allocated - memory_allocated before the step",
                    baseline_mb=base / 2**20, peak_mb=peak / 2**20, growth_mb=(peak - base) / 2**20)
    reset = host.reset_peak() and host.status_mb("VmHWM") is not None
    base = host.status_mb("VmRSS") or 0.0
    for _ in range(spec["iters"]):
        step()
    peak = host.peak_mb()
    return dict(method="peak RSS (VmHWM" + (", reset after the warm-up" if reset else ", NOT reset") +
                ") - RSS before the step", baseline_mb=base, peak_mb=peak, growth_mb=peak - base)


def run_child(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Peak memory of one implementation's configurations (`job['specs']`), measured one after the
    other in this fresh process; one result (or error) per configuration."""
    args = argparse.Namespace(**job["args"])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(job["model"], job["impl"], args.quick, args.ref_commit).to(device)  # (ablation: ours)
    compiled: dict[bool, nn.Module] = {}
    out = []
    for spec in job["specs"]:
        try:
            out.append(_measure_one(model, dict(spec, model=job["model"]), args, device, compiled))
        except Exception as e:  # noqa: BLE001
            out.append(dict(error=_err(e)))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def measure_memory(model: str, impl: str, specs: list[dict[str, Any]],
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run `specs` (mode, dtype, compiled, batch, input_shape) of one implementation in fresh processes:
    one per configuration (--memory-procs config) or one for all (--memory-procs impl)."""
    groups = [specs] if args.memory_procs == "impl" else [[s] for s in specs]
    results: list[dict[str, Any]] = []
    for group in groups:
        job = dict(model=model, impl=impl, specs=[dict(s, warmup=2 if s["compiled"] else 1,
                                                       iters=1) for s in group],
                   args=dict(threads=args.threads, device=args.device, quick=args.quick, sdpa=args.sdpa,
                             optimizer=args.optimizer, ref_commit=args.ref_commit))
        env = dict(os.environ)
        # large blocks straight from mmap and back to the OS on free, so RSS follows the live tensors
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            results += [dict(error=f"memory child timed out after {args.child_timeout}s")] * len(group)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD_RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results += [dict(error=f"memory child failed (rc {proc.returncode}): {' | '.join(tail)}")] * len(group)
            continue
        results += json.loads(lines[-1][len("CHILD_RESULT "):])
    return results


# --------------------------------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------------------------------

def check_agreement(pair: Pair, device: torch.device, tol: float, batch: int) -> dict[str, Any]:
    """fp32 eval outputs of ours and the reference on the same input."""
    torch.manual_seed(1)
    x = torch.randn((min(batch, 2),) + pair.input_shape, device=device)
    pair.ours.eval()
    pair.ref.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 for the check
    try:
        with torch.no_grad():
            a, b = pair.ours(x), pair.ref(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    diff = float((a.float() - b.float()).abs().max())
    return dict(model=pair.name, reference=pair.ref_name, max_abs_diff=diff, tol=tol, ok=diff < tol,
                shape=list(a.shape))


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def bench_config(pair: Pair, models: dict[str, nn.Module], mode: str, dtype: str, compiled: bool,
                 device: torch.device, args: argparse.Namespace, flops: dict[tuple[str, str], Optional[float]],
                 peaks: dict[str, dict[str, Any]], without: Optional[str] = None) -> dict[str, Any]:
    """Time ours and the reference alternately for one configuration; returns a result row. With `without`
    (--ablate) the reference is ours with that implementation replaced (`dispatch_patch`)."""
    batch = batch_for(pair.is_video, mode, args)
    torch.manual_seed(2)
    x = torch.randn((batch,) + pair.input_shape, device=device)
    row: dict[str, Any] = dict(model=pair.name, reference=pair.ref_name, mode=mode, dtype=dtype, compiled=compiled,
                               batch=batch, device=str(device), **({"without": without} if without else {}))
    steps: dict[str, Callable[[], Any]] = {}
    res: dict[str, dict[str, Any]] = {"ours": {}, "ref": {}}
    warm: dict[str, float] = {}
    for impl in ("ours", "ref"):
        try:
            steps[impl] = make_step(models[impl], mode, dtype, x, pair.num_classes, args)
            if impl == "ref":
                steps[impl] = ablated(steps[impl], models[impl], without)
            t0 = time.perf_counter()
            for _ in range(args.warmup + (1 if compiled else 0)):
                steps[impl]()
            _sync(device)
            warm[impl] = _timed(steps[impl], 1, device)
            res[impl]["first_calls_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded (e.g. the reference does not compile)
            res[impl]["error"] = ("compile/run failed: " if compiled else "") + _err(e)
            steps.pop(impl, None)
    if steps:
        iters = max(1, math.ceil(args.min_round_time / min(warm[i] for i in steps)))
        if args.quick:
            iters = 1
        times: dict[str, list[float]] = {impl: [] for impl in steps}
        order = list(steps)
        for r in range(args.rounds):
            for impl in (order if r % 2 == 0 else order[::-1]):
                times[impl].append(_timed(steps[impl], iters, device))
        row["iters_per_round"] = iters
        for impl, ts in times.items():
            ms = statistics.median(ts) * 1e3
            res[impl].update(ms=ms, ms_min=min(ts) * 1e3, ms_all=[t * 1e3 for t in ts], samples_per_s=batch / ms * 1e3)
            # one count for both: the same computation (the reference's, whose ops FlopCounterMode counts as
            # the math has them; it counts a grouped conv's weight gradient as ungrouped, and ours folds the
            # heads into the pooling conv's channels: 3.7x the reference's count for those convs, 1.45x for
            # a whole mvit_tiny training step)
            fl = flops.get(("ref", mode)) or flops.get(("ours", mode))
            if fl:
                res[impl]["gflop"] = fl / 1e9
                res[impl]["gflops_per_s"] = res[impl]["gflop"] / (ms / 1e3)
                pk = peaks.get(dtype, {}).get("gflops")
                if pk:
                    res[impl]["frac_of_peak"] = res[impl]["gflops_per_s"] / pk
    steps.clear()
    row["ours"], row["ref"] = res["ours"], res["ref"]
    row["speedup"] = res["ref"]["ms"] / res["ours"]["ms"] if "ms" in res["ours"] and "ms" in res["ref"] else None
    row["input_shape"] = list(pair.input_shape)
    return row


def ablation_paths(pair: Pair, mode: str, dtype: str, device: torch.device, args: argparse.Namespace) -> list[str]:
    """The paths of --ablate (ABLATIONS) that one call / training step of `pair.ours` takes in this
    configuration."""
    torch.manual_seed(2)
    x = torch.randn((batch_for(pair.is_video, mode, args),) + pair.input_shape, device=device)
    step = make_step(pair.ours, mode, dtype, x, pair.num_classes, args)
    seen: set[str] = set()
    with dispatch_patch(pair.ours, seen=seen):
        step()
    if not args.ablate:
        return [p for p in ABLATIONS if p in seen]
    return [p for p in args.ablate if seen & set(p.split("+"))]


def add_memory(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Peak memory (fresh subprocesses) for the rows of one model, then the memory ratios; an A/B run also
    checks each eager row against --ab-tolerance (`row['ab_ok']`)."""
    for impl in ("ours", "ref"):
        todo = [r for r in rows if "error" not in r[impl]
                and (args.memory == "all" or (args.memory == "eager" and not r["compiled"]))]
        if not todo:
            continue
        specs = [dict(mode=r["mode"], dtype=r["dtype"], compiled=r["compiled"], batch=r["batch"],
                      input_shape=r["input_shape"], **({"without": r["without"]} if impl == "ref" and "without" in r
                                                       else {})) for r in todo]
        build = "ours" if args.ablate is not None else impl
        for r, mem in zip(todo, measure_memory(todo[0]["model"], build, specs, args)):
            r[impl]["memory"] = mem
    for row in rows:
        om, rm = row["ours"].get("memory", {}).get("growth_mb"), row["ref"].get("memory", {}).get("growth_mb")
        row["mem_ratio"] = om / rm if om is not None and rm else None
        if args.ref_commit and not row["compiled"]:
            row["ab_ok"] = ab_ok(row, args.ab_tolerance)
        if "without" in row:
            row["pays"] = pays(row, args.gain_threshold)


def ab_ok(row: dict[str, Any], tolerance: float) -> bool:
    """An A/B row holds when the new code is at most `tolerance` slower and, where memory was measured,
    uses at most `tolerance` more peak memory than the old."""
    if row["speedup"] is None or row["speedup"] < 1 / (1 + tolerance):
        return False
    return row["mem_ratio"] is None or row["mem_ratio"] <= 1 + tolerance


def pays(row: dict[str, Any], threshold: float) -> Optional[bool]:
    """An ablation row's path pays when the model is at least `threshold` faster with it, or needs at least
    `threshold` less peak memory."""
    if row["speedup"] is None:
        return None
    return row["speedup"] >= 1 + threshold or (row["mem_ratio"] is not None and row["mem_ratio"] <= 1 - threshold)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError):
        text = open("/proc/cpuinfo").read()
        m = re.search(r"^flags\s*:(.*)$", text, re.M)
        if m:
            have = set(m.group(1).split())
            flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
    info = dict(platform=platform.platform(), cpu=host.cpu_name(), cpu_flags=flags, logical_cores=os.cpu_count(),
                affinity_cores=host.usable_cores(), torch_threads=threads, memory_gb=host.memory_gb(),
                device=str(device))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def versions() -> dict[str, Any]:
    import timm
    import torchvision

    import mvit_zoo

    commit = None
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mvit_zoo"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (mvit_zoo/ modified)"
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                timm=timm.__version__, mvit_zoo=mvit_zoo.__version__, mvit_zoo_commit=commit)


def _fmt(v: Any, spec: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    return format(v, spec)


def format_table(rows: list[dict[str, Any]], ab: bool = False) -> str:
    """Markdown table of the rows: ours/ref columns, new/old and an A/B check column when `ab`, or (rows of
    --ablate) the path, with/without it and whether it pays."""
    ablation = bool(rows) and "without" in rows[0]
    a, b = ("with", "without") if ablation else ("new", "old") if ab else ("ours", "ref")
    check = {True: "ok", False: "WORSE", None: "-"} if ab else {True: "pays", False: "no", None: "-"}
    head = ["model", "mode", "dtype"] + (["path"] if ablation else []) + [
        "compile", "batch", f"{a} ms", f"{b} ms", "gain" if ablation else "speedup", f"{a} /s", f"{b} /s",
        f"{a} MB", f"{b} MB", "mem x", f"{a} %pk", f"{b} %pk"] + (["check"] if ab or ablation else [])
    lines = []
    for r in rows:
        o, f = r["ours"], r["ref"]

        def mem(d: dict[str, Any]) -> str:
            m = d.get("memory")
            if m is None:
                return "-"
            return "err" if "error" in m else _fmt(m["growth_mb"], ".0f" if abs(m["growth_mb"]) >= 10 else ".1f")

        def ms(d: dict[str, Any]) -> str:
            return "err" if "error" in d else _fmt(d.get("ms"), ".1f")

        lines.append([r["model"], r["mode"], r["dtype"]] + ([r["without"]] if ablation else []) + [
            "yes" if r["compiled"] else "no", str(r["batch"]), ms(o), ms(f),
            _fmt(r.get("speedup"), ".2f"), _fmt(o.get("samples_per_s"), ".2f"), _fmt(f.get("samples_per_s"), ".2f"),
            mem(o), mem(f), _fmt(r.get("mem_ratio"), ".2f"),
            _fmt(o["frac_of_peak"] * 100 if "frac_of_peak" in o else None, ".1f"),
            _fmt(f["frac_of_peak"] * 100 if "frac_of_peak" in f else None, ".1f"),
        ] + ([check[r.get("ab_ok")]] if ab else [check[r.get("pays")]] if ablation else []))
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(ln, widths)) + " |" for ln in lines]
    return "\n".join(out)


def errors_text(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        for impl in ("ours", "ref"):
            d = r[impl]
            tag = f"{r['model']} {r['mode']} {r['dtype']}{' compiled' if r['compiled'] else ''} {impl}"
            if "error" in d:
                notes.append(f"{tag}: {d['error']}")
            if "error" in d.get("memory", {}):
                notes.append(f"{tag} memory: {d['memory']['error']}")
    return notes


def device_key(info: dict[str, Any]) -> str:
    if info["device"].startswith("cuda"):
        return f"cuda: {info.get('gpu')}"
    return f"cpu: {info['cpu']}, {info['torch_threads']} threads"


def section_key(result: dict[str, Any]) -> str:
    """RESULTS.md section of a run: one per device and comparison (upstream references), and for A/B and
    ablation runs, which take hours where 16-bit is emulated, one per device, dtypes and modes."""
    if result.get("ablate") is None and not result.get("ref_commit"):
        return result["device_key"]
    dtypes = "+".join(dict.fromkeys(row["dtype"] for row in result["rows"]))
    modes = "+".join(dict.fromkeys(row["mode"] for row in result["rows"]))
    kind = "ablation" if result.get("ablate") is not None else "A/B"
    return f"{kind} {result['device_key']}, {dtypes} {modes}"


def render_section(result: dict[str, Any]) -> str:
    info, ver = result["machine"], result["versions"]
    key = section_key(result)
    ab = bool(result.get("ref_commit"))
    ablation = result.get("ablate") is not None
    where = key.split(" ", 1)[1] if ab or ablation else key  # the device, dtypes and modes
    title = (f"A/B: new (working tree) vs old ({result['ref_commit'][:12]}), {where}" if ab else
             f"Ablation: each fast path against what runs without it, {where}" if ablation else key)
    lines = [f"<!-- bench:begin {key} -->", f"## {title}", ""]
    lines.append(f"- date: {result['date']}")
    lines.append(f"- command: `{result['command']}`")
    if info["device"].startswith("cuda"):
        lines.append(f"- GPU: {info['gpu']} ({info['gpu_memory_gb']} GiB), CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
                     f"TF32 matmul {'on' if info['tf32_matmul'] else 'off'}; SDPA kernels: {result['sdpa']}")
    lines.append(f"- CPU: {info['cpu']} ({info['logical_cores']} logical cores, {info['affinity_cores']} usable, "
                 f"torch threads {info['torch_threads']}; flags: {info['cpu_flags'] or 'none of avx2/avx512/amx'}), "
                 f"RAM {info['memory_gb']} GiB")
    lines.append(f"- {info['platform']}; python {ver['python']}, torch {ver['torch']}, "
                 f"torchvision {ver['torchvision']}, "
                 f"timm {ver['timm']}, mvit-zoo {ver['mvit_zoo']} ({ver['mvit_zoo_commit']})")
    pk = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s ({v.get('op', 'mm')}, n={v['n']})"
                   for k, v in result["matmul_peak"].items())
    lines.append(f"- matmul peak (the faster of torch.mm and F.linear, best of several): {pk}")
    lines.append(f"- timing: median of {result['settings']['rounds']} alternating rounds after "
                 f"{result['settings']['warmup']} warm-up calls; training step = forward + cross-entropy + backward + "
                 f"{result['settings']['optimizer']} step; memory = {result['settings']['memory_method']}")
    if result["agreement"]:
        agree = "; ".join(f"{a['model']} vs {a['reference']}: {a['max_abs_diff']:.1e}" for a in result["agreement"])
        lines.append(f"- fp32 outputs agree (max |diff|, tol {result['settings']['tol']:g}): {agree}")
    pk_note = "%pk = achieved GFLOP/s (FlopCounterMode FLOPs / median time) as % of the matmul peak of that dtype."
    if ab:
        tol = result["settings"]["ab_tolerance"]
        note = (f"speedup = old ms / new ms; mem x = new peak-memory growth / old; check = ok when new is at most "
                f"{tol:.0%} slower and uses at most {tol:.0%} more peak memory. {pk_note}")
    elif ablation:
        thr = result["settings"]["gain_threshold"]
        swaps = ", ".join(f"{k} -> {v}" for k, v in ABLATIONS.items())
        note = (f"path = a fast path `mvit_zoo.ops.dispatch.select` chose in that configuration; without = the same "
                f"model and weights with it replaced by what runs in its place (the next row of select's table: "
                f"{swaps}; modules: MViT.set_memory_efficient(False)). gain = without ms / with ms; "
                f"mem x = peak-memory growth with / "
                f"without; check = pays when the path makes the model at least {thr:.0%} faster or {thr:.0%} "
                f"leaner. {pk_note}")
    else:
        note = f"speedup = reference ms / our ms; mem x = our peak-memory growth / the reference's; {pk_note}"
    lines += ["", note, "", format_table(result["rows"], ab=ab), ""]
    errs = errors_text(result["rows"])
    if errs:
        lines += ["Errors:", ""] + [f"- {e}" for e in errs] + [""]
    lines += [f"<!-- bench:end {key} -->"]
    return "\n".join(lines)


RESULTS_HEADER = """# mvit-zoo benchmark results

Generated by `benchmarks/bench.py` (see benchmarks/README.md); do not edit by hand. mvit-zoo against the
reference implementation of the same architecture with the same weights (or, in the A/B sections, the
working tree against an older revision of mvit-zoo), timed alternately in one process. One section per
device and comparison (A/B and ablation: per device, dtypes and modes); re-running the script replaces
only the section it ran for.
"""


def write_results(path: Path, result: dict[str, Any]) -> None:
    section = render_section(result)
    key = section_key(result)
    text = path.read_text() if path.exists() else ""
    first = text.find("<!-- bench:begin ")
    text = RESULTS_HEADER + ("\n" + text[first:] if first >= 0 else "")  # the header as this script writes it
    pattern = re.compile(rf"<!-- bench:begin {re.escape(key)} -->.*?<!-- bench:end {re.escape(key)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


def _ablation(value: str) -> str:
    unknown = [p for p in value.split("+") if p not in ABLATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"no path {', '.join(unknown)}; paths: {', '.join(ABLATIONS)} (a+b: both)")
    return value


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mvit_tiny", "mvit_small", "mvit_v2_s_16x4"],
                   help=f"our model names (references: {', '.join(f'{k}={v[1]}' for k, v in REFERENCES.items())})")
    p.add_argument("--batch", type=int, default=8, help="images per batch (infer and train)")
    p.add_argument("--clip-batch", type=int, default=1, help="clips per batch of video models, inference")
    p.add_argument("--train-clip-batch", type=int, default=2, help="clips per batch of video models, training step")
    p.add_argument("--modes", nargs="+", default=["infer", "latency", "train"], choices=MODES)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="bf16 = torch.autocast(bfloat16) around forward (and loss)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (minutes on a small CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--contention", type=int, default=0, metavar="N",
                   help="run N busy processes (one core each) beside the timing (default: 0)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per implementation before timing (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--min-round-time", type=float, default=0.5,
                   help="seconds per implementation per round (iterations per round chosen from the warm-up time)")
    p.add_argument("--memory", choices=["eager", "all", "none"], default="eager",
                   help="measure peak memory (each in a fresh subprocess) for eager runs, all runs or none")
    p.add_argument("--memory-procs", choices=["config", "impl"], default=None,
                   help="fresh process per configuration (default), or one per model implementation measuring its "
                        "configurations one after the other with the peak reset in between (default with --quick)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer of the training step")
    p.add_argument("--sdpa", choices=["auto", "default", "flash", "efficient", "cudnn", "math"], default="auto",
                   help="SDPA kernels for our attention: auto = flash/memory-efficient/cuDNN only on CUDA "
                        "(error rather than a silent math fallback), PyTorch's choice on CPU")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA in fp32 runs")
    p.add_argument("--tol", type=float, default=1e-4, help="max |ours - reference| of the fp32 outputs")
    p.add_argument("--ref-commit", default=None, metavar="REV",
                   help="A/B: the reference is mvit-zoo at git revision REV (any registered model), with the "
                        "working tree's weights")
    p.add_argument("--ab-tolerance", type=float, default=0.05,
                   help="A/B check: new may be this much slower / use this much more peak memory than old")
    p.add_argument("--ablate", nargs="*", default=None, metavar="PATH", type=_ablation,
                   help="time each fast path (all of them, or those named; a+b: both at once) against the same "
                        "model without it, in every configuration where the dispatch chooses it (see ABLATIONS)")
    p.add_argument("--gain-threshold", type=float, default=0.03,
                   help="ablation check: a path pays when it saves this much time or peak memory")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny models (depths 1,1,1,1, dim 16, 32x32 / 4x32x32), 2 rounds, no RESULTS.md")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file to update (default benchmarks/RESULTS.md; not written with --quick "
                        "unless given)")
    p.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    p.add_argument("--child-timeout", type=int, default=1800, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.warmup is None:
        args.warmup = 5 if args.device.startswith("cuda") else 1
    if args.memory_procs is None:
        args.memory_procs = "impl" if args.quick else "config"
    if args.ref_commit and args.child is None:
        args.ref_commit = resolve_commit(args.ref_commit)
    if args.ablate is not None and args.ref_commit:
        p.error("--ablate times the working tree against itself; it takes no --ref-commit")
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.warmup = min(args.warmup, 1)
        args.min_round_time = 0.0
    return args


# one busy core until the deadline (argv[1], seconds from now) or until it is killed
SPIN_CODE = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nx = 0\nwhile time.monotonic() < end:\n" \
            "    x = (x * 31 + 7) % 1000003\n"


@contextlib.contextmanager
def contention(processes: int, seconds: float):
    """`processes` busy processes beside the block (each spins on one core for at most `seconds`); stopped at exit."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN_CODE, str(seconds)]) for _ in range(processes)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        print("CHILD_RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0
    if args.contention and args.results is None:
        args.no_results = True  # a loaded machine's numbers do not replace the quiet machine's section
    with contention(args.contention, args.child_timeout * 4):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    command = "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in argv)
    info = machine_info(device, args.threads)
    result: dict[str, Any] = dict(
        schema=2, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), command=command,
        machine=info, versions=versions(), device_key=device_key(info), quick=args.quick, ref_commit=args.ref_commit,
        ablate=args.ablate,
        sdpa=args.sdpa, settings=dict(rounds=args.rounds, warmup=args.warmup, optimizer=args.optimizer, tol=args.tol,
                                      min_round_time=args.min_round_time, threads=args.threads,
                                      contention=args.contention,
                                      ab_tolerance=args.ab_tolerance, gain_threshold=args.gain_threshold,
                                      memory_method=("torch.cuda.max_memory_allocated growth" if device.type == "cuda"
                                                     else "peak RSS growth (VmHWM) in a fresh subprocess")),
        matmul_peak={}, agreement=[], rows=[],
    )
    print(f"# {result['device_key']} | torch {result['versions']['torch']}, timm {result['versions']['timm']}, "
          f"torchvision {result['versions']['torchvision']} | {command}"
          + (f" | {args.contention} busy processes beside it" if args.contention else ""), flush=True)
    for dtype in args.dtypes:
        result["matmul_peak"][dtype] = matmul_peak(device, dtype, args.quick)
        print(f"matmul peak {dtype}: {result['matmul_peak'][dtype]['gflops']:.1f} GFLOP/s "
              f"(n={result['matmul_peak'][dtype]['n']})", flush=True)

    pk = result["matmul_peak"]
    if "bf16" in pk and "fp32" in pk and pk["bf16"]["gflops"] < 0.2 * pk["fp32"]["gflops"]:
        print(f"WARNING: bf16 matmuls run at {pk['bf16']['gflops']:.1f} GFLOP/s here, "
              f"{pk['fp32']['gflops'] / pk['bf16']['gflops']:.0f}x slower than fp32 (no native bf16 instructions: "
              f"{info['cpu_flags'] or 'no avx512/amx'}); bf16 rows will take that much longer", flush=True)

    for name in args.models:
        t0 = time.perf_counter()
        if args.ablate is not None:
            torch.manual_seed(0)
            ours = build_ours(name, args.quick).to(device)
            pair = Pair(name=name, ref_name="mvit-zoo without a path", ours=ours, ref=ours,
                        input_shape=input_shape_for(name, args.quick), num_classes=num_classes_for(name, args.quick),
                        is_video=is_video(name))
            agree = dict(ok=True)
        else:
            pair = build_pair(name, quick=args.quick, ref_commit=args.ref_commit)
            pair.ours.to(device)
            pair.ref.to(device)
            agree = check_agreement(pair, device, args.tol, args.clip_batch if pair.is_video else args.batch)
            result["agreement"].append(agree)
            print(f"{name} vs {pair.ref_name}: fp32 max|diff| {agree['max_abs_diff']:.2e} (tol {args.tol:g}) "
                  f"{'ok' if agree['ok'] else 'MISMATCH'} [built in {time.perf_counter() - t0:.1f}s]", flush=True)
        if not agree["ok"]:
            print(f"ABORT: {name} and {pair.ref_name} disagree; timings would compare different computations",
                  file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
            return 2
        # FLOPs at the timed batch sizes (once per mode, ours and reference separately; %pk uses the reference's)
        flops: dict[Any, Optional[float]] = {}
        for mode in args.modes:
            b = batch_for(pair.is_video, mode, args)
            xf = torch.randn((b,) + pair.input_shape, device=device)
            flops[("ours", mode)] = count_flops(pair.ours, mode, "fp32", xf, pair.num_classes, args)
            if pair.ref is not pair.ours:
                flops[("ref", mode)] = count_flops(pair.ref, mode, "fp32", xf, pair.num_classes, args)
        models = {"ours": pair.ours, "ref": pair.ref}
        if args.ablate is not None:
            for mode in args.modes:
                for dtype in args.dtypes:
                    for path in ablation_paths(pair, mode, dtype, device, args):
                        row = bench_config(pair, models, mode, dtype, False, device, args, flops,
                                           result["matmul_peak"], without=path)
                        result["rows"].append(row)
                        print(f"  {name} {mode} {dtype} {path} batch {row['batch']}: with "
                              f"{_fmt(row['ours'].get('ms'), '.1f', row['ours'].get('error', '-'))} ms, without "
                              f"{_fmt(row['ref'].get('ms'), '.1f', row['ref'].get('error', '-'))} ms, gain "
                              f"{_fmt(row['speedup'], '.2f')}", flush=True)
            add_memory([r for r in result["rows"] if r["model"] == name], args)
            del pair, models, ours
            gc.collect()
            continue
        compiled_models: dict[str, nn.Module] = {}
        if args.compile:
            for impl, m in models.items():
                compiled_models[impl] = torch.compile(m)
        for compiled in ([False, True] if args.compile else [False]):
            for mode in args.modes:
                if mode == "latency" and (args.clip_batch if pair.is_video else args.batch) == 1:
                    continue  # the infer rows already are batch 1
                for dtype in args.dtypes:
                    fl = max(flops.get(("ours", mode)) or 0.0, flops.get(("ref", mode)) or 0.0)
                    if fl and not args.quick:
                        calls = 2 * (args.warmup + args.rounds)
                        est = fl / (pk[dtype]["gflops"] * 1e9) * calls
                        print(f"  {name} {mode} {dtype}{' compiled' if compiled else ''}: {fl / 1e9:.1f} GFLOP "
                              f"per call; timing takes at least ~{est:.0f}s at the matmul peak", flush=True)
                    row = bench_config(pair, compiled_models if compiled else models, mode, dtype, compiled,
                                       device, args, flops, result["matmul_peak"])
                    if compiled:
                        eager = next((r for r in result["rows"] if r["model"] == name and r["mode"] == mode
                                      and r["dtype"] == dtype and not r["compiled"]), None)
                        if eager and "ms" in eager["ours"] and "ms" in row["ours"]:
                            row["ours_compiled_speedup"] = eager["ours"]["ms"] / row["ours"]["ms"]
                        if eager and "ms" in eager["ref"] and "ms" in row["ref"]:
                            row["ref_compiled_speedup"] = eager["ref"]["ms"] / row["ref"]["ms"]
                    result["rows"].append(row)
                    o, f = row["ours"], row["ref"]
                    a, b = ("new", "old") if args.ref_commit else ("ours", "reference")
                    print(f"  {name} {mode} {dtype}{' compiled' if compiled else ''} batch {row['batch']}: {a} "
                          f"{_fmt(o.get('ms'), '.1f', o.get('error', '-'))} ms, {b} "
                          f"{_fmt(f.get('ms'), '.1f', f.get('error', '-'))} ms, speedup {_fmt(row['speedup'], '.2f')}",
                          flush=True)
        del compiled_models
        t0 = time.perf_counter()
        add_memory([r for r in result["rows"] if r["model"] == name], args)
        if args.memory != "none":
            print(f"  peak memory measured in fresh processes in {time.perf_counter() - t0:.0f}s", flush=True)
        del pair, models
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(result["rows"], ab=bool(args.ref_commit)))
    for note in errors_text(result["rows"]):
        print("error:", note)
    for r in result["rows"]:
        if r.get("ours_compiled_speedup") or r.get("ref_compiled_speedup"):
            print(f"compiled vs eager, {r['model']} {r['mode']} {r['dtype']}: ours "
                  f"{_fmt(r.get('ours_compiled_speedup'), '.2f')}x, "
                  f"reference {_fmt(r.get('ref_compiled_speedup'), '.2f')}x")
    if args.ref_commit:
        checked = [r for r in result["rows"] if "ab_ok" in r]
        result["ab_ok"] = bool(checked) and all(r["ab_ok"] for r in checked)
        print(f"A/B (new within {args.ab_tolerance:.0%} of old in time and peak memory): "
              f"{'all rows hold' if result['ab_ok'] else 'NOT all rows hold'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    out = args.results if args.results is not None else (None if args.quick else HERE / "RESULTS.md")
    if out is not None and not args.no_results:
        write_results(out, result)
        print(f"wrote {out} (section '{section_key(result)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
