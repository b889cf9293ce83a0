r"""Comparing two runs: their set-ups, the first transition where their paths part, their metrics.

``fsm-learner audit --diff A B`` compares two runs. Without PATH, A and B are two log
files, each standing for its last run (the one begun last in it, as ``fsm-learner
report`` takes it; the diff says so when the file holds more than one);
``runs_in_files`` chooses them. A directory is refused there: give it as PATH with two
run ids. With PATHs (files, or directories of ``*.jsonl``), A and B are run ids,
exactly as the audit prints them, looked up in those logs (``runs_by_id``): two runs of
one file, or of two. A run id found nowhere, or found twice, is a usage error naming
what was found; the only exception is a fit across ranks, found once per rank's log: its
lowest rank's log is compared (the ranks' paths are the same, which a plain audit of
their logs checks). A log that holds no run at all is no usage error but a failed check
(``NoRunError``), as ``fsm-learner audit`` of it fails.

The files involved (A and B, or the PATHs) are audited first, together, as ``fsm-learner
audit`` of them audits them (``verdict.audit_files``): each run's own problem, a run id
twice, the lineages of resumed fits, the ranks of a distributed fit. A run the audit
does not verify (or accounts for: a killed run a verified lineage continues) is reported
with its problems, and the diff fails: the diff never vouches for a run the audit
rejects. What its records say is still compared and shown, read as they are
(``runlog.read_run``, the run the audit reported), since it is often why one looks.

``diff_runs`` compares, in order:

- the kinds: a fit against a validate or predict run is said first, and their metrics
  are not compared (their passes are not comparable), nor are they ever identical;
- the table digest: the same, or not; runs written by different tables took routes of
  different machines, so their paths are not compared step by step (``paths_identical``
  is None); a table other than this fsm_learner's never verifies anyway;
- the header, as the audit keeps it (a field too big or too deep is a short note; the
  envelope's ``schema`` and ``keyed`` included): every field whose value differs, or
  that one run lacks, with both values, compared as JSON (so ``1`` is not ``true``, and
  ``cbs``, the callbacks and their orders, is compared as a list: same callbacks in
  another order differ). The text shows a differing object or list field by the leaves
  that differ (``rng.torch``, ``opt_groups[0].lr``). Left out, because they differ from
  run to run whatever the set-up: ``wall`` (when it started) and ``prev`` (the seal
  before it in its file); the run ids are shown, never compared;
- the paths: the two sequences of transitions as (trigger, source, dest, training,
  epoch, iter), and the first index where they differ, with what each run did there
  (trigger, route, epoch, pass, batch), or that it had ended (a run whose path is a
  prefix of the other's). When a run resumes another (its header's ``resumed_from``),
  its path begins where the checkpoint re-enters (``at``: epoch, pass, batches begun):
  both paths are compared from that position (the later one when both resume), each
  from its first transition between batches of that pass with that many batches begun;
  the verdict is then "identical from the resume point". A run that never reaches that
  position differs there, as a run that had ended;
- the metrics: the ``metrics`` notes (``MetricsCB``'s, the last of each pass) matched by
  (epoch, pass), all passes of either run (only those both have when a run resumes
  another); for every field that holds a number (``train_loss``, ``valid_accuracy``,
  ``batches``...; the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` are the floats
  they name) in either run, both values and ``b - a`` (exact for two ints; else as
  floats, an int beyond a float's range being an infinity); a value only one run has is
  shown alone. At most ``METRIC_VALUES_KEPT`` values of each run are kept (the first
  passes'); the rest are counted. Other notes are not compared.

The runs are identical (``RunDiff.identical``, the command's exit 0) when the audit
verifies both, they are of one kind, and their paths are (from the resume point): set-ups
and metrics may differ (the same path under another seed is exactly what a
reproducibility check wants to see). ``render_diff`` is the text report: the passes'
differing values up to ``METRIC_ROWS_SHOWN`` rows and the largest ``|b - a|``
(everything is in ``RunDiff.to_json``). ``RunDiff.to_json`` is plain JSON: NaN and the
infinities are the strings the log writes, and an integer beyond int64 (which JSON
parsers commonly cannot hold) is the string of its decimal digits. Everything shown of a
log is made printable and bounded: logs are untrusted input. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from fsm_learner._compat import StrEnum
from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.codec import Field, json_value
from fsm_learner.audit.files import file_kind
from fsm_learner.audit.lineage import PassPosition
from fsm_learner.audit.ranks import world_size_of
from fsm_learner.audit.runlog import RunLog, Step, Steps, read_run
from fsm_learner.audit.summary import Table, render_table
from fsm_learner.audit.verdict import Audited, Verdict, audit_files
from fsm_learner.exceptions import ConfigurationError, NoRunError
from fsm_learner.machine import RunKind, State, Trigger

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from fsm_learner.audit.replay import Problem, RunReport

__all__ = [
    "HEADER_ROWS_SHOWN",
    "LEFT_OUT",
    "METRICS_NOTE",
    "METRIC_ROWS_SHOWN",
    "METRIC_VALUES_KEPT",
    "ChosenRun",
    "HeaderDifference",
    "MetricDifference",
    "Pass",
    "PathDifference",
    "Resume",
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
METRIC_VALUES_KEPT: Final = 100_000
"""The most metric values kept of one run (its first passes'); the rest are counted."""
HEADER_ROWS_SHOWN: Final = 30
"""The most differing header values (leaves of objects and lists) the text report lists."""
_IDS_LISTED: Final = 8
_PLACES_LISTED: Final = 3
_PROBLEMS_SHOWN: Final = 3
_ID_SHOWN: Final = 64
_VALUE_SHOWN: Final = 60
_HEADER_DEPTH: Final = 3
"""How deep the text follows a differing object or list to the leaves that differ."""
_INT64: Final = range(-(1 << 63), 1 << 63)
_INT_SHOWN: Final = 20
_NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})
_BETWEEN_PASSES: Final = frozenset({State.IDLE.value, State.FIT.value})
_PASS_LEVEL: Final = frozenset({*_BETWEEN_PASSES, State.EPOCH.value})
_FILES_OR_IDS: Final = (
    "without PATH, --diff A B takes two log files; with PATHs, two run ids found in them "
    "(fsm-learner audit runs/ --diff RUN_A RUN_B)"
)
_KIND_NAMES: Final = {RunKind.FIT: "a fit", RunKind.VALIDATE: "a validate run"}


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


