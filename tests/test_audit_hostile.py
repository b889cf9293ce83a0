"""`fsm-learner audit` on hostile input: a verdict and a one-line reason, never a hang or a crash.

Logs here are built record by record with the codec (``audit_logs``) and sealed as the
writer seals them, so that each test reaches the check it is about.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import orjson
import pytest
from audit_logs import lines, reseal, run_lines, runs_file, seal_blocks, tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm_learner._display import file_name, printable, shown
from fsm_learner.audit.codec import MAX_LINE_BYTES
from fsm_learner.audit.replay import MAX_OPEN_RUNS, FileAudit, audit_file
from fsm_learner.audit.summary import Table, render_table
from fsm_learner.cli import main

IDS = ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]


def audit(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


class Sink(io.StringIO):
    """A stdout that keeps only the last 4 KiB written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.tail = ""

    def write(self, text: str) -> int:
        self.tail = (self.tail + text)[-4096:]
        return len(text)


def deep(depth: int, kind: str = "list") -> bytes:
    """JSON text nested ``depth`` levels (orjson reads 1,024, writes 254)."""
    if kind == "list":
        return b"[" * depth + b"0" + b"]" * depth
    return b'{"a":' * depth + b"0" + b"}" * depth


def with_raw_fields(line: bytes, raws: dict[str, bytes]) -> bytes:
    """A record's line with fields set to raw JSON text (orjson cannot write it that deep)."""
    record = orjson.loads(line)
    record |= {name: f"@@{name}@@" for name in raws}
    text = orjson.dumps(record) + b"\n"
    for name, raw in raws.items():
        text = text.replace(f'"@@{name}@@"'.encode(), raw)
    return text


def write_run(path: Path, run_lines_: list[bytes]) -> None:
    """Write one run's lines as one block, sealed as they are."""
    [data], _ = seal_blocks("aaaaaaaaaaaa", [run_lines_])
    path.write_bytes(data)


# -- logs are regular files -------------------------------------------------------------

