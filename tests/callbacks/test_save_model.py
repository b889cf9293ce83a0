"""SaveModelCB and load_checkpoint: real checkpoints round-trip through weights_only loading."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import orjson
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import (
    batches_dls,
    callback_of,
    checkpointed_fit,
    mlp,
    resumed_fit,
)
from torch.nn.parallel import DistributedDataParallel

from callbacks.early_stopping import EarlyStoppingCB
from callbacks.metrics import MetricsCB
from callbacks.save_model import SaveModelCB, load_checkpoint
from fsm_learner import Callback, CancelFitException, ConfigurationError, Learner
from fsm_learner.exceptions import CheckpointError

LR = 1.0  # the validation loss goes up and down on 32 training digits (see early stopping)


class PassMetrics(Callback):
    """A stand-in metrics provider: the mean loss of each pass, one sync per pass."""

    order = 20

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.valid_history: list[float] = []

    def names(self) -> list[str]:
        return ["train_loss", "valid_loss"]

    def last_pass(self) -> dict[str, float]:
        return {"loss": self.values["valid_loss" if self.valid_history else "train_loss"]}

    def before_epoch(self, learn):
        self._sum, self._n = torch.zeros(()), 0

    def after_batch(self, learn):
        self._sum += learn.loss.detach() * len(learn.batch[1])
        self._n += len(learn.batch[1])

    def after_epoch(self, learn):
        key = "train_loss" if learn.training else "valid_loss"
        self.values[key] = float(self._sum / self._n)
        if not learn.training:
            self.valid_history.append(self.values[key])


def assert_same(a: object, b: object) -> None:
    """Nested state dicts are equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def notes(path: Path | None, name: str) -> list[dict[str, object]]:
    assert path is not None
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in records if r["ev"] == "note" and r["name"] == name]


def adam_learner(cbs, lr=0.01):
    return Learner(mlp(), batches_dls(4, 4), F.cross_entropy, lr, cbs, torch.optim.Adam)


