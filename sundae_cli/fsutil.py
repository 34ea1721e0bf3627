"""Atomic file writes: everything goes to a temporary name and is renamed into place.

An interrupted write (Ctrl-C, kill, full disk) therefore never leaves a file at the
final path that looks whole; the previous version, if any, stays intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sundae_cli.errors import SundaeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike[str]) -> None:
    """Give a file the mode `open()` would (0644 under umask 022), not 0600."""
    os.chmod(path, 0o666 & ~_umask())


def _write_failed(path: Path, exc: OSError) -> SundaeError:
    return SundaeError(
        f"could not write {path}: {exc.strerror or exc}",
        hint="check free disk space and permissions, then run the command again",
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    On any exception the temporary file is removed and the final path is untouched.
    OS errors are turned into a `SundaeError` naming the final path.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
        )
    except OSError as exc:
        raise _write_failed(final, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        make_shareable(tmp)  # mkstemp makes the file private (0600)
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_failed(final, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (temporary name, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that is renamed onto `path` when the block ends.

    `path` must not exist yet. A failure removes the temporary directory.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    )
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
