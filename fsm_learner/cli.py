"""The ``fsm-learner`` command: one sub-command per entry point.

Exit codes: 0 success, 1 a check failed (a run that does not verify, ...), 2 a usage
error (argparse's own convention). Errors are one line on stderr, never a traceback;
what they quote of a log or a file name is made printable first.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import orjson

from fsm_learner._display import file_name, printable
from fsm_learner.audit.codec import KEY_ENV, derive_key
from fsm_learner.audit.diff import (
    ChosenRun,
    diff_runs,
    render_diff,
    runs_by_id,
    runs_in_files,
)
from fsm_learner.audit.files import file_kind, log_files
from fsm_learner.audit.lineage import LineageReport, RunKey, run_key, was_killed
from fsm_learner.audit.summary import (
    render_distributed,
    render_distributed_totals,
    render_lineage,
    render_lineage_totals,
    render_report,
    render_totals,
)
from fsm_learner.audit.verdict import audit_into
from fsm_learner.diagram import (
    DiagramFormat,
    DiagramView,
    callbacks_view,
    check_docs,
    learner_from_factory,
    render,
    run_view,
    table_view,
    write_docs,
)
from fsm_learner.exceptions import ConfigurationError, FsmLearnerError, NoRunError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence
    from collections.abc import Set as AbstractSet

    from fsm_learner.audit.ranks import DistributedReport
    from fsm_learner.audit.replay import Problem, RunReport
    from fsm_learner.report import RunPage

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


def _audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "audit",
        help="verify audit logs and summarise their runs",
        description=(
            "Replay each run of the given logs (files, or directories of *.jsonl in any case) "
            "against the transition table: every block of records matching its seal (bound to "
            "its run's previous seal and to the file's), every seal in the writer's exact "
            "bytes, every transition legal, header and footer present and agreeing with the "
            "replay (the status too); print where each run's time went. A fit resumed from a "
            "checkpoint is checked against the run it resumes, when that run's log is given too "
            "(the checkpoint's seal, file and position), and each lineage of resumed fits as a "
            "whole (every batch of every pass begun exactly once; the batches redone); a run "
            "killed (truncated, every sealed block verifying) and resumed in a lineage that "
            "verifies is accounted for. The ranks of a fit across processes (each rank's log, "
            "<run>.rank<r>.jsonl, with world_size in its header) are checked together: every "
            "rank present once, their headers alike, their unit transitions and agreed cancels "
            "in lockstep (the first divergence named). Exit 0 when every run, lineage and "
            "distributed run verifies or is accounted for, 1 when one does not, 2 on a usage "
            "error. With --diff A B, compare two runs instead (see --diff)."
        ),
    )
    # str: Path("") would be "."; none only with --diff (checked in _run_audit)
    parser.add_argument("paths", nargs="*", metavar="PATH")
    parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("A", "B"),
        help=(
            "compare two runs: without PATH, A and B are log files (the run begun last in "
            "each); with PATHs, run ids found in those logs (a fit across ranks: its lowest "
            "rank's log; a directory only as PATH). "
            "The files are audited as fsm-learner audit of them would (lineages and ranks "
            "too): a run it does not verify is named and fails the diff. Says when the kinds "
            "differ (metrics then not compared) and when a run resumes another (its path, "
            "and the other's, compared from the resume point). Shows whether the table "
            "digests match, the header fields that differ (wall and prev left out), the "
            "first transition where the paths part (trigger, epoch, pass, batch) and the "
            "metrics notes' values per epoch and pass with b - a. Exit 0 when both verify, "
            "are of one kind and the paths are identical (settings and metrics may differ), "
            "1 otherwise (a log of no run too), 2 on a usage error"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary (or the diff) as JSON"
    )
    parser.add_argument(
        "--expect-head",
        action="append",
        default=[],
        metavar="HASH",
        help=(
            "a chain head fit() returned (repeatable): each must end exactly one audited run, "
            "and every run must end on one of them. A run's header binds it to the run before "
            "it in its file, so only an expected head vouches for the last run of a file: "
            "removed whole, that run leaves no other trace"
        ),
    )
    parser.add_argument(
        "--key-env",
        metavar="VAR",
        help=(
            "environment variable holding the chain key of keyed logs; it must be set (default: "
            f"{KEY_ENV}, where unset means no key)"
        ),
    )
    parser.set_defaults(run=_run_audit, usage_error=parser.error)


class _KeyError(Exception):
    """--key-env names a variable that holds no key; the message says which."""


def _key(name: str | None) -> bytes | None:
    """Return the chain key: --key-env's variable must hold one; the default may not."""
    if name is None:
        return derive_key(os.environ.get(KEY_ENV) or None)
    value = os.environ.get(name)
    if not value:
        state = "empty" if value is not None else "not set"
        msg = (
            f"--key-env {printable(name)}: the environment variable {printable(name)!r} is "
            f"{state}; set it to the chain key, or leave --key-env out for logs without one"
        )
        raise _KeyError(msg)
    return derive_key(value)


