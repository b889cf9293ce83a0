"""Writing a run's audit log: a structlog processor chain over a JSON-lines file.

The learner appends one small tuple per transition to ``AuditWriter.pending`` (a clock
read and an append: no dict, no JSON, no tensor, no device sync). At every pass end, on
failure, at run end, and when ``pending`` grows past ``FLUSH_AT``, the writer hands the
pending records to a structlog logger it builds itself with ``structlog.wrap_logger``:
``RenderRecords`` renders them as JSON bodies, ``ChainRenderer`` seals each with the
chained hash, and ``JsonlFile`` writes the lines. One
structlog call per flush rather than per transition: structlog's own cost is several µs
per call here, more than the 2 µs a transition may cost in all (see the README).

The library never calls ``structlog.configure()``. Run-level events also go to the
``fsm_learner`` logger (structlog's when the application configured structlog, the
standard library's otherwise), which prints nothing unless the application asks.
"""

from __future__ import annotations

import logging
import os
import time
from typing import IO, TYPE_CHECKING, Any, Final

import orjson
import structlog

from fsm_learner.audit.schema import (
    SCHEMA_VERSION,
    Chain,
    Field,
    RecordKind,
    RunStatus,
)

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


def emit_run_event(event: str, **fields: Any) -> None:
    """Emit a run-level event on the ``fsm_learner`` logger the application may route."""
    if structlog.is_configured():
        structlog.get_logger(_APP_LOGGER_NAME).info(event, **fields)
    else:
        logging.getLogger(_APP_LOGGER_NAME).info("%s %s", event, fields, extra=fields)


class RenderRecords:
    """Processor: render the pending items of ``event_dict["records"]`` as open JSON bodies.

    Records are numbered in order and timed from the run's start. A transition is
    rendered through a byte template per route (the fields are fixed, only the numbers
    vary: twice as fast as a dict through orjson, with the same bytes); header, notes
    and footer are dicts rendered with orjson.
    """

    def __init__(self, run_id: str, rank: int, t0_ns: int) -> None:
        """Start numbering at 0 and timing at ``t0_ns`` (monotonic)."""
        self.run_id, self.rank, self.t0_ns = run_id, rank, t0_ns
        self.seq = 0
        self._templates: dict[TransitionKey, bytes] = {}

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """Replace the pending items by rendered bodies."""
        bodies = []
        seq, t0, templates = self.seq, self.t0_ns, self._templates
        for item in event_dict["records"]:
            if isinstance(item, dict):
                bodies.append(self._render_dict(item, seq))
            else:  # (t_ns, key, epoch, iter) of a transition: the common case, kept tight
                t_ns, key, epoch, it = item
                template = templates.get(key) or self._template(key)
                bodies.append(template % (seq, t_ns - t0, epoch, it))
            seq += 1
        self.seq = seq
        event_dict["records"] = bodies
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
        t_ns = item.pop(Field.TIME_NS)
        record = {"run": self.run_id, "seq": seq, "t": t_ns - self.t0_ns, **item}
        return orjson.dumps(record)[:-1]  # open: the hash field closes it


class ChainRenderer:
    """Processor: seal each rendered body with the chained hash; return the lines."""

    def __init__(self, key: bytes | None) -> None:
        """Chain from an empty hash, keyed when ``key`` is given."""
        self.chain = Chain(key)

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> bytes:
        """Return the lines to write, one per record."""
        return self.chain.seal_all(event_dict["records"])


class JsonlFile:
    """The wrapped logger: writes rendered lines to a file and hands them to the OS."""

    def __init__(self, fh: IO[bytes]) -> None:
        """Write to ``fh``, an open binary file."""
        self.fh = fh

    def msg(self, data: bytes) -> None:
        """Write ``data`` and flush Python's buffer, so a killed process leaves whole lines."""
        self.fh.write(data)
        self.fh.flush()

    def sync(self) -> None:
        """Ask the OS to put the file on disk."""
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        """Close the file."""
        self.fh.close()


