"""audit/runlog.py: one run's records in order, and its passes, from real runs' logs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from audit_logs import SharedFile, training_blocks
from helpers import digits_dls, mlp

from callbacks import MetricsCB
from fsm_learner import Callback, CancelEpochException, CancelFitException, Learner
from fsm_learner.audit import runlog
from fsm_learner.audit.codec import decode
from fsm_learner.audit.runlog import PassSpan, Step, Steps, passes, read_run, read_runs
from fsm_learner.machine import Trigger


def _learner(log, cbs=()):
    torch.manual_seed(0)
    dls = digits_dls(batch_size=200, n_train=600, n_valid=200)
    return Learner(mlp(), dls, F.cross_entropy, 0.1, [MetricsCB(), *cbs], audit_log=log)


class _CancelEpoch(Callback):
    """Cancel the first training pass at its second batch."""

    def before_batch(self, learn):
        if learn.training and learn.epoch == 0 and learn.iter == 1:
            raise CancelEpochException


class _CancelFit(Callback):
    """Cancel the fit in epoch 1's validation pass, at its first batch."""

    def after_batch(self, learn):
        if not learn.training and learn.epoch == 1:
            raise CancelFitException


class _Fails(Callback):
    """Fail in epoch 0's training pass, at its third batch."""

    def after_loss(self, learn):
        if learn.training and learn.iter == 2:
            msg = "bad batch"
            raise ValueError(msg)