SPECIAL_FILES = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path

    resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30))  # a regression fails fast
    from fsm_learner.audit.replay import audit_file
    from fsm_learner.cli import main

    logs = Path(sys.argv[1])
    for args in (
        ["audit", str(logs)],
        ["audit", "--json", str(logs / "y.jsonl")],
        ["diagram", "--from-log", str(logs / "x.jsonl")],
        ["diagram", "--from-log", str(logs / "y.jsonl")],
    ):
        print(main(args), flush=True)
        print("--", file=sys.stderr, flush=True)
    print(audit_file(logs / "x.jsonl")[1], flush=True)  # past the check, opened non-blocking
    """
)


def test_fifos_and_devices_are_refused_at_once(tmp_path):
    """A FIFO and a symlink to /dev/zero named *.jsonl: exit 2, one line each, no hang."""
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_file(logs / "good.jsonl", ["aaaaaaaaaaaa"])
    os.mkfifo(logs / "x.jsonl")
    (logs / "y.jsonl").symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-c", SPECIAL_FILES, str(logs)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "2",
        "2",
        "2",
        "2",
        f"{logs}/x.jsonl:0: not a regular file (a FIFO): a log is a regular file",
    ]
    not_a_log = "a log is a regular file or a directory of them"
    one_log = "--from-log takes audit logs, or directories of them"
    fifo, device = "(a FIFO)", "(a symlink to a character device)"
    assert done.stderr.split("--\n")[:-1] == [
        (
            f"fsm-learner audit: {logs}/x.jsonl: not a regular file {fifo}; {not_a_log}\n"
            f"fsm-learner audit: {logs}/y.jsonl: not a regular file {device}; {not_a_log}\n"
        ),
        f"fsm-learner audit: {logs}/y.jsonl: not a regular file {device}; {not_a_log}\n",
        f"fsm-learner diagram: {logs}/x.jsonl: not a regular file {fifo}; {one_log}\n",
        f"fsm-learner diagram: {logs}/y.jsonl: not a regular file {device}; {one_log}\n",
    ]


class TestWhichFiles:
    def test_the_same_file_twice_is_audited_once(self, tmp_path, capsys):
        """Named twice, through a symlink, or inside a directory given too: one audit."""
        log = tmp_path / "logs" / "a.jsonl"
        log.parent.mkdir()
        runs_file(log, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
        (tmp_path / "link.jsonl").symlink_to(log)
        code, out, err = audit(
            str(log), str(log.parent), str(tmp_path / "link.jsonl"), capsys=capsys
        )
        assert (code, err) == (0, "")
        assert out.endswith("2 run(s): 2 verified, 0 do not verify\n")

    def test_a_directory_named_jsonl_is_walked_and_a_broken_link_named(self, tmp_path, capsys):
        """Inside a directory, a folder called x.jsonl is searched; a dangling link is an error."""
        inner = tmp_path / "logs" / "old.jsonl"
        inner.mkdir(parents=True)
        runs_file(inner / "a.jsonl", ["aaaaaaaaaaaa"])
        assert audit(str(tmp_path / "logs"), capsys=capsys)[0] == 0
        (tmp_path / "logs" / "gone.jsonl").symlink_to(tmp_path / "nowhere")
        code, out, err = audit(str(tmp_path / "logs"), capsys=capsys)
        assert (code, out) == (2, "")
        assert err == (
            f"fsm-learner audit: {tmp_path}/logs/gone.jsonl: no such file or directory (a "
            "broken symlink)\n"
        )

    def test_logs_named_jsonl_in_any_case_are_found(self, tmp_path, capsys):
        """The learner writes UP.JSONL as a log file: a directory walk finds it too."""
        runs_file(tmp_path / "UP.JSONL", ["aaaaaaaaaaaa"])
        (tmp_path / "inner").mkdir()
        runs_file(tmp_path / "inner" / "b.Jsonl", ["bbbbbbbbbbbb"])
        (tmp_path / "notes.txt").write_text("not a log\n")
        code, out, err = audit(str(tmp_path), capsys=capsys)
        assert (code, err) == (0, "")
        assert f"{tmp_path}/UP.JSONL  run aaaaaaaaaaaa" in out
        assert f"{tmp_path}/inner/b.Jsonl  run bbbbbbbbbbbb" in out
        assert out.endswith("2 run(s): 2 verified, 0 do not verify\n")

    def test_the_empty_path_is_a_usage_error(self, tmp_path, capsys, monkeypatch):
        """'' is no log (pathlib would read it as '.', the current directory): exit 2, said once."""
        runs_file(tmp_path / "a.jsonl", ["aaaaaaaaaaaa"])
        monkeypatch.chdir(tmp_path)
        for args in ([""], ["a.jsonl", ""]):
            code, out, err = audit(*args, capsys=capsys)
            assert (code, out) == (2, "")
            assert err == (
                "fsm-learner audit: '': the empty path names no log; give a log file or a "
                "directory of them ('.' for the current directory)\n"
            )


# -- memory does not grow with line length or run count -----------------------------------


def peak_bytes(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestBoundedMemory:
    def test_a_5_mb_line_is_malformed_and_never_held(self, tmp_path, capsys, monkeypatch):
        """A 5 MB line between two runs: one line saying so; memory peaks near 2 MiB, not 5 MB.

        It is no record of either run: the file does not verify, both runs do.
        """
        log = tmp_path / "big.jsonl"
        first, head = tiny_run("aaaaaaaaaaaa")
        second, _ = tiny_run("bbbbbbbbbbbb", prev=head)
        huge = b'{"x":"' + b"a" * 5_000_000 + b'"}\n'
        log.write_bytes(first + huge + second)
        monkeypatch.setattr(sys, "stdout", Sink())
        code, peak = peak_bytes(lambda: main(["audit", str(log)]))
        err = capsys.readouterr().err
        assert code == 1
        assert err == (
            f"fsm-learner audit: {log}:6: a line of 5,000,009 bytes, longer than a record may "
            "be (1,048,576 bytes): not a record\n"
        )
        assert sys.stdout.tail.endswith("2 run(s): 2 verified, 0 do not verify\n")
        assert peak < 3 * MAX_LINE_BYTES

    def test_a_long_first_or_last_line(self, tmp_path):
        """Before any run, or after the last one ended: the file's problem."""
        log = tmp_path / "x.jsonl"
        log.write_bytes(b"[" * (MAX_LINE_BYTES + 1))
        reports, problem = audit_file(log)
        assert reports == []
        assert str(problem) == (
            f"{log}:1: a line of 1,048,577 bytes, longer than a record may be (1,048,576 "
            "bytes): not a record"
        )
        data, _ = tiny_run("aaaaaaaaaaaa")
        log.write_bytes(data + b"x" * 3 * MAX_LINE_BYTES)
        [report], problem = audit_file(log)
        assert report.verified
        assert problem.line == 6
        assert problem.reason.startswith("a line of 3,145,728 bytes")

    @pytest.mark.unchecked_records("a header padded with a field of its own")
    def test_a_line_of_exactly_the_limit_is_read(self, tmp_path):
        """MAX_LINE_BYTES counts the newline: a header of exactly that size is a record."""
        size = len(run_lines("aaaaaaaaaaaa", header={"pad": ""})[0])
        write_run(
            tmp_path / "x.jsonl",
            run_lines("aaaaaaaaaaaa", header={"pad": "p" * (MAX_LINE_BYTES - size)}),
        )
        assert len(lines(tmp_path / "x.jsonl")[0]) == MAX_LINE_BYTES
        [report], problem = audit_file(tmp_path / "x.jsonl")
        assert (report.verified, problem) == (True, None)

    def test_a_long_line_inside_a_block_cuts_it(self, tmp_path):
        """A run's block with a 2 MiB line in it: that run does not verify, the next one does."""
        first = run_lines("aaaaaaaaaaaa")
        first.insert(2, b'{"pad":"' + b"p" * 2 * MAX_LINE_BYTES + b'"}\n')
        [data], head = seal_blocks("aaaaaaaaaaaa", [first])
        second, _ = tiny_run("bbbbbbbbbbbb", prev=head.hex())
        (tmp_path / "x.jsonl").write_bytes(data + second)
        reports, problem = audit_file(tmp_path / "x.jsonl")
        assert [r.verified for r in reports] == [False, True]
        assert str(reports[0].problem).endswith(
            ":1: lines 1-3 (a block of run 'aaaaaaaaaaaa'): line 3 is no record: a line of "
            "2,097,163 bytes, longer than a record may be (1,048,576 bytes): not a record"
        )
        assert "lines 4-6: a block of run 'aaaaaaaaaaaa'" not in str(problem)

    def test_each_run_is_reported_before_the_next_is_read(self, tmp_path):
        """FileAudit is lazy: a run is yielded once its footer is sealed, not at the end."""
        log = tmp_path / "x.jsonl"
        heads = runs_file(log, IDS[:2])
        runs = iter(FileAudit(log))
        assert next(runs).run_id == IDS[0]
        with log.open("ab") as fh:
            fh.write(tiny_run(IDS[2], prev=heads[1])[0])  # appended while being read
        assert [(r.run_id, r.verified) for r in runs] == [(IDS[1], True), (IDS[2], True)]

    @staticmethod
    def many_runs(path: Path, n: int) -> None:
        runs_file(path, [f"{i:012x}" for i in range(n)])

    def test_many_tiny_runs_in_bounded_time(self, tmp_path, monkeypatch):
        """10,000 runs of four records: seconds, not the minutes a table layout per run took."""
        self.many_runs(tmp_path / "many.jsonl", 10_000)
        monkeypatch.setattr(sys, "stdout", Sink())
        start = time.perf_counter()
        assert main(["audit", str(tmp_path / "many.jsonl")]) == 0
        assert time.perf_counter() - start < 10
        assert sys.stdout.tail.endswith("10000 run(s): 10000 verified, 0 do not verify\n")

    def test_memory_does_not_grow_with_the_run_count(self, tmp_path, monkeypatch):
        """Eight times the runs, as text and as JSON: the same peak, give or take 1 MB."""
        self.many_runs(tmp_path / "few.jsonl", 300)
        self.many_runs(tmp_path / "many.jsonl", 2400)
        for args in (["audit"], ["audit", "--json"]):
            peaks = []
            for name in ("few.jsonl", "many.jsonl"):
                monkeypatch.setattr(sys, "stdout", Sink())
                code, peak = peak_bytes(lambda: main([*args, str(tmp_path / name)]))  # noqa: B023
                assert code == 0
                peaks.append(peak)
            assert peaks[1] - peaks[0] < 1_000_000, (args, peaks)

    def test_json_is_written_run_by_run_and_stays_one_document(self, tmp_path, capsys):
        """--json streams, yet parses as before: runs, problems, verified."""
        runs_file(tmp_path / "a.jsonl", ["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
        (tmp_path / "b.jsonl").write_text("not a log\n")
        code, out, err = audit("--json", str(tmp_path), capsys=capsys)
        assert (code, err) == (1, "")
        document = orjson.loads(out)
        assert list(document) == ["runs", "problems", "verified"]
        assert [r["run_id"] for r in document["runs"]] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
        assert document["problems"] == [f"{tmp_path}/b.jsonl:1: not JSON"]
        assert document["verified"] is False
        (tmp_path / "b.jsonl").unlink()
        code, out, _ = audit("--json", str(tmp_path / "a.jsonl"), capsys=capsys)
        assert code == 0
        assert orjson.loads(out)["problems"] == []
        assert orjson.loads(out)["verified"] is True

    def test_boxed_tables_are_the_ones_rich_draws(self):
        """The summary draws rich's boxes itself, character for character."""
        pytest.importorskip("rich")
        from rich.console import Console
        from rich.table import Table as RichTable

        tables = [
            Table(
                "time per state",
                ("state", "ms", "%"),
                (("epoch", "4.812", "48.1"),),
                frozenset({1, 2}),
            ),
            Table("empty", ("a", "long column"), (), frozenset()),
            Table("t", ("x",), (("1",), ("22",)), frozenset({0})),
        ]
        for table in tables:
            drawn = RichTable(title=table.title, title_justify="left")
            for i, column in enumerate(table.columns):
                drawn.add_column(column, justify="right" if i in table.right else "left")
            for row in table.rows:
                drawn.add_row(*row)
            out = io.StringIO()
            Console(file=out, width=110, force_terminal=False, color_system=None).print(drawn)
            assert render_table(table, rich=True) == out.getvalue().rstrip()


# -- whole runs removed, reordered, duplicated ------------------------------------------

REMOVED = "a run was removed, reordered or inserted before this one"


class TestWholeRuns:
    @pytest.fixture
    def log(self, tmp_path):
        """Three runs in one file, bound one to the next; their heads."""
        path = tmp_path / "logs" / "all.jsonl"
        path.parent.mkdir()
        return path, runs_file(path, IDS)

    def test_the_file_verifies_with_every_head(self, log, capsys):
        """Untouched, with --expect-head naming each head: exit 0."""
        path, heads = log
        args = [str(path)] + [arg for head in heads for arg in ("--expect-head", head)]
        code, out, err = audit(*args, capsys=capsys)
        assert (code, err) == (0, "")
        assert out.endswith("3 run(s): 3 verified, 0 do not verify\n")

    def test_a_run_removed_from_the_middle(self, log, capsys):
        """Run 2 of 3 deleted whole: run 3's header binds to run 2's last hash."""
        path, heads = log
        content = lines(path)
        path.write_bytes(b"".join(content[:5] + content[10:]))
        code, _, err = audit(str(path), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path}:6: header binds to the seal '{heads[1]}', but the seal "
            f"before it is {heads[0]}: {REMOVED}\n"
        )

    def test_runs_reordered(self, log, capsys):
        """Runs 2 and 3 swapped: the first one out of place is named."""
        path, heads = log
        content = lines(path)
        path.write_bytes(b"".join(content[:5] + content[10:] + content[5:10]))
        code, _, err = audit(str(path), capsys=capsys)
        assert code == 1
        assert f"{path}:6: header binds to the seal '{heads[1]}'" in err

    def test_the_first_run_removed(self, log, capsys):
        """Run 1 deleted: run 2 now starts the file but binds to run 1."""
        path, heads = log
        path.write_bytes(b"".join(lines(path)[5:]))
        code, _, err = audit(str(path), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path}:1: header binds to the seal '{heads[0]}', but no seal "
            f"comes before it in its file: {REMOVED}\n"
        )

    def test_a_run_duplicated_in_its_file(self, log, capsys):
        """Run 1 appended again: it binds to the start of a file, not to run 3."""
        path, heads = log
        content = lines(path)
        path.write_bytes(b"".join(content + content[:5]))
        code, _, err = audit(str(path), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path}:16: header binds to no seal (the start of a file), but "
            f"the seal before it is {heads[2]}: {REMOVED}\n"
        )

    def test_the_last_run_removed_needs_the_expected_head(self, log, capsys):
        """Run 3 deleted: nothing in the file shows it; only its expected head can."""
        path, heads = log
        path.write_bytes(b"".join(lines(path)[:10]))
        assert audit(str(path), capsys=capsys)[0] == 0
        args = [str(path)] + [arg for head in heads for arg in ("--expect-head", head)]
        code, out, err = audit(*args, capsys=capsys)
        assert code == 1
        assert out.endswith("2 run(s): 2 verified, 0 do not verify\n")
        assert err == (
            f"fsm-learner audit: expected head {heads[2]} is not the head of any run (a run "
            "removed?)\n"
        )
        code, out, _ = audit("--json", *args, capsys=capsys)
        assert orjson.loads(out)["problems"] == [
            f"expected head {heads[2]} is not the head of any run (a run removed?)"
        ]

    def test_a_run_copied_into_another_file(self, log, capsys):
        """Run 1 alone in a second file binds fine (a new file), but its id is seen twice."""
        path, heads = log
        (path.parent / "copy.jsonl").write_bytes(b"".join(lines(path)[:5]))
        code, _, err = audit(str(path.parent), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path.parent}/copy.jsonl:1: run 'aaaaaaaaaaaa' (rank 0) "
            "appears a second time among the audited runs: a run duplicated, or a file "
            "audited twice\n"
        )
        expected = [arg for head in heads for arg in ("--expect-head", head)]
        code, _, err = audit(str(path.parent), *expected, capsys=capsys)
        assert code == 1
        assert f"copy.jsonl:5: chain head {heads[0]} already ended another run" in err

    def test_the_ranks_of_a_distributed_run_share_its_id(self, tmp_path, capsys):
        """One run id, ranks 0 and 1, one file each: both verify."""
        for rank in (0, 1):
            data, _ = tiny_run("aaaaaaaaaaaa", rank=rank)
            (tmp_path / f"aaaaaaaaaaaa.rank{rank}.jsonl").write_bytes(data)
        code, out, err = audit(str(tmp_path), capsys=capsys)
        assert (code, err) == (0, "")
        assert out.endswith("2 run(s): 2 verified, 0 do not verify\n")

    def test_a_header_without_prev(self, tmp_path, capsys):
        """A header that does not bind to what came before it is no header: not a log."""
        content = run_lines("aaaaaaaaaaaa")
        content[0] = content[0].replace(b',"prev":""', b"")
        write_run(tmp_path / "x.jsonl", content)
        code, _, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert err.endswith(
            ":1: header field 'prev' must be the hex digest of the seal before the run ('' at "
            "the start of a file), got missing\n"
        )

    def test_a_files_problem_is_named_before_a_runs(self, log, capsys):
        """stderr names what no run's summary shows: a file that is no log."""
        path, _ = log
        content = lines(path)
        path.write_bytes(b"".join(content[:7]))  # run 2 cut short: its summary says so
        (path.parent / "zz.jsonl").write_text("not a log\n")
        code, out, err = audit(str(path.parent), capsys=capsys)
        assert code == 1
        assert "  problem: " in out
        assert err == f"fsm-learner audit: {path.parent}/zz.jsonl:1: not JSON\n"

    def test_many_expected_heads_are_counted_not_listed(self, log, capsys):
        """A run whose head is none of many expected ones: the message stays one short line."""
        path, heads = log
        others = [f"{i:016x}" for i in range(5)]
        args = [str(path)] + [
            arg for head in [*heads[:2], *others] for arg in ("--expect-head", head)
        ]
        code, _, err = audit(*args, capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path}:15: chain head {heads[2]} is not the expected one of "
            "the 7 expected heads\n"
        )


