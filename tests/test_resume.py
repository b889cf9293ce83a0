"""Checkpoints and exact resume, in process: every checkpoint of a fit resumes exactly.

(``fsm_learner/checkpoint.py`` and the learner's resume; CheckpointCB itself is
tests/callbacks/test_checkpoint.py, whose basename this module cannot share under pytest's
default import mode; processes killed and restarted are test_resume_processes.py.)

A real fit on the digits (dropout, a shuffled training loader, Adam, MetricsCB) writes a
checkpoint every two batches and after every epoch; resuming from each one, mid training
pass, mid validation pass or between passes, must end bit for bit where the fit without
an interruption ended: the weights, the optimizer's state and MetricsCB's history. Also:
skipping to the saved batch loads none of the skipped samples, ``save``/``load`` at idle,
preemption by SIGTERM, the errors a bad checkpoint gives, atomic writes, and what the
resumed run's log says of its origin.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import Boom, Raiser, digits_tensors, run_records, same
from jsonschema import Draft202012Validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchmetrics.classification import MulticlassAccuracy

from callbacks import CheckpointCB, DeviceCB, EpochSchedCB, MetricsCB
from fsm_learner import (
    Callback,
    CheckpointError,
    ConfigurationError,
    DataLoaders,
    Hook,
    Learner,
    ResumeWarning,
    RunStatus,
    State,
    Trigger,
)
from fsm_learner import checkpoint as fsm_checkpoint
from fsm_learner.checkpoint import VERSION, Position, read_checkpoint
from fsm_learner.cli import main
from fsm_learner.testing import HookRecord, RecordingCallback, expected_trace

BATCH = 32
N_TRAIN, N_VALID = 6, 3
"""Batches per pass: 6 training and 3 validation batches of 32 digits."""
N_EPOCHS = 2
EVERY = 2
"""Batches between two checkpoints: they fall mid training pass, at its end, mid validation."""


# -- the fit ------------------------------------------------------------------------------


def split() -> tuple[TensorDataset, TensorDataset]:
    """A fixed random split of the digits: 192 training and 96 validation samples."""
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n, m = N_TRAIN * BATCH, N_VALID * BATCH
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n : n + m], y[n : n + m])


def net() -> nn.Module:
    """A seeded MLP with dropout: a resume must also give the dropout stream back."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 10))


def torch_loaders(*, num_workers: int = 0) -> DataLoaders:
    """DataLoaders: the training one shuffles with its own generator."""
    train, valid = split()
    gen = torch.Generator().manual_seed(7)
    return DataLoaders(
        DataLoader(train, BATCH, shuffle=True, generator=gen, num_workers=num_workers),
        DataLoader(valid, BATCH, num_workers=num_workers),
    )


def stateful_loaders() -> DataLoaders:
    """torchdata StatefulDataLoaders: the training one shuffles."""
    train, valid = split()
    gen = torch.Generator().manual_seed(7)
    return DataLoaders(
        StatefulDataLoader(train, BATCH, shuffle=True, generator=gen),
        StatefulDataLoader(valid, BATCH),
    )


def global_shuffle() -> DataLoaders:
    """DataLoaders: the training one shuffles from torch's global generator."""
    train, valid = split()
    return DataLoaders(DataLoader(train, BATCH, shuffle=True), DataLoader(valid, BATCH))


def batch_lists() -> DataLoaders:
    """Lists of batches (a Sequence): a resume indexes from the saved batch."""
    return DataLoaders(*(list(DataLoader(part, BATCH)) for part in split()))


class Batches:
    """Re-iterable batches that are not a Sequence and have no sampler: iterated to skip."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


def plain_iterables() -> DataLoaders:
    """The batches as plain re-iterables (deterministic, so a resume is still exact)."""
    lists = batch_lists()
    return DataLoaders(Batches(lists.train), Batches(lists.valid))


def learner(
    dls: DataLoaders,
    directory: str | Path = "ck",
    *cbs: Callback,
    every_n_batches: int | None = EVERY,
    every_n_epochs: int | None = 1,
) -> Learner:
    """Adam on the dropout MLP, with MetricsCB and a CheckpointCB keeping every file."""
    torch.manual_seed(1)  # the dropout stream the fit starts from
    metrics = MetricsCB(MulticlassAccuracy(num_classes=10))
    checkpoints = CheckpointCB(directory, every_n_batches, every_n_epochs, keep=None)
    return Learner(
        net(), dls, F.cross_entropy, 1e-3, [metrics, checkpoints, *cbs], torch.optim.Adam
    )


def final(learn: Learner) -> dict[str, Any]:
    """What an exact resume must reproduce: weights, optimizer state, MetricsCB's history."""
    [metrics] = [cb for cb in learn.cbs if isinstance(cb, MetricsCB)]
    return {
        "model": learn.model.state_dict(),
        "opt": learn.opt.state_dict(),
        "history": metrics.history,
    }


def assert_same_end(resumed: Learner, reference: Learner, what: object) -> None:
    got, want = final(resumed), final(reference)
    assert got["history"] == want["history"], what
    assert same(got["model"], want["model"]), what
    assert same(got["opt"], want["opt"]), what


def checkpoints(directory: str | Path = "ck") -> list[Path]:
    """The checkpoint files of ``directory``, in the order the fit wrote them."""
    return sorted(Path(directory).glob("*.pt"))


def run_id_of(path: Path) -> str:
    return path.stem.rpartition("_")[2]


def expected_names(run_id: str) -> list[str]:
    """The files of the reference fit: every 2nd batch of 9 per epoch, and every epoch end."""
    return [
        f"ckpt_e{ep:04d}_{pass_}_b{it:06d}_{run_id}.pt"
        for ep, pass_, it in [
            (0, "train", 2),
            (0, "train", 4),
            (0, "train", 6),  # the last training batch: a boundary of the pass
            (0, "valid", 2),
            (1, "train", 0),  # epoch 0's end: before epoch 1's training pass
            (1, "train", 1),
            (1, "train", 3),
            (1, "train", 5),
            (1, "valid", 1),
            (1, "valid", 3),
            (2, "train", 0),  # the fit's end
        ]
    ]


# -- resuming from every checkpoint -------------------------------------------------------


def resume_every_checkpoint(
    make_dls: Callable[[], DataLoaders], *, warns: bool = False, only: Sequence[int] = ()
) -> int:
    """Fit without interruption, then resume from each of its checkpoints in a fresh learner.

    ``warns``: the training data cannot skip without loading (a mid-pass resume warns).
    ``only``: the indices of the checkpoints to resume (all by default). Return how many
    were resumed.
    """
    reference = learner(make_dls())
    result = reference.fit(N_EPOCHS)
    files = checkpoints()
    assert [f.name for f in files] == expected_names(result.run_id)
    chosen = [files[i] for i in only] if only else files
    for file in chosen:
        resumed = learner(make_dls(), "resumed")
        at = read_checkpoint(file).position
        if warns and at.state is State.EPOCH:
            with pytest.warns(ResumeWarning, match=rf"first {at.iter} batch\(es\) were loaded"):
                status = resumed.fit(N_EPOCHS, resume_from=file).status
        else:
            status = resumed.fit(N_EPOCHS, resume_from=file).status
        assert status is RunStatus.COMPLETED
        assert_same_end(resumed, reference, file.name)
    return len(chosen)


