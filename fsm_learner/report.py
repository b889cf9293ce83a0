"""One run of an audit log as one self-contained HTML page: ``fsm-learner report``.

The page shows what the audit says of the run (verified, or the problem, in red at the
top), its header (model, optimizer, callbacks, device, seed, versions), the path it took
through the machine (the table's states in a fixed row, each transition taken drawn once
and labelled with how often), a timeline of its passes and of its cancels and failure,
where its time went (``RunReport.time_by_work_ns``), the curves of the ``metrics`` notes
MetricsCB writes per pass, the cancels and the failure listed, the slowest transitions,
and, when the run noted ``hook_times``, the time per callback.

``load_run`` audits the files as ``fsm-learner audit`` of them would (``audit_files``: a
log alone, or every log of a directory, with lineages and ranks) and takes the audit's
verdict on the chosen run; it reads that run's records, and only those
(``runlog.read_run``, by the line of its header: never a copy under the same id).
``render_page`` draws them, reading the transitions once (``_Walk``): a run of millions of
batches keeps its passes and a bounded sample of its events, never a list of transitions.
The page is inline SVG drawn here (no Graphviz), a stylesheet and no script: it loads
nothing, and its Content-Security-Policy forbids it to. Drawing never emits an element
per batch: passes are bars (grouped when there are many), cancels are binned along time,
curves are one polyline each (thinned when long), on value axes reckoned in decimal, so
that any finite float (1.7e308, 5e-324) is charted.

A log is hostile input: every text taken from it (a run id, a callback's name, a metric's
name, an exception's message) is made printable (``_display.printable``), cut to length
and HTML-escaped where it is placed, and only numbers of the right type are drawn. Markup
is built with ``_el``, which escapes every string it is given but the markup it built.

One log file, one run: a fit across ranks writes one log per rank, and the page shows
the rank whose log it is given (its verdict takes the other ranks' logs in, when they are
read: a directory).
"""

from __future__ import annotations

import html
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING, Any, Final

import attrs

from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.codec import FailureField, Field, RunStatus
from fsm_learner.audit.files import NotRegularError, log_files
from fsm_learner.audit.lineage import was_killed
from fsm_learner.audit.replay import Problem, RunReport, Work
from fsm_learner.audit.runlog import PassSpan, RunLog, Step, read_run
from fsm_learner.audit.verdict import Audited, Verdict, audit_files
from fsm_learner.exceptions import ConfigurationError, NoRunError
from fsm_learner.machine import TRANSITION_TABLE, RunKind, State, Trigger

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from collections.abc import Set as AbstractSet
    from pathlib import Path

    from fsm_learner.audit.codec import Note

__all__ = ["RunPage", "load_run", "render_page"]


# -- choosing the run --------------------------------------------------------------------------


@attrs.frozen
class RunPage:
    """One run of a log as the page shows it: the audit's verdict and report, and its records."""

    path: Path
    report: RunReport
    log: RunLog
    verdict: Verdict = attrs.field(factory=lambda: Verdict(()))
    """What ``fsm-learner audit`` of the files read says of the run (``audit_files``)."""
    file_problem: Problem | None = None
    """What the audit found wrong with the run's file beyond its runs, if anything."""
    runs_in_file: int = 1
    """How many runs the run's file holds."""
    by_default: bool = True
    """The run was chosen as the last begun in its file (no ``--run-id``)."""
    alone: bool = True
    """The run's file was read alone (LOG was a file), not with the other logs beside it."""

    @property
    def verified(self) -> bool:
        """True when the audit names no problem of the run, nor of its file."""
        return self.verdict.verified and self.file_problem is None

    @property
    def problem(self) -> Problem | None:
        """Why the page's run does not verify: the first problem the audit names."""
        return self.verdict.problems[0] if self.verdict.problems else self.file_problem

    @property
    def resumed_by(self) -> str | None:
        """The run that resumed this killed one, when the lineage that says so verifies."""
        return self.verdict.continued_by

    @property
    def choice_said(self) -> str | None:
        """Say that the file holds other runs, when the run was chosen as its last."""
        if not self.by_default or self.runs_in_file < 2:
            return None
        return f"the last of {self.runs_in_file:,} runs in its file; --run-id picks another"


_RUN_IDS_LISTED: Final = 8


def load_run(path: Path, *, run_id: str | None = None, key: bytes | None = None) -> RunPage:
    """Audit the log ``path`` and read one of its runs: ``run_id``, or the run begun last.

    ``path`` may be a directory: its newest log (by modification time) is read, or with
    ``run_id`` the newest that holds that run; every log in it is audited, as
    ``fsm-learner audit`` of the directory does (the lineage of a resumed run, the ranks
    of a distributed one). Raise, in one line, ConfigurationError when there is no such log
    or no run ``run_id``, NoRunError when the log holds no run (as its audit fails it).
    """
    files, errors = log_files([path])
    if not files:
        raise ConfigurationError(errors[0] if errors else f"{file_name(path)}: no audit log")
    audited = audit_files(files, key=key)
    found = _choose(audited, _newest_first(files), run_id)
    if found is None:
        raise ConfigurationError(_no_such_run(audited, path, files, str(run_id)))
    file, report, runs_in_file = found
    try:
        log = read_run(file, report.run_id, report.first_line)
    except (OSError, NotRegularError) as exc:  # changed since its audit
        msg = f"{file_name(file)}: {exc}; no run to report"
        raise NoRunError(msg) from None
    return RunPage(
        file,
        report,
        log,
        audited.verdict(report),
        _file_problem(audited, file),
        runs_in_file,
        by_default=run_id is None,
        alone=not path.is_dir(),
    )


def _newest_first(files: Sequence[Path]) -> list[Path]:
    def modified(file: Path) -> tuple[int, str]:
        try:
            return file.stat().st_mtime_ns, str(file)
        except OSError:
            return 0, str(file)

    return sorted(files, key=modified, reverse=True)


def _choose(
    audited: Audited, files: Sequence[Path], run_id: str | None
) -> tuple[Path, RunReport, int] | None:
    """Find the run to draw, and how many runs its file holds; None when no run is ``run_id``.

    Raise NoRunError when the newest log (or, with ``run_id``, every log) holds no run.

    The run is ``run_id``'s first in the newest log holding it, or the newest log's last begun.
    """
    by_file: dict[Path, list[RunReport]] = {}
    for file, report in audited.runs:
        by_file.setdefault(file, []).append(report)
    if run_id is None:
        runs = by_file.get(files[0], [])
        if not runs:
            raise NoRunError(_no_run_said(audited, files[0]))
        return files[0], max(runs, key=lambda r: r.first_line), len(runs)
    for file in files:
        matches = [r for r in by_file.get(file, []) if r.run_id == run_id]
        if matches:
            return file, min(matches, key=lambda r: r.first_line), len(by_file[file])
    if not audited.runs:
        raise NoRunError(_no_run_said(audited, files[0]))
    return None


def _no_run_said(audited: Audited, file: Path) -> str:
    problem = _file_problem(audited, file)
    return f"{file_name(file)}: no run in it" if problem is None else f"{problem}; no run to report"


def _no_such_run(audited: Audited, path: Path, files: Sequence[Path], run_id: str) -> str:
    ids = [_clip(printable(report.run_id), 64) for _, report in audited.runs]
    listed = ", ".join(ids[:_RUN_IDS_LISTED]) + (" ..." if len(ids) > _RUN_IDS_LISTED else "")
    where = (
        file_name(files[0]) if len(files) == 1 else f"the {len(files)} logs of {file_name(path)}"
    )
    return f"{where} has no run {shown(run_id)}; its runs: {listed}"


def _file_problem(audited: Audited, file: Path) -> Problem | None:
    name = file_name(file)
    return next((p for p in audited.file_problems if p.path == name), None)


# -- markup --------------------------------------------------------------------------------------


class _Html(str):
    """Markup built here, placed as it is; any other str is text, escaped where it goes."""

    __slots__ = ()


def _escaped(text: str) -> str:
    return html.escape(printable(text))


def _join(parts: Iterable[str | None]) -> _Html:
    """Join markup and text (escaped) into markup; None is nothing."""
    return _Html("".join(p if isinstance(p, _Html) else _escaped(p) for p in parts if p))


def _number(value: float) -> str:
    text = f"{value:.1f}"
    return text.removesuffix(".0")


def _attributes(attributes: Mapping[str, object]) -> str:
    out = []
    for name, value in attributes.items():
        if value is None or value is False:
            continue
        shown_value = _number(value) if isinstance(value, float) else str(value)
        out.append(f' {name.rstrip("_").replace("_", "-")}="{_escaped(shown_value)}"')
    return "".join(out)


def _el(tag: str, *children: str | None, **attributes: object) -> _Html:
    """Build an element: attribute values and text children escaped, markup children kept.

    ``class_`` is ``class``; other underscores become hyphens (``stroke_width``).
    """
    return _Html(f"<{tag}{_attributes(attributes)}>{_join(children)}</{tag}>")


def _leaf(tag: str, **attributes: object) -> _Html:
    """Build an element with no content: ``<rect .../>``, ``<meta .../>``."""
    return _Html(f"<{tag}{_attributes(attributes)}/>")


def _path(*commands: str | float) -> str:
    """Write an SVG path's data: commands as they are, numbers rounded to a tenth."""
    return " ".join(c if isinstance(c, str) else _number(c) for c in commands)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _log_text(value: object, limit: int = 200) -> str:
    """Show a value read from the log as short text: a str cut, anything else described."""
    if isinstance(value, str):
        return _clip(value, limit)
    return shown(value, limit)


def _section(anchor: str, title: str, *content: str | None) -> _Html:
    return _el("section", _el("h2", title), *content, id=anchor)


def _table(
    columns: Sequence[str], rows: Iterable[Sequence[str | None]], numeric: set[int]
) -> _Html:
    head = _el(
        "tr", *(_el("th", c, class_="num" if i in numeric else None) for i, c in enumerate(columns))
    )
    body = [
        _el(
            "tr",
            *(
                _el("td", cell, class_="num" if i in numeric else None)
                for i, cell in enumerate(row)
            ),
        )
        for row in rows
    ]
    return _el("table", _el("thead", head), _el("tbody", *body))


def _swatch(css_class: str) -> _Html:
    return _el("span", class_=f"swatch {css_class}")


