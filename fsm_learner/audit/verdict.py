"""What ``fsm-learner audit`` says of one run, for the commands that show a run or two.

``fsm-learner report`` and ``fsm-learner audit --diff`` must not vouch for a run that
``fsm-learner audit`` of the same files fails. ``audit_files`` audits the files the same
way (each run replayed, no run twice, the lineages of resumed runs, the ranks of a
distributed run), and ``Audited.verdict(report)`` gives one run's problems: its own, those
of a lineage it belongs to and those of its distributed run. A killed run that a lineage
that verifies continues is accounted for, as the audit says: its death is no problem.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from fsm_learner.audit.lineage import LineageReport, Lineages, RunKey, run_key, was_killed
from fsm_learner.audit.ranks import DistributedReport, DistributedRuns
from fsm_learner.audit.replay import FileAudit, Problem, RunReport, RunSet

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

__all__ = ["AuditSink", "Audited", "Verdict", "audit_files", "audit_into"]


@attrs.frozen
class Verdict:
    """One run as the audit of its files finds it."""

    problems: tuple[Problem, ...]
    """Every problem the audit names for this run, its own first; none when it verifies."""
    continued_by: str | None = None
    """The run that resumed it, when it was killed and a lineage that verifies continues it."""

    @property
    def verified(self) -> bool:
        """True when the audit names no problem of this run."""
        return not self.problems


@attrs.define
class Audited:
    """The runs of some files, audited as ``fsm-learner audit`` audits them."""

    runs: list[tuple[Path, RunReport]] = attrs.Factory(list)
    file_problems: list[Problem] = attrs.Factory(list)
    lineages: list[LineageReport] = attrs.Factory(list)
    distributed_runs: list[DistributedReport] = attrs.Factory(list)

    def run(self, path: Path, report: RunReport) -> None:
        """Keep a run's report."""
        self.runs.append((path, report))

    def problem(self, problem: Problem) -> None:
        """Keep a problem of a file or of the runs together."""
        self.file_problems.append(problem)

    def lineage(self, lineage: LineageReport) -> None:
        """Keep a lineage."""
        self.lineages.append(lineage)

    def distributed(self, report: DistributedReport) -> None:
        """Keep a distributed run."""
        self.distributed_runs.append(report)

    def verdict(self, report: RunReport) -> Verdict:
        """Return what the audit says of ``report``'s run (one of ``runs``)."""
        key = run_key(report)
        continued_by = self._continued_by(key) if was_killed(report) else None
        own = () if report.problem is None or continued_by else (report.problem,)
        of_lineages = tuple(
            problem
            for lineage in self.lineages
            if any((run.rank, run.run_id) == key for run in lineage.runs)
            for problem in lineage.problems
        )
        of_ranks = tuple(
            problem
            for distributed in self.distributed_runs
            if distributed.run_id == report.run_id
            for problem in distributed.all_problems()
        )
        return Verdict(own + of_lineages + of_ranks, continued_by)

    def _continued_by(self, key: RunKey) -> str | None:
        for lineage in self.lineages:
            for run in lineage.runs:
                if (run.rank, run.run_id) == key and run.continued_by is not None:
                    return run.continued_by
        return None


class AuditSink(Protocol):
    """What receives an audit's findings, in order: each run, then lineages and ranks."""

    def run(self, path: Path, report: RunReport) -> None:
        """Take a run's report, as soon as the run is replayed."""

    def problem(self, problem: Problem) -> None:
        """Take a problem of a file, or of the runs taken together."""

    def lineage(self, lineage: LineageReport) -> None:
        """Take a lineage of resumed runs, once every file is read."""

    def distributed(self, report: DistributedReport) -> None:
        """Take a distributed run, once every file is read."""


def audit_into(
    files: Sequence[Path],
    sink: AuditSink,
    *,
    key: bytes | None = None,
    expected_heads: Iterable[str] = (),
) -> None:
    """Audit ``files`` as ``fsm-learner audit`` does, telling ``sink`` what it finds.

    Every file replayed run by run (no run twice), then the lineages, the distributed
    runs and the expected heads not found.
    """
    runs = RunSet(expected_heads)
    lineages = Lineages(key=key)
    distributed = DistributedRuns()
    for path in files:
        audit = FileAudit(path, key=key)
        for report in audit:
            runs.add(report)
            lineages.add(report, path)
            distributed.add(report, path)
            sink.run(path, report)
        if audit.problem is not None:
            sink.problem(audit.problem)
    for lineage in lineages.check(files):
        sink.lineage(lineage)
    for run in distributed.check(files):
        sink.distributed(run)
    for problem in runs.missing():
        sink.problem(problem)


def audit_files(files: Sequence[Path], *, key: bytes | None = None) -> Audited:
    """Audit ``files`` as ``fsm-learner audit`` does; keep every run's report."""
    audited = Audited()
    audit_into(files, audited, key=key)
    return audited