STATEFUL_WARNING = pytest.mark.filterwarnings(
    # torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates
    "ignore:'set_vital' is deprecated:UserWarning"
)


class TestResumeFromEveryCheckpoint:
    """Each checkpoint of a fit, whatever the data, resumes to the uninterrupted fit's end."""

    def test_torch_dataloader(self):
        """DataLoaders with a shuffling generator: all 11 checkpoints resume exactly."""
        assert resume_every_checkpoint(torch_loaders) == 11

    def test_torch_dataloader_with_workers(self):
        """Two worker processes per loader: mid training pass, mid validation, between epochs.

        Three of the checkpoints only (workers start slowly), one of each kind of position.
        """
        with_workers = partial(torch_loaders, num_workers=2)
        assert resume_every_checkpoint(with_workers, only=(1, 3, 4)) == 3

    def test_list_of_batches(self):
        """A list of batches is indexed from the saved batch."""
        assert resume_every_checkpoint(batch_lists) == 11

    @STATEFUL_WARNING
    def test_stateful_dataloader_in_the_last_epoch(self):
        """torchdata's StatefulDataLoader is restored from its own state_dict: the last epoch."""
        assert resume_every_checkpoint(stateful_loaders, only=range(5, 11)) == 6

    @STATEFUL_WARNING
    def test_stateful_dataloader_before_the_last_epoch(self):
        """The checkpoints of epoch 0, and between the epochs: the next epoch must match too."""
        assert resume_every_checkpoint(stateful_loaders, only=range(5)) == 5

    def test_plain_iterable_warns_and_is_still_exact(self):
        """A re-iterable that is no Sequence is iterated and dropped, with a ResumeWarning."""
        assert resume_every_checkpoint(plain_iterables, warns=True) == 11

    def test_plain_iterable_warning_names_what_skips_without_loading(self):
        """The warning names the data's type, the batches dropped and what would not load."""
        learner(plain_iterables()).fit(N_EPOCHS)
        file = checkpoints()[1]  # epoch 0, training pass, after 4 batches
        with pytest.warns(ResumeWarning) as caught:
            learner(plain_iterables(), "resumed").fit(N_EPOCHS, resume_from=file)
        assert [str(w.message) for w in caught] == [
            (
                "resuming mid-pass over a Batches, which has no sampler to advance: its first 4 "
                "batch(es) were loaded again and dropped (a torch DataLoader over a map-style "
                "dataset, a sequence, or a loader with state_dict() skips without loading)"
            )
        ]

    def test_plain_iterable_warning_points_at_the_fit_call(self):
        """The ResumeWarning names the line that called fit, as the directory fallback's does."""
        learner(plain_iterables()).fit(N_EPOCHS)
        with pytest.warns(ResumeWarning) as caught:
            learner(plain_iterables(), "resumed").fit(N_EPOCHS, resume_from=checkpoints()[1])
        assert [Path(w.filename).name for w in caught] == ["test_resume.py"]

    def test_shuffling_from_the_global_generator(self):
        """A DataLoader without a generator of its own draws its order from torch's: exact too."""
        assert resume_every_checkpoint(global_shuffle) == 11

    def test_a_resumed_fit_resumes_again(self):
        """A checkpoint of a resumed fit resumes to the same end: a chain of preemptions."""
        reference = learner(torch_loaders())
        reference.fit(N_EPOCHS)
        first = learner(torch_loaders(), "first")
        first.fit(N_EPOCHS, resume_from=checkpoints()[2])
        [second_file] = [f for f in checkpoints("first") if "e0001_train_b000003" in f.name]
        second = learner(torch_loaders(), "second")
        second.fit(N_EPOCHS, resume_from=second_file)
        assert_same_end(second, reference, second_file.name)
        assert second.resumed_from["run"] == first.run_id

    def test_a_float64_model(self):
        """DeviceCB(dtype=float64): the weights are loaded in float64, not rounded to float32."""

        def with_float64(dls: DataLoaders, directory: str = "ck") -> Learner:
            return learner(dls, directory, DeviceCB("cpu", dtype=torch.float64))

        reference = with_float64(torch_loaders())
        reference.fit(N_EPOCHS)
        for file in [checkpoints()[i] for i in (1, 3, 4)]:
            resumed = with_float64(torch_loaders(), "resumed")
            resumed.fit(N_EPOCHS, resume_from=file)
            assert_same_end(resumed, reference, file.name)
        fresh = net()
        fresh.load_state_dict(reference.model.state_dict())  # float64 weights, a float32 model
        loaded = Learner(fresh, torch_loaders(), F.cross_entropy, 1e-3, [], torch.optim.Adam)
        reference.save("idle.pt")
        loaded.load("idle.pt", strict=False)
        assert loaded.model[0].weight.dtype == torch.float64
        assert same(loaded.model.state_dict(), reference.model.state_dict())

    def test_a_batch_sampler_with_its_own_generator(self):
        """A custom batch sampler shuffling with its own generator: its state is kept too."""

        class Shuffled(torch.utils.data.Sampler[list[int]]):
            def __init__(self, n: int) -> None:
                self.n, self.generator = n, torch.Generator().manual_seed(3)

            def __len__(self) -> int:
                return self.n // BATCH

            def __iter__(self) -> Iterator[list[int]]:
                order = torch.randperm(self.n, generator=self.generator).tolist()
                return iter([order[i : i + BATCH] for i in range(0, self.n, BATCH)])

        def shuffled() -> DataLoaders:
            train, valid = split()
            return DataLoaders(
                DataLoader(train, batch_sampler=Shuffled(len(train))), DataLoader(valid, BATCH)
            )

        assert resume_every_checkpoint(shuffled, only=(1, 4, 6, 9)) == 4

    def test_persistent_workers_warn(self):
        """A loader with persistent workers draws its seed once: the resume says it may drift."""
        train, valid = split()
        dls = DataLoaders(DataLoader(train, BATCH), DataLoader(valid, BATCH))
        learner(dls).fit(1)
        persistent = DataLoaders(
            DataLoader(train, BATCH, num_workers=1, persistent_workers=True),
            DataLoader(valid, BATCH),
        )
        with pytest.warns(ResumeWarning, match="persistent_workers=True: its workers draw"):
            learner(persistent, "resumed").fit(1, resume_from=checkpoints()[1])

    def test_schedule_across_a_resume(self):
        """An epoch schedule (StepLR) continues at the same rates after a resume."""

        def step_lr() -> EpochSchedCB:
            return EpochSchedCB(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))

        reference = learner(torch_loaders(), "ck", step_lr())
        reference.fit(N_EPOCHS)
        files = checkpoints()
        del files[2]  # the training pass's end: test_schedule_at_the_end_of_a_training_pass
        for file in files:
            resumed = learner(torch_loaders(), "resumed", step_lr())
            resumed.fit(N_EPOCHS, resume_from=file)
            assert_same_end(resumed, reference, file.name)
            assert resumed.opt.param_groups[0]["lr"] == 1e-3 / 4

    def test_schedule_at_the_end_of_a_training_pass(self):
        """Resumed after the last training batch, the epoch schedule steps first: no warning."""

        def step_lr() -> EpochSchedCB:
            return EpochSchedCB(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))

        reference = learner(torch_loaders(), "ck", step_lr())
        reference.fit(N_EPOCHS)
        file = checkpoints()[2]
        assert read_checkpoint(file).position == Position(State.EPOCH, 0, True, N_TRAIN)
        resumed = learner(torch_loaders(), "resumed", step_lr())
        resumed.fit(N_EPOCHS, resume_from=file)
        assert_same_end(resumed, reference, file.name)


