"""The audit log of real runs, and `fsm-learner audit` verifying (or rejecting) it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import structlog
import torch
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, digits_dls, mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Hook,
    Learner,
    RunStatus,
    Trigger,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.cli import main

H = Hook
TESTS = Path(__file__).parent


def fit(plan=None, *, n_epochs=2, n_train=3, n_valid=2, **kwargs):
    learn = Learner(
        mlp(),
        batches_dls(n_train, n_valid),
        F.cross_entropy,
        0.1,
        [Raiser(plan or {})],
        **kwargs,
    )
    try:
        result = learn.fit(n_epochs)
    except (Boom, ValueError):
        result = None
    return learn, result


def audit(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


class TestRealRunsVerify:
    @pytest.mark.parametrize(
        ("plan", "status", "cancels"),
        [
            ({}, RunStatus.COMPLETED, (0, 0, 0)),
            ({(H.AFTER_LOSS, 2): CancelBatchException}, RunStatus.COMPLETED, (1, 0, 0)),
            ({(H.AFTER_STEP, 1): CancelEpochException}, RunStatus.COMPLETED, (0, 1, 0)),
            ({(H.BEFORE_BATCH, 4): CancelFitException}, RunStatus.CANCELLED, (0, 0, 1)),
            ({(H.AFTER_PREDICT, 3): Boom}, RunStatus.FAILED, (0, 0, 0)),
        ],
    )
    def test_status_and_counts(self, plan, status, cancels):
        """Each run verifies with the right status, and its counts are the learner's."""
        learn, _ = fit(plan)
        reports, problem = audit_file(learn.audit_path)
        assert problem is None
        [report] = reports
        assert report.verified, report.problem
        assert report.status is status
        assert report.run_id == learn.run_id
        assert tuple(report.cancels.values()) == cancels
        assert report.batches == (
            learn.counts[Trigger.END_BATCH, True],
            learn.counts[Trigger.END_BATCH, False],
        )
        assert report.transitions == learn.seq
        assert report.head == learn.audit_head
        assert sum(report.time_in_state_ns.values()) == report.wall_ns

    def test_failed_in_the_model(self, capsys):
        """A model that fails mid-epoch leaves a verified log saying where."""

        class Flaky(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin, self.calls = nn.Linear(64, 10), 0

            def forward(self, x):
                self.calls += 1
                if self.calls == 5:
                    raise ValueError("bad batch")
                return self.lin(x)

        learn = Learner(Flaky(), batches_dls(3, 2), F.cross_entropy, 0.1)
        with pytest.raises(ValueError, match="bad batch"):
            learn.fit(2)
        code, out, _ = audit(str(learn.audit_path), capsys=capsys)
        assert code == 0
        assert "failed  verified" in out
        assert "failed: ValueError: 'bad batch' in state batch, epoch 0, iter 1, valid pass" in out

    def test_failed_in_a_callback(self, capsys):
        """The footer names the hook and callback; the audit shows them."""
        learn, _ = fit({(H.AFTER_BACKWARD, 2): Boom})
        code, out, _ = audit(str(learn.audit_path), "--json", capsys=capsys)
        assert code == 0
        [run] = orjson.loads(out)["runs"]
        assert run["status"] == "failed"
        assert run["failure"]["hook"] == "after_backward"
        assert run["failure"]["callback"] == "Raiser"
        assert run["failed_at"] == {"state": "backward", "epoch": 0, "iter": 1, "training": True}

    def test_digits_run_summary(self, capsys):
        """A real digits run: the summary shows epochs, batches and the time per state."""
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.1)
        result = learn.fit(2)
        code, out, err = audit(str(result.audit_path), "--expect-head", result.head, capsys=capsys)
        assert (code, err) == (0, "")
        assert "epochs 2, batches 44 train / 14 valid, cancels: batch 0, epoch 0, fit 0" in out
        assert "time per state" in out
        assert "slowest transitions" in out
        assert out.strip().endswith("1 run(s): 1 verified, 0 do not verify")

    def test_a_jsonl_file_collects_runs_and_a_directory_is_walked(self, tmp_path, capsys):
        """audit_log=FILE.jsonl appends one run per fit; a directory is searched for logs."""
        log = tmp_path / "logs" / "all.jsonl"
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=log)
        first, second = learn.fit(1), learn.fit(1)
        assert first.audit_path == second.audit_path == log
        code, out, _ = audit(str(tmp_path / "logs"), capsys=capsys)
        assert code == 0
        assert "2 run(s): 2 verified" in out

    def test_audit_log_none_writes_nothing(self, tmp_path):
        """audit_log=None turns the log off."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=None)
        result = learn.fit(1)
        assert (result.audit_path, result.head, learn.audit_path) == (None, None, None)
        assert not (tmp_path / "runs").exists()


class TestRecords:
    def test_record_fields_and_size(self):
        """Transition records have the schema's fields, no tensor, and stay under 160 bytes."""
        learn, _ = fit()
        records = [orjson.loads(line) for line in lines(learn.audit_path)]
        header, transitions, footer = records[0], records[1:-1], records[-1]
        assert header["ev"] == "run_start"
        assert header["params"] == sum(p.numel() for p in learn.model.parameters())
        assert header["cbs"] == [["Raiser", 0]]
        assert footer["ev"] == "run_end"
        assert footer["status"] == "completed"
        assert set(transitions[0]) == {
            "run",
            "seq",
            "t",
            "ev",
            "src",
            "dst",
            "ep",
            "it",
            "tr",
            "rk",
            "h",
        }
        assert max(len(line) for line in lines(learn.audit_path)[1:-1]) <= 160
        assert [r["seq"] for r in records] == list(range(len(records)))

    def test_flushed_at_pass_end(self):
        """After a pass ends, its records are on disk (a killed run keeps them)."""
        seen = []

        class Peek(Callback):
            def before_epoch(self, learn):
                if not learn.training:
                    seen.append(lines(learn.audit_path)[-1])

        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Peek()])
        learn.fit(1)
        assert orjson.loads(seen[0][: seen[0].rindex(b',"h"')] + b"}")["ev"] == "end_epoch"

    def test_notes_are_chained_and_checked(self):
        """learn.note adds records that verify; tensors and reserved names are refused."""

        class Notes(Callback):
            def after_epoch(self, learn):
                learn.note("metrics", loss=0.5, training=learn.training)

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Notes()])
        learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.notes) == (True, 2)

        class BadNote(Callback):
            def after_fit(self, learn):
                learn.note("metrics", loss=torch.tensor(0.5))

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [BadNote()])
        with pytest.raises(TypeError, match=r"'loss' must be a JSON value .* got Tensor"):
            learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.status) == (True, RunStatus.FAILED)

        class Clash(Callback):
            def before_fit(self, learn):
                learn.note("x", seq=1)

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Clash()])
        with pytest.raises(ValueError, match=r"reserved names \['seq'\]"):
            learn.fit(1)

    def test_no_structlog_configure_and_root_untouched(self):
        """The library builds its own logger: structlog stays unconfigured, root untouched."""
        root = logging.getLogger()
        before = (root.level, list(root.handlers))
        fit()
        assert not structlog.is_configured()
        assert (root.level, list(root.handlers)) == before

    def test_run_events_reach_stdlib_logging(self, caplog):
        """Run-level events go to the fsm_learner logger, for the application to route."""
        with caplog.at_level(logging.INFO, logger="fsm_learner"):
            learn, _ = fit(n_epochs=1)
        events = [r.getMessage().split()[0] for r in caplog.records if r.name == "fsm_learner"]
        assert events == ["run_start", "pass_end", "pass_end", "run_end"]
        assert caplog.records[-1].status == "completed"
        assert caplog.records[-1].run_id == learn.run_id

    def test_run_events_reach_structlog_when_configured(self):
        """With structlog configured by the application, events go through its chain."""
        try:
            with structlog.testing.capture_logs() as logs:
                fit(n_epochs=1)
        finally:
            structlog.reset_defaults()  # capture_logs leaves structlog marked as configured
        assert [e["event"] for e in logs] == ["run_start", "pass_end", "pass_end", "run_end"]


