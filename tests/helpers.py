"""Real data and models for the tests (the digits set that ships with scikit-learn), and the
callbacks, readers and resume runs several test modules share."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fsm_learner import Callback, DataLoaders, Hook, Learner
from fsm_learner.checkpoint import read_checkpoint
from fsm_learner.testing import RecordingCallback


@cache
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits, scaled to [0, 1], as (x: float32 [N, 64], y: int64 [N])."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def digits_dls(batch_size: int = 64, n_train: int = 1400, n_valid: int = 397) -> DataLoaders:
    """Training and validation DataLoaders over a fixed random split of digits."""
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:n_train], y[:n_train])
    valid = TensorDataset(x[n_train : n_train + n_valid], y[n_train : n_train + n_valid])
    gen = torch.Generator().manual_seed(0)
    return DataLoaders(
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        DataLoader(valid, batch_size=batch_size),
    )


def batches_dls(n_train: int, n_valid: int, batch_size: int = 8) -> DataLoaders:
    """Exactly n_train and n_valid batches of real digits, as lists (fast, deterministic)."""
    x, y = digits_tensors()

    def cut(start: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                x[start + i * batch_size : start + (i + 1) * batch_size],
                y[start + i * batch_size : start + (i + 1) * batch_size],
            )
            for i in range(n)
        ]

    return DataLoaders(cut(0, n_train), cut(1000, n_valid))


def mlp(seed: int = 0) -> nn.Module:
    """The tiny MLP 64-32-10, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Boom(Exception):
    """The error the fault-injection tests raise."""


class Raiser(Callback):
    """Raises ``make()`` at the n-th call (from 1) of each hook named in ``plan``.

    It counts the calls it sees itself, unless given ``calls``: a counter that a callback
    of lower order keeps for every call (a raiser does not see calls that an earlier
    callback interrupted).
    """

    def __init__(
        self,
        plan: dict[tuple[Hook, int], Callable[[], BaseException]],
        order: int = 0,
        calls: Counter[Hook] | None = None,
    ):
        self.plan, self.order = plan, order
        self.own = calls is None
        self.seen: Counter[Hook] = Counter() if calls is None else calls
        self.raised: list[tuple[Hook, int]] = []

    def _maybe(self, hook: Hook) -> None:
        if self.own:
            self.seen[hook] += 1
        make = self.plan.get((hook, self.seen[hook]))
        if make is not None:
            self.raised.append((hook, self.seen[hook]))
            raise make()


def _raiser_hook(hook: Hook) -> Callable[[Raiser, Learner], None]:
    def call(self: Raiser, learn: Learner) -> None:
        self._maybe(hook)

    call.__name__ = hook.value
    return call


for _hook in Hook:
    setattr(Raiser, _hook.value, _raiser_hook(_hook))


class BatchLosses(Callback):
    """Reads each completed batch's loss and size (a test-only sync), per pass."""

    order = 25

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, float, int]] = []

    def after_batch(self, learn: Learner) -> None:
        self.seen.append((learn.epoch, learn.training, learn.loss.item(), len(learn.batch[1])))

    def mean(self, epoch: int, training: bool) -> float:
        """The sample-weighted mean loss of one pass."""
        rows = [(loss, n) for e, t, loss, n in self.seen if e == epoch and t == training]
        return sum(loss * n for loss, n in rows) / sum(n for _, n in rows)


def raising_learner(
    plan: dict[tuple[Hook, int], Callable[[], BaseException]],
    *,
    n_train: int = 2,
    n_valid: int = 1,
) -> tuple[Learner, RecordingCallback, Raiser]:
    """A learner on real digits whose Raiser follows ``plan``, recorded by a callback before it."""
    rec = RecordingCallback(order=-1)
    raiser = Raiser(plan)
    learn = Learner(mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, [raiser, rec])
    return learn, rec, raiser


def run_records(learn: Learner) -> list[dict[str, Any]]:
    """The records of the learner's last run, read from its audit log as JSON objects."""
    path = learn.audit_path
    assert isinstance(path, Path), "the run wrote no log"
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in records if r.get("run") == learn.run_id]


