"""One run's records, read in order: what the diff and the report look at besides the verdict.

The audit (``replay``) verifies a run and keeps only what it adds up to; comparing two
runs step by step, or drawing a run's passes, needs the records themselves. ``read_runs``
reads the runs of one log file in order: each run's header fields, its transitions, its
notes and its footer. It checks nothing beyond decoding each line: a line that does not
decode, a seal, or a record of a run not asked for is passed over. Whether a run
verifies is the audit's to say (``FileAudit``): read a run here once it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import attrs

from fsm_learner.audit.codec import Footer, Header, Note, RecordError, Transition, decode
from fsm_learner.audit.files import Overlong, Unreadable, open_log, read_chunks
from fsm_learner.machine import State, Trigger

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator
    from pathlib import Path

__all__ = ["PassSpan", "RunLog", "Step", "passes", "read_runs"]


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


@attrs.define
class RunLog:
    """The records of one run of a log file, in the order they were written."""

    run_id: str
    header: dict[str, Any] = attrs.Factory(dict)
    """The header's fields (besides the envelope); empty when the run has no header."""
    start_ns: int | None = None
    """The header's time: when the run started (monotonic ns, as the transitions' times)."""
    steps: list[Step] = attrs.Factory(list)
    notes: list[Note] = attrs.Factory(list)
    footer: Footer | None = None


def read_runs(path: Path, wanted: Collection[str] | None = None) -> dict[str, RunLog]:
    """Read the runs of the log ``path`` (only those in ``wanted``, if given), in file order.

    Raises OSError when the file cannot be opened or read.
    """
    runs: dict[str, RunLog] = {}
    with open_log(path) as fh:
        for chunk in read_chunks(fh):
            if isinstance(chunk, Unreadable):
                raise OSError(chunk.reason)
            if isinstance(chunk, Overlong):
                continue
            for line in chunk.splitlines():
                _take(runs, line, wanted)
    return runs


def _take(runs: dict[str, RunLog], line: bytes, wanted: Collection[str] | None) -> None:
    try:
        record = decode(line)
    except RecordError:
        return
    if wanted is not None and record.run not in wanted:
        return
    run = runs.get(record.run)
    if run is None:
        run = runs[record.run] = RunLog(record.run)
    match record:
        case Transition():
            run.steps.append(_step(record))
        case Note():
            run.notes.append(record)
        case Header():
            run.header, run.start_ns = record.fields, record.t_ns
        case Footer():
            run.footer = record
        case _:  # a seal
            pass


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
