"""The audit log of real runs, and `fsm-learner audit` verifying (or rejecting) it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest
import structlog
import torch
import torch.nn.functional as F
from audit_logs import (
    BATCH,
    VALID_BATCH,
    SharedFile,
    header_line,
    inference_blocks,
    reseal,
    run_lines,
    seal_blocks,
    spaced,
    tiny_run,
    training_blocks,
    training_run,
)
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
    RunKind,
    RunStatus,
    Trigger,
)
from fsm_learner._display import shown
from fsm_learner.audit import replay
from fsm_learner.audit import writer as writer_module
from fsm_learner.audit.codec import (
    Encoder,
    Field,
    Footer,
    Header,
    RecordError,
    Seal,
    Transition,
    decode,
    route_keys,
)
from fsm_learner.audit.replay import FileAudit, Work, audit_file
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


def lines_of(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def is_seal(line: bytes) -> bool:
    try:
        return isinstance(decode(line), Seal)
    except Exception:
        return False


def block_of(content: list[bytes], index: int) -> tuple[int, int]:
    """The first line and the seal line (1-based) of the block that holds line ``index``."""
    first = index
    while first > 0 and not is_seal(content[first - 1]):
        first -= 1
    seal = index
    while not is_seal(content[seal]):
        seal += 1
    return first + 1, seal + 1


def transition_at(content: list[bytes], trigger: str, nth: int = 0) -> int:
    """The index of the ``nth`` line that is a transition by ``trigger``."""
    found = [
        i
        for i, line in enumerate(content)
        if not is_seal(line) and orjson.loads(line).get(Field.EVENT.value) == trigger
    ]
    return found[nth]


class TestRealRunsVerify:
    @pytest.mark.parametrize(
        ("plan", "status", "cancels"),
        [
            ({}, RunStatus.COMPLETED, (0, 0, 0)),
            ({(H.AFTER_LOSS, 2): CancelBatchException}, RunStatus.COMPLETED, (1, 0, 0)),
            ({(H.AFTER_STEP, 1): CancelEpochException}, RunStatus.COMPLETED, (0, 1, 0)),
            ({(H.BEFORE_BATCH, 4): CancelFitException}, RunStatus.CANCELLED, (0, 0, 1)),
            ({(H.AFTER_PREDICT, 3): Boom}, RunStatus.FAILED, (0, 0, 0)),
            (  # cancel_fit, then fail from idle: a failed run still ends with fail
                {(H.BEFORE_BATCH, 4): CancelFitException, (H.AFTER_CANCEL_FIT, 1): Boom},
                RunStatus.FAILED,
                (0, 0, 1),
            ),
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
        assert sum(report.time_by_work_ns.values()) == report.wall_ns
        assert min(report.time_by_work_ns.values()) >= 0

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
        """A real digits run: the summary shows epochs, batches and where the time went."""
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.1)
        result = learn.fit(2)
        code, out, err = audit(str(result.audit_path), "--expect-head", result.head, capsys=capsys)
        assert (code, err) == (0, "")
        assert (
            "\n  fit run: epochs 2, batches 44 train / 14 valid, cancels: batch 0, epoch 0, fit 0"
            in out
        )
        assert "where the time went" in out
        for work in Work:
            assert f" {work.value} " in out
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

    def test_the_summary_says_whether_the_chain_is_keyed(self, capsys, monkeypatch):
        """Unkeyed, anyone can recompute the seals: text and JSON say which chain a run has."""
        for key, chain in ((None, "unkeyed chain"), ("s3cret", "keyed chain")):
            learn, result = fit(audit_key=key)
            monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", key or "")
            code, out, _ = audit(str(learn.audit_path), capsys=capsys)
            assert code == 0
            assert f", head {result.head} ({chain})\n" in out
            code, out, _ = audit("--json", str(learn.audit_path), capsys=capsys)
            assert orjson.loads(out)["runs"][0]["keyed"] is (key is not None)

    def test_audit_log_none_writes_nothing(self, tmp_path):
        """audit_log=None turns the log off."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=None)
        result = learn.fit(1)
        assert (result.audit_path, result.head, learn.audit_path) == (None, None, None)
        assert not (tmp_path / "runs").exists()


# -- validate and predict runs ------------------------------------------------------------

INFER = {"validate": RunKind.VALIDATE, "get_preds": RunKind.PREDICT}


def infer(run: str, plan=None, *, dls=None, **kwargs):
    """A real validate or predict run (``run`` names the method) with a Raiser; the learner."""
    learn = Learner(
        mlp(), dls or digits_dls(), F.cross_entropy, 0.1, [Raiser(plan or {})], **kwargs
    )
    with contextlib.suppress(Boom):
        getattr(learn, run)()
    return learn


def relabelled(path: Path, kind: str | None) -> bytes:
    """A log whose header says another kind (None: no kind at all), its seals recomputed."""
    content = lines(path)
    header = orjson.loads(content[0])
    if kind is None:
        del header[Field.KIND.value]
    else:
        header[Field.KIND.value] = kind
    content[0] = orjson.dumps(header) + b"\n"
    return reseal(b"".join(content))


