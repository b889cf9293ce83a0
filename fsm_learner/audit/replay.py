"""Replaying audit logs: verify each run against the transition table, and summarise it.

``FileAudit`` streams a log line by line and yields one ``RunReport`` per run as soon as
the run is done; memory stays bounded whatever the file holds: a line is read at most
``MAX_LINE_BYTES`` at a time (a longer one is malformed, skipped without being held),
and only the run being replayed is kept. ``audit_file`` collects the reports of one file.

A run verifies when every record parses and fits the schema, sequence numbers have no
gap, the hash chain is intact, every transition is one the machine declares (checked
against the routes read off the ``transitions`` machine built from
``TRANSITION_TABLE``), the footer is present and agrees with what was replayed, and its
header binds to what came before it in its file (the ``prev`` field: the hash of the
last sealed line before the header, "" at the start of a file), so a run removed,
reordered or inserted before another is caught. ``RunSet`` checks the runs taken
together: no run twice, each expected chain head found exactly once. The first problem
stops the verification of that run and is reported with its file, line and reason; the
summary still describes the verified prefix.

A log is hostile input: every reason is one printable line, received values are
described briefly (``fsm_learner._display.shown``), and what a report keeps of the
header and the failure can always be written as JSON.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import Counter
from functools import cache
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import orjson

from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.files import (
    NotRegularError,
    Overlong,
    Unreadable,
    log_files,
    open_log,
    read_lines,
)
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
from fsm_learner.machine import State, Trigger, table_digest, table_routes

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

__all__ = [
    "MAX_DEPTH",
    "FileAudit",
    "Problem",
    "RunReport",
    "RunSet",
    "SlowTransition",
    "audit_file",
    "log_files",  # lives in fsm_learner.audit.files; re-exported where it always was
]

SLOWEST_KEPT: Final = 5
MAX_DEPTH: Final = 32
"""How deep a header or failure value may nest; a deeper one is kept as a short note."""
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
_RUN_START: Final = RecordKind.RUN_START.value
_EV: Final = Field.EVENT.value
_NOT_HEADER: Final = frozenset({Field.HASH.value, Field.RUN.value, Field.SEQ.value})


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
    """Why a run (or a file, or the runs taken together) does not verify."""

    path: str
    """The file, as printable text; "" for a problem of the runs taken together."""
    line: int
    reason: str

    def __str__(self) -> str:
        """Render as ``file:line: reason`` (the reason alone when no file is concerned)."""
        return f"{self.path}:{self.line}: {self.reason}" if self.path else self.reason


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
    edges: Counter[tuple[str, str, str]] = attrs.Factory(Counter)
    """Per (trigger, source, dest): how many times the run took that transition."""
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


def _typed(value: object) -> str:
    """Describe a received value with its JSON-ish type: ``str '4'``, or ``missing``."""
    return "missing" if value is None else f"{type(value).__name__} {shown(value)}"


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
            msg = f"record after the run_end of run {shown(report.run_id)}"
            raise _Invalid(msg)
        if run != report.run_id:
            msg = f"record of run {shown(run)} inside run {shown(report.run_id)}"
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
            type(source) is not str
            or source not in _STATES
            or type(dest) is not str
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
        report.edges[event, source, allowed] += 1
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
        if type(status) is not str or status not in _STATUSES:
            msg = f"run_end status {shown(status)}, expected one of {sorted(_STATUSES)}"
            raise _Invalid(msg)
        records = record.get("records")
        if type(records) is not int or records != self.seq - 1:
            msg = f"run_end says {shown(records)} records, replayed {self.seq - 1}"
            raise _Invalid(msg)
        replayed = {t: [report.counts[t, True], report.counts[t, False]] for t, _ in report.counts}
        counts = record.get("counts")
        if not _counts_agree(counts, replayed):
            msg = f"run_end counts {shown(counts)} differ from the replayed {replayed}"
            raise _Invalid(msg)
        if self.state != State.IDLE:
            msg = f"run_end while the replayed machine is in {self.state!r}, not idle"
            raise _Invalid(msg)
        report.status = RunStatus(status)
        failure = record.get("failure")
        report.failure = _bounded(failure) if isinstance(failure, dict) else None
        self.finished = True

    def close(self) -> None:
        self.report.slowest = [s for _, _, s in sorted(self.slow, reverse=True)]


def _counts_agree(given: object, replayed: dict[str, list[int]]) -> bool:
    """Compare the footer's counts with the replay's, as JSON: 5.0 or true cannot stand for 5."""
    if type(given) is not dict or given.keys() != replayed.keys():
        return False
    return all(
        type(value) is list
        and len(value) == 2  # [training, validation]
        and type(value[0]) is int
        and type(value[1]) is int
        and value == replayed[name]
        for name, value in given.items()
    )


def _deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` lists or dicts deep (no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    """Return ``value`` with each field nested deeper than MAX_DEPTH replaced by a note."""
    return {
        name: (
            f"<a {type(item).__name__} nested more than {MAX_DEPTH} levels deep, left out>"
            if isinstance(item, list | dict) and _deeper_than(item, MAX_DEPTH)
            else item
        )
        for name, item in value.items()
    }


def _common(record: dict[str, Any]) -> tuple[str, int, int, str]:
    run, seq, t_ns, event = record.get("run"), record.get("seq"), record.get("t"), record.get("ev")
    if type(run) is not str or type(seq) is not int or type(t_ns) is not int:
        _bad_common(record)
    if type(event) is not str or event not in _EVENTS:
        msg = (
            f"unknown event {shown(event)}: neither a trigger of the table nor one of "
            f"{sorted(_KINDS)}"
        )
        raise _Invalid(msg)
    return run, seq, t_ns, event


def _bad_common(record: dict[str, Any]) -> NoReturn:
    for name, kind in (("run", str), ("seq", int), ("t", int)):
        value = record.get(name)
        if type(value) is not kind:
            msg = f"field {name!r} must be {kind.__name__}, got {_typed(value)}"
            raise _Invalid(msg)
    msg = "malformed record"  # pragma: no cover (one of the checks above fails)
    raise _Invalid(msg)


def _bad_transition_fields(record: dict[str, Any]) -> NoReturn:
    for name in ("src", "dst"):
        value = record.get(name)
        if type(value) is not str or value not in _STATES:
            states = ", ".join(sorted(_STATES))
            msg = f"field {name!r} is {shown(value)}, not a state of the table ({states})"
            raise _Invalid(msg)
    if type(record.get("tr")) is not bool:
        msg = f"field 'tr' must be true or false, got {shown(record.get('tr'))}"
        raise _Invalid(msg)
    for name in ("ep", "it", "rk"):
        value = record.get(name)
        if type(value) is not int:
            msg = f"field {name!r} must be int, got {shown(value)}"
            raise _Invalid(msg)
    msg = "malformed transition record"  # pragma: no cover (one of the checks above fails)
    raise _Invalid(msg)


def _parse(raw: bytes, sealed: tuple[bytes, bytes] | None) -> tuple[bytes, bytes, dict[str, Any]]:
    if b"\x00" in raw:
        msg = "binary data (a NUL byte): this is not a JSON-lines audit log"
        raise _Invalid(msg)
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


class FileAudit:
    """One log file, audited as a stream: iterate to get each run's report when it is done.

    After the iteration, ``problem`` is the file-level problem, if any: the file cannot
    be read, is no regular file, is empty, or does not start with a run. ``name`` is the
    file's name as printable text, as reports and problems show it.
    """

    def __init__(self, path: Path, *, key: bytes | None = None) -> None:
        """Audit ``path``, checking keyed chains with ``key``."""
        self.path, self.key = path, key
        self.name = file_name(path)
        self.problem: Problem | None = None

    def __iter__(self) -> Iterator[RunReport]:
        """Replay the file, yielding each run's report as soon as the run is done."""
        try:
            fh = open_log(self.path)
        except OSError as exc:
            self.problem = Problem(self.name, 0, f"cannot read: {exc.strerror or exc}")
            return
        except NotRegularError as exc:
            self.problem = Problem(self.name, 0, str(exc))
            return
        state = _FileState(self.name, self.key)
        with fh:
            for number, item in enumerate(read_lines(fh), start=1):
                done = state.line(number, item)
                if done is not None:
                    yield done
                if state.stopped:
                    break
        yield from state.finish()
        self.problem = state.problem