# -- skipped batches are never loaded -----------------------------------------------------


class Counting(Dataset):
    """A map-style dataset that lists the index of every sample it loads."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        self.loaded.append(int(i))
        return self.data[i]


class CountingBatches(Sequence):
    """A sequence of batches that lists the index of every batch it gives."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(i, slice):  # pragma: no cover (the learner indexes one at a time)
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self.batches):
            raise IndexError(i)
        self.loaded.append(i)
        return self.batches[i]


def counting_loaders(kind: type[DataLoader]) -> DataLoaders:
    train, valid = split()
    gen = torch.Generator().manual_seed(7)
    return DataLoaders(
        kind(Counting(train), BATCH, shuffle=True, generator=gen),
        kind(Counting(valid), BATCH),
    )


def loaded(data: DataLoader | CountingBatches) -> list[int]:
    """What the counting dataset (or sequence) under ``data`` loaded."""
    return data.loaded if isinstance(data, CountingBatches) else data.dataset.loaded


def counting_batches() -> DataLoaders:
    lists = batch_lists()
    return DataLoaders(CountingBatches(lists.train), CountingBatches(lists.valid))


def units_before(at: Position, training: bool, per_batch: int) -> int:
    """The samples (or batches) of the ``training`` passes a fit loaded before position ``at``."""
    n = N_TRAIN if training else N_VALID
    passes = at.epoch + (1 if training and not at.training else 0)  # the passes completed
    begun = at.iter if at.state is State.EPOCH and at.training == training else 0
    return (passes * n + begun) * per_batch


class TestSkippedBatchesAreNotLoaded:
    """After a resume, the data loads exactly the remaining batches: the fit's tail, no more."""

    @STATEFUL_WARNING
    @pytest.mark.parametrize(
        ("make_dls", "per_batch", "first"),
        [
            (lambda: counting_loaders(DataLoader), BATCH, 0),
            # the last epoch's only: test_stateful_dataloader_before_the_last_epoch
            (lambda: counting_loaders(StatefulDataLoader), BATCH, 5),
            (counting_batches, 1, 0),
        ],
        ids=["DataLoader", "StatefulDataLoader", "Sequence"],
    )
    def test_only_the_remaining_batches_are_loaded(self, make_dls, per_batch, first):
        """Each resume loads the uninterrupted fit's indices from the saved batch on, in order."""
        reference_dls = make_dls()
        learner(reference_dls).fit(N_EPOCHS)
        whole = {True: loaded(reference_dls.train), False: loaded(reference_dls.valid)}
        n = {True: N_TRAIN, False: N_VALID}
        assert {k: len(v) for k, v in whole.items()} == {
            k: N_EPOCHS * n[k] * per_batch for k in whole
        }
        for file in checkpoints()[first:]:
            at = read_checkpoint(file).position
            dls = make_dls()
            learner(dls, "resumed").fit(N_EPOCHS, resume_from=file)
            for training, data in ((True, dls.train), (False, dls.valid)):
                skipped = units_before(at, training, per_batch)
                assert loaded(data) == whole[training][skipped:], (file.name, training)

    def test_a_mid_pass_resume_loads_fewer_samples(self):
        """Concretely: resumed after 4 of 6 training batches, epoch 0 loads 2 batches more."""
        learner(torch_loaders()).fit(N_EPOCHS)
        dls = counting_loaders(DataLoader)
        learner(dls, "resumed").fit(N_EPOCHS, resume_from=checkpoints()[1])
        assert (len(loaded(dls.train)), len(loaded(dls.valid))) == (
            (2 + N_TRAIN) * BATCH,
            2 * N_VALID * BATCH,
        )


# -- save and load at idle ----------------------------------------------------------------