class TestInferenceRuns:
    @pytest.mark.parametrize("run", list(INFER))
    def test_a_real_run_verifies(self, run, capsys):
        """learn.validate() and learn.get_preds() on the digits: verified, their kind shown."""
        learn = infer(run)
        [report], problem = audit_file(learn.audit_path)
        assert problem is None
        assert report.verified, report.problem
        assert (report.kind, report.status) == (INFER[run], RunStatus.COMPLETED)
        assert (report.epochs, report.batches) == (0, (0, 7))  # 397 digits in batches of 64
        assert report.transitions == learn.seq
        assert report.head == learn.audit_head
        assert report.header[Field.OPTIMIZER.value] is None
        assert report.header[Field.N_EPOCHS.value] == 0
        assert sum(report.time_by_work_ns.values()) == report.wall_ns
        code, out, err = audit(str(learn.audit_path), capsys=capsys)
        assert (code, err) == (0, "")
        kind = INFER[run].value
        assert f"\n  {kind} run: batches 7, cancels: batch 0, epoch 0, fit 0, notes 0\n" in out
        code, out, _ = audit("--json", str(learn.audit_path), capsys=capsys)
        [found] = orjson.loads(out)["runs"]
        assert (found["kind"], found["verified"], found["batches"]) == (
            kind,
            True,
            {"train": 0, "valid": 7},
        )

    @pytest.mark.parametrize("run", list(INFER))
    def test_the_counts_are_the_learners(self, run):
        """Per trigger, the audit counts what the learner did; a predict run computes no loss."""
        learn = infer(run)
        [report], _ = audit_file(learn.audit_path)
        assert dict(report.counts) == {k: n for k, n in learn.counts.items() if n}
        assert (report.counts["compute_loss", False] == 7) == (run == "validate")
        assert report.counts["begin_fit", False] == report.counts["backward", True] == 0

    def test_where_a_validate_runs_time_went(self):
        """A validate run's pass is validation work, as a fit's validation pass."""
        [report], _ = audit_file(infer("validate").audit_path)
        work = report.time_by_work_ns
        assert work[Work.VALIDATION] > 0
        assert work[Work.FORWARD] == work[Work.DATA] == work[Work.LOSS] == 0

    def test_where_a_predict_runs_time_went(self):
        """A predict run's forward is forward; the rest of its pass, validation."""
        [report], _ = audit_file(infer("get_preds").audit_path)
        work = report.time_by_work_ns
        assert work[Work.FORWARD] > 0
        assert work[Work.DATA] == work[Work.LOSS] == work[Work.BACKWARD] == 0

    @pytest.mark.parametrize("run", list(INFER))
    @pytest.mark.parametrize(
        ("plan", "cancels"),
        [
            ({(H.AFTER_BATCH, 2): CancelEpochException}, {"cancel_epoch": 1}),
            ({(H.BEFORE_EPOCH, 1): CancelEpochException}, {"cancel_epoch": 1}),
            ({(H.AFTER_PREDICT, 3): CancelFitException}, {"cancel_fit": 1}),
        ],
        ids=["epoch-in-a-batch", "epoch-before-any", "fit"],
    )
    @pytest.mark.filterwarnings("ignore::fsm_learner.PartialResultWarning")  # cancelled on purpose
    def test_a_cancelled_run_verifies_as_cancelled(self, run, plan, cancels, capsys):
        """A cancel from a callback ends the run in idle: it audits OK, as cancelled."""
        learn = infer(run, plan)
        [report], _ = audit_file(learn.audit_path)
        assert report.verified, report.problem
        assert report.status is RunStatus.CANCELLED
        assert {k: v for k, v in report.cancels.items() if v} == cancels
        assert report.last_state == "idle"
        code, out, _ = audit(str(learn.audit_path), capsys=capsys)
        assert code == 0
        assert "  cancelled  verified\n" in out

    def test_a_failed_predict_run_says_where(self, capsys):
        """A predict run failing in a batch: verified, failed in its predict pass."""
        learn = infer("get_preds", {(H.AFTER_PREDICT, 2): Boom})
        code, out, _ = audit(str(learn.audit_path), capsys=capsys)
        assert code == 0
        assert "  failed  verified\n" in out
        assert "(hook after_predict of Raiser), epoch 0, iter 1, predict pass" in out

    def test_a_slow_cleanup_hook_verifies(self):
        """cleanup_batch runs after end_batch changed state: its time fits where it ran.

        end_batch's hook time (after_batch in the batch's last state, cleanup_batch in
        epoch) is one number in the footer; it fills its source's time first, then epoch's.
        """

        class SlowCleanup(Callback):
            def cleanup_batch(self, learn):
                time.sleep(0.002)

        for run in ("fit", "validate", "get_preds"):
            learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [SlowCleanup()])
            getattr(learn, run)(*(1,) if run == "fit" else ())
            [report], _ = audit_file(learn.audit_path)
            assert report.verified, (run, report.problem)
            work = report.time_by_work_ns
            assert work[Work.HOOKS] >= (5 if run == "fit" else 2) * 2_000_000
            assert min(work.values()) >= 0
            assert sum(work.values()) == report.wall_ns


@pytest.mark.unchecked_records("headers and footers forged, seals recomputed")
class TestInferenceLogsForged:
    @pytest.mark.parametrize("kind", ["fit", None], ids=["fit", "absent"])
    def test_an_inference_log_claiming_to_be_a_fit(self, kind, tmp_path):
        """A validate run's records under a fit's header: illegal at its first begin_epoch."""
        learn = infer("validate", dls=batches_dls(1, 2))
        (tmp_path / "x.jsonl").write_bytes(relabelled(learn.audit_path, kind))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.line == 2
        assert report.problem.reason == (
            "illegal transition begin_epoch: idle -> epoch in a fit run (training=False); from "
            "idle it may take begin_fit -> fit, fail -> idle"
        )

    def test_a_predict_log_with_a_compute_loss(self, tmp_path):
        """A validate run's records under a predict header: its first compute_loss is illegal."""
        learn = infer("validate", dls=batches_dls(1, 2))
        (tmp_path / "x.jsonl").write_bytes(relabelled(learn.audit_path, "predict"))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        content = lines(learn.audit_path)
        assert report.problem.line == transition_at(content, "compute_loss") + 1
        assert report.problem.reason == (
            "illegal transition compute_loss: predict -> loss in a predict run (training=False); "
            "from predict it may take end_batch -> epoch, cancel_batch -> epoch, cancel_epoch -> "
            "idle, cancel_fit -> idle, fail -> idle"
        )
        (tmp_path / "spaced.jsonl").write_bytes(spaced_log(learn.audit_path.read_bytes()))
        (tmp_path / "spaced.jsonl").write_bytes(relabelled(tmp_path / "spaced.jsonl", "predict"))
        [slow], _ = audit_file(tmp_path / "spaced.jsonl")
        assert (slow.problem.line, slow.problem.reason) == (
            report.problem.line,
            report.problem.reason,
        )

    def test_a_training_record_in_a_validate_run(self, tmp_path):
        """A validate run has no training pass: a record with tr=true is illegal, said so."""
        learn = infer("validate", dls=batches_dls(1, 2))
        data = learn.audit_path.read_bytes().replace(
            b'"ev":"predict","src":"batch","dst":"predict","tr":false',
            b'"ev":"predict","src":"batch","dst":"predict","tr":true',
            1,
        )
        (tmp_path / "x.jsonl").write_bytes(reseal(data))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.reason == (
            "illegal transition predict: batch -> predict in a validate run (training=True): a "
            "validate run has no training pass"
        )

    @pytest.mark.parametrize("kind", ["train", "", 3, ["fit"]])
    def test_an_unknown_kind(self, kind, tmp_path, capsys):
        """A header whose kind is none of the three: a problem naming it and the valid ones."""
        learn = infer("get_preds", dls=batches_dls(1, 1))
        (tmp_path / "x.jsonl").write_bytes(relabelled(learn.audit_path, kind))
        code, out, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert err.endswith(
            f":1: header field 'kind' is {shown(kind)}, no kind of run: valid are 'fit', "
            "'validate', 'predict' (absent: a fit)\n"
        )
        assert "kind unknown" in out
        code, out, _ = audit("--json", str(tmp_path / "x.jsonl"), capsys=capsys)
        assert orjson.loads(out)["runs"][0]["kind"] is None

    @pytest.mark.parametrize(
        ("run", "status", "reason"),
        [
            (
                "validate",
                "cancelled",
                (
                    "its last transition is end_epoch: a cancelled validate run ends with "
                    "cancel_epoch or cancel_fit"
                ),
            ),
            (
                "get_preds",
                "failed",
                "its last transition is end_epoch: a failed predict run ends with fail",
            ),
        ],
    )
    def test_the_footers_status_is_the_replays(self, run, status, reason, tmp_path):
        """An inference run completes with end_epoch; its footer cannot say otherwise."""
        learn = infer(run, dls=batches_dls(1, 1))
        content = lines(learn.audit_path)
        footer = orjson.loads(content[-2]) | {Field.STATUS.value: status}
        if status == "failed":
            footer[Field.FAILURE.value] = {"type": "X"}
        content[-2] = orjson.dumps(footer) + b"\n"
        (tmp_path / "x.jsonl").write_bytes(reseal(b"".join(content)))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.reason == f"run_end says {status}, but {reason}"

    def test_hook_time_of_a_loss_in_a_predict_run(self, tmp_path):
        """A predict run computes no loss: hook time for compute_loss cannot be."""
        blocks = inference_blocks("0123456789ab", "predict", 3, hook_ns={"compute_loss": [0, 5]})
        (tmp_path / "x.jsonl").write_bytes(b"".join(seal_blocks("0123456789ab", blocks)[0]))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.reason == (
            "run_end hook_ns has hook time for compute_loss in validation in a predict run, "
            "where it cannot fire"
        )