class _FileState:
    """The runs of one file, replayed line by line."""

    def __init__(self, name: str, key: bytes | None) -> None:
        self.name, self.key = name, key
        self.replay: _RunReplay | None = None
        self.problem: Problem | None = None
        self.stopped = False
        self.runs = 0
        self.last_seal = b""
        """The digest of the last line that carries a seal: what the next header binds to."""

    def line(self, number: int, item: bytes | Overlong | Unreadable) -> RunReport | None:
        """Take one line; return the report of the run it ended (a new run began), if any."""
        if not isinstance(item, bytes):
            self._not_a_line(number, item)
            return None
        if item[-1:] != b"\n" and self.replay is not None:
            self._truncated(number)
            self.stopped = True
            return None
        sealed = unseal(item)
        done = None
        try:
            body, digest, record = _parse(item, sealed)
            if record.get(_EV) == _RUN_START:
                done = self._start_run(number, record)
            replay = self.replay
            if replay is None:
                msg = "the log does not start with a run_start record"
                raise _Invalid(msg)  # noqa: TRY301 (one handler names the line for every check)
            if replay.report.problem is None:
                replay.feed(body, digest, record)
        except _Invalid as exc:
            self._flag(number, str(exc))
        if sealed is not None:
            self.last_seal = sealed[1]
        return done

    def _not_a_line(self, number: int, item: Overlong | Unreadable) -> None:
        if isinstance(item, Unreadable):
            self._flag(number, item.reason)
            self.stopped = True
            return
        self._flag(
            number,
            f"a line of {item.size:,} bytes, longer than a record may be "
            f"({MAX_LINE_BYTES:,} bytes): not a record",
        )
        sealed = unseal(item.tail)  # the writer binds the next run to it as to any line
        if sealed is not None:
            self.last_seal = sealed[1]

    def _flag(self, number: int, reason: str) -> None:
        """Give the open run its first problem; before any run, the file's (and stop)."""
        replay = self.replay
        if replay is None:
            self.problem = Problem(self.name, number, reason)
            self.stopped = True
            return
        if reason.startswith("not JSON") and not replay.finished:
            reason = (
                f"{reason}: a record cut off by a killed run, or damage; the "
                f"{replay.report.records} records before it verify"
            )
        if replay.report.problem is None:
            replay.report.problem = Problem(self.name, number, reason)

    def _start_run(self, number: int, record: dict[str, Any]) -> RunReport | None:
        done = self._close() if self.replay is not None else None
        run_id = record.get(Field.RUN)
        report = RunReport(self.name, number, run_id=run_id if isinstance(run_id, str) else "")
        report.header = _bounded({k: v for k, v in record.items() if k not in _NOT_HEADER})
        reason = _header_problem(record, self.key) or _binding_problem(record, self.last_seal)
        if reason is not None:
            report.problem = Problem(self.name, number, reason)
        self.replay = _RunReplay(report, self.key)
        self.runs += 1
        return done

    def _close(self) -> RunReport:
        replay = self.replay
        if replay is None:  # pragma: no cover (called with a run open)
            msg = "no run to close"
            raise RuntimeError(msg)
        self.replay = None
        replay.close()
        report = replay.report
        if report.status is RunStatus.TRUNCATED and report.problem is None:
            line = report.first_line + report.records
            report.problem = Problem(
                self.name,
                line,
                f"truncated at line {line}: no run_end record (a killed run?); the "
                f"{report.records} records before it verify",
            )
        return report

    def _truncated(self, number: int) -> None:
        replay = self.replay
        if replay is not None and replay.report.problem is None:
            replay.report.problem = Problem(
                self.name,
                number,
                f"truncated at line {number} (a killed run?); the {replay.report.records} "
                "records before it verify",
            )

    def finish(self) -> Iterator[RunReport]:
        """Yield the last run's report; with no run at all, say so as the file's problem."""
        if self.replay is not None:
            yield self._close()
        elif not self.runs and self.problem is None:
            self.problem = Problem(self.name, 0, "empty file: no run in it")


