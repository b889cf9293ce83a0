r"""Comparing two runs: their set-ups, the first transition where their paths part, their metrics.

``fsm-learner audit --diff A B`` compares two runs. Without PATH, A and B are two log
files, each standing for its last run (the one begun last in it, as ``fsm-learner
report`` takes it; the diff says so when the file holds more than one);
``runs_in_files`` chooses them. With PATHs (files, or directories of
``*.jsonl``), A and B are run ids, exactly as the audit prints them, looked up in those
logs (``runs_by_id``): two runs of one file, or of two. A run id found nowhere, or found
twice, is a usage error naming what was found; the only exception is a fit across
ranks, found once per rank's log: its lowest rank's log is compared (the ranks' paths
are the same, which a plain audit of their logs checks).

Both runs are audited first (``FileAudit``). A run that does not verify (its file not
either) is reported with its problem, and the diff fails: a diff of a log that does not
verify cannot be trusted. What its records say is still compared and shown, read as
they are (``runlog.read_runs``), since it is often why one looks.

``diff_runs`` compares, in order:

- the table digest: the same, or not; runs written by different tables took routes of
  different machines, so their paths are not compared step by step (``paths_identical``
  is None); a table other than this fsm_learner's never verifies anyway;
- the header, as the audit keeps it (a field too big or too deep is a short note; the
  envelope's ``schema`` and ``keyed`` included): every field whose value differs, or
  that one run lacks, with both values, compared as JSON (so ``1`` is not ``true``, and
  ``cbs``, the callbacks and their orders, is compared as a list: same callbacks in
  another order differ). Left out, because they differ from run to run whatever the
  set-up: ``wall`` (when it started) and ``prev`` (the seal before it in its file); the
  run ids are shown, never compared;
- the paths: the two sequences of transitions as (trigger, source, dest, training,
  epoch, iter), and the first index where they differ, with what each run did there
  (trigger, route, epoch, pass, batch), or that it had ended (a run whose path is a
  prefix of the other's);
- the metrics: the ``metrics`` notes (``MetricsCB``'s, the last of each pass) matched by
  (epoch, pass); for every field that holds a number (``train_loss``, ``valid_accuracy``,
  ``batches``...; the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` are the floats
  they name) in either run, both values and ``b - a``; a value only one run has is shown
  alone. Other notes are not compared.

The runs are identical (``RunDiff.identical``, the command's exit 0) when both verify
and their paths are: set-ups and metrics may differ (the same path under another seed is
exactly what a reproducibility check wants to see). ``render_diff`` is the text report:
the passes' differing values up to ``METRIC_ROWS_SHOWN`` rows and the largest ``|b - a|``
(everything is in ``RunDiff.to_json``). Everything shown of a log is made printable and
bounded: logs are untrusted input. Nothing here imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

from fsm_learner._compat import StrEnum
from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.codec import Field, json_value
from fsm_learner.audit.files import file_kind
from fsm_learner.audit.ranks import world_size_of
from fsm_learner.audit.replay import FileAudit, Problem, RunReport, RunSet
from fsm_learner.audit.runlog import RunLog, Step, read_runs
from fsm_learner.audit.summary import Table, render_table
from fsm_learner.exceptions import ConfigurationError
from fsm_learner.machine import RunKind, State

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

__all__ = [
    "LEFT_OUT",
    "METRICS_NOTE",
    "METRIC_ROWS_SHOWN",
    "ChosenRun",
    "HeaderDifference",
    "MetricDifference",
    "Pass",
    "PathDifference",
    "RunDiff",
    "StepAt",
    "diff_runs",
    "render_diff",
    "runs_by_id",
    "runs_in_files",
]

LEFT_OUT: Final = (Field.WALL, Field.PREV)
"""Header fields never compared: they differ from run to run whatever the set-up."""
METRICS_NOTE: Final = "metrics"
"""The notes whose numbers are compared (what ``MetricsCB`` writes at each pass end)."""
METRIC_ROWS_SHOWN: Final = 20
"""The most differing metric values the text report lists; ``--json`` has them all."""
_IDS_LISTED: Final = 8
_PLACES_LISTED: Final = 3
_ID_SHOWN: Final = 64
_VALUE_SHOWN: Final = 60
_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})
_BETWEEN_PASSES: Final = frozenset({State.IDLE.value, State.FIT.value})
_PASS_LEVEL: Final = frozenset({*_BETWEEN_PASSES, State.EPOCH.value})
_FILES_OR_IDS: Final = (
    "without PATH, --diff A B takes two log files; with PATHs, two run ids found in them "
    "(fsm-learner audit runs/ --diff RUN_A RUN_B)"
)


class Pass(StrEnum):
    """Which pass a transition or a metric belongs to, named as the audit's summary names it."""

    TRAIN = "train"
    VALID = "valid"
    PREDICT = "predict"
    """A predict run's one pass."""


