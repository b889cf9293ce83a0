"""Any batch shape: tuples of inputs then the target, mappings with a target key, models that
compute their own loss; and the errors when a batch or an output lacks what the loop needs."""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_tensors, mlp, run_records
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fsm_learner import Callback, DataLoaders, InvalidBatchError, Learner, RunStatus
from fsm_learner.audit.replay import audit_file
from fsm_learner.testing import RecordingCallback, expected_trace

N_TRAIN, BATCH = 1400, 64
TRAIN_BATCHES, VALID_BATCHES = 22, 7  # 1,400 and 397 digits in batches of 64


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and validation digits (x, y, x, y), split at random once (seed 0)."""
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def loaders(train: Dataset, valid: Dataset) -> DataLoaders:
    gen = torch.Generator().manual_seed(0)
    return DataLoaders(
        DataLoader(train, batch_size=BATCH, shuffle=True, generator=gen),
        DataLoader(valid, batch_size=BATCH),
    )


class Pixels(Dataset):
    """Digits as mappings: ``{"pixels": x, <target_key>: y}``, or pixels alone."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, target_key: str = "labels"):
        self.x, self.y, self.target_key = x, y, target_key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"pixels": self.x[i]}
        if self.y is not None:
            item[self.target_key] = self.y[i]
        return item


class PixelsModel(nn.Module):
    """The MLP called by keyword: ``model(pixels=x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class Halves(nn.Module):
    """Two inputs, the top and the bottom half of a digit: ``model(top, bottom)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([top, bottom], dim=1))