def _legend(*items: tuple[str, str]) -> _Html:
    return _el("div", *(_el("span", _swatch(c), text) for c, text in items), class_="legend")


# -- numbers and times ---------------------------------------------------------------------------


def _duration(ns: float) -> str:
    """Show a duration for people: ``0.41 ms``, ``12.3 ms``, ``4.56 s``, ``3 min 12 s``."""
    seconds = ns / 1e9
    if seconds < 1e-3:
        return f"{ns / 1e6:.3f} ms"
    if seconds < 1:
        return f"{ns / 1e6:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count:,} {one if count == 1 else many}"


_ROUND_STEPS: Final = tuple(Decimal(m) for m in ("1", "2", "2.5", "5", "10"))


def _nice_step(span: Decimal, count: int) -> Decimal:
    """Return a round step (1, 2, 2.5 or 5 times a power of ten) of about ``span / count``.

    Reckoned in decimal, where no finite float overflows or underflows: a span of 3.6e308
    or of 5e-324 gets its step as 0.25 does.
    """
    raw = span / count
    magnitude = Decimal(1).scaleb(raw.adjusted())
    return next(m * magnitude for m in _ROUND_STEPS if m * magnitude >= raw)


def _ticks(low: Decimal, high: Decimal, count: int) -> tuple[Decimal, list[Decimal]]:
    """Round values from ``low`` to ``high`` (inclusive where round), about ``count``; the step."""
    step = _nice_step(high - low if high > low else Decimal(1), count)
    return step, _steps(low, high, step)


def _steps(low: Decimal, high: Decimal, step: Decimal) -> list[Decimal]:
    """Return the multiples of ``step`` from ``low`` to ``high``, both included."""
    tick = (low / step).to_integral_value(rounding=ROUND_CEILING) * step
    ticks = []
    while tick <= high:
        ticks.append(tick)
        tick += step
    return ticks


def _tick_text(value: Decimal, step: Decimal) -> str:
    """Write a tick's value with the decimals its step needs (0.25: two).

    An exponent where that would take more than six decimals or ten digits (2.5e-07, 4.5e+307).
    """
    if value == 0:
        return "0"
    decimals = next((d for d in range(7) if step.scaleb(d) == step.scaleb(d).to_integral()), None)
    if decimals is None or abs(value) >= _PLAIN_BELOW:
        digits = max(1, min(17, value.adjusted() - step.adjusted() + 2))
        mantissa, _, exponent = f"{value:.{digits}e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    return f"{value:.{decimals}f}"


_PLAIN_BELOW: Final = Decimal("1e10")


@attrs.frozen
class _Axis:
    """A chart's value axis: its ends and round ticks, in decimal (any finite floats fit)."""

    low: Decimal
    high: Decimal
    step: Decimal
    ticks: tuple[Decimal, ...]

    def share(self, value: float | Decimal) -> float:
        """Where ``value`` lies along the axis: 0 at ``low``, 1 at ``high``."""
        return float((Decimal(value) - self.low) / (self.high - self.low))


def _number_value(value: object) -> float | None:
    """Return a finite int or float of the log as a float; None for anything else ("NaN")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


# -- the page ------------------------------------------------------------------------------------


def render_page(page: RunPage) -> str:
    """Render the run's page: one HTML document that loads nothing."""
    walk = _walk(page)
    report = page.report
    sections = [
        _banner(page, walk),
        _section("run", "Run", _summary(page, walk)),
        _section("path", "The path it took", *_diagram_parts(report)),
        _section("timeline", "Timeline", *_timeline_parts(page, walk)),
        _section("time", "Where the time went", *_time_parts(page)),
        _hook_times_section(page.log, report),
        _metrics_section(page.log),
        _events_section(page, walk),
        _slowest_section(report),
    ]
    title = f"{_kind(report)} run {_clip(report.run_id, 40)} ({report.status}) - fsm_learner"
    head = _el(
        "head",
        _leaf("meta", charset="utf-8"),
        _leaf("meta", name="viewport", content="width=device-width, initial-scale=1"),
        _leaf("meta", http_equiv="Content-Security-Policy", content=_CSP),
        _el("title", title),
        _el("style", _Html(_CSS)),
    )
    foot = _el(
        "footer",
        "Drawn by fsm-learner report from ",
        _el("code", file_name(page.path)),
        ". Everything on this page is inline: it loads nothing.",
    )
    body = _el("body", _el("main", *sections, foot))
    return "<!DOCTYPE html>\n" + _el("html", head, body, lang="en") + "\n"


_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'"
"""Nothing may load; only the page's own stylesheet and style attributes apply."""


def _kind(report: RunReport) -> str:
    kind = report.kind
    return "unknown" if kind is None else kind.value


def _pass_name(kind: RunKind | None, *, training: bool) -> str:
    """Name a pass as the audit's summary does: train, valid, or a predict run's predict."""
    if training:
        return "train"
    return "predict" if kind is RunKind.PREDICT else "valid"


# -- the verdict ---------------------------------------------------------------------------------


def _banner(page: RunPage, walk: _Walk) -> _Html:
    report = page.report
    run = _clip(report.run_id, 64) or "?"
    heading = _el("h1", f"{_kind(report)} run ", _el("code", run), " ", _status_badge(page))
    outcome = _el("p", _outcome(page, walk), class_="outcome")
    asides = [_el("p", said, class_="aside") for said in _asides(page)]
    if page.verified:
        verdict = _el("p", *_verified_said(page), class_="verdict")
        return _el("header", heading, outcome, verdict, *asides, class_="banner ok")
    if was_killed(report):
        what = "✗ Killed: the log ends inside the run (truncated), so it does not verify."
    else:
        what = "✗ Does not verify."
    problems = page.verdict.problems or (() if page.problem is None else (page.problem,))
    lines = [outcome, _el("p", what, class_="verdict")]
    lines += [_el("p", _el("code", _clip(str(p), 2000)), class_="problem") for p in problems[:3]]
    if len(problems) > 3:
        lines.append(_el("p", f"... and {len(problems) - 3:,} more problems.", class_="problem"))
    if was_killed(report) and page.alone:
        lines.append(_el("p", _resumer_hint(page), class_="aside"))
    return _el("header", heading, *lines, *asides, class_="banner bad")


def _verified_said(page: RunPage) -> tuple[str, ...]:
    if page.resumed_by is None:
        return "✓ Verified. ", _chain_text(page.report)
    resumer = _clip(page.resumed_by, 64)
    said = (
        f"✓ Killed, and resumed by run {resumer} (the lineage verifies): its records verify up "
        "to where its log ends, and the run that resumed it goes on from a checkpoint it sealed."
    )
    return (said,)


def _asides(page: RunPage) -> list[str]:
    """Say what else the page's file holds: other runs, another run of the same id."""
    said = []
    if page.choice_said is not None:
        said.append(f"This is {page.choice_said}.")
    if page.log.repeated:
        said.append(
            f"Another run of {file_name(page.path)} has the id {_clip(page.report.run_id, 64)}: "
            f"this page shows the run whose header is on line {page.report.first_line:,}, and "
            "none of the other's records; fsm-learner audit fails the copy."
        )
    return said


def _resumer_hint(page: RunPage) -> str:
    folder = file_name(page.path.parent)
    run = _clip(page.report.run_id, 64)
    return (
        f"If a later run resumed it from a checkpoint, fsm-learner audit {folder} checks the "
        f"two together (and fsm-learner report {folder} --run-id {run} draws it so): the run "
        "is accounted for when that lineage verifies."
    )


def _outcome(page: RunPage, walk: _Walk) -> str:
    """Say in one sentence how the run ended, and where; or why what follows is unverified."""
    report, steps = page.report, page.log.steps
    if was_killed(report):
        return _killed_said(page)
    if report.problem is not None:
        return _unverified_said(page)
    took = _duration(report.wall_ns)
    last = steps[-1] if steps else None
    where = "" if last is None else f" in {_where(last, report.kind)}"
    if report.status is RunStatus.COMPLETED:
        return f"Completed {_done(report, page.report.header)} in {took}."
    if report.status is RunStatus.FAILED:
        failure = report.failure or {}
        error = _log_text(failure.get(FailureField.TYPE.value, "an exception"), 120)
        return f"Failed with {error}{where}, after {took}: see Cancels and failures below."
    how = "" if last is None else f" by {last.trigger}"
    why = "" if last is None else _why(walk, last)
    return f"{report.status.value.capitalize()}{how}{where}, after {took}{why}."


def _done(report: RunReport, header: Mapping[str, Any]) -> str:
    train, valid = report.batches
    if report.kind is not RunKind.FIT:
        return _plural(valid, "batch", "batches")
    resume = _resume(header)
    resumed = "" if resume is None else f" (resumed at epoch {resume.epoch})"
    epochs = _plural(report.epochs, "epoch", "epochs")
    return f"{epochs}{resumed}, {train:,} training and {valid:,} validation batches"


def _why(walk: _Walk, last: Step) -> str:
    """Name the notes written just before the run's last transition, when it is an event."""
    event = walk.last
    if event is None or event.step != last or not event.reasons:
        return ""
    names = ", ".join(_clip(note.name, 60) for note in event.reasons)
    return f"; just before, the run noted {names} (see Cancels and failures below)"


def _killed_said(page: RunPage) -> str:
    steps, start = page.log.steps, page.log.start_ns or 0
    if not steps:
        return "The log ends before the run's first transition, with no run_end."
    last = steps[-1]
    return (
        f"The log ends in state {last.dest}, {_duration(last.t_ns - start)} in, with no "
        "run_end: the process was killed, or the log cut short."
    )


def _unverified_said(page: RunPage) -> str:
    footer, problem = page.log.footer, page.report.problem
    said = "has no run_end" if footer is None else f"says the run ended {footer.status.value}"
    line = f" from line {problem.line}" if problem is not None and problem.line else ""
    return (
        f"The log {said}, but its records do not verify{line}: the path and where the time "
        "went count only the records before; the timeline, the curves and the lists show the "
        "log as it is."
    )


def _chain_text(report: RunReport) -> str:
    sealed = (
        "Every block of records matches its seal, every transition is a route of the "
        "table, and the footer agrees with the replay"
    )
    if report.keyed:
        return f"{sealed}; the chain is keyed: only the key's holder could have sealed it."
    return f"{sealed}; the chain is unkeyed: anyone can recompute its seals."


