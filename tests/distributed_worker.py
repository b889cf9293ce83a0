"""A worker for tests/test_distributed.py: run under ``torchrun`` (gloo on CPU), one per rank.

Not a test module (pytest collects ``test_*.py`` only)::

    torchrun --nproc_per_node 2 distributed_worker.py OUT SCENARIO [SCENARIO...]

Each scenario fits a small MLP on scikit-learn's digits with ``Learner(distributed=...)``
(the learner starts the process group from torchrun's environment), logging to
``OUT/runs/<scenario>``, and writes what it saw to ``OUT/<scenario>.rank<r>.json``: the
fit's status or the exception's type and message, seconds taken, the final weights
(``OUT/<scenario>.rank<r>.pt``) and the log's path. Scenarios run one after the other in
the same processes (a failed fit leaves the learner idle and the group usable):

- ``equal``: 2 ranks x batch 32, no shuffling, 2 epochs: compared with one process at 64;
- ``batch_cancel``: rank 1 alone raises CancelBatchException in before_batch of batch 2;
- ``early_stop``: EarlyStoppingCB on a metric only rank 1 sees worsen (epoch 1);
- ``value_error``: rank 1 alone raises ValueError in after_loss of batch 3;
- ``diverge``: each rank its own list of batches, rank 1 one fewer (no samplers);
- ``sigkill``: rank 1 SIGKILLs itself in before_batch of batch 3 (timeout 10 s);
- ``preempt``: with CheckpointCB, rank 1 alone gets SIGTERM in batch 3: both preempt;
- ``late_term``: the same, SIGTERM in cleanup_batch of batch 3 (after that batch's agreement);
- ``step_cancel``: rank 1 alone raises CancelBatchException in after_backward of batch 2;
- ``bad_sum``: rank 1 alone gives World.sum a value that is no number (after_epoch);
- ``late_start``: rank 1 alone resumes from a checkpoint that is not there;
- ``forward_error``: a BatchNorm model; rank 1 alone raises ValueError in before_batch of
  batch 1 (DDP's forward broadcasts buffers: the others must not be in it);
- ``step_escape``: rank 1's step override alone raises CancelBatchException before stepping;
- ``close_error``: rank 1 alone raises ValueError in cleanup_fit, after the fit's last hooks;
- ``schedule``: one-cycle over each rank's share of the batches (the lr it ends with);
- ``resume``: both resume ``preempt``'s checkpoint directory (each its own files);
- ``readme``: nothing: the README's own script is run by the test instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import BatchSchedCB, CheckpointCB, EarlyStoppingCB, MetricsCB
from fsm_learner import (
    Callback,
    CancelBatchException,
    DataLoaders,
    Distributed,
    Learner,
)

N_TRAIN = 1536  # 24 steps of 64: each rank 24 batches of 32
N_VALID = 256
BATCH = 32
EPOCHS = 2
TIMEOUT_S = 10.0


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits, scaled to [0, 1]: x float32 [1797, 64], y int64."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


def make_model() -> nn.Module:
    """The same MLP on every rank and in the one-process reference (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def loaders(batch_size: int) -> DataLoaders:
    """Torch DataLoaders over the first N_TRAIN / next N_VALID digits, in order."""
    x, y = digits()
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    valid = TensorDataset(x[N_TRAIN : N_TRAIN + N_VALID], y[N_TRAIN : N_TRAIN + N_VALID])
    return DataLoaders(
        DataLoader(train, batch_size=batch_size, shuffle=False),
        DataLoader(valid, batch_size=batch_size, shuffle=False),
    )


class RankFault(Callback):
    """Raise ``exc`` on ``rank`` alone, in ``hook`` of batch ``it`` of the first training pass."""

    order = 5

    def __init__(
        self,
        rank: int,
        it: int,
        exc: BaseException | None,
        *,
        kill: bool = False,
        term: bool = False,
    ) -> None:
        """Keep where to strike; ``kill``: SIGKILL itself (time first); ``term``: SIGTERM."""
        self.rank, self.it, self.exc, self.kill, self.term = rank, it, exc, kill, term
        self.out: Path | None = None

    def before_batch(self, learn: Learner) -> None:
        """Strike in before_batch when the fault is a cancel or a kill."""
        if not self._here(learn):
            return
        if self.kill:
            if self.out is not None:
                self.out.write_text(json.dumps({"killed_at": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)
        if self.term:
            os.kill(os.getpid(), signal.SIGTERM)
        if isinstance(self.exc, CancelBatchException):
            raise self.exc

    def after_loss(self, learn: Learner) -> None:
        """Strike in after_loss when the fault is an error."""
        if (
            self._here(learn)
            and self.exc is not None
            and not isinstance(self.exc, CancelBatchException)
        ):
            raise self.exc

    def _here(self, learn: Learner) -> bool:
        return (
            learn.world.rank == self.rank
            and learn.training
            and learn.epoch == 0
            and learn.iter == self.it
        )


class LateFaults(Callback):
    """Rank 1's faults after a batch's agreement, after backward, and in a reduction."""

    order = 6

    def __init__(self, scenario: str) -> None:
        """Strike as ``scenario`` says."""
        self.scenario = scenario

    def cleanup_batch(self, learn: Learner) -> None:
        """late_term: SIGTERM after batch 3's end_batch agreement."""
        if self.scenario == "late_term" and self._at(learn, 3):
            os.kill(os.getpid(), signal.SIGTERM)

    def after_backward(self, learn: Learner) -> None:
        """step_cancel: cancel batch 2 once its gradients are there, before the step."""
        if self.scenario == "step_cancel" and self._at(learn, 2):
            raise CancelBatchException("rank 1 skips the step of batch 2")

    def before_batch(self, learn: Learner) -> None:
        """forward_error: fail before batch 1's forward."""
        if self.scenario == "forward_error" and self._at(learn, 1):
            msg = "rank 1 cannot read batch 1"
            raise ValueError(msg)

    def step(self, learn: Learner, proceed: Any) -> None:
        """step_escape: cancel batch 2 inside the step work, before stepping."""
        if self.scenario == "step_escape" and self._at(learn, 2):
            raise CancelBatchException("rank 1 skips its step")
        proceed()

    def cleanup_fit(self, learn: Learner) -> None:
        """close_error: fail in the fit's last cleanup."""
        if self.scenario == "close_error" and learn.world.rank == 1:
            msg = "rank 1 cannot clean up"
            raise ValueError(msg)

    def after_epoch(self, learn: Learner) -> None:
        """bad_sum: a reduction every rank makes, rank 1's with a value that is no number."""
        if self.scenario == "bad_sum" and learn.training:
            learn.world.sum([1.0, "x" if learn.world.rank == 1 else 2.0])  # type: ignore[list-item]

    @staticmethod
    def _at(learn: Learner, it: int) -> bool:
        return learn.world.rank == 1 and learn.training and learn.epoch == 0 and learn.iter == it


class RankScore(Callback):
    """A metrics provider whose ``valid_score`` improves on rank 0 and worsens on rank 1."""

    order = 40

    def __init__(self) -> None:
        """Nothing seen yet."""
        self._values: dict[str, float] = {}

    @property
    def values(self) -> dict[str, float]:
        """The last pass's value, keyed ``valid_score``."""
        return self._values

    def names(self) -> list[str]:
        """The one value: ``valid_score``."""
        return ["valid_score"]

    def last_pass(self) -> dict[str, float]:
        """The last value, by name alone."""
        return {"score": self._values.get("valid_score", float("nan"))}

    def before_fit(self, learn: Learner) -> None:
        """Start afresh."""
        self._values = {}

    def after_epoch(self, learn: Learner) -> None:
        """Score the validation pass: lower is better; rank 1's gets worse after epoch 0."""
        if not learn.training:
            worse = learn.world.rank == 1 and learn.epoch >= 1
            self._values = {"valid_score": 1.0 + learn.epoch if worse else 1.0 - learn.epoch}


LATE_FAULTS = frozenset(
    {"late_term", "step_cancel", "bad_sum", "forward_error", "step_escape", "close_error"}
)


def callbacks_for(scenario: str, out: Path) -> list[Callback]:
    """The scenario's callbacks (MetricsCB first, but for early_stop)."""
    cbs: list[Callback] = [MetricsCB()] if scenario != "early_stop" else []
    if scenario == "batch_cancel":
        cbs.append(RankFault(1, 2, CancelBatchException("rank 1 skips batch 2")))
    elif scenario == "early_stop":
        cbs += [RankScore(), EarlyStoppingCB("valid_score", mode="min", patience=0)]
    elif scenario == "value_error":
        cbs.append(RankFault(1, 3, ValueError("bad batch on rank 1")))
    elif scenario == "sigkill":
        fault = RankFault(1, 3, None, kill=True)
        fault.out = out / "killed.json"
        cbs.append(fault)
    elif scenario in {"preempt", "resume", "late_term"}:
        ckpt = out / ("ckpt" if scenario != "late_term" else "ckpt_late")
        cbs.append(CheckpointCB(ckpt, every_n_epochs=1, keep=2))
        if scenario == "preempt":
            cbs.append(RankFault(1, 3, None, term=True))
    elif scenario == "schedule":
        cbs.append(BatchSchedCB.one_cycle(0.5))
    if scenario in LATE_FAULTS:
        cbs.append(LateFaults(scenario))
    return cbs


def learner_for(scenario: str, out: Path) -> Learner:
    """The scenario's learner: its model, data, callbacks and log directory."""
    dls: Any = loaders(BATCH)
    config = Distributed(init=True, timeout=TIMEOUT_S)
    model = make_model()
    if scenario == "forward_error":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    elif scenario == "diverge":
        config = Distributed(init=True, timeout=TIMEOUT_S, distribute_samplers=False)
        x, y = digits()
        n = 6 - int(os.environ["RANK"])  # rank 0: 6 batches, rank 1: 5
        train = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(n)]
        dls = DataLoaders(train, train[:2])
    return Learner(
        model,
        dls,
        F.cross_entropy,
        lr=0.1,
        cbs=callbacks_for(scenario, out),
        audit_log=out / "runs" / scenario,
        distributed=config,
    )


def fit(learn: Learner, scenario: str, out: Path) -> dict[str, Any]:
    """Fit; return the status, or the exception's type, message and notes, and the log."""
    resume = out / "ckpt" if scenario == "resume" else None
    if scenario == "late_start" and os.environ["RANK"] == "1":
        resume = out / "no_such_checkpoint.pt"
    try:
        result = learn.fit(EPOCHS, resume_from=resume)
    except Exception as exc:
        last = learn.last_result
        return {
            "status": "raised",
            "type": type(exc).__name__,
            "message": str(exc),
            "notes": list(getattr(exc, "__notes__", [])),
            "log": None if last is None else str(last.audit_path),
        }
    return {"status": str(result.status), "log": str(result.audit_path)}


def run(scenario: str, out: Path) -> dict[str, Any]:
    """Fit the scenario; return what this rank saw."""
    learn = learner_for(scenario, out)
    start = time.time()
    seen: dict[str, Any] = {"scenario": scenario, **fit(learn, scenario, out)}
    metrics = learn.cbs[0]
    seen |= {
        "seconds": time.time() - start,
        "failed_at": time.time(),
        "rank": learn.world.rank,
        "world_size": learn.world.size,
        "model_type": type(learn.model).__name__,
        "values": dict(metrics.values) if isinstance(metrics, MetricsCB) else {},
        "resumed_from": learn.resumed_from,
        "lr": None if learn.opt is None else learn.opt.param_groups[0]["lr"],
        "checkpoints": sorted(p.name for p in (out / "ckpt").glob("*.pt")),
    }
    torch.save(learn.model.state_dict(), out / f"{scenario}.rank{seen['rank']}.pt")
    return seen


def main() -> None:
    """Run each scenario named on the command line; write what each rank saw."""
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for scenario in sys.argv[2:]:
        seen = run(scenario, out)
        path = out / f"{scenario}.rank{seen['rank']}.json"
        path.write_text(json.dumps(seen, indent=1, default=dict))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