class TestSaveAndLoad:
    """``save`` at idle and ``load`` in a fresh learner continue as if nothing happened."""

    def test_fit_save_load_fit_is_fit_of_all(self):
        """fit(2), save; a fresh learner loads and fits 2: the same as fit(4) bit for bit.

        The loader shuffles from torch's generator, which the checkpoint holds.
        """
        whole = learner(global_shuffle())
        whole.fit(4)
        first = learner(global_shuffle())
        first.fit(2)
        assert first.save("saved.pt") == Path("saved.pt")
        torch.manual_seed(123)  # the fresh process's generator: load gives the saved one back
        second = learner(global_shuffle())
        assert second.load("saved.pt") == Position(State.IDLE)
        second.fit(2)
        got, want = final(second), final(whole)
        assert same(got["model"], want["model"])
        assert same(got["opt"], want["opt"])
        # a history is per fit: its epochs count from the fit's start
        assert [{**row, "epoch": row["epoch"] + 2} for row in got["history"]] == want["history"][2:]

    def test_fit_save_load_fit_with_a_loader_generator(self):
        """The same with a DataLoader that shuffles from a generator of its own."""
        whole = learner(torch_loaders())
        whole.fit(4)
        first = learner(torch_loaders())
        first.fit(2)
        first.save("saved.pt")
        second = learner(torch_loaders())
        second.load("saved.pt")
        second.fit(2)
        assert same(final(second)["model"], final(whole)["model"])

    def test_schedulers_across_fits(self):
        """With a schedule per fit, save/load between fits equals fit(2); fit(2) on one learner."""

        def step_lr() -> EpochSchedCB:
            return EpochSchedCB(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))

        one = learner(global_shuffle(), "ck", step_lr())
        one.fit(2)
        one.fit(2)
        first = learner(global_shuffle(), "ck", step_lr())
        first.fit(2)
        first.save("saved.pt")
        second = learner(global_shuffle(), "ck", step_lr())
        second.load("saved.pt")
        second.fit(2)
        assert same(final(second)["model"], final(one)["model"])
        assert same(final(second)["opt"], final(one)["opt"])

    def test_load_builds_the_optimizer(self):
        """A fresh learner has no optimizer yet: load builds it and gives it its state."""
        first = learner(torch_loaders())
        first.fit(1)
        first.save("saved.pt")
        second = learner(torch_loaders())
        assert second.opt is None
        second.load("saved.pt")
        assert same(second.opt.state_dict(), first.opt.state_dict())
        assert same(second.model.state_dict(), first.model.state_dict())

    def test_strict_load_refuses_other_callbacks(self):
        """strict=True refuses states of callbacks learn.cbs lacks; strict=False skips them."""
        first = learner(torch_loaders())
        first.fit(1)
        first.save("saved.pt")
        bare = Learner(net(), torch_loaders(), F.cross_entropy, 1e-3, None, torch.optim.Adam)
        with pytest.raises(CheckpointError) as caught:
            bare.load("saved.pt")
        assert str(caught.value) == (
            "checkpoint saved.pt holds the state of ['CheckpointCB', 'MetricsCB'], which "
            "learn.cbs lacks (it has none): resume with the callbacks the checkpointed fit had"
        )
        assert bare.opt is None  # nothing loaded
        assert bare.load("saved.pt", strict=False) == Position(State.IDLE)
        assert same(bare.model.state_dict(), first.model.state_dict())

    def test_save_during_a_fit_is_refused(self):
        """save() belongs to idle: in a hook it raises, and the fit fails with it."""

        class SaveInHook(Callback):
            def after_batch(self, learn: Learner) -> None:
                learn.save("inside.pt")

        learn = learner(torch_loaders(), "ck", SaveInHook())
        with pytest.raises(Exception, match=r"^save\(\) called in state 'step' while a fit"):
            learn.fit(1)
        assert not Path("inside.pt").exists()


# -- preemption ---------------------------------------------------------------------------


@pytest.fixture
def previous_handler() -> Iterator[Callable[[int, object], None]]:
    """A SIGTERM handler of the test's own, installed before and removed after the test."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    original = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, original)


class Sigterm(Callback):
    """Sends this process SIGTERM after the ``at``-th batch of the fit (counted from 1)."""

    order = 50

    def __init__(self, at: int) -> None:
        self.at, self.batches = at, 0

    def after_batch(self, learn: Learner) -> None:
        self.batches += 1
        if self.batches == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAfterTrainingPass(Callback):
    """Sends SIGTERM in after_epoch of the training pass of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_epoch(self, learn: Learner) -> None:
        if learn.training and learn.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


