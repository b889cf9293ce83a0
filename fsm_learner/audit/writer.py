"""Writing a run's audit log: a structlog processor chain over a JSON-lines file.

The learner appends one small tuple per transition to ``AuditWriter.pending`` (a clock
read and an append: no dict, no JSON, no tensor, no device sync). At every pass end, on
failure, at run end, and when ``pending`` grows past ``FLUSH_AT``, the writer hands the
pending records to a structlog logger it builds itself with ``structlog.wrap_logger``:
``RenderRecords`` renders them as JSON bodies, ``ChainRenderer`` seals each with the
chained hash, and ``JsonlFile`` writes the block. One structlog call per flush rather
than per transition: structlog's own cost is several µs per call here, more than the
2 µs a transition may cost in all (see the README).

A flush is a transaction. The processors compute the block from the last committed
``_Mark`` without changing it; only when the whole block is in the file does the writer
commit, in one attribute store, the new mark (file size, records written, chain head,
transition counts). Pending records stay in ``pending`` until then, so an interrupt
(Ctrl-C) anywhere in a flush loses nothing: the next flush cuts the file back to the
committed size and writes the block again. The footer's counts are those of the records
written, so the log always agrees with itself, whatever was interrupted.

The library never calls ``structlog.configure()``. Run-level events also go to the
``fsm_learner`` logger (structlog's when the application configured structlog, the
standard library's otherwise), which prints nothing unless the application asks; an
event that cannot be emitted never disturbs the fit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import structlog

if sys.platform != "win32":
    import fcntl

from fsm_learner._display import file_name, safe_text
from fsm_learner.audit.schema import (
    MAX_LINE_BYTES,
    PREV_FIELD,
    SCHEMA_VERSION,
    Chain,
    Field,
    RecordKind,
    RunStatus,
    unseal,
)
from fsm_learner.exceptions import AuditLogInUseError, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "FLUSH_AT",
    "AuditWriter",
    "ChainRenderer",
    "JsonlFile",
    "RenderRecords",
    "TransitionKey",
    "emit_run_event",
    "note_record",
]

FLUSH_AT: Final = 8192
"""Pending records that trigger a flush inside a long pass (bounds memory)."""

TransitionKey = tuple[str, str, str, bool]
"""(trigger, source, destination, training) of a compiled route, as plain values."""

_APP_LOGGER_NAME: Final = "fsm_learner"
logging.getLogger(_APP_LOGGER_NAME).addHandler(logging.NullHandler())


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
        named = {
            f"fsm_{name}" if name in _LOG_RECORD_NAMES else name: value
            for name, value in fields.items()
        }
        if structlog.is_configured():
            structlog.get_logger(_APP_LOGGER_NAME).info(event, **named)
        else:
            logging.getLogger(_APP_LOGGER_NAME).info("%s %s", event, fields, extra=named)
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

    size: int
    """The file's size after the last committed block."""
    seq: int = 0
    """Records written (the next record's ``seq``)."""
    head: bytes = b""
    """The chain head after them."""
    tally: Mapping[TransitionKey, int] = attrs.field(factory=dict)
    """Transition records written, per route."""
    state: str = "idle"
    """The destination of the last transition written: the log's state."""
    footed: bool = False
    """Whether the footer is written."""
    done: int = 0
    """How many items at the front of ``pending`` this commit wrote (trimmed lazily)."""
    last: object = None
    """The last of those items, to recognise them in ``pending``."""


@attrs.define
class _Block:
    """One flush in the making: the processors fill it in, the commit reads it."""

    items: list[Any]
    mark: _Mark
    bodies: list[bytes] = attrs.Factory(list)
    seq: int = 0
    tally: dict[TransitionKey, int] = attrs.Factory(dict)
    state: str = "idle"
    footed: bool = False
    data: bytes = b""
    head: bytes = b""
    size: int = 0


def _last_state(items: list[Any], before: str) -> str:
    """Return the destination of the last transition among ``items`` (``before`` if none)."""
    for item in reversed(items):
        if type(item) is tuple:
            state: str = item[1][2]
            return state
    return before


