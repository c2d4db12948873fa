"""The package's video reader: decode only the frames asked for, by seeking to the keyframe before them.

:func:`probe` reads a video's size, frame count and rate without decoding, and refuses files a decoder should not be
handed (absurd frame sizes, frame counts or durations, empty files). :func:`read_frames` decodes the frames at given
indices: for each run of wanted frames it seeks to the keyframe at or before the first, decodes forward and converts
only the wanted frames to RGB, so a clip near the end of a long file costs one GOP of decoding, not the file, and peak
memory is the returned frames plus the decoder's state for one GOP.

Two backends decode: `'pyav'` (PyAV, whose wheels bundle FFmpeg; `pip install av`) and `'torchcodec'` (TorchCodec,
which loads the system's FFmpeg 4-8 shared libraries; `pip install torchcodec`, and e.g. `apt-get install ffmpeg`).
Frame `i` is the `i`-th frame in presentation order. With PyAV, :func:`probe` demuxes every packet (no decoding, a few
ms for a 10 s clip) to build the table of presentation timestamps, so an index maps to its exact timestamp with
B-frames and variable frame rates, and decoded frames are matched to indices by timestamp, never by counting.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "BACKENDS",
    "MAX_DURATION",
    "MAX_NUM_FRAMES",
    "MAX_PIXELS",
    "VideoError",
    "VideoInfo",
    "available_backends",
    "probe",
    "read_frames",
    "resolve_backend",
]

PathLike = Union[str, os.PathLike]

BACKENDS: Tuple[str, ...] = ("torchcodec", "pyav")  # in the order `backend=None` tries them

MAX_PIXELS = 7680 * 4320  # 8K UHD: one larger frame is ~100 MB of RGB, and a header can declare any size
MAX_NUM_FRAMES = 2_000_000  # 18.5 h at 30 fps; the PyAV timestamp table costs 8 bytes a frame
MAX_DURATION = 24 * 3600.0  # seconds

_INSTALL = {
    "pyav": 'pip install av  (or pip install "mvit-zoo[video]")',
    "torchcodec": "pip install torchcodec (the build matching your torch), with FFmpeg 4-8 shared libraries "
                  "(apt-get install ffmpeg, or conda install ffmpeg)",
}


class VideoError(ValueError):
    """A file that is not a readable video, or one the reader refuses (its message names the file and the limit)."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video's first video stream.

    `num_frames` frames (in presentation order) of `width x height` pixels, `fps` frames per second (the average
    for a variable frame rate; None if unknown), `duration` in seconds (None if unknown), `codec` FFmpeg's name.
    The PyAV backend also keeps the sorted presentation timestamps of all frames and the indices of the keyframes,
    to seek (private, out of the repr and of comparisons).
    """

    num_frames: int
    fps: Optional[float]
    width: int
    height: int
    duration: Optional[float]
    codec: str
    backend: str = "pyav"
    _pts: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # int64 (num_frames,), ascending
    _keys: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # int64 indices of keyframes
    _source: Tuple[str, int, int] = field(default=("", 0, 0), repr=False, compare=False)  # path, size, mtime_ns


def _source(path: PathLike) -> Tuple[str, int, int]:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"Video decoding with PyAV needs the av package: {_INSTALL['pyav']}") from e
    return av


@functools.cache
def _torchcodec_error() -> Optional[str]:
    """None if TorchCodec imports and decodes a one-frame video here, else why not (checked once per process)."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # ImportError, or RuntimeError when no FFmpeg shared library loads
        return f"torchcodec does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        av = _import_av()
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="matroska") as container:
            stream = container.add_stream("mpeg4", rate=1)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
            container.mux(stream.encode())
        VideoDecoder(buffer.getvalue()).get_frame_at(0)
    except ImportError:  # no PyAV to write the test video: importing is the check
        return None
    except Exception as e:
        return f"torchcodec imports but cannot decode ({type(e).__name__}: {e})"
    return None


def available_backends() -> List[str]:
    """The backends that work here, in the order `backend=None` tries them."""
    names = []
    if _torchcodec_error() is None:
        names.append("torchcodec")
    try:
        _import_av()
        names.append("pyav")
    except ImportError:
        pass
    return names


