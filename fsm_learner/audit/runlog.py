"""One run's records, read in order: what the diff and the report look at besides the verdict.

The audit (``replay``) verifies a run and keeps only what it adds up to; comparing two
runs step by step, or drawing a run's passes, needs the records themselves. ``read_runs``
reads the runs of one log file in order: each run's header fields, its transitions, its
notes and its footer. It checks nothing beyond decoding each line: a line that does not
decode, a seal, or a record of a run not asked for is passed over. Whether a run
verifies is the audit's to say (``FileAudit``): read a run here once it has.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, overload

import attrs

from fsm_learner.audit.codec import (
    Footer,
    Header,
    Note,
    RecordError,
    RecordKind,
    Transition,
    TransitionReader,
    Transitions,
    decode,
    route_keys,
)
from fsm_learner.audit.files import Overlong, Unreadable, open_log, read_chunks
from fsm_learner.machine import State, Trigger

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator
    from pathlib import Path

__all__ = ["PassSpan", "RunLog", "Step", "Steps", "passes", "read_run", "read_runs"]


@attrs.frozen
class Step:
    """One transition of a run: its route, the counters it was taken at, and when."""

    trigger: str
    source: str
    dest: str
    training: bool
    epoch: int
    iter: int
    t_ns: int


class Steps(Sequence[Step]):
    """A run's transitions, held compactly: four integers each, a Step when read.

    A run of millions of batches is read as arrays (its route as an index into the routes
    seen, its epoch, batch index and time), about 32 bytes a transition, not as objects.
    """

    def __init__(self) -> None:
        """Start empty: the table's routes are indexed as ``route_keys()`` orders them."""
        self._routes: list[tuple[str, str, str, bool]] = list(route_keys())
        self._route_index = {route: i for i, route in enumerate(self._routes)}
        self._columns = (array("q"), array("q"), array("q"), array("q"))

    def extend(self, batch: Transitions) -> None:
        """Add transitions read in bulk (``codec.TransitionReader``: routes of the table)."""
        routes, epochs, iters, times = self._columns
        numbers = batch.numbers
        routes.extend(batch.routes)
        for column, values in ((epochs, numbers[0::3]), (iters, numbers[1::3])):
            column.extend(values if max(values) <= _INT64 else map(_clamped, values))
        stamps = numbers[2::3]
        times.extend(stamps if max(stamps) <= _INT64 else map(_clamped, stamps))

    def append(self, step: Step) -> None:
        """Add a transition at the end."""
        route = (step.trigger, step.source, step.dest, step.training)
        index = self._route_index.get(route)
        if index is None:
            index = self._route_index[route] = len(self._routes)
            self._routes.append(route)
        routes, epochs, iters, times = self._columns
        routes.append(index)
        epochs.append(_clamped(step.epoch))
        iters.append(_clamped(step.iter))
        times.append(_clamped(step.t_ns))

    def __len__(self) -> int:
        """Return how many transitions there are."""
        return len(self._columns[0])

    @overload
    def __getitem__(self, index: int) -> Step: ...
    @overload
    def __getitem__(self, index: slice) -> list[Step]: ...
    def __getitem__(self, index: int | slice) -> Step | list[Step]:
        """Return the transition at ``index`` (a list of them for a slice)."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        routes, epochs, iters, times = self._columns
        trigger, source, dest, training = self._routes[routes[index]]
        return Step(trigger, source, dest, training, epochs[index], iters[index], times[index])

    def __iter__(self) -> Iterator[Step]:
        """Yield the transitions in order."""
        for i in range(len(self)):
            yield self[i]


_INT64: Final = (1 << 63) - 1
_NOT_TRANSITIONS: Final = tuple(b'{"ev":"' + kind.value.encode() + b'"' for kind in RecordKind)
"""How the writer begins the lines that are no transitions: they are taken one by one."""


def _clamped(value: int) -> int:
    """Keep a number within int64 (a log may hold any integer; the audit bounds real ones)."""
    return max(-_INT64, min(value, _INT64))


@attrs.define
class RunLog:
    """The records of one run of a log file, in the order they were written."""

    run_id: str
    header: dict[str, Any] = attrs.Factory(dict)
    """The header's fields (besides the envelope); empty when the run has no header."""
    start_ns: int | None = None
    """The header's time: when the run started (monotonic ns, as the transitions' times)."""
    steps: Steps = attrs.Factory(Steps)
    notes: list[Note] = attrs.Factory(list)
    footer: Footer | None = None
    first_line: int = 0
    """The line of its header (1-based; 0 when it has none)."""
    repeated: bool = False
    """Another run of the file has the same id; its records are not these."""


def read_runs(path: Path, wanted: Collection[str] | None = None) -> dict[str, RunLog]:
    """Read the runs of the log ``path`` (only those in ``wanted``, if given), in file order.

    A run is its header and the records of its id after it, up to its footer or the next
    header of its id: the records of a second run with one id (which the audit refuses)
    are never mixed into the first. A run id's first run is returned. Raises OSError when
    the file cannot be opened or read.
    """
    reader = _Reader(wanted, None)
    reader.read(path)
    return reader.first