def _write(stream: TextIO, text: str) -> None:
    """Write text; a stream that cannot encode a character gets it as an escape."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = stream.encoding or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))


class _Spool:
    """Problems in order, held in a spooled temporary file: memory does not grow with them.

    A problem is kept with the run it fails when that run was killed: a lineage that
    verifies may account for its death once every run is read (``read``).
    """

    def __init__(self) -> None:
        self.file: tempfile.SpooledTemporaryFile[str] | None = None
        """Made for the first problem: an audit with none makes no file."""

    def add(self, problem: str, killed: RunKey | None = None) -> None:
        if self.file is None:
            self.file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in close)
                max_size=1 << 20, mode="w+", encoding="utf-8"
            )
        self.file.write(orjson.dumps([killed, problem]).decode() + "\n")

    def read(
        self, accounted: AbstractSet[RunKey], broken: Mapping[RunKey, Problem | None] | None = None
    ) -> Iterator[str | None]:
        """Yield each problem; None for one whose run's death ``accounted`` accounts for.

        A killed run resumed in a lineage that does not verify yields the lineage's
        problem (``broken``) instead, why its death is not accounted for: "" when that is
        another run's own problem.
        """
        if self.file is None:
            return
        self.file.seek(0)
        for line in self.file:
            killed, problem = orjson.loads(line)
            key = None if killed is None else (killed[0], killed[1])
            if key is not None and key in accounted:
                yield None
            elif key is not None and problem and broken and key in broken:
                why = broken[key]
                yield "" if why is None else str(why)
            else:
                yield problem

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _broken(lineages: Iterable[LineageReport]) -> dict[RunKey, Problem | None]:
    """Return each run resumed in a lineage that does not verify, with why it does not.

    None when a run of the lineage does not verify on its own: that run's problem says why.
    """
    broken: dict[RunKey, Problem | None] = {}
    for lineage in lineages:
        if lineage.problems:
            why = None if lineage.unverified else lineage.problems[0]
            for run in lineage.runs[:-1]:
                broken.setdefault((run.rank, run.run_id), why)
    return broken


def _accounted(lineages: Iterable[LineageReport]) -> set[RunKey]:
    """Return the killed runs resumed in a lineage that verifies: their deaths are accounted for."""
    return {
        (run.rank, run.run_id)
        for lineage in lineages
        for run in lineage.runs
        if run.continued_by is not None
    }


class _TextSummary:
    """The audit's human summary: each run as soon as it is replayed, one problem on stderr.

    The problem named is the first of a file (it shows nowhere else), else of a run (its
    summary shows it too; a killed run's only when no lineage accounts for its death, and
    for a killed run resumed in a lineage that does not verify, that lineage's problem),
    else of a lineage, else of a distributed run, else of the runs taken together (an
    expected head not found). Lineages follow the runs, distributed runs the lineages.
    """

    def __init__(self) -> None:
        self.runs = self.verified = 0
        self.lineages: list[LineageReport] = []
        self.of_file: Problem | None = None
        self.of_run: Problem | None = None
        self.killed = _Spool()
        """The killed runs: each one's problem, "" once ``of_run`` is found before it."""
        self.of_lineage: Problem | None = None
        self.distributed_runs = self.distributed_verified = 0
        self.of_distributed: Problem | None = None
        self.of_all: Problem | None = None

    def close(self) -> None:
        self.killed.close()

    def run(self, _path: Path, report: RunReport) -> None:
        self.runs += 1
        self.verified += report.verified
        _write(sys.stdout, render_report(report) + "\n\n")
        if report.problem is None:
            return
        if was_killed(report):
            self.killed.add("" if self.of_run else str(report.problem), run_key(report))
        else:
            self.of_run = self.of_run or report.problem

    def problem(self, problem: Problem) -> None:
        if problem.path:
            self.of_file = self.of_file or problem
        else:
            self.of_all = self.of_all or problem

    def lineage(self, lineage: LineageReport) -> None:
        self.lineages.append(lineage)
        _write(sys.stdout, render_lineage(lineage) + "\n\n")
        if lineage.problems:
            self.of_lineage = self.of_lineage or lineage.problems[0]

    def distributed(self, report: DistributedReport) -> None:
        self.distributed_runs += 1
        self.distributed_verified += report.verified
        _write(sys.stdout, render_distributed(report) + "\n\n")
        problems = report.all_problems()
        if problems:
            self.of_distributed = self.of_distributed or problems[0]

    def finish(self) -> int:
        if self.lineages:
            verified = sum(lineage.verified for lineage in self.lineages)
            _write(sys.stdout, render_lineage_totals(len(self.lineages), verified) + "\n")
        if self.distributed_runs:
            totals = render_distributed_totals(self.distributed_runs, self.distributed_verified)
            _write(sys.stdout, totals + "\n")
        resumed, killed = 0, None
        for problem in self.killed.read(_accounted(self.lineages), _broken(self.lineages)):
            resumed += problem is None
            killed = killed or problem
        of_run = killed or self.of_run
        if self.runs:
            _write(sys.stdout, render_totals(self.runs, self.verified, resumed) + "\n")
        first = self.of_file or of_run or self.of_lineage or self.of_distributed or self.of_all
        if first is None:
            return EXIT_OK
        _write(sys.stderr, f"fsm-learner audit: {printable(str(first))}\n")
        return EXIT_FAILED


_JSON_UNSAFE: Final = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
"""DEL, the C1 controls and the line separators, as UTF-8: orjson writes them raw."""


def _json(value: object) -> str:
    """Indented JSON with every control character escaped, for a terminal as for a parser."""
    data = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    data = _JSON_UNSAFE.sub(lambda m: b"\\u%04x" % ord(m[0].decode()), data)
    return data.decode()


class _JsonSummary:
    """The audit as one JSON document, written run by run: runs, lineages, problems, verified.

    Problems are held in a spooled temporary file until the runs are written, so memory
    does not grow with the number of runs that fail. ``lineages`` is there only when a
    run resumes another (lineages are few: they are held until the end), ``distributed``
    only when a run ran across ranks. A killed run's problem is left out when a lineage
    that verifies accounts for its death.
    """

    def __init__(self) -> None:
        self.runs = 0
        self.unverified = False
        """A run that does not verify with no problem of its own (its problem is spooled)."""
        self.problems = _Spool()
        self.lineages: list[LineageReport] = []
        self.distributed_runs: list[DistributedReport] = []
        _write(sys.stdout, '{\n  "runs": [')

    def close(self) -> None:
        self.problems.close()

    def run(self, _path: Path, report: RunReport) -> None:
        separator = "," if self.runs else ""
        _write(sys.stdout, f"{separator}\n    " + _json(report.to_json()).replace("\n", "\n    "))
        self.runs += 1
        self.unverified = self.unverified or (not report.verified and report.problem is None)
        if report.problem is not None:
            killed = run_key(report) if was_killed(report) else None
            self.problems.add(str(report.problem), killed)

    def problem(self, problem: Problem) -> None:
        self.problems.add(str(problem))

    def lineage(self, lineage: LineageReport) -> None:
        self.lineages.append(lineage)
        for problem in lineage.problems:
            self.problem(problem)

    def distributed(self, report: DistributedReport) -> None:
        self.distributed_runs.append(report)
        for problem in report.all_problems():
            self.problem(problem)

    def finish(self) -> int:
        _write(sys.stdout, "\n  ]," if self.runs else "],")
        if self.lineages:
            lineages = [lineage.to_json() for lineage in self.lineages]
            _write(sys.stdout, '\n  "lineages": ' + _json(lineages).replace("\n", "\n  ") + ",")
        if self.distributed_runs:
            runs = [report.to_json() for report in self.distributed_runs]
            _write(sys.stdout, '\n  "distributed": ' + _json(runs).replace("\n", "\n  ") + ",")
        _write(sys.stdout, '\n  "problems": [')
        count = 0
        for problem in self.problems.read(_accounted(self.lineages)):
            if problem is not None:
                _write(sys.stdout, f"{',' if count else ''}\n    {_json(problem)}")
                count += 1
        _write(sys.stdout, "\n  ]," if count else "],")
        verified = not count and not self.unverified
        _write(sys.stdout, f'\n  "verified": {"true" if verified else "false"}\n}}\n')
        return EXIT_OK if verified else EXIT_FAILED


_EMPTY_PATH: Final = (
    "'': the empty path names no log; give a log file or a directory of them ('.' for the "
    "current directory)"
)


_NO_PATH: Final = "give PATH (the logs to audit: files, or directories of them), or --diff A B"


def _run_audit(args: argparse.Namespace) -> int:
    if args.diff is not None:
        return _run_diff(args)
    paths: list[str] = args.paths
    if not paths:  # argparse's usage error, as when PATH was required (nargs="+")
        args.usage_error(_NO_PATH)
    files, errors = log_files(Path(path) for path in paths if path)
    if not all(paths):
        errors.insert(0, _EMPTY_PATH)
    try:
        key = _key(args.key_env)
    except _KeyError as exc:
        errors.append(str(exc))
    if errors:
        for error in errors:
            _write(sys.stderr, f"fsm-learner audit: {printable(error)}\n")
        return EXIT_USAGE
    summary = _JsonSummary() if args.json else _TextSummary()
    try:
        _audit(files, key=key, expected_heads=args.expect_head, summary=summary)
        return summary.finish()
    finally:
        summary.close()


def _run_diff(args: argparse.Namespace) -> int:
    """Compare the two runs of --diff: exit 0 when both verify and their paths are identical."""
    try:
        diff = diff_runs(*_diff_runs(args))
    except (_KeyError, ConfigurationError) as exc:
        _write(sys.stderr, f"fsm-learner audit --diff: {printable(str(exc))}\n")
        return EXIT_USAGE
    except NoRunError as exc:  # a log of no run: its audit fails too
        _write(sys.stderr, f"fsm-learner audit --diff: {printable(str(exc))}\n")
        return EXIT_FAILED
    except OSError as exc:  # a log gone or unreadable since its audit
        _write(sys.stderr, f"fsm-learner audit --diff: cannot read: {exc.strerror or exc}\n")
        return EXIT_FAILED
    if args.json:
        _write(sys.stdout, _json(diff.to_json()) + "\n")
    else:
        _write(sys.stdout, render_diff(diff) + "\n")
        for side in (diff.a, diff.b):
            for problem in side.problems:
                _write(sys.stderr, f"fsm-learner audit --diff: {printable(str(problem))}\n")
    return EXIT_OK if diff.identical else EXIT_FAILED


def _diff_runs(args: argparse.Namespace) -> tuple[ChosenRun, ChosenRun]:
    """Choose the runs --diff names; raise ConfigurationError (or _KeyError) on a usage error."""
    if args.expect_head:
        msg = "--expect-head goes with the audit of whole logs, not with --diff"
        raise ConfigurationError(msg)
    key = _key(args.key_env)
    a, b = args.diff
    if not args.paths:
        return runs_in_files(a, b, key=key)
    if not all(args.paths):
        raise ConfigurationError(_EMPTY_PATH)
    files, errors = log_files(Path(path) for path in args.paths)
    if errors:
        raise ConfigurationError(errors[0])
    return runs_by_id(a, b, files, key=key)


def _audit(
    files: Sequence[Path],
    *,
    key: bytes | None,
    expected_heads: Iterable[str],
    summary: _TextSummary | _JsonSummary,
) -> None:
    """Replay every file, run by run; then check the lineages, the distributed runs, the heads."""
    audit_into(files, summary, key=key, expected_heads=expected_heads)


def _diagram_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "diagram",
        help="draw the state machine: the table, a learner's callbacks, or a run's path",
        description=(
            "Draw the transition table as Mermaid (the default), DOT, SVG or PNG; SVG and PNG "
            "need Graphviz's dot. --learner puts a learner's callbacks on the transitions they "
            "run on; --from-log draws the path an audited run (a fit, a validate or a predict "
            "run) took; given the logs of a fit's ranks (files, or a directory), it draws the "
            "run once, when every rank is there and the ranks are lockstep. --write "
            "regenerates the committed diagrams and the README's generated "
            "parts (its diagram and path table), --check compares them with the table. Exit 0 "
            "on success, 1 when the drawing or a check fails, 2 on a usage error."
        ),
    )
    formats = [f.value for f in DiagramFormat]
    parser.add_argument("--format", choices=formats, help="default: mermaid")
    parser.add_argument("-o", "--output", type=Path, metavar="PATH", help="default: stdout (text)")
    view = parser.add_mutually_exclusive_group()
    view.add_argument(
        "--learner",
        metavar="MODULE:FACTORY",
        help="a function that returns a Learner: label each transition with its callbacks",
    )
    view.add_argument(
        "--from-log",
        nargs="+",
        metavar="RUN.jsonl",
        help=(
            "an audit log: draw the path its run took, each edge with how often; or the logs "
            "of a run's ranks (files, or directories of them): the run drawn once"
        ),
    )
    view.add_argument(
        "--write",
        action="store_true",
        help="regenerate the diagrams folder (and, without --dir, the README's generated parts)",
    )
    view.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the diagrams folder or the README differs from what the table makes",
    )
    parser.add_argument(
        "--run-id",
        metavar="ID",
        help="with --from-log: which run of the logs (default: the last, in every log given)",
    )
    parser.add_argument(
        "--key-env",
        metavar="VAR",
        help=f"with --from-log: variable holding a keyed log's key (default {KEY_ENV})",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help=(
            "with --write or --check: the diagrams folder, the README left alone (default: the "
            "checkout's diagrams/ and README.md)"
        ),
    )
    parser.set_defaults(run=_run_diagram)