def _status_badge(page: RunPage) -> _Html:
    """Name how the run ended, as the audit says; a run that does not verify is unverified."""
    report = page.report
    if page.resumed_by is not None and page.verified:
        return _el("span", "killed, resumed", class_="badge resumed")
    if not page.verified and not was_killed(report):
        return _el("span", "unverified", class_="badge failed")
    return _el("span", report.status.value, class_=f"badge {report.status.value}")


# -- the run's header ----------------------------------------------------------------------------


def _summary(page: RunPage, walk: _Walk) -> _Html:
    report, header = page.report, page.report.header
    rows = [
        ("run id", _clip(report.run_id, 200) or "-"),
        ("file", file_name(page.path)),
        ("started", _field(header, Field.WALL)),
        ("took", _duration(report.wall_ns)),
        ("model", _model(header)),
        ("optimizer", _optimizer(header)),
        ("epochs", _epochs(report, header, walk.spans)),
        ("batches", _batches(report)),
        ("callbacks", _callbacks(header.get(Field.CALLBACKS.value))),
        ("device", _field(header, Field.DEVICE)),
        ("seed", _seed(header)),
        ("versions", _versions(header)),
        (
            "records",
            f"{report.records:,} ({report.transitions:,} transitions, {report.notes:,} notes)",
        ),
        ("chain head", report.head or "-"),
    ]
    world = header.get(Field.WORLD_SIZE.value)
    if isinstance(world, int) and not isinstance(world, bool) and world > 1:
        rank = _field(header, Field.RANK)
        rows.append(("rank", f"{rank} of {world}: this page shows this rank's log only"))
    if Field.RESUMED_FROM.value in header:
        rows.append(("resumes", _resume_said(header, report.kind)))
    items = [_el("div", _el("dt", name), _el("dd", value)) for name, value in rows]
    return _el("dl", *items, class_="facts")


def _field(header: Mapping[str, Any], field: Field) -> str:
    if field.value not in header:
        return "-"
    value = header[field.value]
    return "-" if value is None else _log_text(value)


def _model(header: Mapping[str, Any]) -> str:
    params = header.get(Field.PARAMS.value)
    count = (
        f" ({params:,} parameters)"
        if isinstance(params, int) and not isinstance(params, bool)
        else ""
    )
    return _field(header, Field.MODEL) + count


def _optimizer(header: Mapping[str, Any]) -> str:
    lr = _number_value(header.get(Field.LR.value))
    rate = f", lr {lr:g}" if lr is not None else ""
    optimizer = _field(header, Field.OPTIMIZER)
    return ("none" if optimizer == "-" else optimizer) + rate


def _epochs(report: RunReport, header: Mapping[str, Any], spans: Sequence[PassSpan]) -> str:
    asked = _field(header, Field.N_EPOCHS)
    if report.kind is not RunKind.FIT:
        return f"{asked} (a {_kind(report)} run: one pass, no training)"
    resume, trained = _resume(header), [span.epoch for span in spans if span.training]
    if resume is not None and trained:
        first, last = min(trained), max(trained)
        epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        return f"{epochs} of {asked}: resumed at epoch {resume.epoch}"
    begun = _plural(report.epochs, "training pass", "training passes")
    return f"{begun} begun, of {asked} asked for"


@attrs.frozen
class _Resume:
    """A header's ``resumed_from``, as far as the page shows it."""

    run: str
    epoch: int
    training: bool
    batch: int
    """How many batches of the pass were begun: the next to run."""
    checkpoint: str
    """The checkpoint file's sha256."""


def _resume(header: Mapping[str, Any]) -> _Resume | None:
    """Read the header's ``resumed_from``; None when it has none of the right shape."""
    value = header.get(Field.RESUMED_FROM.value)
    if not isinstance(value, dict):
        return None
    run, checkpoint, at = value.get("run"), value.get("sha256"), value.get("at")
    if not isinstance(run, str) or not isinstance(checkpoint, str) or not isinstance(at, dict):
        return None
    epoch, training, batch = at.get("ep"), at.get("tr"), at.get("it")
    if type(epoch) is not int or type(training) is not bool or type(batch) is not int:
        return None
    return _Resume(run, epoch, training, batch, checkpoint)


def _resume_said(header: Mapping[str, Any], kind: RunKind | None) -> str:
    """Say where the run resumed: ``resumes run X at epoch 2, train batch 12 (checkpoint ...)``."""
    resume = _resume(header)
    if resume is None:  # the audit names what is wrong with it
        return _log_text(header[Field.RESUMED_FROM.value], 300)
    where = f"epoch {resume.epoch}, {_pass_name(kind, training=resume.training)} batch"
    checkpoint = f"(checkpoint {_clip(resume.checkpoint, 13)})"
    return f"resumes run {_clip(resume.run, 64)} at {where} {resume.batch} {checkpoint}"


def _batches(report: RunReport) -> str:
    train, valid = report.batches
    if report.kind is not RunKind.FIT:
        return f"{valid:,} completed"
    return f"{train:,} training, {valid:,} validation, completed"


def _callbacks(value: object) -> str:
    if not isinstance(value, list):
        return "-" if value is None else _log_text(value)
    names = []
    for item in value[:40]:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            names.append(f"{_clip(item[0], 80)} (order {_log_text(item[1], 20)})")
        else:
            names.append(_log_text(item, 80))
    more = f", and {len(value) - 40} more" if len(value) > 40 else ""
    return (", ".join(names) or "none") + more


def _seed(header: Mapping[str, Any]) -> str:
    parts = [_field(header, Field.SEED)]
    deterministic = header.get(Field.DETERMINISTIC.value)
    if isinstance(deterministic, bool):
        parts.append("deterministic algorithms" if deterministic else "not deterministic")
    threads = header.get(Field.THREADS.value)
    if threads is not None:
        parts.append(f"threads {_log_text(threads, 40)}")
    return ", ".join(parts)


def _versions(header: Mapping[str, Any]) -> str:
    named = [
        ("fsm_learner", Field.VERSION),
        ("torch", Field.TORCH),
        ("python", Field.PYTHON),
    ]
    parts = [f"{name} {_field(header, field)}" for name, field in named if field.value in header]
    more = header.get(Field.VERSIONS.value)
    if isinstance(more, dict):
        parts += [
            f"{_clip(str(k), 40)} {_log_text(v, 60)}" for k, v in list(more.items())[:20] if v
        ]
    return ", ".join(parts) or "-"


# -- the diagram ---------------------------------------------------------------------------------

_NODE_W: Final = 78
_NODE_H: Final = 42
_SPACING: Final = 156
_PAD: Final = 28
_LANE_FIRST: Final = 24
_LANE_STEP: Final = 21
_CHAR_W: Final = 6.4
"""About the width of a character of the labels (12 px system font), for the layout."""
_CANCELS: Final = frozenset(spec.trigger.value for spec in TRANSITION_TABLE if spec.cancel)
_STATES: Final = tuple(state.value for state in State)
_TIMES: Final = "×"  # noqa: RUF001 (a count reads as "times 3", as in the diagrams)


@attrs.frozen
class _Edge:
    """A transition the run took: from and to which state (their places in the row), how often."""

    trigger: str
    source: int
    dest: int
    count: int
    style: str
    """``flow``, ``cancel``, ``fail`` or ``failure`` (the fail the run failed by)."""

    @property
    def straight(self) -> bool:
        return self.dest == self.source + 1 and self.style == "flow"

    @property
    def above(self) -> bool:
        """Ways back are drawn above the row; skips ahead, cancels and failures below."""
        return self.style == "flow" and self.dest < self.source

    @property
    def label(self) -> str:
        return f"{self.trigger} {_TIMES}{self.count:,}"


@attrs.frozen
class _Box:
    left: float
    top: float
    right: float
    bottom: float

    def overlaps(self, other: _Box) -> bool:
        return not (
            self.right <= other.left
            or other.right <= self.left
            or self.bottom <= other.top
            or other.bottom <= self.top
        )


def _edges(report: RunReport) -> list[_Edge]:
    failed_in = (report.failed_at or {}).get("state")
    edges = []
    for (trigger, source, dest), count in sorted(report.edges.items()):
        if count <= 0 or source not in _STATES or dest not in _STATES:
            continue
        if trigger == Trigger.FAIL.value:
            style = "failure" if source == failed_in else "fail"
        else:
            style = "cancel" if trigger in _CANCELS else "flow"
        edges.append(_Edge(trigger, _STATES.index(source), _STATES.index(dest), count, style))
    return edges


def _x(index: int) -> float:
    return _PAD + _NODE_W / 2 + index * _SPACING


def _label_box(edge: _Edge, lane: int) -> _Box:
    width = len(edge.label) * _CHAR_W + 8
    middle = (_x(edge.source) + _x(edge.dest)) / 2
    height = _LANE_FIRST + lane * _LANE_STEP
    if edge.source == edge.dest:
        top = _NODE_H / 2 + 30
    elif edge.above:
        top = -_NODE_H / 2 - height - 16
    else:
        top = _NODE_H / 2 + height + 2
    return _Box(middle - width / 2, top, middle + width / 2, top + 15)


def _straight_boxes(edge: _Edge) -> list[_Box]:
    middle = (_x(edge.source) + _x(edge.dest)) / 2
    return [
        _Box(
            middle - len(text) * _CHAR_W / 2 - 3,
            top,
            middle + len(text) * _CHAR_W / 2 + 3,
            top + 14,
        )
        for text, top in ((edge.trigger, -18.0), (f"{_TIMES}{edge.count:,}", 4.0))
    ]