def resolve_backend(name: Optional[str] = None) -> str:
    """`name` if it is a backend that works here; None picks 'torchcodec' if it works, else 'pyav'."""
    available = available_backends()
    if name is None:
        if not available:
            raise ImportError(f"No video backend is installed: {_INSTALL['pyav']}; or {_INSTALL['torchcodec']}")
        return available[0]
    if name not in BACKENDS:
        raise ValueError(f"Unknown video backend {name!r}: choose one of {list(BACKENDS)} (available here: "
                         f"{available}), or None for the first available")
    if name not in available:
        why = _torchcodec_error() if name == "torchcodec" else "PyAV (the av package) is not installed"
        raise ImportError(f"Video backend {name!r} is not available: {why}. Install it with: {_INSTALL[name]}. "
                          f"Available here: {available}")
    return name


def _is_avi(path: PathLike) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


def _backend_for(path: PathLike, backend: Optional[str]) -> str:
    """The backend that reads `path`: `backend`, or the first available; AVI files never go to torchcodec."""
    name = resolve_backend(backend)
    # NOTE: AVI stores no presentation timestamps; with B-frames torchcodec then returns neighbouring frames
    # (e.g. frame 22 for 24), as it falls back on the timestamp of the packet that released each frame
    if name == "torchcodec" and _is_avi(path):
        if backend is not None:
            raise VideoError(f"{path}: the torchcodec backend misplaces frames in AVI files (no presentation "
                             "timestamps): read it with backend='pyav', or remux it, e.g. ffmpeg -i IN.avi -c copy "
                             "OUT.mkv")
        name = resolve_backend("pyav")
    return name


def _check_limits(path: PathLike, width: int, height: int, num_frames: Optional[int],
                  duration: Optional[float]) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{path}: the video stream declares no frame size ({width}x{height}): not a decodable video")
    if width * height > MAX_PIXELS:
        raise VideoError(f"{path}: frames of {width}x{height} pixels exceed the reader's limit of {MAX_PIXELS} "
                         f"pixels (mvit_zoo.data.reader.MAX_PIXELS, 8K by default); downscale the video first, e.g. "
                         f"ffmpeg -i IN -vf scale=-2:1080 OUT")
    if num_frames is not None and num_frames > MAX_NUM_FRAMES:
        raise VideoError(f"{path}: {num_frames} frames exceed the reader's limit of {MAX_NUM_FRAMES} "
                         f"(mvit_zoo.data.reader.MAX_NUM_FRAMES); cut the video into shorter files")
    if duration is not None and duration > MAX_DURATION:
        raise VideoError(f"{path}: a duration of {duration:.0f} s exceeds the reader's limit of {MAX_DURATION:.0f} s "
                         f"(mvit_zoo.data.reader.MAX_DURATION); cut the video into shorter files")


