"""The ranks of a fit across processes: `fsm-learner audit` checks them together.

The logs are real: written by the audit writer as the learner writes a rank's log
(``<run>.rank<r>.jsonl``, its header naming the rank and the world size; transitions
queued on ``writer.pending``; ``agreed`` notes right before the transitions the ranks
agreed on), one writer per rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path

import orjson
import pytest
from audit_logs import reseal, spaced
from jsonschema import Draft202012Validator

from fsm_learner.audit import ranks as ranks_module
from fsm_learner.audit.codec import (
    KEY_ENV,
    AgreePoint,
    Encoder,
    FailureField,
    Field,
    RunStatus,
    derive_key,
    note_fields,
)
from fsm_learner.audit.ranks import (
    AGREED,
    MAX_ERROR_CHARS,
    MAX_WORLD_SIZE,
    UNIT_TRIGGERS,
    AgreedField,
    Cancel,
    DistributedRuns,
    check_ranks,
    ranges_text,
    rank_ranges,
)
from fsm_learner.audit.replay import FileAudit, RunReport
from fsm_learner.audit.writer import AuditWriter
from fsm_learner.cli import main
from fsm_learner.diagram import render_text, run_view
from fsm_learner.machine import Trigger, table_digest

RUN = "d15ab1ed0001"
OTHER = "d15ab1ed0002"
TRAIN_STEPS = [
    ("begin_batch", "batch"),
    ("predict", "predict"),
    ("compute_loss", "loss"),
    ("backward", "backward"),
    ("step", "step"),
    ("end_batch", "epoch"),
]
VALID_STEPS = [*TRAIN_STEPS[:3], ("end_batch", "epoch")]
ERROR = "ValueError: boom"


class RankLog:
    """One rank's log of a fit across ranks, as the learner writes it on that rank."""

    def __init__(
        self,
        directory,
        rank,
        *,
        run_id=RUN,
        world_size=2,
        n_epochs=1,
        name=None,
        header=None,
        key=None,
    ):
        self.path = directory / (name or f"{run_id}.rank{rank}.jsonl")
        fields = {
            Field.TABLE: table_digest(),
            Field.RANK: rank,
            Field.WORLD_SIZE: world_size,
            Field.KIND: "fit",
            Field.N_EPOCHS: n_epochs,
        }
        if world_size is None:  # a fit on one process
            del fields[Field.WORLD_SIZE]
        fields |= header or {}
        self.run_id = run_id
        self.writer = AuditWriter(self.path, run_id=run_id, key=key, header=fields)
        self.writer.start()
        self.records = 1  # the header
        self.state, self.epoch, self.it, self.training = "idle", 0, 0, False

    def fire(self, trigger, dest):
        key = (trigger, self.state, dest, self.training)
        self.writer.pending.append((time.monotonic_ns(), key, self.epoch, self.it))
        self.state = dest
        self.records += 1
        return self

    def begin_fit(self):
        return self.fire("begin_fit", "fit")

    def begin_pass(self, *, training=True):
        self.training, self.it = training, 0
        return self.fire("begin_epoch", "epoch")

    def batch(self, it, *, upto="end_batch"):
        """Batch ``it``: its transitions, up to ``upto`` (included)."""
        self.it = it
        for trigger, dest in TRAIN_STEPS if self.training else VALID_STEPS:
            self.fire(trigger, dest)
            if trigger == upto:
                break
        return self

    def batches(self, count, *, first=0):
        for it in range(first, first + count):
            self.batch(it)
        return self

    def end_pass(self):
        self.fire("end_epoch", "fit")
        if not self.training:
            self.epoch += 1
        return self

    def agreed(self, cancel, rank, at, error=None):
        fields = {AgreedField.CANCEL: cancel, AgreedField.RANK: rank, AgreedField.AT: at}
        if error is not None:
            fields[AgreedField.ERROR] = error
        return self.note_agreed({str(k): v for k, v in fields.items()})

    def note_agreed(self, fields):
        """An agreed note of these fields, whatever they are."""
        self.writer.note(AGREED, fields, epoch=self.epoch, it=self.it, tr=self.training)
        self.records += 1
        return self

    def end_fit(self):
        self.fire("end_fit", "idle")
        self.writer.finish(RunStatus.COMPLETED, hook_ns={})

    def cancel_fit(self):
        self.fire("cancel_fit", "idle")
        self.writer.finish(RunStatus.CANCELLED, hook_ns={})

    def fail(self, error_type, message):
        state = self.state
        self.fire("fail", "idle")
        failure = {
            FailureField.TYPE: error_type,
            FailureField.MESSAGE: message,
            FailureField.STATE: state,
            FailureField.HOOK: None,
            FailureField.CALLBACK: None,
        }
        self.writer.finish(RunStatus.FAILED, hook_ns={}, failure=failure)

    def kill(self, unsealed=0):
        """Die as SIGKILL leaves a log: what was sealed, then ``unsealed`` lines never sealed."""
        self.writer.flush()
        self.writer.close()
        line = Encoder(self.run_id).transition(
            ("begin_batch", "epoch", "batch", self.training), self.epoch, self.it + 1, 1 << 50
        )
        with self.path.open("ab") as fh:
            fh.write(line * unsealed)


def fit(log, *, train=3, valid=2):
    """A whole fit of one epoch: ``train`` training batches, ``valid`` validation batches."""
    log.begin_fit().begin_pass().batches(train).end_pass()
    log.begin_pass(training=False).batches(valid).end_pass().end_fit()
    return log


def lockstep_run(directory, *, world_size=2, run_id=RUN, **kwargs):
    """Every rank of a fit, lockstep, completed."""
    return [
        fit(RankLog(directory, rank, run_id=run_id, world_size=world_size), **kwargs)
        for rank in range(world_size)
    ]


def batch_cancelled(directory):
    """Rank 1 cancels batch 1 before backward; both ranks take cancel_batch, then go on."""
    logs = [RankLog(directory, rank) for rank in (0, 1)]
    for log in logs:
        log.begin_fit().begin_pass().batch(0).batch(1, upto="compute_loss")
        log.agreed(Cancel.BATCH, 1, AgreePoint.BACKWARD).fire("cancel_batch", "epoch")
        log.batch(2).end_pass().end_fit()
    return logs


def fit_cancelled(directory):
    """Rank 0 cancels the fit in batch 1; both ranks take cancel_fit at the batch's end."""
    logs = [RankLog(directory, rank) for rank in (0, 1)]
    for log in logs:
        log.begin_fit().begin_pass().batch(0).batch(1, upto="step")
        log.agreed(Cancel.FIT, 0, AgreePoint.END_BATCH).cancel_fit()
    return logs


def failed_run(directory, *, rank_1_in_batch=False):
    """Rank 1 fails fetching batch 2 (or in its predict); rank 0 takes fail before backward.

    Fetching: rank 0 began batch 2, rank 1 did not; both still lockstep.
    """
    zero, one = RankLog(directory, 0), RankLog(directory, 1)
    for log in (zero, one):
        log.begin_fit().begin_pass().batches(2)
    if rank_1_in_batch:
        one.batch(2, upto="predict")
    one.agreed(Cancel.FAIL, 1, AgreePoint.FAILURE, ERROR).fail("ValueError", "boom")
    zero.batch(2, upto="compute_loss").agreed(Cancel.FAIL, 1, AgreePoint.BACKWARD, ERROR)
    zero.fail("RankFailedError", f"rank 1 failed: {ERROR}")
    return zero, one