def _lanes(edges: Sequence[_Edge]) -> dict[_Edge, int]:
    """Give each arc a lane (how far from the row it rises), so that no two labels overlap.

    An arc rises above every arc it spans, and further while its label would overlap one
    placed before (the straight edges' labels, then arcs by span, shortest first).
    """
    placed = [box for edge in edges if edge.straight for box in _straight_boxes(edge)]
    lanes: dict[_Edge, int] = {}
    arcs = sorted(
        (e for e in edges if not e.straight),
        key=lambda e: (
            e.source != e.dest,
            abs(e.source - e.dest),
            min(e.source, e.dest),
            e.trigger,
        ),
    )
    for edge in arcs:
        low, high = sorted((edge.source, edge.dest))
        inside = [
            lane
            for other, lane in lanes.items()
            if other.above == edge.above
            and low <= min(other.source, other.dest)
            and max(other.source, other.dest) <= high
            and other.source != other.dest
        ]
        lane = max(inside, default=-1) + 1 if edge.source != edge.dest else 0
        while any(_label_box(edge, lane).overlaps(box) for box in placed):
            lane += 1
        lanes[edge] = lane
        placed.append(_label_box(edge, lane))
    return lanes


def _diagram_parts(report: RunReport) -> list[str]:
    edges = _edges(report)
    lanes = _lanes(edges)
    boxes = [_label_box(e, lane) for e, lane in lanes.items()]
    top = min([-_NODE_H / 2 - 24, *(b.top - 6 for b in boxes)])
    bottom = max([_NODE_H / 2 + 20, *(b.bottom + 6 for b in boxes)])
    width = 2 * _PAD + _NODE_W + (len(_STATES) - 1) * _SPACING
    visited = _visited(report)
    failed_in = (report.failed_at or {}).get("state")
    content = [
        _arrow_markers(),
        *(_state_node(report, i, name, visited, failed_in) for i, name in enumerate(_STATES)),
        *(_edge_markup(edge, lanes.get(edge, 0)) for edge in edges),
    ]
    svg = _el(
        "svg",
        _el("title", f"the states and the {len(edges)} transitions the run took"),
        _el("g", *content, transform=f"translate(0 {_number(-top)})"),
        id="diagram",
        class_="diagram",
        viewBox=f"0 0 {width} {_number(bottom - top)}",
        role="img",
    )
    caption = _el(
        "p",
        "The table's states in a row, outermost first; each transition the run took is one "
        "arrow, labelled with how many times it was taken (hover for its row of the table). "
        "Each state says how long the run spent in it.",
        class_="note",
    )
    styles = {edge.style for edge in edges}
    shown_items = [
        ("flow", "transition taken", bool(edges)),
        ("cancel", "cancel", "cancel" in styles),
        (
            "fail",
            "failure (the state it failed in outlined in red)",
            bool({"fail", "failure"} & styles),
        ),
        ("unvisited", "state never entered", len(visited) < len(_STATES)),
    ]
    legend = _legend(*((css, text) for css, text, present in shown_items if present))
    if not edges:
        caption = _el("p", "The run took no transition that verifies.", class_="note")
    return [svg, legend, caption]


def _visited(report: RunReport) -> set[str]:
    taken = {
        state for (_, source, dest), n in report.edges.items() if n for state in (source, dest)
    }
    return taken | {State.IDLE.value}


def _arrow_markers() -> _Html:
    markers = [
        _el(
            "marker",
            _leaf("path", d="M0,0 L10,5 L0,10 z", class_=f"head {style}"),
            id=f"arrow-{style}",
            viewBox="0 0 10 10",
            refX="9",
            refY="5",
            markerWidth="7",
            markerHeight="7",
            orient="auto-start-reverse",
        )
        for style in ("flow", "cancel", "fail", "failure")
    ]
    return _el("defs", *markers)


def _state_node(
    report: RunReport, index: int, name: str, visited: set[str], failed_in: object
) -> _Html:
    x = _x(index)
    spent = report.time_in_state_ns.get(name, 0)
    classes = (
        "state"
        + ("" if name in visited else " unvisited")
        + (" failed-in" if name == failed_in else "")
    )
    tip = (
        f"state {name}: {_duration(spent)} spent in it"
        if name in visited
        else f"state {name}: never entered"
    )
    return _el(
        "g",
        _el("title", tip),
        _leaf("rect", x=x - _NODE_W / 2, y=-_NODE_H / 2, width=_NODE_W, height=_NODE_H, rx=9),
        _el("text", name, x=x, y=-2.0, class_="name"),
        _el("text", _duration(spent) if name in visited else "", x=x, y=13.0, class_="spent"),
        class_=classes,
    )


def _tooltip(edge: _Edge) -> str:
    source, dest = _STATES[edge.source], _STATES[edge.dest]
    rows = [
        spec
        for spec in TRANSITION_TABLE
        if spec.trigger.value == edge.trigger
        and spec.dest.value == dest
        and any(s.value == source for s in spec.sources)
    ]
    row = ""
    if rows:
        guard = f" [{rows[0].guard}]" if rows[0].guard else ""
        row = f"{guard}, hook {rows[0].hook}"
    return f"{edge.trigger}: {source} → {dest}{row}; taken {edge.count:,} times"


def _edge_markup(edge: _Edge, lane: int) -> _Html:
    marker = f"url(#arrow-{edge.style})"
    data = {"data_edge": f"{edge.trigger}:{_STATES[edge.source]}:{_STATES[edge.dest]}"}
    if edge.straight:
        x1, x2 = _x(edge.source) + _NODE_W / 2, _x(edge.dest) - _NODE_W / 2 - 2
        middle = (x1 + x2) / 2
        return _el(
            "g",
            _el("title", _tooltip(edge)),
            _leaf(
                "path",
                d=f"M{_number(x1)} 0 H{_number(x2)}",
                class_=f"edge {edge.style}",
                marker_end=marker,
                **data,
            ),
            _el("text", edge.trigger, x=middle, y=-7.0, class_=f"edge-label ahead {edge.style}"),
            _el(
                "text",
                f"{_TIMES}{edge.count:,}",
                x=middle,
                y=15.0,
                class_=f"edge-label count {edge.style}",
            ),
        )
    box = _label_box(edge, lane)
    return _el(
        "g",
        _el("title", _tooltip(edge)),
        _leaf(
            "path", d=_arc_path(edge, lane), class_=f"edge {edge.style}", marker_end=marker, **data
        ),
        _el(
            "text",
            edge.label,
            x=(box.left + box.right) / 2,
            y=box.bottom - 3.5,
            class_=f"edge-label {edge.style}",
        ),
    )


def _arc_path(edge: _Edge, lane: int) -> str:
    """Draw an arc from one state to another, above the row or below it; a loop below one."""
    xs, xd = _x(edge.source), _x(edge.dest)
    if edge.source == edge.dest:
        y = _NODE_H / 2
        return _path("M", xs - 12, y, "C", xs - 30, y + 36, xs + 30, y + 36, xs + 12, y + 2)
    offset = 10 + 6 * min(lane, 4)
    leaving = -offset if edge.dest < edge.source else offset
    x1, x2 = xs + leaving, xd - leaving
    sign = -1 if edge.above else 1
    y = sign * _NODE_H / 2
    y2 = y + sign * 2  # the arrowhead touches the box
    control = y + sign * (_LANE_FIRST + lane * _LANE_STEP) / 0.75
    return _path("M", x1, y, "C", x1, control, x2, control, x2, y2)


# -- the timeline --------------------------------------------------------------------------------

_TL_WIDTH: Final = 1100
_TL_LEFT: Final = 86
_TL_RIGHT: Final = 24
_LANE_H: Final = 32
_BAR_H: Final = 22
_MAX_BARS: Final = 240
"""Bars per lane at most: beyond, consecutive passes are drawn as one bar each few."""
_EVENT_BIN: Final = 4.0
"""Events closer than this (in the drawing's units) are one marker."""
_EVENTS: Final = frozenset({*_CANCELS, Trigger.PREEMPT.value, Trigger.FAIL.value})
_ENDED: Final = {
    "completed": "completed",
    "cancelled": "cancelled",
    Trigger.CANCEL_FIT.value: "cancelled",
    Trigger.FAIL.value: "failed",
    Trigger.PREEMPT.value: "preempted",
    "open": "open",
}
_WORST: Final = ("failed", "open", "preempted", "cancelled", "completed")


@attrs.frozen
class _Scale:
    """Run time (ns since the run started) to x in the timeline's drawing."""

    start: int
    span: int

    def x(self, t_ns: int) -> float:
        plot = _TL_WIDTH - _TL_LEFT - _TL_RIGHT
        return _TL_LEFT + (t_ns - self.start) / self.span * plot


@attrs.frozen
class _Bar:
    """One pass, or consecutive passes of one lane drawn as one bar."""

    spans: tuple[PassSpan, ...]

    @property
    def ended(self) -> str:
        found = {_ENDED.get(span.ended, "cancelled") for span in self.spans}
        return next(kind for kind in _WORST if kind in found)


def _end_ns(page: RunPage) -> int:
    log = page.log
    ends = [(log.start_ns or 0) + page.report.wall_ns]
    ends += [log.steps[-1].t_ns] if log.steps else []
    ends += [log.notes[-1].t_ns] if log.notes else []
    ends += [log.footer.t_ns] if log.footer is not None else []
    return max(ends)


def _timeline_parts(page: RunPage, walk: _Walk) -> list[str]:
    spans, scale = walk.spans, walk.scale
    if not spans and not walk.triggers:
        return [_el("p", "The run began no pass.", class_="note")]
    kind = page.report.kind
    lanes = [training for training in (True, False) if any(s.training is training for s in spans)]
    rows = len(lanes) + bool(walk.triggers)
    height = 10 + rows * _LANE_H + 30
    content = [_grid(scale, height)]
    for row, training in enumerate(lanes):
        lane = [span for span in spans if span.training is training]
        content.append(_lane(row, _pass_name(kind, training=training), lane, scale))
    if walk.triggers:
        content.append(_event_lane(len(lanes), walk, kind))
    svg = _el(
        "svg",
        _el("title", "the run's passes along time"),
        *content,
        id="timeline-chart",
        class_="timeline",
        viewBox=f"0 0 {_TL_WIDTH} {height}",
        role="img",
    )
    return [
        _el("p", _passes_said(spans, kind), class_="note"),
        svg,
        _timeline_legend(spans, walk.triggers, kind),
    ]