def _pass(kind: RunKind | None, *, training: bool) -> Pass:
    if training:
        return Pass.TRAIN
    return Pass.PREDICT if kind is RunKind.PREDICT else Pass.VALID


def _clip(text: str, limit: int = _ID_SHOWN) -> str:
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- choosing the two runs --------------------------------------------------------------------


@attrs.frozen
class ChosenRun:
    """One side of a diff: the run's audit report, the log it is in, and how it was chosen."""

    path: Path
    report: RunReport
    file_problem: Problem | None
    """The problem of its file as a whole (a line of no run, say), if any."""
    chosen: str = ""
    """How it was chosen, when that is worth saying: "the last of 3 runs in its file"."""

    @property
    def problem(self) -> Problem | None:
        """Why the run cannot be trusted: its own problem, else its file's; None if neither."""
        return self.report.problem or self.file_problem

    @property
    def verified(self) -> bool:
        """Whether the run verifies, in a file that verifies."""
        return self.report.verified and self.file_problem is None

    @property
    def rank(self) -> int | None:
        """The rank its header names (None: none, or not an int)."""
        rank = self.report.header.get(Field.RANK.value)
        return rank if type(rank) is int else None


def runs_in_files(a: str, b: str, *, key: bytes | None) -> tuple[ChosenRun, ChosenRun]:
    """Choose each log's last run (the one begun last in it), audited with ``key``.

    Raises ConfigurationError when a path is no log file or the log holds no run.
    """
    return _last_run(a, key), _last_run(b, key)


def _last_run(text: str, key: bytes | None) -> ChosenRun:
    path = _log_file(text)
    audit, runs = FileAudit(path, key=key), RunSet()
    last: RunReport | None = None
    count = 0
    for report in audit:  # streamed: only the one begun last is kept
        runs.add(report)  # a run id twice in the file is a problem of the second
        count += 1
        if last is None or report.first_line > last.first_line:
            last = report
    if last is None:
        why = "" if audit.problem is None else f" ({audit.problem})"
        msg = f"{audit.name} holds no run to compare{why}"
        raise ConfigurationError(msg)
    chosen = f"the last of {count} runs in its file" if count > 1 else ""
    return ChosenRun(path, last, audit.problem, chosen)


def _log_file(text: str) -> Path:
    """Return ``text`` as the path of a regular file; raise ConfigurationError otherwise."""
    path = Path(text)
    if not text:
        msg = f"'': the empty path names no log; {_FILES_OR_IDS}"
        raise ConfigurationError(msg)
    try:
        kind = file_kind(path)
    except FileNotFoundError:
        msg = f"{file_name(path)[:200]}: no such file; {_FILES_OR_IDS}"
        raise ConfigurationError(msg) from None
    except OSError as exc:
        msg = f"{file_name(path)[:200]}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from None
    if kind is not None:
        msg = f"{file_name(path)[:200]} is {kind}, not a log file; {_FILES_OR_IDS}"
        raise ConfigurationError(msg)
    return path