def _header_problem(record: dict[str, Any], key: bytes | None) -> str | None:
    if record.get("schema") != SCHEMA_VERSION:
        return f"schema version {shown(record.get('schema'))}; this audit reads {SCHEMA_VERSION}"
    if record.get("table") != table_digest():
        return (
            f"written by a machine whose table digest is {shown(record.get('table'))}; this "
            f"fsm_learner's table is {table_digest()!r}, so its transitions cannot be replayed"
        )
    keyed = record.get("keyed")
    if keyed is True and key is None:
        return "this run's chain is keyed: give the key (FSM_LEARNER_AUDIT_KEY or --key-env VAR)"
    if keyed is not True and key is not None:
        # a keyed log rewritten as unkeyed would otherwise verify: with a key, demand one
        return "a key was given but this run's chain is not keyed (rewritten without the key?)"
    return None


_REMOVED: Final = "a run was removed, reordered or inserted before this one"


def _binding_problem(record: dict[str, Any], last_seal: bytes) -> str | None:
    """Check the header's ``prev`` against the last sealed line before it in its file."""
    bound, before = record.get(PREV_FIELD), last_seal.hex()
    if type(bound) is not str:
        return (
            f"header field {PREV_FIELD!r} must be a string (the hash of the line before the "
            f"run, '' at the start of a file), got {_typed(bound)}: written by an older "
            "fsm_learner, or edited"
        )
    if bound == before:
        return None
    if not before:
        return (
            f"header binds to the previous line hash {shown(bound)}, but no line before it "
            f"carries a hash: {_REMOVED}"
        )
    if not bound:
        return (
            "header binds to no previous line (the start of a file), but the line before it "
            f"has {before}: {_REMOVED}"
        )
    return (
        f"header binds to the previous line hash {shown(bound)}, but the line before it has "
        f"{before}: {_REMOVED}"
    )


