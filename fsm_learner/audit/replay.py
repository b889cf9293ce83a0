"""Replaying audit logs: verify each run's sealed blocks against the table, and summarise it.

A log (schema 2, ``fsm_learner.audit.codec``) is a file of blocks: whole record lines
and one seal line, ``h = SealChain(key).digest(run's previous seal, file's previous seal,
the block's exact bytes)``. Several writers may share a file, so blocks of different runs
interleave; a block is the lines after the previous seal (of any run), up to its own, and
the file's previous seal is the last seal line before it, whatever its run and whether
that run verifies: what the writer found there. A seal line must be in the writer's exact
bytes (``decode`` refuses any other), since no hash covers it. ``FileAudit``
streams a file in chunks and yields one ``RunReport`` per run as soon as the run is
done: its footer sealed, or a problem found (the rest of it is then skipped). Runs
still open at the end of the file are reported as truncated.

A run verifies when each of its blocks holds only its records and matches its seal
(same run, same line count, same digest: a block of any run removed, moved or inserted
breaks the seal of the block after it), every transition is a route of the table for the
run's kind (``machine.table_routes`` per mode; the header's ``kind``, a fit when absent)
leaving the state the one before entered, time never goes backwards, the header opens the
run's first block, names this table and a kind of run and binds to the file (``prev``:
the last seal before it), and the footer ends the run, agreeing with the replay (records,
counts, machine idle, a status its last transition gives: ``end_fit``, or a validate or
predict run's ``end_epoch``, completed, ``cancel_*`` cancelled, ``fail`` failed; hook time
that fits). A run that profiled its hooks (``Learner(profile_hooks=True)``) has
``hook_times`` notes: each row must be well formed and name a callback as the header's
``cbs`` does (class name at that index), no (callback, column) twice in a note, each pair's
calls at most what the replay counted since the last note of what runs it (a hook: its
transitions, one per cancel or failure, one more; an override: its batches), the hook
rows' time must fit in the footer's hook time and all rows' time in the run's time so far;
the report adds them up per (callback, hook or override).
A line that is no record, or a record of another run, cuts the block it is in: that
block was never sealed. ``RunSet`` checks the runs taken together: no (run id, rank) twice, each
expected chain head ending exactly one run (a run's head is its last seal).

Speed: a block is hashed in one call per chunk, and its transition lines are read in
bulk (``codec.TransitionReader``); the checks run on whole chunks in C: route bytes
translated to their source and destination states and compared shifted by one line,
time spans by ``map``, sums per route by ``compress``. Anything unusual is replayed
record by record (``decode``), which says what is wrong and where; both ways agree.

A log is hostile input: memory is bounded (chunks of whole lines, lines of at most
``MAX_LINE_BYTES`` never held beyond, at most ``MAX_OPEN_RUNS`` runs open at once, what a
report keeps of a header or a failure bounded, at most ``MAX_HOOK_TIMES_KEPT`` (callback,
hook) pairs added up per run), every reason is one printable line, and
received values are described briefly (``fsm_learner._display.shown``).
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections import Counter
from functools import cache
from itertools import compress
from operator import sub
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

from fsm_learner._compat import StrEnum
from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.codec import (
    MAX_LINE_BYTES,
    SEAL_START,
    Field,
    Footer,
    Header,
    Note,
    Record,
    RecordError,
    RecordKind,
    RouteKey,
    RunStatus,
    Seal,
    SealChain,
    Transition,
    TransitionReader,
    Transitions,
    decode,
    route_keys,
)
from fsm_learner.audit.files import (
    NotRegularError,
    Overlong,
    Unreadable,
    log_files,
    open_log,
    read_chunks,
)
from fsm_learner.callback import Override
from fsm_learner.machine import (
    HOOK_OF,
    TIMING_OF,
    TRANSITION_TABLE,
    Hook,
    HookTiming,
    RunKind,
    State,
    Trigger,
    cleanup_hooks,
    table_digest,
    table_routes,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from pathlib import Path

__all__ = [
    "HOOK_TIMES",
    "MAX_DEPTH",
    "MAX_HOOK_TIMES_KEPT",
    "MAX_OPEN_RUNS",
    "FileAudit",
    "Problem",
    "RunReport",
    "RunSet",
    "SlowTransition",
    "Work",
    "audit_file",
    "log_files",  # lives in fsm_learner.audit.files; re-exported where it always was
    "sorted_hook_times",
]

SLOWEST_KEPT: Final = 5
MAX_DEPTH: Final = 32
"""How deep a header or failure value may nest; a deeper one is kept as a short note."""
MAX_OPEN_RUNS: Final = 64
"""Runs a file may have open at once (begun, footer not sealed); beyond, the one silent
longest is reported early, as truncated."""
_KEPT_FIELD_BYTES: Final = 4096
"""A header or failure field longer than this as JSON is kept as a short note."""
_KEPT_FIELDS: Final = 256
_ENDED_KEPT: Final = 1 << 16
"""Ended runs a file remembers (a salted 64-bit digest each), to name records after an end."""
HOOK_TIMES: Final = "hook_times"
"""The note of a run that profiles its hooks: calls and time per (callback, hook)."""
MAX_HOOK_TIMES_KEPT: Final = 4096
"""Distinct (callback, hook) pairs a report adds up; the rows of any more are counted only."""
_HOOK_TIMES_ROWS: Final = 1024
"""Rows of one hook_times note at most (the learner writes more in further notes)."""
_KEPT_NAME: Final = 120
"""A callback's class name longer than this is kept cut (the report shows it)."""


class Work(StrEnum):
    """Where a run's time went, named by the work done (the states of a pass, by its kind)."""

    DATA = "data"
    """Training, in ``epoch``: waiting for the next batch."""
    FORWARD = "forward"
    """Training, or a predict run, in ``batch``: the forward pass."""
    LOSS = "loss"
    """Training, in ``predict``: the loss."""
    BACKWARD = "backward"
    """Training, in ``loss``: the backward pass."""
    STEP = "step"
    """Training, in ``backward``: the optimizer step."""
    VALIDATION = "validation"
    """Every state of a validation pass (a fit's, or a validate run's); the states of a
    predict run's pass but its forward."""
    HOOKS = "hooks"
    """The callbacks' hooks, wherever they ran (the footer's ``hook_ns``)."""
    LOOP = "loop"
    """Everything else: idle, fit and step states, setting passes up, writing the log."""


_TRAINING_WORK: Final = {
    State.EPOCH: Work.DATA,
    State.BATCH: Work.FORWARD,
    State.PREDICT: Work.LOSS,
    State.LOSS: Work.BACKWARD,
    State.BACKWARD: Work.STEP,
}
_VALIDATION_STATES: Final = frozenset({State.EPOCH, State.BATCH, State.PREDICT, State.LOSS})


def _work_of(state: State, *, training: bool, kind: RunKind) -> Work:
    """Name the work of time spent in ``state`` during a pass of a run of that kind."""
    if training:
        return _TRAINING_WORK.get(state, Work.LOOP)
    if kind is RunKind.PREDICT and state is State.BATCH:
        return Work.FORWARD
    return Work.VALIDATION if state in _VALIDATION_STATES else Work.LOOP


_STATES: Final = tuple(State)
_STATE_INDEX: Final = {state.value: index for index, state in enumerate(_STATES)}
_IDLE: Final = _STATE_INDEX[State.IDLE.value]
_FAIL: Final = Trigger.FAIL.value
_TRIGGER_ORDER: Final = {trigger.value: index for index, trigger in enumerate(Trigger)}


def _line_start(kind: RecordKind) -> bytes:
    """How a line of that kind begins when the writer writes it."""
    return orjson.dumps({Field.EVENT.value: kind.value})[:-1] + b","


_HEADER_START: Final = _line_start(RecordKind.RUN_START)
_NOTE_START: Final = _line_start(RecordKind.NOTE)
_FOOTER_START: Final = _line_start(RecordKind.RUN_END)
_SEAL_AFTER_LINE: Final = b"\n" + SEAL_START