class TestRoundTrip:
    def test_save_load_into_fresh_model_and_optimizer(self):
        """Identical state dicts (Adam's moments included) and identical predictions."""
        learn = adam_learner([SaveModelCB("ckpt.pt")])
        learn.fit(2)
        model, opt = mlp(seed=1), None
        opt = torch.optim.Adam(model.parameters(), lr=0.5)
        epoch = load_checkpoint("ckpt.pt", model, opt)
        assert epoch == 1
        assert_same(learn.model.state_dict(), model.state_dict())
        assert_same(learn.opt.state_dict(), opt.state_dict())
        x = batches_dls(1, 4).valid[0][0]
        learn.model.eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(learn.model(x), model(x))

    def test_training_resumes_identically(self):
        """A loaded optimizer steps exactly as the original would have."""
        learn = adam_learner([SaveModelCB("ckpt.pt")])
        learn.fit(1)
        model = mlp(seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        load_checkpoint("ckpt.pt", model, opt)
        x, y = batches_dls(1, 1).train[0]
        for m, o in ((learn.model, learn.opt), (model, opt)):
            m.train()
            F.cross_entropy(m(x), y).backward()
            o.step()
        assert_same(learn.model.state_dict(), model.state_dict())

    def test_loading_refuses_arbitrary_objects(self):
        """weights_only=True: a pickle of anything else is refused, not executed."""
        torch.save({"model": {}, "opt": {}, "epoch": 0, "x": Path("evil")}, "bad.pt")
        with pytest.raises(pickle.UnpicklingError):
            load_checkpoint("bad.pt", mlp())

    def test_loading_something_else_names_the_missing_keys(self):
        """A file that is no checkpoint is refused, naming the keys it lacks."""
        torch.save({"state_dict": {}}, "other.pt")
        with pytest.raises(ConfigurationError, match=r"lacks \['epoch', 'model', 'opt'\]"):
            load_checkpoint("other.pt", mlp())


class TestWhatIsSaved:
    def test_best_only(self):
        """With a monitor, only improving epochs are saved; the file holds the best one."""
        metrics = PassMetrics()
        cb = SaveModelCB("best/model.pt", monitor="valid_loss")
        learn = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics, cb])
        result = learn.fit(8)
        history = metrics.valid_history
        improving = [e for e in range(8) if history[e] < min(history[:e], default=float("inf"))]
        assert len(improving) < 8  # the trajectory has epochs that do not improve
        written = notes(result.audit_path, "checkpoint")
        assert [(n["ep"], n["tr"]) for n in written] == [(e, False) for e in improving]
        assert [n["value"] for n in written] == [history[e] for e in improving]
        best = min(range(8), key=history.__getitem__)
        assert cb.monitor is not None
        assert cb.monitor.best_epoch == best
        model = mlp(seed=1)
        assert load_checkpoint("best/model.pt", model) == best
        assert not Path("best/.model.pt.partial").exists()

    def test_every_epoch(self):
        """every_epoch writes one file per epoch, each listed once, each loadable."""
        cb = SaveModelCB("ckpts", every_epoch=True)
        learn = adam_learner([cb])
        learn.fit(3)
        assert cb.saved == [Path("ckpts") / f"epoch_{n}.pt" for n in range(3)]
        assert sorted(p.name for p in Path("ckpts").iterdir()) == [
            f"epoch_{n}.pt" for n in range(3)
        ]
        model = mlp(seed=1)
        assert load_checkpoint("ckpts/epoch_2.pt", model) == 2
        assert_same(learn.model.state_dict(), model.state_dict())

    def test_latest_is_overwritten_and_listed_once(self):
        """Without monitor every epoch overwrites one file, which saved lists once."""
        cb = SaveModelCB("latest.pt")
        result = adam_learner([cb]).fit(3)
        assert cb.saved == [Path("latest.pt")]
        assert [n["ep"] for n in notes(result.audit_path, "checkpoint")] == [0, 1, 2]
        assert load_checkpoint("latest.pt", mlp()) == 2
        assert (cb.best, cb.best_epoch) == (None, None)

    def test_best_is_readable_on_the_callback(self):
        """save.best and save.best_epoch are the monitor's: the lowest valid_loss, once in
        saved however often it improved."""
        metrics = PassMetrics()
        cb = SaveModelCB("best.pt", monitor="valid_loss")
        result = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics, cb]).fit(8)
        history = metrics.valid_history
        assert cb.best == min(history)
        assert cb.best_epoch == history.index(min(history))
        assert cb.monitor is not None
        assert (cb.best, cb.best_epoch) == (cb.monitor.best, cb.monitor.best_epoch)
        assert len(notes(result.audit_path, "checkpoint")) > 1
        assert cb.saved == [Path("best.pt")]

    def test_validate_and_predict_runs_save_nothing(self):
        """validate() and get_preds() after a fit are no epoch: no file, no note, same best."""
        metrics = PassMetrics()
        cb = SaveModelCB("best.pt", monitor="valid_loss")
        learn = Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, [metrics, cb])
        learn.fit(3)
        before = (cb.best, cb.best_epoch, list(cb.saved), Path("best.pt").read_bytes())
        learn.validate(batches_dls(4, 0).train)  # a lower loss than any epoch's
        assert notes(learn.audit_path, "checkpoint") == []
        learn.get_preds()
        assert notes(learn.audit_path, "checkpoint") == []
        assert (cb.best, cb.best_epoch, cb.saved, Path("best.pt").read_bytes()) == before


def monitored(cb: SaveModelCB, lr: float = 0.01) -> tuple[Learner, PassMetrics]:
    """An Adam learner on 32 digits with a PassMetrics provider and ``cb``."""
    metrics = PassMetrics()
    return adam_learner([metrics, cb], lr=lr), metrics