class TestReadRuns:
    """Every record of a run is read, in order, run by run."""

    def test_a_completed_fit(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(2)
        runs = read_runs(log)
        assert list(runs) == [learn.run_id]
        run = runs[learn.run_id]
        assert run.header["n_epochs"] == 2
        assert run.header["seed"] == 0
        assert run.footer is not None
        assert run.footer.status == "completed"
        counts = {
            trigger: sum(1 for s in run.steps if s.trigger == trigger)
            for trigger in {s.trigger for s in run.steps}
        }
        footer_counts = {t: sum(c) for t, c in run.footer.counts.items() if sum(c)}
        assert counts == footer_counts
        assert [s.trigger for s in run.steps[:3]] == ["begin_fit", "begin_epoch", "begin_batch"]
        assert run.steps[-1].trigger == Trigger.END_FIT
        times = [s.t_ns for s in run.steps]
        assert times == sorted(times)
        assert run.start_ns is not None
        assert run.start_ns <= times[0]
        metrics = [n for n in run.notes if n.name == "metrics"]
        assert [(n.epoch, n.training) for n in metrics] == [
            (0, True),
            (0, False),
            (1, True),
            (1, False),
        ]

    def test_two_runs_in_one_file_and_a_wanted_one(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(1)
        first = learn.run_id
        learn.fit(1)
        runs = read_runs(log)
        assert list(runs) == [first, learn.run_id]
        assert list(read_runs(log, {first})) == [first]
        assert len(read_runs(log, {first})[first].steps) == len(runs[first].steps)

    def test_lines_that_do_not_decode_are_passed_over(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(1)
        whole = read_runs(log)[learn.run_id]
        lines = log.read_bytes().splitlines(keepends=True)
        log.write_bytes(b"".join([lines[0], b"{not json\n", b"[1,2]\n", *lines[1:]]))
        again = read_runs(log)[learn.run_id]
        assert list(again.steps) == list(whole.steps)
        assert again.notes == whole.notes

    def test_a_second_run_with_the_same_id_is_never_mixed_into_the_first(self, tmp_path):
        """A forged copy of a run (same id) after it: each is read on its own, by its line."""
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(1)
        data = log.read_bytes()
        log.write_bytes(data + data)  # the audit refuses the copy; the reader keeps them apart
        lines = len(data.splitlines())
        first = read_runs(log)[learn.run_id]
        assert first.first_line == 1
        assert first.repeated
        whole = read_run(log, learn.run_id, 1)
        copy = read_run(log, learn.run_id, lines + 1)
        assert (copy.first_line, copy.repeated) == (lines + 1, True)
        assert list(whole.steps) == list(copy.steps) == list(first.steps)
        assert len(whole.notes) == len(copy.notes) == 2  # train and valid metrics, not 4
        assert len(read_run(log, learn.run_id, 2).steps) == len(read_run(log, "nope", 1).steps) == 0

    def test_records_after_a_runs_footer_are_not_its_own(self, tmp_path):
        """A line of a run's id after its footer (no header before it) belongs to no run."""
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(1)
        run = read_runs(log)[learn.run_id]
        lines = log.read_bytes().splitlines(keepends=True)
        transition = next(line for line in lines if b'"ev":"begin_batch"' in line)
        log.write_bytes(b"".join(lines) + transition)
        assert list(read_runs(log)[learn.run_id].steps) == list(run.steps)


class TestBulkReading:
    """One run wanted: its transition lines read in bulk, the same as line by line."""

    def test_bulk_and_line_by_line_agree_on_a_real_fit(self, tmp_path, monkeypatch):
        decoded = []
        monkeypatch.setattr(runlog, "decode", lambda line: decoded.append(line) or decode(line))
        log = tmp_path / "runs.jsonl"
        learn = _learner(log, [_CancelEpoch()])
        learn.fit(2)
        first = learn.run_id
        learn.fit(1)
        for run_id in (first, learn.run_id):
            by_line = read_runs(log)[run_id]  # several runs wanted: line by line
            decoded.clear()
            bulk = read_runs(log, {run_id})[run_id]
            assert list(bulk.steps) == list(by_line.steps)
            assert len(bulk.steps) > 10
            mine = f'"run":"{run_id}"'.encode()
            transitions = sum(1 for line in decoded if b'"src"' in line and mine in line)
            assert transitions < len(bulk.steps) / 4  # the rest were read in bulk
            assert bulk.notes == by_line.notes
            assert bulk.footer == by_line.footer

    def test_blocks_of_two_runs_interleaved(self, tmp_path):
        """A file two writers share: each run's lines are its own, whatever the reading."""
        shared = SharedFile()
        blocks = {run: training_blocks(run, 30, block=7) for run in ("aaaa", "bbbb")}
        for pair in itertools.zip_longest(*blocks.values()):
            for run, block in zip(blocks, pair, strict=True):
                if block is not None:
                    shared.append(run, block)
        log = tmp_path / "shared.jsonl"
        log.write_bytes(bytes(shared.data))
        both = read_runs(log)
        for run, written in blocks.items():
            alone = read_runs(log, {run})[run]
            assert list(alone.steps) == list(both[run].steps)
            assert len(alone.steps) == sum(
                1 for block in written for line in block if b'"src"' in line
            )


class TestSteps:
    """Transitions held as arrays read back as the Steps they were."""

    def test_round_trip_slices_and_huge_numbers(self):
        steps = Steps()
        made = [
            Step("begin_batch", "epoch", "batch", True, 0, 3, 10),
            Step("predict", "batch", "predict", False, 2**70, -(2**70), 2**63),
        ]
        for step in made:
            steps.append(step)
        assert len(steps) == 2
        assert steps[0] == made[0]
        assert steps[1] == Step(
            "predict", "batch", "predict", False, 2**63 - 1, -(2**63 - 1), 2**63 - 1
        )
        assert steps[-1] == steps[1]
        assert steps[0:1] == [made[0]]
        assert list(steps) == [steps[0], steps[1]]


class TestPasses:
    """Each pass: when it began and ended, its batches, and how it ended."""

    def test_completed_passes(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(2)
        spans = list(passes(read_runs(log)[learn.run_id]))
        assert [(p.epoch, p.training, p.batches, p.ended) for p in spans] == [
            (0, True, 3, "completed"),
            (0, False, 1, "completed"),
            (1, True, 3, "completed"),
            (1, False, 1, "completed"),
        ]
        assert all(p.start_ns < p.end_ns for p in spans)
        assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(spans))

    def test_a_cancelled_pass_and_a_cancelled_fit(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log, [_CancelEpoch(), _CancelFit()])
        learn.fit(3)
        spans = list(passes(read_runs(log)[learn.run_id]))
        assert [(p.epoch, p.training, p.batches, p.ended) for p in spans] == [
            (0, True, 2, "cancelled"),
            (0, False, 1, "completed"),
            (1, True, 3, "completed"),
            (1, False, 1, Trigger.CANCEL_FIT.value),
        ]

    def test_a_failed_pass(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log, [_Fails()])
        with pytest.raises(ValueError, match="bad batch"):
            learn.fit(1)
        spans = list(passes(read_runs(log)[learn.run_id]))
        assert [(p.epoch, p.training, p.batches, p.ended) for p in spans] == [
            (0, True, 3, Trigger.FAIL.value)
        ]

    def test_a_truncated_log_leaves_the_pass_open(self, tmp_path):
        log = tmp_path / "runs.jsonl"
        learn = _learner(log)
        learn.fit(1)
        run = read_runs(log)[learn.run_id]
        cut = next(i for i, s in enumerate(run.steps) if s.trigger == "end_epoch")
        run.steps = run.steps[:cut]
        (span,) = passes(run)
        assert span == PassSpan(0, True, run.steps[1].t_ns, run.steps[-1].t_ns, 3, 0, "open")
