"""Distributed runs: the logs of a fit's ranks, checked together.

A fit across N ranks (torch.distributed) is one run: every rank writes its own log
(``<run>.rank<r>.jsonl``), all with rank 0's run id, each header naming its ``rank`` and
``world_size`` (2 <= N <= ``MAX_WORLD_SIZE``; absent: 1, a fit on one process). Ranks take
cancels together: each rank's log has an ``agreed`` note right before the transition the
ranks agreed on (``cancel``, the lowest proposing ``rank``, where this rank agreed: ``at``;
a failure's ``error``). ``DistributedRuns`` takes every audited run's report (``add``),
keeps the ranks of distributed runs, and ``check`` groups them by run id and checks each run:

- every rank 0..N-1 present exactly once, each header saying the same world size, table
  and epochs; the missing ranks are kept as ranges (``missing``);
- lockstep: the ranks' *unit* transitions (all but the per-batch ``predict``,
  ``compute_loss``, ``backward`` and ``step``), as (trigger, epoch, batch, pass), are the
  same sequence on every rank; so are their ``agreed`` notes, as (cancel, rank);
- each rank's agreed notes say what the note's schema allows (a ``cancel``, a ``rank`` of
  the world, a known ``at``, an ``error`` with a failure only), and each is followed by the
  transition it agreed on (batch: ``cancel_batch``, epoch: ``cancel_epoch``, fit:
  ``cancel_fit``, fail: ``fail``); every ``cancel_*`` follows its note (a ``fail`` need
  not: a killed or lost rank fails without one);
- a failed run (a rank's footer says failed, or a rank has no footer) ends in ``fail`` on
  every rank, or the rank was killed. The ranks fail at their next agreement point, not
  at once: the trailing ``begin_*`` transitions and the final ``fail`` are left out of the
  comparison; a killed rank's log ends where its last verified seal does, so its sequences
  need only be a prefix of the others'.

The first divergence is named: its index, and what each rank took there ("nothing
more" for a rank whose sequence ended). Ranks are compared only when each verifies on
its own (or was only killed): a log that does not verify is its own problem.

Memory and files: one small entry per rank of a distributed run; the sequences are never
held, the ranks' logs are read again side by side (their verified lines of that run only,
the per-batch transitions skipped unparsed), at most ``_files_at_once()`` files open at a
time: more ranks than that are compared in groups, each with the same reference rank.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Generic, TypeGuard, TypeVar

import attrs
import orjson

from fsm_learner._compat import StrEnum
from fsm_learner._display import file_name, shown
from fsm_learner.audit.codec import (
    SEAL_START,
    AgreePoint,
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

if sys.platform != "win32":
    import resource

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
    from collections.abc import Set as AbstractSet
    from pathlib import Path

    from fsm_learner.audit.replay import RunReport

__all__ = [
    "AGREED",
    "MAX_ERROR_CHARS",
    "MAX_WORLD_SIZE",
    "UNIT_TRIGGERS",
    "Agreed",
    "AgreedField",
    "Cancel",
    "DistributedReport",
    "DistributedRuns",
    "Divergence",
    "RankLog",
    "Step",
    "check_ranks",
    "ranges_text",
    "rank_ranges",
    "world_size_of",
]

AGREED: Final = "agreed"
"""The note every rank writes right before a transition the ranks agreed on."""
MAX_ERROR_CHARS: Final = 2000
"""The longest ``error`` an ``agreed`` note of a failure holds."""
MAX_WORLD_SIZE: Final = 1 << 20
"""The largest world size a header may say: a larger one is a header problem, not checked."""


class Cancel(StrEnum):
    """What the ranks agreed to do (an ``agreed`` note's ``cancel``)."""

    BATCH = "batch"
    EPOCH = "epoch"
    FIT = "fit"
    FAIL = "fail"


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


RankRange = tuple[int, int]
"""Consecutive ranks: the first and the last, both included."""

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

    @property
    def ended_known(self) -> bool:
        """Whether its log says how it ended: a footer read, or killed (truncated)."""
        return self.status is not RunStatus.TRUNCATED or self.killed

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
    world_size: int | None
    """As the lowest rank's header says it (None: no header says a valid one)."""
    ranks: list[RankLog] = attrs.Factory(list)
    """Rank by rank, as found (a rank twice is there twice)."""
    missing: list[RankRange] = attrs.Factory(list)
    """The ranks of the world no log was given for, as ranges ``(first, last)``, in order."""
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
    def missing_count(self) -> int:
        """How many ranks are missing."""
        return _count(self.missing)

    @property
    def status(self) -> RunStatus | None:
        """Say how the run ended: failed, truncated (a rank died), or as its lowest rank says.

        None: no rank's log says (none was read to its end: a keyed log without its key).
        """
        statuses = [log.status for log in self.ranks if log.ended_known]
        if RunStatus.FAILED in statuses:
            return RunStatus.FAILED
        if self.failed:
            return RunStatus.TRUNCATED
        return statuses[0] if statuses else None

    def to_json(self) -> dict[str, Any]:
        """Everything the summary shows, as JSON-able data.

        ``world_size`` is null when no header says a valid one, ``status`` null when no
        rank's log says how the run ended. ``missing_ranks`` lists the missing ranks as
        ranges ``[first, last]`` (both included, in order: ``[[2, 99999]]`` for every rank
        from 2 on), ``missing_count`` counts them.
        """
        return {
            "run_id": self.run_id,
            "world_size": self.world_size,
            "status": None if self.status is None else self.status.value,
            "ranks": [rank.to_json() for rank in self.ranks],
            "missing_ranks": [list(missing) for missing in self.missing],
            "missing_count": self.missing_count,
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
    rank_said: object
    """The rank its header says, whatever it is (shown when it is not a rank)."""
    said: dict[str, object]
    """What its header says that every rank's must say alike: world size, table, epochs."""
    limit: int
    """Its last verified line: the seals up to there verify, and the records they seal."""
    fails: bool
    """It does not verify, and not only because it was killed: its records are not compared."""


_ALIKE: Final = (Field.WORLD_SIZE, Field.TABLE, Field.N_EPOCHS)
"""The header fields every rank's header must say alike."""


def _valid_world_size(value: object) -> bool:
    return type(value) is int and 2 <= value <= MAX_WORLD_SIZE


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
        rank,
        {field.value: header.get(field.value) for field in _ALIKE},
        _verified_to(report),
        not report.verified and not killed,
    )


@attrs.define
class _Held:
    """The runs an audited file holds: the first few run ids, and how many runs."""

    ids: list[str] = attrs.Factory(list)
    count: int = 0

    def add(self, run_id: str) -> None:
        """Count a run of the file (a run without an id is none)."""
        if not run_id:
            return
        self.count += 1
        if len(self.ids) < _LISTED and run_id not in self.ids:
            self.ids.append(run_id)


_RANK_FILE: Final = re.compile(r"(.+)\.rank([0-9]{1,7})\.jsonl")
"""How a rank's log is named: ``<stem>.rank<r>.jsonl``."""

_RankFiles = dict[tuple["Path", str], dict[int, "Path"]]
"""The audited files named as a rank's log, by (folder, stem), then rank."""


def _rank_files(files: Iterable[Path]) -> _RankFiles:
    """Index the audited files named ``<stem>.rank<r>.jsonl`` by folder and stem, then rank."""
    index: _RankFiles = {}
    for path in files:
        match = _RANK_FILE.fullmatch(path.name)
        if match is not None:
            stem, rank = match.groups()
            index.setdefault((path.parent, stem), {}).setdefault(int(rank), path)
    return index


class DistributedRuns:
    """The ranks of the distributed runs among the audited runs, grouped by run id.

    ``add`` every run's report as the replay yields it (with its file), then ``check``
    once: one ``DistributedReport`` per distributed run, in the order their run ids
    were first met. A run is distributed when its header has a ``world_size``.
    """

    def __init__(self) -> None:
        """Start with no run."""
        self._runs: dict[str, list[_Entry]] = {}
        self._held: dict[Path, _Held] = {}

    def add(self, report: RunReport, path: Path) -> None:
        """Keep the run when it is a rank of a distributed run; count it among its file's."""
        if Field.WORLD_SIZE.value in report.header and report.run_id:
            self._runs.setdefault(report.run_id, []).append(_entry(report, path))
        self._held.setdefault(path, _Held()).add(report.run_id)

    def __bool__(self) -> bool:
        """Whether a distributed run was added."""
        return bool(self._runs)

    def check(self, files: Iterable[Path] = ()) -> list[DistributedReport]:
        """Check every distributed run; one report each.

        ``files`` are the files audited: a missing rank's log among them (named as the
        others', ``<stem>.rank<r>.jsonl``, or as ``<run>.rank<r>.jsonl``) is named, with
        what it holds instead (nothing, or other runs: run ids mixed).
        """
        found = _Found(_rank_files(files), self._held)
        return [_check(run_id, entries, found) for run_id, entries in self._runs.items()]


@attrs.frozen
class _Found:
    """What the audit found besides the run: the files named as ranks' logs, what files hold."""

    rank_files: _RankFiles = attrs.Factory(dict)
    held: Mapping[Path, _Held] = attrs.Factory(dict)


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
    return _check(run_ids[0], entries, _Found())


# -- ranks as ranges ---------------------------------------------------------------------------

_LISTED: Final = 10
"""How many ranges, ranks, files or faults a problem lists before saying how many more."""


def rank_ranges(ranks: Iterable[int]) -> list[RankRange]:
    """Return the ranks (sorted, each once) as ranges of consecutive ranks."""
    ranges: list[RankRange] = []
    for rank in ranks:
        if ranges and ranges[-1][1] + 1 == rank:
            ranges[-1] = (ranges[-1][0], rank)
        else:
            ranges.append((rank, rank))
    return ranges


def _gaps(present: Sequence[int], world: int) -> list[RankRange]:
    """Return the ranks 0..world-1 not in ``present`` (sorted, each once, all in the world)."""
    gaps, start = [], 0
    for rank in present:
        if rank > start:
            gaps.append((start, rank - 1))
        start = rank + 1
    if start < world:
        gaps.append((start, world - 1))
    return gaps


def _range_text(ranks: RankRange) -> str:
    first, last = ranks
    if first == last:
        return str(first)
    return f"{first}-{last}" if first >= 0 else f"{first} to {last}"


def _count(ranges: Iterable[RankRange]) -> int:
    return sum(last - first + 1 for first, last in ranges)


def ranges_text(ranges: Sequence[RankRange], *, listed: int = _LISTED) -> str:
    """Say ``0-3, 7`` for ranges of ranks: the first ``listed``, then ``and N more`` ranks."""
    text = ", ".join(map(_range_text, ranges[:listed])) or "none"
    rest = _count(ranges[listed:])
    return f"{text} and {rest} more" if rest else text


def _ranks_text(ranges: Sequence[RankRange]) -> str:
    """Say ``rank 2`` or ``ranks 2-99999``."""
    return f"{'rank' if _count(ranges) == 1 else 'ranks'} {ranges_text(ranges)}"


# -- the checks --------------------------------------------------------------------------------


def _check(run_id: str, entries: list[_Entry], found: _Found) -> DistributedReport:
    entries = sorted(entries, key=lambda e: (e.log.rank is None, e.log.rank or 0))
    world = _world_size(entries)
    report = DistributedReport(run_id, world, [entry.log for entry in entries])
    _check_headers(report, entries)
    _check_ranks(report, entries)
    _check_missing(report, entries, found)
    report.failed = any(e.log.status is RunStatus.FAILED or e.log.killed for e in entries)
    unverified = [entry for entry in entries if entry.fails]
    _add_listed(
        report,
        (f"rank {_rank(entry)}'s log ({entry.log.path}) does not verify" for entry in unverified),
        "ranks' logs do not verify",
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


def _add_listed(report: DistributedReport, reasons: Iterable[str], more: str) -> None:
    """Add the first few reasons as problems, then one saying how many ``more`` there are."""
    left = iter(reasons)
    report.problems.extend(_problem(report.run_id, r) for r in itertools.islice(left, _LISTED))
    rest = sum(1 for _ in left)
    if rest:
        report.problems.append(_problem(report.run_id, f"and {rest} more {more}"))


def _rank(entry: _Entry) -> str:
    return "?" if entry.log.rank is None else str(entry.log.rank)


def _world_size(entries: Sequence[_Entry]) -> int | None:
    """Return the world size of the lowest rank that says a valid one (None: none does)."""
    for entry in entries:
        value = entry.said[Field.WORLD_SIZE.value]
        if type(value) is int and _valid_world_size(value):
            return value
    return None


def _check_headers(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """Every rank's header says the same world size, table and epochs; a valid world size."""
    for field in _ALIKE:
        values = [entry.said[field.value] for entry in entries]
        if any(value != values[0] for value in values):
            said = ", ".join(
                f"rank {_rank(entry)} {shown(value, 40)}"
                for entry, value in zip(entries[:_LISTED], values, strict=False)
            )
            more = f" and {len(entries) - _LISTED} more" if len(entries) > _LISTED else ""
            report.problems.append(
                _problem(
                    report.run_id, f"the ranks' headers differ in {field.value!r}: {said}{more}"
                )
            )
    _add_listed(
        report,
        (
            f"rank {_rank(entry)}'s header field 'world_size' must be an int from 2 to "
            f"{MAX_WORLD_SIZE} (MAX_WORLD_SIZE), got {shown(entry.said[Field.WORLD_SIZE.value])}"
            for entry in entries
            if not _valid_world_size(entry.said[Field.WORLD_SIZE.value])
        ),
        "ranks' headers with an invalid 'world_size'",
    )


def _in_world(rank: object, world: int | None) -> TypeGuard[int]:
    """Whether ``rank`` is a rank of the world (of an unknown world: an int >= 0)."""
    return type(rank) is int and rank >= 0 and (world is None or rank < world)


def _world_text(world: int | None) -> str:
    if world is None:
        return "any world (an int >= 0)"
    return f"a world of {world} (0-{world - 1})"


def _check_ranks(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """Every rank 0..world_size-1 present exactly once, and no other; the missing kept."""
    world = report.world_size
    seen: dict[int, list[_Entry]] = {}
    strays: list[_Entry] = []
    for entry in entries:
        rank = entry.log.rank
        if rank is None or not _in_world(rank, world):
            strays.append(entry)
        else:
            seen.setdefault(rank, []).append(entry)
    _add_listed(
        report,
        (
            f"{entry.log.path}: rank {shown(entry.rank_said)} is not a rank of {_world_text(world)}"
            for entry in strays
        ),
        "logs whose rank is not one of the world",
    )
    _add_listed(
        report,
        (
            f"rank {rank} appears {len(found)} times ({_files_text(found)})"
            for rank, found in sorted(seen.items())
            if len(found) > 1
        ),
        "ranks that appear more than once",
    )
    if world is not None:
        report.missing = _gaps(sorted(seen), world)


def _files_text(entries: Sequence[_Entry]) -> str:
    files = ", ".join(entry.log.path for entry in entries[:3])
    return f"{files} and {len(entries) - 3} more" if len(entries) > 3 else files


def _check_missing(report: DistributedReport, entries: Sequence[_Entry], found: _Found) -> None:
    """Name the missing ranks; a missing rank's log audited (named as the others') too."""
    world = report.world_size
    if not report.missing or world is None:
        return
    present = {entry.log.rank for entry in entries if _in_world(entry.log.rank, world)}
    named = {
        rank: path
        for key in _stems(report.run_id, entries)
        for rank, path in found.rank_files.get(key, {}).items()
        if rank not in present and 0 <= rank < world
    }
    ours = {entry.path: entry for entry in reversed(entries)}  # each file's lowest rank
    _add_listed(
        report,
        (
            f"rank {rank} of {world} missing: its log {file_name(path)} {_holds(path, ours, found)}"
            for rank, path in sorted(named.items())
        ),
        "missing ranks' logs among the files audited",
    )
    unseen = _gaps(sorted(present.union(named)), world)
    if unseen:
        report.problems.append(
            _problem(
                report.run_id,
                f"{_ranks_text(unseen)} of {world} missing: no log of theirs among the files "
                "audited",
            )
        )


def _stems(run_id: str, entries: Iterable[_Entry]) -> set[tuple[Path, str]]:
    """Return where a missing rank's log would be: a rank's folder, its stem or the run id."""
    stems = set()
    for entry in entries:
        stems.add((entry.path.parent, run_id))
        stem = _rank_stem(entry)
        if stem is not None:
            stems.add((entry.path.parent, stem))
    return stems


def _rank_stem(entry: _Entry) -> str | None:
    """Return the stem of a rank's file named ``<stem>.rank<r>.jsonl``; None if not so named."""
    name, rank = entry.path.name, entry.log.rank
    suffix = f".rank{rank}.jsonl"
    if rank is None or not name.endswith(suffix):
        return None
    return name.removesuffix(suffix)


def _holds(path: Path, ours: Mapping[Path, _Entry], found: _Found) -> str:
    """Say what a missing rank's log holds: this run as another rank, other runs, or none."""
    entry = ours.get(path)
    if entry is not None:
        return f"holds this run's rank {shown(entry.rank_said)} instead"
    held = found.held.get(path)
    if held is None or not held.count:
        return "holds no run of it (a rank killed before its first write?)"
    ids = ", ".join(shown(run_id, _ID_SHOWN) for run_id in held.ids[:3])
    if held.count == 1:
        return f"holds run {ids} instead: run ids mixed?"
    more = ", ..." if held.count > 3 else ""
    return f"holds {held.count} other runs ({ids}{more}): run ids mixed?"


def _check_failed(report: DistributedReport, entries: Sequence[_Entry]) -> None:
    """In a failed run, every rank ends in fail, or was killed."""
    _add_listed(
        report,
        (
            f"rank {_rank(entry)} ended {entry.log.status.value}, but the run failed: "
            "every rank of a failed run ends in fail (or was killed)"
            for entry in entries
            if entry.log.status is not RunStatus.FAILED and not entry.log.killed and not entry.fails
        ),
        "ranks that did not end in fail",
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
    """Compare the ranks' unit transitions, then their agreed notes; name the first divergence.

    The agreed notes are checked as they are read (``_NoteCheck``), each rank's to its end.
    """
    killed = {rank for rank, entry in ranks.items() if entry.log.killed}
    checks = {
        rank: _NoteCheck(rank, report.world_size, killed=entry.log.killed)
        for rank, entry in ranks.items()
    }

    def steps(entry: _Entry, _check: _NoteCheck | None) -> Generator[Step, None, None]:
        return _steps(entry, failed=report.failed)

    try:
        steps_read = _side_by_side(_Sequences(ranks, steps, killed, keep=0))
        notes = _side_by_side(_Sequences(ranks, _agreed, killed, keep=_AGREED_LISTED), checks)
    except _ReadError as exc:
        report.problems.append(_problem(report.run_id, str(exc)))
        report.unchecked = str(exc)
        return
    report.transitions = steps_read.count
    report.shorter = steps_read.ended
    report.divergence = _as_divergence("transitions", steps_read) or _as_divergence("agreed", notes)
    report.lockstep = report.divergence is None
    caught = [e.log for e in ranks.values() if e.log.failure == _DIVERGENCE]
    if caught and report.divergence is None:  # the learner stopped them before the logs parted
        report.lockstep = False
        report.caught = f"rank {caught[0].rank} failed with {_DIVERGENCE}: {caught[0].message}"
    report.agreed_count = notes.count
    report.agreed = [
        AgreedCancel(tuple((rank, _as_note(item)) for rank, item in row)) for row in notes.kept
    ]
    _add_faults(report, checks.values())


def _add_faults(report: DistributedReport, checks: Iterable[_NoteCheck]) -> None:
    """Add the first few faults of the ranks' agreed notes, then how many more there are."""
    checks = list(checks)
    listed = [fault for check in checks for fault in check.faults][:_LISTED]
    report.problems.extend(_problem(report.run_id, fault) for fault in listed)
    rest = sum(check.count for check in checks) - len(listed)
    if rest:
        report.problems.append(
            _problem(report.run_id, f"and {rest} more faults in the ranks' agreed notes")
        )


_DIVERGENCE: Final = "DivergenceError"
"""The failure of ranks that found their paths diverged (fsm_learner.exceptions)."""


def _as_note(item: object) -> Agreed | None:
    return item if isinstance(item, Agreed) else None


def _as_divergence(sequence: str, compared: _Compared[Any]) -> Divergence | None:
    if compared.differ is None:
        return None
    return Divergence(sequence, compared.count, compared.differ)


# -- reading the ranks' logs again -------------------------------------------------------------


def _lines(
    entry: _Entry, *, skipped: tuple[bytes, ...] = _SKIPPED
) -> Generator[tuple[int, bytes], None, None]:
    """Yield the verified lines of the rank's run (and others' between them), numbered.

    Lines that begin as ``skipped`` are left out unparsed.
    """
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
                if line >= first and not text.startswith(skipped):
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


def _agreed(entry: _Entry, check: _NoteCheck | None) -> Generator[Agreed, None, None]:
    """Yield the rank's agreed notes, each with the transition that followed it.

    ``check`` (when given) checks each note, the transition after it, and every cancel.
    """
    run_id = entry.run_id
    if check is None:
        check = _NoteCheck(-1, None, killed=True)  # its faults are not kept
    waiting: list[tuple[int, Note]] = []
    for line, text in _lines(entry, skipped=_SEALS):
        if not waiting and text.startswith(_EVENT_OPEN) and not text.startswith(_LOOKED_AT):
            continue  # a transition (or header, footer) in the writer's bytes: no note waits
        record = _decoded(text, run_id)
        if isinstance(record, Note):
            if record.name == AGREED:
                check.note(line, record)
                waiting.append((line, record))
        elif record is not None:
            step = Step.of(record, line)
            check.taken(waiting, step)
            for at, note in waiting:
                yield _agreed_note(note, step, at)
            waiting.clear()
    check.ended(waiting)
    for at, note in waiting:
        yield _agreed_note(note, None, at)


_SEALS: Final = (SEAL_START,)
_LOOKED_AT: Final = (_NOTE_START, _EVENT_OPEN + b"cancel_")
"""The lines in the writer's bytes that the agreed notes' reader reads when no note waits."""


def _decoded(text: bytes, run_id: str) -> Transition | Note | None:
    """Read a line: a transition or a note of the run; None for anything else."""
    try:
        record = decode(text)
    except RecordError:
        return None  # a line of another run's block that does not verify: not this run's
    if record.run != run_id or not isinstance(record, Transition | Note):
        return None
    return record


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


# -- checking the agreed notes -----------------------------------------------------------------

_TAKEN: Final = {
    Cancel.BATCH.value: Trigger.CANCEL_BATCH.value,
    Cancel.EPOCH.value: Trigger.CANCEL_EPOCH.value,
    Cancel.FIT.value: Trigger.CANCEL_FIT.value,
    Cancel.FAIL.value: Trigger.FAIL.value,
}
"""The transition each agreed cancel is taken as, right after its note."""
_CANCEL_TRIGGERS: Final = frozenset(_TAKEN.values()) - {Trigger.FAIL.value}
_AGREED_FIELDS: Final = frozenset(AgreedField)
_AT_VALUES: Final = frozenset(AgreePoint)


@attrs.define
class _NoteCheck:
    """What is wrong with one rank's agreed notes: the first few faults, and how many."""

    rank: int
    world: int | None
    killed: bool
    """A killed rank's log may end between a note and its transition."""
    faults: list[str] = attrs.Factory(list)
    count: int = 0

    def fault(self, line: int, what: str) -> None:
        """Count a fault at ``line``; keep its description when it is among the first."""
        self.count += 1
        if len(self.faults) < _LISTED:
            self.faults.append(f"rank {self.rank}'s log, line {line}: {what}")

    def note(self, line: int, note: Note) -> None:
        """Check an agreed note's fields as its schema does."""
        wrong = _field_faults(note.fields, self.world)
        if wrong:
            self.fault(line, f"agreed note: {'; '.join(wrong)}")

    def taken(self, waiting: Sequence[tuple[int, Note]], step: Step) -> None:
        """Check the transition after the notes waiting: the one they agreed on.

        Without a note, a cancel is not one the ranks agreed on. A note followed by a
        ``fail`` note was cut short by a failure: the ``fail`` is taken instead.
        """
        if not waiting and step.trigger in _CANCEL_TRIGGERS:
            self.fault(
                step.line,
                f"{step.trigger} follows no agreed note: across ranks, every rank takes a "
                "cancel the ranks agreed on, right after its note",
            )
        for index, (line, note) in enumerate(waiting):
            cancel = note.fields.get(AgreedField.CANCEL.value)
            expected = _TAKEN.get(cancel) if isinstance(cancel, str) else None
            if expected is None or expected == step.trigger:
                continue  # an invalid cancel is a fault of the note already
            if step.trigger == _FAIL and _fails(waiting[index + 1 :]):
                continue
            self.fault(
                line,
                f"agreed note of a {cancel} cancel followed by {step.trigger} at line "
                f"{step.line}, not by {expected}",
            )

    def ended(self, waiting: Sequence[tuple[int, Note]]) -> None:
        """Check the notes the log ends after: only a killed rank's log may end there."""
        if self.killed:
            return
        for line, _ in waiting:
            self.fault(line, "agreed note followed by no transition of the run")


def _fails(notes: Sequence[tuple[int, Note]]) -> bool:
    return any(note.fields.get(AgreedField.CANCEL.value) == Cancel.FAIL for _, note in notes)


def _said(fields: Mapping[str, Any], field: AgreedField) -> str:
    return shown(fields[field.value], 40) if field.value in fields else "missing"


def _field_faults(fields: Mapping[str, Any], world: int | None) -> list[str]:
    """Say what in an agreed note's fields its schema rejects (nothing: an empty list)."""
    wrong = []
    unknown = sorted(set(fields) - _AGREED_FIELDS)
    if unknown:
        wrong.append(f"fields {shown(unknown)} are not an agreed note's ({', '.join(AgreedField)})")
    cancel = fields.get(AgreedField.CANCEL.value)
    if not (isinstance(cancel, str) and cancel in _TAKEN):
        wrong.append(
            f"cancel {_said(fields, AgreedField.CANCEL)} is not one of {', '.join(Cancel)}"
        )
    if not _in_world(fields.get(AgreedField.RANK.value), world):
        wrong.append(
            f"rank {_said(fields, AgreedField.RANK)} is not a rank of {_world_text(world)}"
        )
    at = fields.get(AgreedField.AT.value)
    if not (isinstance(at, str) and at in _AT_VALUES):
        wrong.append(f"at {_said(fields, AgreedField.AT)} is not one of {', '.join(AgreePoint)}")
    wrong.extend(_error_faults(fields, failed=cancel == Cancel.FAIL))
    return wrong


def _error_faults(fields: Mapping[str, Any], *, failed: bool) -> list[str]:
    """Say what is wrong with the ``error``: a fail's is a str of at most MAX_ERROR_CHARS."""
    if AgreedField.ERROR.value not in fields:
        return ["error missing: a fail's note names the failure"] if failed else []
    error = fields[AgreedField.ERROR.value]
    if not failed:
        return [f"error {_said(fields, AgreedField.ERROR)} given: only a fail's note has one"]
    if not isinstance(error, str):
        return [f"error {_said(fields, AgreedField.ERROR)} is not a str"]
    if len(error) > MAX_ERROR_CHARS:
        return [f"error of {len(error)} characters, at most {MAX_ERROR_CHARS}"]
    return []


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
    return _Compared(index, None, kept, ended)


_MOST_OPEN: Final = 256
"""The most ranks' logs open at once, whatever the limit on open files allows."""


def _files_at_once() -> int:
    """Return how many ranks' logs may be open at once: a quarter of the open files allowed."""
    if sys.platform == "win32":
        return _MOST_OPEN
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return _MOST_OPEN
    return max(2, min(_MOST_OPEN, soft // 4))


@attrs.frozen
class _Sequences(Generic[_T]):
    """One sequence of every rank to compare: the ranks, how to read it, what to keep."""

    ranks: Mapping[int, _Entry]
    read: Callable[[_Entry, _NoteCheck | None], Generator[_T, None, None]]
    """Read a rank's sequence, checking it with the check given (if any)."""
    killed: AbstractSet[int]
    keep: int
    """How many places to keep (``_Compared.kept``)."""


def _side_by_side(
    sequences: _Sequences[_T], checks: Mapping[int, _NoteCheck] | None = None
) -> _Compared[_T]:
    """Compare the ranks' sequences: all at once, or in groups when they are many.

    Each group holds the same reference rank: one that was not killed (else the longest),
    whose sequence every other rank's must equal (or, killed, begin). The first
    divergence is then the earliest of the groups'. ``checks``: each rank's, read once.
    """
    checks = checks or {}
    ranks, at_once = list(sequences.ranks), _files_at_once()
    if len(ranks) <= at_once:
        return _compare_group(sequences, ranks, checks)
    reference = _reference(sequences)
    others = [rank for rank in ranks if rank != reference]
    parts = []
    for start in range(0, len(others), at_once - 1):
        group: list[int] = others[start : start + at_once - 1]
        checked = [*group, reference] if start == 0 else group
        own = {rank: checks[rank] for rank in checked if rank in checks}
        parts.append(_compare_group(sequences, sorted([reference, *group]), own))
    return _merged(sequences, parts)


def _compare_group(
    sequences: _Sequences[_T], members: Sequence[int], checks: Mapping[int, _NoteCheck]
) -> _Compared[_T]:
    """Compare some ranks side by side; then read the checked ones to their end, close all."""
    streams = {rank: sequences.read(sequences.ranks[rank], checks.get(rank)) for rank in members}
    try:
        return _compare(streams, sequences.killed, keep=sequences.keep)
    finally:
        try:
            for rank in checks:
                deque(streams[rank], maxlen=0)
        finally:
            for stream in streams.values():
                stream.close()


def _reference(sequences: _Sequences[_T]) -> int:
    """Return the lowest rank not killed; all killed, the one with the longest sequence."""
    ranks = sequences.ranks
    alive = [rank for rank in ranks if rank not in sequences.killed]
    if alive:
        return alive[0]
    return max(ranks, key=lambda rank: sum(1 for _ in sequences.read(ranks[rank], None)))


def _merged(sequences: _Sequences[_T], parts: Sequence[_Compared[_T]]) -> _Compared[_T]:
    """Join the groups' comparisons: the earliest divergence, read again on every rank."""
    differing = [part.count for part in parts if part.differ is not None]
    count = min(differing, default=max(part.count for part in parts))
    kept = [
        tuple(sorted({rank: item for part in parts for rank, item in part.kept[i]}.items()))
        for i in range(min(len(part.kept) for part in parts))
    ]
    ended = {rank: at for part in parts for rank, at in part.ended.items() if at < count}
    if not differing:
        return _Compared(count, None, kept, ended)
    row = tuple(
        (rank, _item_at(sequences.read(entry, None), count))
        for rank, entry in sequences.ranks.items()
    )
    return _Compared(count, row, kept[:count], ended)


def _item_at(stream: Generator[_T, None, None], index: int) -> _T | None:
    """Return a sequence's item at ``index`` (None: it ends before); close the stream."""
    try:
        return next(itertools.islice(stream, index, None), None)
    finally:
        stream.close()
