"""Writing a run's audit log: a structlog processor chain over a JSON-lines file.

The learner appends one small tuple per transition to ``AuditWriter.pending`` (a clock
read and an append: no dict, no JSON, no tensor, no device sync); notes are rendered when
they are made. At every pass end, on failure, at run end, and when ``pending`` grows past
``FLUSH_AT``, the writer hands the pending records to a structlog logger it builds itself
with ``structlog.wrap_logger``: ``RenderBlock`` renders them as the codec's lines,
``SealBlock`` appends the block's seal, and ``JsonlFile`` appends the block to the file in
one write, under an exclusive ``flock``, so that several writers (threads or processes) may
share one file: blocks of different runs follow one another, never mix. One structlog call
per block rather than per record: structlog's own cost is several µs per call, more than a
transition may cost in all.

A flush is a transaction. The processors compute the block from the last committed
``_Mark`` without changing it; only when the block is in the file does the writer commit,
in one attribute store, the new mark (records written, seal head, transition counts). A
block whose commit was interrupted (Ctrl-C) is found in the file at the next flush and
committed then; one whose write was cut short is cut off the file. Pending records stay
in ``pending`` until their block commits, so an interrupt anywhere loses nothing, and the
footer's counts are those of the records written.

The library never calls ``structlog.configure()``. Run-level events also go to the
``fsm_learner`` logger (structlog's when the application configured structlog, the
standard library's otherwise), which prints nothing unless the application asks; an
event that cannot be emitted never disturbs the fit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog

if sys.platform != "win32":
    import fcntl

from fsm_learner._display import safe_text
from fsm_learner.audit.codec import (
    SEAL_START,
    Encoder,
    FailureField,
    Field,
    RecordError,
    RouteKey,
    RunStatus,
    Seal,
    SealChain,
    decode,
    note_fields,
)
from fsm_learner.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "FLUSH_AT",
    "AuditWriter",
    "JsonlFile",
    "PendingRecord",
    "RenderBlock",
    "SealBlock",
    "emit_run_event",
]

FLUSH_AT: Final = 8192
"""Pending records that trigger a flush inside a long pass (bounds memory)."""
FLUSH_EVERY_NS: Final = 1_000_000_000
"""Pending records are written when the last write is this long ago (checked after each
batch and at each pass end): the log is never more than about a second behind the loop,
and a fit of a few short passes costs two writes (header, and end)."""

PendingRecord = tuple[int, RouteKey, int, int] | bytes
"""A transition as (monotonic ns, route, epoch, batch index), or a note already rendered."""

_APP_LOGGER_NAME: Final = "fsm_learner"
_APP_LOGGER: Final = logging.getLogger(_APP_LOGGER_NAME)
_APP_LOGGER.addHandler(logging.NullHandler())


_LOG_RECORD_NAMES: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
"""Attributes a LogRecord has or gets: an ``extra`` field by one of these names would clash."""


def emit_run_event(event: str, **fields: Any) -> None:
    """Emit a run-level event on the ``fsm_learner`` logger the application may route.

    The fields are structlog's key-value pairs, or on the standard library's logger
    ``extra`` attributes (``record.run_id``, ``record.status``); one whose name a LogRecord
    already uses is prefixed ``fsm_`` on both (the failure's ``message`` is
    ``fsm_message``), so that structlog's bridges to the standard library cannot clash
    either. An event that cannot be emitted (a broken handler or processor) is reported on
    stderr, as the logging module reports its own errors, and never raises.
    """
    try:
        configured = structlog.is_configured()
        if not configured and not _APP_LOGGER.isEnabledFor(logging.INFO):
            return  # nobody listens: a fit with the log on emits four of these
        named = {
            f"fsm_{name}" if name in _LOG_RECORD_NAMES else name: value
            for name, value in fields.items()
        }
        if configured:
            structlog.get_logger(_APP_LOGGER_NAME).info(event, **named)
        else:
            _APP_LOGGER.info("%s %s", event, fields, extra=named)
    except Exception as exc:  # noqa: BLE001 (logging must never abort a fit or its failure path)
        _report_emit_error(event, exc)


def _report_emit_error(event: str, exc: Exception) -> None:
    with contextlib.suppress(Exception):  # no stderr to tell: nothing more to do
        sys.stderr.write(
            f"fsm_learner: could not emit the {event} event on the "
            f"{_APP_LOGGER_NAME!r} logger: {safe_text(exc)}\n"
        )


@attrs.frozen
class _Mark:
    """What of the run is in the file: everything a flush commits, in one object."""

    records: int = 0
    """Records written (header, transitions, notes; the footer and the seals not counted)."""
    head: bytes = b""
    """The digest of the run's last seal."""
    tally: Mapping[RouteKey, int] = attrs.field(factory=dict)
    """Transition records written, per route."""
    state: str = "idle"
    """The destination of the last transition written: the log's state."""
    footed: bool = False
    """Whether the footer is written."""
    done: int = 0
    """How many items at the front of ``pending`` this commit wrote (trimmed lazily)."""
    last: object = None
    """The last of those items, to recognise them in ``pending``."""


