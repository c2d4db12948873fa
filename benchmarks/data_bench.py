#!/usr/bin/env python
"""Video input pipeline benchmark: training clips and validation views per second per worker, and peak RSS.

Three kinds of generated files (written once with PyAV into a cache folder next to `--out`):

    kinetics   Kinetics-like: 10 s, 30 fps, 340x256, H.264 (libx264), a keyframe every 2 s, B-frames, MP4
    ssv2       Something-Something-v2-like: 2-5 s, 12 fps, 427x240, VP9 in WebM (encoder's keyframe spacing)
    long       60 s, 30 fps, 1280x720, H.264, a keyframe every 2 s, B-frames, MP4

Training loaders, each from a file path to the model's training input, a `(3, 16, 224, 224)` float clip (16 frames,
sampling rate 4 at 30 fps, Kinetics MViTv2 augmentation: RandAugment, random resized crop, flip, random erasing):

    ours-pyav, ours-torchcodec   the working tree: :func:`ours_train_clip` (seeking reader, one backend each)
    today                        `mvit_zoo.data.video.load_clip` at `--ref-commit` (decodes every frame of the file)
    pytorchvideo                 `EncodedVideo.from_path(decoder='pyav').get_clip` + `UniformTemporalSubsample(16)`

The three apply the working tree's `mvit_zoo.data.augment.TrainClipTransform` to the frames they decode, so they
differ in decoding and sampling only. Validation loaders (`mvit-zoo validate`'s 5x1 views of a video:
`mvit_zoo.evaluation.decode_views` + `ViewSampling.iter_views`): ours (working tree) and today (`--ref-commit`).

Each (loader, file kind) runs in its own worker process (this script with `--worker`), started fresh for the kind
and fed commands on stdin, with torch at one thread as in a DataLoader worker; its peak RSS is its own: the growth
of VmHWM (reset after the imports) over the RSS after the imports. The reference commit is checked out with
`git worktree add --detach` under the output folder and imported there through `sys.path`; the worktree is removed
at the end. Within a round the loaders run one after another (A B C ..., never at once), `--rounds` rounds; the
tables give medians over rounds and the ratios ours / today and ours / pytorchvideo.

    python benchmarks/data_bench.py --rounds 3 --out /tmp/data_bench/data_bench.json --results benchmarks/RESULTS.md
    python benchmarks/data_bench.py --quick   # tiny files, one round: a smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # host beside this file
    sys.path.insert(0, str(HERE))

import host  # noqa: E402

NUM_FRAMES = 16
SAMPLING_RATE = 4
TARGET_FPS = 30.0
CROP = (224, 224)
MEAN = (0.45, 0.45, 0.45)  # Kinetics MViTv2 statistics
STD = (0.225, 0.225, 0.225)
VIEWS = (5, 1)  # the Kinetics test views of mvit_v2_s_16x4.fb_k400
SHORT_SIDE = 256  # finetune's frames before augmentation: TRAIN_JITTER_SCALES[0], SlowFast's max_spatial_scale
TEST_SHORT_SIDE = 256  # its one-crop test resize: 224 / crop_pct 0.875

TRAIN_LOADERS = ("ours-pyav", "ours-torchcodec", "today", "pytorchvideo")
VAL_LOADERS = ("ours", "today")
# NOTE: today's training loader decodes every frame of a file; on the 60 s 720p file that is ~36 s and ~10 GB per
# clip, so it reads one clip of that file, in the first round only
ONE_CLIP = {("train", "today", "long")}
MARK = "@@data_bench "  # prefix of the worker's protocol lines on stdout (libraries may print other lines)
DEFAULT_OUT = Path(tempfile.gettempdir()) / "mvit-zoo-data-bench" / "data_bench.json"


@dataclass(frozen=True)
class FileKind:
    """One kind of generated video file: `durations` (seconds) has one entry per file."""

    name: str
    title: str
    durations: Tuple[float, ...]
    fps: int
    size: Tuple[int, int]  # width, height
    codec: str
    suffix: str
    gop: Optional[int]  # frames between keyframes; None: the encoder's default
    bframes: Optional[int]
    clips: int  # training clips per round (the files in turn)

    @property
    def folder(self) -> str:
        width, height = self.size
        return f"{self.name}-{width}x{height}-{self.fps}fps-{self.codec}-g{self.gop}-bf{self.bframes}"


def file_kinds(quick: bool) -> Dict[str, FileKind]:
    """The generated file kinds; `quick`: two tiny files of each."""
    if quick:
        kinds = [FileKind("kinetics", "Kinetics-like (tiny)", (2.0, 2.5), 30, (96, 72), "libx264", ".mp4", 30, 2, 2),
                 FileKind("ssv2", "SSv2-like (tiny)", (1.0, 1.5), 12, (107, 60), "libvpx-vp9", ".webm", None, None,
                          2),
                 FileKind("long", "long (tiny)", (4.0, 4.0), 30, (160, 90), "libx264", ".mp4", 60, 2, 2)]
    else:
        kinds = [FileKind("kinetics", "Kinetics-like, 10 s 30 fps 340x256 H.264 (g=60, B-frames)", (10.0,) * 8, 30,
                          (340, 256), "libx264", ".mp4", 60, 2, 8),
                 FileKind("ssv2", "SSv2-like, 2-5 s 12 fps 427x240 VP9 WebM",
                          tuple(round(2 + 3 * i / 7, 2) for i in range(8)), 12, (427, 240), "libvpx-vp9", ".webm",
                          None, None, 8),
                 FileKind("long", "60 s 30 fps 1280x720 H.264 (g=60, B-frames)", (60.0,), 30, (1280, 720), "libx264",
                          ".mp4", 60, 2, 3)]
    return {k.name: k for k in kinds}


# --------------------------------------------------------------------------------------------------
# Generated files
# --------------------------------------------------------------------------------------------------

def _textures(width: int, height: int, seed: int) -> Tuple[Any, Any]:
    """Two smooth random RGB textures of twice the frame size (uint16, to add without overflow)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)

    def texture(cell: int) -> Any:
        small = torch.rand(1, 3, 2 * height // cell + 2, 2 * width // cell + 2, generator=generator) * 255
        big = F.interpolate(small, size=(2 * height, 2 * width), mode="bicubic", align_corners=False)
        return big.clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint16)

    return texture(16), texture(48)


