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

Environment: `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HOME` / `HF_HUB_CACHE` as for huggingface_hub;
`MVIT_ZOO_HUB_ORG` (this project's Hub organisation, default 'mvit-zoo'), `MVIT_ZOO_CACHE` (where
converted official checkpoints go, default `$HF_HOME/mvit-zoo`), `MVIT_ZOO_CHECK_UPDATES=1` (ask the Hub
for a newer revision even when a cached copy exists).

Every failure raises an error that says what went wrong and what to do; a corrupt cached file is
removed, so that the next load fetches it afresh instead of failing the same way.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsError", "WeightsUnavailableError", "CorruptCheckpointError", "UnsafeCheckpointError", "HashMismatchError",
    "WeightSource", "hub_org", "hub_repo_id", "cache_dir", "read_checkpoint", "save_safetensors", "download_url",
    "resolve_weights", "load_pretrained",
]

_logger = logging.getLogger(__name__)

HUB_ORG_ENV = "MVIT_ZOO_HUB_ORG"
CACHE_ENV = "MVIT_ZOO_CACHE"
CHECK_UPDATES_ENV = "MVIT_ZOO_CHECK_UPDATES"
DEFAULT_HUB_ORG = "mvit-zoo"
WEIGHTS_NAME = "model.safetensors"
OFFLINE_HINT = "cannot reach the Hub; set HF_ENDPOINT / HF_HUB_OFFLINE or pass a file"
_FILE_HINT = "pretrained_cfg_overlay=dict(file='path/to/weights')"


class WeightsError(RuntimeError):
    """Base class of the weight-loading errors."""


class WeightsUnavailableError(WeightsError):
    """No source could provide the weights (no network and no cache, unknown repository, no weights)."""


class CorruptCheckpointError(WeightsError):
    """A weight file is truncated or not a checkpoint; a cached copy has been removed."""


class UnsafeCheckpointError(WeightsError):
    """A pickled checkpoint holds objects other than tensors and plain containers: refused."""


class HashMismatchError(WeightsError):
    """A downloaded file's content does not match its published hash; nothing was cached."""


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


def hub_repo_id(hf_hub_id: str) -> tuple[str, Optional[str]]:
    """(repository, revision) of a tag's `hf_hub_id` ('org/name' or 'org/name@revision'). A repository in
    the default organisation moves to `hub_org()`, so MVIT_ZOO_HUB_ORG applies even after import."""
    repo, _, revision = hf_hub_id.partition("@")
    org, _, name = repo.partition("/")
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
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def _forget_cached(path: Path) -> None:
    """Remove a bad cached file and, for an HF cache snapshot link, the blob it points to."""
    for p in {path.resolve(), path}:
        try:
            p.unlink()
        except (FileNotFoundError, IsADirectoryError):
            pass


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _in_cache(path: Path) -> bool:
    return _within(path, _hub_cache()) or _within(path, cache_dir())


def _refused_detail(text: str) -> str:
    """What torch's weights_only unpickler refused ('Unsupported global: GLOBAL exec'), without the rest of
    its message, which advises an unsafe load and holds terminal escape codes."""
    m = re.search(r"Unsupported (global|class): \S+( \S+)?|GLOBAL \S+ was not an allowed global|Unsupported operand \d+",
                  text)
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


def read_checkpoint(path: str | os.PathLike, *, forget_if_corrupt: Optional[bool] = None) -> dict[str, Any]:
    """Read a checkpoint without running code from it: safetensors, or a pickle via
    `torch.load(weights_only=True)` (which refuses anything but tensors and plain containers).

    A corrupt file inside a cache (HF's or mvit-zoo's; or any file if `forget_if_corrupt`) is removed,
    so that the next load downloads it again instead of failing the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    is_safetensors = path.suffix == ".safetensors" or _looks_safetensors(path)
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified and re-raised with a clear message
        text = str(e)
        first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
        forget = _in_cache(path) if forget_if_corrupt is None else forget_if_corrupt
        if not is_safetensors and isinstance(e, pickle.UnpicklingError) and (
                re.search(r"Unsupported (global|class)|GLOBAL \S+ was not an allowed global", text)
                or ("Unsupported operand" in text and _is_pickle(path))):
            if forget:  # a download of ours that can never be used: not kept
                _forget_cached(path)
            raise UnsafeCheckpointError(
                f"refused to load {path}: the pickle holds objects other than tensors and plain containers, and "
                f"unpickling it could run arbitrary code. Only weights_only pickles and safetensors are read; "
                f"re-save the state dict alone (torch.save(model.state_dict(), ...)) with a trusted tool. "
                f"({_refused_detail(text)})") from None
        if forget:
            _forget_cached(path)
        raise CorruptCheckpointError(
            f"cannot read weight file {path}: it is truncated or not a checkpoint ({type(e).__name__}: {first})."
            + (" The cached copy was removed; loading again downloads it afresh." if forget else "")) from None


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a state dict as safetensors atomically: a temporary file in the same folder, then a rename,
    so an interrupted write never leaves a partial file under the final name."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp,
                  metadata={"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def _expected_hash(url: str, known: Optional[str]) -> Optional[str]:
    """The published hash of `url`: given explicitly, or torchvision's `name-<sha256 prefix>.pth` rule."""
    if known:
        return known.lower()
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", url)
    return m.group(1) if m else None