class HandlerSeen(Callback):
    """Notes the SIGTERM handler in effect while the fit runs."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def before_fit(self, learn: Learner) -> None:
        self.seen.append(signal.getsignal(signal.SIGTERM))


def audited(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", str(path)])
    out, _err = capsys.readouterr()
    return code, out


def footer_of(learn: Learner) -> dict[str, Any]:
    [footer] = [r for r in run_records(learn) if r["ev"] == "run_end"]
    return footer


def cut_at(trace: list[HookRecord], record: HookRecord) -> list[HookRecord]:
    """The trace up to and including ``record``."""
    return trace[: trace.index(record) + 1]


class TestPreemption:
    """SIGTERM during a fit with a CheckpointCB: the batch ends, a checkpoint, then preempt."""

    def test_sigterm_mid_training_pass(self, previous_handler, capsys):
        """SIGTERM after batch 4: the hooks, status, footer, audit, checkpoint and resume."""
        reference = learner(torch_loaders())
        reference.fit(N_EPOCHS)
        rec = RecordingCallback()
        learn = learner(
            torch_loaders(), "pre", rec, Sigterm(4), every_n_batches=None, every_n_epochs=None
        )
        result = learn.fit(N_EPOCHS)
        assert result.status is RunStatus.PREEMPTED
        assert learn.last_result == result
        assert learn.state is State.IDLE
        whole = expected_trace(n_epochs=N_EPOCHS, batches=(N_TRAIN, N_VALID))
        cleanup = HookRecord(Hook.CLEANUP_BATCH, State.EPOCH, 0, 3, True)
        assert rec.records == [
            *cut_at(whole, cleanup),
            HookRecord(Hook.AFTER_PREEMPT, State.IDLE, 0, 3, True),
            HookRecord(Hook.CLEANUP_EPOCH, State.IDLE, 0, 3, True),
            HookRecord(Hook.CLEANUP_FIT, State.IDLE, 0, 3, True),
        ]
        assert footer_of(learn)["status"] == "preempted"
        assert audited(result.audit_path, capsys)[0] == 0
        [file] = checkpoints("pre")
        assert file.name == f"ckpt_e0000_train_b000004_{result.run_id}.pt"
        assert read_checkpoint(file).position == Position(State.EPOCH, 0, True, 4)
        assert signal.getsignal(signal.SIGTERM) is previous_handler
        resumed = learner(torch_loaders(), "pre")
        assert resumed.fit(N_EPOCHS, resume_from="pre").status is RunStatus.COMPLETED
        assert_same_end(resumed, reference, file.name)

    def test_sigterm_during_a_checkpoint_write_preempts_there(self, previous_handler, monkeypatch):
        """SIGTERM while the checkpoint after batch 2 is written: that one serves, no batch more."""
        saved = torch.save

        def save_then_sigterm(*args: Any, **kwargs: Any) -> None:
            saved(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(fsm_checkpoint.torch, "save", save_then_sigterm)
        learn = learner(torch_loaders(), "pre")
        result = learn.fit(N_EPOCHS)
        assert result.status is RunStatus.PREEMPTED
        assert [f.name for f in checkpoints("pre")] == [
            f"ckpt_e0000_train_b000002_{result.run_id}.pt"
        ]
        assert learn.counts[Trigger.END_BATCH, True] == 2

    def test_resumed_after_the_last_pass_hooks_read_the_same_counters(self, previous_handler):
        """A checkpoint after the last pass: after_fit reads the epoch and batch it read then."""

        class Counters(Callback):
            def __init__(self) -> None:
                self.seen: list[tuple[int, int]] = []

            def after_fit(self, learn: Learner) -> None:
                self.seen.append((learn.epoch, learn.iter))

        reference_counters, resumed_counters = Counters(), Counters()
        reference = learner(torch_loaders(), "ck", reference_counters)
        reference.fit(N_EPOCHS)
        last = checkpoints()[-1]
        assert read_checkpoint(last).position == Position(State.FIT, N_EPOCHS, True, 0)
        resumed = learner(torch_loaders(), "resumed", resumed_counters)
        resumed.fit(N_EPOCHS, resume_from=last)
        assert resumed_counters.seen == reference_counters.seen == [(N_EPOCHS - 1, N_VALID - 1)]
        assert_same_end(resumed, reference, last.name)

    def test_sigterm_mid_validation_pass(self, previous_handler):
        """SIGTERM after the 8th batch (2nd of validation): preempted there, resumed exactly."""
        reference = learner(torch_loaders())
        reference.fit(N_EPOCHS)
        rec = RecordingCallback()
        learn = learner(torch_loaders(), "pre", rec, Sigterm(N_TRAIN + 2), every_n_batches=None)
        assert learn.fit(N_EPOCHS).status is RunStatus.PREEMPTED
        assert rec.hooks[-5:] == [
            Hook.AFTER_BATCH,
            Hook.CLEANUP_BATCH,
            Hook.AFTER_PREEMPT,
            Hook.CLEANUP_EPOCH,
            Hook.CLEANUP_FIT,
        ]
        assert [f.name for f in checkpoints("pre")] == [
            f"ckpt_e0000_valid_b000002_{learn.run_id}.pt"
        ]
        resumed = learner(torch_loaders(), "pre")
        resumed.fit(N_EPOCHS, resume_from="pre")
        assert_same_end(resumed, reference, "valid_b2")

    def test_sigterm_at_a_pass_boundary_preempts_from_fit(self, previous_handler, capsys):
        """SIGTERM in the training pass's after_epoch: preempted before the validation pass."""
        reference = learner(torch_loaders())
        reference.fit(N_EPOCHS)
        rec = RecordingCallback()
        learn = learner(
            torch_loaders(),
            "pre",
            rec,
            SigtermAfterTrainingPass(1),
            every_n_batches=None,
            every_n_epochs=None,
        )
        result = learn.fit(N_EPOCHS)
        assert result.status is RunStatus.PREEMPTED
        whole = expected_trace(n_epochs=N_EPOCHS, batches=(N_TRAIN, N_VALID))
        cleanup = HookRecord(Hook.CLEANUP_EPOCH, State.FIT, 1, N_TRAIN - 1, True)
        assert rec.records == [
            *cut_at(whole, cleanup),
            HookRecord(Hook.AFTER_PREEMPT, State.IDLE, 1, N_TRAIN - 1, True),
            HookRecord(Hook.CLEANUP_FIT, State.IDLE, 1, N_TRAIN - 1, True),
        ]
        assert rec.hooks[-4:] == [
            Hook.AFTER_EPOCH,
            Hook.CLEANUP_EPOCH,
            Hook.AFTER_PREEMPT,
            Hook.CLEANUP_FIT,
        ]
        assert footer_of(learn)["status"] == "preempted"
        assert audited(result.audit_path, capsys)[0] == 0
        [file] = checkpoints("pre")
        assert file.name == f"ckpt_e0001_valid_b000000_{result.run_id}.pt"
        assert read_checkpoint(file).position == Position(State.FIT, 1, False, 0)
        resumed = learner(torch_loaders(), "pre")
        resumed.fit(N_EPOCHS, resume_from=file)
        assert_same_end(resumed, reference, file.name)

    def test_the_resumed_run_audits_too(self, previous_handler, capsys):
        """The preempted run and the run that resumed it both verify."""
        learn = learner(torch_loaders(), "pre", Sigterm(3), every_n_batches=None)
        first = learn.fit(N_EPOCHS)
        resumed = learner(torch_loaders(), "pre")
        second = resumed.fit(N_EPOCHS, resume_from="pre")
        assert [audited(r.audit_path, capsys)[0] for r in (first, second)] == [0, 0]

    def test_handler_during_and_after_the_fit(self, previous_handler):
        """While the fit runs, SIGTERM is the learner's; after it, the previous handler again."""
        seen = HandlerSeen()
        learner(batch_lists(), "ck", seen).fit(1)
        [during] = seen.seen
        assert during is not previous_handler
        assert callable(during)
        assert signal.getsignal(signal.SIGTERM) is previous_handler

    def test_handler_restored_after_a_failing_fit(self, previous_handler):
        """A fit that fails puts the previous handler back too."""
        learn = learner(batch_lists(), "ck", Raiser({(Hook.AFTER_BATCH, 3): Boom}))
        with pytest.raises(Boom):
            learn.fit(1)
        assert signal.getsignal(signal.SIGTERM) is previous_handler

    def test_handler_restored_when_the_default_was_in_place(self):
        """With the default disposition before the fit, the default again after it."""
        original = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            learner(batch_lists()).fit(1)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        finally:
            signal.signal(signal.SIGTERM, original)

    def test_no_handler_without_a_checkpointer(self, previous_handler):
        """Without a CheckpointCB the fit leaves SIGTERM alone: it is not preemptible."""
        seen = HandlerSeen()
        Learner(net(), batch_lists(), F.cross_entropy, 1e-3, [seen]).fit(1)
        assert seen.seen == [previous_handler]

    def test_no_handler_outside_the_main_thread(self, previous_handler):
        """A fit in another thread cannot take signals: it leaves the handler as it is."""
        seen = HandlerSeen()
        learn = learner(batch_lists(), "ck", seen)
        results = []
        thread = threading.Thread(target=lambda: results.append(learn.fit(1)))
        thread.start()
        thread.join()
        assert [r.status for r in results] == [RunStatus.COMPLETED]
        assert seen.seen == [previous_handler]
        assert signal.getsignal(signal.SIGTERM) is previous_handler

    def test_no_handler_in_validate(self, previous_handler):
        """validate() is no fit: SIGTERM stays the previous handler's."""
        seen = HandlerSeen()

        class SeenInPass(HandlerSeen):
            def before_epoch(self, learn: Learner) -> None:
                self.seen.append(signal.getsignal(signal.SIGTERM))

        seen = SeenInPass()
        learner(batch_lists(), "ck", seen).validate()
        assert seen.seen == [previous_handler]


# -- errors -------------------------------------------------------------------------------


def small_learner(directory: str = "ck", *cbs: Callback) -> Learner:
    """One epoch of 3 training and 2 validation batches, a checkpoint every 2 batches."""
    train, valid = split()
    dls = DataLoaders(list(DataLoader(train, BATCH))[:3], list(DataLoader(valid, BATCH))[:2])
    return learner(dls, directory, *cbs)


@pytest.fixture
def written() -> list[Path]:
    """The checkpoints of a 1-epoch fit: batch 2 (training), batch 4 (validation), the end."""
    small_learner().fit(1)
    files = checkpoints()
    assert len(files) == 3
    return files


sprung: list[str] = []


def spring() -> None:
    """What unpickling a Trap calls: it must never run."""
    sprung.append("ran")


class Trap:
    """Pickled, it calls ``spring`` when loaded (code in a checkpoint)."""

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return spring, ()


