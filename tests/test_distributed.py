"""Training on several processes: real ranks under ``torchrun`` (gloo on CPU).

One ``torchrun --nproc_per_node 2`` runs every in-process scenario of
``tests/distributed_worker.py`` (about 10 s: two interpreters importing torch); two
``torchrun`` "nodes" on this machine (``--nnodes 2 --node_rank 0/1`` against a localhost
rendezvous) train across nodes, then one rank SIGKILLs itself. Every launch is bounded by
a timeout and its process groups are killed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fsm_learner import Learner
from fsm_learner.audit.codec import Field

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_TIMEOUT_S = 240.0
SCENARIOS = (
    "equal",
    "batch_cancel",
    "early_stop",
    "value_error",
    "diverge",
    "preempt",
    "resume",
    "late_term",
    "step_cancel",
    "bad_sum",
    "late_start",
    "forward_error",
    "step_escape",
    "close_error",
    "schedule",
)

pytestmark = pytest.mark.skipif(
    not TORCHRUN.is_file(), reason=f"no torchrun beside {sys.executable}"
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)]))
    env.pop("FSM_LEARNER_AUDIT_KEY", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill each launch's process group (torchrun and its workers), then reap it."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _launch(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(TORCHRUN), *args],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run every in-process scenario on 2 ranks of one node; return the output directory.

    The last, ``sigkill``, ends the launch: torchrun's agent then stops rank 0 (SIGTERM).
    """
    out = tmp_path_factory.mktemp("ranks")
    proc = _launch(
        [
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            str(TESTS / "distributed_worker.py"),
            str(out),
            *SCENARIOS,
            "sigkill",
        ],
        out / "torchrun.log",
    )
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not end within {LAUNCH_TIMEOUT_S} s: {_tail(out)}")
    finally:
        _stop([proc])
    done = [s for s in SCENARIOS if all((out / f"{s}.rank{r}.json").is_file() for r in (0, 1))]
    assert done == list(SCENARIOS), _tail(out)
    return out


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two one-process "nodes" train, then rank 1 SIGKILLs itself; return the output directory.

    torchrun's agent of the surviving node then waits for the other agent at its exit
    barrier (300 s): once rank 0 has said what it saw, both launches are killed.
    """
    out = tmp_path_factory.mktemp("nodes")
    port = str(_free_port())
    procs = [
        _launch(
            [
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(TESTS / "distributed_worker.py"),
                str(out),
                "equal",
                "sigkill",
            ],
            out / f"node{node}.log",
        )
        for node in (0, 1)
    ]
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (out / "sigkill.rank0.json").is_file():
            if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
                pytest.fail(f"rank 0 said nothing of the SIGKILL: {_tail(out)}")
            time.sleep(0.2)
    finally:
        _stop(procs)
    return out


def _tail(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(out.glob("*.log")))


def seen(out: Path, scenario: str, rank: int) -> dict[str, Any]:
    """What ``rank`` saw of ``scenario``."""
    return json.loads((out / f"{scenario}.rank{rank}.json").read_text())


def records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a log, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def transitions(path: str | Path) -> list[tuple[str, int, int, bool]]:
    """A log's transitions as (trigger, epoch, batch, training)."""
    kinds = {"run_start", "run_end", "note", "seal"}
    return [(r["ev"], r["ep"], r["it"], r["tr"]) for r in records(path) if r["ev"] not in kinds]


def notes(path: str | Path, name: str) -> list[dict[str, Any]]:
    """A log's notes called ``name``, without the run and time stamps."""
    drop = {"ev", "run", "t", "name"}
    return [
        {k: v for k, v in r.items() if k not in drop}
        for r in records(path)
        if r["ev"] == "note" and r["name"] == name
    ]


def footer(path: str | Path) -> dict[str, Any]:
    """A log's run_end record."""
    return next(r for r in records(path) if r["ev"] == "run_end")


def weights(out: Path, scenario: str, rank: int) -> dict[str, torch.Tensor]:
    """The weights ``rank`` ended ``scenario`` with."""
    state: dict[str, torch.Tensor] = torch.load(
        out / f"{scenario}.rank{rank}.pt", weights_only=True
    )
    return state


def one_process_weights() -> dict[str, torch.Tensor]:
    """The same fit on one process, each batch the two ranks' batches together (64)."""
    learn = Learner(
        worker.make_model(),
        worker.loaders(2 * worker.BATCH),
        F.cross_entropy,
        lr=0.1,
        audit_log=None,
        distributed=False,
    )
    learn.fit(worker.EPOCHS)
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


