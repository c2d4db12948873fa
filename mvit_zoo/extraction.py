"""Per-clip features of whole videos (and of images) for downstream models: `mvit-zoo extract` and its Python API.

Temporal action localisation, moment retrieval and video-language models train on the features a backbone computed
for every clip of every video. The windows of a video of `N` frames at `fps` (:func:`window_starts`):

- a clip spans `L = num_frames * sampling_rate` frames at the 30 fps target rate, i.e. `L * fps / 30` of the video's
  frames (as :func:`mvit_zoo.data.views.stride_clip_indices` scales it); windows start every `S` target-rate frames
  (`window_stride`, default `L`: back-to-back clips), i.e. every `S * fps / 30` video frames, from frame 0, as long as
  the window lies inside the video;
- if the last such window ends before the video's last frame, one more window is added whose end is clamped to the
  video's end (it starts at `N - L * fps / 30` and overlaps the one before it), so every frame is covered;
- a video shorter than one clip gives one window starting at frame 0 whose indices past the end repeat the last frame,
  as the test views do;
- the `num_frames` indices of a window starting at (fractional) frame `s` are `linspace(s, s + span - 1, num_frames)`
  rounded down and clamped to the video, SlowFast's rule; the clip's time is `[s / fps, min(s + span, N) / fps]` s.

Each clip is preprocessed as the model's test view (:meth:`mvit_zoo.data.views.ViewSampling.iter_views`: short side
resize and one centre crop, or `views='1x3'`: left/centre/right crops whose features are averaged), and the chosen
layer gives its row: `pooled` = `model.forward_head(model.forward_features(x), pre_logits=True)` `(C,)`, `logits`
`(num_classes,)`, `stageK` = `model.forward_intermediates(x)`'s map of `model.stages[K]` `(C, T', H', W')`, or `(T', C)`
with `spatial_pool='mean'`. A video is decoded once, a batch of windows at a time: the frames of `batch_size` windows
are read with one :func:`mvit_zoo.data.reader.read_frames` call (which seeks to the keyframe before them and decodes
forward), so memory holds one batch of clips, not the video.

:func:`extract_features` is the one-video API; :func:`extract_files` is the engine of `mvit-zoo extract`: one file
per input, `OUT/<path under the data root, extension dropped>.npy` (or `.safetensors`, key `features`), written
atomically, and one line per input in `OUT/index.jsonl` (see :func:`extract_files`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data.reader import probe, read_frames
from .data.views import SLOWFAST_TARGET_FPS, Views, ViewSampling
from .files import atomic_write

__all__ = ["FORMATS", "INDEX_FILE", "SPATIAL_POOLS", "Source", "Summary", "check_layer", "clip_features",
           "extract_features", "extract_files", "find_sources", "merge_index", "read_index", "window_indices",
           "window_starts"]

FORMATS = ("npy", "safetensors")
SPATIAL_POOLS = ("none", "mean")
INDEX_FILE = "index.jsonl"
_RANK_INDEX = "index.rank{rank}.jsonl"  # each process's lines while it runs; merged into INDEX_FILE at the end
_EPS = 1e-6  # frames: window positions are fractional, and a window ending within this of the last frame ends on it


# -- windows -----------------------------------------------------------------------------------------

def _scale(fps: float | None, target_fps: float | None) -> float:
    """Video frames per target-rate frame: `fps / target_fps` (1 when either is unknown, as stride_clip_indices)."""
    return fps / target_fps if fps and target_fps else 1.0


def window_starts(num_available: int, fps: float | None, clip_frames: int, window_stride: int | None = None,
                  target_fps: float | None = SLOWFAST_TARGET_FPS) -> list[float]:
    """First (fractional) video frame of each window of a video of `num_available` frames at `fps` (the module
    docstring's rule). `clip_frames` and `window_stride` are counted at `target_fps`
    (`num_frames * sampling_rate`, and by default the same)."""
    if num_available < 1:
        raise ValueError("A video needs at least one frame")
    stride = clip_frames if window_stride is None else window_stride
    if stride < 1:
        raise ValueError(f"window_stride must be at least 1 frame (at {target_fps} fps), got {stride}")
    scale = _scale(fps, target_fps)
    span, step = max(1.0, clip_frames * scale), stride * scale
    if num_available <= span + _EPS:
        return [0.0]
    count = math.floor((num_available - span) / step + _EPS) + 1
    starts = [i * step for i in range(count)]
    if starts[-1] + span < num_available - _EPS:
        starts.append(num_available - span)
    return starts


def window_indices(start: float, num_available: int, num_frames: int, span: float) -> list[int]:
    """The `num_frames` frame indices of the window of `span` video frames starting at `start`: evenly spaced,
    rounded down and clamped to the video (:func:`mvit_zoo.data.views.stride_clip_indices`'s rule)."""
    index = torch.linspace(start, start + max(1.0, span) - 1, num_frames)
    return index.clamp(0, num_available - 1).long().tolist()


@dataclass(frozen=True)
class _Windows:
    """The windows of one video: frame indices and `(start_s, end_s)` of each."""

    indices: list[list[int]]
    times: list[tuple[float, float]]


def _windows(num_available: int, fps: float | None, sampling: ViewSampling,
             window_stride: int | None) -> _Windows:
    clip_frames = sampling.num_frames * sampling.sampling_rate
    scale = _scale(fps, sampling.target_fps)
    span = max(1.0, clip_frames * scale)
    rate = fps if fps else (sampling.target_fps or 1.0)  # seconds of a video of unknown rate: at the target rate
    starts = window_starts(num_available, fps, clip_frames, window_stride, sampling.target_fps)
    return _Windows([window_indices(s, num_available, sampling.num_frames, span) for s in starts],
                    [(s / rate, min(s + span, num_available) / rate) for s in starts])


# -- layers ------------------------------------------------------------------------------------------

def _num_stages(model: nn.Module) -> int:
    return len(getattr(model, "stages", None) or getattr(model, "feature_info", None) or [])


def check_layer(model: nn.Module, layer: str, spatial_pool: str = "none") -> int | None:
    """The stage index of `layer` ('stageK'), None for 'pooled' and 'logits'; ValueError naming the valid ones."""
    stages = _num_stages(model)
    valid = ["pooled", "logits", *(f"stage{k}" for k in range(stages))]
    if spatial_pool not in SPATIAL_POOLS:
        raise ValueError(f"spatial_pool must be one of {', '.join(SPATIAL_POOLS)}, got {spatial_pool!r}")
    if layer in ("pooled", "logits"):
        if spatial_pool != "none":
            raise ValueError(f"spatial pooling applies to stage maps (stage0..stage{stages - 1}); the {layer} layer "
                             "is a vector already: drop --spatial-pool")
        if layer == "logits" and not getattr(model, "num_classes", 0):
            raise ValueError("layer 'logits' needs a classifier and this model has none (num_classes=0): extract "
                             "'pooled' features instead")
        return None
    if layer in valid:
        return int(layer[len("stage"):])
    raise ValueError(f"unknown layer {layer!r}: choose one of {', '.join(valid)} (stageK is model.stages[K]'s map)")


def clip_features(model: nn.Module, x: torch.Tensor, layer: str = "pooled", spatial_pool: str = "none") -> torch.Tensor:
    """Features of the chosen layer for a batch of preprocessed clips (or images) `x`: `(B, C)` pooled, `(B, K)`
    logits, `(B, C, T', H', W')` (images `(B, C, H', W')`) for `stageK`, or with `spatial_pool='mean'` `(B, T', C)`
    (images `(B, C)`)."""
    stage = check_layer(model, layer, spatial_pool)
    if layer == "pooled":
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if layer == "logits":
        return model(x)
    (out,) = model.forward_intermediates(x, indices=[stage], stop_early=True, intermediates_only=True)
    if spatial_pool == "mean":
        out = out.mean(dim=(-2, -1))
        if out.ndim == 3:  # (B, C, T') -> (B, T', C): one C-vector per time step, as features for a sequence model
            out = out.transpose(1, 2)
    return out


# -- one video ---------------------------------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _video_batches(path: str | os.PathLike, sampling: ViewSampling, window_stride: int | None, batch_size: int,
                   decoder: str | None) -> Iterator[Any]:
    """First the video's `(probe info, windows)`, then per batch of `batch_size` windows the stacked views
    `(batch x crops, C, T, H, W)` float (crops of a window adjacent), one read_frames call per batch."""
    info = probe(path, decoder)
    windows = _windows(info.num_frames, info.fps, sampling, window_stride)
    yield info, windows
    for first in range(0, len(windows.indices), batch_size):
        clips = windows.indices[first:first + batch_size]
        frames, rows = read_frames(path, [i for clip in clips for i in clip], backend=decoder, info=info)
        n = sampling.num_frames
        yield torch.stack(list(sampling.iter_views(frames, [rows[c * n:(c + 1) * n] for c in range(len(clips))])))


def _crop_mean(features: torch.Tensor, crops: int) -> torch.Tensor:
    """`(B x crops, ...)` -> `(B, ...)`: the mean over each window's crops, in float32."""
    features = features.float()
    return features.view(-1, crops, *features.shape[1:]).mean(1) if crops > 1 else features


@torch.no_grad()
def extract_features(
        model: nn.Module,
        video_path: str | os.PathLike,
        window_stride: int | None = None,
        layer: str = "pooled",
        views: str | Views = "1x1",
        batch_size: int = 8,
        decoder: str | None = None,
        *,
        spatial_pool: str = "none",
        data_cfg: Any = None,
        amp: bool = False,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Features of every window of a video (the module docstring's windows): `(features, clip_times)`.

    `features` is a float32 array `(num_clips, ...)` (see :func:`clip_features` for the row shapes); `clip_times`
    gives each clip's `(start_s, end_s)`. `window_stride` is in frames at 30 fps (default: one clip,
    `num_frames x sampling_rate`); `views` '1x1' (centre crop) or '1x3' (three crops averaged); `batch_size`
    windows are decoded and run at once; `decoder` 'pyav', 'torchcodec' or None (the first that works here);
    `data_cfg` the preprocessing (default: the model's); `amp` runs the model in bfloat16.
    """
    from .evaluation import view_sampling

    check_layer(model, layer, spatial_pool)
    sampling = _sampling(model, views, data_cfg, view_sampling)
    device = next(model.parameters()).device
    model.eval()
    batches = _video_batches(video_path, sampling, window_stride, _positive(batch_size, "batch_size"), decoder)
    _, windows = next(batches)
    rows = []
    for x in batches:
        with _autocast(device, amp):
            rows.append(_crop_mean(clip_features(model, x.to(device), layer, spatial_pool), sampling.views.spatial))
    return torch.cat(rows).cpu().numpy(), list(windows.times)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    return value


def _sampling(model: nn.Module, views: str | Views, data_cfg: Any, view_sampling: Callable) -> ViewSampling:
    """The model's one-clip test view with `views`' crops; windows take the clip length from it."""
    chosen = Views.parse(views)
    if chosen.temporal != 1:
        raise ValueError(f"views {chosen}: the windows are the clips, so one temporal view per window is taken: use "
                         "1x1 (centre crop) or 1x3 (three crops averaged)")
    return view_sampling(model, chosen, data_cfg)


# -- many files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One input: its absolute `path`, its path under the data root (`name`), its output file under the output
    folder (`output`), and whether it is an image."""

    path: str
    name: str
    output: str
    image: bool = False


@dataclass
class Summary:
    """What :func:`extract_files` did in this process: files written, skipped as complete, failed (with reasons),
    and the seconds spent waiting for decoded + preprocessed clips (`data_s`) and running the model (`model_s`)."""

    written: int = 0
    complete: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    clips: int = 0
    data_s: float = 0.0
    model_s: float = 0.0


def find_sources(data: str | os.PathLike, data_root: str | os.PathLike | None = None, fmt: str = "npy",
                 images: bool = True, videos: bool = True) -> tuple[list[Source], list[str]]:
    """The inputs of `data` and the listed files that are not there: `(sources, missing)`.

    `data` is a folder (every video and image under it, walked in sorted order) or an annotation file (the videos
    it lists, any format of :func:`mvit_zoo.data.sources.read_annotations`, under `data_root`, default its folder).
    A source's output is its path under the root with the extension replaced by `.npy` / `.safetensors`; two inputs
    that would share one (`a.mp4`, `a.webm`) and listed files outside the root raise ValueError.
    """
    from .data.folders import IMAGE_EXTENSIONS, walk_files
    from .data.sources import read_annotations
    from .data.video import VIDEO_EXTENSIONS

    extensions = (VIDEO_EXTENSIONS if videos else ()) + (IMAGE_EXTENSIONS if images else ())
    data = Path(data)
    missing: list[str] = []
    if data.is_dir():
        root = Path(data_root) if data_root is not None else data
        paths = walk_files(data, extensions)
    else:
        root = Path(data_root) if data_root is not None else data.parent
        split = read_annotations(data, root, extensions=extensions)
        paths, missing = [p for p, _ in split.samples], list(split.missing)
    root_abs = os.path.abspath(root)
    sources: list[Source] = []
    by_output: dict[str, str] = {}
    for path in paths:
        name = os.path.relpath(os.path.abspath(path), root_abs)
        if name == os.pardir or name.startswith(os.pardir + os.sep):
            raise ValueError(f"{path} is not under the data root {root}: its output would fall outside the output "
                             "folder; pass the folder that holds all the files as --data-root")
        output = os.path.splitext(name)[0] + "." + fmt
        if output in by_output:
            raise ValueError(f"{by_output[output]} and {name} would both be written to {output}; rename one of them")
        by_output[output] = name
        sources.append(Source(os.path.abspath(path), name, output, path.lower().endswith(IMAGE_EXTENSIONS)))
    return sources, missing


class _Items(IterableDataset):
    """The inputs of one process as items: `(source index, 'meta', info dict)` once per input, then
    `(source index, 'views', tensor, last)` per batch, or `(source index, 'error', reason)`. DataLoader workers
    take every `num_workers`-th input, so each input's items come from one worker, in order."""

    def __init__(self, sources: Sequence[Source], todo: Sequence[int], sampling: ViewSampling | None,
                 image_transform: Callable | None, window_stride: int | None, batch_size: int,
                 decoder: str | None) -> None:
        self.sources, self.todo, self.sampling = sources, list(todo), sampling
        self.image_transform, self.window_stride = image_transform, window_stride
        self.batch_size, self.decoder = batch_size, decoder

    def __iter__(self) -> Iterator[tuple]:
        worker = get_worker_info()
        todo = self.todo if worker is None else self.todo[worker.id::worker.num_workers]
        for i in todo:
            try:
                yield from (self._image(i) if self.sources[i].image else self._video(i))
            except Exception as e:  # noqa: BLE001 - any unreadable file is listed with its reason, not fatal
                yield i, "error", f"{type(e).__name__}: {str(e).removeprefix(self.sources[i].path + ': ')}"

    def _video(self, i: int) -> Iterator[tuple]:
        batches = _video_batches(self.sources[i].path, self.sampling, self.window_stride, self.batch_size,
                                 self.decoder)
        info, windows = next(batches)
        yield i, "meta", {"frames": info.num_frames, "fps": info.fps,
                          "clips": [[round(s, 6), round(e, 6)] for s, e in windows.times]}
        count = math.ceil(len(windows.indices) / self.batch_size)
        for b, views in enumerate(batches):
            yield i, "views", views, b == count - 1

    def _image(self, i: int) -> Iterator[tuple]:
        from PIL import Image

        with open(self.sources[i].path, "rb") as f:
            image = Image.open(f).convert("RGB")
        if self.sampling is None:  # an image model: its timm test transform
            views = self.image_transform(image)[None]
        else:  # a video model: the image held for a clip's frames, then the clip's test view(s)
            frames = np.array(image)[None]  # (a writable copy: torch refuses to wrap a read-only array)
            views = torch.stack(list(self.sampling.iter_views(frames, [[0] * self.sampling.num_frames])))
        yield i, "meta", {}
        yield i, "views", views, True


def _write_array(path: Path, array: np.ndarray, fmt: str) -> None:
    def write(tmp: Path) -> None:
        if fmt == "npy":
            with open(tmp, "wb") as f:  # (a path not ending in .npy would get one appended by np.save)
                np.save(f, array)
        else:
            from safetensors.numpy import save_file

            save_file({"features": array}, str(tmp))

    atomic_write(path, write)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(output: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The index lines of an output folder by input name: `index.jsonl`, then the per-process files a stopped
    run left (a later line for the same input wins). A line cut off by a killed process is ignored."""
    output = Path(output)
    lines: dict[str, dict[str, Any]] = {}
    files = [output / INDEX_FILE, *sorted(output.glob(_RANK_INDEX.format(rank="*")))]
    for file in files:
        if not file.is_file():
            continue
        for text in file.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "source" in entry:
                lines[entry["source"]] = entry
    return lines


def _is_complete(output: Path, entry: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    """True if `entry` is a finished input with these settings whose file is there with the bytes it records."""
    if entry is None or "error" in entry or entry.get("settings") != settings:
        return False
    path = output / entry["file"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and _sha256(path) == entry["sha256"]


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    """One JSON line appended and flushed to disk, so a killed process loses at most the line it was writing."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_index(output: str | os.PathLike, sources: Sequence[Source]) -> Path:
    """Write `index.jsonl` (atomically) from all the lines found (:func:`read_index`), in the order of `sources`,
    and remove the per-process files merged into it."""
    output = Path(output)
    lines = read_index(output)
    ordered = [lines[s.name] for s in sources if s.name in lines]

    def write(tmp: Path) -> None:
        tmp.write_text("".join(json.dumps(e, allow_nan=False) + "\n" for e in ordered), encoding="utf-8")

    atomic_write(output / INDEX_FILE, write)
    for file in output.glob(_RANK_INDEX.format(rank="*")):
        file.unlink()
    return output / INDEX_FILE


@torch.no_grad()
def extract_files(
        model: nn.Module,
        sources: Sequence[Source],
        output: str | os.PathLike,
        settings: dict[str, Any],
        *,
        layer: str = "pooled",
        spatial_pool: str = "none",
        views: str | Views = "1x1",
        window_stride: int | None = None,
        data_cfg: Any = None,
        batch_size: int = 8,
        workers: int = 0,
        amp: bool = False,
        decoder: str | None = None,
        fmt: str = "npy",
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Extract the features of this process's share of `sources` (every `world_size`-th from `rank`) into `output`.

    Each finished input gets its file, `output/<source.output>`, then its line in `output/index.rank<rank>.jsonl`:
    `source`, `file`, `frames`, `fps`, `clips` (`[start_s, end_s]` each), `shape`, `dtype`, `bytes`, `sha256` and
    `settings` (model, tag, layer, preprocessing ...: `settings` plus the layer and the view sampling), or for an
    input that cannot be read `source` and `error`. An input whose line (here or in `index.jsonl`) has these
    settings and whose file has the recorded size and sha256 is complete and skipped unless `overwrite`; any other
    is redone, so a stopped run resumes. :func:`merge_index` then writes `index.jsonl`. `progress(done, total)` is
    called after each input of this process.
    """
    from .data.transforms import build_transform, is_video_model, resolve_data_config
    from .evaluation import view_sampling

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_layer(model, layer, spatial_pool)
    data_cfg = data_cfg or resolve_data_config(model)
    video = is_video_model(model)
    sampling = _sampling(model, views, data_cfg, view_sampling) if video else None
    if not video and Views.parse(views) != Views():
        raise ValueError(f"views {views} asked for an image model; images take one centre crop (1x1)")
    settings = {**settings, "layer": layer, "spatial_pool": spatial_pool, "views": str(Views.parse(views)),
                "window_stride": (window_stride or data_cfg.num_frames * data_cfg.sampling_rate) if video else None,
                "format": fmt, "preprocessing": sampling.to_dict() if video else data_cfg.to_dict()}
    settings = json.loads(json.dumps(settings))  # as an index line reads back: lists, not tuples
    output = Path(output)
    output.mkdir(exist_ok=True)
    rank_index = output / _RANK_INDEX.format(rank=rank)
    rank_index.touch()  # before any feature file: the folder is marked as this command's own from the start
    done_lines = read_index(output)
    mine = list(range(rank, len(sources), world_size))
    todo = [i for i in mine if overwrite or not _is_complete(output, done_lines.get(sources[i].name), settings)]
    summary = Summary(complete=len(mine) - len(todo))
    items = _Items(sources, todo, sampling, None if video else build_transform(data_cfg, is_training=False),
                   window_stride, _positive(batch_size, "batch_size"), decoder)
    loader = DataLoader(items, batch_size=None, num_workers=workers)
    device = next(model.parameters()).device
    crops = sampling.views.spatial if video else 1
    model.eval()
    pending: dict[int, tuple[dict[str, Any], list[torch.Tensor]]] = {}
    finished = summary.complete
    clock = time.perf_counter()
    for item in loader:
        summary.data_s += time.perf_counter() - clock
        i, kind = item[0], item[1]
        source = sources[i]
        if kind == "meta":
            pending[i] = (item[2], [])
        elif kind == "views":
            start = time.perf_counter()
            with _autocast(device, amp):
                rows = _crop_mean(clip_features(model, item[2].to(device), layer, spatial_pool), crops).cpu()
            summary.model_s += time.perf_counter() - start
            pending[i][1].append(rows)
            if item[3]:
                meta, parts = pending.pop(i)
                features = torch.cat(parts).numpy()
                if source.image:
                    features = features[0]
                summary.clips += 1 if source.image else len(features)
                path = output / source.output
                _write_array(path, features, fmt)
                _append_line(rank_index, {"source": source.name, "file": source.output, **meta,
                                          "shape": list(features.shape), "dtype": str(features.dtype),
                                          "bytes": path.stat().st_size, "sha256": _sha256(path),
                                          "settings": settings})
                summary.written += 1
        else:
            pending.pop(i, None)
            summary.failed.append((source.name, item[2]))
            _append_line(rank_index, {"source": source.name, "error": item[2]})
        if kind == "error" or (kind == "views" and item[3]):
            finished += 1
            if progress is not None:
                progress(finished, len(mine))
        clock = time.perf_counter()
    return summary