# -- blocks: one run's lines, then their seal ------------------------------------------------


class TestBlocks:
    def test_a_record_of_another_run_inside_a_block(self, tmp_path):
        """A line of run B inside a block of run A: A's block was never sealed as written."""
        content = lines_of(tiny_run(IDS[0])[0])
        content.insert(2, run_lines(IDS[1])[1])
        (tmp_path / "x.jsonl").write_bytes(b"".join(content))
        [report], problem = audit_file(tmp_path / "x.jsonl")
        assert str(report.problem).endswith(
            f":1: lines 1-3 (a block of run '{IDS[0]}'): line 3 is a record of run "
            f"'{IDS[1]}': blocks of two runs mixed, or one never sealed"
        )
        assert str(problem).endswith(  # B's line alone: then A's lines again
            f":3: lines 3-4 (a block of run '{IDS[1]}'): line 4 is a record of run "
            f"'{IDS[0]}': blocks of two runs mixed, or one never sealed"
        )

    def test_a_header_that_is_not_first_in_its_block(self, tmp_path):
        """The run's header again, inside its block: a record where none may be."""
        content = run_lines(IDS[0])
        content.insert(2, content[0])
        write_run(tmp_path / "x.jsonl", content)
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.line == 3
        assert report.problem.reason == (
            f"a run_start of run '{IDS[0]}' that is not the first line of its run's first block"
        )

    def test_another_runs_header_inside_a_block(self, tmp_path):
        """Run B begins inside run A's block: A does not verify, B does (its own seal)."""
        first = run_lines(IDS[0])
        [a_start, a_end], _ = seal_blocks(IDS[0], [first[:2], first[2:]])
        b_run, _ = tiny_run(IDS[1], prev=orjson.loads(lines_of(a_start)[-1])["h"])
        a_end = lines_of(a_end)
        (tmp_path / "x.jsonl").write_bytes(a_start + a_end[0] + b_run + b"".join(a_end[1:]))
        reports, _ = audit_file(tmp_path / "x.jsonl")
        assert [(r.run_id, r.verified) for r in reports] == [(IDS[0], False), (IDS[1], True)]
        assert reports[0].problem.reason == (
            f"lines 4-5 (a block of run '{IDS[0]}'): line 5 is a record of run '{IDS[1]}': "
            "blocks of two runs mixed, or one never sealed"
        )

    def test_records_after_the_sealed_footer(self, tmp_path, capsys):
        """A block of a run appended after its sealed footer: the file does not verify."""
        data, _ = tiny_run(IDS[0])
        extra, _ = seal_blocks(IDS[0], [[run_lines(IDS[0])[1]]])
        (tmp_path / "x.jsonl").write_bytes(data + extra[0])
        code, out, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert "1 run(s): 1 verified" in out
        assert err.endswith(
            f"x.jsonl:6: lines 6-7: a block of run '{IDS[0]}' after its run_end was sealed\n"
        )

    def test_a_record_after_the_footer_in_its_block(self, tmp_path):
        """The footer ends the run: a record after it, sealed with it, does not verify."""
        content = run_lines(IDS[0])
        write_run(tmp_path / "x.jsonl", [*content, content[2]])
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert (report.problem.line, report.problem.reason) == (
            5,
            "a record after the run's run_end",
        )
        assert report.status == "completed"  # the verified prefix: footer included

    def test_a_seal_with_no_lines(self, tmp_path):
        """Two seals in a row: the second seals nothing."""
        data, _ = tiny_run(IDS[0])
        (tmp_path / "x.jsonl").write_bytes(data + lines_of(data)[-1])
        [report], problem = audit_file(tmp_path / "x.jsonl")
        assert report.verified
        assert str(problem).endswith(
            f":6: line 6: a seal of run '{IDS[0]}' with no lines before it"
        )

    def test_runs_open_at_once_are_bounded(self, tmp_path):
        """More runs begun than MAX_OPEN_RUNS, none ending: the one silent longest goes early."""
        chunks, prev = [], ""
        for i in range(MAX_OPEN_RUNS + 1):
            block_lines = run_lines(f"{i:012x}", prev=prev)[:1]
            [block], head = seal_blocks(f"{i:012x}", [block_lines], before=bytes.fromhex(prev))
            chunks.append(block)
            prev = head.hex()
        (tmp_path / "x.jsonl").write_bytes(b"".join(chunks))
        reports = list(FileAudit(tmp_path / "x.jsonl"))
        assert len(reports) == MAX_OPEN_RUNS + 1
        assert reports[0].run_id == f"{0:012x}"
        assert reports[0].problem.reason == (
            f"more than {MAX_OPEN_RUNS} runs open at once in this file: this one, silent since "
            "line 2, is reported before its end, as truncated"
        )
        assert all(r.problem.reason.startswith("truncated (a killed run?)") for r in reports[1:])

    @pytest.mark.parametrize("cut", [0, 7], ids=["whole-lines", "cut-line"])
    def test_a_killed_run_verifies_up_to_its_last_seal(self, cut, tmp_path):
        """Sealed blocks, then records never sealed: truncated, how many said, prefix verified."""
        content = run_lines(IDS[0])
        [first], _ = seal_blocks(IDS[0], [content[:2]])
        tail = b"".join(content[2:4])
        (tmp_path / "x.jsonl").write_bytes(first + (tail[:-cut] if cut else tail))
        [report], problem = audit_file(tmp_path / "x.jsonl")
        assert problem is None
        assert (report.status, report.records, report.unsealed) == ("truncated", 2, 2)
        last = ", the last one cut off" if cut else ""
        assert str(report.problem).endswith(
            f":4: truncated (a killed run?): 2 lines from line 4 were never sealed{last}; the "
            "2 records before them verify"
        )
        assert report.head == orjson.loads(lines_of(first)[-1])["h"]


