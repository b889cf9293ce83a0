r"""Rendering audit reports for people: boxed tables when rich is installed, plain otherwise.

The boxes are the ones rich draws (heavy head, light body), drawn here: rich takes about
2 ms to lay out a table, so a log of 300,000 tiny runs took 20 minutes to summarise.
A report is rendered on its own (``render_report``), so the command prints each run as
soon as it is replayed. What a log holds (run ids, file names, exception messages)
reaches the terminal through ``printable``: an ANSI escape shows as ``\x1b``.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Final

import attrs

from fsm_learner._display import printable, shown
from fsm_learner.audit.codec import FailureField
from fsm_learner.audit.ranks import ranges_text, rank_ranges
from fsm_learner.audit.replay import MAX_HOOK_TIMES_KEPT, Work, sorted_hook_times
from fsm_learner.callback import Override
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from fsm_learner.audit.lineage import LineageReport, LinkReport
    from fsm_learner.audit.ranks import AgreedCancel, DistributedReport, RankLog
    from fsm_learner.audit.replay import RunReport, SlowTransition

__all__ = [
    "Table",
    "render_distributed",
    "render_distributed_totals",
    "render_lineage",
    "render_lineage_totals",
    "render_report",
    "render_reports",
    "render_table",
    "render_totals",
]


@attrs.frozen
class Table:
    """A titled table of strings; right-aligned columns are listed in ``right``."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[int] = frozenset()


def _has_rich() -> bool:
    return importlib.util.find_spec("rich") is not None


def render_table(table: Table, *, rich: bool | None = None) -> str:
    """Render boxed as rich draws it when rich is installed (or asked for), plain otherwise."""
    if rich if rich is not None else _has_rich():
        return _boxed_table(table)
    return _plain_table(table)


def _widths(table: Table) -> list[int]:
    return [max(map(len, column)) for column in zip(table.columns, *table.rows, strict=True)]


def _specs(table: Table, widths: Sequence[int]) -> list[str]:
    """Return a format field per column: its width, aligned as the table says."""
    return [f"{{:{'>' if i in table.right else '<'}{w}}}" for i, w in enumerate(widths)]


def _plain_table(table: Table) -> str:
    widths = _widths(table)
    row = "  " + "  ".join(_specs(table, widths))

    def line(cells: Sequence[str]) -> str:
        return row.format(*cells).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    body = [line(r) for r in table.rows]
    return "\n".join([f"  {table.title}", line(table.columns), rule, *body])


def _boxed_table(table: Table) -> str:
    """Draw the table as rich does with its default box, a left-justified title, no colour."""
    widths = _widths(table)

    def rule(left: str, fill: str, cross: str, right: str) -> str:
        return left + cross.join(fill * (w + 2) for w in widths) + right

    def template(bar: str) -> str:
        return bar + bar.join(f" {spec} " for spec in _specs(table, widths)) + bar

    top, row = rule("┏", "━", "┳", "┓"), template("│")
    return "\n".join(
        [
            table.title.ljust(len(top)),
            top,
            template("┃").format(*table.columns),
            rule("┡", "━", "╇", "┩"),
            *(row.format(*cells) for cells in table.rows),
            rule("└", "─", "┴", "┘"),
        ]
    )


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def _work_table(report: RunReport) -> Table:
    """Where the run's time went, by the work done: the categories add up to its wall time."""
    total = report.wall_ns or 1
    rows = [
        (work.value, _ms(ns), f"{100 * ns / total:.1f}")
        for work, ns in report.time_by_work_ns.items()
    ]
    rows.append(("total", _ms(sum(report.time_by_work_ns.values())), "100.0"))
    return Table("where the time went", ("work", "ms", "%"), tuple(rows), frozenset({1, 2}))


_OVERRIDES: Final = frozenset(override.value for override in Override)
_HOOK_ROWS_SHOWN: Final = 20
"""The (callback, hook) pairs the time-per-callback table lists, the longest first."""
_NAME_SHOWN: Final = 40


