"""The ranks of a fit across processes: `fsm-learner audit` checks them together.

The logs are real: written by the audit writer as the learner writes a rank's log
(``<run>.rank<r>.jsonl``, its header naming the rank and the world size; transitions
queued on ``writer.pending``; ``agreed`` notes right before the transitions the ranks
agreed on), one writer per rank.
"""

from __future__ import annotations

import time
from importlib import resources

import orjson
import pytest
from audit_logs import reseal, spaced
from jsonschema import Draft202012Validator

from fsm_learner.audit.codec import Encoder, FailureField, Field, RunStatus, note_fields
from fsm_learner.audit.ranks import (
    AGREED,
    MAX_ERROR_CHARS,
    UNIT_TRIGGERS,
    AgreedAt,
    AgreedField,
    Cancel,
    DistributedRuns,
    check_ranks,
)
from fsm_learner.audit.replay import FileAudit
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
        self, directory, rank, *, run_id=RUN, world_size=2, n_epochs=1, name=None, header=None
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
        self.writer = AuditWriter(self.path, run_id=run_id, key=None, header=fields)
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
        note = {str(k): v for k, v in fields.items()}
        self.writer.note(AGREED, note, epoch=self.epoch, it=self.it, tr=self.training)
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
        log.agreed(Cancel.BATCH, 1, AgreedAt.BACKWARD).fire("cancel_batch", "epoch")
        log.batch(2).end_pass().end_fit()
    return logs


def fit_cancelled(directory):
    """Rank 0 cancels the fit in batch 1; both ranks take cancel_fit at the batch's end."""
    logs = [RankLog(directory, rank) for rank in (0, 1)]
    for log in logs:
        log.begin_fit().begin_pass().batch(0).batch(1, upto="step")
        log.agreed(Cancel.FIT, 0, AgreedAt.END_BATCH).cancel_fit()
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
    one.agreed(Cancel.FAIL, 1, AgreedAt.FAILURE, ERROR).fail("ValueError", "boom")
    zero.batch(2, upto="compute_loss").agreed(Cancel.FAIL, 1, AgreedAt.BACKWARD, ERROR)
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
            log.agreed(Cancel.FIT, proposer, AgreedAt.END_BATCH).cancel_fit()
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
        logs[0].agreed(Cancel.FIT, 0, AgreedAt.END_BATCH)
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
        assert (report.missing, report.lockstep, report.verified) == ([2], True, False)
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
        """Rank 0 of one run, rank 1 of another: two runs, each missing a rank, named."""
        fit(RankLog(tmp_path, 0, run_id=RUN))
        fit(RankLog(tmp_path, 1, run_id=OTHER))
        reports = distributed(*sorted(tmp_path.iterdir()))
        assert [(r.run_id, r.missing, r.lockstep) for r in reports] == [
            (RUN, [1], None),
            (OTHER, [0], None),
        ]
        assert str(reports[0].problems[-1]) == (
            f"distributed run '{RUN}': the missing ranks' logs are of other runs ('{OTHER}'): "
            "run ids mixed?"
        )
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "  lockstep: not checked (fewer than two ranks' logs)\n" in out

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


class TestTheAgreedNote:
    @pytest.mark.parametrize(
        "fields",
        [
            {"cancel": "batch", "rank": 1, "at": "backward"},
            {"cancel": "epoch", "rank": 0, "at": "begin_epoch"},
            {"cancel": "fit", "rank": 3, "at": "collective"},
            {"cancel": "fail", "rank": 1, "at": "failure", "error": ERROR},
            {"cancel": "fail", "rank": 1, "at": "end_fit", "error": "x" * MAX_ERROR_CHARS},
        ],
    )
    def test_valid_notes(self, fields):
        """Each cancel, where ranks agree; a failure with its error."""
        assert VALIDATOR.is_valid(agreed_note(**fields))

    @pytest.mark.parametrize(
        "fields",
        [
            {"cancel": "fail", "rank": 1, "at": "failure"},  # a failure names its error
            {"cancel": "batch", "rank": 1, "at": "backward", "error": ERROR},  # only a failure
            {"cancel": "none", "rank": 1, "at": "backward"},
            {"cancel": "batch", "rank": -1, "at": "backward"},
            {"cancel": "batch", "rank": 1, "at": "predict"},
            {"cancel": "batch", "rank": 1},
            {"cancel": "batch", "rank": 1, "at": "backward", "by": 0},
            {"cancel": "fail", "rank": 1, "at": "failure", "error": "x" * (MAX_ERROR_CHARS + 1)},
        ],
    )
    def test_invalid_notes(self, fields):
        """A field missing, of another value, or one too many."""
        assert not VALIDATOR.is_valid(agreed_note(**fields))

    def test_the_schemas_values_are_the_audits(self):
        """cancel and at: the values of Cancel and AgreedAt; the fields: AgreedField."""
        definition = SCHEMA["$defs"]["note_agreed"]
        assert definition["properties"]["cancel"]["enum"] == [c.value for c in Cancel]
        assert definition["properties"]["at"]["enum"] == [a.value for a in AgreedAt]
        assert list(definition["properties"]) == [f.value for f in AgreedField]
        assert definition["properties"]["error"]["maxLength"] == MAX_ERROR_CHARS

    def test_the_learners_vocabulary(self):
        """The learner's proposals and agreement points are the note's cancels and places."""
        from fsm_learner.distributed import AgreePoint, Proposal

        assert [p.name.lower() for p in Proposal if p is not Proposal.NONE] == list(Cancel)
        assert {point.value for point in AgreePoint} == set(AgreedAt)