@attrs.frozen
class _Tables:
    """The table's routes as the replay reads them: per route index, in bulk-friendly forms.

    The routes are those of every kind of run (``route_keys``); ``kinds`` says which of
    them a run of each kind may take.
    """

    keys: tuple[RouteKey, ...]
    source: bytes
    """A ``bytes.translate`` table: route index -> index of its source state."""
    dest: bytes
    masks: tuple[bytes, ...]
    """Per route, a ``bytes.translate`` table: 1 for that route, 0 for any other."""
    not_fails: bytes
    """Every byte but the routes of ``fail``: ``translate(None, not_fails)`` keeps those."""
    by_key: dict[RouteKey, int]
    kinds: Mapping[RunKind, _KindTables]


@attrs.frozen
class _KindTables:
    """The routes a run of one kind may take, and what its time in each state is spent on."""

    legal: bytes
    """The indices of its routes: ``routes.translate(None, legal)`` leaves the illegal ones."""
    allowed: frozenset[int]
    work: tuple[Work, ...]
    """Per route index: the work of the time a record of the route ends (in its source)."""
    by_trigger: dict[tuple[str, bool], tuple[int, ...]]
    """Its routes of each trigger, in a training pass or not."""
    ends: Mapping[str, RunStatus]
    """The triggers its runs end with (their last transition), and the status each gives."""
    fires: tuple[tuple[str, ...], ...]
    """Per route index: the hooks its transition runs (its own, its cleanups) and, for
    ``begin_batch``, the overrides its batch may run: what ``hook_times`` rows may count."""
    aborts: frozenset[int]
    """Its cancel and fail routes: each follows at most one hook call cut short per pair."""


_CANCEL_TRIGGERS: Final = frozenset(spec.trigger.value for spec in TRANSITION_TABLE if spec.cancel)


def _kind_tables(kind: RunKind, keys: tuple[RouteKey, ...]) -> _KindTables:
    """Read off the routes of ``kind``'s modes which of ``keys`` its runs may take."""
    routes = table_routes()
    allowed = [
        index
        for index, (trigger, source, dest, training) in enumerate(keys)
        if (kind, training) in routes
        and routes[kind, training][State(source)].get(Trigger(trigger)) == dest
    ]
    by_trigger: dict[tuple[str, bool], list[int]] = {}
    for index in allowed:
        trigger, _, _, training = keys[index]
        by_trigger.setdefault((trigger, training), []).append(index)
    ends = {
        keys[index][0]: _status_given(keys[index][0])
        for index in sorted(allowed, key=lambda index: _TRIGGER_ORDER[keys[index][0]])
        if keys[index][2] == State.IDLE.value
        and (keys[index][1] != State.IDLE.value or keys[index][0] == _FAIL)
    }
    return _KindTables(
        legal=bytes(allowed),
        allowed=frozenset(allowed),
        work=tuple(
            _work_of(State(source), training=training, kind=kind) for _, source, _, training in keys
        ),
        by_trigger={key: tuple(found) for key, found in by_trigger.items()},
        ends=MappingProxyType(ends),
        fires=tuple(_fired(kind, key) for key in keys),
        aborts=frozenset(
            index
            for index in allowed
            if keys[index][0] in _CANCEL_TRIGGERS or keys[index][0] == _FAIL
        ),
    )


def _fired(kind: RunKind, key: RouteKey) -> tuple[str, ...]:
    """Return what a transition by ``key`` runs in a run of ``kind``: hooks, then overrides."""
    trigger, source, dest, training = key
    hooks = (HOOK_OF[Trigger(trigger)], *cleanup_hooks(State(source), State(dest), kind))
    work: list[Override] = []
    if trigger == Trigger.BEGIN_BATCH.value:
        work.append(Override.PREDICT)
        if kind is not RunKind.PREDICT:
            work.append(Override.COMPUTE_LOSS)
        if training:
            work += (Override.BACKWARD, Override.STEP)
    return tuple(column.value for column in (*hooks, *work))


def _status_given(trigger: str) -> RunStatus:
    """Return the status of a run whose last transition (to idle) is ``trigger``."""
    if trigger == _FAIL:
        return RunStatus.FAILED
    if trigger == Trigger.PREEMPT.value:
        return RunStatus.PREEMPTED
    return RunStatus.CANCELLED if trigger in _CANCEL_TRIGGERS else RunStatus.COMPLETED


@cache
def _tables() -> _Tables:
    keys = route_keys()

    def states(column: int) -> bytes:
        found = [_STATE_INDEX[str(key[column])] for key in keys]
        return bytes(found + [255] * (256 - len(found)))

    return _Tables(
        keys=keys,
        source=states(1),
        dest=states(2),
        masks=tuple(bytes(int(i == index) for i in range(256)) for index in range(len(keys))),
        not_fails=bytes(i for i in range(256) if i >= len(keys) or keys[i][0] != _FAIL),
        by_key={key: index for index, key in enumerate(keys)},
        kinds=MappingProxyType({kind: _kind_tables(kind, keys) for kind in RunKind}),
    )


_KINDS: Final = frozenset(kind.value for kind in RunKind)


def _run_kind(header: Mapping[str, Any]) -> RunKind | None:
    """Return the kind of run a header begins (absent: a fit); None for an unknown kind."""
    kind = header.get(Field.KIND.value, RunKind.FIT.value)
    return RunKind(kind) if type(kind) is str and kind in _KINDS else None


# -- reports -----------------------------------------------------------------------------


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
    index: int
    """The record's place in its run (the header is 0)."""
    line: int
    trigger: str
    source: str
    dest: str
    epoch: int
    iter: int
    training: bool


_CANCELS: Final = (Trigger.CANCEL_BATCH, Trigger.CANCEL_EPOCH, Trigger.CANCEL_FIT)


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
    time_by_work_ns: dict[Work, int] = attrs.Factory(lambda: dict.fromkeys(Work, 0))
    """The run's wall time by the work done (adds up to ``wall_ns``)."""
    wall_ns: int = 0
    slowest: list[SlowTransition] = attrs.Factory(list)
    failure: dict[str, Any] | None = None
    failed_at: dict[str, Any] | None = None
    head: str = ""
    """The digest of the run's last verified seal: its chain head."""
    head_line: int = 0
    """The line of that seal."""
    last_state: str = State.IDLE.value
    unsealed: int = 0
    """Lines of the run after its last seal, never sealed (a killed run)."""
    hook_times: dict[tuple[str, int, str], tuple[int, int]] = attrs.Factory(dict)
    """Its ``hook_times`` notes added up: (callback, index in cbs, hook) -> (calls, ns)."""
    hook_times_left_out: int = 0
    """Rows of hook_times notes beyond ``MAX_HOOK_TIMES_KEPT`` distinct pairs: not added up."""

    @property
    def verified(self) -> bool:
        """True when the whole run checked out, footer included."""
        return self.problem is None and self.status is not RunStatus.TRUNCATED

    @property
    def kind(self) -> RunKind | None:
        """What the run did, as its header says (absent: a fit); None for an unknown kind."""
        return _run_kind(self.header)

    @property
    def keyed(self) -> bool | None:
        """Whether the run's chain is keyed, as its header says (None: no header read)."""
        keyed = self.header.get(Field.KEYED.value)
        return keyed if isinstance(keyed, bool) else None

    @property
    def epochs(self) -> int:
        """Training passes begun (one per epoch of a fit; none in other runs)."""
        return self.counts[Trigger.BEGIN_EPOCH.value, True]

    @property
    def batches(self) -> tuple[int, int]:
        """Completed batches: (training, validation); a validate or predict run's are the latter."""
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
            "kind": None if self.kind is None else self.kind.value,
            "status": self.status.value,
            "verified": self.verified,
            "keyed": self.keyed,
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
            "time_by_work_ns": {work.value: ns for work, ns in self.time_by_work_ns.items()},
            "time_in_state_ns": dict(self.time_in_state_ns),
            "slowest": [attrs.asdict(s) for s in self.slowest],
            "head": self.head,
            "unsealed": self.unsealed,
            "hook_times": [
                {"callback": name, "index": index, "hook": hook, "calls": calls, "ns": ns}
                for (name, index, hook), (calls, ns) in sorted_hook_times(self.hook_times)
            ],
            "hook_times_left_out": self.hook_times_left_out,
            "header": self.header,
        }