class RenderRecords:
    """Processor: render the block's items as open JSON bodies, numbered from its mark.

    Records are numbered in order and timed from the run's start. A transition is
    rendered through a byte template per route (the fields are fixed, only the numbers
    vary: twice as fast as a dict through orjson, with the same bytes); header, notes
    and footer are dicts rendered with orjson. The processor keeps no count of its own:
    what it computes lands in the block, and only a completed write commits it.
    """

    def __init__(self, run_id: str, rank: int, t0_ns: int) -> None:
        """Time records from ``t0_ns`` (monotonic)."""
        self.run_id, self.rank, self.t0_ns = run_id, rank, t0_ns
        self._templates: dict[TransitionKey, bytes] = {}

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """Fill in the block's bodies, count and state."""
        block: _Block = event_dict["block"]
        mark = block.mark
        bodies: list[bytes] = []
        tally = dict(mark.tally)
        seq, t0, templates, footed = mark.seq, self.t0_ns, self._templates, False
        for item in block.items:
            if type(item) is tuple:  # (t_ns, key, epoch, iter) of a transition: kept tight
                t_ns, key, epoch, it = item
                template = templates.get(key) or self._template(key)
                bodies.append(template % (seq, t_ns - t0, epoch, it))
                tally[key] = tally.get(key, 0) + 1
            else:
                bodies.append(self._render_dict(item, seq))
                footed = footed or item.get(Field.EVENT.value) == RecordKind.RUN_END.value
            seq += 1
        block.bodies, block.seq, block.tally = bodies, seq, tally
        block.footed = footed or mark.footed
        block.state = _last_state(block.items, mark.state)
        return event_dict

    def _template(self, key: TransitionKey) -> bytes:
        trigger, source, dest, training = key
        record = {"run": self.run_id, "seq": 0, "t": 0, "ev": trigger, "src": source}
        record |= {"dst": dest, "ep": 0, "it": 0, "tr": training, "rk": self.rank}
        body = orjson.dumps(record)[:-1]  # open: the hash field closes it
        for field in (b'"seq":0', b'"t":0', b'"ep":0', b'"it":0'):
            body = body.replace(field, field[:-1] + b"%d", 1)
        self._templates[key] = body
        return body

    def _render_dict(self, item: dict[str, Any], seq: int) -> bytes:
        fields = {k: v for k, v in item.items() if k != Field.TIME_NS}
        record = {"run": self.run_id, "seq": seq, "t": item[Field.TIME_NS] - self.t0_ns, **fields}
        return orjson.dumps(record)[:-1]  # open: the hash field closes it


class ChainRenderer:
    """Processor: seal each rendered body with the hash chained from the block's mark."""

    def __init__(self, key: bytes | None) -> None:
        """Chain keyed when ``key`` is given."""
        self.chain = Chain(key)

    def __call__(
        self, _logger: WrappedLogger, _method: str, event_dict: EventDict
    ) -> dict[str, _Block]:
        """Put the block's lines and new head in it; hand the block to the file."""
        block: _Block = event_dict["block"]
        chain = self.chain
        chain.head = block.mark.head  # scratch: the mark, not the chain, holds the truth
        block.data = chain.seal_all(block.bodies)
        block.head = chain.head
        return {"block": block}