# -- what reaches the terminal is printable -----------------------------------------------


class TestTerminal:
    def test_ansi_in_run_ids_and_failures_is_shown_escaped(self, tmp_path, capsys):
        """Escape sequences in a run id, an exception's text or a class name never reach it raw."""
        failure = {
            "type": "Err\x1b[2J",
            "message": "boom\x1b]0;pwned\x07\nforged line",
            "state": "fit",
            "hook": "after_fit",
            "callback": "Cb\x1b[31m",
        }
        data, _ = tiny_run("run\x1b[31m\u009b", failure=failure)
        path = tmp_path / "x.jsonl"
        path.write_bytes(data)
        code, out, err = audit(str(path), capsys=capsys)
        assert (code, err) == (0, "")
        assert "\x1b" not in out
        assert "\x9b" not in out
        assert f"{path}  run run\\x1b[31m\\x9b  failed  verified\n" in out
        assert (
            "  failed: Err\\x1b[2J: 'boom\\x1b]0;pwned\\x07\\nforged line' in state fit (hook "
            "after_fit of Cb\\x1b[31m), epoch 0, iter 0, valid pass\n"
        ) in out
        code, out, _ = audit("--json", str(path), capsys=capsys)
        assert "\x9b" not in out
        assert '"run_id": "run\\u001b[31m\\u009b"' in out
        assert orjson.loads(out)["runs"][0]["run_id"] == "run\x1b[31m\u009b"

    def test_a_closed_pipe_ends_quietly(self, tmp_path, monkeypatch, capsys):
        """`fsm-learner audit ... | head`: the reader went away; exit 1, no traceback."""

        class ClosedPipe(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        runs_file(tmp_path / "x.jsonl", IDS)
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        assert main(["audit", str(tmp_path / "x.jsonl")]) == 1
        assert capsys.readouterr().err == ""

    def test_problem_lines_are_printable(self, tmp_path, capsys):
        """A forged event name with an escape: the problem line on stderr shows it escaped."""
        content = run_lines("aaaaaaaaaaaa")
        content[1] = content[1].replace(b'"ev":"begin_fit"', b'"ev":"\\u001b[2Jx\\n"')
        write_run(tmp_path / "x.jsonl", content)
        code, _, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {tmp_path}/x.jsonl:1: lines 1-2 (a block of run 'aaaaaaaaaaaa'): "
            "line 2 is no record: unknown event '\\x1b[2Jx\\n': neither a trigger of the table "
            "nor one of ['note', 'run_end', 'run_start', 'seal']\n"
        )