def audit(*paths, capsys):
    code = main(["audit", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out, err


def audit_json(*paths, capsys):
    code = main(["audit", "--json", *map(str, paths)])
    out, err = capsys.readouterr()
    return code, orjson.loads(out), err


def distributed(*paths):
    """The distributed runs among the runs of ``paths``, checked."""
    runs = DistributedRuns()
    for path in paths:
        for report in FileAudit(path):
            runs.add(report, path)
    return runs.check()


def section(out, run_id=RUN):
    """The text summary's section of one distributed run."""
    start = out.index(f"distributed run {run_id}:")
    return out[start : out.index("\n\n", start)]


class TestLockstep:
    def test_a_completed_run(self, tmp_path):
        """Two ranks, the same 16 unit transitions each: lockstep, verified."""
        lockstep_run(tmp_path)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.run_id, report.world_size, report.missing) == (RUN, 2, [])
        assert [log.rank for log in report.ranks] == [0, 1]
        assert (report.lockstep, report.transitions, report.divergence) == (True, 16, None)
        assert (report.verified, report.status, report.agreed_count) == (
            True,
            RunStatus.COMPLETED,
            0,
        )

    def test_four_ranks(self, tmp_path):
        """A world of four: every rank checked against the others."""
        lockstep_run(tmp_path, world_size=4, train=2, valid=1)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert [log.rank for log in report.ranks] == [0, 1, 2, 3]
        assert (report.lockstep, report.verified, report.transitions) == (True, True, 12)

    def test_the_per_batch_steps_are_not_compared(self, tmp_path):
        """predict, compute_loss, backward, step are not unit transitions; the others are.

        Rank 0 cancels batch 0 after its loss, rank 1 after its step: the same unit
        transitions (cancel_batch of batch 0), other steps inside the batch.
        """
        assert {t.value for t in Trigger} - UNIT_TRIGGERS == {
            "predict",
            "compute_loss",
            "backward",
            "step",
        }
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        for log, upto in ((zero, "compute_loss"), (one, "step")):
            log.begin_fit().begin_pass().batch(0, upto=upto).fire("cancel_batch", "epoch")
            log.batch(1).end_pass().end_fit()
        [report] = distributed(zero.path, one.path)
        assert (report.lockstep, report.transitions) == (True, 8)
        one = RankLog(tmp_path, 1, run_id=OTHER)
        zero = RankLog(tmp_path, 0, run_id=OTHER)
        for log, last in ((zero, "end_batch"), (one, "cancel_batch")):
            log.begin_fit().begin_pass().batch(0, upto="step").fire(last, "epoch")
            log.end_pass().end_fit()
        [_, report] = distributed(*sorted(tmp_path.iterdir()))
        assert [step.trigger for _, step in report.divergence.taken] == [
            "end_batch",
            "cancel_batch",
        ]

    def test_successive_fits_in_one_file_per_rank(self, tmp_path):
        """File mode: x.rank<r>.jsonl holds each fit of the rank; each run checked on its own."""
        for run_id in (RUN, OTHER):
            for rank in (0, 1):
                fit(RankLog(tmp_path, rank, run_id=run_id, name=f"x.rank{rank}.jsonl"))
        reports = distributed(tmp_path / "x.rank0.jsonl", tmp_path / "x.rank1.jsonl")
        assert [(r.run_id, r.lockstep, r.verified, r.transitions) for r in reports] == [
            (RUN, True, True, 16),
            (OTHER, True, True, 16),
        ]

    def test_runs_without_a_world_size_are_not_distributed(self, tmp_path):
        """A fit on one process (no world_size in its header): no distributed run."""
        log = fit(RankLog(tmp_path, 0, world_size=None, name="solo.jsonl"))
        runs = DistributedRuns()
        for report in FileAudit(log.path):
            runs.add(report, log.path)
        assert not runs
        assert runs.check() == []


class TestAgreedCancels:
    def test_a_batch_cancel(self, tmp_path):
        """Rank 1's batch cancel, agreed before backward: a note on both ranks, lockstep."""
        batch_cancelled(tmp_path)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.lockstep, report.verified, report.status) == (True, True, "completed")
        assert report.agreed_count == 1
        [cancel] = report.agreed
        assert cancel.to_json() == {
            "cancel": "batch",
            "rank": 1,
            "error": None,
            "taken": {
                "trigger": "cancel_batch",
                "epoch": 0,
                "iter": 1,
                "pass": "train",
                "line": 15,
            },
            "at": {"0": "backward", "1": "backward"},
        }

    def test_a_fit_cancel(self, tmp_path):
        """Rank 0's fit cancel, agreed at the end of a batch: both ranks cancelled, lockstep."""
        fit_cancelled(tmp_path)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.lockstep, report.verified, report.status) == (True, True, "cancelled")
        assert [(c.first.cancel, c.first.rank, c.first.taken.trigger) for c in report.agreed] == [
            ("fit", 0, "cancel_fit")
        ]

    def test_notes_that_differ_in_the_proposing_rank(self, tmp_path):
        """The same transitions, but rank 1's note names another proposer: not lockstep."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log, proposer in zip(logs, (0, 1), strict=True):
            log.begin_fit().begin_pass().batch(0, upto="step")
            log.agreed(Cancel.FIT, proposer, AgreePoint.END_BATCH).cancel_fit()
        [report] = distributed(*(log.path for log in logs))
        assert (report.lockstep, report.verified) == (False, False)
        assert str(report.divergence) == (
            "agreed note 1 (index 0): rank 0: fit cancel proposed by rank 0 at line 10; rank 1: "
            "fit cancel proposed by rank 1 at line 10"
        )

    def test_a_note_one_rank_lacks(self, tmp_path):
        """Rank 1 took the cancel without its note: the notes differ (nothing more on rank 1)."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass().batch(0, upto="step")
        logs[0].agreed(Cancel.FIT, 0, AgreePoint.END_BATCH)
        for log in logs:
            log.cancel_fit()
        [report] = distributed(*(log.path for log in logs))
        assert (report.divergence.sequence, report.divergence.index) == ("agreed", 0)
        assert str(report.divergence).endswith("; rank 1: nothing more")


class TestFailedRuns:
    @pytest.mark.parametrize("rank_1_in_batch", [False, True], ids=["fetching", "in-predict"])
    def test_one_rank_fails_the_others_follow(self, tmp_path, rank_1_in_batch):
        """Rank 1 fails; rank 0 fails at its next point, one begin_batch later: lockstep."""
        failed_run(tmp_path, rank_1_in_batch=rank_1_in_batch)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.failed, report.status) == (True, RunStatus.FAILED)
        assert (report.lockstep, report.verified) == (True, True)
        assert report.transitions == 6  # begin_fit, begin_epoch, 2 batches: no begin_batch, fail
        [cancel] = report.agreed
        assert cancel.to_json()["at"] == {"0": "backward", "1": "failure"}
        assert (cancel.first.cancel, cancel.first.rank, cancel.first.error) == ("fail", 1, ERROR)

    def test_a_rank_that_completed_in_a_failed_run(self, tmp_path):
        """Rank 1 failed, rank 0 says completed: every rank of a failed run ends in fail."""
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        zero.begin_fit().end_fit()
        one.begin_fit().fail("ValueError", "boom")
        [report] = distributed(zero.path, one.path)
        assert report.lockstep is False  # rank 0's end_fit, where rank 1 has nothing more
        assert [str(p) for p in report.problems] == [
            (
                f"distributed run '{RUN}': rank 0 ended completed, but the run failed: every rank "
                "of a failed run ends in fail (or was killed)"
            )
        ]

    def test_a_rank_that_stopped_early_without_being_killed(self, tmp_path):
        """Rank 0 failed a batch before rank 1: its sequence ends first, and it was not killed."""
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        zero.begin_fit().begin_pass().batch(0).fail("RankFailedError", "rank 1 failed: ...")
        one.begin_fit().begin_pass().batches(2).fail("ValueError", "boom")
        [report] = distributed(zero.path, one.path)
        assert report.lockstep is False
        assert str(report.divergence) == (
            "unit transition 5 (index 4): rank 0: nothing more; rank 1: begin_batch (epoch 0, "
            "batch 1, train) at line 11"
        )

    def test_a_killed_rank(self, tmp_path, capsys):
        """Rank 1 killed mid-pass (its tail never sealed), rank 0 fails: lockstep to its end.

        The audit still fails: rank 1's log is truncated, as a killed fit's is.
        """
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        for log in (zero, one):
            log.begin_fit().begin_pass().batches(2)
        one.kill(unsealed=3)
        zero.batches(2, first=2).fail("RankLostError", "rank 1 stopped answering")
        [report] = distributed(zero.path, one.path)
        assert (report.lockstep, report.verified, report.status) == (True, True, "failed")
        assert (report.transitions, report.shorter) == (10, {1: 6})
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "truncated (a killed run?)" in err
        assert (
            "  rank 1: "
            f"{tmp_path}/{RUN}.rank1.jsonl (truncated: killed, its sealed records verify)\n"
            "  lockstep: yes, 10 unit transitions (the trailing begin_* and fail of a failed run "
            "left out); rank 1, killed, logged the first 6\n"
        ) in out