def _diagram_usage(args: argparse.Namespace) -> str | None:
    """Say what is wrong with the combination of options, if anything."""
    docs = args.write or args.check
    if args.from_log is None:
        given = {"--run-id": args.run_id, "--key-env": args.key_env}
        alone = [option for option, value in given.items() if value is not None]
        if alone:
            return f"{alone[0]} goes with --from-log"
    if args.dir is not None and not docs:
        return "--dir goes with --write or --check"
    if docs and (args.format is not None or args.output is not None):
        return "--write and --check take no --format or --output: they do all of diagrams/"
    if args.format == DiagramFormat.PNG and args.output is None:
        return "png is an image, not text for stdout: give --output PATH"
    if args.from_log is not None:
        return _key_problem(args.key_env) or _from_log_problem(args.from_log)
    return None


def _key_problem(name: str | None) -> str | None:
    """Say why --key-env's variable holds no key, if it does not."""
    try:
        _key(name)
    except _KeyError as exc:
        return str(exc)
    return None


_FROM_LOG_TAKES: Final = "--from-log takes audit logs, or directories of them"


def _from_log_problem(paths: Sequence[str]) -> str | None:
    """Say why the paths given to --from-log cannot be read as logs, if they cannot."""
    if not all(paths):
        return _EMPTY_PATH
    for path in map(Path, paths):
        problem = _log_file_problem(path)
        if problem is not None:
            return problem
    _, errors = log_files(map(Path, paths))
    return errors[0] if errors else None


