"""Writing a run's audit log: a structlog processor chain over a JSON-lines file.

The learner appends one small tuple per transition to ``AuditWriter.pending`` (a clock
read and an append: no dict, no JSON, no tensor, no device sync). At every pass end, on
failure, at run end, and when ``pending`` grows past ``FLUSH_AT``, the writer hands the
pending records to a structlog logger it builds itself with ``structlog.wrap_logger``:
``ExpandRecords`` turns them into record dicts, ``ChainRenderer`` renders each with
orjson and seals it with the chained hash, and ``JsonlFile`` writes the lines. One
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
    Field,
    RecordKind,
    RunStatus,
    chain_hash,
    seal,
)

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from structlog.typing import EventDict, WrappedLogger

__all__ = [
    "FLUSH_AT",
    "AuditWriter",
    "ChainRenderer",
    "ExpandRecords",
    "JsonlFile",
    "TransitionKey",
    "emit_run_event",
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


class ExpandRecords:
    """Processor: turn ``event_dict["records"]`` into full record dicts, numbered in order."""

    def __init__(self, run_id: str, rank: int, t0_ns: int) -> None:
        """Start numbering at 0 and timing at ``t0_ns`` (monotonic)."""
        self.run_id, self.rank, self.t0_ns = run_id, rank, t0_ns
        self.seq = 0

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        """Replace the pending items by record dicts."""
        event_dict["records"] = [self._expand(item) for item in event_dict["records"]]
        return event_dict

    def _expand(self, item: tuple[int, TransitionKey, int, int] | dict[str, Any]) -> dict[str, Any]:
        seq, self.seq = self.seq, self.seq + 1
        if isinstance(item, dict):
            t_ns = item.pop(Field.TIME_NS)
            return {"run": self.run_id, "seq": seq, "t": t_ns - self.t0_ns, **item}
        t_ns, (trigger, source, dest, training), epoch, it = item
        return {
            "run": self.run_id,
            "seq": seq,
            "t": t_ns - self.t0_ns,
            "ev": trigger,
            "src": source,
            "dst": dest,
            "ep": epoch,
            "it": it,
            "tr": training,
            "rk": self.rank,
        }


class ChainRenderer:
    """Processor: render each record with orjson and seal it with the chained hash."""

    def __init__(self, key: bytes | None) -> None:
        """Chain from an empty hash, keyed when ``key`` is given."""
        self.key = key
        self.head = b""

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> bytes:
        """Return the lines to write, one per record."""
        lines = []
        for record in event_dict["records"]:
            body = orjson.dumps(record)
            self.head = chain_hash(self.head, body, self.key)
            lines.append(seal(body, self.head))
        return b"".join(lines)


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


class AuditWriter:
    """One run's audit log: header, buffered transitions and notes, footer."""

    def __init__(self, path: Path, *, run_id: str, key: bytes | None, rank: int) -> None:
        """Open ``path`` for appending (a .jsonl file may hold several runs)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.run_id, self.keyed = path, run_id, key is not None
        self.t0_ns = time.monotonic_ns()
        self.pending: list[Any] = []
        self._file = JsonlFile(path.open("ab"))
        self._renderer = ChainRenderer(key)
        self._expand = ExpandRecords(run_id, rank, self.t0_ns)
        self._log = structlog.wrap_logger(
            self._file,
            processors=[self._expand, self._renderer],
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
        ).bind()

    @property
    def head(self) -> str:
        """The hash of the last record written: the chain head."""
        return self._renderer.head.hex()

    @property
    def records_written(self) -> int:
        """How many records of this run were written so far."""
        return self._expand.seq

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

    def note(self, name: str, fields: Mapping[str, Any]) -> None:
        """Queue a note record (metrics at pass end, a reason for a cancel, ...)."""
        reserved = {f.value for f in Field} | {"name"}
        clash = sorted(reserved & set(fields))
        if clash:
            msg = f"audit note fields may not use the reserved names {clash}; rename them"
            raise ValueError(msg)
        record = {
            Field.TIME_NS.value: time.monotonic_ns(),
            Field.EVENT.value: RecordKind.NOTE.value,
            "name": name,
            **{k: _json_value(k, v) for k, v in fields.items()},
        }
        self.pending.append(record)

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