class TestAcrossFits:
    def test_a_worse_later_fit_keeps_the_best_of_an_earlier_one(self):
        """Fit 1 finds a best; the weights are zeroed (valid loss ln 10, worse than it) and
        fit 2 never beats it: nothing is saved, the file, best and best_epoch are fit 1's."""
        cb = SaveModelCB("best.pt", monitor="valid_loss")
        learn, metrics = monitored(cb)
        learn.fit(3)
        best, best_epoch = cb.best, cb.best_epoch
        assert best == min(metrics.valid_history)
        assert best_epoch == metrics.valid_history.index(best)
        written = Path("best.pt").read_bytes()
        with torch.no_grad():
            for param in learn.model.parameters():
                param.zero_()
        learn.fit(2)
        assert min(metrics.valid_history[3:]) > best  # the second fit is worse throughout
        assert notes(learn.audit_path, "checkpoint") == []
        assert (cb.best, cb.best_epoch, cb.saved) == (best, best_epoch, [Path("best.pt")])
        assert Path("best.pt").read_bytes() == written
        assert load_checkpoint("best.pt", mlp(seed=1)) == best_epoch

    def test_two_fits_save_as_one_fit_of_their_epochs(self):
        """fit(2) then fit(2) saves what fit(4) saves: the same values, best, best_epoch
        (numbered across fits) and checkpoint."""
        split, one = (
            SaveModelCB("split.pt", monitor="valid_loss"),
            SaveModelCB("one.pt", monitor="valid_loss"),
        )
        learn, _ = monitored(split)
        first = notes(learn.fit(2).audit_path, "checkpoint")
        second = notes(learn.fit(2).audit_path, "checkpoint")
        whole = notes(monitored(one)[0].fit(4).audit_path, "checkpoint")
        assert [n["value"] for n in first + second] == [n["value"] for n in whole]
        assert (split.best, split.best_epoch, split.epochs) == (one.best, one.best_epoch, 4)
        assert split.best_epoch == 3  # the loss still falls: the best is the second fit's
        split_model, one_model = mlp(seed=1), mlp(seed=2)
        assert load_checkpoint("split.pt", split_model) == load_checkpoint("one.pt", one_model) == 3
        assert_same(split_model.state_dict(), one_model.state_dict())

    def test_every_epoch_numbers_files_across_fits(self):
        """every_epoch: fit(2) then fit(2) writes epoch_0.pt to epoch_3.pt, as fit(4) does,
        each holding its epoch's number and fit(4)'s weights at that epoch; none overwritten."""
        split, one = SaveModelCB("split", every_epoch=True), SaveModelCB("one", every_epoch=True)
        learn = adam_learner([split])
        learn.fit(2)
        first_files = {p: p.read_bytes() for p in split.saved}
        learn.fit(2)
        adam_learner([one]).fit(4)
        assert split.saved == [Path("split") / f"epoch_{n}.pt" for n in range(4)]
        assert all(path.read_bytes() == data for path, data in first_files.items())
        for n in range(4):
            a, b = mlp(seed=1), mlp(seed=2)
            assert load_checkpoint(f"split/epoch_{n}.pt", a) == n
            assert load_checkpoint(f"one/epoch_{n}.pt", b) == n
            assert_same(a.state_dict(), b.state_dict())

    def test_cancelled_epochs_are_counted(self):
        """A fit cancelled in its second epoch's training pass counted two epochs: the next
        fit's first epoch is number 2, and validate or predict runs count none."""

        class CancelSecondEpoch(Callback):
            def before_epoch(self, learn):
                if learn.epoch == 1 and learn.training:
                    raise CancelFitException

        cb = SaveModelCB("ckpts", every_epoch=True)
        learn = adam_learner([CancelSecondEpoch(), cb])
        learn.fit(3)
        assert cb.saved == [Path("ckpts/epoch_0.pt")]
        assert cb.epochs == 2
        learn.validate()
        learn.get_preds()
        learn.fit(1)
        assert cb.epochs == 3
        assert cb.saved == [Path("ckpts/epoch_0.pt"), Path("ckpts/epoch_2.pt")]
        assert load_checkpoint("ckpts/epoch_2.pt", mlp(seed=1)) == 2

    def test_reset_starts_over(self):
        """After reset() a worse fit saves again, numbered from 0: best, best_epoch, saved
        and the file are its own."""
        cb = SaveModelCB("best.pt", monitor="valid_loss")
        learn, metrics = monitored(cb)
        learn.fit(3)
        first_best = cb.best
        with torch.no_grad():
            for param in learn.model.parameters():
                param.zero_()
        cb.reset()
        assert (cb.best_epoch, cb.saved, cb.epochs) == (-1, [], 0)
        learn.fit(1)
        assert cb.best == metrics.valid_history[-1] > first_best
        assert (cb.best_epoch, cb.saved, cb.epochs) == (0, [Path("best.pt")], 1)
        assert load_checkpoint("best.pt", mlp(seed=1)) == 0

    def test_reset_every_epoch_numbers_from_zero_again(self):
        """every_epoch: after reset() the next fit writes epoch_0.pt again."""
        cb = SaveModelCB("ckpts", every_epoch=True)
        learn = adam_learner([cb])
        learn.fit(2)
        cb.reset()
        learn.fit(1)
        assert cb.saved == [Path("ckpts/epoch_0.pt")]
        model = mlp(seed=1)
        assert load_checkpoint("ckpts/epoch_0.pt", model) == 0
        assert_same(model.state_dict(), learn.model.state_dict())