def sorted_hook_times(
    times: Mapping[tuple[str, int, str], tuple[int, int]],
) -> list[tuple[tuple[str, int, str], tuple[int, int]]]:
    """Return a report's hook times, the longest first (ties: by callback index, then column)."""
    order = {column.value: index for index, column in enumerate((*Hook, *Override))}
    return sorted(times.items(), key=lambda item: (-item[1][1], item[0][1], order[item[0][2]]))


# -- what a run's records add up to --------------------------------------------------------

_Slow = tuple[int, int, int, int, int, int]
"""A kept transition: (time before it, minus its index, line, route, epoch, batch index)."""


class _Invalid(Exception):  # noqa: N818 (private signal, never escapes this module)
    """A record that does not verify: its line and the reason."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = line, reason


@attrs.define
class _Tally:
    """What a run's records add up to so far; each block works on a copy, kept once sealed."""

    records: int = 0
    transitions: int = 0
    notes: int = 0
    kind: RunKind = RunKind.FIT
    """What the run does, as its header says: the routes it may take."""
    state: int = _IDLE
    training: bool = False
    start_ns: int = 0
    t_ns: int = 0
    """When the current interval began: the last transition (or the header)."""
    last_ns: int = 0
    """The time of the last record of any kind."""
    routes: Counter[int] = attrs.Factory(Counter)
    route_ns: Counter[int] = attrs.Factory(Counter)
    """Per route: the time spent before its records (in its source state)."""
    slow: list[_Slow] = attrs.Factory(list)
    failed_at: tuple[int, int, int] | None = None
    last_route: int = -1
    """The route of the last transition (-1: none yet): how the run ended."""
    footer: Footer | None = None
    callbacks: tuple[str, ...] | None = None
    """The class names of the header's ``cbs`` (None: it lists none), for hook_times notes."""
    hook_times: dict[tuple[int, str], tuple[int, int]] = attrs.Factory(dict)
    """The hook_times notes added up: (callback index, hook) -> (calls, ns); copied on write."""
    hook_times_own: bool = True
    """Whether ``hook_times`` is this tally's own (a block's copy shares it until it adds)."""
    hook_times_ns: int = 0
    """The time of every hook row (left out or not; no override row): at most the footer's
    hook_ns."""
    profiled_ns: int = 0
    """The time of every hook_times row, overrides' too: at most the run's time so far."""
    noted_routes: Counter[int] = attrs.Factory(Counter)
    """``routes`` at the last hook_times note (replaced, never changed in place)."""
    noted_at: int = -1
    """``transitions`` at the last hook_times note (-1: none yet)."""
    window_start: Counter[int] = attrs.Factory(Counter)
    """``routes`` when the notes' current window began: the hook calls of the notes since
    are of the transitions since (replaced, never changed in place)."""
    window_calls: dict[tuple[int, str], int] = attrs.Factory(dict)
    """The calls the notes of the current window give each (callback index, column)."""
    hook_times_left_out: int = 0

    def copy(self) -> _Tally:
        return attrs.evolve(
            self,
            routes=self.routes.copy(),
            route_ns=self.route_ns.copy(),
            slow=list(self.slow),
            hook_times_own=False,
            window_calls=dict(self.window_calls),
        )


def _keep(slow: list[_Slow], entry: _Slow) -> None:
    if len(slow) < SLOWEST_KEPT:
        heapq.heappush(slow, entry)
    elif entry > slow[0]:
        heapq.heapreplace(slow, entry)


def _state_name(index: int) -> str:
    return _STATES[index].value


def _before(tally: _Tally, t_ns: int, line: int) -> None:
    """Check what every record of a run must: the run goes on, and time goes forward."""
    if tally.footer is not None:
        raise _Invalid(line, "a record after the run's run_end")
    if t_ns < tally.last_ns:
        raise _Invalid(line, f"time goes backwards ({t_ns} ns after {tally.last_ns} ns)")


def _step(tally: _Tally, route: int, numbers: list[int], at: int, line: int) -> None:
    """Replay one transition record (route and ``numbers[at:at + 3]``), or raise _Invalid."""
    tables = _tables()
    trigger, source, dest, training = tables.keys[route]
    epoch, it, t_ns = numbers[at : at + 3]
    _before(tally, t_ns, line)
    if tables.source[route] != tally.state:
        state = _state_name(tally.state)
        raise _Invalid(line, f"{trigger} from {source!r}, but the replayed state is {state!r}")
    if route not in tables.kinds[tally.kind].allowed:
        raise _Invalid(line, _illegal(tally.kind, trigger, source, dest, training=training))
    span = t_ns - tally.t_ns
    tally.routes[route] += 1
    tally.route_ns[route] += span
    _keep(tally.slow, (span, -tally.records, line, route, epoch, it))
    if trigger == _FAIL:
        tally.failed_at = (route, epoch, it)
    tally.state, tally.training = tables.dest[route], training
    tally.last_route = route
    tally.t_ns = tally.last_ns = t_ns
    tally.records += 1
    tally.transitions += 1


def _replay_batch(tally: _Tally, batch: Transitions, line: int) -> None:
    """Replay consecutive transition lines: in bulk when all is well, else one by one."""
    if batch.routes and not _bulk(tally, batch, line):
        for i, route in enumerate(batch.routes):
            _step(tally, route, batch.numbers, 3 * i, line + i)


def _bulk(tally: _Tally, batch: Transitions, line: int) -> bool:
    """Replay a batch in bulk; False, with nothing changed, when a record does not check out.

    The same as ``_step`` record after record (a test checks it): legality is no route
    left once the run kind's are deleted, state continuity the sources shifted by one
    against the destinations, time the spans' minimum.
    """
    tables = _tables()
    routes, numbers = batch.routes, batch.numbers
    times = numbers[2::3]
    sources, dests = routes.translate(tables.source), routes.translate(tables.dest)
    if (
        tally.footer is not None
        or routes.translate(None, tables.kinds[tally.kind].legal)
        or sources[0] != tally.state
        or sources[1:] != dests[:-1]
        or times[0] < tally.last_ns
    ):
        return False
    starts = [tally.t_ns]
    starts += times[:-1]
    spans = list(map(sub, times, starts))
    if min(spans) < 0:
        return False
    _add_spans(tally, routes, spans)
    _keep_slowest(tally, batch, spans, line)
    fails = routes.translate(None, tables.not_fails)
    if fails:
        at = max(routes.rfind(route) for route in set(fails))
        tally.failed_at = (routes[at], numbers[3 * at], numbers[3 * at + 1])
    tally.state, tally.training = dests[-1], tables.keys[routes[-1]][3]
    tally.last_route = routes[-1]
    tally.t_ns = tally.last_ns = times[-1]
    tally.records += len(routes)
    tally.transitions += len(routes)
    return True


_LONGEST_PERIOD: Final = 16


def _add_spans(tally: _Tally, routes: bytes, spans: list[int]) -> None:
    """Count each route and add up the time before its records.

    A pass of batches repeats the same routes: when the whole batch does, each route's
    records are one slice of the spans; otherwise one mask per route picks them.
    """
    n = len(routes)
    period = routes.find(routes[:1], 1)
    if 0 < period <= _LONGEST_PERIOD and routes[period:] == routes[:-period]:
        for phase in range(min(period, n)):
            route = routes[phase]
            tally.routes[route] += len(range(phase, n, period))
            tally.route_ns[route] += sum(spans[phase::period])
        return
    masks = _tables().masks
    for route in set(routes):
        tally.routes[route] += routes.count(route)
        tally.route_ns[route] += sum(compress(spans, routes.translate(masks[route])))