def runs_by_id(
    a: str, b: str, files: Sequence[Path], *, key: bytes | None
) -> tuple[ChosenRun, ChosenRun]:
    """Find the runs ``a`` and ``b`` (run ids) in the log ``files``, audited with ``key``.

    Raises ConfigurationError when an id names no run of the logs, or several runs that
    are not the ranks of one fit (its lowest rank's log is chosen then).
    """
    found: dict[str, list[ChosenRun]] = {a: [], b: []}
    listed: dict[str, None] = {}
    total = 0
    for path in files:
        audit = FileAudit(path, key=key)
        here = []
        for report in audit:  # streamed: only the runs asked for are kept
            total += 1
            if len(listed) < _IDS_LISTED:
                listed[_clip(report.run_id) or "''"] = None
            if report.run_id in found:
                here.append(report)
        for report in here:  # the file's problem is known once it is read to its end
            found[report.run_id].append(ChosenRun(path, report, audit.problem))
    more = f" and {total - len(listed)} more" if total > len(listed) else ""
    ids = f"{', '.join(listed)}{more}" if listed else "none"
    return _one(a, found[a], len(files), ids), _one(b, found[b], len(files), ids)


def _one(run_id: str, matches: list[ChosenRun], files: int, ids: str) -> ChosenRun:
    if not matches:
        msg = f"no run {shown(run_id)} in the {files} log(s) given; their runs: {ids}; " + (
            _FILES_OR_IDS
        )
        raise ConfigurationError(msg)
    if len(matches) == 1:
        return matches[0]
    lowest = _lowest_rank(matches)
    if lowest is not None:
        return lowest
    places = ", ".join(
        f"{match.report.path} line {match.report.first_line}" for match in matches[:_PLACES_LISTED]
    )
    msg = (
        f"run {shown(run_id)} is found {len(matches)} times ({places}), and not as the ranks "
        "of one fit: give only the log that holds the run to compare"
    )
    raise ConfigurationError(msg)


def _lowest_rank(matches: Sequence[ChosenRun]) -> ChosenRun | None:
    """Return the lowest rank's log when ``matches`` are the ranks of one fit; else None."""
    ranks = [match.rank for match in matches]
    worlds = {world_size_of(match.report.header) for match in matches}
    world = max(worlds)
    if len(worlds) > 1 or world == 1 or None in ranks or len(set(ranks)) < len(ranks):
        return None
    lowest = min(matches, key=lambda match: match.rank or 0)
    chosen = (
        f"rank {lowest.rank}'s log of a fit across {world} ranks ({len(matches)} of its logs "
        "given; the audit of them checks that the ranks' paths are the same)"
    )
    return attrs.evolve(lowest, chosen=chosen)


# -- what the diff finds ----------------------------------------------------------------------


@attrs.frozen
class HeaderDifference:
    """A header field whose value differs between the runs, or that one of them lacks."""

    field: str
    a: Any = None
    b: Any = None
    in_a: bool = True
    in_b: bool = True

    def to_json(self) -> dict[str, Any]:
        """Return the field and each run's value; a run that lacks the field has no key for it."""
        out: dict[str, Any] = {"field": self.field}
        if self.in_a:
            out["a"] = self.a
        if self.in_b:
            out["b"] = self.b
        return out


@attrs.frozen
class StepAt:
    """What a run did at a transition: the trigger, its route, and where in the run it was.

    ``pass_`` is None between passes (``begin_fit``, ``end_fit``); ``batch`` is the batch
    index (the log's ``it``) for a transition into, out of or within a batch, else None.
    """

    trigger: str
    source: str
    dest: str
    epoch: int
    pass_: Pass | None
    batch: int | None

    def to_json(self) -> dict[str, Any]:
        """Return the step as JSON: ``pass`` and ``batch`` null where they do not apply."""
        return {
            "trigger": self.trigger,
            "source": self.source,
            "dest": self.dest,
            "epoch": self.epoch,
            "pass": None if self.pass_ is None else self.pass_.value,
            "batch": self.batch,
        }


