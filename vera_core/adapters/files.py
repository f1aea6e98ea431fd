"""Crash-safe writes: a directory appears complete or not at all, a JSON file is never half-written, and a write
that fails (a full disk, a read-only folder) is one WriteError naming the path, the reason and what was kept."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError


class WriteError(OSError):
    """A file or directory could not be written. str(): "no space left on device writing runs/x/loss.png; the
    finished runs are in runs/x/report.json" (`kept`, what is still there, may be empty)."""

    def __init__(self, path: str | os.PathLike, reason: str, kept: str = ""):
        self.path, self.reason, self.kept = str(path), reason, kept
        super().__init__(f"{reason} writing {self.path}" + (f"; {kept}" if kept else ""))

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # rebuilt from its fields when it crosses a process boundary
        return WriteError, (self.path, self.reason, self.kept)

    def keeping(self, kept: str) -> "WriteError":
        """The same failure, saying instead what the caller kept."""
        return WriteError(self.path, self.reason, kept)


def _write_reason(err: BaseException) -> str | None:
    """The reason a write failed ("no space left on device"), or None when `err` is not a failed write.
    safetensors reports the OS error inside its message: "I/O error: No space left on device (os error 28)"."""
    if isinstance(err, OSError):
        return (err.strerror or str(err) or type(err).__name__).lower()
    if isinstance(err, SafetensorError):
        found = re.search(r"os error (\d+)", str(err))
        return os.strerror(int(found.group(1))).lower() if found else None
    return None


def as_write_error(err: BaseException, path: str | os.PathLike, kept: str = "") -> BaseException:
    """`err` as a WriteError naming `path` when it is a failed write (a WriteError already names its own path),
    else `err` itself."""
    reason = _write_reason(err)
    if isinstance(err, WriteError) or reason is None:
        return err
    return WriteError(path, reason, kept)

# Written into every directory atomic_directory fills: only such a directory (or an empty one) is replaced silently.
MARKER = ".vera-lab"
_MARKER_TEXT = "Written by VeRA Lab: saving or exporting here again replaces this whole directory.\n"


def check_target(directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace what VeRA Lab did not write: a file, or a non-empty directory without our marker.

    overwrite=True allows replacing a foreign directory; a file is refused even then (a directory was asked for).
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot write {str(target)!r}: it is an existing file, not a directory; "
                         "choose another directory (overwrite=True replaces directories only).")
    if overwrite or not target.is_dir() or (target / MARKER).is_file():
        return
    found = sorted(p.name for p in target.iterdir())
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise ValueError(f"{str(target)!r} already holds files VeRA Lab did not write ({shown}); choose another "
                         "directory, or pass overwrite=True (--overwrite) to replace all of it.")


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it replaces `directory`, on error it is deleted.

    A `directory` VeRA Lab did not write is refused (check_target) unless overwrite=True. The old directory is moved
    aside and deleted only after the new one is in place, so a crash leaves the old content or the new one.
    """
    target = Path(directory)
    check_target(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):  # not a bad path: the disk is full
            raise WriteError(target, _write_reason(err), "nothing was written") from None
        # mkdir says "file exists" when a parent on the path is a file: name that instead.
        reason = ("part of the path is a file" if isinstance(err, (FileExistsError, NotADirectoryError))
                  else (err.strerror or str(err)).lower())
        raise ValueError(f"cannot write {str(target)!r}: {reason}; choose another directory.") from None
    existed = target.exists()
    try:
        yield tmp
        (tmp / MARKER).write_text(_MARKER_TEXT)
        # mkdir honoured the umask; some writers (safetensors) create 0600 files: give files the usual mode.
        file_mode = tmp.stat().st_mode & 0o666
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, file_mode)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        failure = as_write_error(err, target, f"the earlier {target} is kept unchanged" if existed
                                 else "nothing was left there")
        if failure is err:
            raise
        raise failure from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path` (readers see the old file or the
    new one), on error it is deleted and a failed write is raised as a WriteError that says the old file is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failure = as_write_error(err, path, f"the earlier {path.name} is kept" if path.exists() else "")
        if failure is err:
            raise
        raise failure from err


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and an atomic rename: readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