def _timeline_legend(
    spans: Sequence[PassSpan], triggers: AbstractSet[str], kind: RunKind | None
) -> _Html:
    """Name what the timeline shows: its kinds of pass, how they ended, its events."""
    ended = {_ENDED.get(span.ended, "cancelled") for span in spans}
    items = [
        ("train", "training pass", any(span.training for span in spans)),
        (
            "valid",
            f"{_pass_name(kind, training=False)} pass",
            any(not span.training for span in spans),
        ),
        ("cancelled", "pass cancelled", "cancelled" in ended),
        ("preempted", "pass preempted", "preempted" in ended),
        ("failed", "pass failed", "failed" in ended),
        ("open", "pass open when the log ends (killed)", "open" in ended),
        ("mark-cancel", "cancel", bool(triggers & _CANCELS)),
        ("mark-preempt", "preempt", Trigger.PREEMPT.value in triggers),
        ("mark-fail", "failure", Trigger.FAIL.value in triggers),
    ]
    return _legend(*((css, text) for css, text, present in items if present))


def _passes_said(spans: Sequence[PassSpan], kind: RunKind | None) -> str:
    if not spans:
        return "No pass began."
    names = {True: _pass_name(kind, training=True), False: _pass_name(kind, training=False)}
    counts = [
        f"{sum(s.training is t for s in spans):,} {names[t]}"
        for t in (True, False)
        if any(s.training is t for s in spans)
    ]
    ended = {
        kind_: sum(_ENDED.get(s.ended, "cancelled") == kind_ for s in spans) for kind_ in _WORST
    }
    how = ", ".join(f"{n:,} {kind_}" for kind_, n in ended.items() if n)
    batches = _plural(sum(s.batches for s in spans), "batch", "batches")
    return (
        f"{_plural(len(spans), 'pass', 'passes')} ({', '.join(counts)}): {how}; {batches} "
        "begun. Hover a bar for its pass."
    )


def _grid(scale: _Scale, height: int) -> _Html:
    unit, suffix = _time_unit(scale.span)
    step, ticks = _ticks(Decimal(0), Decimal(scale.span) / Decimal(unit), 8)
    parts = []
    for tick in ticks:
        x = scale.x(scale.start + round(tick * Decimal(unit)))
        parts.append(_leaf("line", x1=x, x2=x, y1=6, y2=height - 26, class_="gridline"))
        parts.append(
            _el(
                "text",
                f"{_tick_text(tick, step)} {suffix}",
                x=x,
                y=float(height - 10),
                class_="tick",
            )
        )
    return _el("g", *parts, class_="axis")


def _time_unit(span_ns: int) -> tuple[float, str]:
    seconds = span_ns / 1e9
    if seconds < 1:
        return 1e6, "ms"
    if seconds < 120:
        return 1e9, "s"
    if seconds < 7200:
        return 60e9, "min"
    return 3600e9, "h"


def _lane(row: int, name: str, spans: Sequence[PassSpan], scale: _Scale) -> _Html:
    y = 10 + row * _LANE_H
    group = math.ceil(len(spans) / _MAX_BARS)
    bars = [_Bar(tuple(spans[i : i + group])) for i in range(0, len(spans), group)]
    css = "train" if spans and spans[0].training else "valid"
    labels = _lane_labels(bars, scale)
    return _el(
        "g",
        _el("text", name, x=float(_TL_LEFT - 10), y=y + _BAR_H / 2 + 4, class_="lane-name"),
        _leaf(
            "rect",
            x=_TL_LEFT,
            y=y - 3,
            width=_TL_WIDTH - _TL_LEFT - _TL_RIGHT,
            height=_BAR_H + 6,
            class_="lane",
        ),
        *(_bar(bar, css, y, scale, labels) for bar in bars),
        class_=f"lane-{css}",
    )


def _lane_labels(bars: Sequence[_Bar], scale: _Scale) -> tuple[str, float] | None:
    """Label a lane's bars alike, as its narrowest has room for: ``epoch 3``, ``3``, or not.

    Return the label's prefix and the least width of a bar labelled; None for no labels
    (bars of several passes are not labelled).
    """
    if any(len(bar.spans) > 1 for bar in bars):
        return None
    narrowest = min(scale.x(bar.spans[-1].end_ns) - scale.x(bar.spans[0].start_ns) for bar in bars)
    return next(((p, w) for p, w in (("epoch ", 64.0), ("", 18.0)) if narrowest >= w), None)


def _bar(bar: _Bar, css: str, y: int, scale: _Scale, labels: tuple[str, float] | None) -> _Html:
    first, last = bar.spans[0], bar.spans[-1]
    x = scale.x(first.start_ns)
    width = max(scale.x(last.end_ns) - x, 1.5)
    label = None
    if labels is not None and width >= labels[1]:
        label = f"{labels[0]}{first.epoch}"
    text = (
        _el("text", label, x=x + width / 2, y=y + _BAR_H / 2 + 4, class_=f"bar-label {bar.ended}")
        if label
        else None
    )
    return _el(
        "g",
        _el("title", _bar_said(bar, css, scale)),
        _leaf("rect", x=x, y=y, width=width, height=_BAR_H, rx=3, class_=f"pass {css} {bar.ended}"),
        text,
    )


def _bar_said(bar: _Bar, css: str, scale: _Scale) -> str:
    first, last = bar.spans[0], bar.spans[-1]
    kind = "train" if css == "train" else "valid"
    batches = sum(span.batches for span in bar.spans)
    cancelled = sum(span.cancelled_batches for span in bar.spans)
    dropped = f" ({cancelled:,} cancelled)" if cancelled else ""
    took = _duration(last.end_ns - first.start_ns)
    at = f"from {_duration(first.start_ns - scale.start)}"
    if len(bar.spans) == 1:
        said = f"{kind} pass, epoch {first.epoch}: {batches:,} batches{dropped}"
        return f"{said}, {took} {at}, {first.ended}"
    endings = ", ".join(
        f"{n:,} {ended}"
        for ended in _WORST
        if (n := sum(_ENDED.get(s.ended, "cancelled") == ended for s in bar.spans))
    )
    return (
        f"{len(bar.spans):,} {kind} passes, epochs {first.epoch}-{last.epoch}: {batches:,} "
        f"batches{dropped}, {took} {at}; {endings}"
    )


_STOPS: Final = frozenset({Trigger.FAIL.value, Trigger.CANCEL_FIT.value, Trigger.PREEMPT.value})
"""The events that end a run: a dashed line across the lanes marks each."""


def _event_lane(row: int, walk: _Walk, kind: RunKind | None) -> _Html:
    """Mark the cancels and the failure along time; those close together as one mark."""
    y = 10 + row * _LANE_H
    scale = walk.scale
    marks = [_event_mark(marks, scale, kind, y) for marks in walk.marks.values()]
    lines = [
        _leaf(
            "line",
            x1=scale.x(step.t_ns),
            x2=scale.x(step.t_ns),
            y1=6,
            y2=y - 4,
            class_=f"stop {_mark_class(step.trigger)}",
        )
        for step in walk.stops
    ]
    label = _el("text", "events", x=float(_TL_LEFT - 10), y=y + _BAR_H / 2 + 4, class_="lane-name")
    return _el("g", label, *lines, *marks, class_="events")


def _mark_class(trigger: str) -> str:
    if trigger == Trigger.FAIL.value:
        return "mark-fail"
    return "mark-preempt" if trigger == Trigger.PREEMPT.value else "mark-cancel"


def _event_mark(marks: _Marks, scale: _Scale, kind: RunKind | None, y: int) -> _Html:
    first, last = marks.first, marks.last
    x = scale.x(first.t_ns)
    middle = y + _BAR_H / 2
    if first.trigger == Trigger.FAIL.value:  # a cross
        shape = _path(
            "M",
            x - 5,
            middle - 5,
            "L",
            x + 5,
            middle + 5,
            "M",
            x + 5,
            middle - 5,
            "L",
            x - 5,
            middle + 5,
        )
    else:  # a triangle
        shape = _path("M", x, middle - 7, "L", x + 6, middle + 6, "L", x - 6, middle + 6, "Z")
    where = _where(first, kind)
    if marks.count > 1:
        where = f"{marks.count:,} times from {where} to {_where(last, kind)}"
    said = f"{first.trigger} at {_duration(first.t_ns - scale.start)}: {where}"
    return _el(
        "g",
        _el("title", said),
        _leaf("path", d=shape, class_=f"mark {_mark_class(first.trigger)} {first.trigger}"),
    )


def _where(step: Step, kind: RunKind | None) -> str:
    return f"epoch {step.epoch}, {_pass_name(kind, training=step.training)} batch {step.iter}"


# -- the run's transitions, read once ------------------------------------------------------------

_IN_PASS: Final = frozenset(State) - {State.IDLE, State.FIT}
"""The states inside a pass: a transition from one of them to another state ends the pass."""
_PASS_ENDS: Final = {
    Trigger.END_EPOCH.value: "completed",
    Trigger.CANCEL_EPOCH.value: "cancelled",
}
_BOOKKEEPING: Final = frozenset({"metrics", "hook_times"})
"""Notes every pass writes at its end: never the reason for a cancel that follows them."""
_REASONS_KEPT: Final = 4
_STOPS_DRAWN: Final = 8


@attrs.frozen
class _Event:
    """A cancel, preempt or failure, and the notes written just before it: its reasons."""

    step: Step
    reasons: tuple[Note, ...] = ()


@attrs.define
class _Marks:
    """The events of one trigger close together along the timeline: drawn as one mark."""

    first: Step
    last: Step
    count: int = 1