class System:
    """Pickled, it would call os.system when loaded."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, ("true",)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


class TestErrors:
    """A checkpoint that cannot resume this fit is refused at once, in one line naming it."""

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"junk", "error: unpack requires a buffer of 4 bytes"),
            (bytes(range(256)) * 4, "Unsupported operand 0"),
            (b"PK\x03\x04 not a zip", "RuntimeError: PytorchStreamReader failed reading zip "),
            (b"\x80\x02K\x01.", "RuntimeError: Invalid magic number; corrupt file?"),
        ],
        ids=["short", "bad-opcode", "bad-zip", "bad-magic"],
    )
    def test_corrupt_file(self, data, reason):
        """Garbage: cannot be read, and the message names the file and the reason."""
        Path("corrupt.pt").write_bytes(data)
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="corrupt.pt")
        assert one_line(caught).startswith(
            "checkpoint corrupt.pt cannot be read (truncated, corrupt, or not a torch.save "
            f"file of plain data): {reason}"
        )

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (
                lambda p: p["position"].update(iter=-1),
                "position.iter must be an int >= 0, got -1",
            ),
            (
                lambda p: p["position"].update(counts=[["teleport", True, 3]]),
                "position.counts must be [trigger, training, count] triples, got list",
            ),
            (
                lambda p: p.update({"pass": None}),
                "pass must be the state of the pass in progress (rng, generators), got NoneType",
            ),
            (
                lambda p: p["rng"].update(torch=torch.zeros(3)),
                "rng must be generator states (torch's, random's), got dict",
            ),
            (
                lambda p: p.update(grads={"w": 1.0}),
                "grads must be a dict of parameter names to tensors, got dict",
            ),
            (
                lambda p: p.update(callbacks={"MetricsCB": [1]}),
                "callbacks must be a dict of callback names to state dicts, got dict",
            ),
            (lambda p: p.update(optimizer=[]), "optimizer must be a dict or None, got list"),
            (
                lambda p: p["rng"].update(random=[3, [1, 2], None]),
                "rng must be generator states (torch's, random's), got dict",
            ),
            (
                lambda p: p["position"].update(iter=50),
                (
                    "holds an impossible position: epoch 0, training pass, after 50 batch(es), "
                    "in a pass of 3 batch(es)"
                ),
            ),
            (
                lambda p: p.update(optimizer=None),
                "holds no optimizer state, which a fit in progress has",
            ),
            (
                lambda p: p.update(grads={"0.weight": torch.zeros(2, 2)}),
                "holds gradients of other shapes than the model's: ['0.weight (2, 2) vs (32, 64)']",
            ),
            (
                lambda p: p["model"].update({"0.weight": 1.0}),
                "model holds entries that are no tensors: ['0.weight']",
            ),
        ],
        ids=[
            "iter",
            "counts",
            "pass",
            "rng",
            "grads",
            "callbacks",
            "optimizer",
            "random",
            "beyond",
            "no-optimizer",
            "grad-shape",
            "model-entry",
        ],
    )
    def test_tampered_contents(self, written, change, message):
        """A checkpoint rewritten with contents the loop cannot use is refused before the fit."""
        payload = torch.load(written[0], weights_only=True)
        change(payload)
        torch.save(payload, "tampered.pt")
        learn = small_learner()
        before = [p.detach().clone() for p in learn.model.parameters()]
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from="tampered.pt")
        assert one_line(caught) in {
            f"checkpoint tampered.pt: {message}",  # a field's
            f"checkpoint tampered.pt {message}",  # what does not fit this fit
        }
        assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters(), strict=True))
        assert learn.last_result is None

    def test_random_bytes(self):
        """Whatever garbage the unpickler meets, the error is a CheckpointError."""
        rng = random.Random(0)  # noqa: S311 (reproducible garbage, no secret)
        for n in range(40):
            Path(f"random{n}.pt").write_bytes(rng.randbytes(rng.randrange(1, 3000)))
            with pytest.raises(CheckpointError, match=rf"^checkpoint random{n}\.pt cannot be "):
                read_checkpoint(Path(f"random{n}.pt"))

    def test_truncated_file(self, written):
        """A checkpoint cut in half cannot be read; nothing ran."""
        cut = Path("cut.pt")
        cut.write_bytes(written[0].read_bytes()[: written[0].stat().st_size // 2])
        learn = small_learner()
        before = {k: v.clone() for k, v in learn.model.state_dict().items()}
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from=cut)
        assert one_line(caught).startswith("checkpoint cut.pt cannot be read (truncated, ")
        assert learn.last_result is None
        assert learn.audit_path is None
        assert same(learn.model.state_dict(), before)

    def test_empty_file(self):
        """An empty .pt file cannot be read."""
        Path("empty.pt").touch()
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="empty.pt")
        assert one_line(caught).startswith("checkpoint empty.pt cannot be read (truncated, ")

    def test_not_a_checkpoint(self):
        """A torch.save file of plain data that is no checkpoint names what it holds."""
        torch.save({"weights": torch.zeros(2), "epoch": 3}, "other.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="other.pt")
        assert one_line(caught) == (
            "other.pt is not an fsm_learner checkpoint (Learner.save or CheckpointCB writes "
            "them; format 'fsm_learner.checkpoint'); it holds keys ['epoch', 'weights']"
        )

    def test_model_weights_alone(self):
        """A bare state_dict (SaveModelCB's kind of file) is not a checkpoint either."""
        torch.save(net().state_dict(), "weights.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="weights.pt")
        assert one_line(caught) == (
            "weights.pt is not an fsm_learner checkpoint (Learner.save or CheckpointCB writes "
            "them; format 'fsm_learner.checkpoint'); it holds keys ['0.bias', '0.weight', "
            "'3.bias', '3.weight']"
        )

    def test_other_version(self, written):
        """A checkpoint of another format version is refused, naming both versions."""
        payload = torch.load(written[0], weights_only=True)
        torch.save({**payload, "version": VERSION + 1}, "future.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="future.pt")
        assert one_line(caught) == f"checkpoint future.pt is version {VERSION + 1}; this reads 1"

    def test_pickled_code_is_refused_and_never_runs(self, written):
        """A file with a pickled callable is refused without running it."""
        payload = torch.load(written[0], weights_only=True)
        torch.save({**payload, "meta": Trap()}, "trap.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="trap.pt")
        assert one_line(caught) == (
            f"checkpoint trap.pt holds the global {__name__}.spring: refused, "
            "since loading it could run code (checkpoints are read with "
            "torch.load(weights_only=True))"
        )
        assert sprung == []
        with pytest.raises(CheckpointError, match=r"^checkpoint trap\.pt holds the global "):
            small_learner().load("trap.pt")
        assert sprung == []

    def test_a_blocked_module_is_refused_as_code(self, written):
        """A pickled os.system (a module torch blocks outright) is refused as code, not garbage."""
        payload = torch.load(written[0], weights_only=True)
        torch.save({**payload, "meta": System()}, "system.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="system.pt")
        assert one_line(caught) == (
            f"checkpoint system.pt holds the global {os.system.__module__}.system: refused, "
            "since loading it could run code (checkpoints are read with "
            "torch.load(weights_only=True))"
        )

    def test_missing_field(self, written):
        """A checkpoint without its position names the field."""
        payload = torch.load(written[0], weights_only=True)
        del payload["position"]
        torch.save(payload, "nopos.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="nopos.pt")
        assert one_line(caught) == "checkpoint nopos.pt: position must be a dict, got missing"

    def test_directory_with_the_newest_corrupt(self, written):
        """A directory resumes from the newest checkpoint that reads, warning of the others."""
        reference = small_learner("ref")
        reference.fit(1)
        newest = written[-1]
        bad = Path("ck/ckpt_e9999_train_b000000_broken.pt")
        bad.write_bytes(b"PK\x03\x04 not really a zip")
        later = newest.stat().st_mtime_ns + 10**9
        os.utime(bad, ns=(later, later))
        resumed = small_learner("resumed")
        with pytest.warns(ResumeWarning) as caught:
            resumed.fit(1, resume_from="ck")
        [message] = [str(w.message) for w in caught]
        assert message.startswith(
            f"resuming from {newest}, the newest checkpoint that reads; newer ones do not: "
            f"checkpoint {bad} cannot be read (truncated, corrupt, or not a torch.save file "
        )
        assert "\n" not in message
        assert resumed.resumed_from["path"] == str(newest)
        assert_same_end(resumed, reference, newest.name)

    def test_directory_of_corrupt_files_only(self):
        """A directory where no checkpoint reads is an error naming it and the newest."""
        Path("bad").mkdir()
        Path("bad/ckpt_a.pt").write_bytes(b"junk")
        os.utime("bad/ckpt_a.pt", ns=(10**18, 10**18))
        Path("bad/ckpt_b.pt").write_bytes(b"more junk")
        os.utime("bad/ckpt_b.pt", ns=(2 * 10**18, 2 * 10**18))
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="bad")
        assert one_line(caught).startswith(
            "no checkpoint in bad can be read (2 tried); the newest: checkpoint bad/ckpt_b.pt "
            "cannot be read (truncated, corrupt, or not a torch.save file of plain data): "
        )

    def test_directory_without_checkpoints_starts_afresh(self, written):
        """An empty (or missing) directory is a first start: the fit runs from the beginning."""
        reference = small_learner("ref")
        reference.fit(1)
        for where in ("empty", "missing"):
            if where == "empty":
                Path(where).mkdir()
            learn = small_learner(where)
            assert learn.fit(1, resume_from=where).status is RunStatus.COMPLETED
            assert learn.resumed_from is None
            assert "resumed_from" not in run_records(learn)[0]
            assert_same_end(learn, reference, where)

    def test_temporary_files_are_not_checkpoints(self, written):
        """A leftover .partial or hidden file in the directory is never resumed from."""
        shutil.copy(written[0], "ck/.ckpt_newer.pt.123.partial")
        shutil.copy(written[0], "ck/.hidden.pt")
        for name in (".ckpt_newer.pt.123.partial", ".hidden.pt"):
            later = 4 * 10**18
            os.utime(Path("ck", name), ns=(later, later))
        learn = small_learner("resumed")
        learn.fit(1, resume_from="ck")
        assert learn.resumed_from["path"] == str(written[-1])

    def test_idle_checkpoint(self):
        """A checkpoint saved at idle holds no fit to resume: load it instead."""
        learn = small_learner()
        learn.save("idle.pt")
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(1, resume_from="idle.pt")
        assert one_line(caught) == (
            "checkpoint idle.pt was saved at idle (Learner.save): there is no fit in it to "
            "resume; load it with learn.load(path), then call fit"
        )

    def test_wrong_n_epochs(self, written):
        """The fit's length is the checkpoint's: the message names both."""
        with pytest.raises(CheckpointError) as caught:
            small_learner().fit(3, resume_from=written[0])
        assert one_line(caught) == (
            f"checkpoint {written[0]} was taken in a fit of 1 epoch(s); resume that fit with "
            "fit(1, resume_from=...), got fit(3)"
        )

    def test_callbacks_mismatch(self, written):
        """A checkpoint holding the state of a callback learn.cbs lacks is refused."""
        train, valid = split()
        dls = DataLoaders(list(DataLoader(train, BATCH))[:3], list(DataLoader(valid, BATCH))[:2])
        learn = Learner(net(), dls, F.cross_entropy, 1e-3, [CheckpointCB("ck")], torch.optim.Adam)
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from=written[0])
        assert one_line(caught) == (
            f"checkpoint {written[0]} holds the state of ['MetricsCB'], which learn.cbs lacks "
            "(it has ['CheckpointCB']): resume with the callbacks the checkpointed fit had"
        )

    def test_model_of_other_shapes(self, written):
        """A model whose layers differ in size: the message lists the shapes."""
        learn = small_learner()
        learn.model = nn.Sequential(
            nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 10)
        )
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from=written[0])
        assert one_line(caught) == (
            f"checkpoint {written[0]} does not fit learn.model (Sequential): shapes differ: "
            "['0.bias (32,) vs (16,)', '0.weight (32, 64) vs (16, 64)', "
            "'3.weight (10, 32) vs (10, 16)']"
        )
        assert learn.audit_path is None  # refused before the run opened

    def test_model_of_other_keys(self, written):
        """A model with other parameter names: missing and unexpected keys."""
        learn = small_learner()
        learn.model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from=written[0])
        assert one_line(caught) == (
            f"checkpoint {written[0]} does not fit learn.model (Sequential): missing "
            "['2.bias', '2.weight']; unexpected ['3.bias', '3.weight']"
        )

    def test_other_optimizer(self, written):
        """The optimizer's class is the checkpoint's."""
        learn = small_learner()
        learn.opt_func = torch.optim.SGD
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from=written[0])
        assert one_line(caught) == (
            f"checkpoint {written[0]} holds the state of a Adam optimizer; learn.opt is a SGD: "
            "build the same optimizer (opt_func) to resume"
        )

    def test_reset_opt_contradicts_resume(self, written):
        """reset_opt=True would throw away what the resume brings back."""
        with pytest.raises(ConfigurationError) as caught:
            small_learner().fit(1, reset_opt=True, resume_from=written[0])
        assert one_line(caught) == (
            "fit(reset_opt=True, resume_from=...) contradict each other: a resumed fit goes on "
            "with the checkpoint's optimizer state"
        )

    @pytest.mark.parametrize(
        ("value", "shown"), [(3, "3"), (b"ck", "a bytes"), ("", "''"), (["ck"], "a list")]
    )
    def test_resume_from_not_a_path(self, value, shown):
        """resume_from is a str or an os.PathLike, non-empty."""
        with pytest.raises(ConfigurationError) as caught:
            small_learner().fit(1, resume_from=value)
        assert one_line(caught) == (
            "fit(resume_from=...): a checkpoint path must be a non-empty str or os.PathLike, "
            f"got {shown}"
        )

    def test_missing_file_is_refused(self, written):
        """A .pt path that does not exist is a missing file (a typo, say), not a fresh start."""
        learn = small_learner("new")
        with pytest.raises(CheckpointError) as caught:
            learn.fit(1, resume_from="new/never.pt")
        assert one_line(caught) == (
            "checkpoint new/never.pt is missing; give a checkpoint file (.pt) or a directory "
            "of them"
        )
        assert learn.last_result is None

    def test_missing_directory_is_a_fresh_start(self, written):
        """A directory that does not exist yet (a worker's first start) starts the fit afresh."""
        learn = small_learner("new")
        assert learn.fit(1, resume_from="new/not_yet").status is RunStatus.COMPLETED
        assert learn.resumed_from is None