def _log_file_problem(path: Path) -> str | None:
    """Say why ``path`` cannot be a log --from-log reads (or a directory of them), if it cannot."""
    try:
        kind = file_kind(path)
    except FileNotFoundError:
        return f"{file_name(path)}: no such file ({_FROM_LOG_TAKES})"
    except OSError as exc:
        return f"{file_name(path)[:80]}: {exc.strerror or exc}"
    if kind is None or kind.endswith("a directory"):
        return None
    return f"{file_name(path)}: not a regular file ({kind}); {_FROM_LOG_TAKES}"


def _diagram_view(args: argparse.Namespace) -> DiagramView:
    if args.learner is not None:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # MODULE may be a file here, as with python -m
        learn = learner_from_factory(args.learner)
        return callbacks_view(learn.cbs, f"fsm_learner: what runs where ({args.learner})")
    if args.from_log is not None:
        files, _ = log_files(map(Path, args.from_log))  # checked by _diagram_usage
        return run_view(files, run_id=args.run_id, key=_key(args.key_env))
    return table_view()


def _diagram_docs(args: argparse.Namespace) -> int:
    if args.write:
        for path in write_docs(args.dir):
            print(f"wrote {path}")
        return EXIT_OK
    stale, skipped = check_docs(args.dir)
    for note in skipped:
        print(f"fsm-learner diagram: {note}", file=sys.stderr)
    if stale:
        names = ", ".join(str(path) for path in stale)
        print(
            f"fsm-learner diagram: stale: {names} differ from what the transition table "
            "generates; `make diagrams` (fsm-learner diagram --write) regenerates them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print("the diagrams are up to date with the transition table")
    return EXIT_OK


def _run_diagram(args: argparse.Namespace) -> int:
    problem = _diagram_usage(args)
    if problem is not None:
        print(f"fsm-learner diagram: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.write or args.check:
            return _diagram_docs(args)
        data = render(_diagram_view(args), args.format or DiagramFormat.MERMAID)
        if args.output is None:
            _write(sys.stdout, data.decode())  # an ASCII terminal gets escapes, not a traceback
        else:
            args.output.write_bytes(data)
    except FsmLearnerError as exc:
        _write(sys.stderr, f"fsm-learner diagram: {printable(' '.join(str(exc).split()))}\n")
        return EXIT_FAILED
    except OSError as exc:
        print(f"fsm-learner diagram: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "bench",
        help="per-batch cost of the machine and its log against a bare PyTorch loop",
        description=(
            "Run a bare PyTorch loop and fsm_learner interleaved on the same model and data, "
            "time each with the process's CPU time, and report medians of per-pair ratios."
        ),
    )
    parser.add_argument("--config", choices=["tiny", "small", "few", "all"], default="all")
    parser.add_argument("--pairs", type=_positive, default=30, help="interleaved pairs per case")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured pairs first")
    parser.add_argument("--epochs", type=_positive, default=5, help="epochs per timed run")
    parser.add_argument("--threads", type=_positive, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] where available")
    parser.add_argument(
        "--audit-records",
        type=_positive,
        default=1_000_000,
        help="size of the synthetic log the audit throughput is measured on",
    )
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="also time agreement across 2 ranks (gloo on CPU): one all-reduce per agreement",
    )
    parser.add_argument(
        "--profile-hooks",
        action="store_true",
        help="also time Learner(profile_hooks=True) against off: a tiny fit with hooked callbacks",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=_run_bench)


def _device_error(command: str, device: str) -> str | None:
    """Check ``--device`` as DeviceCB does; return the one-line error, if any."""
    if device == "auto":
        return None
    try:
        from callbacks.device import resolve_device  # noqa: PLC0415 (the callbacks extra)
    except ImportError as exc:
        return f"fsm-learner {command}: {exc}; pip install 'fsm-learner[demo]'"
    try:
        resolve_device(device)
    except ConfigurationError as exc:
        return f"fsm-learner {command}: {exc}"
    return None


def _run_bench(args: argparse.Namespace) -> int:
    from fsm_learner.bench import render_bench, run_bench  # noqa: PLC0415 (needs scikit-learn)

    error = _device_error("bench", args.device)
    if error is not None:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    configs = ("tiny", "small", "few") if args.config == "all" else (args.config,)
    report = run_bench(
        configs=configs,
        pairs=args.pairs,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        epochs=args.epochs,
        audit_records=args.audit_records,
        agreement=args.agreement,
        profile_hooks=args.profile_hooks,
    )
    if args.json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_bench(report))
    return EXIT_OK


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        msg = f"must be > 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, then audit and draw the run",
        description=(
            "Train a small CNN on the digits data set that ships with scikit-learn, with "
            "DeviceCB, MetricsCB, ProgressCB and Recorder; write the audit log, a plot and the "
            "run's diagram to --out, audit the log and print where each file went."
        ),
    )
    parser.add_argument("--epochs", type=_positive, default=8)
    parser.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--batch-size", type=_positive, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "-o",
        "--out",
        "--output",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="where files go (default: runs)",
    )
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from fsm_learner.demo import DemoSettings, run_demo  # noqa: PLC0415 (demo extra)
    except ImportError as exc:
        print(f"fsm-learner demo: {exc}; pip install 'fsm-learner[demo]'", file=sys.stderr)
        return EXIT_USAGE
    error = _device_error("demo", args.device)
    if error is not None:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"fsm-learner demo: cannot create --out {args.out}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    settings = DemoSettings(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        out=args.out,
    )
    result = run_demo(settings)
    return EXIT_OK if result.report.verified else EXIT_FAILED


