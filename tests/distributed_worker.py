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

from callbacks import CheckpointCB, EarlyStoppingCB, MetricsCB
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


def run(scenario: str, out: Path) -> dict[str, Any]:
    """Fit the scenario; return what this rank saw."""
    cbs: list[Callback] = [MetricsCB()] if scenario != "early_stop" else []
    dls: Any = loaders(BATCH)
    config = Distributed(init=True, timeout=TIMEOUT_S)
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
    if scenario in {"late_term", "step_cancel", "bad_sum"}:
        cbs.append(LateFaults(scenario))
    elif scenario == "diverge":
        config = Distributed(init=True, timeout=TIMEOUT_S, distribute_samplers=False)
        x, y = digits()
        n = 6 - int(os.environ["RANK"])  # rank 0: 6 batches, rank 1: 5
        train = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(n)]
        dls = DataLoaders(train, train[:2])
    learn = Learner(
        make_model(),
        dls,
        F.cross_entropy,
        lr=0.1,
        cbs=cbs,
        audit_log=out / "runs" / scenario,
        distributed=config,
    )
    start = time.time()
    seen: dict[str, Any] = {"scenario": scenario}
    try:
        resume = out / "ckpt" if scenario == "resume" else None
        if scenario == "late_start" and os.environ["RANK"] == "1":
            resume = out / "no_such_checkpoint.pt"
        result = learn.fit(EPOCHS, resume_from=resume)
        seen |= {"status": str(result.status), "log": str(result.audit_path)}
    except Exception as exc:
        last = learn.last_result
        seen |= {
            "status": "raised",
            "type": type(exc).__name__,
            "message": str(exc),
            "notes": list(getattr(exc, "__notes__", [])),
            "log": None if last is None else str(last.audit_path),
        }
    seen |= {"seconds": time.time() - start, "failed_at": time.time()}
    seen["rank"] = learn.world.rank
    seen["world_size"] = learn.world.size
    seen["model_type"] = type(learn.model).__name__
    seen["values"] = dict(cbs[0].values) if isinstance(cbs[0], MetricsCB) else {}
    seen["resumed_from"] = learn.resumed_from
    seen["checkpoints"] = sorted(p.name for p in (out / "ckpt").glob("*.pt"))
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
