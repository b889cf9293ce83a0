"""Rendering audit reports for people: rich tables when rich is installed, plain text otherwise."""

from __future__ import annotations

import importlib.util
import io
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fsm_learner.audit.replay import RunReport

__all__ = ["Table", "render_reports", "render_table"]


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
    """Render with rich (boxes) when available and asked for, plain aligned text otherwise."""
    if rich if rich is not None else _has_rich():
        return _rich_table(table)
    return _plain_table(table)


def _plain_table(table: Table) -> str:
    widths = [
        max([len(table.columns[i]), *(len(r[i]) for r in table.rows)])
        for i in range(len(table.columns))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in table.right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    body = [line(r) for r in table.rows]
    return "\n".join([f"  {table.title}", line(table.columns), rule, *body])


def _rich_table(table: Table) -> str:
    from rich.console import Console  # noqa: PLC0415 (optional dependency)
    from rich.table import Table as RichTable  # noqa: PLC0415 (optional dependency)

    rich_table = RichTable(title=table.title, title_justify="left")
    for i, column in enumerate(table.columns):
        rich_table.add_column(column, justify="right" if i in table.right else "left")
    for row in table.rows:
        rich_table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=110, force_terminal=False, color_system=None).print(rich_table)
    return out.getvalue().rstrip()


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.3f}"


def _state_table(report: RunReport) -> Table:
    total = report.wall_ns or 1
    rows = [
        (state, _ms(ns), f"{100 * ns / total:.1f}")
        for state, ns in sorted(report.time_in_state_ns.items(), key=lambda kv: -kv[1])
    ]
    rows.append(("total", _ms(sum(report.time_in_state_ns.values())), "100.0"))
    return Table("time per state", ("state", "ms", "%"), tuple(rows), frozenset({1, 2}))


_OUTSIDE_PASSES: Final = frozenset({"idle", "fit"})


def _pass_name(source: str, dest: str, *, training: bool) -> str:
    if source in _OUTSIDE_PASSES and dest in _OUTSIDE_PASSES:
        return "-"
    return "train" if training else "valid"


def _slow_table(report: RunReport) -> Table:
    rows = tuple(
        (
            _ms(s.duration_ns),
            str(s.seq),
            s.trigger,
            f"{s.source} -> {s.dest}",
            str(s.epoch),
            str(s.iter),
            _pass_name(s.source, s.dest, training=s.training),
        )
        for s in report.slowest
    )
    columns = ("ms before", "seq", "trigger", "transition", "epoch", "iter", "pass")
    return Table("slowest transitions", columns, rows, frozenset({0, 1, 4, 5}))


def _describe(report: RunReport) -> list[str]:
    verdict = "verified" if report.verified else "DOES NOT VERIFY"
    lines = [f"{report.path}  run {report.run_id or '?'}  {report.status.value}  {verdict}"]
    if report.problem is not None:
        lines.append(f"  problem: {report.problem}")
    train, valid = report.batches
    cancels = ", ".join(f"{k.removeprefix('cancel_')} {v}" for k, v in report.cancels.items())
    lines.append(
        f"  epochs {report.epochs}, batches {train} train / {valid} valid, "
        f"cancels: {cancels}, notes {report.notes}",
    )
    lines.append(
        f"  records {report.records}, transitions {report.transitions}, "
        f"wall {report.wall_ns / 1e9:.3f} s, head {report.head or '-'}",
    )
    if report.failure is not None:
        where = report.failure.get("state")
        hook = report.failure.get("hook")
        cb = report.failure.get("callback")
        at = report.failed_at or {}
        lines.append(
            f"  failed: {report.failure.get('type')}: {report.failure.get('message')!r} in state "
            f"{where}{f' (hook {hook} of {cb})' if hook else ''}, epoch {at.get('epoch')}, "
            f"iter {at.get('iter')}, {'train' if at.get('training') else 'valid'} pass",
        )
    return lines


def render_reports(reports: Sequence[RunReport], *, rich: bool | None = None) -> str:
    """Render the whole human-readable audit summary of the given runs."""
    out: list[str] = []
    for report in reports:
        out.extend(_describe(report))
        if report.records:
            out.append(render_table(_state_table(report), rich=rich))
        if report.slowest:
            out.append(render_table(_slow_table(report), rich=rich))
        out.append("")
    ok = sum(r.verified for r in reports)
    out.append(f"{len(reports)} run(s): {ok} verified, {len(reports) - ok} do not verify")
    return "\n".join(out)