def audit_file(path: Path, *, key: bytes | None = None) -> tuple[list[RunReport], Problem | None]:
    """Verify every run in one log file; return the reports and a file-level problem, if any.

    A file-level problem (empty, unreadable, not a log at all) means no run was found,
    unless the file could not be read to its end. ``FileAudit`` streams the same reports.
    """
    audit = FileAudit(path, key=key)
    reports = list(audit)
    return reports, audit.problem


# -- the runs taken together ------------------------------------------------------------------


_LISTED_HEADS: Final = 3


class RunSet:
    """The audited runs taken together: no run twice, each expected chain head exactly once.

    A run is keyed by its run id and its header's ``rank`` (the ranks of a distributed
    run share its id, one file each). Each key is kept as a salted 64-bit digest, so
    memory grows by a few dozen bytes per run, whatever its id holds.
    """

    def __init__(self, expected_heads: Iterable[str] = ()) -> None:
        """Expect each of ``expected_heads`` (hex, any case) to end exactly one run."""
        self.found: dict[str, int] = {h.lower(): 0 for h in expected_heads}
        self._seen: set[int] = set()
        self._salt = os.urandom(16)
        heads = [printable(h[:40]) for h in self.found]
        self._expected_text = (
            ", ".join(sorted(heads))
            if len(heads) <= _LISTED_HEADS
            else f"one of the {len(heads)} expected heads"
        )

    def add(self, report: RunReport) -> None:
        """Check one run against the runs added before; give it a problem if it has none."""
        reason = self._head_problem(report)
        line = report.first_line + max(report.records - 1, 0)
        if reason is None:
            reason, line = self._repeat_problem(report), report.first_line
        if reason is not None and report.problem is None:
            report.problem = Problem(report.path, line, reason)

    def missing(self) -> list[Problem]:
        """Each expected head that ended no run, as a problem of the runs taken together."""
        return [
            Problem(
                "",
                0,
                f"expected head {printable(head[:40])} is not the head of any run (a run removed?)",
            )
            for head, times in self.found.items()
            if not times
        ]

    def _head_problem(self, report: RunReport) -> str | None:
        if not self.found or not report.head:
            return None
        times = self.found.get(report.head)
        if times is None:
            if report.problem is not None:
                return None
            return f"chain head {report.head} is not the expected {self._expected_text}"
        self.found[report.head] = times + 1
        if times:
            return (
                f"chain head {report.head} already ended another run: a run duplicated, or "
                "a file audited twice"
            )
        return None

    def _repeat_problem(self, report: RunReport) -> str | None:
        if not report.run_id:
            return None  # a header without a run id: already a problem of its own
        rank = report.header.get("rank")
        rank = rank if type(rank) is int else None
        key = f"{rank}\x00{report.run_id}".encode()
        digest = hashlib.blake2b(key, digest_size=8, key=self._salt).digest()
        seen = int.from_bytes(digest, "little")
        if seen not in self._seen:
            self._seen.add(seen)
            return None
        return (
            f"run {shown(report.run_id)} (rank {'?' if rank is None else rank}) appears a "
            "second time among the audited runs: a run duplicated, or a file audited twice"
        )