# -- atomic writes ------------------------------------------------------------------------


def failing_save(after_bytes: int, calls: list[int], fail_at: int = 1):
    """A torch.save that writes ``after_bytes`` bytes, then fails, on its ``fail_at``-th call."""
    real = torch.save

    def save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == fail_at:
            f.write(b"\x00" * after_bytes)
            msg = "No space left on device"
            raise OSError(28, msg)
        real(obj, f, *args, **kwargs)

    return save


class TestAtomicWrites:
    """A write that fails leaves the previous file as it was, and no partial file."""

    def test_save_failing_keeps_the_old_file(self, monkeypatch):
        """save() over an existing checkpoint: torch.save fails midway, the old one remains."""
        learn = small_learner()
        learn.save("saved.pt")
        old = Path("saved.pt").read_bytes()
        learn.fit(1)
        monkeypatch.setattr(torch, "save", failing_save(100, []))
        with pytest.raises(OSError, match="No space left on device"):
            learn.save("saved.pt")
        assert Path("saved.pt").read_bytes() == old
        assert sorted(p.name for p in Path().iterdir() if p.is_file()) == ["saved.pt"]

    def test_checkpoint_failing_mid_fit(self, monkeypatch):
        """The fit's second checkpoint fails: the fit fails with it, the first one is whole."""
        learn = small_learner()
        with monkeypatch.context() as patched:
            patched.setattr(torch, "save", failing_save(100, [], fail_at=2))
            with pytest.raises(OSError, match="No space left on device"):
                learn.fit(1)
        assert learn.last_result.status is RunStatus.FAILED
        [first] = checkpoints()
        assert sorted(p.name for p in Path("ck").iterdir()) == [first.name]
        assert read_checkpoint(first).position == Position(State.EPOCH, 0, True, 2)