def _check_file(path: PathLike) -> None:
    """Refuse a missing or empty file, and a GIF whose header declares frames over `MAX_PIXELS`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such video file: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise VideoError(f"{path}: the file is empty (0 bytes): not a video")
    with open(path, "rb") as f:
        head = f.read(10)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        # NOTE: FFmpeg reports a GIF of over 2^28 pixels as 0x0; its logical screen size is the size it declares
        _check_limits(path, int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little"), None, None)


def probe(path: PathLike, backend: Optional[str] = None) -> VideoInfo:
    """Frame count, rate, size, duration and codec of the first video stream, without decoding a frame.

    Raises :class:`VideoError` for a file that is not a video, has no video stream or no frames, or declares frames,
    a frame count or a duration beyond `MAX_PIXELS`, `MAX_NUM_FRAMES` or `MAX_DURATION`.
    """
    _check_file(path)
    if _backend_for(path, backend) == "torchcodec":
        return _probe_torchcodec(path)
    return _probe_pyav(path)


def _probe_pyav(path: PathLike) -> VideoInfo:
    av = _import_av()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video (FFmpeg: {e.strerror or e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream (streams: {[s.type for s in container.streams]})")
        stream = container.streams.video[0]
        time_base = stream.time_base
        declared = None
        if stream.duration is not None and time_base:
            declared = float(stream.duration * time_base)
        elif container.duration is not None:
            declared = container.duration / 1e6
        _check_limits(path, stream.codec_context.width, stream.codec_context.height, stream.frames or None, declared)
        stamps: List[int] = []
        keys: List[int] = []
        timed = True
        try:
            for packet in container.demux(stream):
                # NOTE: size-0 packets flush the demuxer; discarded ones (before an MP4 edit list's start) decode
                # to no frame
                if not packet.size or packet.is_discard:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                timed = timed and stamp is not None
                if packet.is_keyframe:
                    keys.append(len(stamps))
                stamps.append(stamp if timed else len(stamps))
                if len(stamps) > MAX_NUM_FRAMES:
                    _check_limits(path, 1, 1, len(stamps), None)
        except av.error.FFmpegError as e:
            # NOTE: a damaged tail ends the demuxing; the frames before it are still readable
            if not stamps:
                raise VideoError(f"{path}: not a readable video (FFmpeg: {e.strerror or e})") from None
        if not stamps:
            raise VideoError(f"{path}: the video stream has no frames")
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate
    if timed:
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable")
        pts = np.asarray(stamps, dtype=np.int64)[order]
        # a keyframe's index is where its timestamp lands in presentation order
        key_index = np.searchsorted(pts, np.asarray(stamps, dtype=np.int64)[keys]) if keys else np.zeros(1, np.int64)
        keys_sorted = np.unique(key_index)
        span = float((pts[-1] - pts[0]) * time_base) if time_base else 0.0
        duration = span * len(pts) / (len(pts) - 1) if len(pts) > 1 and span > 0 else declared
    else:
        # NOTE: a stream without timestamps (e.g. raw MPEG-4 in AVI from old muxers) is read by counting from the
        # start: no seeking
        pts, keys_sorted, duration = None, np.zeros(1, np.int64), declared
    if pts is not None and len(pts) > 1 and pts[-1] > pts[0] and time_base:
        fps = (len(pts) - 1) / span  # the average over the frames: exact for a variable frame rate
    else:
        fps = float(rate) if rate else (len(stamps) / duration if duration else None)
    _check_limits(path, width, height, len(stamps), duration)
    return VideoInfo(len(stamps), fps, width, height, duration, codec, "pyav", pts, keys_sorted, _source(path))


def _torchcodec_decoder(path: PathLike):
    from torchcodec.decoders import VideoDecoder

    # NOTE: seek_mode='exact' scans the packets (no decoding) for exact frame counts and timestamps, as PyAV's probe
    return VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC")


def _probe_torchcodec(path: PathLike) -> VideoInfo:
    try:
        decoder = _torchcodec_decoder(path)
    except (RuntimeError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video (torchcodec: {str(e).splitlines()[0]})") from None
    meta = decoder.metadata
    width, height = meta.width or 0, meta.height or 0
    duration = meta.duration_seconds
    _check_limits(path, width, height, meta.num_frames, duration)
    if not meta.num_frames:
        raise VideoError(f"{path}: the video stream has no frames")
    fps = meta.average_fps
    return VideoInfo(meta.num_frames, fps, width, height, duration, meta.codec or "", "torchcodec",
                     _source=_source(path))


def _info_for(path: PathLike, backend: str, info: Optional[VideoInfo]) -> VideoInfo:
    """`info` if it was probed from this file (and holds what `backend` needs), else a fresh probe."""
    if info is not None:
        if info._source[0] and info._source != _source(path):
            raise VideoError(f"{path}: the VideoInfo passed was probed from {info._source[0]} (or an earlier version "
                             f"of this file): probe({str(path)!r}) again")
        if backend == "torchcodec" or info._pts is not None or info.backend == "pyav":
            return info
    return probe(path, backend)


def _unique_indices(path: PathLike, indices: Sequence[int], info: VideoInfo) -> List[int]:
    """Sorted unique indices, those past the last frame clamped to it."""
    wanted = [int(i) for i in indices]
    if not wanted:
        raise ValueError("read_frames needs at least one frame index")
    if min(wanted) < 0:
        raise ValueError(f"{path}: frame indices must be >= 0, got {min(wanted)}")
    return sorted({min(i, info.num_frames - 1) for i in wanted})


def read_frames(
        path: PathLike,
        indices: Sequence[int],
        *,
        backend: Optional[str] = None,
        info: Optional[VideoInfo] = None,
) -> Tuple[np.ndarray, List[int]]:
    """Decode only the frames at `indices`: `(frames, rows)`.

    `frames` is `(K, H, W, 3)` uint8 RGB, the `K` unique frames asked for in increasing index order; `rows[j]` is the
    row of `frames` holding `indices[j]`. Indices past the last decodable frame (a header that overstates the frame
    count) read the last decodable frame; a frame the decoder does not output (damaged data) reads the nearest decoded
    frame before it. `info`: the result of :func:`probe` for this file, to skip probing it again.
    """
    _check_file(path)
    name = _backend_for(path, backend)
    info = _info_for(path, name, info)
    unique = _unique_indices(path, indices, info)
    decoded = _read_torchcodec(path, unique) if name == "torchcodec" else _read_pyav(path, unique, info)
    frames = [decoded[i] for i in unique]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoError(f"{path}: the frame size changes within the stream ({sorted(shapes)}): re-encode it at one "
                         "size, e.g. ffmpeg -i IN -vf scale=W:H OUT")
    row = {index: r for r, index in enumerate(unique)}
    rows = [row[min(int(i), info.num_frames - 1)] for i in indices]
    return np.stack(frames), rows


def _read_torchcodec(path: PathLike, unique: List[int]) -> Dict[int, np.ndarray]:
    try:
        batch = _torchcodec_decoder(path).get_frames_at(unique)
    except (RuntimeError, IndexError, ValueError) as e:
        raise VideoError(f"{path}: torchcodec could not decode frames {unique[0]}..{unique[-1]} "
                         f"({str(e).splitlines()[0]}); try backend='pyav'") from None
    data = batch.data.numpy()
    return {index: data[r] for r, index in enumerate(unique)}


# NOTE: frame threading ('AUTO') decodes frames ahead that a sparse read then throws away; slice threading splits
# each frame and wastes none. On a shared 2-core host a 16x4 clip of a 720p H.264 file read in 340-500 ms with
# 'SLICE', 'AUTO' or 'NONE' alike (within noise): remeasure on a many-core host before changing it
PYAV_THREAD_TYPE = "SLICE"


def _decode(container, stream) -> Iterator:
    """Decoded frames of `stream` from the container's current position (the one place the reader decodes)."""
    return container.decode(stream)