def read_run(path: Path, run_id: str, first_line: int) -> RunLog:
    """Read the run ``run_id`` of ``path`` whose header is on line ``first_line`` (1-based).

    This is the run the audit reported (``RunReport.first_line``), even when another run
    of the file has the same id. Raises OSError when the file cannot be opened or read.
    """
    reader = _Reader({run_id}, first_line)
    reader.read(path)
    return reader.chosen or RunLog(run_id, first_line=first_line)


class _Reader:
    """Reads a file's runs; each record goes to the open run of its id, if any."""

    def __init__(self, wanted: Collection[str] | None, first_line: int | None) -> None:
        self.wanted, self.first_line = wanted, first_line
        self.first: dict[str, RunLog] = {}
        self.open: dict[str, RunLog] = {}
        self.chosen: RunLog | None = None
        self.line = 0
        self.bulk_id = next(iter(wanted)) if wanted is not None and len(wanted) == 1 else ""
        self.bulk = TransitionReader(self.bulk_id) if self.bulk_id else None
        """One run wanted: its transition lines are read in bulk, as the audit reads them."""

    def read(self, path: Path) -> None:
        with open_log(path) as fh:
            for chunk in read_chunks(fh):
                if isinstance(chunk, Unreadable):
                    raise OSError(chunk.reason)
                if isinstance(chunk, Overlong):
                    self.line += 1
                    continue
                self._chunk(chunk.splitlines(keepends=True))

    def _chunk(self, lines: list[bytes]) -> None:
        """Take a chunk's lines: runs of transition lines in bulk where they read so."""
        bulk = self.bulk
        if bulk is None:
            for line in lines:
                self.line += 1
                self._take(line)
            return
        group: list[bytes] = []
        for line in lines:
            if line.startswith(_NOT_TRANSITIONS):
                self._group(group, bulk)
                group = []
                self.line += 1
                self._take(line)
            else:
                group.append(line)
        self._group(group, bulk)

    def _group(self, group: list[bytes], bulk: TransitionReader) -> None:
        """Take consecutive lines that may be transitions: in bulk if all are the run's."""
        if not group:
            return
        run = self.open.get(self.bulk_id)
        batch = bulk.read(b"".join(group)) if run is not None else None
        if run is None or batch is None or not group[-1].endswith(b"\n"):
            for line in group:
                self.line += 1
                self._take(line)
            return
        run.steps.extend(batch)
        self.line += len(group)

    def _take(self, line: bytes) -> None:
        try:
            record = decode(line)
        except RecordError:
            return
        if self.wanted is not None and record.run not in self.wanted:
            return
        if isinstance(record, Header):
            self._begin(record)
            return
        run = self.open.get(record.run)
        if run is None:
            return
        match record:
            case Transition():
                run.steps.append(_step(record))
            case Note():
                run.notes.append(record)
            case Footer():
                run.footer = record
                del self.open[record.run]
            case _:  # a seal
                pass

    def _begin(self, header: Header) -> None:
        run = RunLog(header.run, header.fields, header.t_ns, first_line=self.line)
        earlier = self.first.get(header.run)
        if earlier is not None:
            earlier.repeated = run.repeated = True
        else:
            self.first[header.run] = run
        self.open[header.run] = run
        if self.first_line == self.line:
            self.chosen = run


def _step(record: Transition) -> Step:
    return Step(
        record.trigger,
        record.source,
        record.dest,
        record.training,
        record.epoch,
        record.iter,
        record.t_ns,
    )


_PASS_ENDS: Final = {
    Trigger.END_EPOCH.value: "completed",
    Trigger.CANCEL_EPOCH.value: "cancelled",
}


_IN_PASS: Final = frozenset(State) - {State.IDLE, State.FIT}
"""The states inside a pass: a transition from one of them to another state ends the pass."""


@attrs.frozen
class PassSpan:
    """One pass of a run: which, when it began and ended, its batches, and how it ended.

    ``ended`` is ``completed``, ``cancelled`` (cancel_epoch), or the trigger that left
    it otherwise (``cancel_fit``, ``fail``, ``preempt``), or ``open`` when the log ends
    inside it.
    """

    epoch: int
    training: bool
    start_ns: int
    end_ns: int
    batches: int
    cancelled_batches: int
    ended: str


def passes(run: RunLog) -> Iterator[PassSpan]:
    """Yield the run's passes in order, from its begin_epoch and end_epoch transitions."""
    start: Step | None = None
    batches = cancelled = 0
    last_ns = run.start_ns or 0
    for step in run.steps:
        last_ns = step.t_ns
        if step.trigger == Trigger.BEGIN_EPOCH.value:
            start, batches, cancelled = step, 0, 0
        elif start is None:
            continue
        elif step.trigger == Trigger.BEGIN_BATCH.value:
            batches += 1
        elif step.trigger == Trigger.CANCEL_BATCH.value:
            cancelled += 1
        elif step.source in _IN_PASS and step.dest not in _IN_PASS:
            ended = _PASS_ENDS.get(step.trigger, step.trigger)
            yield PassSpan(
                start.epoch, start.training, start.t_ns, step.t_ns, batches, cancelled, ended
            )
            start = None
    if start is not None:
        yield PassSpan(start.epoch, start.training, start.t_ns, last_ns, batches, cancelled, "open")
