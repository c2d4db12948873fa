"""Pretrained weights: find them, download them safely, convert them once, load them strictly.

Sources for a pretrained tag, tried in order:

1. `file`, a local file given with `pretrained_cfg_overlay=dict(file=...)`, if set;
2. what is already cached, without any request: the Hub file in the standard Hugging Face cache,
   else the converted copy of the official checkpoint in mvit-zoo's cache (`cache_dir()`);
3. the Hugging Face Hub: `hf_hub_id` (timm's repositories for the 2-D ImageNet tags, this project's
   organisation for the others), file `model.safetensors`, cached in the standard HF cache. A freshly
   downloaded file is checked against the content hash the Hub names it by (huggingface_hub does not).
4. if that repository or file does not exist (or the Hub cannot be reached), the official checkpoint
   `url` (torchvision `.pth`, PySlowFast / pytorchvideo `.pyth`): downloaded once with a hash check
   where the hash is known (given as `file_sha256`, or torchvision's `-<sha256 prefix>.pth` names),
   read with `torch.load(weights_only=True)` (arbitrary pickled objects are refused), renamed to
   mvit-zoo's layout and stored as safetensors, so that the next load is a plain safetensors read.
   Another conversion of the same file (a whole detector: `mvit_zoo.detection.detectron2_detector`) is
   stored apart, under its `variant` name (`resolve_weights(..., convert=, variant=)`).

Environment: `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_DOWNLOAD_TIMEOUT` (read
timeout of the Hub's file transfers), `HF_HUB_DISABLE_PROGRESS_BARS` as for huggingface_hub;
`MVIT_ZOO_HUB_ORG` (this project's Hub organisation, default 'mvit-zoo'), `MVIT_ZOO_CACHE` (where
converted official checkpoints go, default `$HF_HOME/mvit-zoo`), `MVIT_ZOO_CHECK_UPDATES=1` (ask the Hub
for a newer revision even when a cached copy exists), `MVIT_ZOO_DOWNLOAD_TIMEOUT` (seconds to wait for a
server to connect and to answer, on the Hub's metadata request and on official URLs; default 10).

Every failure raises an error that says what went wrong and what to do: `WeightsUnavailableError` (no
source could provide the weights; `DownloadError`, one server failed), `CacheError` (the cache cannot be
written), `CorruptCheckpointError`, `UnsafeCheckpointError`, `HashMismatchError`, `InvalidWeightsError`,
`SettingError` (an environment variable above has a value that cannot be used).
A corrupt cached Hub file is removed, so that the next load fetches it afresh instead of failing the same
way. A cached Hub file is checked against the hash it is named by, and a converted official checkpoint
against the SHA-256 recorded beside it when it was written (`<file>.sha256`), on its first use in a process.

Every weight file is read by `read_weights` (the checks below) and every training state by
`read_training_state`: a pickle's tensors must own their bytes (a view that repeats or overlaps its storage,
e.g. `expand`ed, would grow gigabytes from a small file when made contiguous), then every tensor must be
floating point and finite (`check_state_dict`). `check_build_size` compares the size of a model built from
a config (on the meta device, no memory) with what a weight file declares, before the model is built.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import math
import os
import pickle
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import torch
from torch import Tensor, nn

from ..files import atomic_write, part_file

__all__ = [
    "CacheError",
    "Converter",
    "CorruptCheckpointError",
    "DownloadError",
    "HashMismatchError",
    "InvalidWeightsError",
    "SettingError",
    "UnsafeCheckpointError",
    "WeightSource",
    "WeightsError",
    "WeightsUnavailableError",
    "cache_dir",
    "check_build_size",
    "check_state_dict",
    "download_timeout",
    "download_url",
    "hub_org",
    "hub_repo_id",
    "load_pretrained",
    "read_checkpoint",
    "read_training_state",
    "read_weights",
    "resolve_weights",
    "save_safetensors",
    "sha256_file",
    "weights_numel",
]

_logger = logging.getLogger(__name__)

HUB_ORG_ENV = "MVIT_ZOO_HUB_ORG"
CACHE_ENV = "MVIT_ZOO_CACHE"
CHECK_UPDATES_ENV = "MVIT_ZOO_CHECK_UPDATES"
TIMEOUT_ENV = "MVIT_ZOO_DOWNLOAD_TIMEOUT"
DEFAULT_HUB_ORG = "mvit-zoo"
DEFAULT_TIMEOUT = 10.0
WEIGHTS_NAME = "model.safetensors"
STALE_PART_SECONDS = 3600.0  # an interrupted download's .part file untouched this long (and unlocked) is removed
OFFLINE_HINT = "cannot reach the Hub; set HF_ENDPOINT / HF_HUB_OFFLINE or pass a file"
_FILE_HINT = "pretrained_cfg_overlay=dict(file='path/to/weights')"
# checkpoint (a read_weights state dict), model -> (state dict in the model's names, source layout)
Converter = Callable[[Mapping[str, Tensor], nn.Module], tuple[Mapping[str, Tensor], str]]


class WeightsError(RuntimeError):
    """Base class of the weight-loading errors."""


class WeightsUnavailableError(WeightsError):
    """No source could provide the weights.

    Besides the message, it says what happened in fields a front end can word in its own terms:
    `tag`; `summary` (what failed, in a few words); `details` (what each source answered);
    `reason`: 'offline' (HF_HUB_OFFLINE is set and nothing is cached), 'unreachable' (no server answered),
    'missing' (no such repository, file or URL) or 'none' (the tag has no published weights).
    """

    def __init__(self, message: str, *, tag: str = "", summary: str = "", details: str = "",
                 reason: str = "missing") -> None:
        super().__init__(message)
        self.tag, self.summary, self.details, self.reason = tag, summary or message, details, reason


class DownloadError(WeightsUnavailableError):
    """One server could not provide a file: `reason` 'unreachable' (connection refused, no route, DNS),
    'timeout' (no answer within `download_timeout()`), 'missing' (HTTP 404 / 410) or 'http' (another
    HTTP error status); `url` is what was asked for."""

    def __init__(self, url: str, reason: str, detail: str) -> None:
        super().__init__(f"cannot download {url}: {detail}", summary=detail, details=url, reason=reason)
        self.url = url


class CacheError(WeightsError):
    """A cache folder cannot be written (full disk, read-only, no permission); `errno` says which."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