@attrs.frozen
class PathDifference:
    """Where two paths part: after ``index`` common transitions, what each run did next.

    None on a side means that run had ended: its path is a prefix of the other's.
    """

    index: int
    a: StepAt | None
    b: StepAt | None

    def to_json(self) -> dict[str, Any]:
        """Return the index and both steps (null for a run that had ended)."""
        return {
            "index": self.index,
            "a": None if self.a is None else self.a.to_json(),
            "b": None if self.b is None else self.b.to_json(),
        }


Number = int | float


@attrs.frozen
class MetricDifference:
    """One value of a ``metrics`` note in both runs (None: that run has no such value)."""

    epoch: int
    pass_: Pass
    name: str
    a: Number | None
    b: Number | None

    @property
    def diff(self) -> Number | None:
        """``b - a``; None when a run lacks the value."""
        if self.a is None or self.b is None:
            return None
        return self.b - self.a

    @property
    def differs(self) -> bool:
        """Whether the values differ: one is missing, or they are unequal (NaN equals NaN)."""
        a, b = self.a, self.b
        if a is None or b is None:
            return True
        return a != b and not (math.isnan(a) and math.isnan(b))

    def to_json(self) -> dict[str, Any]:
        """Return the value's place and name, both values and ``diff``.

        NaN and infinities are written as the log writes them; a run that lacks the value
        has no key for it, and ``diff`` is then null.
        """
        out: dict[str, Any] = {"epoch": self.epoch, "pass": self.pass_.value, "name": self.name}
        if self.a is not None:
            out["a"] = json_value("a", self.a)
        if self.b is not None:
            out["b"] = json_value("b", self.b)
        diff = self.diff
        out["diff"] = None if diff is None else json_value("diff", diff)
        return out


@attrs.frozen
class RunDiff:
    """What comparing two runs found (``diff_runs``)."""

    a: ChosenRun
    b: ChosenRun
    transitions: tuple[int, int]
    """How many transitions each run's log holds."""
    table_same: bool
    header: tuple[HeaderDifference, ...]
    first_difference: PathDifference | None
    """Where the paths part; None when they are identical or were not compared."""
    metrics: tuple[MetricDifference, ...]
    """Every value of either run's ``metrics`` notes, by epoch, pass and name."""

    @property
    def paths_identical(self) -> bool | None:
        """Whether the paths are the same; None when not compared (the tables differ)."""
        if not self.table_same:
            return None
        return self.first_difference is None

    @property
    def identical(self) -> bool:
        """The verdict: both runs verify and their paths are the same."""
        return self.a.verified and self.b.verified and self.paths_identical is True

    def to_json(self) -> dict[str, Any]:
        """Everything found, as JSON-able data."""
        return {
            "a": _side_json(self.a, self.transitions[0]),
            "b": _side_json(self.b, self.transitions[1]),
            "left_out": [field.value for field in LEFT_OUT],
            "table_same": self.table_same,
            "header_differences": [difference.to_json() for difference in self.header],
            "paths_identical": self.paths_identical,
            "first_difference": (
                None if self.first_difference is None else self.first_difference.to_json()
            ),
            "metrics": [metric.to_json() for metric in self.metrics],
            "identical": self.identical,
        }


def _side_json(side: ChosenRun, transitions: int) -> dict[str, Any]:
    report, problem = side.report, side.problem
    return {
        "path": report.path,
        "run_id": report.run_id,
        "rank": side.rank,
        "kind": None if report.kind is None else report.kind.value,
        "status": report.status.value,
        "verified": side.verified,
        "problem": None if problem is None else attrs.asdict(problem),
        "transitions": transitions,
        "chosen": side.chosen or None,
    }


# -- comparing --------------------------------------------------------------------------------