@attrs.define
class _Walk:
    """What the page draws from the run's transitions, gathered in one pass over them.

    A run of millions of batches is read once, as it comes: the page keeps its passes,
    the first events listed, the events binned along the timeline and the stops, never a
    list of its transitions. ``notes`` are read alongside, in time order, so that each
    event gets the notes written since the transition before it (``reasons``).
    """

    scale: _Scale
    notes: Sequence[Note]
    spans: list[PassSpan] = attrs.Factory(list)
    listed: list[_Event] = attrs.Factory(list)
    events: int = 0
    """The cancels and preempts (failures are the failure card's): all, not only those listed."""
    marks: dict[tuple[str, int], _Marks] = attrs.Factory(dict)
    stops: list[Step] = attrs.Factory(list)
    triggers: set[str] = attrs.Factory(set)
    last: _Event | None = None
    """The run's last event, with its reasons: the outcome says why the run stopped."""
    _open: Step | None = None
    _batches: int = 0
    _cancelled: int = 0
    _last_ns: int = 0
    _note: int = 0

    def take(self, step: Step) -> None:
        """Add one transition, the next in order."""
        self._last_ns = step.t_ns
        first_note = self._note
        while self._note < len(self.notes) and self.notes[self._note].t_ns <= step.t_ns:
            self._note += 1
        if step.trigger in _EVENTS:
            self._event(step, self.notes[first_note : self._note])
        self._pass(step)

    def finish(self) -> None:
        """Close the pass the log ends in, if any: it is ``open``."""
        start = self._open
        if start is not None:
            self.spans.append(
                PassSpan(
                    start.epoch,
                    start.training,
                    start.t_ns,
                    self._last_ns,
                    self._batches,
                    self._cancelled,
                    "open",
                )
            )

    def _pass(self, step: Step) -> None:
        start = self._open
        if step.trigger == Trigger.BEGIN_EPOCH.value:
            self._open, self._batches, self._cancelled = step, 0, 0
        elif start is None:
            return
        elif step.trigger == Trigger.BEGIN_BATCH.value:
            self._batches += 1
        elif step.trigger == Trigger.CANCEL_BATCH.value:
            self._cancelled += 1
        elif step.source in _IN_PASS and step.dest not in _IN_PASS:
            ended = _PASS_ENDS.get(step.trigger, step.trigger)
            span = PassSpan(
                start.epoch,
                start.training,
                start.t_ns,
                step.t_ns,
                self._batches,
                self._cancelled,
                ended,
            )
            self.spans.append(span)
            self._open = None

    def _event(self, step: Step, notes: Sequence[Note]) -> None:
        reasons = tuple(
            note
            for note in notes
            if note.name not in _BOOKKEEPING
            and note.epoch == step.epoch
            and note.training == step.training
        )[-_REASONS_KEPT:]
        event = _Event(step, reasons)
        self.last = event
        self.triggers.add(step.trigger)
        if step.trigger != Trigger.FAIL.value:
            self.events += 1
            if len(self.listed) < _EVENTS_LISTED:
                self.listed.append(event)
        if step.trigger in _STOPS and len(self.stops) < _STOPS_DRAWN:
            self.stops.append(step)
        key = (step.trigger, int(self.scale.x(step.t_ns) / _EVENT_BIN))
        marks = self.marks.get(key)
        if marks is None:
            self.marks[key] = _Marks(step, step)
        else:
            marks.last, marks.count = step, marks.count + 1


def _walk(page: RunPage) -> _Walk:
    """Read the run's transitions once: its passes and events, placed on the timeline."""
    start = page.log.start_ns or 0
    walk = _Walk(_Scale(start, max(_end_ns(page) - start, 1)), page.log.notes)
    for step in page.log.steps:
        walk.take(step)
    walk.finish()
    return walk


def _reasons_said(event: _Event) -> str:
    """Say what the notes before an event say: ``early_stopping: monitor valid_loss, ...``."""
    return "; ".join(_note_said(note) for note in event.reasons)


def _note_said(note: Note) -> str:
    fields = list(note.fields.items())
    said = ", ".join(f"{_clip(str(k), 40)} {_value_said(v)}" for k, v in fields[:12])
    more = f", and {len(fields) - 12} more" if len(fields) > 12 else ""
    return f"{_clip(note.name, 60)}: {said}{more}" if said else _clip(note.name, 60)


def _value_said(value: object) -> str:
    number = _number_value(value)
    if number is not None and isinstance(value, float):
        return f"{number:.4g}"
    return _log_text(value, 80)


# -- where the time went -------------------------------------------------------------------------

_WORK_SAID: Final = {
    Work.DATA: "training: waiting for the next batch",
    Work.FORWARD: "the forward pass (training, or a predict run)",
    Work.LOSS: "training: the loss",
    Work.BACKWARD: "training: the backward pass",
    Work.STEP: "training: the optimizer step",
    Work.VALIDATION: "validation passes (and the rest of a predict run's batches)",
    Work.HOOKS: "the callbacks' hooks, wherever they ran",
    Work.LOOP: "the rest: between passes, setting them up, writing the log",
}


def _time_parts(page: RunPage) -> list[str]:
    report = page.report
    total = sum(report.time_by_work_ns.values())
    if total <= 0:
        return [
            _el("p", "No time recorded: the run has no transition that verifies.", class_="note")
        ]
    rows = [
        (
            _el("span", _swatch(f"w-{work.value}"), work.value),
            _WORK_SAID.get(work, ""),
            _duration(ns),
            f"{100 * ns / total:.1f}",
        )
        for work, ns in report.time_by_work_ns.items()
        if ns > 0
    ]
    rows.append((_el("strong", "total"), "the run's wall time", _duration(total), "100.0"))
    parts: list[str] = [
        _work_bar(report.time_by_work_ns, total),
        _table(("work", "what", "time", "%"), rows, {2, 3}),
    ]
    footer = page.log.footer
    if footer is not None and footer.hook_ns:
        parts.append(_el("h3", "Time in hooks, by the transition they ran on"))
        parts.append(_hook_ns_table(footer.hook_ns))
    return parts


def _work_bar(by_work: Mapping[Work, int], total: int) -> _Html:
    width = _TL_WIDTH - 2.0
    x = 1.0
    parts = []
    for work, ns in by_work.items():
        if ns <= 0:
            continue
        w = ns / total * width
        share = f"{work.value}: {_duration(ns)}, {100 * ns / total:.1f}%"
        label = (
            _el(
                "text",
                f"{work.value} {100 * ns / total:.0f}%",
                x=x + w / 2,
                y=22.0,
                class_="seg-label",
            )
            if w >= 80
            else None
        )
        parts.append(
            _el(
                "g",
                _el("title", share),
                _leaf("rect", x=x, y=4, width=w, height=28, class_=f"seg w-{work.value}"),
                label,
            )
        )
        x += w
    return _el(
        "svg",
        _el("title", "the run's wall time by the work done"),
        *parts,
        id="work-bar",
        class_="workbar",
        viewBox=f"0 0 {_TL_WIDTH} 36",
        role="img",
    )


_FIT_LEVEL: Final = frozenset(
    trigger.value
    for trigger in (
        Trigger.BEGIN_FIT,
        Trigger.END_FIT,
        Trigger.CANCEL_FIT,
        Trigger.PREEMPT,
        Trigger.FAIL,
    )
)
"""Transitions whose hooks run for the fit, not for a pass (after_fit, after_cancel_fit...):
the footer's [training, validation] pair splits time by the training flag, which for these
says only where the fit was, so their time is the fit's."""


def _hook_ns_table(hook_ns: Mapping[str, Sequence[int]]) -> _Html:
    totals = sorted(hook_ns.items(), key=lambda item: -sum(item[1]))
    rows = []
    for trigger, (training, validation) in totals[:12]:
        total = training + validation
        if not total:
            continue
        if trigger in _FIT_LEVEL:
            cells = ("-", "-", _duration(total))
        else:
            cells = (_ns_cell(training), _ns_cell(validation), "-")
        rows.append((trigger, *cells, _duration(total)))
    columns = ("transition", "in training passes", "in validation passes", "for the fit", "total")
    return _table(columns, rows, {1, 2, 3, 4})


def _ns_cell(ns: int) -> str:
    return _duration(ns) if ns else "-"


# -- metric curves -------------------------------------------------------------------------------

_METRICS_NOTE: Final = "metrics"
_PASS_PREFIXES: Final = {"train": True, "valid": False}
"""The prefixes of MetricsCB's note fields (``train_loss``, ``valid_accuracy``)."""
_NOT_METRICS: Final = frozenset({"batches", "complete"})
_MAX_CHARTS: Final = 24
_MAX_POINTS: Final = 500
_MAX_DOTS: Final = 60
_CH_W: Final = 360
_CH_H: Final = 236
_CH_LEFT: Final = 58
_CH_RIGHT: Final = 14
_CH_TOP: Final = 34
_CH_BOTTOM: Final = 44


@attrs.frozen
class _Point:
    epoch: int
    value: float
    complete: bool


_Curves = dict[str, dict[bool, list[_Point]]]
"""Per metric name, per pass (training or not): its values, pass by pass."""


def _curves(notes: Iterable[Note]) -> _Curves:
    curves: _Curves = {}
    for note in notes:
        if note.name != _METRICS_NOTE:
            continue
        complete = note.fields.get("complete") is not False
        for key, value in note.fields.items():
            prefix, _, metric = key.partition("_")
            number = _number_value(value)
            if key in _NOT_METRICS or prefix not in _PASS_PREFIXES or not metric or number is None:
                continue
            series = curves.setdefault(metric, {}).setdefault(_PASS_PREFIXES[prefix], [])
            series.append(_Point(note.epoch, number, complete))
    return curves


def _metrics_section(log: RunLog) -> _Html:
    curves = _curves(log.notes)
    if not curves:
        said = (
            "No metrics noted: the run had no MetricsCB, or no pass reported (a predict "
            "run's do not)."
        )
        return _section("metrics", "Metrics", _el("p", said, class_="note"))
    names = sorted(curves, key=lambda name: name != "loss")  # the loss first, then as noted
    charts = [_chart(name, curves[name]) for name in names[:_MAX_CHARTS]]
    more = len(names) - _MAX_CHARTS
    note = _el("p", f"{more:,} more metrics not drawn.", class_="note") if more > 0 else None
    said = _el(
        "p",
        "The values of the metrics notes MetricsCB writes at each pass's end, by epoch; a "
        "hollow dot is a pass that ended early (its completed batches only).",
        class_="note",
    )
    return _section("metrics", "Metrics", said, _el("div", *charts, class_="charts"), note)


def _thinned(points: Sequence[_Point]) -> list[_Point]:
    if len(points) <= _MAX_POINTS:
        return list(points)
    last = len(points) - 1
    keep = sorted({round(i * last / (_MAX_POINTS - 1)) for i in range(_MAX_POINTS)})
    return [points[i] for i in keep]


_SAME: Final = Decimal("1e-9")
"""Values this close (relative to the largest) are one value: the axis is padded around it."""