def _hook_times_table(report: RunReport) -> Table:
    """Tabulate the time per callback and hook or override (``hook_times`` notes).

    Calls, total, mean, and share of the callbacks' time: the run's hook time (the
    footer's ``hook_ns``, the ``hooks`` work; without a footer, the time the hook rows
    give) and the overrides' self time, which is in the work they did (step, backward...).
    """
    ranked = sorted_hook_times(report.hook_times)
    overrides = sum(ns for (_, _, column), (_, ns) in ranked if column in _OVERRIDES)
    hooks = report.time_by_work_ns[Work.HOOKS] or sum(ns for _, (_, ns) in ranked) - overrides
    total = hooks + overrides or 1
    rows = [
        (
            str(index),
            printable(_text(name, _NAME_SHOWN)),
            hook,
            f"{calls:,}",
            _ms(ns),
            f"{ns / calls / 1e3:.1f}",
            f"{100 * ns / total:.1f}",
        )
        for (name, index, hook), (calls, ns) in ranked[:_HOOK_ROWS_SHOWN]
    ]
    rest = ranked[_HOOK_ROWS_SHOWN:]
    if rest:
        calls, ns = sum(c for _, (c, _) in rest), sum(n for _, (_, n) in rest)
        more = f"{len(rest):,} more"
        rows.append(("", more, "", f"{calls:,}", _ms(ns), "", f"{100 * ns / total:.1f}"))
    columns = ("cbs", "callback", "hook", "calls", "total ms", "mean µs", "% of cb time")
    return Table("time per callback", columns, tuple(rows), frozenset({0, 3, 4, 5, 6}))


def _left_out_line(report: RunReport) -> str:
    return (
        f"  hook_times: {report.hook_times_left_out:,} row(s) beyond the first "
        f"{MAX_HOOK_TIMES_KEPT:,} (callback, hook) pairs left out of the table"
    )


_OUTSIDE_PASSES: Final = frozenset({"idle", "fit"})


def _pass_name(kind: RunKind | None, *, training: bool) -> str:
    """Name a pass: a fit's training or validation pass, or a predict run's."""
    if training:
        return "train"
    return "predict" if kind is RunKind.PREDICT else "valid"


def _pass_of(slow: SlowTransition, kind: RunKind | None) -> str:
    """Name the pass a transition was taken in; "-" between passes."""
    if slow.source in _OUTSIDE_PASSES and slow.dest in _OUTSIDE_PASSES:
        return "-"
    return _pass_name(kind, training=slow.training)


def _slow_table(report: RunReport) -> Table:
    kind = report.kind
    rows = tuple(
        (
            _ms(s.duration_ns),
            str(s.line),
            s.trigger,
            f"{s.source} -> {s.dest}",
            str(s.epoch),
            str(s.iter),
            _pass_of(s, kind),
        )
        for s in report.slowest
    )
    columns = ("ms before", "line", "trigger", "transition", "epoch", "iter", "pass")
    return Table("slowest transitions", columns, rows, frozenset({0, 1, 4, 5}))


_RUN_ID_SHOWN: Final = 64


def _text(value: object, limit: int = 80) -> str:
    """Show a field of the failure: a string cut to ``limit``, anything else described."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 3] + "..."
    return shown(value)


def _failure_line(
    failure: Mapping[str, object], at: Mapping[str, object], kind: RunKind | None
) -> str:
    hook = failure.get(FailureField.HOOK.value)
    callback = failure.get(FailureField.CALLBACK.value)
    where = f" (hook {_text(hook)} of {_text(callback)})" if hook else ""
    error, message = failure.get(FailureField.TYPE.value), failure.get(FailureField.MESSAGE.value)
    state = failure.get(FailureField.STATE.value)
    return (
        f"  failed: {_text(error)}: {shown(message, 300)} in "
        f"state {_text(state)}{where}, epoch {at.get('epoch')}, iter "
        f"{at.get('iter')}, {_pass_name(kind, training=at.get('training') is True)} pass"
    )


def _chain(report: RunReport) -> str:
    """Say whether the run's chain is keyed: unkeyed, anyone can recompute its seals."""
    keyed = report.keyed
    if keyed is None:
        return "chain not read"
    return "keyed chain" if keyed else "unkeyed chain"