def diff_runs(a: ChosenRun, b: ChosenRun) -> RunDiff:
    """Compare two audited runs; their records are read from their logs.

    Raises OSError when a log cannot be read again.
    """
    log_a, log_b = _records(a, b)
    table_same = _same(
        a.report.header.get(Field.TABLE.value), b.report.header.get(Field.TABLE.value)
    )
    return RunDiff(
        a=a,
        b=b,
        transitions=(len(log_a.steps), len(log_b.steps)),
        table_same=table_same,
        header=tuple(_header_differences(a.report.header, b.report.header)),
        first_difference=(
            _first_difference(log_a, log_b, a.report.kind, b.report.kind) if table_same else None
        ),
        metrics=tuple(_metric_differences(_metrics(log_a), _metrics(log_b))),
    )


def _records(a: ChosenRun, b: ChosenRun) -> tuple[RunLog, RunLog]:
    """Read both runs' records: one reading when they share a file."""
    id_a, id_b = a.report.run_id, b.report.run_id
    if a.path == b.path:
        runs = read_runs(a.path, {id_a, id_b})
        return runs.get(id_a, RunLog(id_a)), runs.get(id_b, RunLog(id_b))
    runs_a, runs_b = read_runs(a.path, {id_a}), read_runs(b.path, {id_b})
    return runs_a.get(id_a, RunLog(id_a)), runs_b.get(id_b, RunLog(id_b))


def _same(a: object, b: object) -> bool:
    """Whether two values the audit kept are the same JSON (``1`` is not ``1.0`` or ``true``)."""
    option = orjson.OPT_SORT_KEYS
    return type(a) is type(b) and orjson.dumps(a, option=option) == orjson.dumps(b, option=option)


_MISSING: Final = object()


def _header_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> Iterator[HeaderDifference]:
    """Yield each field (a's order, then b's own) that differs, but those left out."""
    left_out = {field.value for field in LEFT_OUT}
    for field in dict.fromkeys([*a, *b]):
        if field in left_out:
            continue
        value_a, value_b = a.get(field, _MISSING), b.get(field, _MISSING)
        if value_a is _MISSING or value_b is _MISSING or not _same(value_a, value_b):
            yield HeaderDifference(
                field,
                None if value_a is _MISSING else value_a,
                None if value_b is _MISSING else value_b,
                in_a=value_a is not _MISSING,
                in_b=value_b is not _MISSING,
            )


def _key(step: Step) -> tuple[str, str, str, bool, int, int]:
    return step.trigger, step.source, step.dest, step.training, step.epoch, step.iter


def _first_difference(
    a: RunLog, b: RunLog, kind_a: RunKind | None, kind_b: RunKind | None
) -> PathDifference | None:
    """Return where the two paths part (None: they are the same)."""
    index = next(
        (i for i, (x, y) in enumerate(zip(a.steps, b.steps, strict=False)) if _key(x) != _key(y)),
        min(len(a.steps), len(b.steps)),
    )
    if index == len(a.steps) == len(b.steps):
        return None
    return PathDifference(index, _step_at(a.steps, index, kind_a), _step_at(b.steps, index, kind_b))


def _step_at(steps: Sequence[Step], index: int, kind: RunKind | None) -> StepAt | None:
    if index >= len(steps):
        return None
    step = steps[index]
    between = step.source in _BETWEEN_PASSES and step.dest in _BETWEEN_PASSES
    in_batch = not (step.source in _PASS_LEVEL and step.dest in _PASS_LEVEL)
    return StepAt(
        step.trigger,
        step.source,
        step.dest,
        step.epoch,
        None if between else _pass(kind, training=step.training),
        step.iter if in_batch else None,
    )


_PassKey = tuple[int, bool]
"""(epoch, training): which pass a ``metrics`` note is of."""


def _number(value: object) -> Number | None:
    """Read a note field as a number; None for anything else (a bool, a string, a list).

    A number is an int or a float, or NaN and the infinities as the log spells them.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and value in _NON_FINITE:
        return float(value)
    return None


def _metrics(run: RunLog) -> dict[_PassKey, dict[str, Number]]:
    """Each pass's numbers, from its last ``metrics`` note."""
    passes: dict[_PassKey, dict[str, Number]] = {}
    for note in run.notes:
        if note.name == METRICS_NOTE:
            numbers = {name: _number(value) for name, value in note.fields.items()}
            passes[note.epoch, note.training] = {
                name: number for name, number in numbers.items() if number is not None
            }
    return passes


