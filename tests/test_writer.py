"""The audit writer: one writer per file, no empty logs, each run bound to the line before it."""

from __future__ import annotations

import sys

import orjson
import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import AuditLogInUseError, Callback, Learner
from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.schema import PREV_FIELD, unseal
from fsm_learner.audit.writer import AuditWriter


def headers(path) -> list[dict]:
    lines = path.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if b'"ev":"run_start"' in line]


def learner(path, cbs=()) -> Learner:
    return Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, list(cbs), audit_log=path)


class BigNote(Callback):
    """A note of about 100 KB at the end of the fit: a last line longer than a small window."""

    def after_fit(self, learn: Learner) -> None:
        learn.note("big", blob="x" * 100_000)


class TestPrev:
    def test_each_run_binds_to_the_last_line_before_it(self, tmp_path):
        """First run: "" (a new file); then each header names the previous run's head."""
        path = tmp_path / "runs.jsonl"
        heads = [learner(path).fit(1).head for _ in range(3)]
        assert [h[PREV_FIELD] for h in headers(path)] == ["", heads[0], heads[1]]

    def test_a_directory_gives_each_run_a_new_file(self, tmp_path):
        """In a directory every run starts its own file: prev is empty."""
        learn = learner(tmp_path / "logs")
        learn.fit(1)
        learn.fit(1)
        assert [h[PREV_FIELD] for p in (tmp_path / "logs").iterdir() for h in headers(p)] == [
            "",
            "",
        ]

    def test_after_a_cut_line_it_binds_to_the_last_whole_sealed_line(self, tmp_path):
        """A killed run's cut line is ended, and skipped: prev is the line before it."""
        path = tmp_path / "runs.jsonl"
        learner(path).fit(1)
        data = path.read_bytes()
        kept = data[: data.rindex(b"\n", 0, len(data) - 1) + 1]  # drop the footer...
        path.write_bytes(kept + b'{"run":"cut-off')  # ...and leave half a record
        expected = unseal(kept.splitlines()[-1])
        assert expected is not None
        learner(path).fit(1)
        assert headers(path)[1][PREV_FIELD] == expected[1].hex()
        assert b'{"run":"cut-off\n' in path.read_bytes()

    def test_a_long_last_line_is_found(self, tmp_path):
        """The last line may be far longer than the first window the writer reads."""
        path = tmp_path / "runs.jsonl"
        first = learner(path, [BigNote()])
        first.fit(1)
        lines = path.read_bytes().splitlines()
        assert len(lines[-3]) > 100_000  # the note, before end_fit and the footer
        path.write_bytes(b"\n".join(lines[:-2]) + b"\n")  # those two lost
        expected = unseal(lines[-3])
        assert expected is not None
        learner(path).fit(1)
        assert headers(path)[1][PREV_FIELD] == expected[1].hex()


class TestOneWriterPerFile:
    def test_a_second_fit_on_a_file_being_written_is_refused(self, tmp_path):
        """Two writers used to interleave runs that then read as tampered; now one waits out."""
        path = tmp_path / "runs.jsonl"
        refused: list[BaseException] = []

        class SecondFit(Callback):
            def before_fit(self, learn: Learner) -> None:
                other = learner(path)
                try:
                    other.fit(1)
                except AuditLogInUseError as exc:
                    refused.append(exc)
                assert other.state == "idle"

        first = learner(path, [SecondFit()])
        result = first.fit(1)
        expected = (
            f"audit log {path} is being written by another fit (another process, or another "
            "learner in this one); give each its own .jsonl file, or a directory"
        )
        assert [str(e) for e in refused] == [expected]
        reports, problem = audit_file(path)
        assert problem is None
        assert [(r.run_id, r.verified) for r in reports] == [(result.run_id, True)]
        assert learner(path).fit(1).status == "completed"  # released when the fit ended

    def test_a_rank_writes_its_own_file(self, tmp_path, monkeypatch):
        """Under torch.distributed, rank 1 of a .jsonl target writes <stem>.rank1.jsonl."""
        import fsm_learner.learner as learner_module

        monkeypatch.setattr(learner_module, "_rank", lambda: 1)
        result = learner(tmp_path / "runs.jsonl").fit(1)
        assert result.audit_path == tmp_path / "runs.rank1.jsonl"
        assert [p.name for p in tmp_path.iterdir()] == ["runs.rank1.jsonl"]


class TestNoEmptyLogs:
    def test_a_ctrl_c_before_the_header_leaves_no_empty_file(self, tmp_path):
        """An empty <run_id>.jsonl used to stay behind and fail every later audit."""
        start = AuditWriter.start.__code__

        def tracer(frame, event, arg):
            if frame.f_code is start and event == "call":
                raise KeyboardInterrupt

        learn = learner(tmp_path / "logs")
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                learn.fit(1)
        finally:
            sys.settrace(None)
        assert learn.state == "idle"
        assert list((tmp_path / "logs").iterdir()) == []
        assert learn.fit(1).status == "completed"