def _describe(report: RunReport) -> list[str]:
    verdict = "verified" if report.verified else "DOES NOT VERIFY"
    run_id = _text(report.run_id, _RUN_ID_SHOWN) or "?"
    lines = [f"{report.path}  run {run_id}  {report.status.value}  {verdict}"]
    if report.problem is not None:
        lines.append(f"  problem: {report.problem}")
    lines.append(f"  {_work_done(report)}, notes {report.notes}")
    lines.append(
        f"  records {report.records}, transitions {report.transitions}, "
        f"wall {report.wall_ns / 1e9:.3f} s, head {report.head or '-'} ({_chain(report)})",
    )
    if report.failure is not None:
        lines.append(_failure_line(report.failure, report.failed_at or {}, report.kind))
    return [printable(line) for line in lines]


def _work_done(report: RunReport) -> str:
    """Say what the run did: its kind, then its epochs and batches, and its cancels."""
    train, valid = report.batches
    cancels = ", ".join(f"{k.removeprefix('cancel_')} {v}" for k, v in report.cancels.items())
    kind = report.kind
    if kind is None:
        return f"kind unknown, cancels: {cancels}"
    if kind is RunKind.FIT:
        batches = f"epochs {report.epochs}, batches {train} train / {valid} valid"
    else:
        batches = f"batches {valid}"
    return f"{kind} run: {batches}, cancels: {cancels}"


def render_report(report: RunReport, *, rich: bool | None = None) -> str:
    """Render one run's summary: what was verified, its counts, where the time went, slowest.

    A run that profiled its hooks also gets the time per callback, after where the time went.
    """
    out = _describe(report)
    if report.records:
        out.append(render_table(_work_table(report), rich=rich))
    if report.hook_times:
        out.append(render_table(_hook_times_table(report), rich=rich))
    if report.hook_times_left_out:
        out.append(_left_out_line(report))
    if report.slowest:
        out.append(render_table(_slow_table(report), rich=rich))
    return "\n".join(out)


def render_totals(runs: int, verified: int, resumed: int = 0) -> str:
    """Render the summary's last line: how many runs verified.

    ``resumed`` runs were killed and resumed in a lineage that verifies: they do not
    verify on their own, and are not counted among the runs that do not.
    """
    accounted = f"{resumed} killed and resumed (lineage verified), " if resumed else ""
    failed = runs - verified - resumed
    return f"{runs} run(s): {verified} verified, {accounted}{failed} do not verify"


def render_reports(reports: Sequence[RunReport], *, rich: bool | None = None) -> str:
    """Render the whole human-readable audit summary of the given runs."""
    out = [render_report(report, rich=rich) + "\n" for report in reports]
    out.append(render_totals(len(reports), sum(r.verified for r in reports)))
    return "\n".join(out)


def _link_lines(link: LinkReport) -> list[str]:
    """Say where a resumed run re-enters the run it resumes, and what it redoes."""
    run, parent = _text(link.run_id, _RUN_ID_SHOWN), _text(link.resumes, _RUN_ID_SHOWN)
    resumes = (
        f"  run {run} resumes run {parent} at record {link.records} (head {link.head}), "
        f"{link.at}: checkpoint {link.checkpoint} (sha256 {link.sha256[:16]}...)"
    )
    lines = [resumes]
    redone = ", ".join(str(batches) for batches in link.redone) or "no batch"
    unsealed = f" (then {link.unsealed} lines never sealed)" if link.unsealed else ""
    lines.append(f"    redone by run {run}: {redone}{unsealed}")
    return lines


def render_lineage(lineage: LineageReport) -> str:
    """Render one lineage: its runs root first, each link, its problems, and its batches."""
    verdict = "verified" if lineage.verified else "DOES NOT VERIFY"
    runs = " -> ".join(f"run {_text(r.run_id, _RUN_ID_SHOWN)} ({r.path})" for r in lineage.runs)
    out = [f"lineage of {len(lineage.runs)} run(s): {runs}  {verdict}"]
    for link in lineage.links:
        out.extend(_link_lines(link))
    out.extend(
        f"  run {_text(r.run_id, _RUN_ID_SHOWN)} truncated (killed), resumed by run "
        f"{_text(r.continued_by, _RUN_ID_SHOWN)}: lineage verified"
        for r in lineage.runs
        if r.continued_by is not None
    )
    out.extend(f"  note: {note}" for note in lineage.notes)
    out.extend(f"  problem: {problem}" for problem in lineage.problems)
    if lineage.coverage:
        out.append(f"  {lineage.coverage}")
    return "\n".join(printable(line) for line in out)