@attrs.frozen
class _Closing:
    """What the footer says besides the counts: the block that carries it computes those."""

    status: RunStatus
    hook_ns: Mapping[str, list[int]]
    failure: Mapping[FailureField, object] | None
    t_ns: int


@attrs.define
class _Block:
    """One flush in the making: the processors fill it in, the file writes it."""

    items: list[PendingRecord]
    mark: _Mark
    closing: _Closing | None = None
    before: bytes = b""
    """The digest of the file's last seal line (of any run) before this block: it binds to it."""
    first: bool = False
    """Whether this is the run's first block: it opens with the header (``prev``: ``before``)."""
    data: bytes = b""
    head: bytes = b""
    tally: dict[RouteKey, int] = attrs.Factory(dict)
    state: str = "idle"
    start: int | None = None
    """Where in the file the write began (None: not begun)."""


def _last_state(items: list[PendingRecord], before: str) -> str:
    """Return the destination of the last transition among ``items`` (``before`` if none)."""
    for item in reversed(items):
        if type(item) is tuple:
            return item[1][2]
    return before


class RenderBlock:
    """Processor: render the block's records as lines, the header first in a run's first block.

    A transition is rendered through its route's byte template (the fields are fixed, only
    the numbers vary: twice as fast as a dict through orjson, with the same bytes). The
    processor keeps no count of its own: what it computes lands in the block, and only a
    completed write commits it.
    """

    def __init__(self, encoder: Encoder, header: Mapping[Field, Any], *, keyed: bool) -> None:
        """Render with ``encoder``; ``header`` are the run's header fields."""
        self.encoder, self.header, self.keyed = encoder, header, keyed
        self.t0_ns = 0

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """Fill in the block's lines, transition counts and state."""
        block: _Block = event_dict["block"]
        lines: list[bytes] = []
        if block.first:
            lines.append(self.encoder.header(self.header, keyed=self.keyed, prev=block.before))
        append, template, t0 = lines.append, self.encoder.template, self.t0_ns
        keys: list[RouteKey] = []
        add_key = keys.append
        for item in block.items:  # the writer's hot loop: kept tight
            if isinstance(item, bytes):  # a note, rendered when it was made
                append(item)
            else:
                t_ns, key, epoch, it = item
                append(template(key) % (epoch, it, t_ns - t0))
                add_key(key)
        tally = Counter(keys)
        for key, n in block.mark.tally.items():
            tally[key] += n
        block.tally = dict(tally)
        block.state = _last_state(block.items, block.mark.state)
        if block.closing is not None:
            lines.append(self._footer(block, len(lines)))
        block.data = b"".join(lines)
        return event_dict

    def _footer(self, block: _Block, lines: int) -> bytes:
        closing = block.closing
        if closing is None:  # pragma: no cover (called for a closing block)
            msg = "no footer to render"
            raise ValueError(msg)
        counts: dict[str, list[int]] = {}
        for (trigger, _, _, training), n in block.tally.items():
            counts.setdefault(trigger, [0, 0])[0 if training else 1] += n
        return self.encoder.footer(
            t_ns=closing.t_ns - self.t0_ns,
            status=closing.status,
            records=block.mark.records + lines,
            counts=counts,
            hook_ns=closing.hook_ns,
            failure=closing.failure,
        )