class TestConfiguration:
    def test_monitor_and_every_epoch_exclude_each_other(self):
        """Best-only and every-epoch saving are exclusive: the message says to drop one."""
        with pytest.raises(ConfigurationError, match="not both"):
            SaveModelCB("d", monitor="valid_loss", every_epoch=True)

    @pytest.mark.parametrize("path", ["", None, 3])
    def test_bad_path(self, path):
        """The path must be a non-empty path."""
        with pytest.raises(ConfigurationError, match="path must be a file path"):
            SaveModelCB(path)

    def test_bad_mode(self):
        """An unknown mode is named with the valid ones."""
        with pytest.raises(ConfigurationError, match="mode must be one of"):
            SaveModelCB("m.pt", monitor="valid_loss", mode="best")

    def test_unknown_monitor(self):
        """A monitor the provider does not produce fails at fit start, naming the valid ones."""
        learn = adam_learner([PassMetrics(), SaveModelCB("m.pt", monitor="valid_acc")])
        with pytest.raises(ConfigurationError, match=r"unknown monitor 'valid_acc'.*'valid_loss'"):
            learn.fit(1)


def test_best_checkpoint_with_the_stock_metrics_callback():
    """With MetricsCB, the saved checkpoint is the epoch of the lowest valid_loss."""
    from callbacks.metrics import MetricsCB

    metrics = MetricsCB()
    cbs = [metrics, SaveModelCB("best.pt", monitor="valid_loss")]
    Learner(mlp(), batches_dls(4, 4), F.cross_entropy, LR, cbs).fit(6)
    losses = [row["valid_loss"] for row in metrics.history]
    assert load_checkpoint("best.pt", mlp(seed=1)) == losses.index(min(losses))


class Snapshots(Callback):
    """The weights at the end of each epoch's validation pass, by epoch."""

    order = 70

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_epoch(self, learn):
        if not learn.training:
            self.weights.append({k: v.clone() for k, v in learn.model.state_dict().items()})


def saving_learner(directory: Path, *, fitted: int = 0) -> Learner:
    """An Adam learner with MetricsCB and a SaveModelCB of the best valid loss, fitted first."""
    cbs = [MetricsCB(), SaveModelCB(directory / "best.pt", monitor="valid_loss")]
    learn = Learner(
        mlp(), batches_dls(4, 4), F.cross_entropy, 0.05, cbs, torch.optim.Adam, audit_log=None
    )
    if fitted:
        learn.fit(fitted)
    return learn


RESUMES = {
    "mid-training": (1, True, 2),
    "mid-validation": (0, False, 3),
    "between-epochs": (2, True, 0),
}


@pytest.fixture(scope="module")
def second_fit(tmp_path_factory):
    """fit(2) then fit(3), the second checkpointed; the best checkpoint it ends with."""
    directory = tmp_path_factory.mktemp("save_model")
    make = partial(saving_learner, directory, fitted=2)
    learn, files = checkpointed_fit(make, 3, directory / "checkpoints", RESUMES.values())
    return learn, files, directory, torch.load(directory / "best.pt", weights_only=True)


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_saves_and_numbers_as_the_uninterrupted_one(self, second_fit, at):
        """Resumed in the second fit: the same best, epoch numbers and best checkpoint."""
        ref_learn, files, directory, best = second_fit
        (directory / "best.pt").unlink(missing_ok=True)
        learn = resumed_fit(partial(saving_learner, directory), 3, files[at])
        cb, ref = callback_of(learn, SaveModelCB), callback_of(ref_learn, SaveModelCB)
        assert (cb.best, cb.best_epoch, cb.epochs) == (ref.best, ref.best_epoch, 5)
        assert cb.saved == ref.saved == [directory / "best.pt"]
        assert_same(torch.load(cb.saved[0], weights_only=True), best)

    def test_loaded_at_idle_the_next_fit_goes_on_from_it(self, tmp_path):
        """learn.save, then learn.load in a fresh learner: epochs and files continue."""
        first = SaveModelCB(tmp_path, every_epoch=True)
        learn, _ = monitored(first)
        learn.fit(2)
        path = learn.save(tmp_path / "idle.pt")
        fresh = SaveModelCB(tmp_path, every_epoch=True)
        again, _ = monitored(fresh)
        again.load(path)
        again.fit(1)
        assert fresh.epochs == 3
        assert fresh.saved == [tmp_path / f"epoch_{n}.pt" for n in range(3)]

    def test_another_monitor_s_state_is_refused(self, tmp_path):
        """A checkpoint without a monitor cannot resume one that monitors valid_loss."""
        state = SaveModelCB(tmp_path / "x.pt").state_dict()
        with pytest.raises(
            CheckpointError,
            match=(
                r"SaveModelCB: the checkpoint was taken with monitor=None, this"
                r" callback has monitor='valid_loss'"
            ),
        ):
            SaveModelCB(tmp_path / "x.pt", monitor="valid_loss").load_state_dict(state)

    def test_a_wrong_type_is_refused(self, tmp_path):
        """Saved paths must be strings."""
        state = {**SaveModelCB(tmp_path / "x.pt").state_dict(), "saved": [1]}
        with pytest.raises(
            CheckpointError,
            match=r"SaveModelCB: state\['saved'\] must be a list of file paths \(str\), got \[1\]",
        ):
            SaveModelCB(tmp_path / "x.pt").load_state_dict(state)