def _report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report",
        help="one run of an audit log as a self-contained HTML page",
        description=(
            "Audit one run of a log and draw it as one HTML page that loads nothing (inline "
            "SVG and CSS, no script): the verdict (in red, with the problem, when the run does "
            "not verify), its header (model, optimizer, callbacks, device, seed, versions), the "
            "path it took through the machine with how often it took each transition, a "
            "timeline of its passes, cancels and failure, where its time went, its metrics per "
            "epoch (MetricsCB's notes), the slowest transitions, and the time per callback when "
            "it noted hook_times. LOG is a log file (the run begun last in it, or --run-id's) "
            "or a directory (its newest log, or the newest holding --run-id). The verdict is "
            "fsm-learner audit's of the same files: of a directory, every log in it, so that a "
            "killed run that a later run resumed is accounted for by their lineage. A fit "
            "across ranks writes a log per rank: the page shows the rank whose log is given. "
            "Exit 0 when the page is written and the run verifies, 1 when the run does not "
            "verify (the page is written) or the log holds no run (none is), 2 on a usage "
            "error (no such LOG or run id, bad options, a page that cannot be written)."
        ),
    )
    parser.add_argument("log", metavar="LOG")  # str: Path("") would be "."
    parser.add_argument(
        "-o",
        "--output",
        default="report.html",
        metavar="PATH",
        help="where the page goes (default: report.html; - for stdout)",
    )
    parser.add_argument("--run-id", metavar="ID", help="which run (default: the run begun last)")
    parser.add_argument(
        "--key-env",
        metavar="VAR",
        help=f"variable holding a keyed log's chain key (default: {KEY_ENV}, unset: no key)",
    )
    parser.set_defaults(run=_run_report)