def _to_rgb(frame) -> np.ndarray:
    """`(H, W, 3)` uint8 RGB of a decoded PyAV frame (the one place the reader converts)."""
    return frame.to_ndarray(format="rgb24")


def _read_pyav(path: PathLike, unique: List[int], info: VideoInfo) -> Dict[int, np.ndarray]:
    """Frames at the sorted unique `unique` indices (each < info.num_frames) by seeking and decoding forward."""
    av = _import_av()
    pts, keys = info._pts, info._keys
    out: Dict[int, np.ndarray] = {}
    container = None
    try:
        frames = None  # the live decoding, or None when the next frame needs a seek
        fresh = False  # no frame decoded since the last seek
        pos = -1  # index of the last frame decoded (or the one before the keyframe sought to)
        prev = None  # the last frame decoded
        sought = -1  # the keyframe index of the last seek
        back = 0  # keyframes to start before the one at or before the target: a seek landed past it
        count = 0  # frames decoded from the start, for a stream without timestamps
        t = 0
        while t < len(unique):
            target = unique[t]
            kp = int(np.searchsorted(keys, target, side="right")) - 1 - back
            start = int(keys[kp]) if kp >= 0 else 0
            # a keyframe lies ahead: seek rather than decode up to it (once: a seek may land before it)
            if frames is None or (start > pos + 1 and start != sought):
                if container is None or start == 0:  # the file's start: open it afresh rather than seek
                    if container is not None:
                        container.close()
                    container = av.open(str(path))
                    stream = container.streams.video[0]
                    stream.thread_type = PYAV_THREAD_TYPE
                    count = 0
                if start > 0:
                    container.seek(int(pts[start]), stream=stream, backward=True, any_frame=False)
                frames, fresh, pos, sought = _decode(container, stream), True, start - 1, start
            try:
                frame = next(frames, None)
            except av.error.FFmpegError:  # damaged data ends decoding as the end of the stream does
                frame = None
            if frame is None:  # end of the stream
                if fresh and start > 0:  # this seek found nothing to decode: start from an earlier keyframe
                    back, frames = back + 1, None
                    continue
                if prev is None:
                    raise VideoError(f"{path}: no frame could be decoded (the data is damaged or the codec is "
                                     f"unsupported: {info.codec})")
                last = _to_rgb(prev)
                out.update((i, last) for i in unique[t:])
                break
            if pts is None:
                index, count = count, count + 1
            else:
                stamp = frame.pts if frame.pts is not None else frame.dts
                index = int(np.searchsorted(pts, stamp)) if stamp is not None else len(pts)
                if index >= len(pts) or pts[index] != stamp:
                    continue  # a frame the packets did not announce: it has no index
            if fresh and index > target and start > 0:  # the seek landed past the target
                back, frames = back + 1, None
                continue
            fresh = False
            while t < len(unique) and unique[t] < index:  # frames the decoder did not output
                out[unique[t]] = _to_rgb(prev if prev is not None else frame)
                t += 1
            prev, pos = frame, index
            if t < len(unique) and unique[t] == index:
                out[index] = _to_rgb(frame)
                t, back = t + 1, 0
    finally:
        if container is not None:
            container.close()
    return out