class TestInferenceTimeByWork:
    def test_a_predict_pass_by_work(self, tmp_path):
        """Known times: batch is forward; epoch and predict, validation; idle, the loop."""
        blocks = inference_blocks("0123456789ab", "predict", 10, step_ns=1000)
        (tmp_path / "x.jsonl").write_bytes(b"".join(seal_blocks("0123456789ab", blocks)[0]))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.verified, report.problem
        assert report.kind is RunKind.PREDICT
        assert report.time_by_work_ns == dict.fromkeys(Work, 0) | {
            Work.FORWARD: 10_000,  # each predict, after the time in batch
            Work.VALIDATION: 21_000,  # begin_batch and end_batch (x10), end_epoch
            Work.LOOP: 2000,  # idle: before begin_epoch, and before the footer
        }

    def test_a_validate_pass_by_work(self, tmp_path):
        """Known times: every state of the pass is validation; after_batch hooks come out of it."""
        blocks = inference_blocks(
            "0123456789ab", "validate", 10, step_ns=1000, hook_ns={"end_batch": [0, 700]}
        )
        (tmp_path / "x.jsonl").write_bytes(b"".join(seal_blocks("0123456789ab", blocks)[0]))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.verified, report.problem
        assert report.time_by_work_ns == dict.fromkeys(Work, 0) | {
            Work.VALIDATION: 41_000 - 700,
            Work.HOOKS: 700,
            Work.LOOP: 2000,
        }


# -- where the time went --------------------------------------------------------------------


class TestTimeByWork:
    def test_a_pass_by_work(self, tmp_path):
        """A run of known times: each state's time lands in its work, adding up to the wall."""
        data, _ = training_run("0123456789ab", 10, valid=3, block=20, step_ns=1000)
        (tmp_path / "x.jsonl").write_bytes(data)
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.verified
        assert report.time_by_work_ns == {
            Work.DATA: 11_000,  # each begin_batch, and end_epoch, end time spent in epoch
            Work.FORWARD: 10_000,
            Work.LOSS: 10_000,
            Work.BACKWARD: 10_000,
            Work.STEP: 10_000,
            Work.VALIDATION: 13_000,  # 3 batches of 4, and the end of the pass
            Work.HOOKS: 0,
            Work.LOOP: 5000 + 10_000,  # idle (x2), fit (x3); step (x10)
        }
        assert sum(report.time_by_work_ns.values()) == report.wall_ns == 79_000

    def test_hooks_come_out_of_the_state_they_ran_in(self, tmp_path):
        """before_batch (after the change) ran in batch; after_batch (before it) in step."""
        blocks = training_blocks("0123456789ab", 10, step_ns=1000)
        footer = orjson.loads(blocks[-1][-1])
        footer[Field.HOOK_NS.value] = {"begin_batch": [2500, 0], "end_batch": [700, 0]}
        blocks[-1][-1] = orjson.dumps(footer) + b"\n"
        (tmp_path / "x.jsonl").write_bytes(b"".join(seal_blocks("0123456789ab", blocks)[0]))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.verified, report.problem
        work = report.time_by_work_ns
        assert (work[Work.FORWARD], work[Work.HOOKS]) == (10_000 - 2500, 3200)
        assert work[Work.LOOP] == 4000 + 10_000 - 700  # after_batch ran in step
        assert sum(work.values()) == report.wall_ns

    def test_more_hook_time_than_the_state_had_does_not_verify(self, tmp_path):
        """Hooks cannot take longer than the time spent where they ran."""
        blocks = training_blocks("0123456789ab", 10, step_ns=1000)
        footer = orjson.loads(blocks[-1][-1])
        footer[Field.HOOK_NS.value] = {"compute_loss": [10_001, 0]}
        blocks[-1][-1] = orjson.dumps(footer) + b"\n"
        (tmp_path / "x.jsonl").write_bytes(b"".join(seal_blocks("0123456789ab", blocks)[0]))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.reason == (
            "run_end hook_ns gives 10,001 ns to hooks during backward time, but the run spent "
            "only 10,000 ns there"
        )

    def test_a_real_run_with_slow_hooks(self):
        """Sleeping hooks: their time is hooks, and the categories still add up exactly."""

        class Slow(Callback):
            def before_batch(self, learn):
                time.sleep(0.002)

            def after_loss(self, learn):
                time.sleep(0.001)

        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [Slow()])
        learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert report.verified, report.problem
        work = report.time_by_work_ns
        assert work[Work.HOOKS] >= 5 * 2_000_000 + 3 * 1_000_000
        assert min(work.values()) >= 0
        assert sum(work.values()) == report.wall_ns