def _kind_name(kind: RunKind | None) -> str:
    if kind is None:
        return "a run of unknown kind"
    return _KIND_NAMES.get(kind, f"a {kind.value} run")


# -- choosing the two runs --------------------------------------------------------------------


@attrs.frozen
class ChosenRun:
    """One side of a diff: the run's audit report and verdict, its log, how it was chosen."""

    path: Path
    report: RunReport
    verdict: Verdict
    """What ``fsm-learner audit`` of the files involved says of the run."""
    file_problem: Problem | None
    """The problem of its file as a whole (a line of no run, say), if any."""
    chosen: str = ""
    """How it was chosen, when that is worth saying: "the last of 3 runs in its file"."""

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every reason the run cannot be trusted: the audit's verdict's, then its file's."""
        of_file = () if self.file_problem is None else (self.file_problem,)
        return self.verdict.problems + of_file

    @property
    def problem(self) -> Problem | None:
        """The first reason the run cannot be trusted; None if there is none."""
        return next(iter(self.problems), None)

    @property
    def verified(self) -> bool:
        """Whether the audit verifies the run (or accounts for it), in a file that verifies."""
        return not self.problems

    @property
    def rank(self) -> int | None:
        """The rank its header names (None: none, or not an int)."""
        rank = self.report.header.get(Field.RANK.value)
        return rank if type(rank) is int else None