def _metric_differences(
    a: Mapping[_PassKey, Mapping[str, Number]], b: Mapping[_PassKey, Mapping[str, Number]]
) -> Iterator[MetricDifference]:
    """Yield every value of either run, pass by pass (epoch, then training before validation)."""
    for epoch, training in sorted(a.keys() | b.keys(), key=lambda key: (key[0], not key[1])):
        values_a, values_b = a.get((epoch, training), {}), b.get((epoch, training), {})
        for name in dict.fromkeys([*values_a, *values_b]):
            yield MetricDifference(
                epoch,
                _pass(RunKind.FIT, training=training),
                name,
                values_a.get(name),
                values_b.get(name),
            )


# -- the text report --------------------------------------------------------------------------


def render_diff(diff: RunDiff, *, rich: bool | None = None) -> str:
    """Render the diff for people: the runs, table, header, path, metrics, then the verdict.

    Boxed tables when rich is installed (or ``rich``), as the audit's summary draws them.
    """
    lines = [*_side_lines("a", diff.a), *_side_lines("b", diff.b), _table_line(diff)]
    lines += _header_lines(diff, rich)
    lines += _path_lines(diff, rich)
    lines += _metric_lines(diff.metrics, rich)
    lines.append(_verdict(diff))
    return "\n".join(lines)


def _side_lines(name: str, side: ChosenRun) -> list[str]:
    report = side.report
    verdict = "verified" if side.verified else "DOES NOT VERIFY"
    kind = "kind unknown" if report.kind is None else report.kind.value
    chosen = f"  ({side.chosen})" if side.chosen else ""
    run_id = _clip(report.run_id) or "?"
    lines = [
        f"{name}: {report.path}  run {run_id}  {kind}  {report.status.value}  {verdict}{chosen}"
    ]
    if side.problem is not None:
        lines.append(f"   problem: {printable(str(side.problem))}")
    return lines


def _table_line(diff: RunDiff) -> str:
    table_a = _value_text(diff.a.report.header.get(Field.TABLE.value, "(absent)"))
    if diff.table_same:
        return f"table: the same ({table_a})"
    table_b = _value_text(diff.b.report.header.get(Field.TABLE.value, "(absent)"))
    return (
        f"table: differs (a {table_a}, b {table_b}): runs of different machines, their paths "
        "are not compared step by step"
    )


def _value_text(value: object) -> str:
    """Show a header value: a string as itself (printable, cut), anything else described."""
    return _clip(value, _VALUE_SHOWN) if isinstance(value, str) else shown(value, _VALUE_SHOWN)


def _header_lines(diff: RunDiff, rich: bool | None) -> list[str]:
    left_out = ", ".join(field.value for field in LEFT_OUT)
    count = len(diff.header)
    if not count:
        return [f"header: no field differs (not compared: {left_out})"]
    rows = tuple(
        (_clip(difference.field), _header_value(difference, "a"), _header_value(difference, "b"))
        for difference in diff.header
    )
    fields = "field differs" if count == 1 else "fields differ"
    return [
        f"header: {count} {fields} (not compared: {left_out})",
        render_table(Table("header fields that differ", ("field", "a", "b"), rows), rich=rich),
    ]


def _header_value(difference: HeaderDifference, side: str) -> str:
    present = difference.in_a if side == "a" else difference.in_b
    if not present:
        return "(absent)"
    value = difference.a if side == "a" else difference.b
    if difference.field == Field.CALLBACKS.value:
        return _callbacks_text(value)
    return _value_text(value)


def _callbacks_text(value: object) -> str:
    """Show ``cbs`` as ``name order, ...`` when it is a list of [name, order] pairs."""
    if not isinstance(value, list) or not all(_is_callback(item) for item in value):
        return shown(value, _VALUE_SHOWN)
    return ", ".join(f"{_clip(name, 40)} {order}" for name, order in value) or "none"