class TestNotLockstep:
    def test_one_batch_fewer(self, tmp_path, capsys):
        """Rank 1 ran one batch fewer: the first divergence names both ranks' transitions."""
        fit(RankLog(tmp_path, 0), train=4)
        fit(RankLog(tmp_path, 1), train=3)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.lockstep, report.verified) == (False, False)
        divergence = report.divergence.to_json()
        assert divergence == {
            "sequence": "transitions",
            "index": 8,
            "ranks": [
                {
                    "rank": 0,
                    "took": {
                        "trigger": "begin_batch",
                        "epoch": 0,
                        "iter": 3,
                        "pass": "train",
                        "line": 23,
                    },
                },
                {
                    "rank": 1,
                    "took": {
                        "trigger": "end_epoch",
                        "epoch": 0,
                        "iter": 2,
                        "pass": "train",
                        "line": 23,
                    },
                },
            ],
        }
        code, out, err = audit(tmp_path, capsys=capsys)
        first = (
            "unit transition 9 (index 8): rank 0: begin_batch (epoch 0, batch 3, train) at line "
            "23; rank 1: end_epoch (epoch 0, batch 2, train) at line 23"
        )
        assert (code, err) == (
            1,
            (
                f"fsm-learner audit: distributed run '{RUN}': the ranks are not in lockstep: first "
                f"divergence at {first}\n"
            ),
        )
        assert f"  lockstep: NO, first divergence at {first}\n" in out
        assert out.endswith(
            "1 distributed run(s): 0 verified, 1 do not verify\n"
            "2 run(s): 2 verified, 0 do not verify\n"
        )


class TestRecordsInOtherBytes:
    @pytest.mark.parametrize("make", [batch_cancelled, failed_run], ids=["cancel", "failed"])
    def test_the_same_report(self, make, tmp_path):
        """Rank 1's records respaced (seals recomputed): decoded, not matched; one report."""
        make(tmp_path)
        files = sorted(tmp_path.iterdir())
        [fast] = distributed(*files)
        data = files[1].read_bytes()
        files[1].write_bytes(reseal(b"".join(map(spaced, data.splitlines(keepends=True)))))
        assert files[1].read_bytes() != data
        [slow] = distributed(*files)
        assert (slow.lockstep, slow.agreed_count) == (True, 1)
        assert slow.to_json() == fast.to_json()