# -- hostile values get a verdict and a one-line reason ------------------------------------


def run_all(path: Path, capsys) -> list[tuple[int, str, str]]:
    """audit, audit --json and diagram --from-log on one log: each answer, checked."""
    answers = []
    for args in (
        ["audit", str(path)],
        ["audit", "--json", str(path)],
        ["diagram", "--from-log", str(path)],
    ):
        code = main(args)
        out, err = capsys.readouterr()
        assert code in {0, 1, 2}, (args, code)
        quiet = code == 0 or "--json" in args
        assert err == "" if quiet else err.count("\n") == 1, (args, err)
        assert printable(err.rstrip("\n")) == err.rstrip("\n")
        if args[1] == "--json":
            assert orjson.loads(out)["verified"] is (code == 0)
        elif args[0] == "audit":
            assert all(printable(line) == line for line in out.splitlines())
        answers.append((code, out, err))
    return answers


@pytest.mark.unchecked_records("fields tampered with, nested too deep for the schema check")
class TestHostileValues:
    @pytest.mark.parametrize(
        "case",
        [
            (1, "src", deep(1000), "field 'src' is [[[[...]]]], not a state of the table"),
            (1, "src", b"{}", "field 'src' is {}, not a state of the table"),
            (1, "dst", b"[]", "field 'dst' is [], not a state of the table"),
            (1, "ev", b"[]", "unknown event []: neither a trigger"),
            (
                1,
                "run",
                deep(600, "dict"),
                "field 'run' must be str, got dict {'a': {'a': {'a': {...}}}}",
            ),
            (1, "tr", deep(900), "field 'tr' must be true or false, got [[[[...]]]]"),
            (3, "status", b"{}", "run_end status {}, expected one of"),
            (3, "status", b"[1]", "run_end status [1], expected one of"),
            (3, "records", deep(700), "field 'records' must be int, got list [[[[...]]]]"),
            (
                3,
                "counts",
                deep(1000, "dict"),
                (
                    "run_end field 'counts' must map triggers to [training, validation] "
                    "counts, got {'a': {'a': {'a': {...}}}}"
                ),
            ),
            (3, "hook_ns", b'{"backward":[0,2]}', "hook time for backward in validation"),
            (
                3,
                "hook_ns",
                b'{"begin_fit":[0,31]}',
                (
                    "run_end hook_ns gives 31 ns to hooks during loop time, but the run spent "
                    "only 30 ns there"
                ),
            ),
            (4, "n", b"5", "its seal counts 5 lines, the block has 4"),
            (4, "run", b'"bbbbbbbbbbbb"', "sealed by a seal of run 'bbbbbbbbbbbb'"),
            (4, "h", b'"00"', "seal field 'h' must be 32 lower-case hex digits, got '00'"),
            (0, "schema", deep(1000), "schema version [[[[...]]]]; this audit reads version 2"),
            (0, "schema", b"1", "schema version 1 (per-line hashes, fsm_learner 0.1)"),
            (0, "table", b"[]", "written by a machine whose table digest is []"),
            (0, "prev", b"[]", "header field 'prev' must be the hex digest of the seal"),
            (0, "kind", deep(1000), "header field 'kind' is [[[[...]]]], no kind of run: valid"),
            (0, "kind", b'"\\u001b[31m"', "header field 'kind' is '\\x1b[31m', no kind of run"),
            (
                0,
                "kind",
                b'"validate"',
                "illegal transition begin_fit: idle -> fit in a validate run",
            ),
        ],
    )
    def test_deep_and_confused_fields(self, case, tmp_path, capsys):
        """Nested 1,000 deep, or a list where a string belongs: exit 1, one bounded line."""
        index, field, raw, reason = case
        content = lines_of(tiny_run("aaaaaaaaaaaa")[0])
        content[index] = with_raw_fields(content[index], {field: raw})
        data = b"".join(content)
        (tmp_path / "x.jsonl").write_bytes(data if index == 4 else reseal(data))
        (code, _, err), _, (diagram_code, _, _) = run_all(tmp_path / "x.jsonl", capsys)
        assert (code, diagram_code) == (1, 1)
        assert reason in err
        assert len(err) < 400

    @pytest.mark.parametrize("field", ["cbs", "lr", "rank"])
    def test_a_header_field_too_deep_for_json_is_summarised(self, field, tmp_path, capsys):
        """A header value 300 deep verifies and is kept as a note: --json still writes."""
        content = run_lines("aaaaaaaaaaaa")
        content[0] = with_raw_fields(content[0], {field: deep(300)})
        write_run(tmp_path / "x.jsonl", content)
        answers = run_all(tmp_path / "x.jsonl", capsys)
        assert [code for code, _, _ in answers] == [0, 0, 0]
        [run] = orjson.loads(answers[1][1])["runs"]
        assert run["header"][field] == "<a list nested more than 32 levels deep, left out>"

    def test_a_deep_failure_is_described_briefly(self, tmp_path, capsys):
        """The footer's failure, 300 deep in every field: the summary and JSON stay short."""
        failure = {"type": "@T", "message": "@M", "state": "fit", "hook": "@H", "callback": "@C"}
        content = run_lines("aaaaaaaaaaaa", failure=failure)
        for name in ("T", "M", "H", "C"):
            content[3] = content[3].replace(f'"@{name}"'.encode(), deep(300, "dict"))
        write_run(tmp_path / "x.jsonl", content)
        (code, out, _), (_, json_out, _), (diagram_code, diagram, _) = run_all(
            tmp_path / "x.jsonl", capsys
        )
        assert (code, diagram_code) == (0, 0)
        note = "<a dict nested more than 32 levels deep, left out>"
        assert (
            f"  failed: {note}: '{note}' in state fit (hook {note} of {note}), epoch 0, iter 0, "
            "valid pass"
        ) in out
        assert orjson.loads(json_out)["runs"][0]["failure"]["type"] == note
        drawn = note.replace("<", "#60;").replace(">", "#62;")
        assert f"| fail ×1 (failed here, {drawn} in {drawn} of {drawn})\n" in diagram  # noqa: RUF001

    @pytest.mark.parametrize(
        "name",
        [b"\xff.jsonl", b"a\nb.jsonl", b"\x1b[31mred.jsonl", b"\xe2\x80\xae.jsonl"],
        ids=["not-utf8", "newline", "ansi", "bidi-override"],
    )
    def test_odd_file_names(self, name, tmp_path, capsys):
        """A name that is not UTF-8 or holds control characters is shown escaped, everywhere."""
        path = tmp_path / os.fsdecode(name)
        runs_file(path, ["aaaaaaaaaaaa"])
        runs_file(tmp_path / "bad.jsonl", ["bbbbbbbbbbbb"])
        (tmp_path / "bad.jsonl").write_bytes(lines(tmp_path / "bad.jsonl")[0])  # header only
        shown_name = file_name(path)
        assert shown_name == printable(shown_name)
        code, out, err = audit(str(tmp_path), capsys=capsys)
        assert code == 1
        assert f"{shown_name}  run aaaaaaaaaaaa  completed  verified" in out
        code, out, _ = audit("--json", str(tmp_path), capsys=capsys)
        assert {run["path"] for run in orjson.loads(out)["runs"]} == {
            shown_name,
            f"{tmp_path}/bad.jsonl",
        }
        path.write_bytes(b"nope\n")
        code, out, err = audit(str(path), capsys=capsys)
        assert (code, out, err) == (1, "", f"fsm-learner audit: {shown_name}:1: not JSON\n")
        path.unlink()
        code, out, err = audit(str(path), capsys=capsys)
        assert (code, err) == (2, f"fsm-learner audit: {shown_name}: no such file or directory\n")

    def test_shown_never_recurses_and_stays_short(self):
        """The description of a received value: bounded depth, length and characters."""
        nested = orjson.loads(deep(1000))
        assert shown(nested) == "[[[[...]]]]"
        assert shown("x" * 10_000) == "'" + "x" * 116 + "..."
        assert shown("\x1b[2J") == r"'\x1b[2J'"
        assert shown(2**20_000) == "<int>"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