@dataclasses.dataclass
class ClassifierOutput:
    """What a Hugging Face classifier returns: the loss when given labels, and the logits."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SelfLoss(nn.Module):
    """Computes its own cross-entropy from ``labels``, HF style: an object or a dict out."""

    def __init__(self, *, as_dict: bool = False) -> None:
        super().__init__()
        self.net, self.as_dict = mlp(), as_dict

    def forward(
        self, pixels: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ClassifierOutput | dict[str, torch.Tensor]:
        logits = self.net(pixels)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.as_dict:
            return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}
        return ClassifierOutput(logits, loss)


class Sees(Callback):
    """Checks, on every batch, what the loop made of it: target, predictions, output."""

    def __init__(self, target_of, output_type: type) -> None:
        self.target_of, self.output_type = target_of, output_type
        self.batches = 0

    def after_loss(self, learn: Learner) -> None:
        assert learn.target is self.target_of(learn.batch)
        assert isinstance(learn.output, self.output_type)
        assert learn.preds.shape == (len(learn.target), 10)
        assert learn.loss.shape == ()
        self.batches += 1


def train(learn: Learner, n_epochs: int = 4) -> tuple[float, float, float]:
    """Fit; return the validation loss before and after, and the accuracy after."""
    before = learn.validate()["loss"]
    learn.fit(n_epochs)
    after = learn.validate()["loss"]
    preds, targets = learn.get_preds()
    assert targets is not None
    return before, after, (preds.argmax(1) == targets).float().mean().item()


SHAPES = {
    "(x, y) tuples": (
        lambda xt, yt, xv, yv: loaders(TensorDataset(xt, yt), TensorDataset(xv, yv)),
        mlp,
        F.cross_entropy,
        lambda batch: batch[1],
        torch.Tensor,
    ),
    "(top, bottom, y) lists": (
        lambda xt, yt, xv, yv: loaders(
            TensorDataset(xt[:, :32], xt[:, 32:], yt), TensorDataset(xv[:, :32], xv[:, 32:], yv)
        ),
        Halves,
        F.cross_entropy,
        lambda batch: batch[2],
        torch.Tensor,
    ),
    "{pixels, labels} mappings": (
        lambda xt, yt, xv, yv: loaders(Pixels(xt, yt), Pixels(xv, yv)),
        PixelsModel,
        F.cross_entropy,
        lambda batch: batch["labels"],
        torch.Tensor,
    ),
    "mappings, the model's own loss in an object": (
        lambda xt, yt, xv, yv: loaders(Pixels(xt, yt), Pixels(xv, yv)),
        SelfLoss,
        None,
        lambda batch: batch["labels"],
        ClassifierOutput,
    ),
    "mappings, the model's own loss in a dict": (
        lambda xt, yt, xv, yv: loaders(Pixels(xt, yt), Pixels(xv, yv)),
        lambda: SelfLoss(as_dict=True),
        None,
        lambda batch: batch["labels"],
        dict,
    ),
}


@cache
def with_tuples() -> tuple[float, float, float]:
    """What the plain (x, y) batches give, for the other shapes to match."""
    make_dls, make_model, loss_func, _, _ = SHAPES["(x, y) tuples"]
    dls = make_dls(*digits_split())
    return train(Learner(make_model(), dls, loss_func, 0.01, opt_func=torch.optim.Adam))


class TestRealTraining:
    @pytest.mark.parametrize("shape", list(SHAPES))
    def test_digits_train_to_high_accuracy(self, shape):
        """Each batch shape trains the MLP on real digits: loss from ~2.3 to < 0.25, over 90%.

        The same weights, data order and arithmetic whatever the shape: the numbers are
        those of (x, y) tuples bit for bit.
        """
        make_dls, make_model, loss_func, target_of, output_type = SHAPES[shape]
        rec, sees = RecordingCallback(), Sees(target_of, output_type)
        learn = Learner(
            make_model(),
            make_dls(*digits_split()),
            loss_func,
            0.01,
            [rec, sees],
            torch.optim.Adam,
        )
        before, after, accuracy = train(learn)
        assert before > 2.2
        assert after < 0.25
        assert accuracy > 0.9
        assert (before, after, accuracy) == with_tuples()
        assert sees.batches == 4 * (TRAIN_BATCHES + VALID_BATCHES) + 2 * VALID_BATCHES
        rec.records.clear()
        learn.fit(1)
        assert expected_trace(n_epochs=1, batches=(TRAIN_BATCHES, VALID_BATCHES)) == rec.records

    def test_a_target_key_of_ones_own(self):
        """target_key names the target in mappings: the model never receives it."""
        xt, yt, xv, yv = digits_split()
        dls = loaders(Pixels(xt, yt, "digit"), Pixels(xv, yv, "digit"))
        learn = Learner(
            PixelsModel(), dls, F.cross_entropy, 0.01, opt_func=torch.optim.Adam, target_key="digit"
        )
        before, after, accuracy = train(learn, n_epochs=2)
        assert (before > 2.2, after < 0.45, accuracy > 0.88) == (True, True, True)

    def test_the_model_gets_the_whole_batch_when_it_computes_its_loss(self):
        """loss_func=None: tuples are passed whole too, the target as the last argument."""
        seen: list[int] = []

        class Whole(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x, y):
                seen.append(len(y))
                logits = self.net(x)
                return ClassifierOutput(logits, F.cross_entropy(logits, y))

        xt, yt, xv, yv = digits_split()
        dls = DataLoaders([(xt[:8], yt[:8])], [(xv[:5], yv[:5])])
        learn = Learner(Whole(), dls, None, 0.1)
        learn.fit(1)
        assert seen == [8, 5]
        expected = F.cross_entropy(learn.model.net(xv[:5]), yv[:5]).item()
        assert learn.validate()["loss"] == pytest.approx(expected, rel=1e-6)


def assert_failed_log(learn: Learner, error: type[BaseException]) -> None:
    """The run's log is complete and says it failed, and with what."""
    records = run_records(learn)
    [end] = [r for r in records if r["ev"] == "run_end"]
    assert end["status"] == RunStatus.FAILED
    assert end["failure"]["type"] == error.__name__
    [report], problem = audit_file(learn.audit_path)
    assert (problem, report.verified, report.status) == (None, True, RunStatus.FAILED)