class SealBlock:
    """Processor: append the block's seal, chained from the run's last seal."""

    def __init__(self, encoder: Encoder, key: bytes | None) -> None:
        """Seal with ``key`` (None: an unkeyed chain)."""
        self.encoder, self.chain = encoder, SealChain(key)

    def __call__(
        self, _logger: WrappedLogger, _method: str, event_dict: EventDict
    ) -> dict[str, _Block]:
        """Hand the sealed block to the file."""
        block: _Block = event_dict["block"]
        count = len(block.items) + block.first + (block.closing is not None)
        block.head = self.chain.digest(block.mark.head, block.before, block.data)
        block.data += self.encoder.seal(count, block.head)
        return {"block": block}


_OPEN_FLAGS: Final = (
    os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
)
_FIRST_WINDOW: Final = 512
_LAST_BLOCKS: dict[tuple[int, int], tuple[int, int, bytes]] = {}
"""Per file (device, inode): its size and modification time after this process's last
block, and that block's seal: a file still the same ends with that seal."""
_REMEMBERED: Final = 64
_NEWLINE: Final = ord("\n")


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int) -> ConfigurationError:
    return ConfigurationError(
        f"audit log {safe_text(path)} is {_file_kind(mode)}; an audit log is a regular "
        "file (a path ending in .jsonl) or a directory to write <run_id>.jsonl files into"
    )


def open_log_file(path: Path) -> io.FileIO:
    """Open ``path`` for appending (and reading); refuse what is not a regular file.

    Opened non-blocking, so a FIFO cannot hang the fit, and checked with ``fstat`` on
    the open descriptor, so what is checked is what is written. A ``FileIO`` closes in
    one call, whatever interrupts it, and never twice; until it is returned, whatever
    interrupts closes it (a local left in a traceback's frame would keep it open).
    """
    fh = None
    try:
        fh = _file_io(path)
        _check_regular(path, fh)
        return fh  # noqa: TRY300 (the return too is inside: an interrupt there closes it)
    except BaseException:
        if fh is not None:
            fh.close()
        raise


def _check_regular(path: Path, fh: io.FileIO) -> None:
    mode = os.fstat(fh.fileno()).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _file_io(path: Path) -> io.FileIO:
    """Open the descriptor and hand it to a FileIO in this frame, whatever interrupts.

    No function of ours runs between ``os.open`` and the FileIO taking the descriptor (an
    opener's return was a place where Ctrl-C left it open); until the FileIO has it, an
    interrupt closes it here.
    """
    fd: int | None = None
    fh: io.FileIO | None = None
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
        fh = io.FileIO(fd, "a+")
        return fh  # noqa: RET504, TRY300 (the return is inside: an interrupt there closes it)
    except BaseException as exc:
        if fh is not None:
            fh.close()
        elif fd is not None:
            os.close(fd)
        if isinstance(exc, OSError) and fd is None:
            _refuse_unopened(path)
        raise


