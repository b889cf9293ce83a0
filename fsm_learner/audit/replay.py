"""Replaying audit logs: verify each run against the transition table, and summarise it.

``audit_file`` streams a log line by line (constant memory) and returns one
``RunReport`` per run in it. A run verifies when every record parses and fits the
schema, sequence numbers have no gap, the hash chain is intact, every transition is one
the machine declares (checked against the routes read off the ``transitions`` machine
built from ``TRANSITION_TABLE``), and the footer is present and agrees with what was
replayed. The first problem stops the verification of that run and is reported with its
file, line and reason; the summary still describes the verified prefix.
"""

from __future__ import annotations

import heapq
from collections import Counter
from functools import cache
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import orjson

from fsm_learner.audit.schema import (
    SCHEMA_VERSION,
    Chain,
    Field,
    RecordKind,
    RunStatus,
    unseal,
)
from fsm_learner.machine import State, Trigger, table_digest, table_routes

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

__all__ = ["Problem", "RunReport", "SlowTransition", "audit_file", "log_files"]

SLOWEST_KEPT: Final = 5
_TRIGGERS: Final = frozenset(t.value for t in Trigger)
_KINDS: Final = frozenset(k.value for k in RecordKind)
_STATES: Final = frozenset(s.value for s in State)
_STATUSES: Final = frozenset(
    s.value for s in (RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED)
)
_CANCELS: Final = (Trigger.CANCEL_BATCH, Trigger.CANCEL_EPOCH, Trigger.CANCEL_FIT)
_EVENTS: Final = _TRIGGERS | _KINDS
_FAIL: Final = Trigger.FAIL.value
_NOTE: Final = RecordKind.NOTE.value
_RUN_END: Final = RecordKind.RUN_END.value


@cache
def _plain_routes() -> dict[bool, dict[str, dict[str, str]]]:
    """Return the machine's routes with plain-string keys, for a fast replay."""
    return {
        training: {
            state.value: {trigger.value: dest.value for trigger, dest in by_trigger.items()}
            for state, by_trigger in routes.items()
        }
        for training, routes in table_routes().items()
    }