class CorruptCheckpointError(WeightsError):
    """A weight file is truncated or not a checkpoint; a cached copy has been removed."""


class UnsafeCheckpointError(WeightsError):
    """A pickled checkpoint holds objects other than tensors and plain containers: refused."""


class HashMismatchError(WeightsError):
    """A downloaded file's content does not match its published hash; nothing was cached."""


class InvalidWeightsError(WeightsError):
    """A checkpoint's tensors cannot be weights: an integer / bool dtype, NaN / Inf values, a view that
    repeats its storage's bytes, or far fewer values than the model they are to be loaded into."""


class SettingError(WeightsError):
    """An environment variable (`MVIT_ZOO_*`, `HF_HOME`, ...) has a value that cannot be used; the message
    names the variable. Not a ValueError: a front end must not blame it on its own arguments."""


@dataclass(frozen=True)
class WeightSource:
    """Where loaded weights came from: `kind` is 'file', 'hub-cache', 'hub', 'url-cache' or 'url';
    `origin` the file, Hub repository or URL; `path` the local file that was read."""

    path: Path
    kind: str
    origin: str


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

def hub_org() -> str:
    """Hub organisation of this project's converted weights (env MVIT_ZOO_HUB_ORG, default 'mvit-zoo')."""
    return os.environ.get(HUB_ORG_ENV) or DEFAULT_HUB_ORG


_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")  # huggingface_hub's rule for a name


def hub_repo_id(hf_hub_id: str) -> tuple[str, str | None]:
    """(repository, revision) of a tag's `hf_hub_id` ('org/name' or 'org/name@revision'). A repository in
    the default organisation moves to `hub_org()`, so MVIT_ZOO_HUB_ORG applies even after import; a value
    of it that is no Hub name is a `SettingError`."""
    repo, _, revision = hf_hub_id.partition("@")
    org, _, name = repo.partition("/")
    env = os.environ.get(HUB_ORG_ENV)
    if env and org in (DEFAULT_HUB_ORG, env) and (not _HUB_NAME.fullmatch(env) or "--" in env or ".." in env):
        raise SettingError(f"{HUB_ORG_ENV}={env!r} is not a Hugging Face organisation name (letters, digits, '-', "
                           f"'_', '.'; up to 96); set it to your organisation, e.g. my-org, or unset it for "
                           f"{DEFAULT_HUB_ORG!r}")
    if org == DEFAULT_HUB_ORG and name:
        repo = f"{hub_org()}/{name}"
    return repo, revision or None


def cache_dir() -> Path:
    """Where converted official checkpoints are kept: $MVIT_ZOO_CACHE, else `<HF_HOME>/mvit-zoo`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "mvit-zoo"


def download_timeout() -> float:
    """Seconds to wait for a server to connect and to answer each read (env MVIT_ZOO_DOWNLOAD_TIMEOUT,
    default 10): the Hub's metadata request and official URL downloads give up after it, without retries."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise SettingError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds; set it to e.g. 30, or unset it "
                         f"for the default {DEFAULT_TIMEOUT:g}")
    return seconds


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


# --------------------------------------------------------------------------------------------------
# Reading, checking and writing files
# --------------------------------------------------------------------------------------------------

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of `path` and its parents that exists and is not a folder, when that is one of its
    parents (a file where a cache folder should be)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _not_a_folder(path: Path) -> SettingError | None:
    """The error for a cache path below a file, naming the setting that points there (HF_HOME, ...)."""
    from huggingface_hub import constants

    blocker = _file_in_the_way(path)
    if blocker is None:
        return None
    settings = [(CACHE_ENV, os.environ.get(CACHE_ENV)), ("HF_HUB_CACHE", constants.HF_HUB_CACHE),
                ("HF_HOME", constants.HF_HOME)]
    for env, value in settings:
        if value and (blocker == Path(value) or blocker in Path(value).parents) and _within(path, Path(value)):
            return SettingError(f"{env}={value} is not a folder: {blocker} is a file, so {path} cannot be "
                                f"created; point {env} at a folder (or move that file away)")
    return SettingError(f"cannot create {path}: {blocker} is a file, not a folder; move it away or point "
                        f"{CACHE_ENV} / HF_HOME elsewhere")


def _cache_error(e: OSError, path: Path, env: str) -> CacheError | SettingError:
    """The error for a failed write into a cache folder, with the fix for its cause."""
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocked = _not_a_folder(path)
        if blocked is not None:
            return blocked
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space on that disk, or point {env} to a disk with room"
    else:
        fix = f"point {env} to a folder you can write, or pass a local file with {_FILE_HINT}"
    return CacheError(f"cannot write {path}: {e.strerror or e} ({errno.errorcode.get(e.errno or 0, 'OSError')}); "
                      f"{fix}", e.errno)