def _is_callback(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and type(item[1]) in (int, float)
    )


def _path_lines(diff: RunDiff, rich: bool | None) -> list[str]:
    count_a, count_b = diff.transitions
    if diff.paths_identical is None:
        return [f"path: not compared ({count_a} and {count_b} transitions)"]
    first = diff.first_difference
    if first is None:
        return [f"path: identical, {count_a} transitions"]
    rows = (_step_row("a", first.a, count_a), _step_row("b", first.b, count_b))
    columns = ("run", "trigger", "transition", "epoch", "pass", "batch")
    table = Table("where the paths part", columns, rows, frozenset({3, 5}))
    return [
        f"path: differs after {first.index} common transitions (a has {count_a}, b {count_b})",
        render_table(table, rich=rich),
    ]


def _step_row(name: str, step: StepAt | None, count: int) -> tuple[str, ...]:
    if step is None:
        return (name, f"(ended: {count} transitions)", "", "", "", "")
    return (
        name,
        _clip(step.trigger, 40),
        f"{_clip(step.source, 20)} -> {_clip(step.dest, 20)}",
        str(step.epoch),
        "-" if step.pass_ is None else step.pass_.value,
        "-" if step.batch is None else str(step.batch),
    )


def _metric_lines(metrics: Sequence[MetricDifference], rich: bool | None) -> list[str]:
    if not metrics:
        return ["metrics: none (neither run has a metrics note: MetricsCB writes them)"]
    passes = len({(metric.epoch, metric.pass_) for metric in metrics})
    differing = [metric for metric in metrics if metric.differs]
    head = f"metrics: {len(metrics)} values in {passes} passes"
    if not differing:
        return [f"{head}, all equal"]
    lines = [f"{head}, {len(differing)} differ{_largest(differing)}"]
    shown_rows = differing[:METRIC_ROWS_SHOWN]
    rows = tuple(_metric_row(metric) for metric in shown_rows)
    columns = ("epoch", "pass", "metric", "a", "b", "b - a")
    lines.append(
        render_table(Table("values that differ", columns, rows, frozenset({0, 3, 4, 5})), rich=rich)
    )
    if len(differing) > len(shown_rows):
        lines.append(f"({len(shown_rows)} of {len(differing)} shown; every value in --json)")
    return lines


def _largest(metrics: Iterable[MetricDifference]) -> str:
    """Say which difference of floats is the largest in size (NaN aside), if any.

    Counts (``batches``, an int in both runs) are left out: their scale is another.
    """
    sized = [
        (abs(d), m)
        for m in metrics
        if (d := m.diff) is not None and isinstance(d, float) and not math.isnan(d)
    ]
    if not sized:
        return ""
    size, metric = max(sized, key=lambda pair: pair[0])
    return (
        f"; largest |b - a| {_number_text(size)} ({_clip(metric.name, 40)}, epoch "
        f"{metric.epoch} {metric.pass_.value})"
    )


def _metric_row(metric: MetricDifference) -> tuple[str, ...]:
    return (
        str(metric.epoch),
        metric.pass_.value,
        _clip(metric.name, 40),
        _number_text(metric.a),
        _number_text(metric.b),
        _number_text(metric.diff),
    )


def _number_text(value: Number | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 20 else f"{value:.6g}"


def _verdict(diff: RunDiff) -> str:
    unverified = [name for name, side in (("a", diff.a), ("b", diff.b)) if not side.verified]
    if unverified:
        runs = " and ".join(f"run {name}" for name in unverified)
        verb = "do" if len(unverified) > 1 else "does"
        return f"not identical: {runs} {verb} not verify, so the diff cannot be trusted"
    if diff.paths_identical is None:
        return "not identical: the tables differ"
    if diff.paths_identical:
        return "identical paths"
    return "not identical: the paths differ"