def runs_in_files(a: str, b: str, *, key: bytes | None) -> tuple[ChosenRun, ChosenRun]:
    """Choose each log's last run (the one begun last in it); both files audited with ``key``.

    Raises ConfigurationError when a path is no log file, NoRunError when a log holds
    no run.
    """
    path_a, path_b = _log_file(a), _log_file(b)
    if path_b != path_a and _same_file(path_a, path_b):
        path_b = path_a  # one file audited twice would hold every run id twice
    audited = audit_files(list(dict.fromkeys((path_a, path_b))), key=key)
    return _last_run(path_a, audited), _last_run(path_b, audited)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _last_run(path: Path, audited: Audited) -> ChosenRun:
    reports = [report for file, report in audited.runs if file == path]
    name = file_name(path)
    file_problem = next((p for p in audited.file_problems if p.path == name), None)
    if not reports:
        why = "" if file_problem is None else f" ({file_problem})"
        msg = f"{name} holds no run to compare{why}"
        raise NoRunError(msg)
    last = max(reports, key=lambda report: report.first_line)
    chosen = f"the last of {len(reports)} runs in its file" if len(reports) > 1 else ""
    return ChosenRun(path, last, audited.verdict(last), file_problem, chosen)


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
    if kind is not None and path.is_dir():  # which of its runs? the ids say
        name = file_name(path)[:200]
        msg = (
            f"{name} is {kind}, not a log file: give it as PATH with two of its run ids "
            f"(fsm-learner audit {name} --diff RUN_A RUN_B), or two log files"
        )
        raise ConfigurationError(msg)
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
    audited = audit_files(files, key=key)
    found: dict[str, list[ChosenRun]] = {a: [], b: []}
    listed: dict[str, None] = {}
    for path, report in audited.runs:
        if len(listed) < _IDS_LISTED:
            listed[_clip(report.run_id) or "''"] = None
        if report.run_id in found:
            problem = next((p for p in audited.file_problems if p.path == report.path), None)
            found[report.run_id].append(ChosenRun(path, report, audited.verdict(report), problem))
    total = len(audited.runs)
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
            out["a"] = _json_safe(self.a)
        if self.in_b:
            out["b"] = _json_safe(self.b)
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

    ``index`` counts from where the paths are compared (``RunDiff.compared_from``). None
    on a side means that run had ended: its path is a prefix of the other's.
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


@attrs.frozen
class Resume:
    """A run of the diff that resumes another: its header's ``resumed_from``."""

    side: str
    """Which run of the diff resumes: "a" or "b"."""
    parent: str
    """The run it resumes."""
    at: PassPosition
    """Where it re-enters: a pass, and how many of its batches were begun."""

    def to_json(self) -> dict[str, Any]:
        """Return which run resumes which, and where (``at`` as the log writes it)."""
        return {"run": self.side, "resumes": self.parent, "at": self.at.to_json()}


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
        """``b - a``: exact for two ints, else as floats (a huge int is an infinity)."""
        a, b = self.a, self.b
        if a is None or b is None:
            return None
        if isinstance(a, int) and isinstance(b, int):
            return b - a
        return _as_float(b) - _as_float(a)

    @property
    def differs(self) -> bool:
        """Whether the values differ: one is missing, or they are unequal (NaN equals NaN)."""
        a, b = self.a, self.b
        if a is None or b is None:
            return True
        return a != b and not (_is_nan(a) and _is_nan(b))

    def to_json(self) -> dict[str, Any]:
        """Return the value's place and name, both values and ``diff``.

        NaN and infinities are written as the log writes them, an int beyond int64 as
        its digits; a run that lacks the value has no key for it, and ``diff`` is then null.
        """
        out: dict[str, Any] = {"epoch": self.epoch, "pass": self.pass_.value, "name": self.name}
        if self.a is not None:
            out["a"] = _json_safe(self.a)
        if self.b is not None:
            out["b"] = _json_safe(self.b)
        out["diff"] = _json_safe(self.diff)
        return out


def _as_float(value: Number) -> float:
    """Return ``value`` as a float; an int beyond a float's range as the infinity of its sign."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _is_nan(value: Number) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _json_safe(value: object) -> object:
    """Return ``value`` as data any JSON writer takes: non-finite floats and big ints as text."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if value in _INT64 else _int_text(value)
    if isinstance(value, float):
        return json_value("value", value)
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return shown(value)