class TestRanksAndHeaders:
    def test_a_missing_rank(self, tmp_path, capsys):
        """A world of three, rank 2's log not given: named, the audit fails."""
        logs = lockstep_run(tmp_path, world_size=3)
        logs[2].path.unlink()
        [report] = distributed(logs[0].path, logs[1].path)
        assert (report.missing, report.lockstep, report.verified) == ([(2, 2)], True, False)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert (code, err) == (
            1,
            (
                f"fsm-learner audit: distributed run '{RUN}': rank 2 of 3 missing: no log of "
                "theirs among the files audited\n"
            ),
        )
        assert f"distributed run {RUN}: world size 3, ranks 0-1 (missing: 2), completed  " in out
        assert "  lockstep: yes (among the ranks given), 16 unit transitions\n" in out

    def test_a_missing_ranks_empty_log(self, tmp_path, capsys):
        """Rank 1 killed before its first write: its empty log named as the missing rank's."""
        fit(RankLog(tmp_path, 0))
        (tmp_path / f"{RUN}.rank1.jsonl").write_bytes(b"")
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {tmp_path}/{RUN}.rank1.jsonl:0: empty file: no run in it (a fit "
            "killed before its first write?)\n"
        )
        assert (
            f"  problem: distributed run '{RUN}': rank 1 of 2 missing: its log {tmp_path}/{RUN}."
            "rank1.jsonl holds no run of it (a rank killed before its first write?)\n"
        ) in out
        [report] = distributed(tmp_path / f"{RUN}.rank0.jsonl")  # its file not audited
        assert report.problems[0].reason.endswith(
            "rank 1 of 2 missing: no log of theirs among the files audited"
        )

    def test_world_sizes_that_differ(self, tmp_path):
        """Rank 1 says a world of three: the headers differ, and ranks 2 is missing."""
        fit(RankLog(tmp_path, 0, world_size=2))
        fit(RankLog(tmp_path, 1, world_size=3))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert [p.reason for p in report.problems] == [
            (
                f"distributed run '{RUN}': the ranks' headers differ in 'world_size': rank 0 2, "
                "rank 1 3"
            )
        ]
        assert (report.world_size, report.missing) == (2, [])

    def test_tables_and_epochs_that_differ(self, tmp_path):
        """Another number of epochs is named; so is another table (a log no longer verifies)."""
        fit(RankLog(tmp_path, 0))
        fit(RankLog(tmp_path, 1, n_epochs=2))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert [p.reason.split(": ", 1)[1] for p in report.problems] == [
            "the ranks' headers differ in 'n_epochs': rank 0 1, rank 1 2",
        ]
        assert report.lockstep is True  # what the ranks took is the same
        fit(RankLog(tmp_path, 2, world_size=3, header={Field.TABLE: "0" * 32}))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        reasons = [p.reason.split(": ", 1)[1] for p in report.problems]
        assert (
            f"the ranks' headers differ in 'table': rank 0 '{table_digest()}', rank 1 "
            f"'{table_digest()}', rank 2 '{'0' * 32}'"
        ) in reasons

    def test_run_ids_mixed(self, tmp_path, capsys):
        """fit.rank0.jsonl of one run, fit.rank1.jsonl of another: each names the other's file."""
        fit(RankLog(tmp_path, 0, run_id=RUN, name="fit.rank0.jsonl"))
        fit(RankLog(tmp_path, 1, run_id=OTHER, name="fit.rank1.jsonl"))
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "  lockstep: not checked (fewer than two ranks' logs)\n" in out
        assert (
            f"  problem: distributed run '{RUN}': rank 1 of 2 missing: its log {tmp_path}/"
            f"fit.rank1.jsonl holds run '{OTHER}' instead: run ids mixed?\n"
        ) in out
        assert (
            f"  problem: distributed run '{OTHER}': rank 0 of 2 missing: its log {tmp_path}/"
            f"fit.rank0.jsonl holds run '{RUN}' instead: run ids mixed?\n"
        ) in out

    def test_another_runs_rank_in_another_file(self, tmp_path, capsys):
        """Rank 1 of another run, in that run's own file: no hint, rank 1 is just missing."""
        fit(RankLog(tmp_path, 0, run_id=RUN))
        fit(RankLog(tmp_path, 1, run_id=OTHER))
        reports = distributed(*sorted(tmp_path.iterdir()))
        assert [(r.run_id, r.missing, r.lockstep) for r in reports] == [
            (RUN, [(1, 1)], None),
            (OTHER, [(0, 0)], None),
        ]
        assert [str(problem) for problem in reports[0].problems] == [
            (
                f"distributed run '{RUN}': rank 1 of 2 missing: no log of theirs among the files "
                "audited"
            )
        ]

    def test_a_file_named_as_the_missing_rank_holding_this_runs_other_rank(self, tmp_path):
        """Rank 0's log copied as rank 1's: rank 0 twice, and rank 1's file says what it holds."""
        logs = lockstep_run(tmp_path)
        logs[1].path.write_bytes(logs[0].path.read_bytes())
        files = sorted(tmp_path.iterdir())
        runs = DistributedRuns()
        for path in files:
            for report in FileAudit(path):
                runs.add(report, path)
        [report] = runs.check(files)
        assert [p.reason.split(": ", 1)[1] for p in report.problems][:2] == [
            f"rank 0 appears 2 times ({logs[0].path}, {logs[1].path})",
            f"rank 1 of 2 missing: its log {logs[1].path} holds this run's rank 0 instead",
        ]

    def test_many_runs_each_missing_a_rank(self):
        """Runs in one file, each missing rank 1: checked in linear work (not runs x runs).

        Counted in Python calls, not seconds: twice the runs take about twice the calls
        (checked against every other run, it was four times).
        """
        path = Path("/nonexistent/x.rank0.jsonl")
        header = {str(Field.RANK): 0, str(Field.WORLD_SIZE): 2, str(Field.TABLE): "t"}

        def calls(n_runs: int) -> int:
            runs = DistributedRuns()
            for index in range(n_runs):
                report = RunReport(
                    str(path),
                    1 + 3 * index,
                    run_id=f"{index:012x}",
                    status=RunStatus.COMPLETED,
                    header=header | {str(Field.N_EPOCHS): 1},
                )
                runs.add(report, path)
            counted = [0]

            def count(_frame: object, event: str, _arg: object) -> None:
                if event in {"call", "c_call"}:
                    counted[0] += 1

            sys.setprofile(count)
            try:
                reports = runs.check([path])
            finally:
                sys.setprofile(None)
            assert [r.missing for r in reports] == [[(1, 1)]] * n_runs
            return counted[0]

        small, large = calls(300), calls(600)
        assert large < 2.3 * small, (small, large)

    def test_a_rank_twice_and_a_rank_out_of_range(self, tmp_path):
        """Rank 1's log copied, a rank 5 in a world of two: each named."""
        logs = lockstep_run(tmp_path)
        (tmp_path / "copy.jsonl").write_bytes(logs[1].path.read_bytes())
        fit(RankLog(tmp_path, 5))
        reasons = [p.reason for p in distributed(*sorted(tmp_path.iterdir()))[0].problems]
        assert f"distributed run '{RUN}': rank 1 appears 2 times ({tmp_path}/copy.jsonl, " in (
            "".join(reasons)
        )
        assert any("rank 5 is not a rank of a world of 2 (0-1)" in r for r in reasons)

    def test_a_tampered_rank(self, tmp_path, capsys):
        """An edited line of rank 1: its chain fails, and the ranks are not compared."""
        logs = lockstep_run(tmp_path)
        data = logs[1].path.read_bytes()
        logs[1].path.write_bytes(data.replace(b'"it":1,', b'"it":7,', 1))
        [report] = distributed(*(log.path for log in logs))
        assert (report.lockstep, report.unchecked) == (None, "rank 1's log does not verify")
        assert report.problems[0].reason == (
            f"distributed run '{RUN}': rank 1's log ({logs[1].path}) does not verify"
        )
        code, _, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err  # the rank's own problem comes first

    def test_check_ranks_takes_one_run(self, tmp_path):
        """check_ranks refuses the reports of two runs, or of none."""
        fit(RankLog(tmp_path, 0, run_id=RUN))
        fit(RankLog(tmp_path, 1, run_id=OTHER))
        found = [
            (report, path) for path in sorted(tmp_path.iterdir()) for report in FileAudit(path)
        ]
        with pytest.raises(ValueError, match=f"got runs: '{RUN}', '{OTHER}'"):
            check_ranks(found)
        with pytest.raises(ValueError, match="got runs: none"):
            check_ranks([])


class TestCommandLine:
    def test_text(self, tmp_path, capsys):
        """The run's section: ranks, lockstep, agreed cancels; then the totals."""
        batch_cancelled(tmp_path)
        code, out, err = audit(tmp_path / f"{RUN}.rank0.jsonl", tmp_path, capsys=capsys)
        assert (code, err) == (0, "")
        assert section(out) == (
            f"distributed run {RUN}: world size 2, ranks 0-1, completed  verified\n"
            f"  rank 0: {tmp_path}/{RUN}.rank0.jsonl (completed, verified)\n"
            f"  rank 1: {tmp_path}/{RUN}.rank1.jsonl (completed, verified)\n"
            "  lockstep: yes, 10 unit transitions\n"
            "  agreed cancels: 1\n"
            "    batch cancel proposed by rank 1, taken as cancel_batch (epoch 0, batch 1, "
            "train); at backward on every rank"
        )
        assert out.endswith(
            "1 distributed run(s): 1 verified, 0 do not verify\n"
            "2 run(s): 2 verified, 0 do not verify\n"
        )

    def test_text_of_a_failed_run(self, tmp_path, capsys):
        """Where each rank agreed to fail, and the failing rank's error."""
        failed_run(tmp_path)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert (code, err) == (0, "")
        assert section(out).splitlines()[1:] == [
            f"  rank 0: {tmp_path}/{RUN}.rank0.jsonl (failed: RankFailedError, verified)",
            f"  rank 1: {tmp_path}/{RUN}.rank1.jsonl (failed: ValueError, verified)",
            (
                "  lockstep: yes, 6 unit transitions (the trailing begin_* and fail of a failed "
                "run left out)"
            ),
            "  agreed cancels: 1",
            (
                "    fail of rank 1, taken as fail (epoch 0, batch 2, train); at rank 0 backward, "
                "rank 1 failure; error: 'ValueError: boom'"
            ),
        ]

    def test_json(self, tmp_path, capsys):
        """--json: a "distributed" list, one object per run, its problems among the audit's."""
        fit_cancelled(tmp_path)
        code, document, _ = audit_json(tmp_path, capsys=capsys)
        assert (code, document["verified"], document["problems"]) == (0, True, [])
        [run] = document["distributed"]
        rank_files = [str(tmp_path / f"{RUN}.rank{rank}.jsonl") for rank in (0, 1)]
        assert run == {
            "run_id": RUN,
            "world_size": 2,
            "status": "cancelled",
            "ranks": [
                {
                    "rank": rank,
                    "path": path,
                    "first_line": 1,
                    "status": "cancelled",
                    "verified": True,
                    "killed": False,
                    "failure": None,
                }
                for rank, path in enumerate(rank_files)
            ],
            "missing_ranks": [],
            "missing_count": 0,
            "lockstep": True,
            "unchecked": None,
            "unit_transitions": 6,
            "shorter": {},
            "first_divergence": None,
            "caught": None,
            "agreed": [
                {
                    "cancel": "fit",
                    "rank": 0,
                    "error": None,
                    "taken": {
                        "trigger": "cancel_fit",
                        "epoch": 0,
                        "iter": 1,
                        "pass": "train",
                        "line": 17,
                    },
                    "at": {"0": "end_batch", "1": "end_batch"},
                }
            ],
            "agreed_count": 1,
            "problems": [],
            "verified": True,
        }

    def test_json_of_a_run_that_is_not_lockstep(self, tmp_path, capsys):
        """Exit 1; the divergence in the run's object and among the audit's problems."""
        fit(RankLog(tmp_path, 0), valid=2)
        fit(RankLog(tmp_path, 1), valid=1)
        code, document, _ = audit_json(tmp_path, capsys=capsys)
        assert (code, document["verified"]) == (1, False)
        [run] = document["distributed"]
        assert (run["lockstep"], run["first_divergence"]["index"]) == (False, 12)
        assert document["problems"] == run["problems"]
        assert run["problems"][0].startswith(
            f"distributed run '{RUN}': the ranks are not in lockstep: first divergence at unit "
            "transition 13 (index 12): rank 0: begin_batch (epoch 0, batch 1, valid)"
        )

    def test_no_distributed_key_without_a_distributed_run(self, tmp_path, capsys):
        """A fit on one process: the JSON document has no "distributed" list."""
        fit(RankLog(tmp_path, 0, world_size=None, name="solo.jsonl"))
        code, document, _ = audit_json(tmp_path, capsys=capsys)
        assert (code, document["verified"]) == (0, True)
        assert "distributed" not in document