class TestRecords:
    def test_record_fields_and_size(self):
        """Records have the codec's fields, no tensor; transition lines stay under 160 bytes."""
        learn, _ = fit()
        content = lines(learn.audit_path)
        records = [decode(line) for line in content]
        assert isinstance(records[0], Header)
        assert records[0].fields[Field.PARAMS.value] == sum(
            p.numel() for p in learn.model.parameters()
        )
        assert records[0].fields[Field.CALLBACKS.value] == [["Raiser", 0]]
        assert isinstance(records[-1], Seal)
        assert isinstance(records[-2], Footer)
        assert records[-2].status is RunStatus.COMPLETED
        transition = next(i for i, r in enumerate(records) if isinstance(r, Transition))
        assert set(orjson.loads(content[transition])) == {
            Field.EVENT.value,
            Field.SOURCE.value,
            Field.DEST.value,
            Field.TRAINING.value,
            Field.RUN.value,
            Field.EPOCH.value,
            Field.ITER.value,
            Field.TIME_NS.value,
        }
        sizes = [len(c) for c, r in zip(content, records, strict=True) if isinstance(r, Transition)]
        assert max(sizes) <= 160

    def test_sealed_when_due(self, monkeypatch):
        """Records due are on disk and sealed at the next batch or pass end (a kill keeps them)."""
        monkeypatch.setattr(writer_module, "FLUSH_EVERY_NS", 0)  # every time is due
        seen = []

        class Peek(Callback):
            def before_epoch(self, learn):
                if not learn.training:
                    seen.append(lines(learn.audit_path)[-2:])

        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Peek()])
        learn.fit(1)
        [[last_record, seal]] = seen
        assert decode(last_record).trigger == "end_epoch"
        assert isinstance(decode(seal), Seal)

    def test_notes_are_sealed_and_checked(self):
        """learn.note adds records that verify; tensors and reserved names are refused."""

        class Notes(Callback):
            def after_epoch(self, learn):
                learn.note("probe", loss=0.5, training=learn.training)

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Notes()])
        learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.notes) == (True, 2)

        class BadNote(Callback):
            def after_fit(self, learn):
                learn.note("probe", loss=torch.tensor(0.5))

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [BadNote()])
        with pytest.raises(TypeError, match=r"'loss' must be a JSON value .* got Tensor"):
            learn.fit(1)
        [report], _ = audit_file(learn.audit_path)
        assert (report.verified, report.status) == (True, RunStatus.FAILED)

        class Clash(Callback):
            def before_fit(self, learn):
                learn.note("x", ep=1)

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Clash()])
        with pytest.raises(ValueError, match=r"reserved names \['ep'\]"):
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


@pytest.mark.unchecked_records("records tampered with")
class TestTampering:
    @pytest.fixture
    def log(self):
        learn, _ = fit()
        return learn.audit_path

    def rewrite(self, path: Path, new: list[bytes]) -> None:
        path.write_bytes(b"".join(new))

    def mismatch(self, log: Path, run_id: str, first: int, last: int, what: str) -> str:
        return (
            f"fsm-learner audit: {log}:{first}: lines {first}-{last} (a block of run "
            f"'{run_id}'): {what}\n"
        )

    def test_edited_value(self, log, capsys):
        """Changing one value: its block no longer matches its seal, named by its lines."""
        content = lines(log)
        at = transition_at(content, "compute_loss", 1)
        content[at] = content[at].replace(b'"ep":0', b'"ep":1')
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        run_id = orjson.loads(content[0])[Field.RUN.value]
        seal = (
            "the seal does not match the lines: a line was edited, inserted, removed or moved, "
            "or a block before it in the file (of any run)"
        )
        assert err == self.mismatch(log, run_id, *block_of(content, at), seal)

    def test_deleted_line(self, log, capsys):
        """A missing record: its block has one line fewer than its seal counts."""
        content = lines(log)
        at = transition_at(content, "predict", 2)
        first, last = block_of(content, at)
        del content[at]
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        run_id = orjson.loads(content[0])[Field.RUN.value]
        count = last - first
        what = f"its seal counts {count} lines, the block has {count - 1}"
        assert err == self.mismatch(log, run_id, first, last - 1, what)

    def test_swapped_lines(self, log, capsys):
        """Two records swapped: the block's bytes changed, its seal does not match."""
        content = lines(log)
        at = transition_at(content, "predict", 1)
        content[at], content[at + 1] = content[at + 1], content[at]
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err

    def test_forged_line_inserted(self, log, capsys):
        """A forged record inserted (a cancel where none was): the block's count is off."""
        content = lines(log)
        at = transition_at(content, "predict", 1)
        forged = orjson.loads(content[at]) | {Field.EVENT.value: "cancel_batch", "dst": "epoch"}
        content.insert(at + 1, orjson.dumps(forged) + b"\n")
        self.rewrite(log, content)
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert "lines, the block has" in err

    def test_forged_line_with_the_seals_recomputed(self, log, capsys):
        """Sealed again by a forger: the replay finds the path broken at the forged line."""
        content = lines(log)
        at = transition_at(content, "predict", 1)
        forged = orjson.loads(content[at]) | {Field.EVENT.value: "cancel_batch", "dst": "epoch"}
        content.insert(at + 1, orjson.dumps(forged) + b"\n")
        log.write_bytes(reseal(b"".join(content)))
        code, _, err = audit(str(log), capsys=capsys)
        assert code == 1
        assert err.endswith(
            f":{at + 2}: cancel_batch from 'batch', but the replayed state is 'predict'\n"
        )

    def test_rewritten_seals_are_caught_by_the_expected_head(self, log, capsys):
        """Whoever recomputes every seal cannot match the head kept elsewhere."""
        content = lines(log)
        head = orjson.loads(content[-1])[Field.DIGEST.value]
        at = transition_at(content, "compute_loss", 1)
        content[at] = content[at].replace(b'"ep":0', b'"ep":1')
        log.write_bytes(reseal(b"".join(content)))
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
        assert "the seal does not match the lines" in err
        assert "wrong key" in err

    def test_keyed_log_rewritten_unkeyed_fails_with_the_key(self, capsys, monkeypatch):
        """Given a key, an unkeyed chain does not verify (else a keyed log could be downgraded)."""
        learn, _ = fit(audit_key="s3cret")
        data = learn.audit_path.read_bytes().replace(b'"keyed":true', b'"keyed":false', 1)
        learn.audit_path.write_bytes(reseal(data))
        assert audit(str(learn.audit_path), capsys=capsys)[0] == 0  # without a key: plain seals
        monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", "s3cret")
        code, _, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert "a key was given but this run's chain is not keyed" in err


class TestKeyEnv:
    @pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
    def test_a_named_variable_must_hold_a_key(self, value, tmp_path, capsys, monkeypatch):
        """--key-env NAME with NAME unset or empty: a usage error naming it, for both commands."""
        data, _ = tiny_run("aaaaaaaaaaaa")
        (tmp_path / "x.jsonl").write_bytes(data)
        monkeypatch.delenv("MY_KEY", raising=False)
        if value is not None:
            monkeypatch.setenv("MY_KEY", value)
        state = "not set" if value is None else "empty"
        reason = (
            f"--key-env MY_KEY: the environment variable 'MY_KEY' is {state}; set it to the "
            "chain key, or leave --key-env out for logs without one\n"
        )
        code, out, err = audit(str(tmp_path / "x.jsonl"), "--key-env", "MY_KEY", capsys=capsys)
        assert (code, out, err) == (2, "", f"fsm-learner audit: {reason}")
        code = main(["diagram", "--from-log", str(tmp_path / "x.jsonl"), "--key-env", "MY_KEY"])
        assert (code, capsys.readouterr().err) == (2, f"fsm-learner diagram: {reason}")

    def test_without_key_env_an_unset_default_means_no_key(self, tmp_path, capsys, monkeypatch):
        """FSM_LEARNER_AUDIT_KEY unset: logs without a key verify, as before."""
        monkeypatch.delenv("FSM_LEARNER_AUDIT_KEY", raising=False)
        data, _ = tiny_run("aaaaaaaaaaaa")
        (tmp_path / "x.jsonl").write_bytes(data)
        assert audit(str(tmp_path / "x.jsonl"), capsys=capsys)[0] == 0