class TestOneRunAcrossRanks:
    """A fit on two ranks is one run: one id, a log per rank, the large-batch weights."""

    def test_each_rank_logs_the_shared_run_under_its_own_name(self, ranks: Path) -> None:
        """Both logs are <run>.rank<r>.jsonl of rank 0's run id; headers say rank and world."""
        logs = [Path(seen(ranks, "equal", r)["log"]) for r in (0, 1)]
        run_id = logs[0].name.split(".")[0]
        assert [p.name for p in logs] == [f"{run_id}.rank0.jsonl", f"{run_id}.rank1.jsonl"]
        headers = [records(p)[0] for p in logs]
        assert [(h["run"], h[Field.RANK], h[Field.WORLD_SIZE]) for h in headers] == [
            (run_id, 0, 2),
            (run_id, 1, 2),
        ]
        assert [footer(p)["status"] for p in logs] == ["completed", "completed"]
        assert transitions(logs[0]) == transitions(logs[1])

    def test_two_ranks_of_32_reach_the_weights_of_one_process_of_64(self, ranks: Path) -> None:
        """DDP and each rank's share of the data (DistributedSampler) make it one large batch."""
        rank0, rank1 = weights(ranks, "equal", 0), weights(ranks, "equal", 1)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        reference = one_process_weights()
        assert sorted(rank0) == sorted(reference)  # the module's keys: no "module." prefix
        for key, value in reference.items():
            torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
        moved = max(
            (reference[k] - worker.make_model().state_dict()[k]).abs().max() for k in reference
        )
        assert moved > 0.01  # it trained: equality is not that of untouched weights

    def test_each_rank_saw_its_share_of_the_batches(self, ranks: Path) -> None:
        """24 training batches of 32 and 4 validation batches per rank and epoch, not 48 and 8."""
        counts = footer(seen(ranks, "equal", 1)["log"])["counts"]
        assert counts["end_batch"] == [24 * worker.EPOCHS, 4 * worker.EPOCHS]

    def test_the_model_is_given_back_unwrapped(self, ranks: Path) -> None:
        """learn.model is the user's module after the fit, not the DDP wrapper."""
        assert [seen(ranks, "equal", r)["model_type"] for r in (0, 1)] == ["Sequential"] * 2

    def test_two_nodes_train_as_one_process_does(self, nodes: Path) -> None:
        """torchrun --nnodes 2 (one process each, localhost rendezvous): the same weights."""
        reference = one_process_weights()
        for rank in (0, 1):
            assert seen(nodes, "equal", rank)["status"] == "completed"
            for key, value in reference.items():
                torch.testing.assert_close(
                    weights(nodes, "equal", rank)[key], value, rtol=1e-5, atol=1e-6
                )


class TestAgreedCancels:
    """A cancel raised on one rank is taken by every rank at the same point."""

    def test_a_batch_cancel_on_rank_1_is_skipped_by_both(self, ranks: Path) -> None:
        """Rank 1's CancelBatchException in before_batch: both cancel batch 2 before its forward."""
        logs = [seen(ranks, "batch_cancel", r)["log"] for r in (0, 1)]
        for log in logs:
            assert notes(log, "agreed") == [
                {"ep": 0, "it": 2, "tr": True, "cancel": "batch", "rank": 1, "at": "forward"}
            ]
            cancelled = [t for t in transitions(log) if t[0] == "cancel_batch"]
            assert cancelled == [("cancel_batch", 0, 2, True)]
            assert ("predict", 0, 2, True) not in transitions(log)  # no forward: cancelled before
            assert footer(log)["counts"]["step"] == [24 * worker.EPOCHS - 1, 0]
        assert transitions(logs[0]) == transitions(logs[1])
        rank0, rank1 = weights(ranks, "batch_cancel", 0), weights(ranks, "batch_cancel", 1)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    def test_early_stopping_on_one_ranks_metric_stops_every_rank(self, ranks: Path) -> None:
        """EarlyStoppingCB stops rank 1 alone (its metric worsened): both take cancel_fit there."""
        for rank in (0, 1):
            log = seen(ranks, "early_stop", rank)["log"]
            assert seen(ranks, "early_stop", rank)["status"] == "cancelled"
            assert notes(log, "agreed") == [
                {"ep": 1, "it": 3, "tr": False, "cancel": "fit", "rank": 1, "at": "end_epoch"}
            ]
            assert transitions(log)[-1] == ("cancel_fit", 1, 3, False)
            assert footer(log)["status"] == "cancelled"

    def test_a_value_error_on_rank_1_fails_both_naming_it(self, ranks: Path) -> None:
        """Rank 1 raises ValueError in after_loss; rank 0 fails at its next point, told why."""
        rank0, rank1 = seen(ranks, "value_error", 0), seen(ranks, "value_error", 1)
        assert (rank1["type"], rank1["message"]) == ("ValueError", "bad batch on rank 1")
        assert rank0["type"] == "RankFailedError"
        assert rank0["message"] == (
            "rank 1 failed: ValueError: bad batch on rank 1 (in state 'loss', in hook "
            "after_loss of RankFault) (rank 0 takes fail at the backward agreement)"
        )
        error = "ValueError: bad batch on rank 1 (in state 'loss', in hook after_loss of RankFault)"
        for info, at in ((rank0, "backward"), (rank1, "failure")):
            log = info["log"]
            assert notes(log, "agreed") == [
                {
                    "ep": 0,
                    "it": 3,
                    "tr": True,
                    "cancel": "fail",
                    "rank": 1,
                    "at": at,
                    "error": error,
                }
            ]
            assert transitions(log)[-1] == ("fail", 0, 3, True)
            assert footer(log)["status"] == "failed"
        assert footer(rank0["log"])["failure"]["type"] == "RankFailedError"