def _keep_slowest(tally: _Tally, batch: Transitions, spans: list[int], line: int) -> None:
    """Keep the batch's slowest transitions among the run's: only those above the floor."""
    slow = tally.slow
    floor = slow[0][0] if len(slow) >= SLOWEST_KEPT else -1
    if max(spans) <= floor:
        return
    routes, numbers, index = batch.routes, batch.numbers, tally.records
    for span in sorted(set(filter(floor.__lt__, spans)), reverse=True)[:SLOWEST_KEPT]:
        at = -1
        for _ in range(SLOWEST_KEPT):  # ties: the earliest records first
            try:
                at = spans.index(span, at + 1)
            except ValueError:
                break
            entry = (
                span,
                -(index + at),
                line + at,
                routes[at],
                numbers[3 * at],
                numbers[3 * at + 1],
            )
            _keep(slow, entry)


def _replay_header(tally: _Tally, header: Header, line: int, first_line: int) -> None:
    if tally.records or line != first_line:
        raise _Invalid(
            line,
            f"a run_start of run {shown(header.run)} that is not the first line of its run's "
            "first block",
        )
    tally.records = 1
    tally.kind = _run_kind(header.fields) or RunKind.FIT  # an unknown kind fails the header
    tally.start_ns = tally.t_ns = tally.last_ns = header.t_ns
    tally.callbacks = _callback_names(header.fields.get(Field.CALLBACKS.value))


def _callback_names(cbs: object) -> tuple[str, ...] | None:
    """Return the class names a header's ``cbs`` lists ([name, order] each); None if not that."""
    if type(cbs) is not list:
        return None
    names = tuple(cb[0] for cb in cbs if type(cb) is list and cb and type(cb[0]) is str)
    return names if len(names) == len(cbs) else None


def _replay_note(tally: _Tally, note: Note, line: int) -> None:
    _before(tally, note.t_ns, line)
    if note.name == HOOK_TIMES:
        rows = _hook_time_rows(note.fields, tally.callbacks, line)
        _add_hook_times(tally, rows, note.t_ns, line)
    tally.notes += 1
    tally.records += 1
    tally.last_ns = note.t_ns


_HookRow = tuple[int, str, int, int]
"""A hook_times row as the replay keeps it: callback index, hook, calls, ns."""
_HOOKS: Final = frozenset(hook.value for hook in Hook)
_OVERRIDES: Final = frozenset(override.value for override in Override)
_COLUMNS: Final = _HOOKS | _OVERRIDES
_ROW_SHAPE: Final = "[callback class name, index in cbs, hook or override, calls >= 1, ns >= 0]"
_ROW_LENGTH: Final = 5


def _hook_time_rows(
    fields: Mapping[str, Any], callbacks: tuple[str, ...] | None, line: int
) -> list[_HookRow]:
    """Check a hook_times note's fields; return its rows, or raise _Invalid saying what is wrong."""
    rows = fields.get("hooks")
    if set(fields) != {"hooks"} or type(rows) is not list:
        what = f"fields {shown(sorted(fields))}" if set(fields) != {"hooks"} else shown(rows)
        msg = f"a hook_times note holds {what}: it holds exactly 'hooks', a list of rows"
        raise _Invalid(line, msg)
    if not 1 <= len(rows) <= _HOOK_TIMES_ROWS:
        msg = f"a hook_times note of {len(rows):,} rows: it has 1 to {_HOOK_TIMES_ROWS:,}"
        raise _Invalid(line, msg)
    if callbacks is None:
        msg = "a hook_times note in a run whose header lists no callbacks (cbs) to name"
        raise _Invalid(line, msg)
    kept: list[_HookRow] = []
    seen: set[tuple[int, str]] = set()
    for number, row in enumerate(rows):
        reason = _hook_row_problem(row, callbacks)
        if reason is None and (row[1], row[2]) in seen:
            reason = f"{row[2]} of callback {row[1]} a second time in the note"
        if reason is not None:
            raise _Invalid(line, f"hook_times note, row {number}: {reason}")
        seen.add((row[1], row[2]))
        kept.append((row[1], row[2], row[3], row[4]))
    return kept


def _hook_row_problem(row: object, callbacks: tuple[str, ...]) -> str | None:
    """Say what is wrong with one hook_times row; None when it is right."""
    if not (
        type(row) is list
        and len(row) == _ROW_LENGTH
        and type(row[0]) is str
        and all(type(value) is int and value >= 0 for value in (row[1], row[3], row[4]))
        and type(row[2]) is str
        and row[2] in _COLUMNS
        and row[3] >= 1
    ):
        return f"{shown(row)} is no {_ROW_SHAPE}"
    name, index = row[0], row[1]
    if index >= len(callbacks):
        return f"callback index {index}, but the header lists {len(callbacks)} callback(s)"
    if name != callbacks[index]:
        header = shown(callbacks[index])
        return f"callback {index} is named {shown(name)}, but the header's cbs[{index}] is {header}"
    return None


def _add_hook_times(tally: _Tally, rows: list[_HookRow], t_ns: int, line: int) -> None:
    """Add a note's rows to the run's, checking they could have happened by the note's time.

    Each pair's calls in the notes of the current window are at most what the replay
    counted in it of what runs it (``_call_bounds``); all the rows' time, added up, at
    most the run's time so far. Beyond ``MAX_HOOK_TIMES_KEPT`` pairs, a row is checked
    alone, and counted only.
    """
    if not tally.hook_times_own:
        tally.hook_times, tally.hook_times_own = dict(tally.hook_times), True
    times, window = tally.hook_times, _window_calls(tally)
    bounds = _call_bounds(tally)
    for number, (index, column, calls, ns) in enumerate(rows):
        pair = (index, column)
        seen = window.get(pair, 0) + calls
        if seen > bounds[column]:
            raise _Invalid(line, _too_many_calls(number, index, column, seen, bounds[column]))
        if pair in window or len(window) < MAX_HOOK_TIMES_KEPT:
            window[pair] = seen
        tally.profiled_ns += ns
        if column in _HOOKS:
            tally.hook_times_ns += ns
        before = times.get(pair)
        if before is not None:
            times[pair] = (before[0] + calls, before[1] + ns)
        elif len(times) < MAX_HOOK_TIMES_KEPT:
            times[pair] = (calls, ns)
        else:
            tally.hook_times_left_out += 1
    elapsed = t_ns - tally.start_ns
    if tally.profiled_ns > elapsed:
        msg = (
            f"the hook_times notes so far give callbacks {tally.profiled_ns:,} ns, but only "
            f"{elapsed:,} ns of the run have passed by this note"
        )
        raise _Invalid(line, msg)


def _window_calls(tally: _Tally) -> dict[tuple[int, str], int]:
    """Return the calls of the notes' current window, starting a new one after transitions.

    The learner notes what ran since its last note; a note it splits is several notes in
    a row. So a window is the transitions since the hook_times note before them, and the
    notes after them, up to the next transition.
    """
    if tally.transitions != tally.noted_at:
        tally.window_start, tally.window_calls = tally.noted_routes, {}
        tally.noted_routes, tally.noted_at = tally.routes.copy(), tally.transitions
    return tally.window_calls


def _call_bounds(tally: _Tally) -> Counter[str]:
    """Return how many calls each hook or override may have had in the window, per callback.

    A hook: the window's transitions that run it, plus one per cancel or failure in it
    (a before-change hook cut short: its transition never came), plus one (a failure whose
    record is still to come). An override: the window's batches that run it, once each.
    """
    tables = _tables().kinds[tally.kind]
    bounds: Counter[str] = Counter()
    aborts = 1
    for route, n in (tally.routes - tally.window_start).items():
        for column in tables.fires[route]:
            bounds[column] += n
        if route in tables.aborts:
            aborts += n
    for hook in _HOOKS:
        bounds[hook] += aborts
    return bounds


def _too_many_calls(number: int, index: int, column: str, calls: int, bound: int) -> str:
    what = (
        "batch(es) that run it" if column in _OVERRIDES else "call(s) the run's transitions allow"
    )
    return (
        f"hook_times note, row {number}: {column} of callback {index} with {calls:,} call(s) "
        f"since the last note, but the replay counts at most {bound:,} {what} since"
    )


