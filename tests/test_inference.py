"""validate() and get_preds(): one pass without gradients, its own run and log, nothing trained."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, digits_dls, digits_tensors, mlp, run_records, same
from torch import nn

from fsm_learner import (
    Callback,
    CancelEpochException,
    DataLoaders,
    InvalidBatchError,
    InvalidDataLoadersError,
    Learner,
    PartialResultWarning,
    RunKind,
    RunStatus,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.testing import RecordingCallback, expected_trace


def unequal_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """21 real digits in batches of 8, 8 and 5: a mean of batch means would weigh them wrong."""
    x, y = digits_tensors()
    x, y = x[1000:1021], y[1000:1021]
    return [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]


def regularised(seed: int = 0) -> nn.Module:
    """An MLP with batch norm and dropout: its train and eval modes compute different things."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
    )


def trained(model: nn.Module) -> Learner:
    """A learner whose model and Adam state moved away from their start (one epoch)."""
    dls = DataLoaders(batches_dls(4, 0).train, unequal_batches())
    learn = Learner(model, dls, F.cross_entropy, 0.01, opt_func=torch.optim.Adam)
    learn.fit(1)
    return learn


class TestValidate:
    def test_the_mean_loss_over_samples(self):
        """The loss is averaged over the 21 samples, not over the 3 batches."""
        learn = trained(mlp())
        x = torch.cat([b[0] for b in unequal_batches()])
        y = torch.cat([b[1] for b in unequal_batches()])
        with torch.no_grad():
            by_hand = F.cross_entropy(learn.model(x), y, reduction="sum").item() / 21
            per_batch = [
                F.cross_entropy(learn.model(bx), by).item() for bx, by in unequal_batches()
            ]
        values = learn.validate()
        assert values == {"loss": pytest.approx(by_hand, rel=1e-6)}
        assert abs(sum(per_batch) / 3 - by_hand) > 1e-3  # so the weighting is seen

    def test_leaves_weights_optimizer_and_gradients_untouched(self):
        """No backward, no step: parameters, Adam's moments and the grads stay bit for bit."""
        learn = trained(regularised())
        assert learn.opt is not None
        model_before = copy.deepcopy(learn.model.state_dict())  # batch norm's running stats too
        opt_before = copy.deepcopy(learn.opt.state_dict())
        grads = [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()]
        learn.validate()
        learn.get_preds()
        assert same(model_before, learn.model.state_dict())
        assert same(opt_before, learn.opt.state_dict())
        after = [None if p.grad is None else p.grad.clone() for p in learn.model.parameters()]
        assert same(grads, after)

    def test_accuracy_from_a_metrics_callback(self):
        """With MetricsCB(MulticlassAccuracy), validate() returns the accuracy computed by hand."""
        from torchmetrics.classification import MulticlassAccuracy

        from callbacks.metrics import MetricsCB

        metrics = MetricsCB(MulticlassAccuracy(num_classes=10, average="micro"))
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.01, opt_func=torch.optim.Adam)
        learn.fit(1)
        learn.cbs.append(metrics)
        values = learn.validate()
        x = torch.cat([b[0] for b in digits_dls().valid])
        y = torch.cat([b[1] for b in digits_dls().valid])
        with torch.no_grad():
            logits = learn.model(x)
        assert set(values) == {"loss", "accuracy"}
        assert values["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        assert values["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
        assert 0.8 < values["accuracy"] < 1  # a real model, trained for one epoch

    def test_the_trace_and_what_hooks_see(self):
        """The whole trace is a validate run's; hooks run without grad, the model in eval mode."""
        seen: set[tuple] = set()

        class Look(Callback):
            def after_loss(self, learn):
                seen.add(
                    (learn.kind, learn.training, torch.is_grad_enabled(), learn.model.training)
                )

        rec = RecordingCallback()
        learn = Learner(
            mlp(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1, [rec, Look()]
        )
        learn.validate()
        assert expected_trace("validate", batches=(3,)) == rec.records
        assert seen == {(RunKind.VALIDATE, False, False, False)}
        assert (learn.state, learn.kind, learn.running) == ("idle", RunKind.VALIDATE, False)

    def test_a_data_loader_of_ones_own(self):
        """validate(dl) runs over dl instead of dls.valid."""
        learn = Learner(mlp(), batches_dls(1, 2), F.cross_entropy, 0.1)
        own = learn.validate(unequal_batches())
        default = learn.validate()
        assert own != default
        assert own == learn.validate(unequal_batches())

    def test_no_batch_gives_nan(self):
        """An empty pass has no mean: the loss is NaN, the run completed."""
        learn = Learner(mlp(), batches_dls(1, 0), F.cross_entropy, 0.1)
        values = learn.validate()
        assert values["loss"] != values["loss"]
        [end] = [r for r in run_records(learn) if r["ev"] == "run_end"]
        assert end["status"] == RunStatus.COMPLETED


class TestGetPreds:
    def test_the_eval_mode_outputs_concatenated(self):
        """Dropout off, batch norm's running statistics: what model.eval() gives, bit for bit."""
        learn = trained(regularised())
        preds, targets = learn.get_preds()
        model = learn.model
        with torch.no_grad():
            model.eval()
            expected = torch.cat([model(x) for x, _ in unequal_batches()])
            model.train()
            in_train_mode = torch.cat([model(x) for x, _ in unequal_batches()])
        assert torch.equal(preds, expected)
        assert not torch.allclose(preds, in_train_mode, atol=1e-3)  # so eval mode is seen
        assert torch.equal(targets, torch.cat([y for _, y in unequal_batches()]))
        assert (preds.shape, preds.requires_grad, preds.device.type) == ((21, 10), False, "cpu")

    @pytest.mark.parametrize(
        "wrap", [lambda x: x, lambda x: (x,), lambda x: [x]], ids=["tensor", "tuple", "list"]
    )
    def test_batches_without_targets(self, wrap):
        """A tensor, or a 1-tuple/list, is an input without a target: the targets are None."""
        batches = [wrap(x) for x, _ in unequal_batches()]
        learn = Learner(mlp(), DataLoaders([], batches), F.cross_entropy, 0.1)
        preds, targets = learn.get_preds()
        with torch.no_grad():
            expected = learn.model(torch.cat([x for x, _ in unequal_batches()]))
        assert targets is None
        assert torch.equal(preds, expected)

    def test_the_trace_is_a_predict_runs(self):
        """Each batch ends after the forward pass: no after_loss, no loss function called."""
        rec = RecordingCallback()

        def no_loss(preds, target):
            raise AssertionError("get_preds computed a loss")

        learn = Learner(mlp(), DataLoaders([], unequal_batches()), no_loss, 0.1, [rec])
        learn.get_preds()
        assert expected_trace("predict", batches=(3,)) == rec.records


class TestInferenceRuns:
    @pytest.mark.parametrize(("run", "kind"), [("validate", "validate"), ("get_preds", "predict")])
    def test_their_own_log(self, run, kind):
        """Each run writes a log of its kind: header kind, no optimizer, a verified footer."""
        learn = Learner(mlp(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1)
        getattr(learn, run)()
        records = run_records(learn)
        header, footer = records[0], next(r for r in records if r["ev"] == "run_end")
        assert (header["ev"], header["kind"], header["opt"], header["n_epochs"]) == (
            "run_start",
            kind,
            None,
            0,
        )
        assert footer["status"] == RunStatus.COMPLETED
        transitions = [r["ev"] for r in records if "src" in r]
        loss = ["compute_loss"] if kind == "validate" else []
        per_batch = ["begin_batch", "predict", *loss, "end_batch"]
        assert transitions == ["begin_epoch", *per_batch * 3, "end_epoch"]
        [report], problem = audit_file(learn.audit_path)
        assert (problem, report.verified, report.status) == (None, True, RunStatus.COMPLETED)
        assert report.run_id == learn.run_id

    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_no_optimizer_is_built(self, run):
        """On a fresh learner, validate() and get_preds() never call opt_func."""
        built: list[object] = []

        def opt_func(params, lr):
            built.append(lr)
            return torch.optim.SGD(params, lr)

        learn = Learner(mlp(), batches_dls(1, 2), F.cross_entropy, 0.1, opt_func=opt_func)
        getattr(learn, run)()
        assert (learn.opt, built) == (None, [])
        learn.fit(1)
        assert built == [0.1]

    def test_between_fits_the_optimizer_is_kept(self):
        """A validate run between two fits does not reset or replace the optimizer."""
        learn = trained(mlp())
        opt = learn.opt
        learn.validate()
        learn.get_preds()
        learn.fit(1)
        assert learn.opt is opt
        assert opt is not None
        assert opt.state_dict()["state"][0]["step"].item() == 2 * 4


class TestWhatInferenceCannotRead:
    def test_predictions_that_are_no_tensor(self):
        """get_preds() concatenates tensors: a model output it cannot read fails the run."""

        class Named(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x):
                return {"scores": self.net(x)}  # neither a tensor nor one with logits

        learn = Learner(Named(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1)
        with pytest.raises(InvalidBatchError, match=r"learn\.preds must be a tensor, got dict"):
            learn.get_preds()
        assert_failed(learn)

    def test_a_loss_per_sample(self):
        """validate() averages batch means: a loss with reduction='none' is refused by shape."""

        def per_sample(preds, target):
            return F.cross_entropy(preds, target, reduction="none")

        learn = Learner(mlp(), DataLoaders([], unequal_batches()), per_sample, 0.1)
        with pytest.raises(InvalidBatchError, match=r"must be a scalar tensor .*, got \[8\]"):
            learn.validate()
        assert_failed(learn)

    def test_a_model_that_computes_its_loss_on_data_without_labels(self):
        """get_preds() on mappings without labels: the logits of the model's output, no targets."""

        class OwnLoss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, pixels, labels=None):
                logits = self.net(pixels)
                return (
                    {"logits": logits}
                    if labels is None
                    else {
                        "logits": logits,
                        "loss": F.cross_entropy(logits, labels),
                    }
                )

        batches = [{"pixels": x} for x, _ in unequal_batches()]
        learn = Learner(OwnLoss(), DataLoaders([], batches), None, 0.1)
        preds, targets = learn.get_preds()
        with torch.no_grad():
            expected = learn.model.net(torch.cat([x for x, _ in unequal_batches()]))
        assert targets is None
        assert torch.equal(preds, expected)


class TestPartialResults:
    def test_a_cancelled_get_preds_warns_and_says_so(self):
        """A cancel mid-pass: get_preds returns the completed batches' predictions, warns, and
        last_result is cancelled."""

        class StopAtTwo(Callback):
            def before_batch(self, learn):
                if learn.iter == 2:
                    raise CancelEpochException

        learn = Learner(mlp(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1)
        learn.cbs = [StopAtTwo()]
        with pytest.warns(PartialResultWarning, match=r"get_preds\(\) was cancelled .* after 2"):
            preds, targets = learn.get_preds()
        assert preds.shape == (16, 10)
        assert targets is not None
        assert targets.shape == (16,)
        assert learn.last_result is not None
        assert learn.last_result.status == RunStatus.CANCELLED

    def test_a_completed_validate_does_not_warn(self):
        """Without a cancel, no warning: last_result is completed."""
        learn = Learner(mlp(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1)
        learn.validate()
        assert learn.last_result is not None
        assert learn.last_result.status == RunStatus.COMPLETED


class TestSamplesCounted:
    @pytest.mark.parametrize("shape", ["tuple", "dict"])
    def test_a_target_of_several_fields(self, shape):
        """(x, (ya, yb)) and (x, {"a": ya, "b": yb}): each batch counts its samples, not its
        fields, so validate's mean over samples is exact on unequal batches."""

        def pack(ya, yb):
            return (ya, yb) if shape == "tuple" else {"a": ya, "b": yb}

        def unpack(target):
            return target if shape == "tuple" else (target["a"], target["b"])

        def two_heads(preds, target):
            ya, yb = unpack(target)
            return F.cross_entropy(preds, ya) + F.mse_loss(preds[:, 0], yb)

        batches = [(x, pack(y, y.float())) for x, y in unequal_batches()]
        learn = Learner(mlp(), DataLoaders([], batches), two_heads, 0.1)
        with torch.no_grad():
            learn.model.eval()
            x = torch.cat([x for x, _ in unequal_batches()])
            y = torch.cat([y for _, y in unequal_batches()])
            preds = learn.model(x)
            per_sample = (
                F.cross_entropy(preds, y, reduction="none") + (preds[:, 0] - y.float()) ** 2
            )
        assert learn.validate()["loss"] == pytest.approx(per_sample.mean().item(), rel=1e-6)


class TestDataInferenceRefuses:
    @pytest.mark.parametrize("dl", ["abc", b"abc", {"x": 1}, 3])
    def test_what_is_no_batches(self, dl):
        """A string, bytes or a mapping is no iterable of batches: refused, naming its type."""
        learn = Learner(mlp(), DataLoaders([], unequal_batches()), F.cross_entropy, 0.1)
        with pytest.raises(InvalidDataLoadersError, match=rf"got {type(dl).__name__}$"):
            learn.validate(dl)
        assert learn.run_id == ""

    @pytest.mark.parametrize("n_batches", [1, 2])
    def test_one_prediction_per_batch(self, n_batches):
        """A 0-d prediction per batch cannot be concatenated: the first batch fails the run."""

        class Mean(nn.Module):
            def forward(self, x):
                return x.mean()

        batches = [(torch.ones(8, 2),)] * n_batches
        learn = Learner(Mean(), DataLoaders([], batches), F.cross_entropy, 0.1)
        with pytest.raises(InvalidBatchError, match=r"batch 0 gave a 0-d tensor"):
            learn.get_preds()
        assert_failed(learn)

    def test_predictions_of_different_shapes(self):
        """Padded per batch (7 then 9 columns): get_preds fails in the run, naming both
        shapes, instead of after it with a bare torch error."""

        class Padded(nn.Module):
            def forward(self, x):
                return torch.zeros(len(x), 7 if len(x) == 8 else 9)

        batches = [(torch.ones(8, 2),), (torch.ones(5, 2),)]
        learn = Learner(Padded(), DataLoaders([], batches), F.cross_entropy, 0.1)
        with pytest.raises(
            InvalidBatchError, match=r"batch 1 gave shape \[5, 9\] where the first gave \[8, 7\]"
        ):
            learn.get_preds()
        assert_failed(learn)


def assert_failed(learn: Learner) -> None:
    """The run failed with InvalidBatchError, and its log says so and verifies."""
    [end] = [r for r in run_records(learn) if r["ev"] == "run_end"]
    assert (end["status"], end["failure"]["type"]) == (RunStatus.FAILED, "InvalidBatchError")
    [report], problem = audit_file(learn.audit_path)
    assert (problem, report.verified) == (None, True)
    assert (learn.state, learn.running) == ("idle", False)