SEAL_FORMS = {
    "spaced": spaced,
    "reordered": lambda x: orjson.dumps(dict(reversed(orjson.loads(x).items()))) + b"\n",
    "extra-fields": lambda x: x[:-2] + b',"src":"batch","t":1e15,"name":"metrics"}\n',
    "ev-twice": lambda x: b'{"ev":"seal",' + x[1:],
    "escaped-run": lambda x: x.replace(b'"run":"a', b'"run":"\\u0061', 1),
    "trailing-blank": lambda x: x[:-1] + b" \n",
    "crlf": lambda x: x[:-1] + b"\r\n",
}


@pytest.mark.unchecked_records("seal lines in other bytes")
class TestSealLines:
    @pytest.mark.parametrize("form", SEAL_FORMS.values(), ids=SEAL_FORMS.keys())
    def test_a_seal_in_other_bytes_is_no_seal(self, form, tmp_path, capsys):
        """No hash covers a seal line: in any bytes but the writer's, it is a problem, named.

        The lines it seals and its digest are untouched, so it would verify otherwise.
        """
        content = lines_of(tiny_run("aaaaaaaaaaaa")[0])
        content[4] = form(content[4])
        path = tmp_path / "x.jsonl"
        path.write_bytes(b"".join(content))
        code, _, err = audit(str(path), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {path}:1: lines 1-5 (a block of run 'aaaaaaaaaaaa'): line 5 "
            "is no record: a seal not in the writer's exact form (its fields reordered, "
            "respaced, added to or repeated)\n"
        )

    def test_a_seal_in_other_bytes_is_not_the_seal_before_the_next_run(self, tmp_path):
        """Not a seal, so not the seal before the next run: a run bound to it binds to nothing.

        The writer agrees: it looks for the file's last seal with the same ``decode``.
        """
        data, head = tiny_run("aaaaaaaaaaaa")
        second, _ = tiny_run("bbbbbbbbbbbb", prev=head)
        content = lines_of(data)
        content[4] = spaced(content[4])
        (tmp_path / "x.jsonl").write_bytes(b"".join(content) + second)
        reports, _ = audit_file(tmp_path / "x.jsonl")
        assert [r.verified for r in reports] == [False, False]
        assert reports[1].problem.reason.startswith(f"header binds to the seal '{head}', but no")

    def test_decode_takes_only_the_writers_bytes(self):
        """decode, which the writer's search for the last seal uses too, reads no other seal."""
        line = Encoder("aaaaaaaaaaaa").seal(4, b"\xab" * 16)
        assert decode(line) == decode(line[:-1]) == Seal("aaaaaaaaaaaa", 4, b"\xab" * 16)
        for form in SEAL_FORMS.values():
            with pytest.raises(RecordError, match="a seal not in the writer's exact form"):
                decode(form(line))


@pytest.mark.unchecked_records("a footer whose status is forged")
class TestStatus:
    @pytest.mark.parametrize(
        ("last", "status", "reason"),
        [
            (
                "end_fit",
                "failed",
                "its last transition is end_fit: a failed fit run ends with fail",
            ),
            (
                "end_fit",
                "cancelled",
                "its last transition is end_fit: a cancelled fit run ends with cancel_fit",
            ),
            (
                "fail",
                "completed",
                "its last transition is fail: a completed fit run ends with end_fit",
            ),
            (None, "failed", "it has no transition: a failed fit run ends with fail"),
        ],
    )
    def test_the_footers_status_is_the_replays(self, last, status, reason, tmp_path):
        """A footer must say how the run ended as its last transition does, with the key or not."""
        content = run_lines("aaaaaaaaaaaa", failure={"type": "X"} if last == "fail" else None)
        footer = orjson.loads(content[3]) | {"status": status}
        if last is None:
            footer |= {"records": 1, "counts": {}}
            content = [content[0]]
        content[3:] = [orjson.dumps(footer) + b"\n"]
        [data], _ = seal_blocks("aaaaaaaaaaaa", [content])
        (tmp_path / "x.jsonl").write_bytes(data)
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert report.problem.reason == f"run_end says {status}, but {reason}"
        assert report.problem.line == len(content)


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
        assert (code, err) == (
            1,
            (
                f"fsm-learner audit: {empty}:0: empty file: no run in it "
                "(a fit killed before its first write?)\n"
            ),
        )

    def test_binary_file(self, tmp_path, capsys):
        """A binary file (NUL bytes)."""
        binary = tmp_path / "model.jsonl"
        binary.write_bytes(bytes(range(256)) + b"\n")
        code, _, err = audit(str(binary), capsys=capsys)
        assert code == 1
        assert "binary data (a NUL byte)" in err

    def test_a_log_of_schema_1(self, tmp_path, capsys):
        """A log of fsm_learner 0.1 (per-line hashes): refused in one line naming its version."""
        old = {"run": "d5a648a66bb8", "seq": 0, "t": 0, "ev": "run_start", "schema": 1}
        (tmp_path / "old.jsonl").write_bytes(orjson.dumps(old | {"h": "00" * 8}) + b"\n")
        code, _, err = audit(str(tmp_path / "old.jsonl"), capsys=capsys)
        assert code == 1
        assert err == (
            f"fsm-learner audit: {tmp_path}/old.jsonl:1: schema version 1 (per-line hashes, "
            "fsm_learner 0.1); this audit reads version 2 logs only\n"
        )

    def test_truncated_last_line(self, capsys):
        """A cut last line: the run is truncated, its sealed blocks still verify."""
        learn, _ = fit()
        content = lines(learn.audit_path)
        learn.audit_path.write_bytes(b"".join(content)[:-40])
        first, _ = block_of(content, len(content) - 1)
        tail = len(content) - first + 1
        records = sum(not is_seal(line) for line in content[: first - 1])
        code, out, err = audit(str(learn.audit_path), capsys=capsys)
        assert code == 1
        assert err.endswith(
            f":{first}: truncated (a killed run?): {tail} lines from line {first} were never "
            f"sealed, the last one cut off; the {records} records before them verify\n"
        )
        assert "truncated  DOES NOT VERIFY" in out

    @pytest.mark.unchecked_records("records tampered with, then sealed again")
    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            ((b'"ev":"predict"', b'"ev":"guess"'), "unknown event 'guess'"),
            ((b'"src":"batch"', b'"src":"lunch"'), "field 'src' is 'lunch', not a state"),
            ((b'"ep":0', b'"ep":"0"'), "field 'ep' must be int, got str '0'"),
            ((b'"dst":"predict"', b'"dst":"loss"'), "illegal transition predict: batch -> loss"),
        ],
    )
    def test_fields_and_table(self, edit, reason, capsys):
        """Wrong types, unknown names and illegal transitions are named (seals recomputed)."""
        learn, _ = fit()
        learn.audit_path.write_bytes(reseal(learn.audit_path.read_bytes().replace(*edit)))
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

    @pytest.mark.unchecked_records("line ends and digests changed")
    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            (lambda c: [c[0], c[1].replace(b"}\n", b"}\r\n"), *c[2:]], "the seal does not match"),
            (lambda c: [*c[:-1], c[-1][:-35] + c[-1][-35:].upper()], "line 5 is no record: seal"),
        ],
        ids=["crlf", "upper-hex"],
    )
    def test_line_bytes_must_be_the_writers(self, edit, reason, tmp_path, capsys):
        """CR line ends or an upper-case digest are not what the writer wrote: rejected."""
        content = edit(tiny_run("aaaaaaaaaaaa")[0].splitlines(keepends=True))
        (tmp_path / "x.jsonl").write_bytes(b"".join(content))
        code, _, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert reason in err