class TestTampering:
    @pytest.fixture
    def log(self):
        learn, _ = fit()
        return learn.audit_path

    def rewrite(self, path: Path, new: list[bytes]) -> None:
        path.write_bytes(b"".join(new))

    def test_edited_value(self, log, capsys):
        """Changing one value breaks the chain at that line."""
        content = lines(log)
        content[7] = content[7].replace(b'"ep":0', b'"ep":1')
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert (
            err.strip() == f"fsm-learner audit: {log}:8: hash chain broken: the record was edited, "
            "inserted or reordered"
        )

    def test_deleted_line(self, log, capsys):
        """A missing record is a sequence gap."""
        content = lines(log)
        del content[5]
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert f"{log}:6: sequence number 6, expected 5" in err

    def test_swapped_lines(self, log, capsys):
        """Two records swapped: the sequence is out of order."""
        content = lines(log)
        content[4], content[5] = content[5], content[4]
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert f"{log}:5: sequence number 5, expected 4" in err

    def test_forged_line_inserted(self, log, capsys):
        """A forged record with a made-up hash, renumbered to fit, breaks the chain."""
        content = [orjson.loads(x) for x in lines(log)]
        forged = dict(content[3], ev="cancel_batch", dst="epoch")
        content.insert(4, forged)
        for seq, rec in enumerate(content):
            rec["seq"] = seq
        self.rewrite(log, [orjson.dumps(r) + b"\n" for r in content])
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert "hash chain broken" in err

    def test_rewritten_chain_is_caught_by_the_expected_head(self, log, capsys):
        """Whoever recomputes the whole chain cannot match the head kept elsewhere."""
        from fsm_learner.audit.schema import chain_hash, seal, unseal

        content = lines(log)
        head = orjson.loads(content[-1])["h"]
        content[7] = content[7].replace(b'"ep":0', b'"ep":1')
        prev, out = b"", []
        for line in content:
            body, _ = unseal(line)
            prev = chain_hash(prev, body, None)
            out.append(seal(body, prev))
        self.rewrite(log, out)
        assert audit(str(log), capsys=capsys)[0] == 0
        code, _, err = audit(str(log), "--expect-head", head, capsys=capsys)
        assert code == 1
        assert f"is not the expected {head}" in err

    def test_keyed_chain(self, tmp_path, capsys, monkeypatch):
        """A keyed chain verifies only with the key; the key is not in the log."""
        learn, _ = fit(audit_key="s3cret")
        log = learn.audit_path
        assert b"s3cret" not in log.read_bytes()
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert "this run's chain is keyed: give the key" in err
        monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", "s3cret")
        assert audit(str(log), capsys=capsys)[0] == 0
        monkeypatch.setenv("MY_KEY", "wrong")
        code, _, err = audit(str(log), "--key-env", "MY_KEY", capsys=capsys)
        assert code == 1
        assert "hash chain broken" in err
        assert "wrong key" in err


