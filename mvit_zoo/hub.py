"""Pretrained weights: find them, download them safely, convert them once, load them strictly.

Sources for a pretrained tag, tried in order:
  1. `file` (a local file given with `pretrained_cfg_overlay=dict(file=...)`), if set;
  2. the Hugging Face Hub (`hf_hub_id`, `model.safetensors`, cached in the standard HF cache);
  3. the official checkpoint `url` (torchvision `.pth`, SlowFast / pytorchvideo `.pyth`), downloaded
     once with a hash check where the hash is known, read with `torch.load(weights_only=True)`,
     converted to our layout and cached as safetensors, so the next load is a plain safetensors read.

Every failure raises an error that says what went wrong and what to do.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.error import URLError
from urllib.request import urlopen

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsUnavailableError", "CorruptCheckpointError", "UnsafeCheckpointError", "HashMismatchError",
    "hub_org", "read_checkpoint", "resolve_weights", "load_pretrained", "save_safetensors",
]

HUB_ORG_ENV = "MVIT_ZOO_HUB_ORG"
DEFAULT_HUB_ORG = "mvit-zoo"
WEIGHTS_NAME = "model.safetensors"


class WeightsUnavailableError(RuntimeError):
    """No source could provide the weights (no network and no cache, unknown repository, ...)."""


class CorruptCheckpointError(RuntimeError):
    """A weight file is truncated or not a checkpoint; a cached copy has been removed."""


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint holds objects other than tensors and plain containers: refused."""


class HashMismatchError(RuntimeError):
    """A downloaded file's SHA-256 does not match the published hash."""


def hub_org() -> str:
    """Hub organisation of this project's converted weights (env MVIT_ZOO_HUB_ORG, default 'mvit-zoo')."""
    return os.environ.get(HUB_ORG_ENV, DEFAULT_HUB_ORG)


def cache_dir() -> Path:
    """Where converted official checkpoints are kept: `<HF_HUB_CACHE>/mvit-zoo`."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "mvit-zoo"


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def _forget_cached(path: Path) -> None:
    """Remove a bad file and, for an HF cache snapshot link, the blob it points to."""
    for p in {path, path.resolve()}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _in_cache(path: Path) -> bool:
    from huggingface_hub import constants

    try:
        path.resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
        return True
    except ValueError:
        return False


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without running code from it: safetensors, or a pickle via
    `torch.load(weights_only=True)`. A corrupt file inside a cache is removed so that the next load
    downloads it again instead of failing the same way."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    is_safetensors = path.suffix == ".safetensors" or _looks_safetensors(path)
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classify and re-raise with a clear message
        text = str(e)
        if not is_safetensors and ("Weights only load failed" in text or "Unsupported global" in text
                                   or "unsupported" in text.lower() and "pickle" in text.lower()):
            raise UnsafeCheckpointError(
                f"refused to load {path}: it is a pickle that holds objects other than tensors, and loading it "
                f"could run code. Only weights_only pickles and safetensors are accepted; convert the file "
                f"with a trusted tool first. ({text.splitlines()[0][:200]})") from None
        cached = _in_cache(path)
        if cached:
            _forget_cached(path)
        raise CorruptCheckpointError(
            f"cannot read weight file {path}: it is truncated or not a checkpoint ({type(e).__name__}: "
            f"{text.splitlines()[0][:200] if text else ''})."
            + (" The cached copy was removed; loading again downloads it afresh." if cached else "")) from None


def _looks_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28)


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write a state dict as safetensors atomically: a temporary file in the same folder, then a rename,
    so an interrupted write never leaves a partial file under the final name."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_hash(url: str, known: Optional[str]) -> Optional[str]:
    """The published hash: given explicitly, or torchvision's `name-<sha256 prefix>.pth` convention."""
    if known:
        return known
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", url)
    return m.group(1) if m else None