def test_sigkill_mid_epoch_leaves_a_verified_prefix(tmp_path, capsys):
    """A run killed with SIGKILL mid-epoch: the audit reports it truncated, prefix verified."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        import torch.nn.functional as F
        from helpers import digits_dls, mlp
        from fsm_learner import Callback, Learner
        from fsm_learner.audit import writer

        writer.FLUSH_EVERY_NS = 0  # seal every batch: a kill loses only the batch under way

        class Kill(Callback):
            def after_loss(self, learn):
                if learn.epoch == 1 and learn.iter == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

        Learner(mlp(), digits_dls(), F.cross_entropy, 0.1, [Kill()], audit_log="runs").fit(3)
        """,
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, check=False, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    [log] = (tmp_path / "runs").glob("*.jsonl")
    code, _, err = audit(str(log), capsys=capsys)
    assert code == 1
    assert "truncated (a killed run?)" in err
    [report], _ = audit_file(log)
    assert report.status is RunStatus.TRUNCATED
    # sealed after every batch: epoch 1's batch 7, under way, is lost
    assert (report.epochs, report.batches, report.last_state) == (2, (29, 7), "epoch")


# -- several writers, one file ---------------------------------------------------------------


def interleaved(run_ids: list[str], batches: int, block: int) -> tuple[bytes, list[str]]:
    """Runs of codec-built blocks, alternating as writers sharing a file append them."""
    file, blocks = SharedFile(), {}
    for run_id in run_ids:  # the headers first, each bound to the seal before it
        blocks[run_id] = training_blocks(run_id, batches, valid=2, prev=file.prev, block=block)
        file.append(run_id, blocks[run_id][0])
    for i in range(1, max(len(b) for b in blocks.values())):
        for run_id in run_ids:
            if i < len(blocks[run_id]):
                file.append(run_id, blocks[run_id][i])
    return bytes(file.data), [file.heads[run_id].hex() for run_id in run_ids]


def expecting(heads: list[str]) -> list[str]:
    """The --expect-head arguments naming each of ``heads``."""
    return [arg for head in heads for arg in ("--expect-head", head)]


def run_of(line: bytes) -> str:
    return orjson.loads(line)[Field.RUN.value]