class TestDivergence:
    """Ranks whose paths differ fail together, naming the first differing transition."""

    def test_one_batch_fewer_on_rank_1_is_reported_where_it_starts(self, ranks: Path) -> None:
        """Rank 1 ends its pass after 5 batches (MetricsCB reduces) as rank 0 begins a sixth."""
        expected = (
            "the ranks' paths diverged: transition 2 since the ranks last agreed differs "
            "(rank 0: begin_batch at epoch 0, batch 5, training; rank 1: in a callback's "
            "reduction at epoch 0, batch 4, training)"
        )
        for rank in (0, 1):
            info = seen(ranks, "diverge", rank)
            assert (info["type"], info["message"]) == ("DivergenceError", expected)
            assert footer(info["log"])["status"] == "failed"


class TestLostRank:
    """A rank that dies makes the others fail within the timeout, naming it."""

    def test_a_sigkilled_rank_is_named_and_the_survivor_closes_its_log(self, nodes: Path) -> None:
        """Rank 1 (node 1) SIGKILLs itself in batch 3; rank 0 fails within 10 s, log failed."""
        info = seen(nodes, "sigkill", 0)
        killed_at = json.loads((nodes / "killed.json").read_text())["killed_at"]
        assert info["type"] == "RankLostError"
        assert info["message"].startswith(
            "rank 1 stopped answering (died, or hung past the 10 s timeout): RuntimeError: "
        )
        assert 0 < info["failed_at"] - killed_at < worker.TIMEOUT_S
        log = info["log"]
        assert footer(log)["status"] == "failed"
        assert footer(log)["failure"]["type"] == "RankLostError"
        assert transitions(log)[-1] == ("fail", 0, 3, True)
        assert not (nodes / "sigkill.rank1.json").exists()  # rank 1 said nothing: it died

    def test_on_one_node_the_survivor_stopped_by_torchrun_closes_its_log(self, ranks: Path) -> None:
        """Same node: torchrun's agent SIGTERMs rank 0 once rank 1 died; its log still closes."""
        info = seen(ranks, "sigkill", 0)
        # whichever comes first: gloo's closed connection, or the agent's SIGTERM
        lost = info["type"] == "RankLostError" and info["message"].startswith("rank 1 stopped")
        stopped = info["type"] == "TerminatedError" and "was sent SIGTERM" in info["message"]
        assert lost or stopped, info
        assert footer(info["log"])["status"] == "failed"
        assert footer(info["log"])["failure"]["type"] == info["type"]