class TestBatchesTheLoopCannotRead:
    def test_a_misnamed_target_key_reaches_the_model_with_a_note(self):
        """A mapping batch whose target is under 'label' (not target_key 'labels'): the
        model's TypeError carries a note saying how the batch became its arguments."""
        batch = {"pixels": torch.ones(4, 64), "label": torch.zeros(4, dtype=torch.long)}
        learn = Learner(PixelsModel(), DataLoaders([batch], []), F.cross_entropy, 0.1)
        with pytest.raises(TypeError, match="unexpected keyword argument 'label'") as info:
            learn.fit(1)
        assert info.value.__notes__[0] == (
            "fsm_learner: the model was called as model(pixels=..., label=...) from a dict "
            "batch: a tuple or list batch gives its elements but the last as positional "
            "inputs, a mapping batch its keys but target_key='labels' as keyword inputs; "
            "override predict in a callback to call the model otherwise"
        )
        assert_failed_log(learn, TypeError)

    @pytest.mark.parametrize(
        ("batch", "shown"),
        [
            ({"pixels": torch.ones(4, 64)}, "a dict with keys 'pixels'"),
            ((torch.ones(4, 64),), "a tuple of 1"),
            (torch.ones(4, 64), "a Tensor"),
        ],
    )
    def test_a_loss_func_without_a_target(self, batch, shown):
        """The error names the batch's type (a mapping's keys) and target_key, and says how
        to give a target."""
        model = PixelsModel() if isinstance(batch, dict) else mlp()
        learn = Learner(model, DataLoaders([batch], []), F.cross_entropy, 0.1)
        with pytest.raises(InvalidBatchError) as info:
            learn.fit(1)
        assert str(info.value) == (
            f"loss_func needs a target, but the batch ({shown}) has none: a tuple or list "
            f"batch holds its target last, a mapping batch under target_key='labels'; or give "
            f"loss_func=None for a model that computes its own loss"
        )
        assert info.value.__notes__[0] == "fsm_learner: InvalidBatchError in state 'predict'"
        assert learn.state == "idle"
        assert_failed_log(learn, InvalidBatchError)

    def test_a_mapping_whose_target_is_under_another_key(self):
        """A target under "label" is no target for target_key "labels": named in the error."""

        class Lenient(PixelsModel):
            def forward(self, pixels, **others):  # takes (and ignores) what else comes
                return self.net(pixels)

        x, y = torch.ones(4, 64), torch.zeros(4, dtype=torch.int64)
        dls = DataLoaders([], [{"pixels": x, "label": y}])
        learn = Learner(Lenient(), dls, F.cross_entropy, 0.1)
        with pytest.raises(InvalidBatchError, match="under target_key='labels'"):
            learn.validate()
        assert_failed_log(learn, InvalidBatchError)

    @pytest.mark.parametrize(
        ("model", "got"),
        [(mlp(), "Tensor) has no loss"), (SelfLoss(as_dict=True), "dict) has no loss")],
    )
    def test_no_loss_func_and_an_output_without_a_loss(self, model, got):
        """loss_func=None but the output has no loss: the error says what would do."""
        xt = digits_split()[0][:8]
        batch = (xt,) if isinstance(model, nn.Sequential) else {"pixels": xt}
        learn = Learner(model, DataLoaders([batch], []), None, 0.1)
        with pytest.raises(InvalidBatchError) as info:
            learn.fit(1)
        assert got in str(info.value)
        assert "return an object with a tensor .loss or a mapping with a tensor 'loss'" in str(
            info.value
        )
        assert info.value.__notes__[0] == "fsm_learner: InvalidBatchError in state 'predict'"
        assert_failed_log(learn, InvalidBatchError)

    def test_a_model_computing_its_loss_on_a_batch_without_the_target_key(self):
        """loss_func=None, the target under "label": the error adds that the batch has no
        target_key, which the model needed to compute its loss."""
        xt = digits_split()[0][:8]
        batch = {"pixels": xt, "label": torch.zeros(8, dtype=torch.long)}

        class Lenient(SelfLoss):
            def forward(self, pixels, labels=None, **_others):
                return super().forward(pixels, labels)

        learn = Learner(Lenient(as_dict=True), DataLoaders([batch], []), None, 0.1)
        with pytest.raises(InvalidBatchError) as info:
            learn.fit(1)
        assert str(info.value).endswith(
            "; the batch (a dict with keys 'pixels', 'label') has no target_key='labels', "
            "which such models need to compute a loss"
        )

    def test_a_named_tuple_output_with_loss_and_logits(self):
        """A model returning a named tuple Out(loss, logits) computes its own loss: the
        named fields count as .loss and .logits; a plain tuple still has none."""

        class Out(NamedTuple):
            loss: torch.Tensor
            logits: torch.Tensor

        class Named(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x, y):
                logits = self.net(x)
                return Out(F.cross_entropy(logits, y), logits)

        xt, yt, xv, yv = digits_split()
        learn = Learner(Named(), DataLoaders([(xt[:64], yt[:64])], [(xv[:8], yv[:8])]), None, 0.1)
        assert learn.fit(1).status is RunStatus.COMPLETED
        preds, targets = learn.get_preds()
        assert preds.shape == (8, 10)
        assert torch.equal(targets, yv[:8])

    def test_an_empty_tuple(self):
        """An empty batch holds no input: refused before the model is called."""
        learn = Learner(mlp(), DataLoaders([()], []), F.cross_entropy, 0.1)
        with pytest.raises(InvalidBatchError, match="a batch is an empty tuple or list"):
            learn.fit(1)
        assert_failed_log(learn, InvalidBatchError)


