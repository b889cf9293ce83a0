"""Distributed runs: the logs of a fit's ranks, checked together.

A fit across N ranks (torch.distributed) is one run: every rank writes its own log
(``<run>.rank<r>.jsonl``), all with rank 0's run id, each header naming its ``rank`` and
``world_size`` (N >= 2; absent: 1, a fit on one process). Ranks take cancels together:
each rank's log has an ``agreed`` note right before the transition the ranks agreed on
(``cancel``, the lowest proposing ``rank``, where this rank agreed: ``at``; a failure's
``error``). ``DistributedRuns`` takes every audited run's report (``add``), keeps the
ranks of distributed runs, and ``check`` groups them by run id and checks each run:

- every rank 0..N-1 present exactly once, each header saying the same world size, table
  and epochs;
- lockstep: the ranks' *unit* transitions (all but the per-batch ``predict``,
  ``compute_loss``, ``backward`` and ``step``), as (trigger, epoch, batch, pass), are the
  same sequence on every rank; so are their ``agreed`` notes, as (cancel, rank);
- a failed run (a rank's footer says failed, or a rank has no footer) ends in ``fail`` on
  every rank, or the rank was killed. The ranks fail at their next agreement point, not
  at once: the trailing ``begin_*`` transitions and the final ``fail`` are left out of the
  comparison; a killed rank's log ends where its last verified seal does, so its sequences
  need only be a prefix of the others'.

The first divergence is named: its index, and what each rank took there ("nothing
more" for a rank whose sequence ended). Ranks are compared only when each verifies on
its own (or was only killed): a log that does not verify is its own problem.

Memory: one small entry per rank of a distributed run; the sequences are never held,
the ranks' logs are read again side by side (one open file per rank present, their
verified lines of that run only, the per-batch transitions skipped unparsed).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import attrs
import orjson

from fsm_learner._compat import StrEnum
from fsm_learner._display import file_name, shown
from fsm_learner.audit.codec import (
    SEAL_START,
    FailureField,
    Field,
    Note,
    RecordError,
    RecordKind,
    RunStatus,
    Transition,
    decode,
)
from fsm_learner.audit.files import NotRegularError, Overlong, Unreadable, open_log, read_chunks
from fsm_learner.audit.lineage import was_killed
from fsm_learner.audit.replay import Problem
from fsm_learner.machine import Trigger

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Mapping, Sequence
    from collections.abc import Set as AbstractSet
    from pathlib import Path

    from fsm_learner.audit.replay import RunReport

__all__ = [
    "AGREED",
    "MAX_ERROR_CHARS",
    "UNIT_TRIGGERS",
    "Agreed",
    "AgreedAt",
    "AgreedField",
    "Cancel",
    "DistributedReport",
    "DistributedRuns",
    "Divergence",
    "RankLog",
    "Step",
    "check_ranks",
    "world_size_of",
]

AGREED: Final = "agreed"
"""The note every rank writes right before a transition the ranks agreed on."""
MAX_ERROR_CHARS: Final = 2000
"""The longest ``error`` an ``agreed`` note of a failure holds."""


class Cancel(StrEnum):
    """What the ranks agreed to do (an ``agreed`` note's ``cancel``)."""

    BATCH = "batch"
    EPOCH = "epoch"
    FIT = "fit"
    FAIL = "fail"


class AgreedAt(StrEnum):
    """Where a rank agreed (an ``agreed`` note's ``at``)."""

    BEGIN_FIT = "begin_fit"
    BEGIN_EPOCH = "begin_epoch"
    BACKWARD = "backward"
    END_BATCH = "end_batch"
    END_EPOCH = "end_epoch"
    END_FIT = "end_fit"
    COLLECTIVE = "collective"
    CANCEL = "cancel"
    """Where a cancel raised outside a hook (in a batch's work) was raised."""
    FAILURE = "failure"
    """Where the rank failed (the failing rank's own note)."""


class AgreedField(StrEnum):
    """The fields of an ``agreed`` note."""

    CANCEL = "cancel"
    RANK = "rank"
    AT = "at"
    ERROR = "error"


_PER_BATCH: Final = (Trigger.PREDICT, Trigger.COMPUTE_LOSS, Trigger.BACKWARD, Trigger.STEP)
UNIT_TRIGGERS: Final = frozenset(t.value for t in Trigger if t not in _PER_BATCH)
"""The transitions the ranks' sequences are compared on: all but a batch's inner steps."""
_BEGINS: Final = frozenset(
    t.value for t in (Trigger.BEGIN_FIT, Trigger.BEGIN_EPOCH, Trigger.BEGIN_BATCH)
)
_FAIL: Final = Trigger.FAIL.value
_SKIPPED: Final = (
    SEAL_START,
    *(b'{"%s":"%s",' % (Field.EVENT.value.encode(), t.value.encode()) for t in _PER_BATCH),
)
"""How the lines a comparison never needs begin, as the writer writes them: not parsed."""
_AGREED_LISTED: Final = 10
"""How many agreed cancels a report lists (it counts them all)."""
_ID_SHOWN: Final = 40


def _pass_word(training: bool) -> str:
    return "train" if training else "valid"


def _run(run_id: str) -> str:
    return f"distributed run {shown(run_id, _ID_SHOWN)}"


# -- what a report holds ----------------------------------------------------------------------


@attrs.frozen
class Step:
    """A unit transition a rank took: trigger, epoch, batch index, pass; and its line."""

    trigger: str
    epoch: int
    iter: int
    training: bool
    line: int = attrs.field(eq=False, default=0)

    @classmethod
    def of(cls, record: Transition, line: int) -> Step:
        """Return the step a transition record takes."""
        return cls(record.trigger, record.epoch, record.iter, record.training, line)

    def __str__(self) -> str:
        """Say ``end_batch (epoch 0, batch 3, train)``."""
        return (
            f"{self.trigger} (epoch {self.epoch}, batch {self.iter}, {_pass_word(self.training)})"
        )

    def to_json(self) -> dict[str, Any]:
        """As data: trigger, epoch, batch index, pass ("train" or "valid"), line."""
        return {
            "trigger": self.trigger,
            "epoch": self.epoch,
            "iter": self.iter,
            "pass": _pass_word(self.training),
            "line": self.line,
        }


@attrs.frozen
class Agreed:
    """An ``agreed`` note of one rank, and the transition that followed it in its log."""

    cancel: str
    """As written: a ``Cancel`` value, or a description of whatever else the note holds."""
    rank: int | None
    """The lowest rank that proposed it (None: the note holds no rank)."""
    at: str
    error: str | None
    taken: Step | None
    """The unit transition right after the note (None: the log ends first)."""
    line: int = 0

    @property
    def key(self) -> tuple[str, int | None]:
        """What the ranks must agree on: (cancel, rank)."""
        return self.cancel, self.rank

    def __str__(self) -> str:
        """Say ``batch cancel proposed by rank 1`` (``fail of rank 1``)."""
        who = "?" if self.rank is None else str(self.rank)
        if self.cancel == Cancel.FAIL:
            return f"fail of rank {who}"
        return f"{self.cancel} cancel proposed by rank {who}"


@attrs.frozen
class AgreedCancel:
    """A cancel the ranks agreed on: each rank's note of it (None: that rank has none)."""

    notes: tuple[tuple[int, Agreed | None], ...]

    @property
    def first(self) -> Agreed:
        """The note of the lowest rank that has one."""
        return next(note for _, note in self.notes if note is not None)

    def to_json(self) -> dict[str, Any]:
        """As data: cancel, rank, error, the transition taken, and each rank's ``at``."""
        first = self.first
        return {
            "cancel": first.cancel,
            "rank": first.rank,
            "error": first.error,
            "taken": None if first.taken is None else first.taken.to_json(),
            "at": {str(rank): None if note is None else note.at for rank, note in self.notes},
        }


Taken = tuple[tuple[int, Step | Agreed | None], ...]
"""What each rank took at a place: (rank, its step or note; None for nothing more)."""


@attrs.frozen
class Divergence:
    """Where the ranks' sequences first differ: which sequence, its index, what each took."""

    sequence: str
    """``transitions`` (the unit transitions) or ``agreed`` (the agreed notes)."""
    index: int
    """From 0."""
    taken: Taken

    def __str__(self) -> str:
        """Say ``unit transition 12 (index 11): rank 0: ...; rank 1: nothing more``."""
        what = "unit transition" if self.sequence == "transitions" else "agreed note"
        ranks = "; ".join(f"rank {rank}: {_took(item)}" for rank, item in self.taken)
        return f"{what} {self.index + 1} (index {self.index}): {ranks}"

    def to_json(self) -> dict[str, Any]:
        """As data: the sequence, the index, and per rank what it took (null: nothing more)."""
        return {
            "sequence": self.sequence,
            "index": self.index,
            "ranks": [{"rank": rank, "took": _took_json(item)} for rank, item in self.taken],
        }


def _took(item: Step | Agreed | None) -> str:
    return "nothing more" if item is None else f"{item} at line {item.line}"


def _took_json(item: Step | Agreed | None) -> dict[str, Any] | None:
    if item is None:
        return None
    if isinstance(item, Step):
        return item.to_json()
    return {"cancel": item.cancel, "rank": item.rank, "at": item.at, "line": item.line}


@attrs.frozen
class RankLog:
    """One rank's log of a distributed run: where it is and how the audit found it."""

    rank: int | None
    """The header's rank (None: not an int)."""
    path: str
    first_line: int
    status: RunStatus
    verified: bool
    killed: bool
    """No footer, every sealed block verifying: the rank died (or its log was cut)."""
    failure: str | None = None
    """The type of the exception a failed rank failed with (its footer's)."""
    message: str | None = None
    """Its message (the footer's, at most 500 characters)."""

    def to_json(self) -> dict[str, Any]:
        """As data."""
        return {
            "rank": self.rank,
            "path": self.path,
            "first_line": self.first_line,
            "status": self.status.value,
            "verified": self.verified,
            "killed": self.killed,
            "failure": self.failure,
        }


@attrs.define
class DistributedReport:
    """What the audit found in one distributed run: its ranks, lockstep, agreed cancels."""

    run_id: str
    world_size: int
    ranks: list[RankLog] = attrs.Factory(list)
    """Rank by rank, as found (a rank twice is there twice)."""
    missing: list[int] = attrs.Factory(list)
    failed: bool = False
    """A rank failed, or has no footer: the trailing begin_* and fail are not compared."""
    lockstep: bool | None = None
    """None: not compared (``unchecked`` says why)."""
    unchecked: str = ""
    transitions: int = 0
    """Unit transitions compared (the longest rank's, when the ranks are lockstep)."""
    shorter: dict[int, int] = attrs.Factory(dict)
    """Killed ranks whose unit transitions end early: how many each logged."""
    divergence: Divergence | None = None
    caught: str = ""
    """A divergence the ranks caught themselves (a DivergenceError), before their logs parted."""
    agreed: list[AgreedCancel] = attrs.Factory(list)
    """The first agreed cancels (at most ``_AGREED_LISTED``)."""
    agreed_count: int = 0
    problems: list[Problem] = attrs.Factory(list)
    """What is wrong besides a divergence."""

    @property
    def verified(self) -> bool:
        """True when every rank is there, agrees, verifies and the ranks are lockstep."""
        return not self.problems and self.divergence is None and not self.caught

    def all_problems(self) -> list[Problem]:
        """Every problem: those of the ranks, then the first divergence."""
        if self.caught:
            reason = f"the ranks are not in lockstep: they found so themselves: {self.caught}"
            return [*self.problems, _problem(self.run_id, reason)]
        if self.divergence is None:
            return list(self.problems)
        reason = f"the ranks are not in lockstep: first divergence at {self.divergence}"
        return [*self.problems, _problem(self.run_id, reason)]

    @property
    def status(self) -> RunStatus:
        """Say how the run ended: failed, truncated (a rank died), or as its lowest rank says."""
        statuses = [log.status for log in self.ranks]
        if RunStatus.FAILED in statuses:
            return RunStatus.FAILED
        if self.failed or not statuses:
            return RunStatus.TRUNCATED
        return statuses[0]

    def to_json(self) -> dict[str, Any]:
        """Everything the summary shows, as JSON-able data."""
        return {
            "run_id": self.run_id,
            "world_size": self.world_size,
            "status": self.status.value,
            "ranks": [rank.to_json() for rank in self.ranks],
            "missing_ranks": self.missing,
            "lockstep": self.lockstep,
            "unchecked": self.unchecked or None,
            "unit_transitions": self.transitions,
            "shorter": {str(rank): count for rank, count in self.shorter.items()},
            "first_divergence": None if self.divergence is None else self.divergence.to_json(),
            "caught": self.caught or None,
            "agreed": [cancel.to_json() for cancel in self.agreed],
            "agreed_count": self.agreed_count,
            "problems": [str(problem) for problem in self.all_problems()],
            "verified": self.verified,
        }


# -- what the first reading keeps ---------------------------------------------------------------


@attrs.frozen
class _Entry:
    """A rank's run as the audit yielded it, and where to read it again."""

    run_id: str
    path: Path
    log: RankLog
    said: dict[str, object]
    """What its header says that every rank's must say alike: world size, table, epochs."""
    limit: int
    """Its last verified line: the seals up to there verify, and the records they seal."""
    fails: bool
    """It does not verify, and not only because it was killed: its records are not compared."""


_ALIKE: Final = (Field.WORLD_SIZE, Field.TABLE, Field.N_EPOCHS)
"""The header fields every rank's header must say alike."""


def _valid_world_size(value: object) -> bool:
    return type(value) is int and value >= 2


def world_size_of(header: Mapping[str, Any]) -> int:
    """Return the world size a header says (1 when it has none, or an invalid one)."""
    value = header.get(Field.WORLD_SIZE.value)
    return value if type(value) is int and _valid_world_size(value) else 1


def _verified_to(report: RunReport) -> int:
    limit, problem = report.head_line, report.problem
    if problem is not None and problem.line < limit:
        return problem.line - 1
    return limit


def _entry(report: RunReport, path: Path) -> _Entry:
    header = report.header
    rank = header.get(Field.RANK.value)
    killed = was_killed(report)
    failure = (report.failure or {}).get(FailureField.TYPE.value)
    message = (report.failure or {}).get(FailureField.MESSAGE.value)
    log = RankLog(
        rank if type(rank) is int else None,
        report.path,
        report.first_line,
        report.status,
        report.verified,
        killed,
        None if failure is None else failure if isinstance(failure, str) else shown(failure),
        None
        if message is None
        else shown(message, 500)
        if not isinstance(message, str)
        else message[:500],
    )
    return _Entry(
        report.run_id,
        path,
        log,
        {field.value: header.get(field.value) for field in _ALIKE},
        _verified_to(report),
        not report.verified and not killed,
    )


class DistributedRuns:
    """The ranks of the distributed runs among the audited runs, grouped by run id.

    ``add`` every run's report as the replay yields it (with its file), then ``check``
    once: one ``DistributedReport`` per distributed run, in the order their run ids
    were first met. A run is distributed when its header has a ``world_size``.
    """

    def __init__(self) -> None:
        """Start with no run."""
        self._runs: dict[str, list[_Entry]] = {}

    def add(self, report: RunReport, path: Path) -> None:
        """Keep the run when it is a rank of a distributed run."""
        if Field.WORLD_SIZE.value in report.header and report.run_id:
            self._runs.setdefault(report.run_id, []).append(_entry(report, path))

    def __bool__(self) -> bool:
        """Whether a distributed run was added."""
        return bool(self._runs)

    def check(self, files: Iterable[Path] = ()) -> list[DistributedReport]:
        """Check every distributed run; one report each.

        ``files`` are the files audited: a missing rank's log among them (named as the
        others', and holding no run of theirs) is named.
        """
        audited = frozenset(files)
        reports = []
        for run_id, entries in self._runs.items():
            report = _check(run_id, entries, audited)
            _hint_mixed(report, self._runs)
            reports.append(report)
        return reports


def check_ranks(reports: Iterable[tuple[RunReport, Path]]) -> DistributedReport:
    """Check the ranks of one distributed run: the reports of its logs, with their files.

    Raise ValueError when there is none, or when they are of several runs.
    """
    entries = [_entry(report, path) for report, path in reports]
    run_ids = sorted({entry.run_id for entry in entries})
    if len(run_ids) != 1:
        ids = ", ".join(shown(run_id, _ID_SHOWN) for run_id in run_ids[:3]) or "none"
        msg = f"check_ranks takes the ranks of one run, got runs: {ids}"
        raise ValueError(msg)
    return _check(run_ids[0], entries, frozenset())


# -- the checks --------------------------------------------------------------------------------


def _check(run_id: str, entries: list[_Entry], audited: AbstractSet[Path]) -> DistributedReport:
    entries = sorted(entries, key=lambda e: (e.log.rank is None, e.log.rank or 0))
    world = _world_size(entries)
    report = DistributedReport(run_id, world, [entry.log for entry in entries])
    _check_headers(report, entries)
    _check_ranks(report, entries)
    _check_missing(report, entries, audited)
    report.failed = any(e.log.status is RunStatus.FAILED or e.log.killed for e in entries)
    unverified = [entry for entry in entries if entry.fails]
    for entry in unverified:
        report.problems.append(
            _problem(run_id, f"rank {_rank(entry)}'s log ({entry.log.path}) does not verify")
        )
    if report.failed:
        _check_failed(report, entries)
    compared = _compared(entries)
    if unverified:
        report.unchecked = f"rank {_rank(unverified[0])}'s log does not verify"
    elif len(compared) < 2:
        report.unchecked = "fewer than two ranks' logs"
    else:
        _check_lockstep(report, compared)
    return report


def _problem(run_id: str, reason: str) -> Problem:
    return Problem("", 0, f"{_run(run_id)}: {reason}")


def _rank(entry: _Entry) -> str:
    return "?" if entry.log.rank is None else str(entry.log.rank)


def _world_size(entries: Sequence[_Entry]) -> int:
    """Return the world size of the lowest rank that says a valid one (1: none does)."""
    for entry in entries:
        value = entry.said[Field.WORLD_SIZE.value]
        if type(value) is int and _valid_world_size(value):
            return value
    return 1


def _check_headers(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """Every rank's header says the same world size, table and epochs; a valid world size."""
    for field in _ALIKE:
        values = [entry.said[field.value] for entry in entries]
        if any(value != values[0] for value in values):
            said = ", ".join(
                f"rank {_rank(entry)} {shown(value, 40)}"
                for entry, value in zip(entries, values, strict=True)
            )
            report.problems.append(
                _problem(report.run_id, f"the ranks' headers differ in {field.value!r}: {said}")
            )
    for entry in entries:
        value = entry.said[Field.WORLD_SIZE.value]
        if not _valid_world_size(value):
            report.problems.append(
                _problem(
                    report.run_id,
                    f"rank {_rank(entry)}'s header field 'world_size' must be an int >= 2, got "
                    f"{shown(value)}",
                )
            )


def _check_ranks(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """Every rank 0..world_size-1 present exactly once, and no other."""
    world = report.world_size
    seen: dict[int, list[_Entry]] = {}
    for entry in entries:
        rank = entry.log.rank
        if rank is None or not 0 <= rank < max(world, 1):
            report.problems.append(
                _problem(
                    report.run_id,
                    f"{entry.log.path}: rank {shown(rank)} is not a rank of a world of "
                    f"{world} (0-{world - 1})",
                )
            )
            continue
        seen.setdefault(rank, []).append(entry)
    for rank, found in sorted(seen.items()):
        if len(found) > 1:
            files = ", ".join(entry.log.path for entry in found)
            report.problems.append(
                _problem(report.run_id, f"rank {rank} appears {len(found)} times ({files})")
            )
    report.missing = [rank for rank in range(world) if rank not in seen]


def _check_missing(
    report: DistributedReport, entries: Sequence[_Entry], audited: AbstractSet[Path]
) -> None:
    """Name the missing ranks; a missing rank's log audited (named as the others') too."""
    stem = _rank_stem(entries[0])
    unseen = []
    for rank in report.missing:
        path = None if stem is None else entries[0].path.with_name(f"{stem}.rank{rank}.jsonl")
        if path is None or path not in audited:
            unseen.append(rank)
            continue
        report.problems.append(
            _problem(
                report.run_id,
                f"rank {rank} of {report.world_size} missing: its log {file_name(path)} holds "
                "no run of it (a rank killed before its first write?)",
            )
        )
    if unseen:
        ranks = f"rank {unseen[0]}" if len(unseen) == 1 else f"ranks {', '.join(map(str, unseen))}"
        report.problems.append(
            _problem(
                report.run_id,
                f"{ranks} of {report.world_size} missing: no log of theirs among the files audited",
            )
        )


def _rank_stem(entry: _Entry) -> str | None:
    """Return the stem of a rank's file named ``<stem>.rank<r>.jsonl``; None if not so named."""
    name, rank = entry.path.name, entry.log.rank
    suffix = f".rank{rank}.jsonl"
    if rank is None or not name.endswith(suffix):
        return None
    return name.removesuffix(suffix)


def _hint_mixed(report: DistributedReport, runs: Mapping[str, list[_Entry]]) -> None:
    """Say which other runs have the missing ranks: logs of two runs given as one."""
    if not report.missing:
        return
    others = sorted(
        {
            run_id
            for run_id, entries in runs.items()
            if run_id != report.run_id
            and any(entry.log.rank in report.missing for entry in entries)
        }
    )
    if others:
        names = ", ".join(shown(run_id, _ID_SHOWN) for run_id in others[:3])
        report.problems.append(
            _problem(
                report.run_id,
                f"the missing ranks' logs are of other runs ({names}): run ids mixed?",
            )
        )


def _check_failed(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """In a failed run, every rank ends in fail, or was killed."""
    for entry in entries:
        if entry.log.status is not RunStatus.FAILED and not entry.log.killed and not entry.fails:
            report.problems.append(
                _problem(
                    report.run_id,
                    f"rank {_rank(entry)} ended {entry.log.status.value}, but the run failed: "
                    "every rank of a failed run ends in fail (or was killed)",
                )
            )


def _compared(entries: Sequence[_Entry]) -> dict[int, _Entry]:
    """Return the ranks whose sequences are compared: each rank's first log, if it verifies."""
    first: dict[int, _Entry] = {}
    for entry in entries:
        if entry.log.rank is not None:
            first.setdefault(entry.log.rank, entry)
    return {rank: entry for rank, entry in sorted(first.items()) if not entry.fails}


class _ReadError(Exception):
    """A rank's log could not be read again; the message says which and why."""


def _check_lockstep(report: DistributedReport, ranks: Mapping[int, _Entry]) -> None:
    """Compare the ranks' unit transitions, then their agreed notes; name the first divergence."""
    killed = {rank for rank, entry in ranks.items() if entry.log.killed}
    try:
        steps = _compare(
            {rank: _steps(entry, failed=report.failed) for rank, entry in ranks.items()},
            killed,
            keep=0,
        )
        notes = _compare(
            {rank: _agreed(entry) for rank, entry in ranks.items()}, killed, keep=_AGREED_LISTED
        )
    except _ReadError as exc:
        report.problems.append(_problem(report.run_id, str(exc)))
        report.unchecked = str(exc)
        return
    report.transitions = steps.count
    report.shorter = steps.ended
    report.divergence = _as_divergence("transitions", steps) or _as_divergence("agreed", notes)
    report.lockstep = report.divergence is None
    caught = [e.log for e in ranks.values() if e.log.failure == _DIVERGENCE]
    if caught and report.divergence is None:  # the learner stopped them before the logs parted
        report.lockstep = False
        report.caught = f"rank {caught[0].rank} failed with {_DIVERGENCE}: {caught[0].message}"
    report.agreed_count = notes.count
    report.agreed = [
        AgreedCancel(tuple((rank, _as_note(item)) for rank, item in row)) for row in notes.kept
    ]


_DIVERGENCE: Final = "DivergenceError"
"""The failure of ranks that found their paths diverged (fsm_learner.exceptions)."""


def _as_note(item: object) -> Agreed | None:
    return item if isinstance(item, Agreed) else None


def _as_divergence(sequence: str, compared: _Compared[Any]) -> Divergence | None:
    if compared.differ is None:
        return None
    return Divergence(sequence, compared.count, compared.differ)


# -- reading the ranks' logs again -------------------------------------------------------------


def _lines(entry: _Entry) -> Generator[tuple[int, bytes], None, None]:
    """Yield the verified lines of the rank's run (and others' between them), numbered."""
    name = entry.log.path
    try:
        fh = open_log(entry.path)
    except OSError as exc:
        msg = f"cannot read {name} again: {exc.strerror or exc}"
        raise _ReadError(msg) from None
    except NotRegularError as exc:
        msg = f"cannot read {name} again: {exc}"
        raise _ReadError(msg) from None
    first, last = entry.log.first_line, entry.limit
    line = 0
    with fh:
        for chunk in read_chunks(fh):
            if isinstance(chunk, Unreadable):
                msg = f"cannot read {name} again: {chunk.reason}"
                raise _ReadError(msg)
            if isinstance(chunk, Overlong):
                line += 1
                continue
            texts = chunk.split(b"\n")
            if chunk.endswith(b"\n"):
                texts.pop()
            for text in texts:
                line += 1
                if line > last:
                    return
                if line >= first and not text.startswith(_SKIPPED):
                    yield line, text


def _unit_line(run_id: str) -> re.Pattern[bytes]:
    """Match a unit transition of the run as the writer writes it: trigger, tr, ep, it."""
    cut = _RUN_OPEN + orjson.dumps(run_id) + _EPOCH_OPEN
    return re.compile(_UNIT_HEAD + re.escape(cut) + _UNIT_NUMBERS)


_RUN_OPEN: Final = b',"%s":' % Field.RUN.value.encode()
_EPOCH_OPEN: Final = b',"%s":' % Field.EPOCH.value.encode()
_UNIT_HEAD: Final = rb'\{"%s":"(%s)","%s":"[a-z]+","%s":"[a-z]+","%s":(true|false)' % (
    Field.EVENT.value.encode(),
    "|".join(sorted(UNIT_TRIGGERS)).encode(),
    Field.SOURCE.value.encode(),
    Field.DEST.value.encode(),
    Field.TRAINING.value.encode(),
)
_UNIT_NUMBERS: Final = rb'([0-9]{1,19}),"%s":([0-9]{1,19}),"%s":[0-9]{1,19}\}' % (
    Field.ITER.value.encode(),
    Field.TIME_NS.value.encode(),
)
_EVENT_OPEN: Final = b'{"%s":"' % Field.EVENT.value.encode()
_NOTE_START: Final = _EVENT_OPEN + RecordKind.NOTE.value.encode() + b'",'


def _record(text: bytes, line: int, run_id: str, unit: re.Pattern[bytes]) -> Step | Note | None:
    """Read a line: a unit transition or a note of the run; None for anything else.

    A unit transition in the writer's bytes is read by ``unit`` (``_unit_line``); any
    other line is decoded. The lines the replay verified are valid records.
    """
    match = unit.fullmatch(text)
    if match is not None:
        trigger, training, epoch, it = match.groups()
        return Step(trigger.decode(), int(epoch), int(it), training == b"true", line)
    try:
        record = decode(text)
    except RecordError:
        return None  # a line of another run's block that does not verify: not this run's
    if record.run != run_id:
        return None
    if isinstance(record, Transition):
        return Step.of(record, line) if record.trigger in UNIT_TRIGGERS else None
    return record if isinstance(record, Note) else None


def _steps(entry: _Entry, *, failed: bool) -> Generator[Step, None, None]:
    """Yield the rank's unit transitions; in a failed run, not the trailing begin_* and fail."""
    run_id, unit = entry.run_id, _unit_line(entry.run_id)
    held: list[Step] = []
    for line, text in _lines(entry):
        if text.startswith(_NOTE_START):
            continue
        step = _record(text, line, run_id, unit)
        if not isinstance(step, Step):
            continue
        if failed and (step.trigger in _BEGINS or step.trigger == _FAIL):
            held.append(step)
            continue
        yield from held
        held.clear()
        yield step
    if not failed:
        yield from held


def _agreed(entry: _Entry) -> Generator[Agreed, None, None]:
    """Yield the rank's agreed notes, each with the unit transition that followed it."""
    run_id, unit = entry.run_id, _unit_line(entry.run_id)
    waiting: list[tuple[int, Note]] = []
    for line, text in _lines(entry):
        if not waiting and text.startswith(_EVENT_OPEN) and not text.startswith(_NOTE_START):
            continue  # a transition (or header, footer) in the writer's bytes: no note waits
        record = _record(text, line, run_id, unit)
        if isinstance(record, Note):
            if record.name == AGREED:
                waiting.append((line, record))
        elif record is not None:
            for at, note in waiting:
                yield _agreed_note(note, record, at)
            waiting.clear()
    for at, note in waiting:
        yield _agreed_note(note, None, at)


def _agreed_note(note: Note, taken: Step | None, line: int) -> Agreed:
    """Read an agreed note's fields, whatever the log put there."""
    fields = note.fields
    cancel = fields.get(AgreedField.CANCEL.value)
    rank = fields.get(AgreedField.RANK.value)
    at = fields.get(AgreedField.AT.value)
    error = fields.get(AgreedField.ERROR.value)
    return Agreed(
        cancel if isinstance(cancel, str) else shown(cancel, 40),
        rank if type(rank) is int else None,
        at if isinstance(at, str) else shown(at, 40),
        error[:MAX_ERROR_CHARS] if isinstance(error, str) else None,
        taken,
        line,
    )


# -- comparing sequences side by side ----------------------------------------------------------

_T = TypeVar("_T", Step, Agreed)


@attrs.frozen
class _Compared(Generic[_T]):
    """The ranks' sequences read side by side."""

    count: int
    """Places compared: the first difference's index, or the longest sequence's length."""
    differ: Taken | None
    """What each rank took at the first difference (None: no difference)."""
    kept: list[tuple[tuple[int, _T | None], ...]]
    """What each rank took at the first places (as many as asked for)."""
    ended: dict[int, int]
    """The killed ranks whose sequences end before the others': how long each is."""


def _key(item: Step | Agreed) -> object:
    return item.key if isinstance(item, Agreed) else item


def _compare(
    streams: Mapping[int, Generator[_T, None, None]], killed: AbstractSet[int], *, keep: int
) -> _Compared[_T]:
    """Read the ranks' sequences side by side, up to the first place where they differ.

    A rank whose sequence ends there differs, unless it was killed: a killed rank's log
    ends where its last seal does, so its sequence need only be a prefix of the others'.
    """
    live = dict(streams)
    ended: dict[int, int] = {}
    kept: list[tuple[tuple[int, _T | None], ...]] = []
    index = 0
    try:
        while live:
            row: dict[int, _T | None] = dict.fromkeys(ended)
            row.update((rank, next(stream, None)) for rank, stream in live.items())
            present = {_key(item) for item in row.values() if item is not None}
            if not present:
                break
            short = [rank for rank in live if row[rank] is None]
            if len(present) > 1 or any(rank not in killed for rank in short):
                return _Compared(index, tuple(sorted(row.items())), kept, ended)
            if index < keep:
                kept.append(tuple(sorted(row.items())))
            for rank in short:
                del live[rank]
                ended[rank] = index
            index += 1
    finally:
        for stream in streams.values():
            stream.close()
    return _Compared(index, None, kept, ended)