class TestBadInput:
    def test_not_json(self, tmp_path, capsys):
        """A line that is not JSON."""
        bad = tmp_path / "bad.jsonl"
        bad.write_text("hello world\n")
        code, _, err = audit(str(bad), capsys=capsys)
        assert (code, err) == (1, f"fsm-learner audit: {bad}:1: not JSON\n")

    def test_empty_file(self, tmp_path, capsys):
        """An empty file."""
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        code, _, err = audit(str(empty), capsys=capsys)
        assert (code, err) == (1, f"fsm-learner audit: {empty}:0: empty file: no run in it\n")

    def test_binary_file(self, tmp_path, capsys):
        """A binary file (NUL bytes)."""
        binary = tmp_path / "model.jsonl"
        binary.write_bytes(bytes(range(256)) + b"\n")
        code, _, err = audit(str(binary), capsys=capsys)
        assert code == 1
        assert "binary data (a NUL byte)" in err

    def test_truncated_last_line(self, capsys):
        """A cut last line is reported as truncated, and the prefix still verifies."""
        learn, _ = fit()
        data = learn.audit_path.read_bytes()
        cut = data[: data.rindex(b"\n", 0, len(data) - 1) - 40]
        learn.audit_path.write_bytes(cut)
        n = cut.count(b"\n") + 1
        code, out, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert (
            f":{n}: truncated at line {n} (a killed run?); the {n - 1} records before it verify"
            in err
        )
        assert "truncated  DOES NOT VERIFY" in out

    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            ((b'"ev":"predict"', b'"ev":"guess"'), "unknown event 'guess'"),
            ((b'"src":"batch"', b'"src":"lunch"'), "field 'src' is 'lunch', not a state"),
            ((b'"seq":4', b'"seq":"4"'), "field 'seq' must be int, got str '4'"),
            ((b'"dst":"predict"', b'"dst":"loss"'), "illegal transition predict: batch -> loss"),
        ],
    )
    def test_schema_and_table(self, edit, reason, capsys):
        """Wrong types, unknown names and illegal transitions are named (chain recomputed)."""
        from fsm_learner.audit.schema import chain_hash, seal, unseal

        learn, _ = fit()
        prev, out = b"", []
        for line in lines(learn.audit_path):
            body, _ = unseal(line)
            body = body.replace(*edit)
            prev = chain_hash(prev, body, None)
            out.append(seal(body, prev))
        learn.audit_path.write_bytes(b"".join(out))
        code, _, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert reason in err

    def test_directory_without_logs_and_missing_path(self, tmp_path, capsys):
        """Usage errors exit 2 with one line each."""
        (tmp_path / "empty").mkdir()
        code, _, err = audit(str(tmp_path / "empty"), str(tmp_path / "nope"), capsys=capsys)
        assert code == 2
        assert err.splitlines() == [
            f"fsm-learner audit: {tmp_path / 'empty'}: a directory with no *.jsonl audit log in it",
            f"fsm-learner audit: {tmp_path / 'nope'}: no such file or directory",
        ]

    def test_no_arguments(self, capsys):
        """argparse's usage error: exit 2."""
        with pytest.raises(SystemExit) as info:
            main(["audit"])
        assert info.value.code == 2