class TestSharedFiles:
    def test_interleaved_blocks_of_two_runs(self, tmp_path, capsys):
        """Blocks of runs A and B alternating, as two processes append them: both verify."""
        data, heads = interleaved(["aaaaaaaaaaaa", "bbbbbbbbbbbb"], 40, block=25)
        (tmp_path / "x.jsonl").write_bytes(data)
        code, out, err = audit(str(tmp_path / "x.jsonl"), *expecting(heads), capsys=capsys)
        assert (code, err) == (0, "")
        assert "2 run(s): 2 verified" in out
        reports, _ = audit_file(tmp_path / "x.jsonl")
        assert [r.batches for r in reports] == [(40, 2), (40, 2)]

    def test_two_blocks_of_two_runs_swapped_do_not_verify(self, tmp_path, capsys):
        """Each block is bound to the file's seal before it: swapped, even every head given fails.

        Each run's own chain is intact (its blocks keep their order), so only the binding
        to the other run's seal between them tells.
        """
        data, heads = interleaved(["aaaaaaaaaaaa", "bbbbbbbbbbbb"], 40, block=25)
        content = data.splitlines(keepends=True)
        seals = [i for i, line in enumerate(content) if is_seal(line)]
        a, b, c = seals[1], seals[2], seals[3]  # B's first block, A's second, B's second
        content = (
            content[: a + 1] + content[b + 1 : c + 1] + content[a + 1 : b + 1] + content[c + 1 :]
        )
        (tmp_path / "x.jsonl").write_bytes(b"".join(content))
        code, _, err = audit(str(tmp_path / "x.jsonl"), *expecting(heads), capsys=capsys)
        assert code == 1
        first, last = a + 2, a + 1 + c - b  # B's second block, now where A's was
        assert err == (
            f"fsm-learner audit: {tmp_path}/x.jsonl:{first}: lines {first}-{last} (a block of "
            "run 'bbbbbbbbbbbb'): the seal does not match the lines: a line was edited, "
            "inserted, removed or moved, or a block before it in the file (of any run)\n"
        )
        reports, _ = audit_file(tmp_path / "x.jsonl")
        assert [r.verified for r in reports] == [False, False]

    @pytest.mark.parametrize("kept", ["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    def test_a_run_cut_out_of_a_shared_file_is_caught(self, kept, tmp_path, capsys):
        """Every line of one of two interleaved runs deleted: the other's blocks tell."""
        data, _ = interleaved(["aaaaaaaaaaaa", "bbbbbbbbbbbb"], 40, block=25)
        content = [x for x in data.splitlines(keepends=True) if run_of(x) == kept]
        (tmp_path / "x.jsonl").write_bytes(b"".join(content))
        code, _, err = audit(str(tmp_path / "x.jsonl"), capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err or "header binds to the seal" in err

    @pytest.mark.unchecked_records("a block moved between two of its own run")
    def test_a_block_moved_within_its_run_does_not_verify(self, tmp_path):
        """The order of one run's blocks is its chain: moved, the run does not verify."""
        data, _ = interleaved(["aaaaaaaaaaaa"], 40, block=25)
        content = data.splitlines(keepends=True)
        seals = [i for i, line in enumerate(content) if is_seal(line)]
        a, b, c = seals[1], seals[2], seals[3]
        content = (
            content[: a + 1] + content[b + 1 : c + 1] + content[a + 1 : b + 1] + content[c + 1 :]
        )
        (tmp_path / "x.jsonl").write_bytes(b"".join(content))
        [report], _ = audit_file(tmp_path / "x.jsonl")
        assert "the seal does not match the lines" in report.problem.reason

    def test_two_processes_fitting_into_one_file(self, tmp_path, capsys):
        """Two processes fit at once into one .jsonl: blocks interleave, both runs verify."""
        log = tmp_path / "shared.jsonl"
        context = multiprocessing.get_context("fork")
        barrier = context.Barrier(2, timeout=60)
        workers = [context.Process(target=fit_in_step, args=(log, barrier)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            if worker.is_alive():  # pragma: no cover (a hang: fail, never block CI)
                worker.kill()
        assert [w.exitcode for w in workers] == [0, 0]
        runs_of_seals = [decode(x).run for x in lines(log) if is_seal(x)]
        switches = sum(a != b for a, b in itertools.pairwise(runs_of_seals))
        assert switches >= 3  # the blocks of the two runs alternate
        code, out, err = audit(str(log), capsys=capsys)
        assert (code, err) == (0, "")
        assert "2 run(s): 2 verified" in out

    @pytest.mark.parametrize("how", ["threads", "nested"])
    def test_a_run_cut_out_of_a_keyed_file_two_fits_wrote_is_caught(
        self, how, tmp_path, capsys, monkeypatch
    ):
        """Two fits write one keyed file at once (in two threads, or one inside the other's hook).

        Both verify; every line of one run deleted, the other's next block is bound to a
        seal that is gone: the key-holder's audit fails, whichever run was cut out.
        """
        monkeypatch.setattr(writer_module, "FLUSH_EVERY_NS", 0)  # a block per batch
        monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", "s3cret")
        log = tmp_path / "shared.jsonl"
        results = fit_two_at_once(log, how)
        content = lines(log)
        runs_of_seals = [decode(x).run for x in content if is_seal(x)]
        assert sum(a != b for a, b in itertools.pairwise(runs_of_seals)) >= 2  # interleaved
        code, out, err = audit(str(log), *expecting([r.head for r in results]), capsys=capsys)
        assert (code, err) == (0, "")
        assert "2 run(s): 2 verified" in out
        assert out.count("(keyed chain)") == 2
        for result in results:
            kept = [x for x in content if run_of(x) != result.run_id]
            log.write_bytes(b"".join(kept))
            code, _, err = audit(str(log), capsys=capsys)
            assert code == 1
            assert "the seal does not match the lines" in err or "header binds to the seal" in err


def fit_two_at_once(log: Path, how: str) -> list:
    """Two keyed fits into ``log`` at once: in two threads meeting at each pass, or nested."""
    results = []

    def learner(cbs) -> Learner:
        data = batches_dls(3, 1)
        return Learner(mlp(), data, F.cross_entropy, 0.1, cbs, audit_log=log, audit_key="s3cret")

    if how == "nested":
        inner = learner([])

        class FitAnother(Callback):
            def after_step(self, learn):
                if learn.iter == 1 and not results:
                    results.append(inner.fit(1))

        results.insert(0, learner([FitAnother()]).fit(2))
        return results
    barrier = threading.Barrier(2, timeout=60)

    class InStep(Callback):
        def before_epoch(self, learn):
            barrier.wait()

    def work() -> None:
        results.append(learner([InStep()]).fit(2))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2
    return results


def fit_in_step(log: Path, barrier) -> None:
    """Fit into ``log``, waiting for the other process at the start of each pass."""

    class InStep(Callback):
        def before_epoch(self, learn):
            barrier.wait()

    torch.set_num_threads(1)
    writer_module.FLUSH_EVERY_NS = 0  # this process only: a block per batch
    Learner(mlp(), batches_dls(4, 2), F.cross_entropy, 0.1, [InStep()], audit_log=log).fit(3)


# -- the bulk path and the record-by-record path agree ------------------------------------


def spaced_log(data: bytes) -> bytes:
    """The same log in other bytes (spaces after commas and colons), its seals recomputed."""
    return reseal(b"".join(spaced(line) for line in data.splitlines(keepends=True)))


def summary(report) -> dict:
    """What a report says, but its chain head (the seals differ with the bytes)."""
    found = report.to_json()
    del found["head"]
    return found


@pytest.mark.unchecked_records("the same records in other bytes")
class TestBothPathsAgree:
    @pytest.mark.parametrize(
        "plan",
        [
            {},
            {(H.AFTER_LOSS, 2): CancelBatchException, (H.AFTER_STEP, 4): CancelEpochException},
            {(H.AFTER_PREDICT, 3): Boom},
        ],
        ids=["completed", "cancels", "failed"],
    )
    def test_a_real_log_in_other_bytes(self, plan, tmp_path):
        """Each line read by decode() (spaced) or in bulk (the writer's bytes): one verdict."""

        class Notes(Callback):
            def after_epoch(self, learn):
                learn.note("probe", loss=0.5)

        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [Raiser(plan), Notes()])
        with contextlib.suppress(Boom):
            learn.fit(3)
        (tmp_path / "spaced.jsonl").write_bytes(spaced_log(learn.audit_path.read_bytes()))
        [fast], _ = audit_file(learn.audit_path)
        [slow], _ = audit_file(tmp_path / "spaced.jsonl")
        assert fast.verified
        assert summary(slow) | {"path": fast.path} == summary(fast)

    @pytest.mark.parametrize("run", list(INFER))
    @pytest.mark.parametrize(
        "plan",
        [
            {(H.BEFORE_BATCH, 2): CancelBatchException, (H.AFTER_BATCH, 4): CancelEpochException},
            {(H.AFTER_PREDICT, 3): Boom},
        ],
        ids=["cancels", "failed"],
    )
    @pytest.mark.filterwarnings("ignore::fsm_learner.PartialResultWarning")  # cancelled on purpose
    def test_an_inference_log_in_other_bytes(self, run, plan, tmp_path):
        """A validate or predict run, read by decode() or in bulk: one verdict."""

        class Notes(Callback):
            def after_batch(self, learn):
                learn.note("probe", loss=0.5)

        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.1, [Raiser(plan), Notes()])
        with contextlib.suppress(Boom):
            getattr(learn, run)()
        (tmp_path / "spaced.jsonl").write_bytes(spaced_log(learn.audit_path.read_bytes()))
        [fast], _ = audit_file(learn.audit_path)
        [slow], _ = audit_file(tmp_path / "spaced.jsonl")
        assert fast.verified
        assert summary(slow) | {"path": fast.path} == summary(fast)

    @pytest.mark.parametrize(
        "edit",
        [
            (b'"dst":"predict"', b'"dst":"loss"'),
            (b'"it":1,"t":', b'"it":1,"t":1'),
            (b'"ev":"backward"', b'"ev":"step"'),
        ],
        ids=["illegal", "time", "state"],
    )
    def test_a_forged_log_in_other_bytes(self, edit, tmp_path):
        """A forger's log, sealed again: the same problem, at the same line, either way."""
        data, _ = training_run("0123456789ab", 30, valid=4, block=50)
        data = data.replace(*edit, 1)
        (tmp_path / "fast.jsonl").write_bytes(reseal(data))
        (tmp_path / "slow.jsonl").write_bytes(spaced_log(data))
        [fast], _ = audit_file(tmp_path / "fast.jsonl")
        [slow], _ = audit_file(tmp_path / "slow.jsonl")
        assert fast.problem is not None
        assert (slow.problem.line, slow.problem.reason) == (fast.problem.line, fast.problem.reason)
        assert summary(slow) | {"path": fast.path, "problem": None} == summary(fast) | {
            "problem": None
        }


ROUTES = route_keys()


@st.composite
def walks(draw):
    """A walk through the table's routes from idle, with times that may go backwards."""
    state, training, t = "idle", draw(st.booleans()), 0
    steps = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.integers(0, 9)) == 0:
            training = not training
        choices = [i for i, key in enumerate(ROUTES) if key[1] == state and key[3] == training]
        if draw(st.integers(0, 30)) == 0:  # now and then a route from elsewhere
            choices = list(range(len(ROUTES)))
        route = draw(st.sampled_from(choices))
        t += draw(st.integers(-2, 50))
        steps.append((route, draw(st.integers(0, 3)), draw(st.integers(0, 3)), t))
        state = ROUTES[route][2]
    return steps


@st.composite
def passes(draw):
    """Batches of one kind repeated (what the bulk path slices by phase), times random."""
    path = BATCH if draw(st.booleans()) else VALID_BATCH
    training = path is BATCH
    keys = [(*step, training) for step in path]
    start = draw(st.integers(0, len(keys) - 1))
    routes = [ROUTES.index(keys[(start + i) % len(keys)]) for i in range(draw(st.integers(1, 40)))]
    times = [draw(st.integers(0, 30)) for _ in routes]
    return [(route, 0, i, sum(times[: i + 1])) for i, route in enumerate(routes)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    walk=st.one_of(walks(), passes()),
    cut=st.integers(0, 60),
    slow=st.lists(st.integers(0, 500), max_size=5),
    kind=st.sampled_from(RunKind),
)
def test_bulk_replay_is_record_by_record_replay(walk, cut, slow, kind):
    """A batch replayed in bulk, or one record at a time: the same tally, the same problem.

    Whatever the run's kind: a route of another kind's is illegal either way.
    """
    start = replay._Tally(records=1, kind=kind, state=replay._tables().source[walk[0][0]])
    start.slow = sorted((span, 0, 0, 0, 0, 0) for span in slow)  # the header's: index 0
    batch_of = lambda steps: replay.Transitions(
        bytes(r for r, *_ in steps), [n for _, *rest in steps for n in rest]
    )
    bulk, single = start.copy(), start.copy()
    problems = []
    for tally, by_one in ((bulk, False), (single, True)):
        try:
            for steps in (walk[:cut], walk[cut:]):
                batch = batch_of(steps)
                if by_one:
                    for i, route in enumerate(batch.routes):
                        replay._step(tally, route, batch.numbers, 3 * i, 10 + i)
                else:
                    replay._replay_batch(tally, batch, 10)
        except replay._Invalid as exc:
            problems.append((exc.line, exc.reason))
        else:
            problems.append(None)
    assert problems[0] == problems[1]
    assert sorted(bulk.slow) == sorted(single.slow)
    bulk.slow = single.slow = []
    assert bulk == single


# -- how fast -----------------------------------------------------------------------------------


def test_the_audit_reads_hundreds_of_thousands_of_records_a_second(tmp_path):
    """A 300,000-record log of one long training pass, in blocks of 8,192: a guard, not a bench.

    ``fsm-learner bench`` measures the real figure (over 1,000,000 records/s on one core).
    """
    data, _ = training_run("0123456789ab", 50_000, block=8192, step_ns=37_123)
    (tmp_path / "x.jsonl").write_bytes(data)
    start = time.process_time()
    [report] = list(FileAudit(tmp_path / "x.jsonl"))
    elapsed = time.process_time() - start
    assert report.verified
    assert report.records / elapsed > 400_000


# -- a file cut, then appended to ------------------------------------------------------------


@pytest.mark.unchecked_records("a run cut off by a test")
def test_appending_after_a_cut_off_line_keeps_the_next_run(tmp_path):
    """A run appended to a .jsonl whose last line was cut verifies, after the cut line."""
    log = tmp_path / "all.jsonl"
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=log)
    learn.fit(1)
    log.write_bytes(log.read_bytes()[:-30])  # the last seal, cut
    learn.fit(1)
    reports, problem = audit_file(log)
    assert problem is None
    assert [r.verified for r in reports] == [False, True]
    assert "is no record: not JSON" in reports[0].problem.reason


def test_a_run_appended_after_the_files_last_newline_was_lost(tmp_path):
    """The file ends in a whole seal but for its newline: the next fit ends that line.

    The seal is then a seal line for the writer and the audit alike: the next run binds
    to it, and both runs verify, each ending on the head its fit returned.
    """
    log = tmp_path / "all.jsonl"
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=log)
    first = learn.fit(1)
    log.write_bytes(log.read_bytes()[:-1])
    second = learn.fit(1)
    reports, problem = audit_file(log)
    assert problem is None
    assert [(r.run_id, r.verified, r.head) for r in reports] == [
        (first.run_id, True, first.head),
        (second.run_id, True, second.head),
    ]
    assert reports[1].header[Field.PREV.value] == first.head