def write_video(path: Path, kind: FileKind, duration: float, seed: int) -> None:
    """Encode `duration` seconds of two textures panning across each other (a moving, not trivially coded pattern).

    At 720p the H.264 file runs at ~3.5 Mb/s (crf 26), about a web video's rate.
    """
    import av
    import numpy as np

    width, height = kind.size
    fine, coarse = _textures(width, height, seed)
    options = {"libx264": {"crf": "26", "preset": "veryfast", "sc_threshold": "0"},
               "libvpx-vp9": {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}}[kind.codec]
    if kind.gop is not None:
        options.update(g=str(kind.gop), keyint_min=str(kind.gop))
    if kind.bframes is not None:
        options["bf"] = str(kind.bframes)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(kind.codec, rate=kind.fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(duration * kind.fps)):
            x, y = (5 * i) % width, (2 * i) % height
            x2, y2 = width - 1 - (3 * i) % width, i % height
            frame = (fine[y:y + height, x:x + width] + coarse[y2:y2 + height, x2:x2 + width]) >> 1
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())


def generate_files(cache: Path, kinds: Dict[str, FileKind]) -> Dict[str, List[Path]]:
    """The files of each kind under `cache/<kind's folder>/`, written once (an existing file is reused)."""
    files: Dict[str, List[Path]] = {}
    for kind in kinds.values():
        folder = cache / kind.folder
        folder.mkdir(parents=True, exist_ok=True)
        files[kind.name] = []
        for i, duration in enumerate(kind.durations):
            path = folder / f"{i}-{duration:g}s{kind.suffix}"
            if not path.exists():
                t0 = time.perf_counter()
                partial = folder / f".partial-{path.name}"
                write_video(partial, kind, duration, seed=i)
                os.replace(partial, path)
                print(f"  wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f}s)",
                      flush=True)
            files[kind.name].append(path)
    return files


# --------------------------------------------------------------------------------------------------
# The reference commit's worktree
# --------------------------------------------------------------------------------------------------

def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