def _refuse_unopened(path: Path) -> None:
    """Raise the clearer error for a path that could not be opened: not a regular file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode) from None


def _open_making_dirs(path: Path) -> io.FileIO:
    try:
        return open_log_file(path)
    except FileNotFoundError:  # the first run in a new directory
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_log_file(path)


def last_seal(data: bytes) -> bytes:
    """Return the digest of the last whole seal line in ``data``, or b"".

    ``data`` is the end of a log (the caller drops a first line the window may cut): the
    seal is searched for from the end, without splitting the rest into lines.
    """
    end = len(data)
    while (start := data.rfind(SEAL_START, 0, end)) >= 0:
        stop = data.find(b"\n", start)
        if stop >= 0 and (start == 0 or data[start - 1] == _NEWLINE):
            with contextlib.suppress(RecordError):
                record = decode(data[start:stop])
                if isinstance(record, Seal):
                    return record.digest
        end = start
    return b""


class JsonlFile:
    """The wrapped logger: appends blocks to one log file, each in one write under a lock."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` (a regular file, created if missing)."""
        self.path = path
        self._created = not os.path.lexists(path)
        self._end = -1
        """The file's size after this writer's last block (it ends a line)."""
        try:  # the last statement: an interrupt after it cannot leave the file open
            self._fh = fh = _open_making_dirs(path)
            self.fd = fh.fileno()
        except BaseException:
            with contextlib.suppress(AttributeError):
                self._fh.close()
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file's exclusive lock: writers of one file append one at a time."""
        if sys.platform != "win32":
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if sys.platform != "win32":
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def last_seal(self) -> bytes:
        """Look back from the end, in growing windows, for the last seal (under the lock).

        When this process wrote the file's last block, its seal is known without reading.
        """
        stat_ = os.fstat(self.fd)
        size, where = stat_.st_size, (stat_.st_dev, stat_.st_ino)
        known = _LAST_BLOCKS.get(where)
        if known is not None and known[:2] == (size, stat_.st_mtime_ns):
            return known[2]
        window = _FIRST_WINDOW
        while size:
            start = max(size - window, 0)
            tail = os.pread(self.fd, size - start, start)
            if start > 0:  # the window may cut its first line: never take that one
                cut = tail.find(b"\n")
                tail = tail[cut + 1 :] if cut >= 0 else b""
            digest = last_seal(tail)
            if digest or start == 0:  # no cap: the audit binds to the same seal, however far
                return digest
            window *= 8
        return b""

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def end_line(self) -> None:
        """End a line another writer cut short (killed mid-write): ours start a line (locked)."""
        size = os.fstat(self.fd).st_size
        if size and size != self._end and os.pread(self.fd, 1, size - 1) != b"\n":
            self._write_all(b"\n")

    def msg(self, block: _Block) -> None:
        """Append the block (under the lock, the file ending a line)."""
        size = os.fstat(self.fd).st_size
        block.start = size
        self._write_all(block.data)
        self._end = size + len(block.data)
        self._remember(block.head)

    def _remember(self, head: bytes) -> None:
        """Note that the file ends, at ``self._end``, with the seal ``head`` (this process's)."""
        stat_ = os.fstat(self.fd)
        if len(_LAST_BLOCKS) >= _REMEMBERED:
            _LAST_BLOCKS.clear()
        _LAST_BLOCKS[stat_.st_dev, stat_.st_ino] = (stat_.st_size, stat_.st_mtime_ns, head)

    def holds(self, block: _Block) -> bool | None:
        """Say whether ``block`` is in the file: True, False, or None when partly (under lock).

        A part of it at the end of the file (nothing written after) is cut off, so that
        it can be written again; a part another writer wrote after is left, and reads as
        a cut line.
        """
        start = block.start
        if start is None:
            return False
        size = os.fstat(self.fd).st_size
        written = os.pread(self.fd, len(block.data), start)
        if written == block.data:
            return True
        if written and size == start + len(written) and block.data.startswith(written):
            os.ftruncate(self.fd, start)
            return False
        return None if written else False

    def remove_if_empty(self) -> None:
        """Remove the file if this writer created it and nothing was written to it."""
        if not self._created or self._fh.closed:
            return
        mine = os.fstat(self.fd)
        try:
            there = self.path.stat()
        except OSError:
            return
        if mine.st_size == 0 and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            self.path.unlink()

    @property
    def closed(self) -> bool:
        """Whether the file is closed."""
        return self._fh.closed

    def close(self) -> None:
        """Close the file (again: nothing); closing releases any lock still held."""
        self._fh.close()