class _Unreachable(Exception):
    """A server could not be reached, or refused the request (the caller decides what to say)."""


def download_url(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, timeout: float = 60.0) -> str:
    """Download `url` to `dest` atomically (temporary file, length and hash check, rename); returns the
    file's SHA-256. Raises HashMismatchError / CorruptCheckpointError (nothing is written under `dest`),
    or `_Unreachable` when the server cannot be reached or answers with an error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urlopen(Request(url, headers={"User-Agent": "mvit-zoo"}),  # noqa: S310
                                                      timeout=timeout) as response:
                expected_len = response.headers.get("Content-Length")
                size = 0
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except http.client.IncompleteRead as e:
            raise CorruptCheckpointError(
                f"download of {url} was cut short ({len(e.partial)} bytes in the last read, "
                f"{e.expected} missing); nothing was cached, try again") from None
        except HTTPError as e:
            raise _Unreachable(f"HTTP {e.code} {e.reason}") from None
        except (URLError, OSError, TimeoutError, http.client.HTTPException) as e:
            raise _Unreachable(str(getattr(e, "reason", e))) from None
        if expected_len is not None and size != int(expected_len):
            raise CorruptCheckpointError(
                f"download of {url} was cut short: {size} of {expected_len} bytes; nothing was cached, try again")
        digest = h.hexdigest()
        if sha256 and not digest.startswith(sha256):
            raise HashMismatchError(
                f"downloaded {url} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...: the file is corrupt or "
                f"was replaced upstream. Nothing was cached; try again, or pass a verified file with {_FILE_HINT}")
        os.replace(tmp, dest)
        return digest
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------------
# Resolving a pretrained cfg to a file
# --------------------------------------------------------------------------------------------------

def _cfg_get(pcfg: Any, key: str, default: Any = None) -> Any:
    value = pcfg.get(key, default) if isinstance(pcfg, Mapping) else getattr(pcfg, key, default)
    return default if value is None else value


def _tag_name(pcfg: Any) -> str:
    arch, tag = _cfg_get(pcfg, "architecture") or "model", _cfg_get(pcfg, "tag")
    return f"{arch}.{tag}" if tag else arch


def _converted_path(pcfg: Any, url: str) -> Path:
    """Cache file of the converted official checkpoint: named by tag, keyed by the URL."""
    key = hashlib.sha256(url.encode()).hexdigest()[:12]
    return cache_dir() / f"{_tag_name(pcfg)}-{key}.safetensors"


def _hub_cached(repo: str, filename: str, revision: Optional[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


class _HubMissing(Exception):
    """The repository, revision or file does not exist on the Hub (or is private / gated)."""


def _hub_download(repo: str, filename: str, revision: Optional[str]) -> Path:
    """Download a Hub file into the HF cache and check its content against its hash (one retry)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    for attempt in range(2):
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError) the Hub could not be reached
            cause = e.__cause__ or e
            raise _Unreachable(f"{type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}")
        except RevisionNotFoundError:
            raise _HubMissing(f"revision {revision!r} of {repo} does not exist") from None
        except RepositoryNotFoundError:
            raise _HubMissing(f"repository {repo} does not exist (or is private / gated)") from None
        except EntryNotFoundError:
            raise _HubMissing(f"repository {repo} has no {filename}") from None
        except HfHubHTTPError as e:
            raise _Unreachable(f"HTTP error: {str(e).splitlines()[0][:200]}") from None
        except Exception as e:  # noqa: BLE001 - httpx protocol errors, consistency checks of short bodies
            raise CorruptCheckpointError(
                f"download of {repo}/{filename} from {_endpoint()} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was cached, try again") from None
        if _blob_is_intact(path):
            return path
        _forget_cached(path)
        _logger.warning("%s/%s: downloaded content does not match its hash; removed, %s", repo, filename,
                        "retrying" if attempt == 0 else "giving up")
    raise HashMismatchError(
        f"{repo}/{filename} from {_endpoint()}: the downloaded content does not match the hash the Hub gives "
        f"for it, twice. The cache entry was removed; try again later, or pass a verified file with {_FILE_HINT}")