def _domain(values: Sequence[float], count: int) -> _Axis:
    """Fit an axis with about ``count`` round ticks around ``values`` (finite floats)."""
    low, high = Decimal(min(values)), Decimal(max(values))
    if high - low <= max(abs(low), abs(high)) * _SAME:
        pad = max(abs(low) / 20, Decimal("0.001"))
        low, high = low - pad, high + pad
    step = _nice_step(high - low, count)
    low = (low / step).to_integral_value(rounding=ROUND_FLOOR) * step
    high = (high / step).to_integral_value(rounding=ROUND_CEILING) * step
    step, ticks = _ticks(low, high, count)  # the ends rounded, the ticks as round as they
    return _Axis(low, high, step, tuple(ticks))


def _chart(name: str, series: Mapping[bool, Sequence[_Point]]) -> _Html:
    drawn = {
        training: _thinned(points) for training, points in sorted(series.items(), reverse=True)
    }
    epochs = [p.epoch for points in drawn.values() for p in points]
    first, last = min(epochs), max(epochs)
    pad = Decimal("0.5") if last - first < 2 else Decimal(0)  # one or two epochs: centred
    axis = _domain([p.value for points in drawn.values() for p in points], 4)
    plot_w, plot_h = _CH_W - _CH_LEFT - _CH_RIGHT, _CH_H - _CH_TOP - _CH_BOTTOM

    def x(epoch: int) -> float:  # exact: epochs as large as 2**62 are still apart
        return _CH_LEFT + float((epoch - first + pad) / (last - first + 2 * pad)) * plot_w

    def y(value: float | Decimal) -> float:
        return _CH_TOP + (1 - axis.share(value)) * plot_h

    shown_name = _clip(name, 40)
    axes = _chart_axes(shown_name, (first, last, x), (axis, y))
    lines = [_series(name, training, points, x, y) for training, points in drawn.items()]
    return _el(
        "figure",
        _el(
            "svg",
            _el("title", f"{shown_name} by epoch"),
            axes,
            *lines,
            _chart_legend(drawn),
            class_="chart",
            viewBox=f"0 0 {_CH_W} {_CH_H}",
            role="img",
            data_metric=shown_name,
        ),
        class_="chart",
    )


def _chart_axes(
    name: str,
    x_axis: tuple[int, int, Any],
    y_axis: tuple[_Axis, Any],
) -> _Html:
    first, last, x = x_axis
    axis, y = y_axis
    bottom, right = _CH_H - _CH_BOTTOM, _CH_W - _CH_RIGHT
    parts = [_el("text", name, x=float(_CH_LEFT), y=18.0, class_="chart-title")]
    for tick in axis.ticks:
        parts.append(
            _leaf("line", x1=_CH_LEFT, x2=right, y1=y(tick), y2=y(tick), class_="gridline")
        )
        parts.append(
            _el(
                "text",
                _tick_text(tick, axis.step),
                x=float(_CH_LEFT - 6),
                y=y(tick) + 4,
                class_="tick y",
            )
        )
    x_step = max(1, math.ceil(_nice_step(Decimal(max(last - first, 1)), 6)))
    for epoch in range(first, last + 1, x_step):
        parts.append(
            _leaf("line", x1=x(epoch), x2=x(epoch), y1=bottom, y2=bottom + 4, class_="tickmark")
        )
        parts.append(_el("text", str(epoch), x=x(epoch), y=float(bottom + 16), class_="tick"))
    parts.append(
        _leaf("path", d=f"M{_CH_LEFT} {_CH_TOP - 4} V{bottom} H{right}", class_="axis-line")
    )
    parts.append(
        _el(
            "text",
            "epoch",
            x=_CH_LEFT + (right - _CH_LEFT) / 2,
            y=float(_CH_H - 6),
            class_="axis-label",
        )
    )
    middle = _CH_TOP + (bottom - _CH_TOP) / 2
    parts.append(
        _el(
            "text",
            name,
            x=14.0,
            y=middle,
            transform=f"rotate(-90 14 {_number(middle)})",
            class_="axis-label",
        )
    )
    return _el("g", *parts, class_="axes")


def _series(name: str, training: bool, points: Sequence[_Point], x: Any, y: Any) -> _Html:
    css = "train" if training else "valid"
    coords = " ".join(f"{_number(x(p.epoch))},{_number(y(p.value))}" for p in points)
    line = _leaf("polyline", points=coords, class_=f"series {css}", data_points=len(points))
    dots = []
    if len(points) <= _MAX_DOTS:
        for p in points:
            said = f"{css} {_clip(name, 40)}, epoch {p.epoch}: {p.value:.4g}" + (
                "" if p.complete else " (pass ended early)"
            )
            dot = _leaf(
                "circle",
                cx=x(p.epoch),
                cy=y(p.value),
                r=3.2,
                class_=f"dot {css}" + ("" if p.complete else " partial"),
            )
            dots.append(_el("g", _el("title", said), dot))
    return _el("g", line, *dots)


def _chart_legend(drawn: Mapping[bool, Sequence[_Point]]) -> _Html:
    parts = []
    x = float(_CH_W - _CH_RIGHT - 110)
    for training in drawn:
        css = "train" if training else "valid"
        parts.append(_leaf("line", x1=x, x2=x + 16, y1=14, y2=14, class_=f"series {css}"))
        parts.append(_el("text", css, x=x + 20, y=18.0, class_="legend-text"))
        x += 58
    return _el("g", *parts)


# -- cancels and failures ------------------------------------------------------------------------

_EVENTS_LISTED: Final = 100


def _events_section(page: RunPage, walk: _Walk) -> _Html:
    report = page.report
    parts: list[str | None] = [_failure_card(report)]
    if walk.listed:
        start, kind = page.log.start_ns or 0, report.kind
        rows = [
            (
                event.step.trigger,
                str(event.step.epoch),
                str(event.step.iter),
                _pass_name(kind, training=event.step.training),
                _duration(event.step.t_ns - start),
                _reasons_said(event) or "-",
            )
            for event in walk.listed
        ]
        columns = ("what", "epoch", "batch", "pass", "at", "why: the notes written just before")
        parts.append(_table(columns, rows, {1, 2, 4}))
        if walk.events > len(walk.listed):
            more = walk.events - len(walk.listed)
            parts.append(_el("p", f"... and {more:,} more.", class_="note"))
    counts = ", ".join(f"{n:,} {trigger}" for trigger, n in report.cancels.items() if n)
    said = f"Cancels: {counts}." if counts else "No cancel."
    if report.failure is None and report.failed_at is None:
        said += " No failure."
    return _section("events", "Cancels and failures", _el("p", said, class_="note"), *parts)


def _failed_where(kind: RunKind | None, at: Mapping[str, Any]) -> str:
    name = _pass_name(kind, training=at.get("training") is True)
    return f"epoch {at.get('epoch', '-')}, {name} batch {at.get('iter', '-')}"


def _failure_card(report: RunReport) -> _Html | None:
    failure, at = report.failure, report.failed_at
    if failure is None and at is None:
        return None
    failure, at = failure or {}, at or {}
    error = _log_text(failure.get(FailureField.TYPE.value, "an exception"), 120)
    rows = [
        ("state", _log_text(failure.get(FailureField.STATE.value, at.get("state", "-")), 80)),
        ("hook", _log_text(failure.get(FailureField.HOOK.value) or "-", 80)),
        ("callback", _log_text(failure.get(FailureField.CALLBACK.value) or "-", 120)),
        ("where", _failed_where(report.kind, at)),
    ]
    message = failure.get(FailureField.MESSAGE.value)
    text = message if isinstance(message, str) else shown(message, 300)
    lines = [_clip(printable(line), 300) for line in _clip(text, 4000).splitlines()[:40]]
    facts = [_el("div", _el("dt", name), _el("dd", value)) for name, value in rows]
    return _el(
        "div",
        _el("h3", "Failed: ", _el("code", error)),
        _el("pre", _Html("\n".join(_escaped(line) for line in lines))) if lines else None,
        _el("dl", *facts, class_="facts"),
        class_="failure",
    )


# -- slowest transitions -------------------------------------------------------------------------


def _slowest_section(report: RunReport) -> _Html:
    if not report.slowest:
        return _section("slowest", "Slowest transitions", _el("p", "None recorded.", class_="note"))
    rows = [
        (
            _duration(slow.duration_ns),
            str(slow.line),
            slow.trigger,
            f"{slow.source} → {slow.dest}",
            str(slow.epoch),
            str(slow.iter),
            "-"
            if {slow.source, slow.dest} <= {State.IDLE.value, State.FIT.value}
            else _pass_name(report.kind, training=slow.training),
        )
        for slow in report.slowest
    ]
    said = _el(
        "p",
        "The time spent in a state before each of these transitions left it: the longest waits "
        "of the run.",
        class_="note",
    )
    columns = ("time before", "line", "trigger", "transition", "epoch", "batch", "pass")
    return _section("slowest", "Slowest transitions", said, _table(columns, rows, {0, 1, 4, 5}))


# -- time per callback (hook_times notes) -------------------------------------------------------

_HOOK_TIMES_NOTE: Final = "hook_times"
_HOOK_TIMES_KEPT: Final = 4096
"""Distinct (callback, hook) pairs added up at most; a log's further rows are passed over."""
_CALLBACKS_LISTED: Final = 30

_CallbackKey = tuple[str, int]
"""A callback as hook_times rows name it: its class name and its index in the header's cbs."""


def _hook_times(notes: Iterable[Note]) -> dict[_CallbackKey, dict[str, tuple[int, int]]]:
    """Add up the ``hook_times`` notes: per callback, per hook, (calls, nanoseconds).

    A note holds ``hooks``, rows of [class name, index in cbs, hook, calls, ns] (see
    record.schema.json); read tolerantly, a row of any other shape is passed over.
    """
    found: dict[_CallbackKey, dict[str, tuple[int, int]]] = {}
    pairs = 0
    for note in notes:
        rows = note.fields.get("hooks") if note.name == _HOOK_TIMES_NOTE else None
        for row in rows if isinstance(rows, list) else ():
            if not _is_hook_row(row):
                continue
            name, index, hook, calls, ns = row
            hooks = found.setdefault((name, index), {})
            before = hooks.get(hook)
            if before is None and pairs >= _HOOK_TIMES_KEPT:
                continue
            pairs += before is None
            hooks[hook] = (calls, ns) if before is None else (before[0] + calls, before[1] + ns)
    return {key: hooks for key, hooks in found.items() if hooks}