class TestLoadBest:
    def test_after_the_fit_the_model_has_the_best_epoch_s_weights(self, tmp_path):
        """Not the last epoch's: the valid loss rises after its best, and the best comes back."""
        cb = SaveModelCB(tmp_path / "best.pt", monitor="valid_loss", load_best=True)
        snaps = Snapshots()
        learn, metrics = monitored(cb, lr=0.05)
        learn.cbs = [*learn.cbs, snaps]
        learn.fit(6)
        best = min(range(6), key=metrics.valid_history.__getitem__)
        assert best == cb.best_epoch
        assert best < 5
        assert_same(learn.model.state_dict(), snaps.weights[best])
        assert not torch.equal(learn.model.state_dict()["0.weight"], snaps.weights[5]["0.weight"])
        assert [n["epoch"] for n in notes(learn.audit_path, "load_best")] == [best]

    def test_an_early_stopped_fit_also_ends_with_the_best_weights(self, tmp_path):
        """Early stopping cancels the fit; the best epoch's weights still come back."""
        cb = SaveModelCB(tmp_path / "best.pt", monitor="valid_loss", load_best=True)
        snaps = Snapshots()
        learn, metrics = monitored(cb, lr=0.05)
        learn.cbs = [*learn.cbs, EarlyStoppingCB("valid_loss", patience=1), snaps]
        learn.fit(10)
        best = min(range(len(metrics.valid_history)), key=metrics.valid_history.__getitem__)
        assert len(snaps.weights) < 10
        assert_same(learn.model.state_dict(), snaps.weights[best])

    def test_without_load_best_the_last_weights_stay(self, tmp_path):
        """The default leaves the model as the last epoch left it."""
        cb = SaveModelCB(tmp_path / "best.pt", monitor="valid_loss")
        snaps = Snapshots()
        learn, _ = monitored(cb, lr=0.05)
        learn.cbs = [*learn.cbs, snaps]
        learn.fit(6)
        assert_same(learn.model.state_dict(), snaps.weights[5])

    def test_load_best_needs_a_monitor(self, tmp_path):
        """monitor=None has no best: the error names both settings."""
        with pytest.raises(
            ConfigurationError, match=r"load_best=True loads the best epoch, which needs monitor="
        ):
            SaveModelCB(tmp_path / "x.pt", load_best=True)

    def test_load_best_must_be_a_bool(self, tmp_path):
        """1 is not True."""
        with pytest.raises(
            ConfigurationError, match=r"load_best must be True or False, got 1 \(int\)"
        ):
            SaveModelCB(tmp_path / "x.pt", monitor="valid_loss", load_best=1)


@pytest.fixture
def process_group():
    """A torch.distributed group of this one process (gloo), destroyed after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class TestWrappedModel:
    def test_a_ddp_model_s_module_is_saved_and_loaded_back(self, process_group, tmp_path):
        """A model in DDP: the file holds the module's keys (no 'module.'); load_best and
        load_checkpoint put the best epoch's weights back into the module."""
        cb = SaveModelCB(tmp_path / "best.pt", monitor="valid_loss", load_best=True)
        snaps = Snapshots()
        learn, _ = monitored(cb, lr=0.05)
        learn.model = DistributedDataParallel(learn.model)
        learn.cbs = [*learn.cbs, snaps]
        learn.fit(6)
        saved = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
        assert list(saved) == list(mlp().state_dict())
        assert cb.best_epoch is not None
        assert cb.best_epoch < 5
        assert_same(learn.model.state_dict(), snaps.weights[cb.best_epoch])
        fresh = DistributedDataParallel(mlp(seed=1))
        assert load_checkpoint(tmp_path / "best.pt", fresh) == cb.best_epoch
        assert_same(fresh.module.state_dict(), saved)