def _replay_odd(tally: _Tally, record: Transition, line: int) -> None:
    """Refuse a transition that is no route of the table, saying what the table allows."""
    _before(tally, record.t_ns, line)
    state = _state_name(tally.state)
    if record.source != state:
        msg = f"{record.trigger} from {record.source!r}, but the replayed state is {state!r}"
        raise _Invalid(line, msg)
    reason = _illegal(
        tally.kind, record.trigger, record.source, record.dest, training=record.training
    )
    raise _Invalid(line, reason)


def _illegal(kind: RunKind, trigger: str, source: str, dest: str, *, training: bool) -> str:
    """Say why a transition is no route of a run of ``kind``, and what the table allows."""
    taken = f"illegal transition {trigger}: {source} -> {dest} in a {kind} run"
    routes = table_routes().get((kind, training))
    if routes is None:
        return f"{taken} (training={training}): a {kind} run has no training pass"
    allowed = ", ".join(f"{t} -> {d}" for t, d in routes[State(source)].items())
    return f"{taken} (training={training}); from {source} it may take {allowed or 'nothing'}"


def _replay_footer(tally: _Tally, footer: Footer, line: int) -> None:
    _before(tally, footer.t_ns, line)
    if footer.records != tally.records:
        msg = f"run_end says {footer.records} records, replayed {tally.records}"
        raise _Invalid(line, msg)
    replayed = _trigger_counts(tally.routes)
    if footer.counts != replayed:
        raise _Invalid(
            line, f"run_end counts {shown(footer.counts)} differ from the replayed {replayed}"
        )
    if tally.state != _IDLE:
        state = _state_name(tally.state)
        raise _Invalid(line, f"run_end while the replayed machine is in {state!r}, not idle")
    _check_status(tally, footer.status, line)
    _hook_work(footer, tally, _work_before_hooks(tally, footer.t_ns), line)
    _check_hook_times(tally, footer, line)
    tally.footer = footer
    tally.records += 1
    tally.last_ns = footer.t_ns


def _check_status(tally: _Tally, status: RunStatus, line: int) -> None:
    """Check the footer's status against the replay: the run's last transition says it.

    The transitions that end a run are its kind's routes back to idle (``fail`` from idle
    too: a run failing before its first transition): a fit completes with ``end_fit``, a
    validate or predict run with ``end_epoch``; ``cancel_*`` cancel it, ``fail`` fails it.
    """
    tables = _tables()
    ends = tables.kinds[tally.kind].ends
    last = tables.keys[tally.last_route][0] if tally.last_route >= 0 else None
    if last is None or ends.get(last) is not status:
        expected = " or ".join(trigger for trigger, given in ends.items() if given is status)
        ended = f"its last transition is {last}" if last else "it has no transition"
        raise _Invalid(
            line,
            f"run_end says {status.value}, but {ended}: a {status.value} {tally.kind} run ends "
            f"with {expected}",
        )


def _check_hook_times(tally: _Tally, footer: Footer, line: int) -> None:
    """Each profiled hook call is timed inside the footer's hook time: the hook rows fit in it.

    The overrides' rows do not count: the footer's hook time has no override in it.
    """
    hooks_ns = sum(sum(pair) for pair in footer.hook_ns.values())
    if tally.hook_times_ns > hooks_ns:
        raise _Invalid(
            line,
            f"the hook_times notes give {tally.hook_times_ns:,} ns to callbacks' hooks, but "
            f"run_end hook_ns counts only {hooks_ns:,} ns of hooks",
        )


def _trigger_counts(routes: Counter[int]) -> dict[str, list[int]]:
    """Count the transitions taken per trigger, [training, validation], as a footer does."""
    counts: dict[str, list[int]] = {}
    keys = _tables().keys
    for route, n in routes.items():
        trigger, _, _, training = keys[route]
        counts.setdefault(trigger, [0, 0])[0 if training else 1] += n
    return counts


def _work_before_hooks(tally: _Tally, end_ns: int | None) -> Counter[Work]:
    """Add up the run's time by work, hooks still in it; the last interval up to ``end_ns``."""
    work: Counter[Work] = Counter()
    kinds = _tables().kinds[tally.kind].work
    for route, ns in tally.route_ns.items():
        work[kinds[route]] += ns
    if end_ns is not None:
        state = _STATES[tally.state]
        work[_work_of(state, training=tally.training, kind=tally.kind)] += end_ns - tally.t_ns
    return work


def _hook_work(footer: Footer, tally: _Tally, spent: Counter[Work], line: int) -> Counter[Work]:
    """Place the footer's hook time in the work where the hooks ran; raise if it does not fit.

    A trigger's hook time goes to the work of the state its hooks ran in. One whose own
    hooks run before its change and whose cleanup hooks after it (``end_batch``:
    ``after_batch`` in ``step``, ``cleanup_batch`` in ``epoch``) ran hooks in two states,
    which the footer does not tell apart: its time fills the source's work first, then
    the destination's.
    """
    placed: Counter[Work] = Counter()
    shared: list[tuple[Work, Work, int]] = []
    for trigger, pair in sorted(footer.hook_ns.items(), key=lambda item: _TRIGGER_ORDER[item[0]]):
        for training, ns in zip((True, False), pair, strict=True):
            if ns:
                first, then = _where_hooks_ran(trigger, training, tally, line)
                if then is None or then is first:
                    placed[first] += ns
                else:
                    shared.append((first, then, ns))
    for work, ns in placed.items():
        _check_fits(work, ns, spent, line)
    for first, then, ns in shared:
        into_first = max(0, min(ns, spent[first] - placed[first]))
        placed[first] += into_first
        placed[then] += ns - into_first
        _check_fits(then, placed[then], spent, line)
    return placed


def _check_fits(work: Work, ns: int, spent: Counter[Work], line: int) -> None:
    if ns > spent[work]:
        raise _Invalid(
            line,
            f"run_end hook_ns gives {ns:,} ns to hooks during {work.value} time, but the "
            f"run spent only {spent[work]:,} ns there",
        )


def _where_hooks_ran(
    trigger: str, training: bool, tally: _Tally, line: int
) -> tuple[Work, Work | None]:
    """Where a trigger's hooks ran: its own, and its cleanups' when they ran elsewhere.

    Hooks of a before-change trigger run in its source, the others in its destination;
    cleanup hooks in the destination. A trigger with several sources (``end_batch``) is
    placed in the source the run took it from most often.
    """
    tables = _tables()
    kind = tally.kind
    routes = tables.kinds[kind].by_trigger.get((trigger, training))
    if not routes:
        pass_name = "training" if training else "validation"
        msg = (
            f"run_end hook_ns has hook time for {trigger} in {pass_name} in a {kind} run, "
            "where it cannot fire"
        )
        raise _Invalid(line, msg)
    _, source, dest, _ = tables.keys[max(routes, key=tally.routes.__getitem__)]
    after = _work_of(State(dest), training=training, kind=kind)
    if TIMING_OF[Trigger(trigger)] is HookTiming.AFTER_CHANGE:
        return after, None
    before = _work_of(State(source), training=training, kind=kind)
    return before, after if cleanup_hooks(State(source), State(dest), kind) else None


def _apply(tally: _Tally, item: object, line: int, first_line: int) -> None:
    """Replay one item of a block: a batch of transitions, or one other record."""
    if isinstance(item, Transitions):
        _replay_batch(tally, item, line)
    elif isinstance(item, Note):
        _replay_note(tally, item, line)
    elif isinstance(item, Footer):
        _replay_footer(tally, item, line)
    elif isinstance(item, Header):
        _replay_header(tally, item, line, first_line)
    elif isinstance(item, Transition):
        _replay_odd(tally, item, line)


# -- finished runs -------------------------------------------------------------------------


