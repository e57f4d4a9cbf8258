"""Crash-safe writes: temp file or folder in the same directory, fsync, then rename.

Files that hold secrets (the DP noise secret in a run's state, private keys, task tokens) are
written `private`: 0600 from their first byte on, in 0700 folders (`private_dir`). Everything
else gets the modes the umask allows (0644 / 0755 under the usual 022), so others can read
adapters, metrics and plots. The kernel applies the umask at creation; it is never changed
here, so no other thread's file is created under a cleared umask.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # EXCL: never a link


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A fresh hidden name next to `path` (64 random bits; creation refuses an existing one)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}")


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (0700), created with any missing parents
    (those with the usual modes); an existing folder is narrowed to 0700. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def _make_parent(path: Path, private: bool) -> None:
    """A private file's missing folder is made private; an existing folder is left as it is."""
    if private and not path.parent.is_dir():
        private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace `path` with `data` atomically; `private`: mode 0600 (else 0666 minus umask)."""
    path = Path(path)
    _make_parent(path, private)
    tmp = _temp_name(path)
    fd = os.open(tmp, _OPEN_NEW, PRIVATE_FILE_MODE if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, private: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), private=private)


def atomic_write_json(path: Path, data: Any, *, private: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n",
                      private=private)


def atomic_write_figure(path: Path, figure, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_dir(target: Path, fill: Callable[[Path], None], *,
                     private: bool = False) -> None:
    """Let `fill` write a folder's files into a staging folder, then swap it in whole.

    A crash leaves either the old folder or the new one, never a half-written mix. Every file
    gets the folder's permissions without execute, whatever mode its writer chose (safetensors
    writes 0600): 0755 / 0644 under the usual umask; `private`: 0700 from the folder's creation,
    0600 files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_name(target)
    staging.mkdir(mode=PRIVATE_DIR_MODE if private else 0o777)
    old = target.with_name(f".{target.name}.old")
    try:
        fill(staging)
        file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666
        for file in staging.iterdir():
            file.chmod(file_mode)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