class TestPreemptionAcrossRanks:
    """A SIGTERM on one rank checkpoints every rank at the same boundary; each resumes its own."""

    def test_sigterm_on_rank_1_preempts_both_after_the_same_batch(self, ranks: Path) -> None:
        """Rank 1 alone gets SIGTERM in batch 3: both checkpoint after it and take preempt."""
        run_id = Path(seen(ranks, "preempt", 0)["log"]).name.split(".")[0]
        for rank in (0, 1):
            info = seen(ranks, "preempt", rank)
            assert info["status"] == "preempted"
            assert transitions(info["log"])[-1] == ("preempt", 0, 3, True)
            [point] = notes(info["log"], "resume_point")
            assert Path(point["path"]).name == (f"ckpt_e0000_train_b000004_{run_id}.rank{rank}.pt")

    def test_each_rank_resumes_its_own_checkpoint_bit_for_bit(self, ranks: Path) -> None:
        """resume_from=<dir>: rank r takes its .rank<r>.pt; the uninterrupted fit's weights."""
        for rank in (0, 1):
            info = seen(ranks, "resume", rank)
            assert info["status"] == "completed"
            assert info["resumed_from"]["path"].endswith(f".rank{rank}.pt")
            whole, resumed = weights(ranks, "equal", rank), weights(ranks, "resume", rank)
            assert all(torch.equal(whole[k], resumed[k]) for k in whole)
            assert info["values"] == seen(ranks, "equal", rank)["values"]


def audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``fsm-learner audit`` (or another command: ``args[0]``) on real rank logs."""
    return subprocess.run(
        [sys.executable, "-m", "fsm_learner.cli", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


class TestAuditOfRanks:
    """fsm-learner audit reads a run's rank logs together: same run, lockstep, agreed cancels."""

    def test_the_rank_files_of_a_run_with_an_agreed_cancel_verify_in_lockstep(
        self, ranks: Path
    ) -> None:
        """The two .rank<r>.jsonl files given: lockstep, the batch cancel rank 1 proposed."""
        logs = sorted((ranks / "runs" / "batch_cancel").glob("*.rank*.jsonl"))
        result = audit("audit", *logs, "--json")
        assert result.returncode == 0, result.stderr
        [run] = json.loads(result.stdout)["distributed"]
        assert (run["world_size"], run["lockstep"], run["verified"]) == (2, True, True)
        assert [(r["rank"], r["status"]) for r in run["ranks"]] == [
            (0, "completed"),
            (1, "completed"),
        ]
        [agreed] = run["agreed"]
        assert (agreed["cancel"], agreed["rank"], agreed["at"]) == (
            "batch",
            1,
            {"0": "forward", "1": "forward"},
        )
        assert agreed["taken"] | {"line": 0} == {
            "trigger": "cancel_batch",
            "epoch": 0,
            "iter": 2,
            "pass": "train",
            "line": 0,
        }

    def test_a_failed_run_is_lockstep_up_to_the_failure_and_names_it(self, ranks: Path) -> None:
        """The ValueError run: both ranks failed, in lockstep; the agreed fail names rank 1."""
        result = audit("audit", ranks / "runs" / "value_error")
        out = result.stdout
        assert "(failed: RankFailedError, verified)" in out
        assert "(failed: ValueError, verified)" in out
        assert "  lockstep: yes, " in out
        assert (
            "    fail of rank 1, taken as fail (epoch 0, batch 3, train); at rank 0 backward, "
            "rank 1 failure; error: \"ValueError: bad batch on rank 1 (in state 'loss', in hook "
            'after_loss of RankFault)"' in out
        )

    def test_diverged_ranks_do_not_verify_and_the_divergence_is_named(self, ranks: Path) -> None:
        """The ranks that parted: the audit fails, quoting the first differing transition."""
        result = audit("audit", ranks / "runs" / "diverge")
        assert result.returncode == 1
        assert (
            "lockstep: NO, the ranks found so themselves: rank 0 failed with DivergenceError"
            in (result.stdout)
        )
        assert "rank 0: begin_batch at epoch 0, batch 5, training" in result.stderr

    def test_a_missing_rank_is_named(self, ranks: Path) -> None:
        """Rank 1's log left out: the run does not verify, and says which rank is missing."""
        [rank0] = (ranks / "runs" / "equal").glob("*.rank0.jsonl")
        result = audit("audit", rank0)
        assert result.returncode == 1
        assert "rank 1 of 2 missing" in result.stderr

    def test_the_diagram_of_a_run_across_ranks_is_drawn_once(self, ranks: Path) -> None:
        """diagram --from-log on the run's directory: one path, for ranks 0-1, lockstep."""
        result = audit("diagram", "--from-log", ranks / "runs" / "early_stop")
        assert result.returncode == 0, result.stderr
        assert "(cancelled), ranks 0-1 of 2, lockstep" in result.stdout.splitlines()[1]