def _finish(report: RunReport, tally: _Tally) -> RunReport:
    """Fill in the report's summary from what the run's sealed blocks add up to."""
    keys = _tables().keys
    report.records, report.transitions, report.notes = tally.records, tally.transitions, tally.notes
    for route, n in tally.routes.items():
        trigger, source, dest, training = keys[route]
        report.counts[trigger, training] += n
        report.edges[trigger, source, dest] += n
        report.time_in_state_ns[source] += tally.route_ns[route]
    footer = tally.footer
    end_ns = tally.t_ns if footer is None else footer.t_ns
    if end_ns > tally.t_ns:
        report.time_in_state_ns[_state_name(tally.state)] += end_ns - tally.t_ns
    report.wall_ns = end_ns - tally.start_ns
    report.time_by_work_ns = _time_by_work(tally)
    report.last_state = _state_name(tally.state)
    report.slowest = [_slow_transition(entry) for entry in sorted(tally.slow, reverse=True)]
    if tally.failed_at is not None:
        route, epoch, it = tally.failed_at
        _, source, _, training = keys[route]
        report.failed_at = {"state": source, "epoch": epoch, "iter": it, "training": training}
    if footer is not None:
        report.status = footer.status
        report.failure = None if footer.failure is None else _bounded(footer.failure)
    _finish_hook_times(report, tally)
    return report


def _finish_hook_times(report: RunReport, tally: _Tally) -> None:
    """Name the run's hook times by callback (a long class name cut) in its report."""
    names = tally.callbacks or ()
    report.hook_times = {
        (_kept_name(names[index]), index, hook): times
        for (index, hook), times in tally.hook_times.items()
    }
    report.hook_times_left_out = tally.hook_times_left_out


def _kept_name(name: str) -> str:
    return name if len(name) <= _KEPT_NAME else name[: _KEPT_NAME - 3] + "..."


def _time_by_work(tally: _Tally) -> dict[Work, int]:
    footer = tally.footer
    work = _work_before_hooks(tally, None if footer is None else footer.t_ns)
    if footer is not None:  # checked when the footer was replayed: it fits
        for kind, ns in _hook_work(footer, tally, work.copy(), 0).items():
            work[kind] -= ns
            work[Work.HOOKS] += ns
    return {kind: work[kind] for kind in Work}


def _slow_transition(entry: _Slow) -> SlowTransition:
    span, index, line, route, epoch, it = entry
    trigger, source, dest, training = _tables().keys[route]
    return SlowTransition(span, -index, line, trigger, source, dest, epoch, it, training)


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


def _kept(value: object) -> object:
    """Return a field as a report keeps it: itself, or a short note when too deep or big."""
    if not isinstance(value, list | dict):
        if isinstance(value, str) and len(value) > _KEPT_FIELD_BYTES:
            return f"<a str of {len(value):,} characters, left out>"
        return value
    kind = type(value).__name__
    if _deeper_than(value, MAX_DEPTH):
        return f"<a {kind} nested more than {MAX_DEPTH} levels deep, left out>"
    size = len(orjson.dumps(value))
    if size > _KEPT_FIELD_BYTES:
        return f"<a {kind} of {size:,} bytes as JSON, left out>"
    return value


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    """Return ``value`` with each field too deep or too big replaced by a short note."""
    kept = {name: _kept(item) for name, item in list(value.items())[:_KEPT_FIELDS]}
    if len(value) > _KEPT_FIELDS:
        kept["..."] = f"{len(value) - _KEPT_FIELDS:,} more fields, left out"
    return kept


# -- header checks --------------------------------------------------------------------------


def _header_problem(header: Header, key: bytes | None) -> str | None:
    table = header.fields.get(Field.TABLE.value)
    if table != table_digest():
        return (
            f"written by a machine whose table digest is {shown(table)}; this "
            f"fsm_learner's table is {table_digest()!r}, so its transitions cannot be replayed"
        )
    if _run_kind(header.fields) is None:
        kind = header.fields.get(Field.KIND.value)
        return (
            f"header field {Field.KIND.value!r} is {shown(kind)}, no kind of run: valid are "
            f"{', '.join(repr(k.value) for k in RunKind)} (absent: a fit)"
        )
    if header.keyed and key is None:
        return "this run's chain is keyed: give the key (FSM_LEARNER_AUDIT_KEY or --key-env VAR)"
    if not header.keyed and key is not None:
        # a keyed log rewritten as unkeyed would otherwise verify: with a key, demand one
        return "a key was given but this run's chain is not keyed (rewritten without the key?)"
    return None


_REMOVED: Final = "a run was removed, reordered or inserted before this one"


def _binding_problem(header: Header, last_seal: bytes) -> str | None:
    """Check the header's ``prev`` against the last seal before it in its file."""
    bound, before = header.prev, last_seal.hex()
    if bound == before:
        return None
    if not before:
        return (
            f"header binds to the seal {shown(bound)}, but no seal comes before it in its "
            f"file: {_REMOVED}"
        )
    if not bound:
        return (
            "header binds to no seal (the start of a file), but the seal before it is "
            f"{before}: {_REMOVED}"
        )
    return (
        f"header binds to the seal {shown(bound)}, but the seal before it is {before}: {_REMOVED}"
    )


def _header_kept(header: Header) -> dict[str, Any]:
    own = {Field.SCHEMA.value: header.schema, Field.KEYED.value: header.keyed}
    return {**own, Field.PREV.value: header.prev, **_bounded(header.fields)}


# -- the runs of one file ----------------------------------------------------------------------


class _Run:
    """A run of the file being replayed: its report, and what its sealed blocks add up to."""

    def __init__(self, report: RunReport) -> None:
        self.report = report
        self.id = report.run_id
        self.tally = _Tally()
        self.head = b""
        self.sealed_line = report.first_line
        self.reader = TransitionReader(report.run_id)
        self.tail_first = 0
        """Where its unsealed lines begin, when the file ends with some."""
        self.cut_off = False
        """Whether the file's last line, cut short, is the run's."""


@attrs.define
class _Block:
    """The lines after the last seal: one run's, until a seal (or a cut) ends them."""

    first: int
    run_id: str | None
    run: _Run | None
    """The run it extends (None: a run not open here, whose lines are only skipped)."""
    reader: TransitionReader
    hasher: hashlib.blake2b | None = None
    tally: _Tally | None = None
    lines: int = 0
    problem: Problem | None = None


_Item = tuple[int, object]
"""Something a block holds, at a line offset: a batch of transitions or one record."""


def _decoded(line: bytes) -> Record | RecordError:
    try:
        return decode(line)
    except RecordError as exc:
        return exc