@attrs.frozen
class Problem:
    """Why a run (or a file) does not verify: the first thing found wrong."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        """Render as ``file:line: reason``."""
        return f"{self.path}:{self.line}: {self.reason}"


@attrs.frozen
class SlowTransition:
    """A transition and the time spent in its source state before it fired."""

    duration_ns: int
    seq: int
    trigger: str
    source: str
    dest: str
    epoch: int
    iter: int
    training: bool


@attrs.define
class RunReport:
    """What the audit found in one run: verification result and summary."""

    path: str
    first_line: int
    run_id: str = ""
    status: RunStatus = RunStatus.TRUNCATED
    problem: Problem | None = None
    header: dict[str, Any] = attrs.Factory(dict)
    records: int = 0
    transitions: int = 0
    counts: Counter[tuple[str, bool]] = attrs.Factory(Counter)
    notes: int = 0
    time_in_state_ns: Counter[str] = attrs.Factory(Counter)
    wall_ns: int = 0
    slowest: list[SlowTransition] = attrs.Factory(list)
    failure: dict[str, Any] | None = None
    failed_at: dict[str, Any] | None = None
    head: str = ""
    last_state: str = State.IDLE.value

    @property
    def verified(self) -> bool:
        """True when the whole run checked out, footer included."""
        return self.problem is None and self.status is not RunStatus.TRUNCATED

    @property
    def epochs(self) -> int:
        """Training passes begun (one per epoch)."""
        return self.counts[Trigger.BEGIN_EPOCH.value, True]

    @property
    def batches(self) -> tuple[int, int]:
        """Completed batches: (training, validation)."""
        end = Trigger.END_BATCH.value
        return self.counts[end, True], self.counts[end, False]

    @property
    def cancels(self) -> dict[str, int]:
        """Cancel transitions taken, by kind."""
        return {t.value: self.counts[t.value, True] + self.counts[t.value, False] for t in _CANCELS}

    def to_json(self) -> dict[str, Any]:
        """Everything the summary shows, as JSON-able data."""
        return {
            "path": self.path,
            "run_id": self.run_id,
            "status": self.status.value,
            "verified": self.verified,
            "problem": None if self.problem is None else attrs.asdict(self.problem),
            "records": self.records,
            "transitions": self.transitions,
            "notes": self.notes,
            "epochs": self.epochs,
            "batches": {"train": self.batches[0], "valid": self.batches[1]},
            "cancels": self.cancels,
            "failure": self.failure,
            "failed_at": self.failed_at,
            "wall_ns": self.wall_ns,
            "time_in_state_ns": dict(self.time_in_state_ns),
            "slowest": [attrs.asdict(s) for s in self.slowest],
            "head": self.head,
            "header": self.header,
        }


class _Invalid(Exception):  # noqa: N818 (private signal, never escapes this module)
    """A record that does not verify; carries the reason."""


class _RunReplay:
    """Replays one run record by record; raises _Invalid at the first problem."""

    def __init__(self, report: RunReport, key: bytes | None) -> None:
        self.report, self.key = report, key
        self.chain = Chain(key)
        self.seq = 0
        self.t_prev = 0
        self.state: str = State.IDLE.value
        self.slow: list[tuple[int, int, SlowTransition]] = []
        self.finished = False

    def feed(self, body: bytes, digest: bytes, record: dict[str, Any]) -> None:
        run, seq, t_ns, event = _common(record)
        report = self.report
        if self.finished:
            msg = f"record after the run_end of run {report.run_id}"
            raise _Invalid(msg)
        if run != report.run_id:
            msg = f"record of run {run!r} inside run {report.run_id!r}"
            raise _Invalid(msg)
        if seq != self.seq:
            msg = f"sequence number {seq}, expected {self.seq} (a record missing or moved)"
            raise _Invalid(msg)
        self._check_chain(body, digest)
        if t_ns < self.t_prev:
            msg = f"time goes backwards ({t_ns} ns after {self.t_prev} ns)"
            raise _Invalid(msg)
        report.time_in_state_ns[self.state] += t_ns - self.t_prev
        dt, self.t_prev = t_ns - self.t_prev, t_ns
        self.seq += 1
        report.records = self.seq
        report.wall_ns = t_ns
        if event in _TRIGGERS:
            self._transition(record, seq, event, dt)
        elif event == _NOTE:
            report.notes += 1
        elif event == _RUN_END:
            self._footer(record)

    def _check_chain(self, body: bytes, digest: bytes) -> None:
        if self.chain.digest(body) != digest:
            hint = " (or the wrong key)" if self.key is not None else ""
            msg = f"hash chain broken: the record was edited, inserted or reordered{hint}"
            raise _Invalid(msg)
        self.chain.head = digest
        self.report.head = digest.hex()

    def _transition(self, record: dict[str, Any], seq: int, event: str, dt: int) -> None:
        source, dest, training = record.get("src"), record.get("dst"), record.get("tr")
        epoch, it = record.get("ep"), record.get("it")
        if (
            source not in _STATES
            or dest not in _STATES
            or type(training) is not bool
            or type(epoch) is not int
            or type(it) is not int
            or type(record.get("rk")) is not int
        ):
            _bad_transition_fields(record)
        if source != self.state:
            msg = f"{event} from {source!r}, but the replayed state is {self.state!r}"
            raise _Invalid(msg)
        allowed = _plain_routes()[training][source].get(event)
        if allowed is None or allowed != dest:
            msg = (
                f"illegal transition {event}: {source} -> {dest} (training={training}); "
                f"the table allows {allowed or 'no such transition'}"
            )
            raise _Invalid(msg)
        self.state = allowed
        report = self.report
        report.transitions += 1
        report.counts[event, training] += 1
        report.last_state = allowed
        if event == _FAIL:
            report.failed_at = {"state": source, "epoch": epoch, "iter": it, "training": training}
        slow = self.slow
        if len(slow) < SLOWEST_KEPT or dt > slow[0][0]:
            entry = (dt, -seq, SlowTransition(dt, seq, event, source, allowed, epoch, it, training))
            if len(slow) < SLOWEST_KEPT:
                heapq.heappush(slow, entry)
            else:
                heapq.heapreplace(slow, entry)

    def _footer(self, record: dict[str, Any]) -> None:
        report = self.report
        status = record.get("status")
        if status not in _STATUSES:
            msg = f"run_end status {status!r}, expected one of {sorted(_STATUSES)}"
            raise _Invalid(msg)
        records = record.get("records")
        if type(records) is not int or records != self.seq - 1:
            msg = f"run_end says {records!r} records, replayed {self.seq - 1}"
            raise _Invalid(msg)
        replayed = {t: [report.counts[t, True], report.counts[t, False]] for t, _ in report.counts}
        # compare as JSON so that 5.0 or true cannot stand for 5 or 1
        sort = orjson.OPT_SORT_KEYS
        if orjson.dumps(record.get("counts"), option=sort) != orjson.dumps(replayed, option=sort):
            msg = f"run_end counts {record.get('counts')} differ from the replayed {replayed}"
            raise _Invalid(msg)
        if self.state != State.IDLE:
            msg = f"run_end while the replayed machine is in {self.state!r}, not idle"
            raise _Invalid(msg)
        report.status = RunStatus(status)
        failure = record.get("failure")
        report.failure = failure if isinstance(failure, dict) else None
        self.finished = True

    def close(self) -> None:
        self.report.slowest = [s for _, _, s in sorted(self.slow, reverse=True)]


def _common(record: dict[str, Any]) -> tuple[str, int, int, str]:
    run, seq, t_ns, event = record.get("run"), record.get("seq"), record.get("t"), record.get("ev")
    if type(run) is not str or type(seq) is not int or type(t_ns) is not int:
        _bad_common(record)
    if type(event) is not str or event not in _EVENTS:
        msg = f"unknown event {event!r}: neither a trigger of the table nor one of {sorted(_KINDS)}"
        raise _Invalid(msg)
    return run, seq, t_ns, event


def _bad_common(record: dict[str, Any]) -> NoReturn:
    for name, kind in (("run", str), ("seq", int), ("t", int)):
        value = record.get(name)
        if type(value) is not kind:
            shown = "missing" if value is None else f"{type(value).__name__} {value!r}"
            msg = f"field {name!r} must be {kind.__name__}, got {shown}"
            raise _Invalid(msg)
    msg = "malformed record"  # pragma: no cover (one of the checks above fails)
    raise _Invalid(msg)


def _bad_transition_fields(record: dict[str, Any]) -> NoReturn:
    for name in ("src", "dst"):
        value = record.get(name)
        if value not in _STATES:
            states = ", ".join(sorted(_STATES))
            msg = f"field {name!r} is {value!r}, not a state of the table ({states})"
            raise _Invalid(msg)
    if type(record.get("tr")) is not bool:
        msg = f"field 'tr' must be true or false, got {record.get('tr')!r}"
        raise _Invalid(msg)
    for name in ("ep", "it", "rk"):
        value = record.get(name)
        if type(value) is not int:
            msg = f"field {name!r} must be int, got {value!r}"
            raise _Invalid(msg)
    msg = "malformed transition record"  # pragma: no cover (one of the checks above fails)
    raise _Invalid(msg)


def _parse(raw: bytes) -> tuple[bytes, bytes, dict[str, Any]]:
    if b"\x00" in raw:
        msg = "binary data (a NUL byte): this is not a JSON-lines audit log"
        raise _Invalid(msg)
    sealed = unseal(raw)
    try:
        record = orjson.loads(sealed[0] + b"}" if sealed else raw)
    except orjson.JSONDecodeError:
        msg = "not JSON" if sealed is None else "not JSON (the body before the hash is broken)"
        raise _Invalid(msg) from None
    if not isinstance(record, dict):
        msg = f"a JSON {type(record).__name__}, not a record object"
        raise _Invalid(msg)
    if sealed is None:
        msg = 'no hash: every record must end with its "h" field'
        raise _Invalid(msg)
    return sealed[0], sealed[1], record


def audit_file(path: Path, *, key: bytes | None = None) -> tuple[list[RunReport], Problem | None]:
    """Verify every run in one log file; return the reports and a file-level problem, if any.

    A file-level problem (empty, unreadable, not a log at all) means no run was found.
    """
    audit = _FileAudit(str(path), key)
    number = 0
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n") and audit.replay is not None:
                    _truncated(audit.reports, audit.replay, audit.name, number)
                    break
                audit.line(number, raw)
                if audit.problem is not None:
                    return audit.reports, audit.problem
    except OSError as exc:
        return audit.reports, Problem(audit.name, number, f"cannot read: {exc.strerror or exc}")
    return audit.finish()


class _FileAudit:
    """The runs of one file, replayed line by line."""

    def __init__(self, name: str, key: bytes | None) -> None:
        self.name, self.key = name, key
        self.reports: list[RunReport] = []
        self.replay: _RunReplay | None = None
        self.problem: Problem | None = None

    def line(self, number: int, raw: bytes) -> None:
        replay = self.replay
        try:
            body, digest, record = _parse(raw)
            if record.get(Field.EVENT) == RecordKind.RUN_START:
                replay = self.replay = _start_run(
                    self.reports, replay, self.name, number, record, self.key
                )
            elif replay is None:
                msg = "the log does not start with a run_start record"
                raise _Invalid(msg)  # noqa: TRY301 (one handler names the line for every check)
            if replay.report.problem is None:
                replay.feed(body, digest, record)
        except _Invalid as exc:
            reason = str(exc)
            if replay is not None and reason.startswith("not JSON") and not replay.finished:
                reason = (
                    f"{reason}: a record cut off by a killed run, or damage; the "
                    f"{replay.report.records} records before it verify"
                )
            problem = Problem(self.name, number, reason)
            if replay is None:
                self.problem = problem
            elif replay.report.problem is None:
                replay.report.problem = problem

    def finish(self) -> tuple[list[RunReport], Problem | None]:
        if self.replay is not None:
            self.replay.close()
        if not self.reports:
            return self.reports, Problem(self.name, 0, "empty file: no run in it")
        for report in self.reports:
            if report.status is RunStatus.TRUNCATED and report.problem is None:
                line = report.first_line + report.records
                report.problem = Problem(
                    self.name,
                    line,
                    f"truncated at line {line}: no run_end record (a killed run?); the "
                    f"{report.records} records before it verify",
                )
        return self.reports, None


def _start_run(  # noqa: PLR0913, PLR0917 (a private step of _FileAudit.line)
    reports: list[RunReport],
    replay: _RunReplay | None,
    name: str,
    number: int,
    record: dict[str, Any],
    key: bytes | None,
) -> _RunReplay:
    if replay is not None:
        replay.close()
    run_id = record.get(Field.RUN)
    report = RunReport(name, number, run_id=run_id if isinstance(run_id, str) else "")
    report.header = {k: v for k, v in record.items() if k not in {Field.HASH, Field.RUN, Field.SEQ}}
    reports.append(report)
    reason = _header_problem(record, key)
    if reason is not None:
        report.problem = Problem(name, number, reason)
    return _RunReplay(report, key)


def _header_problem(record: dict[str, Any], key: bytes | None) -> str | None:
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema version {record.get('schema')!r}; this audit reads {SCHEMA_VERSION}"
    if record.get("table") != table_digest():
        return (
            f"written by a machine whose table digest is {record.get('table')!r}; this "
            f"fsm_learner's table is {table_digest()!r}, so its transitions cannot be replayed"
        )
    keyed = record.get("keyed")
    if keyed is True and key is None:
        return "this run's chain is keyed: give the key (FSM_LEARNER_AUDIT_KEY or --key-env VAR)"
    if keyed is not True and key is not None:
        # a keyed log rewritten as unkeyed would otherwise verify: with a key, demand one
        return "a key was given but this run's chain is not keyed (rewritten without the key?)"
    return None


def _truncated(reports: list[RunReport], replay: _RunReplay | None, name: str, number: int) -> None:
    if replay is None:
        reports.append(
            RunReport(name, number, problem=Problem(name, number, f"truncated at line {number}")),
        )
        return
    replay.close()
    if replay.report.problem is None:
        replay.report.problem = Problem(
            name,
            number,
            f"truncated at line {number} (a killed run?); the {replay.report.records} records "
            "before it verify",
        )


def log_files(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """Expand files and directories into the log files to audit; also return usage errors."""
    files: list[Path] = []
    errors: list[str] = []
    for path in paths:
        try:
            found, error = _expand(path)
        except OSError as exc:
            found, error = [], f"{str(path)[:80]}: {exc.strerror or exc}"
        files.extend(found)
        if error:
            errors.append(error)
    return files, errors


def _expand(path: Path) -> tuple[list[Path], str | None]:
    if path.is_dir():
        found = sorted(path.rglob("*.jsonl"))
        return found, None if found else f"{path}: a directory with no *.jsonl audit log in it"
    if path.is_file():
        return [path], None
    if path.exists():
        return [], f"{path}: not a regular file (a log is a file or a directory of them)"
    return [], f"{path}: no such file or directory"