class TestAgreementEdges:
    """Where a rank acts alone between agreements: the others still take it at the same point."""

    def test_a_cancel_after_backward_on_rank_1_skips_the_step_on_both(self, ranks: Path) -> None:
        """A hook between backward and step: the ranks agree before the step, and none steps."""
        logs = [seen(ranks, "step_cancel", r)["log"] for r in (0, 1)]
        for log in logs:
            assert notes(log, "agreed") == [
                {"ep": 0, "it": 2, "tr": True, "cancel": "batch", "rank": 1, "at": "step"}
            ]
            assert footer(log)["counts"]["step"] == [24 * worker.EPOCHS - 1, 0]
        rank0, rank1 = weights(ranks, "step_cancel", 0), weights(ranks, "step_cancel", 1)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    def test_a_sigterm_after_a_batchs_agreement_preempts_both_at_the_next(
        self, ranks: Path
    ) -> None:
        """SIGTERM in rank 1's cleanup_batch of batch 3: both stop after batch 4, together."""
        for rank in (0, 1):
            info = seen(ranks, "late_term", rank)
            assert info["status"] == "preempted"
            assert transitions(info["log"])[-1] == ("preempt", 0, 4, True)

    def test_a_bad_value_in_a_reduction_fails_both(self, ranks: Path) -> None:
        """Rank 1's World.sum refuses its value before any collective; rank 0 is told."""
        rank0, rank1 = seen(ranks, "bad_sum", 0), seen(ranks, "bad_sum", 1)
        assert (rank1["type"], rank1["message"]) == (
            "ValueError",
            "could not convert string to float: 'x'",
        )
        assert rank0["type"] == "RankFailedError"
        assert rank0["message"].startswith(
            "rank 1 failed: ValueError: could not convert string to float: 'x' (in state "
            "'epoch', in hook after_epoch of LateFaults) (rank 0 takes fail at the collective "
        )

    def test_a_rank_that_cannot_start_its_fit_fails_the_others_at_once(self, ranks: Path) -> None:
        """Rank 1's checkpoint is not there: rank 0 fails where the run opens, not at a timeout."""
        rank0, rank1 = seen(ranks, "late_start", 0), seen(ranks, "late_start", 1)
        assert rank1["type"] == "CheckpointError"
        assert rank0["type"] == "RankFailedError"
        assert rank0["message"].startswith("rank 1 failed: CheckpointError: ")
        assert rank0["message"].endswith("(rank 0 takes fail at the open agreement)")

    def test_a_failure_before_a_ddp_forward_is_told_before_it(self, ranks: Path) -> None:
        """BatchNorm: DDP's forward broadcasts buffers; rank 0 hears of rank 1's error first."""
        rank0, rank1 = seen(ranks, "forward_error", 0), seen(ranks, "forward_error", 1)
        assert (rank1["type"], rank1["message"]) == ("ValueError", "rank 1 cannot read batch 1")
        assert rank0["type"] == "RankFailedError"
        assert rank0["message"].endswith("(rank 0 takes fail at the forward agreement)")

    def test_a_cancel_in_one_ranks_step_work_is_a_divergence_not_silent(self, ranks: Path) -> None:
        """Rank 1's step override cancels before stepping, rank 0 stepped: both fail, saying so."""
        for rank in (0, 1):
            info = seen(ranks, "step_escape", rank)
            assert info["type"] == "DivergenceError"
            assert info["message"].startswith(
                "the ranks' paths diverged: a cancel raised in the step work of some ranks only"
            )

    def test_a_failure_after_the_fits_last_hooks_fails_every_rank(self, ranks: Path) -> None:
        """Rank 1 fails in cleanup_fit: rank 0 does not end completed, it fails at close."""
        rank0, rank1 = seen(ranks, "close_error", 0), seen(ranks, "close_error", 1)
        assert rank1["type"] == "ValueError"
        assert rank0["type"] == "RankFailedError"
        assert rank0["message"].endswith("(rank 0 takes fail at the close agreement)")
        for info in (rank0, rank1):
            assert footer(info["log"])["status"] == "failed"

    def test_a_schedule_counts_each_ranks_share_of_the_batches(self, ranks: Path) -> None:
        """One-cycle over 24 steps a rank per epoch (not the 48 of the whole loader): it ends."""
        for rank in (0, 1):
            info = seen(ranks, "schedule", rank)
            assert info["status"] == "completed"
            assert info["lr"] == pytest.approx(0.5 / 25 / 1e4, rel=1e-3)
