"""A cache of decoded and preprocessed dataset tensors, so that the second run starts in seconds.

Entries are safetensors files under ``$BINARYCONNECT_CACHE``, else ``~/.cache/binaryconnect`` (the data
folder itself may be read-only). An entry is named by a key: the SHA-256 of a JSON object holding the
source's fingerprint (the digest of its bytes, see ``source_fingerprint``), every option that changes
the tensors (preprocessing, validation size ...) and ``CACHE_FORMAT``. A changed source or option gives
another key, so a stale entry is never read; the key's JSON is also stored in the file's metadata and
checked on reading, with the CRC-32 of every tensor. Writes are atomic (temporary file, then rename), so
an interrupted run leaves no half-written entry; an unreadable or damaged entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import new_file_mode

ENV_CACHE = "BINARYCONNECT_CACHE"
#: Bump when the meaning of cached tensors changes (decoding, preprocessing code): old entries are ignored.
CACHE_FORMAT = 2  # 2: entries carry the CRC-32 of their tensors


def cache_dir() -> Path:
    """``$BINARYCONNECT_CACHE`` if set, else ``~/.cache/binaryconnect``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "binaryconnect"


def _canonical(parts: dict) -> str:
    """``parts`` with ``CACHE_FORMAT`` added, as canonical JSON (what the key hashes and the entry stores)."""
    return json.dumps({**parts, "cache_format": CACHE_FORMAT}, sort_keys=True, separators=(",", ":"))


def cache_key(parts: dict) -> str:
    """Hex SHA-256 (first 32 digits) of ``parts`` as canonical JSON, with ``CACHE_FORMAT`` added."""
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()[:32]


def source_fingerprint(path: Path) -> str:
    """A digest that changes when the data at ``path`` changes.

    A file: the SHA-256 of its bytes. A folder: the SHA-256 of the sorted list of its files' relative
    paths, sizes and modification times (reading every byte of a 60,000-file tree on each start would
    cost more than decoding it; an edit through the filesystem changes the modification time).
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    entries, visited = [], set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):  # as the readers follow links
        visited.add(os.path.realpath(dirpath))
        dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in visited)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if not full.is_file():  # a dangling link: no data, as the readers skip it
                continue
            st = full.stat()
            entries.append(f"{full.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}")
    h.update("\n".join(entries).encode())
    return "tree:" + h.hexdigest()


def _entry_path(kind: str, key: str) -> Path:
    return cache_dir() / f"{kind}-{key}.safetensors"


def _checksums(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of every tensor's bytes, as JSON (about 0.2 s for a 738 MB entry): what an entry's reader
    checks, so that a damaged entry is rebuilt rather than trained on."""
    return json.dumps({name: zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                       for name, t in sorted(tensors.items())}, separators=(",", ":"))


def _read(path: Path, parts_json: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != parts_json:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("crc32") != _checksums(tensors):
            raise ValueError("its tensors do not match their checksums: the file was damaged after it was written")
        return tensors
    except Exception as exc:  # a truncated or corrupt entry: rebuild it
        warnings.warn(f"ignoring unreadable cache entry {path} ({exc}); rebuilding it", stacklevel=3)
        return None


#: A temporary file this much older than now was left by a writer that was killed (an entry takes seconds).
STALE_TEMP_SECONDS = 3600


#: Cache writes happen in this subfolder of the cache folder (then an atomic rename into it): the temporary
#: files a killed writer leaves there (ours, ``<entry>.<random>.tmp``, and those safetensors makes beside the
#: file it writes, ``.tmpXXXXXX``) are all a cache writer's. Nothing else is ever deleted: the cache folder may
#: be a shared one (``$BINARYCONNECT_CACHE=/tmp``).
WRITING_FOLDER = ".binaryconnect-writing"
#: A temporary file that earlier versions wrote in the cache folder itself: ``<kind>-<32 hex>.safetensors.*.tmp``.
_OLD_TEMP_NAME = re.compile(r"(?:decoded|splits)-[0-9a-f]{32}\.safetensors\.\w+\.tmp")


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete what writers killed mid-write left (up to an entry's size each): every file of ``folder``'s
    ``WRITING_FOLDER``, and earlier versions' temporary files in ``folder``; recent ones may be a live writer's."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    candidates = [f for f in folder.iterdir() if _OLD_TEMP_NAME.fullmatch(f.name)]
    if (folder / WRITING_FOLDER).is_dir():
        candidates += list((folder / WRITING_FOLDER).iterdir())
    for stale in candidates:
        try:
            if stale.is_file() and stale.stat().st_mtime < cutoff:
                stale.unlink()
        except OSError:
            pass  # another process removed it, or it is not ours to remove


def _write(path: Path, tensors: dict[str, torch.Tensor], parts_json: str) -> None:
    from safetensors.torch import save_file

    try:
        writing = path.parent / WRITING_FOLDER  # the same filesystem: the rename below is atomic
        writing.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=writing)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"key": parts_json, "crc32": _checksums(tensors)})
            os.chmod(tmp, new_file_mode())  # mkstemp creates 0600; an entry is as readable as any new file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warnings.warn(f"could not write the dataset cache {path} ({exc}); set {ENV_CACHE} to a writable "
                      "folder to make later runs start faster", stacklevel=3)


def cached_tensors(
    kind: str, parts: dict, build: Callable[[], dict[str, torch.Tensor]], enabled: bool = True
) -> tuple[dict[str, torch.Tensor], bool]:
    """``(tensors, hit)``: the entry ``kind``/``cache_key(parts)`` if present, else ``build()`` stored.

    ``parts`` must hold everything the tensors depend on (source fingerprint, options). With
    ``enabled=False`` the cache is neither read nor written.
    """
    if not enabled:
        return build(), False
    parts_json = _canonical(parts)
    path = _entry_path(kind, cache_key(parts))
    try:
        present = path.is_file()
    except OSError as exc:  # a cache folder this user may not enter (Python < 3.12 raises here)
        warnings.warn(f"cannot use the dataset cache {path.parent} ({exc}); set {ENV_CACHE} to a folder of "
                      "yours to make later runs start faster", stacklevel=2)
        return build(), False
    if present:
        tensors = _read(path, parts_json)
        if tensors is not None:
            return tensors, True
    tensors = build()
    _write(path, tensors, parts_json)
    return tensors, False
