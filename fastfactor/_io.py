"""Safe files, the bottom layer of everything fastfactor writes (imports nothing of fastfactor).

* :func:`atomic_write` — THE atomic write: the content goes to a temporary sibling, the file is
  flushed and ``fsync``-ed, renamed over the final name (``os.replace``) and the directory entry
  ``fsync``-ed; on any error the temporary is removed and the old file (if any) is untouched.
  :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`,
  :func:`atomic_torch_save` and :mod:`fastfactor.distributed`'s ``save0`` / ``write_text0`` are
  thin wrappers around it;
* :func:`sha256_file` — a file's sha256 in 1 MiB chunks;
* :func:`read_json` — a JSON object from a file, or a ``ValueError`` naming the file and saying
  whether it is missing, empty/truncated, not JSON, or not an object;
* :func:`check_format_version` — refuses files from a newer format (``upgrade fastfactor``), files
  without a version, and unknown older versions, naming the file;
* :func:`verify_files` — every file listed with its sha256 exists and matches (truncation and
  corruption both show as a mismatch; the size is reported too);
* :func:`atomic_directory` — build a directory under a temporary sibling name and rename it into
  place when complete, so a crash (even ``SIGKILL``) never leaves a half-written directory under
  the final name; an existing final directory is never overwritten unless ``replace=True``.

Every error is a ``ValueError`` whose message starts with the path of the offending file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import BinaryIO, Callable, Dict, Iterator, Optional

#: temporary names start with this prefix; readers skip (and writers may delete) such entries
TMP_PREFIX = ".tmp-"


def umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows (else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file ``f`` (binary) beside
    ``path``; it is flushed and fsync-ed, renamed to ``path`` (``os.replace``) and the directory
    fsync-ed. A crash at any point leaves either the old file or the new one, never a mix; an
    exception removes the temporary and propagates. The file gets the mode an ordinary ``open``
    would give it (``0666`` less the umask: ``0644`` under the usual ``022``), not ``mkstemp``'s 0600."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix=os.path.basename(path))
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def atomic_write_bytes(path, data: bytes) -> None:
    """``data`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path) -> str:
    """The sha256 hex digest of the file ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path, what: str = "file") -> dict:
    """The JSON object stored in ``path``; ``what`` says what the file is (for the message)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} is missing")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"{path}: {what} is empty (truncated write?)")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def atomic_write_json(path, obj) -> None:
    """``obj`` as indented JSON through :func:`atomic_write`."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj)`` through :func:`atomic_write` (read back with
    ``torch.load(..., weights_only=True)``: tensors, numbers, strings and containers only)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def check_format_version(path, found, current: int, what: str = "file") -> int:
    """``found`` (the ``format_version`` read from ``path``) must be an int in ``[1, current]``."""
    path = os.fspath(path)
    if found is None:
        raise ValueError(f"{path}: {what} has no format_version; it was not written by fastfactor")
    if isinstance(found, bool) or not isinstance(found, int):
        raise ValueError(f"{path}: {what}: expected an integer format_version, got {found!r}")
    if found > current:
        raise ValueError(
            f"{path}: {what} has format_version {found}, newer than the {current} this fastfactor "
            "reads; upgrade fastfactor to load it"
        )
    if found < 1:
        raise ValueError(f"{path}: {what}: expected format_version in [1, {current}], got {found}")
    return found


def verify_files(root, files: Dict[str, str]) -> None:
    """Each ``{relative name: sha256}`` under ``root`` exists and has that digest."""
    root = os.fspath(root)
    if not isinstance(files, dict):
        raise ValueError(f"{root}: expected a {{file: sha256}} map of checksums, got {type(files).__name__}")
    for name, digest in files.items():
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(f"{root}: the checksum list names {name!r}, which is outside the directory")
        fpath = os.path.join(root, name)
        if not os.path.isfile(fpath):
            raise ValueError(f"{fpath}: listed with a checksum but missing")
        actual = sha256_file(fpath)
        if actual != digest:
            size = os.path.getsize(fpath)
            raise ValueError(
                f"{fpath}: sha256 mismatch (expected {digest}, file has {actual}, {size} bytes); "
                "the file is truncated, corrupt or was changed"
            )


def fsync_dir(path) -> None:
    """Flush a directory entry (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path, replace: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; on success rename it to ``path``.

    On an exception the temporary directory is removed and ``path`` is untouched. A ``SIGKILL``
    leaves only a ``.tmp-*`` sibling, which readers ignore. ``path`` must not exist unless
    ``replace=True`` (then the old directory is moved aside first and deleted after the rename).
    The directory gets an ordinary directory's mode (``0777`` less the umask), not ``mkdtemp``'s 0700.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not replace:
        raise ValueError(f"{path}: already exists; refusing to overwrite it")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}{os.path.basename(path)}-")
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        old: Optional[str] = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f"{TMP_PREFIX}old-{os.path.basename(path)}-")
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory, older_than_s: float = 0.0) -> int:
    """Delete ``.tmp-*`` entries left in ``directory`` by killed writers; returns how many."""
    import time

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return 0
    n, now = 0, time.time()
    for name in os.listdir(directory):
        if not name.startswith(TMP_PREFIX):
            continue
        p = os.path.join(directory, name)
        try:
            if now - os.path.getmtime(p) < older_than_s:
                continue
            if os.path.isdir(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            n += 1
        except OSError:  # pragma: no cover - another process removed it
            pass
    return n


def save_pretrained_atomic(obj, directory) -> list:
    """``obj.save_pretrained`` (a tokenizer, a config) into ``directory`` with every file written
    under a temporary directory first, fsync-ed, and then moved into place one by one
    (``os.replace``, then an fsync of the directory). Returns the names written (relative to ``directory``)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix=TMP_PREFIX)
    written = []
    try:
        obj.save_pretrained(tmp)
        for root, _, names in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            dest_root = directory if rel == "." else os.path.join(directory, rel)
            os.makedirs(dest_root, exist_ok=True)
            for n in names:
                src = os.path.join(root, n)
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(src, os.path.join(dest_root, n))
                written.append(n if rel == "." else os.path.join(rel, n))
            fsync_dir(dest_root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(written)


__all__ = [
    "TMP_PREFIX", "umask", "atomic_write", "read_json", "atomic_write_json", "atomic_write_bytes", "atomic_write_text", "sha256_file",
    "check_format_version", "verify_files", "fsync_dir", "atomic_directory", "remove_stale_temporaries",
    "save_pretrained_atomic",
]