def _report_usage(args: argparse.Namespace) -> str | None:
    """Say what is wrong with the report's LOG or output, if that is plain before the audit."""
    if not args.log:
        return _EMPTY_PATH
    output: str = args.output
    if output == "-":
        return None
    path = Path(output)
    if not output or path.is_dir():
        return f"-o {file_name(path) if output else repr(output)}: give a file name for the page"
    if not path.parent.is_dir():
        return f"-o {file_name(path)}: no directory {file_name(path.parent)} to write it in"
    return None


def _run_report(args: argparse.Namespace) -> int:
    from fsm_learner.report import load_run, render_page  # noqa: PLC0415 (only this command)

    output: str = args.output
    problem = _report_usage(args)
    if problem is not None:
        _write(sys.stderr, f"fsm-learner report: {printable(problem)}\n")
        return EXIT_USAGE
    try:
        page = load_run(Path(args.log), run_id=args.run_id, key=_key(args.key_env))
    except (_KeyError, ConfigurationError) as exc:
        _write(sys.stderr, f"fsm-learner report: {printable(str(exc))}\n")
        return EXIT_USAGE
    except NoRunError as exc:  # read, but nothing to verify: the audit fails it too
        _write(sys.stderr, f"fsm-learner report: {printable(str(exc))}\n")
        return EXIT_FAILED
    text = render_page(page)
    if output == "-":
        _write(sys.stdout, text)
    else:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            said = f"cannot write {file_name(output)}: {exc.strerror or exc}"
            _write(sys.stderr, f"fsm-learner report: {said}\n")
            return EXIT_USAGE
        _write(sys.stdout, f"wrote {file_name(output)}: {_page_said(page)}\n")
    if page.verified:
        return EXIT_OK
    said = "the run does not verify" if page.problem is None else str(page.problem)
    _write(sys.stderr, f"fsm-learner report: {printable(said)}\n")
    return EXIT_FAILED


def _page_said(page: RunPage) -> str:
    """Say which run the page shows, how it ended and whether it verifies, in one line."""
    verdict = "verified" if page.verified else "DOES NOT VERIFY"
    if page.verified and page.resumed_by is not None:
        resumer = printable(page.resumed_by[:64])
        verdict = f"killed, and resumed by run {resumer}: the lineage verifies"
    run = printable(page.report.run_id[:64])
    said = f"run {run} of {file_name(page.path)} ({page.report.status.value}, {verdict})"
    return said if page.choice_said is None else f"{said}; {page.choice_said}"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the whole command."""
    parser = argparse.ArgumentParser(
        prog="fsm-learner",
        description="Train, draw and audit PyTorch training loops that run as state machines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _audit_parser(sub)
    _diagram_parser(sub)
    _bench_parser(sub)
    _demo_parser(sub)
    _report_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except BrokenPipeError:  # `fsm-learner audit ... | head`: the reader has seen enough
        _silence_stdout()
        return EXIT_FAILED
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a descriptor (a test's capture)
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