RAW_VALUES = st.one_of(
    st.tuples(st.just("value"), JSON_VALUES),
    st.tuples(st.just("deep"), st.integers(200, 1100)),
    st.tuples(st.just("deep-dict"), st.integers(200, 1100)),
    st.tuples(st.just("huge"), st.integers(MAX_LINE_BYTES - 300, MAX_LINE_BYTES + 10)),
)
"""What a field gets: any small value, nesting 200 to 1,100 deep, or a string near the limit.

Drawn as a recipe, made into JSON text in the test (Hypothesis would print megabytes)."""


def raw_value(recipe: tuple[str, object]) -> bytes:
    kind, value = recipe
    if kind == "deep":
        return deep(value)
    if kind == "deep-dict":
        return deep(value, "dict")
    if kind == "huge":
        return b'"' + b"h" * value + b'"'
    return json.dumps(value).encode()  # any int: orjson writes 64 bits at most


FIELDS = ["run", "t", "ev", "src", "dst", "ep", "it", "tr", "status", "records", "counts"]
FIELDS += ["hook_ns", "failure", "schema", "table", "keyed", "prev", "rank", "n", "h"]
NAMES = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\x00" not in b)


@pytest.mark.unchecked_records("fields tampered with, nested too deep for the schema check")
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from(FIELDS), RAW_VALUES), min_size=1, max_size=3
    ),
    resealed=st.booleans(),
    name=NAMES,
)
def test_fuzzed_logs_get_a_verdict(edits, resealed, name, tmp_path_factory, capsys):
    """Nesting, type confusion in every field, huge lines, odd names: exit 0, 1 or 2, one line."""
    folder = tmp_path_factory.mktemp("fuzz")
    original = lines_of(tiny_run("aaaaaaaaaaaa")[0])
    raws: dict[int, dict[str, bytes]] = {}
    for index, field, recipe in edits:
        raws.setdefault(index, {})[field] = raw_value(recipe)
    data = b"".join(with_raw_fields(x, raws[i]) if i in raws else x for i, x in enumerate(original))
    path = folder / os.fsdecode(name + b".jsonl")
    path.write_bytes(reseal(data) if resealed else data)  # resealed: a forger's chain
    run_all(path, capsys)
    code = main(["audit", str(folder)])
    _, err = capsys.readouterr()
    assert code in {0, 1, 2}
    assert printable(err.rstrip("\n")) == err.rstrip("\n")


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)