class TestDiagram:
    def test_the_ranks_drawn_once(self, tmp_path, capsys):
        """Both rank files, or their directory: rank 0's path, the ranks it covers in the title."""
        batch_cancelled(tmp_path)
        files = sorted(tmp_path.iterdir())
        view = run_view(files)
        assert view.title == f"fsm_learner: fit run {RUN} (completed), ranks 0-1 of 2, lockstep"
        assert view.counts == run_view(files[0]).counts
        assert main(["diagram", "--from-log", str(tmp_path), "--format", "dot"]) == 0
        assert capsys.readouterr().out == render_text(view, "dot")
        assert main(["diagram", "--from-log", *map(str, files)]) == 0
        assert capsys.readouterr().out == render_text(view, "mermaid")

    def test_a_failed_run_drawn_from_rank_0(self, tmp_path):
        """Rank 0's extra begin_batch and its failure are drawn."""
        failed_run(tmp_path)
        view = run_view(sorted(tmp_path.iterdir()))
        assert view.title.endswith("(failed), ranks 0-1 of 2, lockstep")
        assert (view.failed_in, view.failure) == ("loss", "RankFailedError")
        assert sum(n for (t, _, _), n in view.counts.items() if t == "begin_batch") == 3

    def test_one_rank_alone(self, tmp_path):
        """One rank's log alone: drawn as that rank's, the title says so."""
        logs = lockstep_run(tmp_path)
        view = run_view(logs[1].path)
        assert view.title == f"fsm_learner: fit run {RUN} (completed), rank 1 of 2 only"

    def test_ranks_not_lockstep(self, tmp_path, capsys):
        """Exit 1, one line naming the first divergence."""
        fit(RankLog(tmp_path, 0), train=4)
        fit(RankLog(tmp_path, 1), train=3)
        assert main(["diagram", "--from-log", str(tmp_path)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            f"fsm-learner diagram: distributed run '{RUN}': the ranks are not in lockstep: first "
            "divergence at unit transition 9 (index 8): rank 0: begin_batch (epoch 0, batch 3, "
            "train) at line 23; rank 1: end_epoch (epoch 0, batch 2, train) at line 23\n"
        )

    def test_a_missing_rank(self, tmp_path, capsys):
        """Two of three ranks given: exit 1, the missing rank named."""
        logs = lockstep_run(tmp_path, world_size=3)
        assert main(["diagram", "--from-log", str(logs[0].path), str(logs[2].path)]) == 1
        assert capsys.readouterr().err == (
            f"fsm-learner diagram: distributed run '{RUN}': rank 1 of 3 missing: no log of "
            "theirs among the files audited\n"
        )

    def test_which_run(self, tmp_path, capsys):
        """Logs ending with different runs need --run-id; a run id none holds is named."""
        fit(RankLog(tmp_path, 0, run_id=RUN, name="x.rank0.jsonl"))
        fit(RankLog(tmp_path, 1, run_id=RUN, name="x.rank1.jsonl"))
        fit(RankLog(tmp_path, 0, run_id=OTHER, name="x.rank0.jsonl"))
        assert main(["diagram", "--from-log", str(tmp_path)]) == 1
        assert capsys.readouterr().err == (
            f"fsm-learner diagram: the logs end with different runs ({RUN}, {OTHER}): choose "
            "one with --run-id\n"
        )
        assert main(["diagram", "--from-log", str(tmp_path), "--run-id", RUN]) == 0
        assert f"%% fsm_learner: fit run {RUN} (completed), ranks 0-1" in capsys.readouterr().out
        assert main(["diagram", "--from-log", str(tmp_path), "--run-id", "nope"]) == 1
        assert capsys.readouterr().err == (
            f"fsm-learner diagram: no run 'nope' in the 2 logs; their runs: {RUN}, {OTHER}\n"
        )

    def test_usage_errors(self, tmp_path, capsys):
        """An empty path, a directory without logs: exit 2, one line."""
        (tmp_path / "empty").mkdir()
        for paths, error in (
            ([""], "'': the empty path names no log"),
            ([str(tmp_path / "empty")], "a directory with no *.jsonl audit log in it"),
        ):
            assert main(["diagram", "--from-log", *paths]) == 2
            err = capsys.readouterr().err
            assert error in err
            assert err.count("\n") == 1


class TestLineagesAcrossRanks:
    def test_each_rank_resumed_from_its_own_log(self, tmp_path, capsys):
        """Both ranks killed after a checkpoint, both resumed: a lineage per rank, both verify."""
        links = []
        for rank in (0, 1):
            log = RankLog(tmp_path, rank)
            log.begin_fit().begin_pass().batches(2)
            links.append(checkpoint(log))
            log.batch(2).kill()
        for rank, link in enumerate(links):
            resumed = RankLog(tmp_path, rank, run_id=OTHER, header={Field.RESUMED_FROM: link})
            resumed.begin_fit().begin_pass()
            resumed.it = 2
            resumed.batches(1, first=2).end_pass()
            resumed.begin_pass(training=False).batches(1).end_pass().end_fit()
        code, out, err = audit(tmp_path, capsys=capsys)
        assert (code, err) == (0, "")
        assert out.count("DOES NOT VERIFY") == 2  # the killed ranks, on their own
        assert "2 lineage(s): 2 verified, 0 do not verify\n" in out
        assert "2 distributed run(s): 2 verified, 0 do not verify\n" in out


def checkpoint(log):
    """Seal the rank's log, note a checkpoint there; return what a resume from it names."""
    log.writer.flush()
    point = {
        "records": log.records,
        "head": log.writer.head,
        "sha256": "a" * 64,
        "at": {"ep": log.epoch, "tr": log.training, "it": log.it + 1},
    }
    log.writer.note("resume_point", {"path": "ckpt.pt", **point}, epoch=0, it=log.it, tr=True)
    log.records += 1
    log.writer.flush()
    return {"run": log.run_id, "path": "ckpt.pt", **point}


SCHEMA = orjson.loads(
    resources.files("fsm_learner.audit").joinpath("record.schema.json").read_bytes()
)
VALIDATOR = Draft202012Validator(SCHEMA)


def agreed_note(**fields):
    """An agreed note as the codec renders it, as data."""
    values = note_fields(AGREED, fields)
    return orjson.loads(Encoder(RUN).note(AGREED, values, epoch=0, it=3, training=True, t_ns=9))


VALID_NOTES = [
    {"cancel": "batch", "rank": 1, "at": "backward"},
    {"cancel": "batch", "rank": 0, "at": "step"},
    {"cancel": "epoch", "rank": 0, "at": "begin_epoch"},
    {"cancel": "fit", "rank": 3, "at": "collective"},
    {"cancel": "fail", "rank": 1, "at": "failure", "error": ERROR},
    {"cancel": "fail", "rank": 2, "at": "open", "error": ERROR},
    {"cancel": "fail", "rank": 1, "at": "end_fit", "error": "x" * MAX_ERROR_CHARS},
]
"""Agreed notes the schema takes (in a world of four, the audit too)."""
INVALID_NOTES = [
    {"cancel": "fail", "rank": 1, "at": "failure"},  # a failure names its error
    {"cancel": "batch", "rank": 1, "at": "backward", "error": ERROR},  # only a failure
    {"cancel": "none", "rank": 1, "at": "backward"},
    {"cancel": "batch", "rank": -1, "at": "backward"},
    {"cancel": "batch", "rank": 1, "at": "predict"},
    {"cancel": "batch", "rank": 1},
    {"cancel": "batch", "rank": 1, "at": "backward", "by": 0},
    {"cancel": "fail", "rank": 1, "at": "failure", "error": "x" * (MAX_ERROR_CHARS + 1)},
]
"""Agreed notes the schema rejects (and so does the audit)."""


class TestTheAgreedNote:
    @pytest.mark.parametrize("fields", VALID_NOTES)
    def test_valid_notes(self, fields):
        """Each cancel, where ranks agree; a failure with its error."""
        assert VALIDATOR.is_valid(agreed_note(**fields))

    @pytest.mark.parametrize("fields", INVALID_NOTES)
    def test_invalid_notes(self, fields):
        """A field missing, of another value, or one too many."""
        assert not VALIDATOR.is_valid(agreed_note(**fields))

    def test_the_schemas_values_are_the_audits(self):
        """cancel and at: the values of Cancel and AgreePoint; the fields: AgreedField."""
        definition = SCHEMA["$defs"]["note_agreed"]
        assert definition["properties"]["cancel"]["enum"] == [c.value for c in Cancel]
        assert definition["properties"]["at"]["enum"] == [a.value for a in AgreePoint]
        assert list(definition["properties"]) == [f.value for f in AgreedField]
        assert definition["properties"]["error"]["maxLength"] == MAX_ERROR_CHARS

    def test_the_learners_vocabulary(self):
        """The learner's proposals are the note's cancels (its places are AgreePoint itself)."""
        from fsm_learner.distributed import Proposal

        assert [p.name.lower() for p in Proposal if p is not Proposal.NONE] == list(Cancel)


def take(log, cancel):
    """Take what an agreed note says (a batch cancel when it says none) and end the fit."""
    if cancel == "fail":
        log.fail("ValueError", "boom")
    elif cancel == "fit":
        log.cancel_fit()
    elif cancel == "epoch":
        log.fire("cancel_epoch", "fit")
        log.begin_pass(training=False).batches(1).end_pass().end_fit()
    else:
        log.fire("cancel_batch", "epoch").batch(2).end_pass().end_fit()


def agreed_then_taken(directory, fields, *, world_size=2):
    """Every rank: an agreed note of ``fields`` in batch 1, after its loss; then ``take`` it."""
    logs = [RankLog(directory, rank, world_size=world_size) for rank in range(world_size)]
    for log in logs:
        log.begin_fit().begin_pass().batch(0).batch(1, upto="compute_loss").note_agreed(fields)
        take(log, fields.get("cancel"))
    return logs


def line_of(path, part):
    """The number of the first line of the file holding ``part``."""
    lines = path.read_bytes().splitlines()
    return next(number for number, line in enumerate(lines, 1) if part in line)


def reasons(report):
    """The report's problems, without the run they are of."""
    return [problem.reason.split(": ", 1)[1] for problem in report.problems]


@pytest.mark.unchecked_records("agreed notes the schema rejects, as a forger writes them")
class TestAgreedNotesChecked:
    @pytest.mark.parametrize("fields", VALID_NOTES + INVALID_NOTES)
    def test_the_audit_takes_what_the_schema_takes(self, tmp_path, fields):
        """Every rank's note, valid or not as the schema says: the audit says the same."""
        logs = agreed_then_taken(tmp_path, fields, world_size=4)
        [report] = distributed(*(log.path for log in logs))
        assert VALIDATOR.is_valid(agreed_note(**fields)) == (not report.problems)
        assert report.lockstep is True

    @pytest.mark.parametrize(
        ("fields", "fault"),
        [
            (
                {"cancel": "banana", "rank": 0, "at": "nowhere"},
                (
                    "cancel 'banana' is not one of batch, epoch, fit, fail; at 'nowhere' is not "
                    "one of open, begin_fit, begin_epoch, forward, backward, step, end_batch, "
                    "end_epoch, end_fit, collective, cancel, failure, close"
                ),
            ),
            (
                {"cancel": "batch", "rank": 7, "at": "backward"},
                "rank 7 is not a rank of a world of 2 (0-1)",
            ),
            (
                {"cancel": "batch", "rank": True, "at": "backward", "by": 0},
                (
                    "fields ['by'] are not an agreed note's (cancel, rank, at, error); rank True "
                    "is not a rank of a world of 2 (0-1)"
                ),
            ),
            (
                {"cancel": "fail", "rank": 1, "at": "failure"},
                "error missing: a fail's note names the failure",
            ),
            (
                {"cancel": "batch", "rank": 1, "at": "backward", "error": ERROR},
                "error 'ValueError: boom' given: only a fail's note has one",
            ),
            (
                {"cancel": "fail", "rank": 1, "at": "failure", "error": ["x"]},
                "error ['x'] is not a str",
            ),
        ],
        ids=["cancel-and-at", "rank", "field-and-rank", "no-error", "error", "error-type"],
    )
    def test_what_a_note_may_not_say(self, tmp_path, fields, fault):
        """Each rank's note that its schema rejects: one line per note, saying what is wrong."""
        logs = agreed_then_taken(tmp_path, fields)
        [report] = distributed(*(log.path for log in logs))
        line = line_of(logs[0].path, b'"name":"agreed"')
        assert reasons(report) == [
            f"rank {rank}'s log, line {line}: agreed note: {fault}" for rank in (0, 1)
        ]
        assert (report.lockstep, report.verified) == (True, False)

    def test_a_note_whose_cancel_is_not_taken(self, tmp_path):
        """A batch cancel agreed, then the batch goes on: its backward is named."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass().batch(0, upto="compute_loss")
            log.agreed(Cancel.BATCH, 1, AgreePoint.BACKWARD)
            log.fire("backward", "backward").fire("step", "step").fire("end_batch", "epoch")
            log.end_pass().end_fit()
        [report] = distributed(*(log.path for log in logs))
        note = line_of(logs[0].path, b'"name":"agreed"')
        assert reasons(report) == [
            f"rank {rank}'s log, line {note}: agreed note of a batch cancel followed by backward "
            f"at line {note + 1}, not by cancel_batch"
            for rank in (0, 1)
        ]

    def test_a_cancel_without_its_note(self, tmp_path):
        """Both ranks take cancel_batch, neither noted an agreement: lockstep, yet named."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass().batch(0, upto="compute_loss")
            log.fire("cancel_batch", "epoch").end_pass().end_fit()
        [report] = distributed(*(log.path for log in logs))
        cancel = line_of(logs[0].path, b'"ev":"cancel_batch"')
        assert report.lockstep is True
        assert reasons(report) == [
            f"rank {rank}'s log, line {cancel}: cancel_batch follows no agreed note: across "
            "ranks, every rank takes a cancel the ranks agreed on, right after its note"
            for rank in (0, 1)
        ]

    def test_a_note_moved_after_its_cancel(self, tmp_path):
        """The note after cancel_batch: the cancel has no note, the note the wrong transition."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass().batch(0).batch(1, upto="compute_loss")
            log.fire("cancel_batch", "epoch").agreed(Cancel.BATCH, 1, AgreePoint.BACKWARD)
            log.batch(2).end_pass().end_fit()
        [report] = distributed(*(log.path for log in logs))
        cancel = line_of(logs[0].path, b'"ev":"cancel_batch"')
        assert reasons(report)[:2] == [
            (
                f"rank 0's log, line {cancel}: cancel_batch follows no agreed note: across ranks, "
                "every rank takes a cancel the ranks agreed on, right after its note"
            ),
            (
                f"rank 0's log, line {cancel + 1}: agreed note of a batch cancel followed by "
                f"begin_batch at line {cancel + 2}, not by cancel_batch"
            ),
        ]

    def test_a_fail_needs_no_note(self, tmp_path):
        """A rank killed, the other fails for its loss without a note: no fault."""
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        for log in (zero, one):
            log.begin_fit().begin_pass().batches(2)
        one.kill()
        zero.fail("RankLostError", "rank 1 stopped answering")
        [report] = distributed(zero.path, one.path)
        assert (report.problems, report.verified) == ([], True)

    def test_a_failure_while_taking_a_cancel(self, tmp_path):
        """A batch cancel agreed, then a failure before it is taken: the fail note covers it."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass().batch(0, upto="compute_loss")
            log.agreed(Cancel.BATCH, 1, AgreePoint.BACKWARD)
            log.agreed(Cancel.FAIL, 0, AgreePoint.FAILURE, ERROR).fail("ValueError", "boom")
        [report] = distributed(*(log.path for log in logs))
        assert (report.problems, report.verified, report.agreed_count) == ([], True, 2)

    def test_a_log_that_ends_after_a_note(self, tmp_path):
        """A killed rank's log may end after its note; a rank that ended may not."""
        zero, one = RankLog(tmp_path, 0), RankLog(tmp_path, 1)
        for log in (zero, one):
            log.begin_fit().begin_pass().batch(0, upto="step").agreed(Cancel.FIT, 0, "end_batch")
        one.kill()
        zero.fire("end_batch", "epoch").end_pass()
        zero.fire("end_fit", "idle").agreed(Cancel.FIT, 0, AgreePoint.END_FIT)
        zero.writer.finish(RunStatus.COMPLETED, hook_ns={})
        [report] = distributed(zero.path, one.path)
        first, last = (
            line
            for line, text in enumerate(zero.path.read_bytes().splitlines(), 1)
            if b'"name":"agreed"' in text
        )
        assert reasons(report)[-2:] == [
            (
                f"rank 0's log, line {first}: agreed note of a fit cancel followed by end_batch at "
                f"line {first + 1}, not by cancel_fit"
            ),
            f"rank 0's log, line {last}: agreed note followed by no transition of the run",
        ]

    def test_the_first_faults_listed(self, tmp_path):
        """Twelve bad notes on each of two ranks: ten listed, then how many more."""
        logs = [RankLog(tmp_path, rank) for rank in (0, 1)]
        for log in logs:
            log.begin_fit().begin_pass()
            for it in range(12):
                log.batch(it, upto="compute_loss").note_agreed({"cancel": "x", "rank": 0})
                log.fire("cancel_batch", "epoch")
            log.end_pass().end_fit()
        [report] = distributed(*(log.path for log in logs))
        found = reasons(report)
        assert len(found) == 11
        assert all(reason.startswith("rank 0's log, line ") for reason in found[:10])
        assert found[10] == "and 14 more faults in the ranks' agreed notes"


LIMITED = textwrap.dedent(
    """
    import contextlib, io, json, resource, sys

    name, soft = sys.argv[1], int(sys.argv[2])
    limit = getattr(resource, name)
    hard = resource.getrlimit(limit)[1]
    resource.setrlimit(limit, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    from fsm_learner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(sys.argv[3:])
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}))
    """
)
needs_resource = pytest.mark.skipif(sys.platform == "win32", reason="no resource limits")


def limited(limit, soft, *args):
    """Run the command in a fresh interpreter, its resource ``limit`` lowered to ``soft``."""
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, limit, str(soft), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


class TestLargeWorlds:
    @needs_resource
    def test_a_world_size_far_above_the_limit(self, tmp_path):
        """world_size 10**18 on both ranks: a header problem, found at once, in 2 GiB."""
        for rank in (0, 1):
            fit(RankLog(tmp_path, rank, world_size=10**18))
        problem = (
            f"distributed run '{RUN}': rank 0's header field 'world_size' must be an int from 2 "
            f"to {MAX_WORLD_SIZE} (MAX_WORLD_SIZE), got {10**18}"
        )
        audited = limited("RLIMIT_AS", 2 << 30, "audit", tmp_path)
        assert (audited["code"], audited["err"]) == (1, f"fsm-learner audit: {problem}\n")
        assert (
            f"distributed run {RUN}: world size unknown (no header says a valid one), ranks 0-1, "
            "completed  DOES NOT VERIFY\n"
        ) in audited["out"]
        drawn = limited("RLIMIT_AS", 2 << 30, "diagram", "--from-log", tmp_path)
        assert (drawn["code"], drawn["err"]) == (1, f"fsm-learner diagram: {problem}\n")

    def test_a_world_size_one_above_the_limit(self, tmp_path):
        """MAX_WORLD_SIZE + 1: refused, the value and the limit named; no rank is missing."""
        assert MAX_WORLD_SIZE == 1 << 20
        for rank in (0, 1):
            fit(RankLog(tmp_path, rank, world_size=MAX_WORLD_SIZE + 1))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert (report.world_size, report.missing, report.lockstep) == (None, [], True)
        assert reasons(report) == [
            f"rank {rank}'s header field 'world_size' must be an int from 2 to 1048576 "
            "(MAX_WORLD_SIZE), got 1048577"
            for rank in (0, 1)
        ]

    def test_missing_ranks_as_ranges(self, tmp_path, capsys):
        """Ranks 0 and 1 of a world of MAX_WORLD_SIZE: one range missing, said in one line."""
        for rank in (0, 1):
            fit(RankLog(tmp_path, rank, world_size=MAX_WORLD_SIZE))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        last = MAX_WORLD_SIZE - 1
        assert (report.missing, report.missing_count) == ([(2, last)], MAX_WORLD_SIZE - 2)
        assert reasons(report) == [
            f"ranks 2-{last} of {MAX_WORLD_SIZE} missing: no log of theirs among the files audited"
        ]
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            f"distributed run {RUN}: world size {MAX_WORLD_SIZE}, ranks 0-1 (missing: 2-{last}), "
            "completed  DOES NOT VERIFY\n"
        ) in out
        _, document, _ = audit_json(tmp_path, capsys=capsys)
        [run] = document["distributed"]
        assert (run["missing_ranks"], run["missing_count"]) == ([[2, last]], MAX_WORLD_SIZE - 2)

    def test_scattered_missing_ranks(self, tmp_path, capsys):
        """Every odd rank of 40 missing: ten ranges listed, then how many more ranks."""
        for rank in range(0, 40, 2):
            fit(RankLog(tmp_path, rank, world_size=40), train=1, valid=1)
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert report.missing == [(rank, rank) for rank in range(1, 40, 2)]
        assert reasons(report) == [
            (
                "ranks 1, 3, 5, 7, 9, 11, 13, 15, 17, 19 and 10 more of 40 missing: no log of "
                "theirs among the files audited"
            )
        ]
        _, out, _ = audit(tmp_path, capsys=capsys)
        assert (
            f"distributed run {RUN}: world size 40, ranks 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 and "
            "10 more (missing: 1, 3, 5, 7, 9, 11, 13, 15, 17, 19 and 10 more), completed  "
            "DOES NOT VERIFY\n"
        ) in out

    def test_ranges(self):
        """Ranks in order as ranges of consecutive ranks; ranges said as few words."""
        assert rank_ranges([0, 1, 2, 4, 6, 7]) == [(0, 2), (4, 4), (6, 7)]
        assert rank_ranges([]) == []
        assert ranges_text([(0, 2), (4, 4), (6, 7)]) == "0-2, 4, 6-7"
        assert ranges_text([(0, 0), (2, 5), (9, 9)], listed=1) == "0 and 5 more"
        assert ranges_text([]) == "none"