def _int_text(value: int) -> str:
    """Return an int's decimal digits; an infinity's name past what ``str`` converts."""
    try:
        return str(value)
    except ValueError:  # past sys.get_int_max_str_digits()
        return "Infinity" if value > 0 else "-Infinity"


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
    """The values of the runs' ``metrics`` notes compared, by epoch, pass and name."""
    kinds_same: bool = True
    """Whether both runs are of one kind (fit, validate, predict); else no metric is compared."""
    resumes: tuple[Resume, ...] = ()
    """Each run of the two that resumes another."""
    compared_from: tuple[int, int] = (0, 0)
    """The index in each run's path from which the paths are compared (the resume point)."""
    metrics_left_out: int = 0
    """Metric values beyond ``METRIC_VALUES_KEPT`` of a run: not compared."""

    @property
    def paths_identical(self) -> bool | None:
        """Whether the paths are the same; None when not compared (the tables differ)."""
        if not self.table_same:
            return None
        return self.first_difference is None

    @property
    def identical(self) -> bool:
        """The verdict: both verify, are of one kind, and their paths are the same."""
        both = self.a.verified and self.b.verified
        return both and self.kinds_same and self.paths_identical is True

    def to_json(self) -> dict[str, Any]:
        """Everything found, as JSON-able data (ints beyond int64 as their digits)."""
        return {
            "a": _side_json(self.a, self.transitions[0]),
            "b": _side_json(self.b, self.transitions[1]),
            "left_out": [field.value for field in LEFT_OUT],
            "kinds_same": self.kinds_same,
            "resumes": [resume.to_json() for resume in self.resumes],
            "table_same": self.table_same,
            "header_differences": [difference.to_json() for difference in self.header],
            "paths_identical": self.paths_identical,
            "compared_from": list(self.compared_from),
            "first_difference": (
                None if self.first_difference is None else self.first_difference.to_json()
            ),
            "metrics": [metric.to_json() for metric in self.metrics],
            "metrics_left_out": self.metrics_left_out,
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
        "problems": [attrs.asdict(each) for each in side.problems],
        "continued_by": side.verdict.continued_by,
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
    kinds_same = a.report.kind is b.report.kind
    resumes = _resumes(a, b)
    at = max((r.at for r in resumes), key=_position_order, default=None)
    start = (_start(log_a.steps, at), _start(log_b.steps, at))
    metrics_a, left_a = _metrics(log_a)
    metrics_b, left_b = _metrics(log_b)
    return RunDiff(
        a=a,
        b=b,
        transitions=(len(log_a.steps), len(log_b.steps)),
        table_same=table_same,
        header=tuple(_header_differences(a.report.header, b.report.header)),
        first_difference=(
            _first_difference(log_a.steps, log_b.steps, start, (a.report.kind, b.report.kind))
            if table_same
            else None
        ),
        metrics=(
            tuple(_metric_differences(metrics_a, metrics_b, both_only=bool(resumes)))
            if kinds_same
            else ()
        ),
        kinds_same=kinds_same,
        resumes=resumes,
        compared_from=start,
        metrics_left_out=left_a + left_b,
    )


def _records(a: ChosenRun, b: ChosenRun) -> tuple[RunLog, RunLog]:
    """Read both runs' records, each the run the audit reported (once when they are one)."""
    log_a = read_run(a.path, a.report.run_id, a.report.first_line)
    if (b.path, b.report.run_id, b.report.first_line) == (
        a.path,
        a.report.run_id,
        a.report.first_line,
    ):
        return log_a, log_a
    return log_a, read_run(b.path, b.report.run_id, b.report.first_line)


def _same(a: object, b: object) -> bool:
    """Whether two values the audit kept are the same JSON (``1`` is not ``1.0`` or ``true``).

    Objects are the same whatever the order of their keys; NaN is the same as NaN, and
    ``0.0`` is not ``-0.0``.
    """
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(value, b[name]) for name, value in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


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


def _resumes(a: ChosenRun, b: ChosenRun) -> tuple[Resume, ...]:
    """Each of the runs whose header says it resumes another (a well-formed ``resumed_from``)."""
    found = []
    for name, side in (("a", a), ("b", b)):
        value = side.report.header.get(Field.RESUMED_FROM.value)
        if not isinstance(value, dict):
            continue
        parent, at = value.get("run"), _pass_position(value.get("at"))
        if isinstance(parent, str) and at is not None:
            found.append(Resume(name, parent, at))
    return tuple(found)


def _pass_position(value: object) -> PassPosition | None:
    if not isinstance(value, dict):
        return None
    epoch, training, it = value.get("ep"), value.get("tr"), value.get("it")
    if type(epoch) is not int or type(training) is not bool or type(it) is not int:
        return None
    return PassPosition(epoch, training, it) if epoch >= 0 and it >= 0 else None


def _position_order(at: PassPosition) -> tuple[int, int, int]:
    """Order positions as a fit reaches them: epoch, its training pass first, batches begun."""
    return at.epoch, 0 if at.training else 1, at.it


def _start(steps: Steps, at: PassPosition | None) -> int:
    """Return the index of the first transition at ``at`` (0 without one; the end if never).

    That is the first transition out of state ``epoch`` in pass ``at`` once ``at.it``
    of its batches were begun: where a run resumed there takes its first step of its own.
    """
    if at is None:
        return 0
    pass_key: tuple[int, bool] | None = None
    begun = 0
    for index, step in enumerate(steps):
        if step.source == State.EPOCH.value and pass_key == at.pass_key and begun == at.it:
            return index
        if step.trigger == Trigger.BEGIN_EPOCH.value:  # a resumed pass begins at its batch
            pass_key, begun = (step.epoch, step.training), step.iter
        elif step.trigger == Trigger.BEGIN_BATCH.value:
            begun += 1
    return len(steps)


def _key(step: Step) -> tuple[str, str, str, bool, int, int]:
    return step.trigger, step.source, step.dest, step.training, step.epoch, step.iter


def _first_difference(
    a: Steps,
    b: Steps,
    start: tuple[int, int],
    kinds: tuple[RunKind | None, RunKind | None],
) -> PathDifference | None:
    """Return where the paths part from ``start`` (None: the same).

    The paths are walked in lockstep, one transition of each at a time: no list of them
    is built. One run compared with itself is the same path, not walked.
    """
    start_a, start_b = start
    if a is b and start_a == start_b:
        return None
    rest_a, rest_b = itertools.islice(a, start_a, None), itertools.islice(b, start_b, None)
    pairs = zip(rest_a, rest_b, strict=False)  # one may be longer: it differs where the other ends
    common = min(len(a) - start_a, len(b) - start_b)
    index = next((i for i, (x, y) in enumerate(pairs) if _key(x) != _key(y)), common)
    if start_a + index == len(a) and start_b + index == len(b):
        return None
    return PathDifference(
        index, _step_at(a, start_a + index, kinds[0]), _step_at(b, start_b + index, kinds[1])
    )


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


def _metrics(run: RunLog) -> tuple[dict[_PassKey, dict[str, Number]], int]:
    """Each pass's numbers, from its last ``metrics`` note; and how many were left out.

    At most ``METRIC_VALUES_KEPT`` values are kept, the first passes' (a pass's last note
    replaces the values its earlier notes gave).
    """
    passes: dict[_PassKey, dict[str, Number]] = {}
    kept = left_out = 0
    for note in run.notes:
        if note.name != METRICS_NOTE:
            continue
        old = passes.pop((note.epoch, note.training), {})
        kept -= len(old)
        numbers: dict[str, Number] = {}
        for name, value in note.fields.items():
            number = _number(value)
            if number is None:
                continue
            if kept + len(numbers) >= METRIC_VALUES_KEPT:
                left_out += 1
                continue
            numbers[name] = number
        kept += len(numbers)
        passes[note.epoch, note.training] = numbers
    return passes, left_out


def _metric_differences(
    a: Mapping[_PassKey, Mapping[str, Number]],
    b: Mapping[_PassKey, Mapping[str, Number]],
    *,
    both_only: bool,
) -> Iterator[MetricDifference]:
    """Yield every value of either run, pass by pass (epoch, then training before validation).

    Only the passes both runs have, with ``both_only``.
    """
    keys = a.keys() & b.keys() if both_only else a.keys() | b.keys()
    for epoch, training in sorted(keys, key=lambda key: (key[0], not key[1])):
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
    """Render the diff for people: the runs, kinds, resumes, table, header, path, metrics, verdict.

    Boxed tables when rich is installed (or ``rich``), as the audit's summary draws them.
    """
    lines = [*_side_lines("a", diff.a), *_side_lines("b", diff.b)]
    lines += _kind_lines(diff)
    lines += _resume_lines(diff)
    lines.append(_table_line(diff))
    lines += _header_lines(diff, rich)
    lines += _path_lines(diff, rich)
    lines += _metric_lines(diff, rich)
    lines.append(_verdict(diff))
    return "\n".join(lines)


def _side_lines(name: str, side: ChosenRun) -> list[str]:
    report = side.report
    verdict = "verified" if side.verified else "DOES NOT VERIFY"
    if side.verified and side.verdict.continued_by is not None:
        verdict = f"killed, continued by run {_clip(side.verdict.continued_by)} (accounted for)"
    kind = "kind unknown" if report.kind is None else report.kind.value
    chosen = f"  ({side.chosen})" if side.chosen else ""
    run_id = _clip(report.run_id) or "?"
    lines = [
        f"{name}: {report.path}  run {run_id}  {kind}  {report.status.value}  {verdict}{chosen}"
    ]
    problems = side.problems
    lines += [f"   problem: {printable(str(p))}" for p in problems[:_PROBLEMS_SHOWN]]
    if len(problems) > _PROBLEMS_SHOWN:
        lines.append(f"   ({len(problems) - _PROBLEMS_SHOWN} more problems: fsm-learner audit)")
    return lines


def _kind_lines(diff: RunDiff) -> list[str]:
    if diff.kinds_same:
        return []
    kind_a, kind_b = _kind_name(diff.a.report.kind), _kind_name(diff.b.report.kind)
    return [
        (
            f"KINDS DIFFER: a is {kind_a}, b {kind_b}: their passes are not comparable "
            "(metrics not compared)"
        )
    ]


def _resume_lines(diff: RunDiff) -> list[str]:
    lines = []
    for resume in diff.resumes:
        at = resume.at
        pass_ = _pass(RunKind.FIT, training=at.training).value
        lines.append(
            f"{resume.side} resumes run {_clip(resume.parent)} at epoch {at.epoch}, {pass_} "
            f"batch {at.it}: its path begins there; compare the lineage's runs with "
            "`fsm-learner audit DIR`"
        )
    if lines:
        start_a, start_b = diff.compared_from
        lines.append(
            f"   paths compared from the resume point (a's transition {start_a}, b's "
            f"{start_b}); metrics of the passes both runs have"
        )
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
    rows = [row for difference in diff.header for row in _header_rows(difference)]
    fields = "field differs" if count == 1 else "fields differ"
    lines = [
        f"header: {count} {fields} (not compared: {left_out})",
        render_table(
            Table(
                "header values that differ", ("field", "a", "b"), tuple(rows[:HEADER_ROWS_SHOWN])
            ),
            rich=rich,
        ),
    ]
    if len(rows) > HEADER_ROWS_SHOWN:
        lines.append(f"({HEADER_ROWS_SHOWN} of {len(rows)} shown; every field in --json)")
    return lines


def _header_rows(difference: HeaderDifference) -> Iterator[tuple[str, str, str]]:
    """Yield the rows of a field: one, or a row per leaf that differs of an object or list."""
    a = difference.a if difference.in_a else _MISSING
    b = difference.b if difference.in_b else _MISSING
    if difference.field == Field.CALLBACKS.value:
        yield _clip(difference.field), _callbacks_text(a), _callbacks_text(b)
        return
    for name, value_a, value_b in _leaves(_clip(difference.field, 40), a, b, 0):
        yield _clip(name), _shown_value(value_a), _shown_value(value_b)


def _leaves(name: str, a: object, b: object, depth: int) -> Iterator[tuple[str, object, object]]:
    """Yield (name, a, b) for each leaf that differs, following objects and equal-length lists."""
    if depth < _HEADER_DEPTH and isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            value_a, value_b = a.get(key, _MISSING), b.get(key, _MISSING)
            if not _same(value_a, value_b):
                yield from _leaves(f"{name}.{_clip(str(key), 40)}", value_a, value_b, depth + 1)
        return
    if depth < _HEADER_DEPTH and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (value_a, value_b) in enumerate(zip(a, b, strict=True)):
            if not _same(value_a, value_b):
                yield from _leaves(f"{name}[{index}]", value_a, value_b, depth + 1)
        return
    yield name, a, b


def _shown_value(value: object) -> str:
    return "(absent)" if value is _MISSING else _value_text(value)


def _callbacks_text(value: object) -> str:
    """Show ``cbs`` as ``name order, ...`` when it is a list of [name, order] pairs."""
    if value is _MISSING:
        return "(absent)"
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
    where = " from the resume point" if diff.resumes else ""
    if first is None and not diff.resumes:
        return [f"path: identical, {count_a} transitions"]
    if first is None:
        compared = count_a - diff.compared_from[0]
        return [f"path: identical{where}, {compared} transitions (a has {count_a}, b {count_b})"]
    rows = (_step_row("a", first.a, count_a), _step_row("b", first.b, count_b))
    columns = ("run", "trigger", "transition", "epoch", "pass", "batch")
    table = Table("where the paths part", columns, rows, frozenset({3, 5}))
    return [
        (
            f"path: differs after {first.index} common transitions{where} (a has {count_a}, "
            f"b {count_b})"
        ),
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


def _metric_lines(diff: RunDiff, rich: bool | None) -> list[str]:
    if not diff.kinds_same:
        return ["metrics: not compared (the runs are of different kinds)"]
    metrics = diff.metrics
    left_out = (
        f" ({diff.metrics_left_out} more values not compared: over {METRIC_VALUES_KEPT} a run)"
        if diff.metrics_left_out
        else ""
    )
    if not metrics:
        none = "no pass both runs have" if diff.resumes else "neither run has a metrics note"
        return [f"metrics: none ({none}: MetricsCB writes them){left_out}"]
    passes = len({(metric.epoch, metric.pass_) for metric in metrics})
    differing = [metric for metric in metrics if metric.differs]
    head = f"metrics: {len(metrics)} values in {passes} passes{left_out}"
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
    """Show a number in at most about 20 characters: a long int as ``1.84467e+19``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = _int_text(value)
    if len(text) <= _INT_SHOWN or not text.lstrip("-").isdigit():
        return text
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    mantissa = f"{digits[0]}.{digits[1:6]}".rstrip("0").rstrip(".")
    return f"{sign}{mantissa}e+{len(digits) - 1}"


def _verdict(diff: RunDiff) -> str:
    unverified = [name for name, side in (("a", diff.a), ("b", diff.b)) if not side.verified]
    if unverified:
        runs = " and ".join(f"run {name}" for name in unverified)
        verb = "do" if len(unverified) > 1 else "does"
        return f"not identical: {runs} {verb} not verify, so the diff cannot be trusted"
    if not diff.kinds_same:
        kind_a, kind_b = _kind_name(diff.a.report.kind), _kind_name(diff.b.report.kind)
        return f"not identical: a is {kind_a}, b {kind_b}"
    if diff.paths_identical is None:
        return "not identical: the tables differ"
    where = " from the resume point" if diff.resumes else ""
    if diff.paths_identical:
        return f"identical{where}" if diff.resumes else "identical paths"
    return f"not identical: the paths differ{where}"