# -- what the resumed run's log says ------------------------------------------------------


def resume_points(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in records if r["ev"] == "note" and r.get("name") == "resume_point"}


class TestResumedFrom:
    """The resumed run's header and ``learn.resumed_from`` name the checkpoint exactly."""

    def test_header_and_property(self, written):
        """run, records and head of the log there, the file's SHA-256 and path, the position."""
        reference = small_learner("ref")
        reference.fit(1)
        points = resume_points(run_records(reference))
        file = checkpoints("ref")[1]  # batch 4: the validation pass, after 1 batch
        learn = small_learner("resumed")
        learn.fit(1, resume_from=file)
        point = points[str(file)]
        expected = {
            "run": reference.run_id,
            "records": point["records"],
            "head": point["head"],
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
            "path": str(file),
            "at": {"ep": 0, "tr": False, "it": 1},
        }
        assert dict(learn.resumed_from) == expected
        assert run_records(learn)[0]["resumed_from"] == expected
        assert point["sha256"] == expected["sha256"]
        assert point["at"] == expected["at"]

    def test_resume_points_of_a_fit(self, written):
        """Each file a fit wrote has a resume_point note: its SHA-256 and position."""
        learn = small_learner("ref")
        learn.fit(1)
        points = resume_points(run_records(learn))
        files = checkpoints("ref")
        assert sorted(points) == [str(f) for f in files]
        assert [points[str(f)]["at"] for f in files] == [
            {"ep": 0, "tr": True, "it": 2},
            {"ep": 0, "tr": False, "it": 1},
            {"ep": 1, "tr": True, "it": 0},
        ]
        for f in files:
            assert points[str(f)]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()

    def test_resumed_from_is_per_fit(self, written):
        """The next fit of the same learner resumes nothing: resumed_from is None again."""
        learn = small_learner("resumed")
        learn.fit(1, resume_from=written[0])
        assert learn.resumed_from is not None
        learn.fit(1)
        assert learn.resumed_from is None
        assert "resumed_from" not in run_records(learn)[0]

    def test_resumed_from_is_read_only(self, written):
        """learn.resumed_from cannot be changed through the mapping it returns."""
        learn = small_learner("resumed")
        learn.fit(1, resume_from=written[0])
        with pytest.raises(TypeError):
            learn.resumed_from["run"] = "other"  # type: ignore[index]

    def test_every_line_matches_the_record_schema(self, written, previous_handler):
        """Every line of a preempted and of a resumed run's log validates against the schema."""
        schema = json.loads(
            resources.files("fsm_learner.audit").joinpath("record.schema.json").read_text()
        )
        validator = Draft202012Validator(schema)
        preempted = small_learner("pre", Sigterm(2))
        preempted.fit(1)
        resumed = small_learner("pre")
        resumed.fit(1, resume_from="pre")
        for learn in (preempted, resumed):
            lines = learn.audit_path.read_bytes().splitlines()
            records = [orjson.loads(line) for line in lines]
            assert [r for r in records if not validator.is_valid(r)] == []
        kinds = {r["name"] for r in run_records(resumed) if r["ev"] == "note"}
        assert "resume_point" in kinds
        assert "resumed_from" in run_records(resumed)[0]

    def test_a_long_path_with_an_odd_byte(self, capsys):
        """A deep checkpoint directory, its name not UTF-8: logged escaped and cut, audited."""
        deep = Path(*(["d" * 200] * 18), "ck\udcff")  # 3,600 characters, one undecodable byte
        learner(torch_loaders(), deep).fit(1)
        resumed = learner(torch_loaders(), "resumed")
        resumed.fit(1, resume_from=checkpoints(deep)[1])
        logged = resumed.resumed_from["path"]
        assert (len(logged), logged[:6], logged[-3:]) == (1000, "dddddd", "...")
        assert audited(Path("runs"), capsys)[0] == 0