def same(a: object, b: object) -> bool:
    """Whether two state dicts (nested dicts, lists, tensors, numbers) are equal bit for bit."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


class SelfLossMLP(nn.Module):
    """The seeded MLP fed mapping batches, computing its own loss as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def as_mappings(dls: DataLoaders) -> DataLoaders:
    """The same batches as {"pixels": x, "labels": y}."""

    def convert(batches):
        return [{"pixels": x, "labels": y} for x, y in batches]

    return DataLoaders(convert(dls.train), convert(dls.valid))


# -- real resumes from real checkpoints --------------------------------------------------

Where = tuple[int, bool, int]
"""Where a checkpoint was taken: (epoch, training pass or not, batches of that pass done).

Batches done 0: before that pass, between two passes; ``(1, True, 2)``: after the second
batch of epoch 1's training pass.
"""

CallbackT = TypeVar("CallbackT", bound=Callback)


class CheckpointAt(Callback):
    """Asks for a checkpoint at each of the positions ``at`` (a CheckpointCB writes it)."""

    def __init__(self, at: Iterable[Where]) -> None:
        self.at = set(at)

    def after_batch(self, learn: Learner) -> None:
        if (learn.epoch, learn.training, learn.iter + 1) in self.at:
            learn.request_checkpoint()

    def after_epoch(self, learn: Learner) -> None:
        after = (learn.epoch, False, 0) if learn.training else (learn.epoch + 1, True, 0)
        if after in self.at:
            learn.request_checkpoint()


def checkpointed_fit(
    make_learner: Callable[[], Learner], n_epochs: int, directory: Path, at: Iterable[Where]
) -> tuple[Learner, dict[Where, Path]]:
    """Fit a learner of ``make_learner``, checkpointed into ``directory`` at each position of
    ``at``; return it (the uninterrupted fit) and the checkpoints by position."""
    from callbacks.checkpoint import CheckpointCB

    learn = make_learner()
    writer = CheckpointCB(directory, every_n_batches=None, every_n_epochs=None, keep=None)
    learn.cbs = [*learn.cbs, writer, CheckpointAt(at)]
    learn.fit(n_epochs)
    files = {}
    for path in directory.glob("*.pt"):
        position = read_checkpoint(path).position
        files[position.epoch, position.training, position.iter] = path
    assert set(files) == set(at), f"checkpoints taken {sorted(files)}, wanted {sorted(at)}"
    return learn, files


def checkpointed_fixture(
    make_learner: Callable[[], Learner], n_epochs: int, at: Iterable[Where]
) -> Any:
    """A module-scoped fixture of ``checkpointed_fit``: the uninterrupted fit, its checkpoints."""

    @pytest.fixture(scope="module")
    def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Learner, dict[Where, Path]]:
        directory = tmp_path_factory.mktemp("checkpoints")
        return checkpointed_fit(make_learner, n_epochs, directory, at)

    return checkpointed


def resumed_fit(make_learner: Callable[[], Learner], n_epochs: int, checkpoint: Path) -> Learner:
    """A fresh learner of ``make_learner`` that finishes the checkpoint's fit:
    ``fit(n_epochs, resume_from=checkpoint)``, with a CheckpointCB that writes nothing."""
    from callbacks.checkpoint import CheckpointCB

    learn = make_learner()
    quiet = CheckpointCB(checkpoint.parent, every_n_batches=None, every_n_epochs=None)
    learn.cbs = [*learn.cbs, quiet]
    learn.fit(n_epochs, resume_from=checkpoint)
    resumed = learn.resumed_from
    assert resumed is not None
    assert resumed["path"] == str(checkpoint)
    return learn


def callback_of(learn: Learner, kind: type[CallbackT]) -> CallbackT:
    """The learner's (first) callback of type ``kind``."""
    return next(cb for cb in learn.cbs if isinstance(cb, kind))


def saved_state(checkpoint: Path, key: str) -> Any:
    """The state the checkpoint holds for the callback ``key`` (its class name), read back
    with torch.load(weights_only=True) as a resume reads it."""
    return read_checkpoint(checkpoint).payload["callbacks"][key]


def same_weights(a: Learner, b: Learner) -> bool:
    """Whether the two learners' models hold the same weights, bit for bit."""
    return same(a.model.state_dict(), b.model.state_dict())