def _from_url(pcfg: Any, url: str, model: nn.Module) -> Path:
    """Official checkpoint -> converted safetensors in mvit-zoo's cache (downloaded and converted once)."""
    from .convert import to_native

    converted = _converted_path(pcfg, url)
    raw = cache_dir() / "downloads" / url.rstrip("/").rsplit("/", 1)[-1]
    expected = _expected_hash(url, _cfg_get(pcfg, "file_sha256"))
    try:  # a download kept from an earlier attempt whose conversion failed (wrong model for the file)
        digest: Optional[str] = sha256_file(raw)
        if expected and not digest.startswith(expected):
            raw.unlink(missing_ok=True)
            digest = None
    except FileNotFoundError:
        digest = None
    if digest is None:
        digest = download_url(url, raw, expected)
    checkpoint = read_checkpoint(raw, forget_if_corrupt=True)
    sd, layout = to_native(checkpoint, model)  # on a mismatch the download stays for the right model
    save_safetensors(sd, converted, metadata={
        "source_url": url, "source_sha256": digest, "source_layout": layout, "architecture": _tag_name(pcfg)})
    raw.unlink(missing_ok=True)  # another process may have converted it at the same time
    return converted


def resolve_weights(pcfg: Any, model: nn.Module) -> WeightSource:
    """The local file that holds the weights of pretrained cfg `pcfg` (see the module docstring)."""
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
    if not hf_hub_id and not url:
        raise WeightsUnavailableError(
            f"{tag} has no published weights; use pretrained=False, pick a tag with weights "
            f"(mvit_zoo.list_pretrained()), or pass a file with {_FILE_HINT}")
    filename = _cfg_get(pcfg, "hf_hub_filename") or WEIGHTS_NAME
    repo, revision = hub_repo_id(hf_hub_id) if hf_hub_id else (None, None)

    # 1. caches, no request
    check_updates = os.environ.get(CHECK_UPDATES_ENV, "").lower() in ("1", "true", "yes") and not _offline()
    if repo and not check_updates:
        cached = _hub_cached(repo, filename, revision)
        if cached is not None:
            return WeightSource(cached, "hub-cache", repo)
    if url and _converted_path(pcfg, url).is_file():
        return WeightSource(_converted_path(pcfg, url), "url-cache", url)
    if _offline():
        raise WeightsUnavailableError(
            f"{tag}: HF_HUB_OFFLINE is set and the weights are not cached (looked for {repo or '-'}/{filename} in "
            f"{_hub_cache()} and for a converted {url or 'official checkpoint'} in {cache_dir()}): {OFFLINE_HINT} "
            f"({_FILE_HINT})")

    # 2. the Hub
    problems = []
    unreachable = False
    if repo:
        try:
            return WeightSource(_hub_download(repo, filename, revision), "hub", repo)
        except _HubMissing as e:
            problems.append(f"{e} on {_endpoint()}")
        except _Unreachable as e:
            unreachable = True
            problems.append(f"the Hub at {_endpoint()} did not answer ({e})")
    # 3. the official checkpoint
    if url:
        try:
            return WeightSource(_from_url(pcfg, url, model), "url", url)
        except _Unreachable as e:
            problems.append(f"cannot download {url} ({e})")
            unreachable = True
    if unreachable:
        raise WeightsUnavailableError(f"{tag}: {OFFLINE_HINT} ({_FILE_HINT}); {'; '.join(problems)}")
    raise WeightsUnavailableError(f"{tag}: no weights found: {'; '.join(problems)}, and the tag has no official "
                                  f"checkpoint URL to fall back to; pass a file with {_FILE_HINT}")


def load_pretrained(model: nn.Module, pcfg: Any = None, *, inflate: str = "mean") -> WeightSource:
    """Load the weights of pretrained cfg `pcfg` (default: the model's own) into `model`, after fitting
    every tensor to it (`mvit_zoo.convert_state_dict`); returns where they came from.

    The classifier is left out only when the model was built for another class count than the tag's
    (or without a classifier); otherwise a checkpoint whose classifier differs is an error, never a
    silently random head. Nothing is loaded unless everything fits.
    """
    from .convert import CheckpointMismatchError, convert_state_dict

    pcfg = model.pretrained_cfg if pcfg is None else pcfg
    source = resolve_weights(pcfg, model)
    checkpoint = read_checkpoint(source.path)
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
    result = model.load_state_dict(sd, strict=False)
    left = set(result.missing_keys) - set(sd.report.fresh)
    if left or result.unexpected_keys:  # convert_state_dict already checked; this guards against drift
        raise CheckpointMismatchError(f"{_tag_name(pcfg)}: missing {sorted(left)}, unexpected {result.unexpected_keys}")
    if sd.report.dropped:
        _logger.info("%s: classifier left out (%s); the model keeps its new %d-class head", _tag_name(pcfg),
                     ", ".join(sd.report.dropped), getattr(model, "num_classes", 0))
    return source