class RefWorktree:
    """`git worktree add --detach` of `commit` under `parent` for the length of a `with`; removed at its end.

    A worktree at that path left by an interrupted run (registered with git, at the same commit) is reused and
    removed; any other file or folder there is refused, never touched.
    """

    def __init__(self, commit: str, parent: Path) -> None:
        try:
            self.commit = _git("rev-parse", "--verify", commit + "^{commit}")
        except RuntimeError:
            raise SystemExit(f"--ref-commit {commit}: not a commit of this repository ({ROOT}); pass a revision "
                             f"`git log` shows (a shallow clone may lack it: git fetch --unshallow)") from None
        self.path = (parent / f"ref-{self.commit[:12]}").resolve()

    def _registered(self) -> bool:
        listing = _git("worktree", "list", "--porcelain")
        return any(line == f"worktree {self.path}" for line in listing.splitlines())

    def __enter__(self) -> RefWorktree:
        if self.path.exists():
            head = subprocess.run(["git", "-C", str(self.path), "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
            if not (self._registered() and head == self.commit):
                raise SystemExit(f"{self.path} exists and is not this script's worktree of {self.commit[:12]}; "
                                 f"move it away or pass another --out folder")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _git("worktree", "add", "--detach", str(self.path), self.commit)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._registered():
            _git("worktree", "remove", "--force", str(self.path))


# --------------------------------------------------------------------------------------------------
# Loaders (run in the worker processes)
# --------------------------------------------------------------------------------------------------

def _now() -> float:
    return time.perf_counter()


# --augment: the training augmentation every loader applies. recipe: `finetune --recipe k400`'s (RandAugment,
# random resized crop, flip, random erasing); default: finetune's without a recipe (random resized crop, flip)
AUGMENTATIONS = {
    "recipe": ("rand-m7-n4-mstd0.5-inc1, random resized crop, flip, random erasing 0.25 (finetune --recipe k400)",
               {}),
    "default": ("random resized crop, flip (finetune's default, no --recipe)", {"auto_augment": None, "re_prob": 0.0}),
}


def _augmentation(name: str = "recipe") -> Callable[[Any, random.Random], Any]:
    """The working tree's training augmentation `name` (AUGMENTATIONS), loaded from its file (no package import),
    so a worker importing the reference commit's `mvit_zoo` applies the same one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_bench_augment", ROOT / "mvit_zoo" / "data" / "augment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TrainClipTransform(CROP, MEAN, STD, **AUGMENTATIONS[name][1])


def ours_train_clip(path: str, rng: random.Random, backend: Optional[str] = None,
                    stages: Optional[Dict[str, float]] = None, transform: Optional[Callable] = None) -> Any:
    """One training clip as finetune makes it (`mvit_zoo.data.video.VideoClips`): probe -> SlowFast's clip
    sampling -> seeking read of those frames -> short side down to the jitter minimum (256) -> augmentation.
    Returns `(3, 16, 224, 224)` float; `stages` accumulates the seconds of reading and augmenting."""
    from mvit_zoo.data.video import VideoClips

    stages = stages if stages is not None else {}
    augment = transform or _augmentation()
    spent = [0.0]

    def timed(frames: Any, clip_rng: random.Random) -> Any:
        t0 = _now()
        out = augment(frames, clip_rng)
        spent[0] += _now() - t0
        return out

    dataset = VideoClips([(path, 0)], NUM_FRAMES, SAMPLING_RATE, timed, target_fps=TARGET_FPS, backend=backend,
                         short_side=SHORT_SIDE)
    random.seed(rng.getrandbits(64))  # VideoClips draws from the generator EpochSeeded seeds per sample
    t0 = _now()
    clip, _ = dataset[0]
    total = _now() - t0
    stages["read"] = stages.get("read", 0.0) + total - spent[0]
    stages["augment"] = stages.get("augment", 0.0) + spent[0]
    return clip


def _profile_reader(stages: Dict[str, float]) -> None:
    """Time the PyAV reader's decoding and RGB conversion inside `read` (its `_decode` / `_to_rgb` hooks)."""
    from mvit_zoo.data import reader

    decode, to_rgb = reader._decode, reader._to_rgb

    def timed_decode(container: Any, stream: Any) -> Any:
        frames = decode(container, stream)
        while True:
            t0 = _now()
            frame = next(frames, None)
            stages["decode"] = stages.get("decode", 0.0) + _now() - t0
            if frame is None:
                return
            stages["frames_decoded"] = stages.get("frames_decoded", 0.0) + 1
            yield frame

    def timed_rgb(frame: Any) -> Any:
        t0 = _now()
        out = to_rgb(frame)
        stages["rgb"] = stages.get("rgb", 0.0) + _now() - t0
        return out

    reader._decode, reader._to_rgb = timed_decode, timed_rgb


def _ptv_subsample() -> Callable[[Any], Any]:
    # NOTE: pytorchvideo 0.1.5's transforms import torchvision.transforms.functional_tensor, which torchvision 0.17
    # renamed _functional_tensor; the alias lets `pytorchvideo.transforms` import (this process only)
    import torchvision.transforms._functional_tensor as functional_tensor

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
    from pytorchvideo.transforms import UniformTemporalSubsample

    return UniformTemporalSubsample(NUM_FRAMES)


def _read_then_augment(stages: Dict[str, float], read: Callable[[], Any],
                       transform: Callable[[Any, random.Random], Any], rng: random.Random) -> Any:
    """`transform(read(), rng)`, the seconds of each added to `stages['read']` and `stages['augment']`."""
    t0 = _now()
    frames = read()
    t1 = _now()
    out = transform(frames, rng)
    stages["read"] = stages.get("read", 0.0) + t1 - t0
    stages["augment"] = stages.get("augment", 0.0) + _now() - t1
    return out


def make_loader(spec: Dict[str, Any], stages: Dict[str, float]) -> Callable[[str, random.Random], Any]:
    """The loader a worker runs: `fn(path, rng) -> tensor` (a training clip, or a video's stacked views)."""
    import torch

    task, loader = spec["task"], spec["loader"]
    if task == "val":
        from mvit_zoo.data.views import Views, ViewSampling
        from mvit_zoo.evaluation import decode_views

        sampling = ViewSampling(num_frames=NUM_FRAMES, crop_size=CROP, views=Views(*VIEWS),
                                sampling_rate=SAMPLING_RATE, crop_pct=CROP[0] / TEST_SHORT_SIDE, mean=MEAN, std=STD)

        def val_video(path: str, rng: random.Random) -> Any:
            t0 = _now()
            frames, clips, _ = decode_views(path, sampling)
            t1 = _now()
            views = torch.stack(list(sampling.iter_views(frames, clips)))
            stages["decode_views"] = stages.get("decode_views", 0.0) + t1 - t0
            stages["iter_views"] = stages.get("iter_views", 0.0) + _now() - t1
            return views

        return val_video
    transform = _augmentation(spec.get("augment", "recipe"))
    if loader.startswith("ours-"):
        backend = loader.split("-", 1)[1]
        if spec.get("profile") and backend == "pyav":
            _profile_reader(stages)
        return lambda path, rng: ours_train_clip(path, rng, backend, stages, transform)
    if loader == "today":
        from mvit_zoo.data.video import load_clip

        def today_frames(path: str) -> Any:
            return load_clip(path, NUM_FRAMES, SAMPLING_RATE, random_start=True)  # its torch.randint start

        return lambda path, rng: _read_then_augment(stages, lambda: today_frames(path), transform, rng)
    if loader == "pytorchvideo":
        from pytorchvideo.data.encoded_video import EncodedVideo

        subsample = _ptv_subsample()

        def ptv_frames(path: str, rng: random.Random) -> Any:
            video = EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")
            span = NUM_FRAMES * SAMPLING_RATE / TARGET_FPS
            start = rng.uniform(0, max(float(video.duration) - span, 0.0))
            clip = video.get_clip(start, start + span)["video"]  # (C, T, H, W) float in [0, 255]
            video.close()
            return subsample(clip).permute(1, 2, 3, 0).to(torch.uint8)  # (16, H, W, C), the decoded values

        return lambda path, rng: _read_then_augment(stages, lambda: ptv_frames(path, rng), transform, rng)
    raise ValueError(f"unknown loader {loader!r}")


# --------------------------------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------------------------------

def _emit(**message: Any) -> None:
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(spec: Dict[str, Any]) -> int:
    """Serve one loader: import it from `spec['tree']`, then run the clips of each command read from stdin."""
    t0 = _now()
    sys.path.insert(0, spec["tree"])
    try:
        import torch

        torch.set_num_threads(1)  # as in a DataLoader worker
        stages: Dict[str, float] = {}
        fn = make_loader(spec, stages)
        import mvit_zoo
    except Exception as e:  # noqa: BLE001 - an unusable loader is reported in its row, not fatal
        _emit(ready=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        return 1
    module = str(Path(mvit_zoo.__file__).resolve())
    if not module.startswith(str(Path(spec["tree"]).resolve()) + os.sep):
        _emit(ready=False, error=f"imported mvit_zoo from {module}, not from {spec['tree']}")
        return 1
    _emit(ready=True, import_s=_now() - t0, rss_mb=host.status_mb("VmRSS"), mvit_zoo=module)
    reset, base = host.reset_peak(), host.status_mb("VmRSS")
    shape = None
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            break
        if command["op"] == "reset":  # a new file kind in a process that serves several (--quick)
            reset, base = host.reset_peak(), host.status_mb("VmRSS")
            _emit(ok=True)
            continue
        stages.clear()
        times = []
        try:
            for path, seed in command["clips"]:
                rng = random.Random(seed)
                torch.manual_seed(seed)
                t = _now()
                out = fn(path, rng)
                times.append(_now() - t)
                shape = list(out.shape)
        except Exception as e:  # noqa: BLE001
            _emit(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            continue
        _emit(times=times, stages=dict(stages), shape=shape, peak_mb=host.peak_mb(), base_mb=base,
              peak_reset=reset)
    return 0


class Worker:
    """A worker process of one (task, loader); its stderr goes to `log`."""

    def __init__(self, spec: Dict[str, Any], log: Path) -> None:
        self.spec, self.log = spec, log
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._stderr = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=env, cwd=ROOT)
        self.error: Optional[str] = None
        self.info: Dict[str, Any] = {}

    def _reply(self) -> Dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        tail = self.log.read_text()[-1500:] if self.log.exists() else ""
        raise RuntimeError(f"worker exited (code {self.proc.returncode}); stderr ({self.log}): {tail}")

    def ready(self) -> bool:
        try:
            self.info = self._reply()
        except RuntimeError as e:
            self.info = {"ready": False, "error": str(e)}
        if not self.info.get("ready"):
            self.error = self.info.get("error", "did not start")
            if self.info.get("traceback"):
                self._stderr.write(self.info["traceback"])
        return self.error is None

    def run(self, command: Dict[str, Any]) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            self.error = reply["error"]
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def loader_specs(args: argparse.Namespace, ref_tree: str) -> List[Dict[str, Any]]:
    """The (task, loader) workers, in the order they take turns within a round."""
    specs = []
    for loader in TRAIN_LOADERS:
        if loader.startswith("ours-") and loader.split("-", 1)[1] not in args.decoders:
            continue
        tree = ref_tree if loader == "today" else str(ROOT)
        specs.append(dict(task="train", loader=loader, tree=tree, profile=args.profile, augment=args.augment))
    for loader in VAL_LOADERS:
        specs.append(dict(task="val", loader=loader, tree=ref_tree if loader == "today" else str(ROOT)))
    return specs


def clip_plan(kind: FileKind, files: List[Path], task: str, loader: str, round_: int) -> List[Tuple[str, int]]:
    """`(file, seed)` of the clips a loader reads in a round: training takes `kind.clips` clips, the files in
    turn; validation reads every file once. The same seeds for every loader."""
    if (task, loader, kind.name) in ONE_CLIP:
        return [(str(files[0]), 0)] if round_ == 0 else []
    count = kind.clips if task == "train" else len(files)
    return [(str(files[i % len(files)]), 1000 * round_ + i) for i in range(count)]


def _start(specs: List[Dict[str, Any]], logs: Path, kind: str) -> List[Worker]:
    workers = [Worker(spec, logs / f"{spec['task']}-{spec['loader']}-{kind}.log") for spec in specs]
    for w in workers:  # they import at once; waiting on each in turn
        if not w.ready():
            print(f"  {w.spec['task']} {w.spec['loader']}: not run ({w.error})", flush=True)
    return workers


def run_kind(kind: FileKind, files: List[Path], workers: List[Worker], rounds: int,
             records: Dict[Tuple[str, str, str], Dict[str, Any]]) -> None:
    """Warm-up, then `rounds` rounds of every worker in turn on `kind`'s files; replies go to `records`."""
    for w in workers:
        key = (w.spec["task"], w.spec["loader"], kind.name)
        record = records.setdefault(key, {"rounds": [], "error": w.error, "import_s": w.info.get("import_s"),
                                          "worker_rss_mb": w.info.get("rss_mb")})
        if w.error is None and key not in ONE_CLIP:  # one untimed clip: lazy imports and first allocations
            reply = w.run({"op": "clips", "clips": clip_plan(kind, files, *key[:2], 0)[:1]})
            record["error"] = reply.get("error")
    for r in range(rounds):
        for w in workers:
            key = (w.spec["task"], w.spec["loader"], kind.name)
            plan = clip_plan(kind, files, *key[:2], r)
            if w.error is not None or not plan:
                records[key]["error"] = w.error
                continue
            reply = w.run({"op": "clips", "clips": plan})
            if "error" in reply:
                records[key]["error"] = reply["error"]
                continue
            records[key]["rounds"].append(reply)
            per_s = len(reply["times"]) / sum(reply["times"])
            print(f"  round {r + 1} {kind.name:8s} {key[0]:5s} {key[1]:16s} {per_s:7.2f}/s  peak RSS growth "
                  f"{reply['peak_mb'] - reply['base_mb']:6.0f} MB", flush=True)


def summarize(records: Dict[Tuple[str, str, str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (task, loader, kind): median items/s over rounds, peak RSS and growth, stage medians (ms/item)."""
    rows = []
    for (task, loader, kind), rec in records.items():
        row: Dict[str, Any] = dict(task=task, loader=loader, kind=kind, error=rec["error"],
                                   import_s=rec["import_s"], worker_rss_mb=rec["worker_rss_mb"])
        if rec["rounds"]:
            per_round = [len(x["times"]) / sum(x["times"]) for x in rec["rounds"]]
            last = rec["rounds"][-1]  # VmHWM is the peak since the reset after the imports: the last is the highest
            stage_ms = {}
            for name in rec["rounds"][0]["stages"]:
                stage_ms[name] = statistics.median(x["stages"].get(name, 0.0) / len(x["times"]) for x in rec["rounds"])
                if name != "frames_decoded":
                    stage_ms[name] *= 1000
            row.update(per_s=statistics.median(per_round), per_s_rounds=per_round,
                       items=sum(len(x["times"]) for x in rec["rounds"]), rounds=len(rec["rounds"]),
                       ms_per_item=1000 / statistics.median(per_round), peak_rss_mb=last["peak_mb"],
                       base_rss_mb=last["base_mb"], rss_growth_mb=last["peak_mb"] - last["base_mb"],
                       peak_reset=last["peak_reset"], stages_ms=stage_ms, output_shape=last["shape"],
                       times_s=[x["times"] for x in rec["rounds"]])
        rows.append(row)
    return rows


def ratios(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """ours / today and ours / pytorchvideo items per second, per task and kind (ours: each decoder)."""
    by = {(r["task"], r["loader"], r["kind"]): r.get("per_s") for r in rows}
    out: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {"train": {}, "val": {}}
    for task, kind in dict.fromkeys((r["task"], r["kind"]) for r in rows):
        entry = out[task].setdefault(kind, {})
        ours = [lo for lo in (TRAIN_LOADERS if task == "train" else VAL_LOADERS)
                if lo.startswith("ours") and (task, lo, kind) in by]
        for mine in ours:
            for other in ("today", "pytorchvideo") if task == "train" else ("today",):
                a, b = by.get((task, mine, kind)), by.get((task, other, kind))
                entry[f"{mine}/{other}"] = a / b if a and b else None
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def host_info() -> Dict[str, Any]:
    return dict(cpu=host.cpu_name(), logical_cores=os.cpu_count(), usable_cores=host.usable_cores(),
                memory_gb=host.memory_gb(), platform=platform.platform())


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "av", "torchcodec", "pytorchvideo", "timm", "numpy", "PIL"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - not installed, or not importable here
            out[name] = None
    commit = None
    with contextlib.suppress(Exception):
        commit = _git("rev-parse", "--short", "HEAD")
        if _git("status", "--porcelain", "--", "mvit_zoo"):
            commit += " (mvit_zoo/ modified)"
    out["mvit_zoo_commit"] = commit
    return out


def section_key(result: Dict[str, Any]) -> str:
    machine, augment = result["host"], result.get("augment", "recipe")
    cores = f"data cpu: {machine['cpu']}, {machine['usable_cores']} cores"
    return cores + ("" if augment == "recipe" else f", {augment}")


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(head: List[str], lines: List[List[str]]) -> List[str]:
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return out + ["| " + " | ".join(c.ljust(w) for c, w in zip(ln, widths)) + " |" for ln in lines]


def format_tables(result: Dict[str, Any]) -> List[str]:
    """The training, validation and stage tables (markdown lines)."""
    rows = {(r["task"], r["loader"], r["kind"]): r for r in result["rows"]}
    kinds = list(result["files"])

    def cell(task: str, loader: str, kind: str, field: str, spec: str) -> str:
        r = rows.get((task, loader, kind))
        if r is None:
            return "-"
        if r.get("error") and field not in r:
            return "err"
        text = _fmt(r.get(field), spec)
        if (task, loader, kind) in ONE_CLIP and field == "per_s":
            text += " (1 clip)"
        return text

    out: List[str] = []
    for task, loaders, unit in (("train", [lo for lo in TRAIN_LOADERS if any(k[:2] == ("train", lo) for k in rows)],
                                 "clips/s"), ("val", list(VAL_LOADERS), "videos/s")):
        names = [lo.replace("ours-", "ours ") for lo in loaders]
        ratio_keys = [k for k in next(iter(result["ratios"][task].values()), {})]
        head = (["files"] + [f"{n} {unit}" for n in names] + [k.replace("ours-", "") for k in ratio_keys]
                + [f"{n} MB" for n in names])
        lines = []
        for kind in kinds:
            lines.append([kind] + [cell(task, lo, kind, "per_s", ".2f") for lo in loaders]
                         + [_fmt(result["ratios"][task].get(kind, {}).get(k), ".2f") + "x"
                            if result["ratios"][task].get(kind, {}).get(k) else "-" for k in ratio_keys]
                         + [cell(task, lo, kind, "rss_growth_mb", ".0f") for lo in loaders])
        title = ("Training clips (decode + sample + augment to (3, 16, 224, 224)), per worker process"
                 if task == "train" else
                 f"Validation, {VIEWS[0]}x{VIEWS[1]} views per video (decode_views + iter_views), per worker process")
        out += [f"{title}:", ""] + _table(head, lines) + [""]
    stage_head = ["files", "loader", "ms/clip", "read", "augment"]
    if any("decode" in r.get("stages_ms", {}) for r in result["rows"]):
        stage_head += ["read: decode", "read: rgb", "read: seek + rest", "frames decoded"]
    lines = []
    for kind in kinds:
        for loader in TRAIN_LOADERS:
            r = rows.get(("train", loader, kind))
            if r is None or "stages_ms" not in r:
                continue
            s = r["stages_ms"]
            line = [kind, loader, _fmt(r["ms_per_item"], ".0f")] + [_fmt(s.get(n), ".1f") for n in stage_head[3:5]]
            if len(stage_head) > 5:
                rest = s["read"] - s.get("decode", 0.0) - s.get("rgb", 0.0) if "decode" in s else None
                line += [_fmt(s.get("decode"), ".1f"), _fmt(s.get("rgb"), ".1f"), _fmt(rest, ".1f"),
                         _fmt(s.get("frames_decoded"), ".0f")]
            lines.append(line)
    out += ["Where a training clip's time goes (median ms per clip; read = decoding to RGB frames):", ""]
    out += _table(stage_head, lines) + [""]
    return out


def render_section(result: Dict[str, Any]) -> str:
    key, machine, ver = section_key(result), result["host"], result["versions"]
    augment = result.get("augment", "recipe")
    title = f"## Video data loading (CPU): {machine['cpu']}, {machine['usable_cores']} cores" + (
        "" if augment == "recipe" else f", {augment} augmentation")
    lines = [f"<!-- bench:begin {key} -->", title,
             "", f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- CPU: {machine['cpu']} ({machine['logical_cores']} logical cores, {machine['usable_cores']} usable), "
             f"RAM {machine['memory_gb']} GiB; {machine['platform']}",
             "- " + ", ".join(f"{k} {v}" for k, v in ver.items() if k != "mvit_zoo_commit")
             + f"; mvit-zoo {ver['mvit_zoo_commit']}; today = mvit-zoo at {result['ref_commit'][:12]}"]
    for name, f in result["files"].items():
        lines.append(f"- {name}: {len(f['durations'])} file(s), {f['title']}, {f['mb']:.1f} MB in all")
    base = [r["worker_rss_mb"] for r in result["rows"] if r.get("worker_rss_mb")]
    lines += [
        f"- timing: median of {result['rounds']} round(s); in a round each loader runs its clips in turn (never two "
        f"at once), after one untimed clip; one process per "
        f"{'loader (--quick)' if result['quick'] else '(loader, file kind)'}, torch at 1 thread as in a DataLoader "
        f"worker (the decoders use their own threads)",
        f"- MB = peak RSS growth of the worker (VmHWM, reset after its imports, minus its RSS then); a worker holds "
        f"{min(base):.0f}-{max(base):.0f} MB after importing torch, torchvision and the decoder" if base else
        "- MB = peak RSS growth of the worker",
        "- all training loaders apply the same augmentation (the working tree's TrainClipTransform: "
        f"{AUGMENTATIONS[augment][0]}); ratios divide clips (videos) "
        "per second of the same run; (1 clip): one clip of the file in the first round only (today's loader "
        "decodes the whole file)",
        "", *format_tables(result)]
    errors = [f"- {r['task']} {r['loader']} {r['kind']}: {r['error']}" for r in result["rows"] if r.get("error")]
    if errors:
        lines += ["Errors:", "", *errors, ""]
    lines.append(f"<!-- bench:end {key} -->")
    return "\n".join(lines)


def write_results(path: Path, result: Dict[str, Any]) -> None:
    """Replace this host's section of `path` (bench.py's markers), or append it; the rest is kept as it is."""
    section, key = render_section(result), section_key(result)
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"<!-- bench:begin {re.escape(key)} -->.*?<!-- bench:end {re.escape(key)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds of all loaders (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: two tiny files of each kind, one round")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON results (default {DEFAULT_OUT}); its folder also holds the generated files "
                        "(data_bench_cache/), the workers' logs and, during the run, the reference worktree")
    p.add_argument("--results", type=Path, default=None,
                   help="markdown file whose 'Video data loading (CPU)' section of this host to write "
                        "(e.g. benchmarks/RESULTS.md; not written by default)")
    p.add_argument("--ref-commit", default="4f6b89c", help="git revision of today's loaders (default 4f6b89c)")
    p.add_argument("--kinds", nargs="+", choices=("kinetics", "ssv2", "long"), default=["kinetics", "ssv2", "long"])
    p.add_argument("--decoders", nargs="+", choices=("pyav", "torchcodec"), default=["pyav", "torchcodec"],
                   help="backends of ours' training loader (a backend that does not work here gets an error row)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="recipe",
                   help="the training augmentation all loaders apply: recipe (finetune --recipe k400's, default) or "
                        "default (finetune's without a recipe: random resized crop and flip); each writes its own "
                        "RESULTS section")
    p.add_argument("--profile", action="store_true",
                   help="split ours-pyav's read into decoding, RGB conversion and the rest (seeking, opening)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    out_dir = args.out.resolve().parent
    logs = out_dir / "data_bench_logs"
    logs.mkdir(parents=True, exist_ok=True)
    kinds = {name: kind for name, kind in file_kinds(args.quick).items() if name in args.kinds}
    print(f"files (cached in {out_dir / 'data_bench_cache'}):", flush=True)
    files = generate_files(out_dir / "data_bench_cache", kinds)
    result: Dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python benchmarks/data_bench.py " + " ".join(map(shlex.quote, argv if argv is not None
                                                                  else sys.argv[1:])),
        host=host_info(), versions=versions(), quick=args.quick, rounds=args.rounds, augment=args.augment,
        files={name: dict(asdict(kind), files=[str(p) for p in files[name]],
                          mb=sum(p.stat().st_size for p in files[name]) / 1e6) for name, kind in kinds.items()},
        settings=dict(num_frames=NUM_FRAMES, sampling_rate=SAMPLING_RATE, target_fps=TARGET_FPS, crop=CROP,
                      views=VIEWS, test_short_side=TEST_SHORT_SIDE))
    records: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    with RefWorktree(args.ref_commit, out_dir) as ref:
        result["ref_commit"] = ref.commit
        specs = loader_specs(args, str(ref.path))
        workers: List[Worker] = []
        try:
            for name, kind in kinds.items():
                # NOTE: a fresh process per (loader, kind), so each peak RSS is that kind's; --quick keeps the
                # processes across kinds (their start, mostly importing torch, is most of a smoke test's time)
                if not args.quick or not workers:
                    for w in workers:
                        w.close()
                    workers = _start(specs, logs, name)
                else:
                    for w in workers:
                        if w.error is None:
                            w.run({"op": "reset"})
                run_kind(kind, files[name], workers, args.rounds, records)
        finally:
            for w in workers:
                w.close()
    result["rows"] = summarize(records)
    result["ratios"] = ratios(result["rows"])
    print()
    print("\n".join(format_tables(result)))
    for r in result["rows"]:
        if r.get("error"):
            print(f"error: {r['task']} {r['loader']} {r['kind']}: {r['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if args.results is not None:
        write_results(args.results, result)
        print(f"wrote {args.results} (section '{section_key(result)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