class TestDtypes:
    def test_a_float64_model_on_float32_batches(self):
        """torch's bare dtype error gets a note that names both dtypes and DeviceCB(dtype=...)."""
        xt, yt, _, _ = digits_split()
        learn = Learner(mlp().double(), DataLoaders([(xt[:8], yt[:8])], []), F.cross_entropy)
        with pytest.raises(RuntimeError) as info:
            learn.fit(1)
        assert (
            "fsm_learner: the model's parameters are torch.float64 but the batch's inputs "
            "are torch.float32; pass callbacks.DeviceCB(dtype=torch.float64) to convert the "
            "batches, or convert the model"
        ) in info.value.__notes__
        assert info.value.__notes__[-2] == "fsm_learner: RuntimeError in state 'batch'"
        assert_failed_log(learn, RuntimeError)

    def test_what_the_note_suggests_works(self):
        """With DeviceCB(dtype=torch.float64), the float64 model trains on the same batches."""
        from callbacks.device import DeviceCB

        xt, yt, xv, yv = digits_split()
        dls = DataLoaders([(xt[:64], yt[:64])], [(xv[:64], yv[:64])])
        cbs = [DeviceCB("cpu", dtype=torch.float64)]
        learn = Learner(mlp().double(), dls, F.cross_entropy, 0.1, cbs)
        assert learn.fit(1).status is RunStatus.COMPLETED
        preds, _ = learn.get_preds()
        assert preds.dtype == torch.float64

    def test_nested_inputs_get_the_note_too(self):
        """A float32 tensor inside a nested mapping input of a float64 model: the same note."""

        class Nested(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp().double()

            def forward(self, inputs):
                return self.net(inputs["image"]["pixels"])

        xt, yt, _, _ = digits_split()
        batch = {"inputs": {"image": {"pixels": xt[:8]}}, "labels": yt[:8]}
        learn = Learner(Nested(), DataLoaders([batch], []), F.cross_entropy)
        with pytest.raises(RuntimeError) as info:
            learn.fit(1)
        assert any("DeviceCB(dtype=torch.float64)" in note for note in info.value.__notes__)

    def test_an_error_of_another_kind_gets_no_dtype_note(self):
        """A shape error with matching dtypes is torch's own: no note suggests a dtype."""
        learn = Learner(mlp(), DataLoaders([(torch.ones(4, 63), torch.zeros(4).long())], []))
        with pytest.raises(RuntimeError, match="cannot be multiplied") as info:
            learn.fit(1)
        assert not any("DeviceCB" in note for note in info.value.__notes__)