@pytest.mark.unchecked_records("a killed run's unsealed tail, written by the test")
def test_an_unsealed_tail_longer_than_any_window_is_looked_past(tmp_path):
    """A killed run's 17 MiB of unsealed notes: the next fit binds past them, as the audit does."""
    log = tmp_path / "all.jsonl"
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, audit_log=log)
    first = learn.fit(1)
    killed = Encoder("killedkilled")
    tail = [header_line(killed, prev=first.head)]
    tail += [
        killed.note("blob", {"x": "y" * 900_000}, epoch=0, it=0, training=True, t_ns=i)
        for i in range(20)
    ]
    with log.open("ab") as fh:
        fh.write(b"".join(tail))
    assert log.stat().st_size > 17 * 2**20
    second = learn.fit(1)
    reports, _ = audit_file(log)
    assert [(r.run_id, r.verified) for r in reports] == [
        (first.run_id, True),
        ("killedkilled", False),
        (second.run_id, True),
    ]
    assert reports[2].header[Field.PREV.value] == first.head


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


@pytest.mark.unchecked_records("mutated logs")
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


def test_a_codec_header_alone_is_a_truncated_run(tmp_path):
    """A header sealed alone (the writer's first flush) and nothing else: truncated."""
    enc = Encoder("aaaaaaaaaaaa")
    [block], _ = seal_blocks("aaaaaaaaaaaa", [[header_line(enc)]])
    (tmp_path / "x.jsonl").write_bytes(block)
    [report], problem = audit_file(tmp_path / "x.jsonl")
    assert (problem, report.status, report.records) == (None, RunStatus.TRUNCATED, 1)
    assert report.problem.reason == (
        "truncated (a killed run?): no run_end after its last sealed block (line 2); its 1 "
        "records verify"
    )


def test_tiny_logs_read_the_same(tmp_path):
    """The builders' paths are the table's: a batch of each kind is a legal walk."""
    assert [r[:3] for r in ROUTES if r[3] and r[:3] in BATCH] == BATCH
    assert all((*step, False) in ROUTES for step in VALID_BATCH)
    data = b"".join(run_lines("aaaaaaaaaaaa"))
    assert data.count(b"\n") == 4
