"""The ``fsm-learner`` command: one sub-command per entry point.

Exit codes: 0 success, 1 a check failed (a run that does not verify, ...), 2 a usage
error (argparse's own convention). Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Final

import orjson

from fsm_learner.audit.replay import Problem, RunReport, audit_file, log_files
from fsm_learner.audit.schema import KEY_ENV, derive_key
from fsm_learner.audit.summary import render_reports

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


def _audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "audit",
        help="verify audit logs and summarise their runs",
        description=(
            "Replay each run of the given logs (files or directories of *.jsonl) against the "
            "transition table: every transition legal, sequence numbers without gaps, hash "
            "chain intact, header and footer present and agreeing. Exit 0 when every run "
            "verifies, 1 when one does not, 2 on a usage error."
        ),
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--expect-head",
        action="append",
        default=[],
        metavar="HASH",
        help="the chain head fit() returned; every run must end on one of these (repeatable)",
    )
    parser.add_argument(
        "--key-env",
        default=KEY_ENV,
        metavar="VAR",
        help=f"environment variable holding the chain key of keyed logs (default {KEY_ENV})",
    )
    parser.set_defaults(run=_run_audit)


def _check_heads(reports: Sequence[RunReport], heads: Sequence[str]) -> None:
    expected = {h.lower() for h in heads}
    for report in reports:
        if report.problem is None and report.head not in expected:
            report.problem = Problem(
                report.path,
                report.first_line + max(report.records - 1, 0),
                f"chain head {report.head} is not the expected {', '.join(sorted(expected))}",
            )


def _run_audit(args: argparse.Namespace) -> int:
    files, errors = log_files(args.paths)
    if errors:
        for error in errors:
            print(f"fsm-learner audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    key = derive_key(os.environ.get(args.key_env) or None)
    reports: list[RunReport] = []
    problems: list[Problem] = []
    for path in files:
        found, problem = audit_file(path, key=key)
        reports.extend(found)
        if problem is not None:
            problems.append(problem)
    if args.expect_head:
        _check_heads(reports, args.expect_head)
    problems += [r.problem for r in reports if r.problem is not None]
    ok = not problems and all(r.verified for r in reports)
    if args.json:
        payload = {
            "verified": ok,
            "runs": [r.to_json() for r in reports],
            "problems": [str(p) for p in problems],
        }
        print(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
    else:
        if reports:
            print(render_reports(reports))
        if problems:
            print(f"fsm-learner audit: {problems[0]}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the whole command."""
    parser = argparse.ArgumentParser(
        prog="fsm-learner",
        description="Train, draw and audit PyTorch training loops that run as state machines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _audit_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