def _remove(path: Path) -> OSError | None:
    """Remove a file if it exists; returns the error instead of raising it (a read-only cache must not hide
    the error that made the caller clean up)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, IsADirectoryError):
        pass
    except OSError as e:
        return e
    return None


def _forget_cached(path: Path) -> OSError | None:
    """Remove a bad cached file and, for an HF cache snapshot link, the blob it points to; returns the
    error of a removal that failed."""
    failed = None
    for p in {path.resolve(), path}:
        failed = _remove(p) or failed
    return failed


def _forgot(path: Path, failed: OSError | None) -> str:
    """What the message says about a bad cached copy after `_forget_cached`."""
    if failed is None:
        return " The cached copy was removed; loading again downloads it afresh."
    return f" The cached copy could not be removed ({failed.strerror or failed}); delete {path.resolve()} by hand."


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _in_cache(path: Path) -> bool:
    return _within(path, _hub_cache()) or _within(path, cache_dir())


_REFUSALS = re.compile(
    r"GLOBAL \S+ (?:was not an allowed global|whose module \S+ is blocked)|unrecognized function [^\n]*?(?= which|\n|$)"
    r"|Can only create new object[^\n]*|``[^`]+`` must be imported to load \w+|Unsupported operand \d+"
    r"|String is too long|unsupported persistent id encountered|Can only append to lists[^\n]*")


def _refused_detail(text: str) -> str:
    """What torch's weights_only unpickler refused ('GLOBAL posix.system whose module posix is blocked'),
    without the rest of its message, which advises an unsafe load and holds terminal escape codes."""
    m = _REFUSALS.search(text)
    return m.group(0) if m else "not a weights-only pickle"


def _is_pickle(path: Path) -> bool:
    """Whether the file (or a torch zip archive's data.pkl) is a well-formed pickle opcode stream rather
    than random bytes. pickletools only parses opcodes: nothing is imported or run."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as f:
                    ops = [op.name for op, _, _ in pickletools.genops(f)]
        else:
            with open(path, "rb") as f:
                ops = [op.name for op, _, _ in pickletools.genops(f)]
        return bool(ops) and ops[-1] == "STOP"
    except Exception:  # noqa: BLE001 - whatever pickletools cannot parse is not a pickle
        return False


def _looks_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28)


def read_checkpoint(path: str | os.PathLike, *, forget_if_corrupt: bool | None = None) -> dict[str, Any]:
    """Read a checkpoint without running code from it: safetensors, a pickle via
    `torch.load(weights_only=True)` (which refuses anything but tensors and plain containers), or a
    detectron2 `.pkl` (numpy arrays only: :func:`mvit_zoo.weights.detectron2.read_detectron2_pkl`).

    Every refusal of torch's weights-only unpickler on a well-formed pickle is an `UnsafeCheckpointError`;
    bytes that are no pickle at all are a `CorruptCheckpointError`; a pickled tensor that is a view
    repeating or overlapping its bytes is an `InvalidWeightsError` (`_check_views`). A corrupt file inside
    a cache (HF's or mvit-zoo's; or any file if `forget_if_corrupt`) is removed, so that the next load
    downloads it again instead of failing the same way. `read_weights` adds the tensor checks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".pkl":  # detectron2's model zoo: a pickle of numpy arrays, which torch's unpickler refuses
        from .detectron2 import read_detectron2_pkl

        return read_detectron2_pkl(path)
    is_safetensors = path.suffix == ".safetensors" or _looks_safetensors(path)
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified and re-raised with a clear message
        text = str(e)
        forget = _in_cache(path) if forget_if_corrupt is None else forget_if_corrupt
        refused = not is_safetensors and isinstance(e, pickle.UnpicklingError)
        if refused and _is_pickle(path):
            if forget:  # a download of ours that can never be used: not kept
                _forget_cached(path)
            raise UnsafeCheckpointError(
                f"refused to load {path}: the pickle holds objects other than tensors and plain containers, and "
                f"unpickling it could run arbitrary code. Only weights_only pickles and safetensors are read; "
                f"re-save the state dict alone (torch.save(model.state_dict(), ...)) with a trusted tool. "
                f"({_refused_detail(text)})") from None
        # NOTE: torch's weights_only messages advise an unsafe load: only the unpickler's own words are quoted
        first = (_refused_detail(text) if refused or "weights_only" in text
                 else text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__)
        failed = _forget_cached(path) if forget else None
        raise CorruptCheckpointError(
            f"cannot read weight file {path}: it is truncated or not a checkpoint ({type(e).__name__}: {first})."
            + (_forgot(path, failed) if forget else "")) from None
    _check_views(checkpoint, path)
    return checkpoint


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """(dotted key, tensor) of every tensor in nested dicts / lists / tuples."""
    if isinstance(obj, Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _check_views(obj: Any, path: Path) -> None:
    """Refuse pickled tensors that would take more memory made contiguous than their file stores: the views
    of each storage (identical ones counted once, as tied weights are) may not span more bytes than it has.
    An `expand()`ed or `as_strided` tensor repeats its bytes: 4 MB in a file, gigabytes once copied."""
    spans: dict[tuple[int, str], int] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, t in _tensors(obj):
        storage = t.untyped_storage()
        view = (storage.data_ptr(), t.device.type, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            continue
        seen.add(view)
        need = t.numel() * t.element_size()
        where = (storage.data_ptr(), t.device.type)
        spans[where] = spans.get(where, 0) + need
        if spans[where] > storage.nbytes():
            raise InvalidWeightsError(
                f"refused to load {path}: tensor {key} {tuple(t.shape)} takes {need:,} bytes, but the file stores "
                f"{storage.nbytes():,} bytes for it and the tensors sharing its data: it is a view that repeats "
                f"or overlaps its data (e.g. expand()ed), which would grow to {spans[where]:,} bytes when copied. "
                f"A weight file stores each tensor's own values; re-save it with each tensor .clone()d")


def weights_numel(weights: str | os.PathLike | Mapping[str, Any]) -> int:
    """How many values a weight file (or folder with model.safetensors, or state dict) holds, without
    reading a safetensors file's data: its header declares every shape (and its length is checked
    against the file's)."""
    if isinstance(weights, Mapping):
        return sum(t.numel() for _, t in _tensors(weights))
    path = Path(weights)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.is_file() and (path.suffix == ".safetensors" or _looks_safetensors(path)):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception as e:  # noqa: BLE001 - a bad header: the reader says what is wrong with it
            raise CorruptCheckpointError(f"cannot read weight file {path}: its safetensors header is damaged "
                                         f"({_first_line(e)})") from None
    from .convert import unwrap_checkpoint

    return weights_numel(unwrap_checkpoint(read_checkpoint(path)))