class AuditWriter:
    """One run's audit log: header, buffered transitions and notes, footer, in sealed blocks."""

    def __init__(
        self,
        path: Path,
        *,
        run_id: str,
        key: bytes | None,
        header: Mapping[Field, Any],
    ) -> None:
        """Open ``path`` for appending (a .jsonl file may hold several runs, of several writers).

        The header is written with the first block (``start``), bound to the file's last seal.
        """
        self.path, self.run_id = path, run_id
        self.t0_ns = time.monotonic_ns()
        self.pending: list[PendingRecord] = []
        self._mark = _Mark()
        self._attempt: _Block | None = None
        self._due_ns = self.t0_ns + FLUSH_EVERY_NS
        self._encoder = encoder = Encoder(run_id)
        render = RenderBlock(encoder, header, keyed=key is not None)
        render.t0_ns = self.t0_ns
        processors: list[Processor] = [render, SealBlock(encoder, key)]
        try:  # the last statement: whatever interrupts the set-up, the file is closed
            self._file = file = JsonlFile(path)
            self._log = structlog.wrap_logger(
                file, processors=processors, wrapper_class=structlog.BoundLogger, context_class=dict
            ).bind()
        except BaseException:
            with contextlib.suppress(AttributeError):
                self._file.remove_if_empty()
                self._file.close()
            raise

    @property
    def head(self) -> str:
        """The digest of the run's last seal: the chain head."""
        return self._mark.head.hex()

    @property
    def records(self) -> int:
        """Records written so far (header, transitions, notes), as the footer counts them."""
        return self._mark.records

    @property
    def footed(self) -> bool:
        """Whether the footer is in the file."""
        return self._mark.footed

    def log_state(self) -> str:
        """Return the state the log leaves the machine in, pending transitions included."""
        return _last_state(self.pending, self._mark.state)

    def has(self, trigger: str) -> bool:
        """Say whether a transition by ``trigger`` is written or pending."""
        for item in self.pending:  # a loop, not a generator: nothing left to finalise
            if type(item) is tuple and item[1][0] == trigger:
                return True
        return trigger in {key[0] for key in self._mark.tally}

    def start(self) -> None:
        """Write the header at once (a log that cannot be written fails the fit first)."""
        self.flush()

    def note(self, name: str, fields: Mapping[str, Any], *, epoch: int, it: int, tr: bool) -> None:
        """Check a note, render it timed now, and queue it."""
        values = note_fields(name, fields)
        t_ns = time.monotonic_ns() - self.t0_ns
        line = self._encoder.note(name, values, epoch=epoch, it=it, training=tr, t_ns=t_ns)
        self.pending.append(line)

    def flush_if_due(self) -> None:
        """Flush when the last flush is ``FLUSH_EVERY_NS`` ago, or ``FLUSH_AT`` records wait."""
        if len(self.pending) >= FLUSH_AT or time.monotonic_ns() >= self._due_ns:
            self.flush()

    def flush(self, closing: _Closing | None = None) -> None:
        """Render, seal and append whatever is pending, and ``footer`` last, as one transaction.

        The footer never enters ``pending``: a footer whose write was interrupted is gone,
        and the failure path writes its own after the fail record.
        """
        with self._file.locked():
            self._settle_attempt()
            pending, mark = self.pending, self._mark
            if mark.done and len(pending) >= mark.done and pending[mark.done - 1] is mark.last:
                del pending[: mark.done]  # what the last commit wrote (one C call: atomic)
            if mark.footed:  # nothing follows a footer (one whose commit was cut short)
                return
            count = len(pending)
            first = not mark.records
            if not count and closing is None and not first:
                return
            self._file.end_line()
            block = _Block(pending[:count], mark, closing, self._file.last_seal(), first)
            self._attempt = block
            self._log.msg("block", block=block)
            self._commit(block)
        self._due_ns = time.monotonic_ns() + FLUSH_EVERY_NS

    def settle(self) -> None:
        """Commit a block whose commit an interrupt cut short, if it is in the file."""
        if not self._file.closed:
            with self._file.locked():
                self._settle_attempt()

    def _commit(self, block: _Block) -> None:
        items = block.items
        records = block.mark.records + len(items) + block.first
        self._mark = _Mark(
            records,
            block.head,
            block.tally,
            block.state,
            block.mark.footed or block.closing is not None,
            len(items),
            items[-1] if items else None,
        )
        self._attempt = None
        del self.pending[: len(items)]  # an interrupt just before this is undone next flush

    def _settle_attempt(self) -> None:
        """Commit a block whose commit was interrupted, if it is in the file (under the lock)."""
        block = self._attempt
        if block is not None and block.mark is self._mark and self._file.holds(block):
            self._commit(block)
        self._attempt = None

    def finish(
        self,
        status: RunStatus,
        *,
        hook_ns: Mapping[str, list[int]],
        failure: Mapping[FailureField, object] | None = None,
    ) -> str:
        """Write the footer (unless written) and close; return the chain head.

        The footer counts the transition records written, so it agrees with the log
        whatever happened to the learner.
        """
        if not self.footed:
            self.flush(_Closing(status, hook_ns, failure, time.monotonic_ns()))
        self.close()
        return self.head

    def close(self) -> None:
        """Close the file, footer or not (again: nothing)."""
        self._file.close()

    def abandon(self) -> None:
        """Close without a footer: settle a block whose write or commit was interrupted.

        A file this writer created and left empty (the run's header never made it) is
        removed: an empty log would read as "no run in it" forever.
        """
        try:
            if not self._file.closed:
                with self._file.locked():
                    self._settle_attempt()
                    self._file.remove_if_empty()
        finally:
            self.close()