def _is_hook_row(row: object) -> bool:
    if not isinstance(row, list) or len(row) != 5:
        return False
    name, index, hook, calls, ns = row
    counts = (index, calls, ns)
    return (
        isinstance(name, str)
        and isinstance(hook, str)
        and all(type(n) is int and n >= 0 for n in counts)
    )


def _hook_times_section(log: RunLog, report: RunReport) -> _Html | None:
    found = _hook_times(log.notes)
    if not found:
        return None
    totals = sorted(
        ((sum(ns for _, ns in hooks.values()), key) for key, hooks in found.items()),
        key=lambda item: (-item[0], item[1][1]),
    )
    hooks_ns = report.time_by_work_ns.get(Work.HOOKS, 0) or sum(t for t, _ in totals) or 1
    most = totals[0][0] or 1
    rows = [_callback_row(key, found[key], total, most, hooks_ns) for total, key in totals]
    note = _el(
        "p",
        "The time each callback's hooks took (Learner(profile_hooks=True) notes it as "
        "hook_times at each pass's end), the longest first, with its share of the run's hook time.",
        class_="note",
    )
    more = len(rows) - _CALLBACKS_LISTED
    tail = _el("p", f"... and {more:,} more callbacks.", class_="note") if more > 0 else None
    columns = ("callback", "calls", "time", "% of hooks", "", "its longest hooks")
    table = _table(columns, rows[:_CALLBACKS_LISTED], {1, 2, 3})
    return _section("hooks", "Time per callback", note, table, tail)


def _callback_row(
    key: _CallbackKey, hooks: Mapping[str, tuple[int, int]], total: int, most: int, hooks_ns: int
) -> tuple[str, ...]:
    name, index = key
    calls = sum(c for c, _ in hooks.values())
    longest = sorted(hooks.items(), key=lambda item: -item[1][1])[:3]
    said = ", ".join(
        f"{_clip(hook, 40)} {_duration(ns)} ({c:,} calls)" for hook, (c, ns) in longest
    )
    bar = _el(
        "span",
        _el("span", class_="fill", style=f"width:{100 * total / most:.1f}%"),
        class_="meter",
    )
    share = f"{100 * total / hooks_ns:.1f}"
    return (f"{_clip(name, 80)} (cbs[{index}])", f"{calls:,}", _duration(total), share, bar, said)


# -- the stylesheet ------------------------------------------------------------------------------

_CSS: Final = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;--ok:#15803d;
--bad:#b91c1c;--train:#3b82f6;--valid:#10b981;--cancel:#ea580c;--fail:#dc2626;--flow:#475569}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:20px}
h1{font-size:22px;margin:0 0 6px;font-weight:650}
h2{font-size:17px;margin:0 0 12px;font-weight:650}
h3{font-size:15px;margin:16px 0 8px;font-weight:600}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
section,.banner{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:16px 20px;margin:0 0 16px}
.banner{border-left:6px solid var(--ok)}
.banner.bad{border-left-color:var(--bad);background:#fef2f2}
.verdict{margin:0;font-weight:600;color:var(--ok)}
.bad .verdict,.bad .problem{color:var(--bad)}
.problem{margin:6px 0 0;overflow-wrap:anywhere}
.badge{font-size:13px;padding:2px 9px;border-radius:999px;background:#e5e7eb;vertical-align:middle;
font-weight:600}
.badge.completed{background:#dcfce7;color:#166534}.badge.cancelled{background:#ffedd5;color:#9a3412}
.badge.failed,.badge.truncated{background:#fee2e2;color:#991b1b}
.badge.preempted{background:#ede9fe;color:#5b21b6}
.badge.resumed{background:#dbeafe;color:#1e40af}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:2px 24px;margin:0}
.facts div{display:flex;gap:12px;padding:4px 0;border-bottom:1px solid var(--line)}
.facts dt{flex:0 0 96px;color:var(--muted)}.facts dd{margin:0;overflow-wrap:anywhere}
.note{color:var(--muted);margin:0 0 10px}
table{border-collapse:collapse;margin:4px 0 8px;font-variant-numeric:tabular-nums}
th,td{padding:4px 12px 4px 0;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{color:var(--muted);font-weight:600}.num{text-align:right}
svg{display:block;width:100%;height:auto}
svg text{font-family:inherit}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;color:var(--muted);font-size:13px;margin:8px 0}
.swatch{display:inline-block;width:16px;height:10px;border-radius:2px;margin-right:6px;
vertical-align:middle;background:var(--flow)}
.swatch.flow{height:3px}.swatch.cancel{height:3px;background:var(--cancel)}
.swatch.fail{height:3px;background:var(--fail)}
.swatch.unvisited{background:#fff;border:1px dashed #9ca3af}
.swatch.train{background:var(--train)}.swatch.valid{background:var(--valid)}
.swatch.cancelled{background:#fff;border:2px solid var(--cancel)}
.swatch.failed{background:var(--fail)}.swatch.open{background:#e5e7eb;border:1px dashed #6b7280}
.swatch.mark-cancel{background:var(--cancel);width:10px;clip-path:polygon(50% 0,100% 100%,0 100%)}
.swatch.mark-fail{background:var(--fail);width:10px;clip-path:polygon(0 0,20% 0,50% 35%,80% 0,
100% 0,100% 20%,65% 50%,100% 80%,100% 100%,80% 100%,50% 65%,20% 100%,0 100%,0 80%,35% 50%,0 20%)}
.swatch.preempted{background:#fff;border:2px solid #7c3aed}
.swatch.mark-preempt{background:#7c3aed;width:10px;clip-path:polygon(50% 0,100% 100%,0 100%)}
.state rect{fill:#eef2ff;stroke:#6366f1;stroke-width:1.5}
.state .name{font-size:13px;font-weight:600;text-anchor:middle;fill:#1e1b4b}
.state .spent{font-size:10.5px;text-anchor:middle;fill:var(--muted)}
.state.unvisited rect{fill:#fff;stroke:#cbd5e1;stroke-dasharray:4 3}
.state.unvisited .name{fill:#9ca3af;font-weight:400}
.state.failed-in rect{stroke:var(--fail);stroke-width:3;fill:#fef2f2}
.edge{fill:none;stroke:var(--flow);stroke-width:1.6}
.edge.cancel{stroke:var(--cancel);stroke-dasharray:6 4}
.edge.fail{stroke:var(--fail);stroke-dasharray:6 4}
.edge.failure{stroke:var(--fail);stroke-width:2.6}
.head.flow{fill:var(--flow)}.head.cancel{fill:var(--cancel)}.head.fail,.head.failure{fill:var(--fail)}
.edge-label{font-size:12px;text-anchor:middle;fill:#334155;paint-order:stroke;stroke:#fff;
stroke-width:4px;stroke-linejoin:round}
.edge-label.count{fill:var(--muted);font-size:11px}.edge-label.ahead{font-size:11.5px}
.edge-label.cancel{fill:#c2410c}.edge-label.fail,.edge-label.failure{fill:#b91c1c;font-weight:600}
.gridline{stroke:#eef0f3;stroke-width:1}
.tick{font-size:11px;fill:var(--muted);text-anchor:middle}.tick.y{text-anchor:end}
.tickmark,.axis-line{stroke:#9ca3af;fill:none}
.lane{fill:#f8fafc}.lane-name{font-size:12px;text-anchor:end;fill:#374151}
.pass{stroke:#fff;stroke-width:.5}.pass.train{fill:var(--train)}.pass.valid{fill:var(--valid)}
.pass.cancelled{stroke:var(--cancel);stroke-width:2.5;fill-opacity:.55}
.pass.failed{fill:var(--fail)}.pass.preempted{stroke:#7c3aed;stroke-width:2.5}
.pass.open{fill:#e5e7eb;stroke:#6b7280;stroke-dasharray:4 3;stroke-width:1.5}
.bar-label{font-size:11px;fill:#fff;text-anchor:middle;pointer-events:none}
.bar-label.open{fill:#374151}
.mark.mark-cancel{fill:var(--cancel)}.mark.mark-preempt{fill:#7c3aed}
.mark.mark-fail{stroke:var(--fail);stroke-width:3;fill:none}
.stop{stroke-width:1.5;stroke-dasharray:3 3}.stop.mark-fail{stroke:var(--fail)}
.stop.mark-cancel{stroke:var(--cancel)}.stop.mark-preempt{stroke:#7c3aed}
.seg{stroke:#fff;stroke-width:1}
.seg-label{font-size:12px;fill:#fff;text-anchor:middle;font-weight:600;pointer-events:none}
.w-data{background:#a78bfa;fill:#a78bfa}.w-forward{background:#3b82f6;fill:#3b82f6}
.w-loss{background:#06b6d4;fill:#06b6d4}.w-backward{background:#f59e0b;fill:#f59e0b}
.w-step{background:#10b981;fill:#10b981}.w-validation{background:#14b8a6;fill:#0d9488}
.w-hooks{background:#ec4899;fill:#ec4899}.w-loop{background:#94a3b8;fill:#94a3b8}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
figure.chart{margin:0;border:1px solid var(--line);border-radius:8px;padding:6px;background:#fff}
.chart-title{font-size:14px;font-weight:600;fill:var(--fg)}
.axis-label{font-size:11.5px;fill:var(--muted);text-anchor:middle}
.series{fill:none;stroke-width:2;stroke-linejoin:round}
.series.train{stroke:var(--train)}.series.valid{stroke:var(--valid)}
.dot.train{fill:var(--train)}.dot.valid{fill:var(--valid)}
.dot.partial{fill:#fff;stroke-width:1.5}.dot.partial.train{stroke:var(--train)}
.dot.partial.valid{stroke:var(--valid)}
.legend-text{font-size:11.5px;fill:var(--muted)}
.failure{border:1px solid #fecaca;background:#fef2f2;border-radius:8px;padding:10px 14px;
margin:0 0 12px}
.failure h3{margin:0 0 6px;color:var(--bad)}
.failure pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0 0 8px;background:#fff;
border:1px solid #fecaca;border-radius:6px;padding:8px}
.meter{display:inline-block;width:160px;height:10px;background:#f1f5f9;border-radius:5px}
.meter .fill{display:block;height:10px;background:#ec4899;border-radius:5px}
footer{color:var(--muted);font-size:12.5px;text-align:center;margin:8px 0 24px}
"""