def download_url(url: str, dest: Path, sha256: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically (temporary file, hash check, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=timeout) as response:  # noqa: S310 - https URLs from the registry
            expected_len = response.headers.get("Content-Length")
            size = 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                size += len(chunk)
        if expected_len is not None and size != int(expected_len):
            raise CorruptCheckpointError(f"download of {url} was cut short: {size} of {expected_len} bytes")
        if sha256:
            digest = _sha256(Path(tmp))
            if not digest.startswith(sha256):
                raise HashMismatchError(
                    f"downloaded {url} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...; the file is corrupt "
                    f"or was replaced upstream. Nothing was cached; try again, or pass a verified file")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# --------------------------------------------------------------------------------------------------
# Resolving a pretrained cfg to a file
# --------------------------------------------------------------------------------------------------

def _cfg_get(pcfg: Any, key: str, default: Any = None) -> Any:
    return pcfg.get(key, default) if isinstance(pcfg, Mapping) else getattr(pcfg, key, default)


def _tag_name(pcfg: Any) -> str:
    arch, tag = _cfg_get(pcfg, "architecture") or "model", _cfg_get(pcfg, "tag")
    return f"{arch}.{tag}" if tag else arch


_OFFLINE_HINT = (
    "cannot reach the Hub and the weights are not cached; set HF_ENDPOINT to a reachable mirror, or "
    "HF_HUB_OFFLINE=1 with a filled cache, or pass a file with pretrained_cfg_overlay=dict(file=...)")


def _from_hub(repo_id: str, filename: str) -> Optional[Path]:
    """The cached path of a Hub file; None if the repository or the file does not exist there.
    Raises WeightsUnavailableError if the Hub cannot be reached and nothing is cached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    repo, _, revision = repo_id.partition("@")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision or None))
    except LocalEntryNotFoundError as e:
        raise WeightsUnavailableError(f"{repo_id}/{filename}: {_OFFLINE_HINT}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return None


def _from_url(pcfg: Any, model: nn.Module) -> Path:
    """Official checkpoint -> converted safetensors in our cache (download and convert only once)."""
    from .convert import convert_state_dict

    url = _cfg_get(pcfg, "url")
    converted = cache_dir() / f"{_tag_name(pcfg)}.safetensors"
    if converted.is_file():
        return converted
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise WeightsUnavailableError(f"{_tag_name(pcfg)}: HF_HUB_OFFLINE is set and {converted} is not cached; "
                                      f"{_OFFLINE_HINT}")
    raw = cache_dir() / "downloads" / url.rsplit("/", 1)[-1]
    if not raw.is_file():
        try:
            download_url(url, raw, _expected_hash(url, _cfg_get(pcfg, "file_sha256")))
        except (URLError, OSError, TimeoutError) as e:
            if isinstance(e, (HashMismatchError, CorruptCheckpointError)):
                raise
            raise WeightsUnavailableError(f"{_tag_name(pcfg)}: cannot download {url} ({e}); {_OFFLINE_HINT}") from e
    state_dict = convert_state_dict(read_checkpoint(raw), model)
    save_safetensors(state_dict, converted, metadata={"source": url, "format": "pt"})
    raw.unlink()
    return converted


def resolve_weights(pcfg: Any, model: nn.Module) -> Path:
    """The local file that holds the weights of pretrained cfg `pcfg` (see the module docstring)."""
    file = _cfg_get(pcfg, "file")
    if file:
        if not Path(file).is_file():
            raise FileNotFoundError(f"pretrained file not found: {file}")
        return Path(file)
    hf_hub_id, url = _cfg_get(pcfg, "hf_hub_id"), _cfg_get(pcfg, "url")
    if not hf_hub_id and not url:
        raise WeightsUnavailableError(
            f"{_tag_name(pcfg)} has no published weights; use pretrained=False, pick a tag with weights "
            f"(mvit_zoo.list_pretrained()), or pass pretrained_cfg_overlay=dict(file=...)")
    tried = []
    if hf_hub_id:
        path = _from_hub(hf_hub_id, _cfg_get(pcfg, "hf_hub_filename") or WEIGHTS_NAME)
        if path is not None:
            return path
        tried.append(f"Hub repository {hf_hub_id} (not found)")
    if url:
        return _from_url(pcfg, model)
    raise WeightsUnavailableError(f"{_tag_name(pcfg)}: no weights found; tried {', '.join(tried)}")


def load_pretrained(model: nn.Module, pcfg: Any) -> Path:
    """Load the weights of `pcfg` into `model` after checking every tensor against it; returns the file.

    A classifier for another class count is left out (the model keeps its fresh head); a stem for
    another channel count is adapted as timm does. Nothing is loaded unless everything else fits.
    """
    from .convert import convert_state_dict

    path = resolve_weights(pcfg, model)
    state_dict = convert_state_dict(read_checkpoint(path), model)
    result = model.load_state_dict(state_dict, strict=False)
    assert all(k.startswith("head.") for k in result.missing_keys) and not result.unexpected_keys, result
    return path