def render_lineage_totals(lineages: int, verified: int) -> str:
    """Render how many lineages verified."""
    return f"{lineages} lineage(s): {verified} verified, {lineages - verified} do not verify"


def _rank_line(log: RankLog) -> str:
    if log.killed:
        how = "truncated: killed, its sealed records verify"
    else:
        failure = f": {log.failure}" if log.failure is not None else ""
        how = f"{log.status.value}{failure}, {'verified' if log.verified else 'DOES NOT VERIFY'}"
    rank = "?" if log.rank is None else log.rank
    return f"  rank {rank}: {log.path} ({how})"


def _lockstep_line(report: DistributedReport) -> str:
    if report.caught:
        return f"  lockstep: NO, the ranks found so themselves: {report.caught}"
    if report.divergence is not None:
        return f"  lockstep: NO, first divergence at {report.divergence}"
    if report.lockstep is None:
        return f"  lockstep: not checked ({report.unchecked})"
    left_out = " (the trailing begin_* and fail of a failed run left out)" if report.failed else ""
    shorter = "".join(
        f"; rank {rank}, killed, logged the first {count}" for rank, count in report.shorter.items()
    )
    given = " (among the ranks given)" if report.missing else ""
    return f"  lockstep: yes{given}, {report.transitions} unit transitions{left_out}{shorter}"


def _agreed_line(cancel: AgreedCancel) -> str:
    first = cancel.first
    taken = f", taken as {first.taken}" if first.taken is not None else ", then the log ends"
    ats = {note.at for _, note in cancel.notes if note is not None}
    if len(ats) == 1:
        where = f"at {next(iter(ats))} on every rank"
    else:
        where = "at " + ", ".join(
            f"rank {rank} {'-' if note is None else note.at}" for rank, note in cancel.notes
        )
    error = f"; error: {shown(first.error, 200)}" if first.error is not None else ""
    return f"    {first}{taken}; {where}{error}"


def _world_line(report: DistributedReport) -> str:
    """Say the world size, the ranks of the world given and missing (as ranges), the status."""
    size, world = report.world_size, report.world_size or 0
    present = sorted(
        {log.rank for log in report.ranks if log.rank is not None and log.rank >= 0}
        if size is None
        else {log.rank for log in report.ranks if log.rank is not None and 0 <= log.rank < world}
    )
    missing = f" (missing: {ranges_text(report.missing)})" if report.missing else ""
    ranks = f"ranks {ranges_text(rank_ranges(present))}{missing}"
    said = (
        "world size unknown (no header says a valid one)" if size is None else f"world size {size}"
    )
    status = "status unknown" if report.status is None else report.status.value
    return f"{said}, {ranks}, {status}"


def render_distributed(report: DistributedReport) -> str:
    """Render one distributed run: its ranks, whether they are lockstep, the cancels agreed."""
    verdict = "verified" if report.verified else "DOES NOT VERIFY"
    run = _text(report.run_id, _RUN_ID_SHOWN)
    out = [f"distributed run {run}: {_world_line(report)}  {verdict}"]
    out.extend(_rank_line(log) for log in report.ranks)
    out.append(_lockstep_line(report))
    if report.lockstep is not None:
        out.append(f"  agreed cancels: {report.agreed_count or 'none'}")
        out.extend(_agreed_line(cancel) for cancel in report.agreed)
        if report.agreed_count > len(report.agreed):
            out.append(f"    ... and {report.agreed_count - len(report.agreed)} more")
    out.extend(f"  problem: {problem}" for problem in report.problems)
    return "\n".join(printable(line) for line in out)


def render_distributed_totals(runs: int, verified: int) -> str:
    """Render how many distributed runs verified."""
    return f"{runs} distributed run(s): {verified} verified, {runs - verified} do not verify"
