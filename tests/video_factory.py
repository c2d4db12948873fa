"""Small test videos whose frames carry their own index, written with PyAV.

Each frame is a 4 x 4 grid of blocks: blocks 0-11 hold the frame index in binary (most significant bit first), blocks
12-15 its bit count modulo 16 as a check. A block is yellow (`ON`) for 1 and dark blue (`OFF`) for 0, colours far apart
in luma and chroma, so lossy codecs (H.264, VP9, MPEG-4, GIF's 256-colour palette) keep every bit, and a red/blue
swap or a wrong colour matrix shows in the block means. :func:`frame_index` reads the index back and refuses a frame
whose blocks are ambiguous or whose check fails, so a test never takes a garbled frame for another.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["MAX_INDEX", "ON", "OFF", "code_frame", "frame_index", "make_video", "make_huge_gif", "truncate_packets"]

GRID = 4  # blocks per side
INDEX_BITS = 12
CHECK_BITS = GRID * GRID - INDEX_BITS
MAX_INDEX = 2**INDEX_BITS - 1
ON = (230, 200, 90)
OFF = (30, 40, 110)


def _bits(index: int) -> list[int]:
    check = bin(index).count("1") % 2**CHECK_BITS
    return [(index >> b) & 1 for b in reversed(range(INDEX_BITS))] + [
        (check >> b) & 1 for b in reversed(range(CHECK_BITS))]


def code_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    """The RGB uint8 frame `(height, width, 3)` that encodes `index` (0 to `MAX_INDEX`)."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} out of the code's range [0, {MAX_INDEX}]")
    frame = np.empty((height, width, 3), np.uint8)
    ys, xs = np.linspace(0, height, GRID + 1).astype(int), np.linspace(0, width, GRID + 1).astype(int)
    for b, bit in enumerate(_bits(index)):
        r, c = divmod(b, GRID)
        frame[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = ON if bit else OFF
    return frame


def frame_index(frame: np.ndarray) -> int:
    """The index a decoded `(H, W, 3)` frame of :func:`code_frame` encodes; ValueError if it is not readable."""
    height, width = frame.shape[:2]
    ys, xs = np.linspace(0, height, GRID + 1).astype(int), np.linspace(0, width, GRID + 1).astype(int)
    mid_on, mid_off = np.mean(ON), np.mean(OFF)
    bits = []
    for b in range(GRID * GRID):
        r, c = divmod(b, GRID)
        # the block's inner half: codecs blur the block edges
        dy, dx = (ys[r + 1] - ys[r]) // 4, (xs[c + 1] - xs[c]) // 4
        level = float(frame[ys[r] + dy:ys[r + 1] - dy, xs[c] + dx:xs[c + 1] - dx].mean())
        if abs(level - (mid_on + mid_off) / 2) < (mid_on - mid_off) / 4:
            raise ValueError(f"block {b} reads {level:.0f}, between OFF ({mid_off:.0f}) and ON ({mid_on:.0f})")
        bits.append(int(level > (mid_on + mid_off) / 2))
    index = int("".join(map(str, bits[:INDEX_BITS])), 2)
    if bits != _bits(index):
        raise ValueError(f"frame reads index {index} but its check bits do not match")
    return index


def make_video(
        path: str | Path,
        num_frames: int,
        fps: int = 30,
        codec: str = "libx264",
        gop: int | None = None,
        bframes: int | None = None,
        vfr_pts: Sequence[int] | None = None,
        size: tuple[int, int] = (64, 48),
        time_base: Fraction | None = None,
        faststart: bool = False,
) -> Path:
    """Write `num_frames` coded frames (frame `i` encodes `i`) to `path`; the container follows the suffix.

    `codec`: 'libx264', 'libvpx-vp9', 'mpeg4' or 'gif'. `gop`: a keyframe every `gop` frames (fixed, no scene cuts).
    `bframes`: B-frames between references (H.264, MPEG-4). `vfr_pts`: each frame's pts in `time_base` (default
    1/1000 s) for a variable frame rate. `size` is `(width, height)`. `faststart`: an MP4 with its index (the
    sample tables) before the frames.
    """
    path = Path(path)
    width, height = size
    options = {}
    with av.open(str(path), mode="w", options={"movflags": "+faststart"} if faststart else None) as container:
        if codec == "gif":
            stream = container.add_stream("gif", rate=fps)
            stream.pix_fmt = "rgb8"
        else:
            if codec == "libx264":
                options = {"crf": "18", "preset": "fast", "sc_threshold": "0"}
            elif codec == "libvpx-vp9":
                options = {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"}
            elif codec == "mpeg4":
                options = {"qscale": "3"}
            if gop is not None:
                options.update(g=str(gop), keyint_min=str(gop))
            if bframes is not None:
                options["bf"] = str(bframes)
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.pix_fmt = "yuv420p"
        stream.width, stream.height = width, height
        if vfr_pts is not None:
            stream.codec_context.time_base = time_base or Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(code_frame(i, width, height), format="rgb24")
            if vfr_pts is not None:
                frame.pts = int(vfr_pts[i])
                frame.time_base = stream.codec_context.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def truncate_packets(path: str | Path, keep: int) -> int:
    """Cut a video file just before its packet `keep` (in file order), as an interrupted download or copy does.

    For an MP4 written with its index first (`make_video(..., faststart=True)`) the header still
    declares every frame. Returns the new size in bytes.
    """
    with av.open(str(path)) as container:
        positions = sorted(p.pos for p in container.demux(video=0) if p.size)
    size = positions[keep]
    with open(path, "r+b") as f:
        f.truncate(size)
    return size


def make_huge_gif(path: str | Path, width: int = 65535, height: int = 65535) -> Path:
    """A ~50-byte animated GIF that declares `width x height` frames (a decoder would allocate them in full)."""
    screen = width.to_bytes(2, "little") + height.to_bytes(2, "little") + bytes([0x80, 0, 0])  # 2-colour table
    palette = bytes([0, 0, 0, 255, 255, 255])
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    image = b"\x2c" + bytes(4) + screen[:4] + b"\x00" + b"\x02\x02\x44\x01\x00"  # one LZW sub-block, then end
    Path(path).write_bytes(b"GIF89a" + screen + palette + loop + (b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + image) * 2
                           + b"\x3b")
    return Path(path)


def count_decoded(monkeypatch) -> list[int]:
    """The pts of every frame the package's PyAV reader decodes from now on (through its one decoding place,
    `mvit_zoo.data.reader._decode`), for tests that check a read decodes only what it needs."""
    from mvit_zoo.data import reader

    decoded: list[int] = []
    decode = reader._decode

    def counting_decode(container, stream):
        for frame in decode(container, stream):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(reader, "_decode", counting_decode)
    return decoded