def ranks_json(directory):
    """The audit's report of the distributed run in ``directory``, as data."""
    [report] = distributed(*sorted(directory.iterdir()))
    return report.to_json()


class TestManyRanks:
    @needs_resource
    def test_more_ranks_than_files_open(self, tmp_path):
        """200 ranks, 64 files open at most: compared in groups, the run verifies."""
        lockstep_run(tmp_path, world_size=200, train=2, valid=1)
        found = limited("RLIMIT_NOFILE", 64, "audit", tmp_path)
        assert (found["code"], found["err"]) == (0, "")
        assert (
            f"distributed run {RUN}: world size 200, ranks 0-199, completed  verified\n  rank 0: "
        ) in found["out"]
        assert "  lockstep: yes, 12 unit transitions\n" in found["out"]

    @needs_resource
    def test_a_divergence_among_more_ranks_than_files_open(self, tmp_path):
        """Rank 150 of 200 ran one batch fewer: named, with what every rank took there."""
        for rank in range(200):
            fit(RankLog(tmp_path, rank, world_size=200), train=2 if rank == 150 else 3, valid=1)
        found = limited("RLIMIT_NOFILE", 64, "audit", tmp_path)
        [report] = distributed(*sorted(tmp_path.iterdir()))  # all 200 files open at once
        [problem] = report.all_problems()
        assert (found["code"], found["err"]) == (1, f"fsm-learner audit: {problem}\n")
        assert str(report.divergence).startswith(
            "unit transition 7 (index 6): rank 0: begin_batch (epoch 0, batch 2, train) at line "
            "17; rank 1: begin_batch"
        )
        assert "; rank 150: end_epoch (epoch 0, batch 1, train) at line 17; " in found["err"]
        assert found["err"].count("begin_batch (epoch 0, batch 2, train)") == 199

    @pytest.mark.parametrize("at_once", [2, 3, 5])
    def test_groups_read_as_all_at_once(self, tmp_path, monkeypatch, at_once):
        """Few files open at once: the same report as all at once, whatever the run."""
        runs = {
            "lockstep": lambda d: lockstep_run(d, world_size=7, train=2, valid=1),
            "cancel": lambda d: agreed_then_taken(d, VALID_NOTES[0], world_size=7),
            "diverged": lambda d: [
                fit(RankLog(d, rank, world_size=7), train=2 if rank == 5 else 3)
                for rank in range(7)
            ],
            "killed": killed_ranks,
            "all-killed": lambda d: killed_ranks(d, everyone=True),
        }
        for name, make in runs.items():
            directory = tmp_path / name
            directory.mkdir()
            make(directory)
            expected = ranks_json(directory)
            monkeypatch.setattr(ranks_module, "_files_at_once", lambda: at_once)
            assert ranks_json(directory) == expected, name
            monkeypatch.undo()


