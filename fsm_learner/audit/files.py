"""Finding and reading log files: regular files only, lines of bounded length.

A log is a regular file; in a directory, one named ``*.jsonl`` in any case (as the
learner takes ``audit_log``). A FIFO would block the reader forever, a device (a symlink to
``/dev/zero``) would stream without end: ``log_files`` refuses both when it expands the
paths it is given, and ``open_log`` checks again on the descriptor it opened
(non-blocking, so a FIFO swapped in between cannot block). ``read_chunks`` reads the
file in chunks of whole lines, ``CHUNK_BYTES`` at a time: a line longer than
``MAX_LINE_BYTES`` is skipped in pieces, never held, and reported with its size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import attrs

from fsm_learner._display import file_name
from fsm_learner.audit.codec import MAX_LINE_BYTES

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "NotRegularError",
    "Overlong",
    "Unreadable",
    "file_kind",
    "log_files",
    "open_log",
    "read_chunks",
]

CHUNK_BYTES: Final = 1 << 18
"""How much ``read_chunks`` reads at a time: small enough for the CPU's cache."""
_TAIL: Final = 64
"""Bytes kept of the end of an over-long line, to describe it."""
_OPEN_FLAGS: Final = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularError(Exception):
    """What was opened is no regular file; the message says what it is."""


def _kind_of(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def file_kind(path: Path) -> str | None:
    """Name what ``path`` is when it is no regular file (``a FIFO``...); None for a file.

    Symlinks are followed (a link to a log is a log) and named: ``a symlink to a
    character device``. Raises OSError when ``path`` cannot be looked at.
    """
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return None
    kind = _kind_of(mode)
    return f"a symlink to {kind}" if path.is_symlink() else kind


def _not_regular(mode: int) -> NotRegularError:
    return NotRegularError(f"not a regular file ({_kind_of(mode)}): a log is a regular file")


def open_log(path: Path) -> IO[bytes]:
    """Open a log for reading in binary; raise NotRegularError for what is no regular file.

    Opened non-blocking and checked with ``fstat`` on the open descriptor, so what is
    checked is what is read. Raises OSError when it cannot be opened.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(mode)
    return os.fdopen(fd, "rb")


@attrs.frozen
class Overlong:
    """A line longer than MAX_LINE_BYTES: its size (newline included), and its last bytes."""

    size: int
    tail: bytes


@attrs.frozen
class Unreadable:
    """The read failed: why, in a few words."""

    reason: str


def read_chunks(fh: IO[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes | Overlong | Unreadable]:
    """Yield the file as chunks of whole lines, each ending in a newline, in order.

    A line longer than MAX_LINE_BYTES comes as an Overlong instead, read in pieces and
    never held; the last line, when it lacks its newline, as a chunk without one. A
    read error ends the chunks with Unreadable. ``size`` must not exceed MAX_LINE_BYTES.
    """
    carry = bytearray()  # the start of a line whose newline is still to come
    try:
        while data := fh.read(size):
            cut = data.rfind(b"\n")
            if cut < 0:
                carry += data
                if len(carry) >= MAX_LINE_BYTES:  # with its newline it is too long
                    yield _skip_line(fh, carry, size)
                    carry = bytearray()
                continue
            if carry:
                yield from _first_line(carry, data)
                data = data[data.find(b"\n") + 1 :]
                cut = data.rfind(b"\n")
            if cut >= 0:
                yield data[: cut + 1]
            carry = bytearray(data[cut + 1 :])
    except OSError as exc:
        yield Unreadable(f"cannot read: {exc.strerror or exc}")
        return
    if carry:
        yield bytes(carry)


def _first_line(carry: bytearray, data: bytes) -> Iterator[bytes | Overlong]:
    """Yield the line begun in ``carry`` and ended in ``data``, or that it is too long."""
    end = data.find(b"\n") + 1
    length = len(carry) + end
    if length > MAX_LINE_BYTES:
        yield Overlong(length, (bytes(carry) + data[:end])[-_TAIL:])
    else:
        carry += data[:end]
        yield bytes(carry)


def _skip_line(fh: IO[bytes], start: bytearray, size: int) -> Overlong:
    """Read the rest of an over-long line in pieces, keeping only its size and its end.

    What follows its newline in the last piece read is given back by seeking (a log is
    a regular file).
    """
    length, tail = len(start), bytes(start[-_TAIL:])
    while piece := fh.read(size):
        end = piece.find(b"\n")
        if end >= 0:
            fh.seek(end + 1 - len(piece), 1)
            return Overlong(length + end + 1, (tail + piece[: end + 1])[-_TAIL:])
        length += len(piece)
        tail = (tail + piece)[-_TAIL:]
    return Overlong(length, tail)


def log_files(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """Expand files and directories into the log files to audit; also return usage errors.

    A log is a regular file: a FIFO, a device, a socket or a symlink to one is an error,
    inside a directory too (a directory named ``*.jsonl`` is walked, not read). The same
    file named twice, or through a link, is audited once.
    """
    files: list[Path] = []
    errors: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in paths:
        try:
            found, found_errors = _expand(path)
        except OSError as exc:
            found, found_errors = [], [_os_error(path, exc)]
        for file, identity in found:
            if identity not in seen:
                seen.add(identity)
                files.append(file)
        errors.extend(found_errors)
    return files, errors


def _os_error(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        broken = " (a broken symlink)" if path.is_symlink() else ""
        return f"{file_name(path)[:200]}: no such file or directory{broken}"
    return f"{file_name(path)[:80]}: {exc.strerror or exc}"


_Found = list[tuple[Path, tuple[int, int]]]


def _expand(path: Path) -> tuple[_Found, list[str]]:
    info = path.stat()
    if stat.S_ISREG(info.st_mode):
        return [(path, (info.st_dev, info.st_ino))], []
    if not stat.S_ISDIR(info.st_mode):
        return [], [_not_a_file(path)]
    found: _Found = []
    errors: list[str] = []
    for file in sorted(filter(_is_log_name, path.rglob("*"))):
        try:
            info = file.stat()
        except OSError as exc:
            errors.append(_os_error(file, exc))
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((file, (info.st_dev, info.st_ino)))
        elif not stat.S_ISDIR(info.st_mode):
            errors.append(_not_a_file(file))
    if not found and not errors:
        errors.append(f"{file_name(path)}: a directory with no *.jsonl audit log in it")
    return found, errors


def _is_log_name(path: Path) -> bool:
    """Whether a file found in a directory is named as a log: .jsonl in any case, as fit writes."""
    return path.suffix.lower() == ".jsonl"


def _not_a_file(path: Path) -> str:
    return (
        f"{file_name(path)}: not a regular file ({file_kind(path)}); a log is a regular file "
        "or a directory of them"
    )