SIZE_RATIO, SIZE_MARGIN = 2, 1 << 24  # a model may hold 2x the file's values + 16 M (new head, inflated kernels)


def check_build_size(name: str, model_kwargs: Mapping[str, Any], weights: str | os.PathLike | Mapping[str, Any],
                     source: str = "--model-kwargs / config.json") -> int:
    """Refuse, before building it, a model that `weights` cannot be the weights of: one with more than
    `SIZE_RATIO` times the values the weight file holds (+ `SIZE_MARGIN`, for a new classifier, kernels
    inflated to 3-D, larger position tables). The model is built on the meta device, which costs no
    memory, so a small config.json (`depths [1, 1, 2000, 1]`) cannot make the caller allocate gigabytes.
    `source` names where `model_kwargs` came from. Returns the model's parameter + buffer count."""
    import timm

    from .convert import CheckpointMismatchError

    have = weights_numel(weights)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **dict(model_kwargs))
    size = sum(t.numel() for t in model.state_dict().values())
    if size > SIZE_RATIO * have + SIZE_MARGIN:
        what = weights if not isinstance(weights, Mapping) else "the checkpoint"
        raise CheckpointMismatchError(
            f"{name} built with {source} {_kwargs_text(model_kwargs)} would hold {size:,} values "
            f"({size * 4 / 2**30:.2f} GiB in float32), but {what} holds {have:,}: it cannot be this model's "
            f"weights, so the model was not built. Pass the architecture arguments the checkpoint was "
            f"made with (check depths, embed_dim, num_classes)")
    return size


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    import json

    return json.dumps({k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg")}, default=str)


def read_weights(path: str | os.PathLike, *, forget_if_corrupt: bool | None = None) -> dict[str, Tensor]:
    """The state dict of a weight file, checked: read without running code (`read_checkpoint`), unwrapped
    (`convert.unwrap_checkpoint`: `{'model_state': ...}`, a `module.` prefix), every tensor floating point
    and finite (`check_state_dict`). The one reader of weights for every entry point."""
    from .convert import unwrap_checkpoint

    sd = unwrap_checkpoint(read_checkpoint(path, forget_if_corrupt=forget_if_corrupt))
    check_state_dict(sd, str(path))
    return sd


def read_training_state(path: str | os.PathLike) -> Any:
    """A training state (optimizer, scheduler, RNG state: tensors, numbers, strings, plain containers)
    read with `torch.load(weights_only=True)`; a file whose pickle asks for anything else (to run code,
    to build objects) is refused with an `UnsafeCheckpointError` and nothing of it is loaded. A file that
    is no pickle is a `CorruptCheckpointError`; a view repeating its data an `InvalidWeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified and re-raised with a clear message
        if isinstance(e, pickle.UnpicklingError) and _is_pickle(path):
            raise UnsafeCheckpointError(
                f"refused to load {path}: this file asks to run code or build objects that a training state does "
                f"not contain ({_refused_detail(str(e))}); it was not loaded. Do not load it unsafely unless you "
                f"trust its source") from None
        text = str(e)
        first = _refused_detail(text) if "weights_only" in text else _first_line(e)
        raise CorruptCheckpointError(f"cannot read training state {path}: it is truncated or not a torch file "
                                     f"({first})") from None
    _check_views(state, path)
    return state


def check_state_dict(state_dict: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Refuse tensors that cannot be weights, naming them: an integer, bool or complex dtype (loading would
    cast them to float silently), or NaN / Inf values (every output would be NaN). Every mvit-zoo weight
    and buffer is floating point. `source` names the file in the message. One pass over the tensors."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    wrong = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in tensors.items()
             if not v.is_floating_point()]
    if wrong:
        raise InvalidWeightsError(
            f"{source} holds {len(wrong)} tensor(s) that are not floating point: {', '.join(wrong[:8])}"
            f"{' ...' if len(wrong) > 8 else ''}. Weights are float tensors; this file is not a weight checkpoint "
            f"for this model, or it was damaged. Re-export the state dict from the trained model")
    bad = []
    for k, v in tensors.items():
        if v.device.type != "meta" and v.numel():
            finite = torch.isfinite(v)
            if not bool(finite.all()):
                bad.append(f"{k} ({int((~finite).sum())} of {v.numel()})")
    if bad:
        raise InvalidWeightsError(
            f"{source} holds NaN or Inf values in {len(bad)} tensor(s): {', '.join(bad[:8])}"
            f"{' ...' if len(bad) > 8 else ''}. The model would output NaN; use a checkpoint saved before "
            f"training diverged")


def _part_file(path: Path) -> Path:
    """`files.part_file`; a cache that cannot take it is a `CacheError` naming the fix."""
    try:
        return part_file(path)
    except OSError as e:
        raise _cache_error(e, path, CACHE_ENV) from None


def _sha256_record(path: Path) -> Path:
    """Where the SHA-256 of a converted file is recorded: `<file>.sha256`, in `sha256sum` format."""
    return path.with_name(path.name + ".sha256")


def _os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind safetensors' SafetensorError ('... I/O error: No space left on device (os error
    28)'), which carries the errno only in its text."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"\(os error (\d+)\)", str(e))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code))


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, record_sha256: bool = False,
                     env: str = CACHE_ENV) -> Path:
    """Write a state dict as safetensors atomically (`files.atomic_write`): an interrupted write never
    leaves a partial file under the final name. With `record_sha256`, the file's SHA-256 is written to
    `<path>.sha256` before the file appears (`_check_converted` compares them on load). A full disk or
    a folder that cannot be written is a `CacheError` whose fix names `env`, the setting that chose the
    folder."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp, metadata=meta)
        if record_sha256:
            line = f"{sha256_file(tmp)}  {path.name}\n"
            atomic_write(_sha256_record(path), lambda t: t.write_text(line, encoding="ascii"))

    try:
        return atomic_write(path, write)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' SafetensorError around one
        os_error = _os_error_of(e)
        if os_error is None:
            raise
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise CacheError(f"no space left on device while writing {path}: free {-(-need // (1 << 20))} MB "
                             f"there, or point {env} to a disk with room", os_error.errno) from None
        raise _cache_error(os_error, path, env) from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _blob_is_intact(path: Path) -> bool:
    """Check an HF cache file against the hash its blob is named by: the SHA-256 of an LFS file, the
    git blob SHA-1 of a small one. Other names (a local_dir copy, say) cannot be checked: True."""
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return sha256_file(blob) == blob.name
    if re.fullmatch(r"[0-9a-f]{40}", blob.name):
        return _git_blob_sha1(blob) == blob.name
    return True


_intact_blobs: set[tuple[str, int, int, int]] = set()  # (blob, size, mtime, inode) checked in this process


def _blob_key(path: Path) -> tuple[str, int, int, int]:
    blob = path.resolve()
    st = blob.stat()
    return str(blob), st.st_size, st.st_mtime_ns, st.st_ino


def _check_cached_blob(path: Path, origin: str) -> None:
    """A cached Hub file must still hash to the name of its blob (disk errors, a stray write): checked on
    its first use in this process, and again whenever the file changed since."""
    key = _blob_key(path)
    if key in _intact_blobs:
        return
    if not _blob_is_intact(path):
        failed = _forget_cached(path)
        raise CorruptCheckpointError(
            f"cached weight file {path} of {origin} is truncated or not a checkpoint any more: its content does "
            f"not match the hash it is named by ({path.resolve().name[:16]}...), so it changed on disk."
            + _forgot(path, failed))
    _intact_blobs.add(key)


def _expected_hash(url: str, known: str | None) -> str | None:
    """The published hash of `url`: given explicitly (a full SHA-256 or a prefix of one), or torchvision's
    `name-<sha256 prefix>.pth` rule."""
    if known:
        if not re.fullmatch(r"[0-9a-fA-F]{1,64}", known):
            raise ValueError(f"the SHA-256 {known!r} given for {url} is not one: expected hex digits (all 64, or "
                             f"a prefix)")
        return known.lower()
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", url)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------------
# Downloading an official checkpoint
# --------------------------------------------------------------------------------------------------

def _progress(total: int | None, name: str) -> Any:
    """A byte-count bar on stderr, shown as huggingface_hub shows its own: only on a terminal, and never
    with HF_HUB_DISABLE_PROGRESS_BARS=1 or `huggingface_hub.utils.disable_progress_bars()`."""
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None,
                name="mvit_zoo.download")


def _network_error(url: str, e: BaseException, timeout: float) -> DownloadError:
    reason = getattr(e, "reason", e)
    if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(e, (TimeoutError, socket.timeout)):
        return DownloadError(url, "timeout", f"no answer within {timeout:g} s (set {TIMEOUT_ENV} to wait longer)")
    return DownloadError(url, "unreachable", f"cannot connect ({reason})")


def download_url(url: str, dest: str | os.PathLike, sha256: str | None = None,
                 timeout: float | None = None) -> str:
    """Download `url` to `dest` atomically (a temporary file of this process, length and hash check,
    rename); returns the file's SHA-256. `sha256` may be a prefix; `timeout` (default `download_timeout()`)
    bounds the connection and each read. A progress bar shows on a terminal.

    Raises `DownloadError` (server unreachable, no answer in time, HTTP error), `CacheError` (`dest`'s
    folder cannot be written), `CorruptCheckpointError` (cut short) or `HashMismatchError`; nothing is
    left under `dest` or in a temporary file then.
    """
    dest = Path(dest)
    timeout = download_timeout() if timeout is None else timeout
    tmp = _part_file(dest)
    h = hashlib.sha256()
    size = 0
    try:
        try:
            response = urlopen(Request(url, headers={"User-Agent": "mvit-zoo"}), timeout=timeout)
        except HTTPError as e:
            e.close()
            raise DownloadError(url, "missing" if e.code in (404, 410) else "http",
                                f"the server answered HTTP {e.code} {e.reason}") from None
        except (URLError, OSError, http.client.HTTPException) as e:
            raise _network_error(url, e, timeout) from None
        with response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            expected_len = int(length) if length and length.isdigit() else None
            with _progress(expected_len, dest.name) as bar:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except http.client.IncompleteRead as e:
                        size += len(e.partial)
                        break  # reported below, with the byte counts
                    except TimeoutError:
                        raise DownloadError(url, "timeout", f"the server stopped sending after {size} bytes, for "
                                            f"{timeout:g} s (set {TIMEOUT_ENV} to wait longer); nothing was "
                                            f"cached") from None
                    except OSError as e:
                        raise CorruptCheckpointError(f"download of {url} broke off after {size} bytes ({e}); "
                                                     f"nothing was cached, try again") from None
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise _cache_error(e, dest, CACHE_ENV) from None
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if expected_len is not None and size != expected_len:
            raise CorruptCheckpointError(
                f"download of {url} was cut short: {size} of {expected_len} bytes; nothing was cached, try again")
        digest = h.hexdigest()
        if sha256 and not digest.startswith(sha256.lower()):
            raise HashMismatchError(
                f"downloaded {url} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...: the file is corrupt or "
                f"was replaced upstream. Nothing was cached; try again, or pass a verified file with {_FILE_HINT}")
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise _cache_error(e, dest, CACHE_ENV) from None
        return digest
    finally:
        _remove(tmp)


def _part_name(path: Path) -> str | None:
    """The file a `.part` file was downloading to (`.<name>.<random>.part`, see `download_url`)."""
    m = re.fullmatch(r"\.(.+)\.[^.]+\.part", path.name)
    return m.group(1) if m else None


@contextlib.contextmanager
def _download_lock(name: str, url: str) -> Iterator[None]:
    """Hold the lock of official file `name` in mvit-zoo's cache, for as long as one process downloads and
    converts it: concurrent loads (torchrun ranks) wait, then read what the first one converted."""
    from filelock import FileLock, Timeout

    path = cache_dir() / ".locks" / f"{name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _logger.info("another process is downloading %s; waiting for it", url)
            lock.acquire()
    except OSError as e:
        raise _cache_error(e, path, CACHE_ENV) from None
    try:
        yield
    finally:
        lock.release()


def _clean_stale_parts(folder: Path, current: str) -> None:
    """Remove what interrupted downloads left in `folder`: `current`'s `.part` files (this process holds
    its lock, so nobody writes them), and any other unlocked one untouched for `STALE_PART_SECONDS`."""
    from filelock import FileLock, Timeout

    now = time.time()
    for part in folder.glob(".*.part"):
        name = _part_name(part)
        if name is None:
            continue
        try:
            stale = name == current or now - part.stat().st_mtime > STALE_PART_SECONDS
        except FileNotFoundError:
            continue
        if not stale:
            continue
        if name == current:
            _remove(part)
            continue
        lock = FileLock(str(cache_dir() / ".locks" / f"{name}.lock"))
        try:
            with lock.acquire(timeout=0):
                _remove(part)
        except (Timeout, OSError):
            continue  # being downloaded right now, or the lock folder cannot be written: left alone


# --------------------------------------------------------------------------------------------------
# Resolving a pretrained cfg to a file
# --------------------------------------------------------------------------------------------------

def _cfg_get(pcfg: Any, key: str, default: Any = None) -> Any:
    value = pcfg.get(key, default) if isinstance(pcfg, Mapping) else getattr(pcfg, key, default)
    return default if value is None else value


def _tag_name(pcfg: Any) -> str:
    arch, tag = _cfg_get(pcfg, "architecture") or "model", _cfg_get(pcfg, "tag")
    return f"{arch}.{tag}" if tag else arch


def _converted_path(pcfg: Any, url: str, variant: str = "") -> Path:
    """Cache file of the converted official checkpoint: named by tag, keyed by the URL; a `variant` (another
    conversion of the same file, e.g. a whole detector) ends the name, apart from the default conversion."""
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir() / f"{_tag_name(pcfg)}-{key}{'-' + variant if variant else ''}.safetensors"


def _hub_cached(repo: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


class _HubMissing(Exception):
    """The repository, revision or file does not exist on the Hub (or is private / gated)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _hub_failure(e: BaseException, repo: str, filename: str, revision: str | None, url: str,
                 timeout: float | None) -> Exception:
    """The error for what huggingface_hub raised while fetching `repo`/`filename`: its metadata (within
    `timeout`), or the file (`timeout` None: HF_HUB_DOWNLOAD_TIMEOUT bounds each read)."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:  # the Hub could not be reached
        e = e.__cause__
    if isinstance(e, RevisionNotFoundError):
        return _HubMissing(f"revision {revision!r} of {repo} does not exist")
    if isinstance(e, RepositoryNotFoundError):
        return _HubMissing(f"repository {repo} does not exist (or is private / gated)")
    if isinstance(e, EntryNotFoundError):
        return _HubMissing(f"repository {repo} has no {filename}")
    if isinstance(e, httpx2.TimeoutException):
        waited = f"no answer within {timeout:g} s" if timeout else "a read timed out"
        return DownloadError(url, "timeout", f"{waited} ({type(e).__name__}; set {TIMEOUT_ENV}, or "
                                             f"HF_HUB_DOWNLOAD_TIMEOUT for file reads, to wait longer)")
    if isinstance(e, (httpx2.ConnectError, httpx2.ProxyError, httpx2.UnsupportedProtocol, FileMetadataError)):
        return DownloadError(url, "unreachable", _first_line(e))
    if isinstance(e, HfHubHTTPError):
        return DownloadError(url, "http", f"HTTP error: {str(e).splitlines()[0][:200]}")
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _cache_error(e, Path(e.filename or _hub_cache()), "HF_HUB_CACHE")
    # httpx protocol errors (a body cut short), huggingface_hub's consistency checks of short bodies
    return CorruptCheckpointError(f"download of {repo}/{filename} from {_endpoint()} failed ({_first_line(e)}); "
                                  f"nothing was cached, try again")


def _hub_download(repo: str, filename: str, revision: str | None) -> Path:
    """Download a Hub file into the HF cache and check its content against its hash (one retry)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(repo, filename, revision=revision, endpoint=_endpoint())
    timeout = download_timeout()
    # NOTE: when nothing is cached, hf_hub_download retries a failed metadata request five times, with
    # 60 s timeouts and back-off (~25 s when the Hub refuses connections, ~400 s when it accepts and never
    # answers). One request of our own, bounded and without retries, answers first; it costs a HEAD per
    # download, never per cached load.
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - classified
        failure = _hub_failure(e, repo, filename, revision, url, timeout)
        cached = _hub_cached(repo, filename, revision) if isinstance(failure, DownloadError) else None
        if cached is None:
            raise failure from None
        _logger.warning("%s: cannot ask the Hub for a newer %s (%s); using the cached copy", repo, filename,
                        failure.summary)
        _check_cached_blob(cached, repo)
        return cached
    for attempt in range(2):
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=timeout))
        except Exception as e:  # noqa: BLE001 - classified
            raise _hub_failure(e, repo, filename, revision, url, None) from None
        if _blob_is_intact(path):
            _intact_blobs.add(_blob_key(path))
            return path
        _forget_cached(path)
        _logger.warning("%s/%s: downloaded content does not match its hash; removed, %s", repo, filename,
                        "retrying" if attempt == 0 else "giving up")
    raise HashMismatchError(
        f"{repo}/{filename} from {_endpoint()}: the downloaded content does not match the hash the Hub gives "
        f"for it, twice. The cache entry was removed; try again later, or pass a verified file with {_FILE_HINT}")


def _from_url(pcfg: Any, url: str, model: nn.Module, convert: Converter | None = None, variant: str = "") -> Path:
    """Official checkpoint -> converted safetensors in mvit-zoo's cache (downloaded and converted once,
    by one process at a time), with `convert` (default `to_native`) into `variant`'s cache file."""
    from .convert import to_native

    convert = convert or to_native
    converted = _converted_path(pcfg, url, variant)
    name = url.rstrip("/").rsplit("/", 1)[-1]
    raw = cache_dir() / "downloads" / name
    expected = _expected_hash(url, _cfg_get(pcfg, "file_sha256"))
    with _download_lock(name, url):
        if converted.is_file():  # converted by another process while this one waited for the lock
            _check_converted(converted, url)
            return converted
        if raw.parent.is_dir():
            _clean_stale_parts(raw.parent, name)
        try:  # a download kept from an earlier attempt whose conversion failed (wrong model for the file)
            digest: str | None = sha256_file(raw)
            if expected and not digest.startswith(expected):
                _remove(raw)
                digest = None
        except FileNotFoundError:
            digest = None
        if digest is None:
            digest = download_url(url, raw, expected)
            if not expected:
                _logger.warning(
                    "%s: %s has no published SHA-256, so the download was checked only for its length and "
                    "readability (its SHA-256 is %s; MODEL_CARD.md lists the files not verified yet). Set "
                    "file_sha256 in the pretrained cfg to check it", _tag_name(pcfg), url, digest)
        checkpoint = read_weights(raw, forget_if_corrupt=True)
        sd, layout = convert(checkpoint, model)  # on a mismatch the download stays for the right model
        save_safetensors(sd, converted, metadata={
            "source_url": url, "source_sha256": digest, "source_layout": layout, "architecture": _tag_name(pcfg),
            **({"variant": variant} if variant else {})}, record_sha256=True)
        _intact_blobs.add(_blob_key(converted))
        _remove(raw)
    return converted


def _check_converted(path: Path, url: str) -> None:
    """A converted official checkpoint must still hash to the SHA-256 recorded when it was written
    (`<file>.sha256`): checked on its first use in this process, and again whenever the file changed. A
    file that fails (or has no record) is removed with its record, as a corrupt download is."""
    key = _blob_key(path)
    if key in _intact_blobs:
        return
    record = _sha256_record(path)
    try:
        recorded = record.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        recorded = ""
    if re.fullmatch(r"[0-9a-f]{64}", recorded):
        digest = sha256_file(path)
        if digest == recorded:
            _intact_blobs.add(key)
            return
        problem = f"changed on disk: its SHA-256 is {digest[:16]}..., recorded {recorded[:16]}... when it was written"
    else:
        problem = f"has no SHA-256 recorded beside it ({record.name} is missing or unreadable), so it cannot be checked"
    failed = _forget_cached(path) or _remove(record)
    raise CorruptCheckpointError(f"cached converted weight file {path} of {url} {problem}."
                                 + _forgot(path, failed).replace("downloads it afresh", "downloads and converts it "
                                                                                         "afresh"))


def _unavailable(tag: str, reason: str, summary: str, details: str, fix: str) -> WeightsUnavailableError:
    head = f"{tag} {summary}" if summary.startswith("has ") else f"{tag}: {summary}"
    return WeightsUnavailableError(f"{head}; {fix}" + (f"; {details}" if details else ""),
                                   tag=tag, summary=summary, details=details, reason=reason)


def resolve_weights(pcfg: Any, model: nn.Module, *, convert: Converter | None = None,
                    variant: str = "") -> WeightSource:
    """The local file that holds the weights of pretrained cfg `pcfg` (see the module docstring).

    `convert` and `variant` go together: another conversion of the tag's official checkpoint than the default
    (`to_native`, the MViT alone), e.g. a whole detector, cached apart as `<tag>-<url key>-<variant>.safetensors`.
    The Hub is not asked for a variant (its repositories hold the default conversion); a `file` is returned
    as it is, for the caller to convert."""
    if (convert is None) != (variant == ""):
        raise ValueError("resolve_weights: pass convert and variant together (a conversion and its cache name)")
    file = _cfg_get(pcfg, "file")
    if file:
        path = Path(file).expanduser()
        if path.is_dir():  # a published / fine-tuned folder (timm's 'local-dir:' source)
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"pretrained file not found: {path}")
        return WeightSource(path, "file", str(file))
    tag = _tag_name(pcfg)
    hf_hub_id, url = _cfg_get(pcfg, "hf_hub_id"), _cfg_get(pcfg, "url")
    if not url and (variant or not hf_hub_id):
        what = f"has no official checkpoint to convert into a {variant}" if variant else "has no published weights"
        raise _unavailable(tag, "none", what, "",
                           f"use pretrained=False, pick a tag with weights (mvit_zoo.list_pretrained()), or pass a "
                           f"file with {_FILE_HINT}")
    filename = _cfg_get(pcfg, "hf_hub_filename") or WEIGHTS_NAME
    repo, revision = hub_repo_id(hf_hub_id) if hf_hub_id and not variant else (None, None)

    # 1. caches, no request
    check_updates = os.environ.get(CHECK_UPDATES_ENV, "").lower() in ("1", "true", "yes") and not _offline()
    if repo and not check_updates:
        cached = _hub_cached(repo, filename, revision)
        if cached is not None:
            _check_cached_blob(cached, repo)
            return WeightSource(cached, "hub-cache", repo)
    converted = _converted_path(pcfg, url, variant) if url else None
    if converted is not None and converted.is_file():
        _check_converted(converted, url)
        return WeightSource(converted, "url-cache", url)
    if _offline():
        raise _unavailable(
            tag, "offline", "HF_HUB_OFFLINE is set and the weights are not cached",
            f"looked for {repo or '-'}/{filename} in {_hub_cache()} and for a converted "
            f"{url or 'official checkpoint'} in {cache_dir()}",
            f"pass a file with {_FILE_HINT}, use pretrained=False, or unset HF_HUB_OFFLINE to download them")

    # 2. the Hub
    problems = []
    hub_unreachable = url_unreachable = False
    if repo:
        try:
            return WeightSource(_hub_download(repo, filename, revision), "hub", repo)
        except _HubMissing as e:
            problems.append(f"{e} on {_endpoint()}")
        except DownloadError as e:
            hub_unreachable = e.reason != "missing"
            problems.append(f"the Hub at {_endpoint()} did not answer ({e.summary})")
    # 3. the official checkpoint
    if url:
        try:
            return WeightSource(_from_url(pcfg, url, model, convert, variant), "url", url)
        except DownloadError as e:
            if e.reason == "missing" and not hub_unreachable:
                raise _unavailable(tag, "missing", "no weights found", f"{'; '.join(problems + [str(e)])}",
                                   f"the official file has moved: pass a copy of it with {_FILE_HINT}") from None
            problems.append(f"cannot download {url} ({e.summary})")
            url_unreachable = True
    if hub_unreachable:
        raise _unavailable(tag, "unreachable", "cannot reach the Hub", "; ".join(problems),
                           f"set HF_ENDPOINT / HF_HUB_OFFLINE or pass a file ({_FILE_HINT}), or use "
                           f"pretrained=False")
    if url_unreachable:  # the Hub answered that it has no copy; only the official server failed
        host = url.split("/")[2] if "://" in url else url
        raise _unavailable(tag, "unreachable", f"cannot download the official checkpoint {url}", "; ".join(problems),
                           f"check the connection to {host} and try again, or pass a copy of the file with "
                           f"{_FILE_HINT}, or use pretrained=False")
    raise _unavailable(tag, "missing", "no weights found",
                       f"{'; '.join(problems)}, and the tag has no official checkpoint URL to fall back to",
                       f"pass a file with {_FILE_HINT}")