def test_sigkill_mid_epoch_leaves_a_verified_prefix(tmp_path, capsys):
    """A run killed with SIGKILL mid-epoch: the audit reports it truncated, prefix verified."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        import torch.nn.functional as F
        from helpers import digits_dls, mlp
        from fsm_learner import Callback, Learner

        class Kill(Callback):
            def after_loss(self, learn):
                if learn.epoch == 1 and learn.iter == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

        Learner(mlp(), digits_dls(), F.cross_entropy, 0.1, [Kill()], audit_log="runs").fit(3)
        """,
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    [log] = (tmp_path / "runs").glob("*.jsonl")
    code, _, err = audit(str(log), capsys=capsys)
    assert code == 1
    assert "truncated at line" in err
    assert "records before it verify" in err
    [report], _ = audit_file(log)
    assert report.status is RunStatus.TRUNCATED
    # flushed at every pass end: epoch 0 is on disk whole, epoch 1's first pass is lost
    assert (report.epochs, report.batches, report.last_state) == (1, (22, 7), "fit")


@st.composite
def mutations(draw):
    kind = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "swap", "dup"]))
    return (
        kind,
        draw(st.integers(0, 10**6)),
        draw(st.integers(0, 10**6)),
        draw(st.binary(max_size=40)),
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run.jsonl"
    Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, audit_log=path).fit(1)
    return path.read_bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(mutations(), min_size=1, max_size=4))