def _json_value(name: str, value: object) -> object:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_json_value(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(f"{name}.{k}", v) for k, v in value.items()}
    msg = (
        f"audit note field {name!r} must be a JSON value (bool, int, float, str, None, "
        f"list, dict), got {type(value).__name__}; convert tensors yourself, once per pass"
    )
    raise TypeError(msg)


def _open_for_append(path: Path) -> IO[bytes]:
    """Open for appending; end a cut-off last line first, so the new run starts a line."""
    fh = path.open("ab")
    if fh.tell() > 0:
        with path.open("rb") as tail:
            tail.seek(-1, os.SEEK_END)
            if tail.read(1) != b"\n":
                fh.write(b"\n")
    return fh


_RESERVED: Final = frozenset({f.value for f in Field} | {"name"})


def note_record(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a note and return its record (without time); raise on what JSON cannot hold."""
    clash = sorted(_RESERVED & set(fields))
    if clash:
        msg = f"audit note fields may not use the reserved names {clash}; rename them"
        raise ValueError(msg)
    record = {
        Field.EVENT.value: RecordKind.NOTE.value,
        "name": str(name),
        **{k: _json_value(k, v) for k, v in fields.items()},
    }
    try:
        orjson.dumps(record)
    except orjson.JSONEncodeError as exc:
        msg = f"audit note {name!r} cannot be written as JSON: {exc}"
        raise TypeError(msg) from None
    return record


class AuditWriter:
    """One run's audit log: header, buffered transitions and notes, footer."""

    def __init__(self, path: Path, *, run_id: str, key: bytes | None, rank: int) -> None:
        """Open ``path`` for appending (a .jsonl file may hold several runs)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.run_id, self.keyed = path, run_id, key is not None
        self.t0_ns = time.monotonic_ns()
        self.pending: list[Any] = []
        self._file = JsonlFile(_open_for_append(path))
        self._renderer = ChainRenderer(key)
        self._render = RenderRecords(run_id, rank, self.t0_ns)
        self._log = structlog.wrap_logger(
            self._file,
            processors=[self._render, self._renderer],
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
        ).bind()

    @property
    def head(self) -> str:
        """The hash of the last record written: the chain head."""
        return self._renderer.chain.head.hex()

    @property
    def records_written(self) -> int:
        """How many records of this run were written so far."""
        return self._render.seq

    def start(self, header: Mapping[str, Any]) -> None:
        """Write the header record at once."""
        record = {
            Field.TIME_NS.value: self.t0_ns,
            Field.EVENT.value: RecordKind.RUN_START.value,
            "schema": SCHEMA_VERSION,
            "keyed": self.keyed,
            **header,
        }
        self.pending.append(_json_value("header", record))
        self.flush()

    def note(self, record: dict[str, Any]) -> None:
        """Queue a note record made by ``note_record``, timed now."""
        self.pending.append({Field.TIME_NS.value: time.monotonic_ns(), **record})

    def close(self) -> None:
        """Close the file without a footer (a run that could not start)."""
        self._file.close()

    def flush(self) -> None:
        """Render, chain and write whatever is pending."""
        if self.pending:
            records = self.pending[:]
            self.pending.clear()
            self._log.msg("records", records=records)

    def finish(
        self,
        status: RunStatus,
        counts: Mapping[str, list[int]],
        failure: Mapping[str, Any] | None = None,
    ) -> str:
        """Write the footer, fsync and close; return the chain head."""
        self.flush()
        footer: dict[str, Any] = {
            Field.TIME_NS.value: time.monotonic_ns(),
            Field.EVENT.value: RecordKind.RUN_END.value,
            "status": status.value,
            "records": self.records_written,
            "counts": dict(counts),
        }
        if failure is not None:
            footer["failure"] = dict(failure)
        self.pending.append(footer)
        self.flush()
        self._file.sync()
        self._file.close()
        return self.head