def load_pretrained(model: nn.Module, pcfg: Any = None, *, inflate: str = "mean") -> WeightSource:
    """Load the weights of pretrained cfg `pcfg` (default: the model's own) into `model`, after fitting
    every tensor to it (`mvit_zoo.convert_state_dict`) and checking them (`check_state_dict`); returns
    where they came from.

    The classifier is left out only when the model was built for another class count than the tag's
    (or without a classifier); otherwise a checkpoint whose classifier differs is an error, never a
    silently random head. Nothing is loaded unless everything fits.
    """
    from .convert import CheckpointMismatchError, convert_state_dict

    pcfg = model.pretrained_cfg if pcfg is None else pcfg
    source = resolve_weights(pcfg, model)
    checkpoint = read_weights(source.path)
    tag_classes = _cfg_get(pcfg, "num_classes")
    head = "strict" if tag_classes and getattr(model, "num_classes", None) == tag_classes else "auto"
    try:
        sd = convert_state_dict(checkpoint, model, inflate=inflate, head=head)  # type: ignore[arg-type]
    except CheckpointMismatchError as e:
        hint = ""
        if "head.fc.weight: checkpoint" in str(e):
            hint = (f". To start from these weights with a new {getattr(model, 'num_classes', 0)}-class classifier, "
                    f"tell the loader the checkpoint's class count: pretrained_cfg_overlay=dict(num_classes=N)")
        raise CheckpointMismatchError(f"{_tag_name(pcfg)} weights from {source.origin}: {e}{hint}") from None
    check_state_dict(sd, f"{_tag_name(pcfg)} weights from {source.origin}")
    result = model.load_state_dict(sd, strict=False)
    left = set(result.missing_keys) - set(sd.report.fresh)
    if left or result.unexpected_keys:  # convert_state_dict already checked; this guards against drift
        raise CheckpointMismatchError(f"{_tag_name(pcfg)}: missing {sorted(left)}, unexpected {result.unexpected_keys}")
    if sd.report.dropped:
        _logger.info("%s: classifier left out (%s); the model keeps its new %d-class head", _tag_name(pcfg),
                     ", ".join(sd.report.dropped), getattr(model, "num_classes", 0))
    return source