def test_reader_never_raises_on_mutated_logs(ops, pristine, tmp_path):
    """Hypothesis mutates a real log; the audit always answers with reports or a problem."""
    data = bytearray(pristine)
    for kind, a, b, junk in ops:
        i, j = sorted((a % (len(data) + 1), b % (len(data) + 1)))
        if kind == "flip" and data:
            data[i % len(data)] ^= 1 + b % 255
        elif kind == "delete":
            del data[i:j]
        elif kind == "insert":
            data[i:i] = junk
        elif kind == "truncate":
            del data[i:]
        elif kind == "swap":
            rows = bytes(data).split(b"\n")
            x, y = a % len(rows), b % len(rows)
            rows[x], rows[y] = rows[y], rows[x]
            data = bytearray(b"\n".join(rows))
        elif kind == "dup":
            data[i:i] = data[i:j]
    path = tmp_path / "mutated.jsonl"
    path.write_bytes(bytes(data))
    reports, problem = audit_file(path)
    assert problem is not None or reports
    if bytes(data) != pristine:
        assert problem is not None or not all(r.verified for r in reports)


class TestReviewFindings:
    def test_keyed_log_rewritten_unkeyed_fails_with_the_key(self, capsys, monkeypatch):
        """Given a key, an unkeyed chain does not verify (else a keyed log could be downgraded)."""
        from fsm_learner.audit.schema import chain_hash, seal, unseal

        learn, _ = fit(audit_key="s3cret")
        prev, out = b"", []
        for line in lines(learn.audit_path):
            body, _ = unseal(line)
            body = body.replace(b'"keyed":true', b'"keyed":false')
            prev = chain_hash(prev, body, None)
            out.append(seal(body, prev))
        learn.audit_path.write_bytes(b"".join(out))
        assert audit(str(learn.audit_path), capsys=capsys)[0] == 0  # without a key: a plain chain
        monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", "s3cret")
        code, _, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert "a key was given but this run's chain is not keyed" in err

    def test_appending_after_a_cut_off_line_keeps_the_next_run(self, tmp_path, capsys):
        """A run appended to a .jsonl whose last line was cut verifies on its own line."""
        log = tmp_path / "all.jsonl"
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=log)
        learn.fit(1)
        log.write_bytes(log.read_bytes()[:-30])  # the footer, cut
        learn.fit(1)
        reports, problem = audit_file(log)
        assert problem is None
        assert [r.verified for r in reports] == [False, True]
        assert "a record cut off by a killed run, or damage" in reports[0].problem.reason

    @pytest.mark.parametrize(
        "edit",
        [
            lambda line: line.replace(b'"}\n', b'"}\r\n'),
            lambda line: line[:-19] + line[-19:].upper(),
        ],
        ids=["crlf", "upper-hex"],
    )
    def test_line_bytes_must_be_the_writers(self, edit, capsys):
        """CR line ends or upper-case hashes are not what the writer wrote: rejected."""
        learn, _ = fit()
        content = lines(learn.audit_path)
        content[3] = edit(content[3])
        learn.audit_path.write_bytes(b"".join(content))
        code, _, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert ":4: no hash" in err

    def test_odd_paths_are_usage_errors(self, tmp_path, capsys):
        """A name too long for the OS, or a FIFO: one line each, exit 2, no traceback."""
        fifo = tmp_path / "pipe.jsonl"
        os.mkfifo(fifo)
        code, _, err = audit("a" * 5000, str(fifo), capsys=capsys)
        assert code == 2
        assert "File name too long" in err
        assert f"{fifo}: not a regular file" in err

    def test_one_line_of_not_json_without_newline(self, tmp_path, capsys):
        """A file that is one line of text is not JSON, not a truncated run."""
        bad = tmp_path / "x.jsonl"
        bad.write_bytes(b"hello")
        code, _, err = audit(str(bad), capsys=capsys)
        assert (code, err) == (1, f"fsm-learner audit: {bad}:1: not JSON\n")