_OPEN_FLAGS: Final = (
    os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | os.O_CLOEXEC
)
_TAIL_SCAN: Final = 2 * MAX_LINE_BYTES + 2
"""How far back from the end of a log the writer looks for the last sealed line."""
_FIRST_WINDOW: Final = 4096


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
    one call, whatever interrupts it, and never twice.
    """
    try:
        fh = io.FileIO(path, "a+", opener=_open_flags)
    except OSError as exc:
        try:
            mode = path.stat().st_mode
        except OSError:
            raise exc from None
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode) from None
        raise
    try:
        mode = os.fstat(fh.fileno()).st_mode
    except BaseException:
        fh.close()
        raise
    if not stat.S_ISREG(mode):
        fh.close()
        raise _not_regular(path, mode)
    return fh


def _open_flags(path: str, _flags: int) -> int:
    return os.open(path, _OPEN_FLAGS, 0o644)


def _lock(fd: int, path: Path) -> None:
    """Hold an exclusive lock on the log while it is open: one writer per file."""
    if sys.platform == "win32":  # pragma: no cover (no advisory locks through fcntl)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        msg = (
            f"audit log {file_name(path)} is being written by another fit (another process, "
            "or another learner in this one); give each its own .jsonl file, or a directory"
        )
        raise AuditLogInUseError(msg) from None


def last_seal(data: bytes) -> bytes:
    """Return the digest of the last whole line of ``data`` that carries a seal, or b"".

    ``data`` is the end of a log; a first line that may be cut by the window is skipped
    unless the window is the whole file.
    """
    lines = data.split(b"\n")[:-1]  # whole lines only: what follows the last LF is not one
    for line in reversed(lines):
        sealed = unseal(line)
        if sealed is not None:
            return sealed[1]
    return b""


class JsonlFile:
    """The wrapped logger: appends blocks to one log file, all or nothing."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` (a regular file, created if missing); end a cut-off last line.

        ``prev`` is the digest of the last sealed line already in the file (b"" for a
        new file): the next run's header binds to it.
        """
        self.path = path
        self._created = not os.path.lexists(path)
        self._fh = open_log_file(path)
        try:
            self.fd = self._fh.fileno()
            _lock(self.fd, path)
            self.size, self.prev = self._prepare_end()
        except BaseException:
            self._fh.close()
            raise
        self._in_flight: int | None = None

    def _prepare_end(self) -> tuple[int, bytes]:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return 0, b""
        if os.pread(self.fd, 1, size - 1) != b"\n":
            self._write_all(b"\n")  # a killed run's cut line: the next run starts a line
            size += 1
        return size, self._last_seal(size)

    def _last_seal(self, size: int) -> bytes:
        """Look back from the end, in growing windows, for the last sealed line."""
        window = _FIRST_WINDOW
        while True:
            start = max(size - window, 0)
            tail = os.pread(self.fd, size - start, start)
            if start > 0:  # the window may cut its first line: never take that one
                cut = tail.find(b"\n")
                tail = tail[cut + 1 :] if cut >= 0 else b""
            digest = last_seal(tail)
            if digest or start == 0 or window >= _TAIL_SCAN:
                return digest
            window *= 8

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def msg(self, block: _Block) -> None:
        """Write the block after the committed size; its new size goes in the block."""
        size = block.mark.size
        if self._in_flight == size:  # a write from this mark never committed: cut it off
            os.ftruncate(self.fd, size)
        self._in_flight = size
        self._write_all(block.data)
        block.size = size + len(block.data)

    def abandon(self, size: int) -> None:
        """Close, first cutting off a write from ``size`` that never committed.

        A file this writer created and left empty (the run's header never made it) is
        removed: an empty log would read as "no run in it" forever.
        """
        try:
            if not self._fh.closed:
                if self._in_flight == size:
                    os.ftruncate(self.fd, size)
                if self._created and size == 0:
                    self._remove_if_empty()
        finally:
            self.close()

    def _remove_if_empty(self) -> None:
        mine = os.fstat(self.fd)
        try:
            there = self.path.stat()
        except OSError:
            return
        if mine.st_size == 0 and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            self.path.unlink()

    def sync(self) -> None:
        """Ask the OS to put the file on disk."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file (again: nothing)."""
        self._fh.close()


_MAX_DEPTH: Final = 32
"""Nesting a note field may have (orjson refuses beyond 254; the audit's reports stay small)."""
_NON_FINITE: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _json_value(name: str, value: object, depth: int = 0) -> object:
    """Return ``value`` as JSON data; NaN and infinities become "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):  # numpy's float64 too: orjson takes only exact floats
        return float(value) if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if depth >= _MAX_DEPTH:
        msg = (
            f"audit note field {name!r} nests deeper than {_MAX_DEPTH} levels (or holds "
            "itself); notes hold plain JSON values: flatten it"
        )
        raise TypeError(msg)
    if isinstance(value, list | tuple):
        return [_json_value(name, v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(f"{name}.{k}", v, depth + 1) for k, v in value.items()}
    msg = (
        f"audit note field {name!r} must be a JSON value (bool, int, float, str, None, "
        f"list, dict), got {type(value).__name__}; convert tensors yourself, once per pass"
    )
    raise TypeError(msg)


_RESERVED: Final = frozenset({f.value for f in Field} | {"name"})


def note_record(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a note and return its record (without time); raise on what JSON cannot hold.

    Floats that are not finite are written as the strings "NaN", "Infinity" and
    "-Infinity" (JSON has no such numbers); a note longer than a log line may be is refused.
    """
    if not isinstance(name, str):
        msg = f"a note's name must be a str, got {type(name).__name__}"
        raise TypeError(msg)
    clash = sorted(_RESERVED & set(fields))
    if clash:
        msg = f"audit note fields may not use the reserved names {clash}; rename them"
        raise ValueError(msg)
    record = {
        Field.EVENT.value: RecordKind.NOTE.value,
        "name": name,
        **{k: _json_value(k, v) for k, v in fields.items()},
    }
    try:
        size = len(orjson.dumps(record))
    except orjson.JSONEncodeError as exc:
        msg = f"audit note {safe_text(name)!r} cannot be written as JSON: {exc}"
        raise TypeError(msg) from None
    if size > MAX_LINE_BYTES // 2:
        msg = (
            f"audit note {safe_text(name)!r} is {size:,} bytes as JSON; a note may be at most "
            f"{MAX_LINE_BYTES // 2:,} (a log line at most {MAX_LINE_BYTES:,}): note a summary"
        )
        raise ValueError(msg)
    return record


class AuditWriter:
    """One run's audit log: header, buffered transitions and notes, footer."""

    def __init__(self, path: Path, *, run_id: str, key: bytes | None, rank: int) -> None:
        """Open ``path`` for appending (a .jsonl file may hold several runs)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.run_id, self.keyed = path, run_id, key is not None
        self.t0_ns = time.monotonic_ns()
        self.pending: list[Any] = []
        file = None
        try:  # whatever interrupts the set-up, the file is closed
            file = JsonlFile(path)
            self._mark = _Mark(file.size)
            self._log = structlog.wrap_logger(
                file,
                processors=[RenderRecords(run_id, rank, self.t0_ns), ChainRenderer(key)],
                wrapper_class=structlog.BoundLogger,
                context_class=dict,
            ).bind()
            self._file = file
        except BaseException:
            if file is not None:
                file.close()
            raise

    @property
    def head(self) -> str:
        """The hash of the last record written: the chain head."""
        return self._mark.head.hex()

    @property
    def records_written(self) -> int:
        """How many records of this run were written so far."""
        return self._mark.seq

    @property
    def started(self) -> bool:
        """Whether the header is in the file (without it, nothing else may be written)."""
        return self._mark.seq > 0

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

    def counts(self) -> dict[str, list[int]]:
        """Transition records written per trigger, as ``[training, validation]``."""
        counts: dict[str, list[int]] = {}
        for (trigger, _, _, training), n in self._mark.tally.items():
            counts.setdefault(trigger, [0, 0])[0 if training else 1] += n
        return counts

    def start(self, header: Mapping[str, Any]) -> None:
        """Write the header record at once, bound to the file's last sealed line."""
        record = {
            Field.TIME_NS.value: self.t0_ns,
            Field.EVENT.value: RecordKind.RUN_START.value,
            "schema": SCHEMA_VERSION,
            "keyed": self.keyed,
            PREV_FIELD: self._file.prev.hex(),
            **header,
        }
        self.pending.append(_json_value("header", record))
        self.flush()

    def note(self, record: dict[str, Any]) -> None:
        """Queue a note record made by ``note_record``, timed now."""
        self.pending.append({Field.TIME_NS.value: time.monotonic_ns(), **record})

    def close(self) -> None:
        """Close the file, footer or not (again: nothing)."""
        self._file.close()

    def abandon(self) -> None:
        """Close without a footer, cutting off a block whose write was interrupted."""
        self._file.abandon(self._mark.size)

    def flush(self, footer: dict[str, Any] | None = None) -> None:
        """Render, chain and write whatever is pending, and ``footer`` last, as one transaction.

        The footer never enters ``pending``: a footer whose write was interrupted is gone,
        and the failure path writes its own after the fail record.
        """
        pending, mark = self.pending, self._mark
        if mark.done and len(pending) >= mark.done and pending[mark.done - 1] is mark.last:
            del pending[: mark.done]  # what the last commit wrote (one C call: atomic)
        count = len(pending)
        if not count and footer is None:
            return
        items = pending[:count]
        block = _Block([*items, footer] if footer is not None else items, mark)
        self._log.msg("records", block=block)
        self._mark = _Mark(
            block.size,
            block.seq,
            block.head,
            block.tally,
            block.state,
            block.footed,
            count,
            items[-1] if items else None,
        )
        del pending[:count]  # an interrupt just before this is undone at the next flush

    def finish(self, status: RunStatus, failure: Mapping[str, Any] | None = None) -> str:
        """Write the footer (unless written), fsync and close; return the chain head.

        The footer counts the transition records written, so it agrees with the log
        whatever happened to the learner.
        """
        if not self.footed:
            self.flush()
            footer: dict[str, Any] = {
                Field.TIME_NS.value: time.monotonic_ns(),
                Field.EVENT.value: RecordKind.RUN_END.value,
                "status": status.value,
                "records": self.records_written,
                "counts": self.counts(),
            }
            if failure is not None:
                footer["failure"] = _json_value("failure", dict(failure))
            self.flush(footer)
            self._file.sync()
        self.close()
        return self.head