class _FileState:
    """The blocks and runs of one file, replayed chunk by chunk."""

    def __init__(self, name: str, key: bytes | None) -> None:
        self.name, self.key = name, key
        self.chain = SealChain(key)
        self.line = 1
        """The number of the next line to read."""
        self.block: _Block | None = None
        self.open: dict[str, _Run] = {}
        """Runs begun and not ended, the most recently active last."""
        self.ended: dict[int, bool] = {}
        """Runs that ended here (salted digest -> completed), the most recent last."""
        self._salt = os.urandom(16)
        self._readers: dict[str, TransitionReader] = {}
        self.last_seal = b""
        """The digest of the last seal line read, of any run: the next block binds to it."""
        self.problem: Problem | None = None
        self.stopped = False
        self.runs = 0
        self.done: list[RunReport] = []

    # -- reading ----------------------------------------------------------------------

    def take(self, item: bytes | Overlong | Unreadable) -> Iterator[RunReport]:
        """Take the next chunk of whole lines (or what ``read_chunks`` says instead).

        Yield each run's report as soon as the run is done.
        """
        if isinstance(item, Unreadable):
            self._file_problem(self.line, item.reason)
            self.stopped = True
        elif isinstance(item, Overlong):
            reason = (
                f"a line of {item.size:,} bytes, longer than a record may be "
                f"({MAX_LINE_BYTES:,} bytes): not a record"
            )
            self._cut(reason, self.line)
            self.line += 1
        elif not item.endswith(b"\n"):
            self._cut_off(item)
        else:
            yield from self._chunk(item)
        yield from self._drain()

    def _drain(self) -> Iterator[RunReport]:
        done, self.done = self.done, []
        return iter(done)

    def _chunk(self, data: bytes) -> Iterator[RunReport]:
        """Split the chunk at the seal lines: the lines between go to the open block."""
        pos, end = 0, len(data)
        while pos < end and not self.stopped:
            if data.startswith(SEAL_START, pos):
                seal_at = pos
            else:
                found = data.find(_SEAL_AFTER_LINE, pos)
                seal_at = end if found < 0 else found + 1
            if seal_at > pos:
                self._segment(data[pos:seal_at])
            if seal_at < end and not self.stopped:
                stop = data.find(b"\n", seal_at) + 1
                self._seal_line(data[seal_at:stop])
                pos = stop
            else:
                pos = end
            yield from self._drain()

    def _segment(self, data: bytes) -> None:
        """Whole lines with no seal of the writer's among them."""
        while data and not self.stopped:
            block = self.block
            if block is None:
                block = self.block = self._new_block(data)
            used = self._fill(block, data)
            data = data[used:]

    def _new_block(self, data: bytes) -> _Block:
        """Begin a block at the first line of ``data``: its run is that line's."""
        first = _decoded(data[: data.find(b"\n") + 1])
        if isinstance(first, Header):
            run = self._begin_run(first)
            return self._block(first.run, run)
        if isinstance(first, RecordError | Seal):
            return self._block(None, None)  # a cut line, or a seal with no lines before it
        run = self.open.get(first.run)
        if run is not None:
            self.open[first.run] = self.open.pop(first.run)  # the most recently active last
        return self._block(first.run, run)

    def _block(self, run_id: str | None, run: _Run | None) -> _Block:
        if run is None:
            return _Block(self.line, run_id, None, self._reader(run_id or ""))
        return _Block(
            self.line,
            run_id,
            run,
            run.reader,
            self.chain.begin(run.head, self.last_seal),
            run.tally.copy(),
        )

    def _reader(self, run_id: str) -> TransitionReader:
        reader = self._readers.get(run_id)
        if reader is None:
            if len(self._readers) >= MAX_OPEN_RUNS:
                self._readers.clear()
            reader = self._readers[run_id] = TransitionReader(run_id)
        return reader

    def _fill(self, block: _Block, data: bytes) -> int:
        """Add lines to the block; return how many bytes of ``data`` it took."""
        items = self._fast(block, data) if block.run_id is not None else None
        if items is None:
            return self._slow(block, data)
        self._use(block, data, items[0], items[1])
        return len(data)

    def _fast(self, block: _Block, data: bytes) -> tuple[list[_Item], int] | None:
        """Read the lines in bulk, if they are the block's run's, as the writer writes them.

        A header may open the block and a footer end it; notes are read one by one.
        Return the items and the number of lines; None to read them one by one instead.
        """
        items: list[_Item] = []
        start, stop = 0, len(data)
        if not block.lines and data.startswith(_HEADER_START):
            start = data.find(b"\n") + 1
            header = self._own(block, data[:start], Header)
            if header is None:
                return None
            items.append((0, header))
        footer = None
        last = max(data.rfind(b"\n", start, stop - 1) + 1, start)
        if last < stop and data.startswith(_FOOTER_START, last):
            footer = self._own(block, data[last:], Footer)
            if footer is None:
                return None
            stop = last
        head = len(items)
        lines = self._transitions(block, data[start:stop], head, items)
        if lines is None:
            return None
        lines += head
        if footer is not None:
            items.append((lines, footer))
            lines += 1
        return items, lines

    def _transitions(
        self, block: _Block, body: bytes, offset: int, items: list[_Item]
    ) -> int | None:
        """Read transition lines, and the notes among them; return how many lines in all."""
        batch = block.reader.read(body)
        if batch is not None:
            if batch.routes:
                items.append((offset, batch))
            return len(batch.routes)
        starts = [0] if body.startswith(_NOTE_START) else []
        found = body.find(b"\n" + _NOTE_START)
        while found >= 0:
            starts.append(found + 1)
            found = body.find(b"\n" + _NOTE_START, found + 1)
        if not starts:
            return None
        pos, lines = 0, 0
        for note_at in [*starts, len(body)]:
            batch = block.reader.read(body[pos:note_at])
            if batch is None:
                return None
            if batch.routes:
                items.append((offset + lines, batch))
            lines += len(batch.routes)
            if note_at == len(body):
                break
            pos = body.find(b"\n", note_at) + 1
            note = self._own(block, body[note_at:pos], Note)
            if note is None:
                return None
            items.append((offset + lines, note))
            lines += 1
        return lines

    @staticmethod
    def _own(block: _Block, line: bytes, kind: type[Header | Note | Footer]) -> Record | None:
        """Decode a line the fast path set apart: the record, if of that kind and that run."""
        record = _decoded(line)
        if isinstance(record, kind) and record.run == block.run_id:
            return record
        return None

    def _slow(self, block: _Block, data: bytes) -> int:
        """Decode line by line, up to a seal, a line that is no record, or another run's.

        Return how many bytes of ``data`` the block took (a seal or a cut line included).
        """
        items: list[_Item] = []
        routes, numbers, batch_at = bytearray(), list[int](), 0
        by_key = _tables().by_key
        lines = data.split(b"\n")
        lines.pop()
        used = 0
        for k, line in enumerate(lines):
            record = _decoded(line)
            if isinstance(record, Transition) and record.run == block.run_id:
                route = by_key.get(record.key)
                if route is not None:
                    batch_at = batch_at if routes else k
                    routes.append(route)
                    numbers += (record.epoch, record.iter, record.t_ns)
                    used += len(line) + 1
                    continue
            if routes:
                items.append((batch_at, Transitions(bytes(routes), numbers)))
                routes, numbers = bytearray(), []
            if isinstance(record, RecordError | Seal) or record.run != block.run_id:
                self._use(block, data[:used], items, k)
                return used + self._end_block(record, line)
            items.append((k, record))
            used += len(line) + 1
        if routes:
            items.append((batch_at, Transitions(bytes(routes), numbers)))
        self._use(block, data, items, len(lines))
        return used

    def _end_block(self, record: Record | RecordError, line: bytes) -> int:
        """End the block at this line; return how many bytes of it the block took."""
        if isinstance(record, Seal):
            self._sealed(record)
            self.line += 1
            return len(line) + 1
        if isinstance(record, RecordError):
            self._cut(str(record), self.line)
            self.line += 1
            return len(line) + 1
        self._cut_before(record.run)
        return 0

    def _use(self, block: _Block, data: bytes, items: list[_Item], lines: int) -> None:
        """Hash the block's new lines and replay them into its tally."""
        first = self.line
        if block.hasher is not None and block.tally is not None:
            block.hasher.update(data)
            if block.problem is None:
                try:
                    for offset, item in items:
                        _apply(block.tally, item, first + offset, block.first)
                except _Invalid as exc:
                    block.problem = Problem(self.name, exc.line, exc.reason)
        block.lines += lines
        self.line += lines

    # -- the end of a block ----------------------------------------------------------------

    def _seal_line(self, line: bytes) -> None:
        record = _decoded(line)
        if isinstance(record, Seal):
            self._sealed(record)
        else:  # it begins like a seal: a broken one
            reason = str(record) if isinstance(record, RecordError) else "not a seal"
            self._cut(reason, self.line)
        self.line += 1

    def _sealed(self, seal: Seal) -> None:
        """End the block before this seal: check it against the seal, keep what it adds up to."""
        self.last_seal = seal.digest
        block, self.block = self.block, None
        line = self.line
        if block is None or not block.lines:
            run = self.open.get(seal.run)
            if run is not None or not self._ended_failed(seal.run):
                reason = f"line {line}: a seal of run {shown(seal.run)} with no lines before it"
                self._run_problem(run, Problem(self.name, line, reason))
            return
        run = block.run
        if run is None or block.hasher is None or block.tally is None:
            self._unseen(block, line)
            return
        problem = self._seal_problem(block, seal, run)
        if problem is not None:
            span = f"lines {block.first}-{line} (a block of run {shown(run.id)})"
            self._fail(run, Problem(self.name, block.first, f"{span}: {problem}"))
            return
        run.tally, run.head, run.sealed_line = block.tally, seal.digest, line
        run.report.head_line = line
        if block.problem is not None:
            self._fail(run, block.problem)
        elif block.tally.footer is not None:
            self._end(run, completed=True)

    def _seal_problem(self, block: _Block, seal: Seal, run: _Run) -> str | None:
        if seal.run != run.id:
            return f"sealed by a seal of run {shown(seal.run)}"
        if seal.count != block.lines:
            return f"its seal counts {seal.count} lines, the block has {block.lines}"
        if block.hasher is not None and block.hasher.digest() == seal.digest:
            return None
        hint = " (or the wrong key)" if self.key is not None else ""
        return (
            "the seal does not match the lines: a line was edited, inserted, removed or "
            f"moved, or a block before it in the file (of any run){hint}"
        )

    def _cut(self, reason: str, line: int) -> None:
        """End the block at a line that is no record: that block was never sealed."""
        block, self.block = self.block, None
        if block is None or block.first == line:
            self._file_problem(line, reason)
            self.stopped = not self.runs  # the file does not begin like a log: read no further
            return
        what = (
            f"lines {block.first}-{line} (a block of run {shown(block.run_id)}): line {line} is "
            f"no record: {reason}"
        )
        self._block_problem(block, Problem(self.name, block.first, what))

    def _cut_before(self, other: str) -> None:
        """End the block before a record of another run: never sealed; that record begins one."""
        block, self.block = self.block, None
        if block is None:  # pragma: no cover (a record always lands in a block)
            return
        what = (
            f"lines {block.first}-{self.line} (a block of run {shown(block.run_id)}): line "
            f"{self.line} is a record of run {shown(other)}: blocks of two runs mixed, or one "
            "never sealed"
        )
        self._block_problem(block, Problem(self.name, block.first, what))

    def _block_problem(self, block: _Block, problem: Problem) -> None:
        if block.run is not None:
            self._fail(block.run, problem)
        elif not self._ended_failed(block.run_id):
            self.problem = self.problem or problem

    def _unseen(self, block: _Block, line: int) -> None:
        """Say what is wrong with a sealed block of a run that is not open here."""
        run_id = block.run_id or ""
        ended = self.ended.get(self._digest(run_id))
        if ended is False:
            return  # a run already reported as failing: the rest of it is skipped
        span = f"lines {block.first}-{line}"
        if ended:
            reason = f"{span}: a block of run {shown(run_id)} after its run_end was sealed"
        else:
            reason = (
                f"{span}: a block of run {shown(run_id)}, which did not begin in this file "
                "before it (its run_start missing, or cut off)"
            )
        self._file_problem(block.first, reason)

    def _cut_off(self, data: bytes) -> None:
        """Take the last line, without its newline: a write cut short, of the run it follows."""
        block = self.block
        if block is not None and block.run is not None:
            block.lines += 1
            block.run.cut_off = True
        elif block is not None and block.run_id is not None:
            block.lines += 1
        elif self.open:
            run = next(reversed(self.open.values()))
            run.report.unsealed += 1
            run.tail_first, run.cut_off = self.line, True
        else:
            record = _decoded(data)
            reason = str(record) if isinstance(record, RecordError) else "no newline: cut off"
            self._cut(reason, self.line)
        self.line += 1

    # -- runs --------------------------------------------------------------------------------

    def _begin_run(self, header: Header) -> _Run | None:
        """Open the run this header begins; None when the header already fails it."""
        line = self.line
        report = RunReport(self.name, line, run_id=header.run, header=_header_kept(header))
        run = _Run(report)
        self.runs += 1
        already = self.open.get(header.run)
        if already is not None:
            reason = (
                f"a second run_start of run {shown(header.run)} at line {line}, while the run "
                f"begun at line {already.report.first_line} is open"
            )
            self._fail(already, Problem(self.name, line, reason))
        if len(self.open) >= MAX_OPEN_RUNS:
            self._evict()
        self.open[header.run] = run
        problem = _header_problem(header, self.key) or _binding_problem(header, self.last_seal)
        if problem is not None:
            self._fail(run, Problem(self.name, line, problem))
            return None
        return run

    def _evict(self) -> None:
        run = next(iter(self.open.values()))
        reason = (
            f"more than {MAX_OPEN_RUNS} runs open at once in this file: this one, silent since "
            f"line {run.sealed_line}, is reported before its end, as truncated"
        )
        self._fail(run, Problem(self.name, run.sealed_line, reason))

    def _fail(self, run: _Run, problem: Problem) -> None:
        run.report.problem = problem
        self._end(run, completed=False)

    def _run_problem(self, run: _Run | None, problem: Problem) -> None:
        if run is not None:
            self._fail(run, problem)
        else:
            self._file_problem(problem.line, problem.reason)

    def _end(self, run: _Run, *, completed: bool) -> None:
        """Report a run that is done, and remember how it ended."""
        if self.open.get(run.id) is run:
            del self.open[run.id]
        digest = self._digest(run.id)
        self.ended.pop(digest, None)
        self.ended[digest] = completed
        if len(self.ended) > _ENDED_KEPT:
            del self.ended[next(iter(self.ended))]
        run.report.head = run.head.hex()
        self.done.append(_finish(run.report, run.tally))

    def _ended_failed(self, run_id: str | None) -> bool:
        return run_id is not None and self.ended.get(self._digest(run_id)) is False

    def _digest(self, run_id: str) -> int:
        raw = hashlib.blake2b(run_id.encode(errors="surrogatepass"), digest_size=8, key=self._salt)
        return int.from_bytes(raw.digest(), "little")

    def _file_problem(self, line: int, reason: str) -> None:
        if self.problem is None:
            self.problem = Problem(self.name, line, reason)

    # -- the end of the file ------------------------------------------------------------------

    def finish(self) -> None:
        """Report the runs still open (truncated); with no run at all, say so."""
        block = self.block
        if block is not None and block.run is not None:
            block.run.report.unsealed += block.lines
            block.run.tail_first = block.first
        elif block is not None and block.lines and not self._ended_failed(block.run_id):
            self._unsealed_unseen(block)
        self.block = None
        for run in sorted(self.open.values(), key=lambda r: r.report.first_line):
            run.report.problem = Problem(self.name, *self._truncation(run))
            self._end(run, completed=False)
        if not self.runs and self.problem is None:
            self.problem = Problem(
                self.name, 0, "empty file: no run in it (a fit killed before its first write?)"
            )

    @staticmethod
    def _truncation(run: _Run) -> tuple[int, str]:
        records, tail = run.tally.records, run.report.unsealed
        if not tail:
            reason = (
                f"truncated (a killed run?): no run_end after its last sealed block (line "
                f"{run.sealed_line}); its {records} records verify"
            )
            return run.sealed_line, reason
        cut = ", the last one cut off" if run.cut_off else ""
        reason = (
            f"truncated (a killed run?): {tail} lines from line {run.tail_first} were never "
            f"sealed{cut}; the {records} records before them verify"
        )
        return run.tail_first, reason

    def _unsealed_unseen(self, block: _Block) -> None:
        last = block.first + block.lines - 1
        reason = (
            f"lines {block.first}-{last}: never sealed, records of run {shown(block.run_id)}, "
            "which is not open here"
        )
        self._file_problem(block.first, reason)


class FileAudit:
    """One log file, audited as a stream: iterate to get each run's report when it is done.

    After the iteration, ``problem`` is the file-level problem, if any: the file cannot
    be read, is no regular file, is empty, does not start with a run, or holds lines of
    no open run. ``name`` is the file's name as printable text, as reports show it.
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
            for chunk in read_chunks(fh):
                yield from state.take(chunk)
                if state.stopped:
                    break
        state.finish()
        yield from state.done
        self.problem = state.problem


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
        line = report.head_line or report.first_line
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
        rank = report.header.get(Field.RANK.value)
        rank = rank if type(rank) is int else None
        key = f"{rank}\x00{report.run_id}".encode(errors="surrogatepass")
        digest = hashlib.blake2b(key, digest_size=8, key=self._salt).digest()
        seen = int.from_bytes(digest, "little")
        if seen not in self._seen:
            self._seen.add(seen)
            return None
        return (
            f"run {shown(report.run_id)} (rank {'?' if rank is None else rank}) appears a "
            "second time among the audited runs: a run duplicated, or a file audited twice"
        )