def killed_ranks(directory, *, everyone=False):
    """Six ranks, each killed after another number of batches (rank 0 fails, unless all)."""
    logs = [RankLog(directory, rank, world_size=6) for rank in range(6)]
    for batches, log in zip([6, 2, 5, 1, 4, 3], logs, strict=True):
        log.begin_fit().begin_pass().batches(batches)
    for log in logs[0 if everyone else 1 :]:
        log.kill()
    if not everyone:
        logs[0].fail("RankLostError", "ranks lost")
    logs[4].batch(9)  # killed, yet a batch the others never took: diverged
    return logs


class TestWhatTheSummarySays:
    @pytest.mark.unchecked_records("a header's rank the schema rejects")
    @pytest.mark.parametrize(
        ("rank", "said"), [("1", "'1'"), (True, "True"), (1.5, "1.5"), (-1, "-1")]
    )
    def test_a_header_rank_that_is_no_rank(self, tmp_path, capsys, rank, said):
        """Rank 1's header says another rank: shown as it says it, rank 1 named missing."""
        fit(RankLog(tmp_path, 0))
        path = fit(RankLog(tmp_path, rank, name=f"{RUN}.rank1.jsonl")).path
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert f"distributed run {RUN}: world size 2, ranks 0 (missing: 1), completed  " in out
        assert (
            f"  problem: distributed run '{RUN}': {path}: rank {said} is not a rank of a world of "
            "2 (0-1)\n"
            f"  problem: distributed run '{RUN}': rank 1 of 2 missing: its log {path} holds this "
            f"run's rank {said} instead\n"
        ) in out

    @pytest.mark.unchecked_records("a header's world_size the schema rejects")
    def test_world_size_one_on_every_rank(self, tmp_path, capsys):
        """No header says a valid world size: unknown, and no rank is out of it."""
        for rank in (0, 1):
            fit(RankLog(tmp_path, rank, header={Field.WORLD_SIZE: 1}))
        [report] = distributed(*sorted(tmp_path.iterdir()))
        assert reasons(report) == [
            f"rank {rank}'s header field 'world_size' must be an int from 2 to 1048576 "
            "(MAX_WORLD_SIZE), got 1"
            for rank in (0, 1)
        ]
        _, out, _ = audit(tmp_path, capsys=capsys)
        assert (
            f"distributed run {RUN}: world size unknown (no header says a valid one), ranks 0-1, "
            "completed  DOES NOT VERIFY\n"
        ) in out

    def test_a_keyed_run_without_its_key(self, tmp_path, capsys, monkeypatch):
        """Its ranks' logs not read: the run's status unknown, not truncated."""
        for rank in (0, 1):
            fit(RankLog(tmp_path, rank, key=derive_key("s3cret")))
        monkeypatch.setenv(KEY_ENV, "s3cret")
        assert audit(tmp_path, capsys=capsys)[0] == 0
        monkeypatch.delenv(KEY_ENV)
        _, out, _ = audit(tmp_path, capsys=capsys)
        assert (
            f"distributed run {RUN}: world size 2, ranks 0-1, status unknown  DOES NOT VERIFY\n"
        ) in out
        _, document, _ = audit_json(tmp_path, capsys=capsys)
        assert document["distributed"][0]["status"] is None
