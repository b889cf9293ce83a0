"""The Learner's normal path: whole traces, real training, what hooks may read and replace."""

from __future__ import annotations

import copy
from functools import partial

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, digits_dls, digits_tensors, mlp, same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    ConfigurationError,
    DataLoaders,
    Hook,
    InvalidBatchError,
    InvalidCallbackError,
    InvalidDataLoadersError,
    InvalidTransitionError,
    Learner,
    RunKind,
)
from fsm_learner.testing import HostReads, RecordingCallback, expected_hooks, expected_trace

H = Hook


class TestNormalPath:
    def test_whole_trace_of_two_epochs(self):
        """Two epochs of 2 training and 1 validation batch fire every hook in table order."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [rec])
        learn.fit(2)
        assert expected_trace(n_epochs=2, batches=(2, 1)) == rec.records
        assert learn.state == "idle"
        # 1 begin_fit + per epoch (2 passes x (begin+end) + 2 train x 6 + 1 valid x 4) + end_fit
        assert learn.seq == 1 + 2 * (4 + 12 + 4) + 1

    def test_fit_zero_epochs_and_empty_dataloaders(self):
        """n_epochs=0 is a fit with no epoch; empty dataloaders give passes with no batch."""
        rec = RecordingCallback()
        learn = Learner(mlp(), DataLoaders([], []), F.cross_entropy, 0.1, [rec])
        learn.fit(0)
        assert rec.hooks == [H.BEFORE_FIT, H.AFTER_FIT, H.CLEANUP_FIT]
        rec.records.clear()
        learn.fit(1)
        assert rec.hooks == [
            H.BEFORE_FIT,
            H.BEFORE_EPOCH,
            H.AFTER_EPOCH,
            H.CLEANUP_EPOCH,
            H.BEFORE_EPOCH,
            H.AFTER_EPOCH,
            H.CLEANUP_EPOCH,
            H.AFTER_FIT,
            H.CLEANUP_FIT,
        ]
        assert rec.hooks == expected_hooks(batches=(0, 0))
        assert learn.state == "idle"

    def test_callbacks_run_in_order_ties_in_list_order(self):
        """Ascending order; equal orders keep their list position."""
        calls: list[str] = []

        class Named(Callback):
            def __init__(self, name: str, order: int) -> None:
                self.name, self.order = name, order

            def before_fit(self, learn):
                calls.append(self.name)

        cbs = [Named("c", 5), Named("a", -1), Named("d", 5), Named("b", 0)]
        Learner(mlp(), DataLoaders([], []), F.cross_entropy, 0.1, cbs).fit(0)
        assert calls == ["a", "b", "c", "d"]

    def test_trains_digits_to_high_accuracy(self):
        """A real MLP on real digits: Adam takes validation accuracy past 90% in 5 epochs."""
        correct: list[int] = []

        class Accuracy(Callback):
            def before_epoch(self, learn):
                correct.clear()

            def after_batch(self, learn):
                if not learn.training:
                    correct.append(int((learn.preds.argmax(1) == learn.batch[1]).sum()))

        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.01, [Accuracy()], torch.optim.Adam)
        learn.fit(5)
        assert sum(correct) / 397 > 0.9

    def test_fit_again_continues_training(self):
        """A second fit starts from idle with the trained weights."""
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1)
        learn.fit(1)
        w = learn.model[0].weight.detach().clone()
        learn.fit(1)
        assert learn.state == "idle"
        assert not torch.equal(w, learn.model[0].weight)


class TestWhatHooksSee:
    def test_training_flag_grad_mode_and_model_mode(self):
        """Training passes run with grad and model.train(); validation under no_grad, eval."""
        seen: list[tuple[bool, bool, bool]] = []

        class Look(Callback):
            def after_predict(self, learn):
                seen.append((learn.training, torch.is_grad_enabled(), learn.model.training))

        Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Look()]).fit(1)
        assert seen == [(True, True, True), (False, False, False)]

    def test_readable_attributes(self):
        """Every attribute the Learner documents is readable in a hook, with the right values."""
        seen: dict[str, object] = {}
        dls = batches_dls(1, 1)

        class Look(Callback):
            def after_loss(self, learn):
                if learn.training:
                    seen.update(
                        model=learn.model,
                        opt=type(learn.opt),
                        dls=learn.dls,
                        dl=learn.dl,
                        loss_func=learn.loss_func,
                        lr=learn.lr,
                        epoch=learn.epoch,
                        n_epochs=learn.n_epochs,
                        iter=learn.iter,
                        batch=learn.batch,
                        output=learn.output is learn.preds,
                        preds=learn.preds.shape,
                        target=learn.target is learn.batch[1],
                        loss=learn.loss.shape,
                        training=learn.training,
                        state=learn.state,
                        kind=learn.kind,
                        running=learn.running,
                    )

        model = mlp()
        learn = Learner(model, dls, F.cross_entropy, 0.25, [Look()], torch.optim.Adam)
        learn.fit(1)
        assert seen == {
            "model": model,
            "opt": torch.optim.Adam,
            "dls": dls,
            "dl": dls.train,
            "loss_func": F.cross_entropy,
            "lr": 0.25,
            "epoch": 0,
            "n_epochs": 1,
            "iter": 0,
            "batch": dls.train[0],
            "output": True,  # a tensor output is the predictions themselves
            "preds": torch.Size([8, 10]),
            "target": True,  # the last element of a tuple batch
            "loss": torch.Size([]),
            "training": True,
            "state": "loss",
            "kind": RunKind.FIT,
            "running": True,
        }
        assert (learn.running, learn.kind) == (False, RunKind.FIT)

    def test_hooks_replace_batch_preds_and_loss(self):
        """Values a hook assigns are the ones the loop uses next."""
        x, y = torch.ones(4, 64), torch.zeros(4, dtype=torch.int64)
        losses: list[float] = []

        class Replace(Callback):
            def before_batch(self, learn):
                learn.batch = (x, y)

            def after_predict(self, learn):
                learn.preds = torch.zeros_like(learn.preds, requires_grad=learn.training)

            def after_loss(self, learn):
                learn.loss = learn.loss * 0 + 7

            def after_batch(self, learn):
                losses.append(float(learn.loss.detach()))
                assert learn.batch[0] is x

        model = mlp()
        before = [p.detach().clone() for p in model.parameters()]
        Learner(model, batches_dls(2, 1), F.cross_entropy, 0.1, [Replace()]).fit(1)
        assert losses == [7.0, 7.0, 7.0]
        # the replaced preds do not depend on the weights: the step changes nothing
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    def test_fit_from_a_hook_is_refused(self):
        """fit() inside a running fit is an InvalidTransitionError (and fails the outer fit)."""

        class Nested(Callback):
            def before_fit(self, learn):
                learn.fit(1)

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Nested()])
        try:
            learn.fit(1)
        except InvalidTransitionError as exc:
            assert "fit() called in state 'fit'" in str(exc)
        else:  # pragma: no cover
            raise AssertionError("nested fit was not refused")
        assert learn.state == "idle"


class TestOverrides:
    """Overrides replace a piece of the batch's work; ``proceed()`` runs the rest of the chain."""

    def test_step_and_backward_overrides(self):
        """Overrides run per training batch; proceed() runs the default work."""
        calls: list[tuple[str, int]] = []

        class Accumulate(Callback):
            def backward(self, learn, proceed):
                calls.append(("backward", learn.iter))
                learn.loss = learn.loss / 2
                proceed()

            def step(self, learn, proceed):
                calls.append(("step", learn.iter))
                if learn.iter % 2 == 1:
                    proceed()

        model = mlp()
        learn = Learner(model, batches_dls(2, 1), F.cross_entropy, 0.1, [Accumulate()])
        learn.fit(1)
        assert calls == [("backward", 0), ("step", 0), ("backward", 1), ("step", 1)]
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())

    def test_overrides_compose_in_order(self):
        """Lower order is outer: it decides whether the higher-order override runs at all."""
        calls: list[str] = []

        class Outer(Callback):
            order = 1

            def step(self, learn, proceed):
                calls.append(f"outer {learn.iter}")
                if learn.iter == 1:
                    proceed()

        class Inner(Callback):
            order = 5

            def step(self, learn, proceed):
                calls.append(f"inner {learn.iter}")
                learn.opt.step()
                learn.opt.zero_grad()

        learn = Learner(mlp(), batches_dls(2, 0), F.cross_entropy, 0.1, [Inner(), Outer()])
        learn.fit(1)
        assert calls == ["outer 0", "outer 1", "inner 1"]

    def test_a_predict_override_calls_the_model_its_own_way(self):
        """A model called with an extra keyword: its predictions are what every run uses."""
        model = Scalable()
        dls = batches_dls(2, 2)
        plain = Learner(model, dls, F.cross_entropy, 0.1, audit_log=None).get_preds()[0]
        calls: list[RunKind] = []

        class Doubled(Callback):
            def predict(self, learn, proceed):
                calls.append(learn.kind)
                learn.output = learn.preds = learn.model(learn.batch[0], scale=2.0)

        learn = Learner(model, dls, F.cross_entropy, 0.1, [Doubled()], audit_log=None)
        preds, _ = learn.get_preds()
        assert torch.equal(preds, 2 * plain)
        x, y = torch.cat([b[0] for b in dls.valid]), torch.cat([b[1] for b in dls.valid])
        with torch.no_grad():
            expected = F.cross_entropy(2 * model.eval()(x), y).item()
        assert learn.validate()["loss"] == pytest.approx(expected, rel=1e-6)
        learn.fit(1)
        assert calls == [RunKind.PREDICT] * 2 + [RunKind.VALIDATE] * 2 + [RunKind.FIT] * 4

    def test_a_compute_loss_override_smooths_the_labels(self):
        """Label smoothing as an override: validate() reports the smoothed loss, fit uses it."""

        class Smoothed(Callback):
            def compute_loss(self, learn, proceed):
                learn.loss = F.cross_entropy(learn.preds, learn.target, label_smoothing=0.2)

        dls = batches_dls(2, 2)
        model = mlp()
        x, y = torch.cat([b[0] for b in dls.valid]), torch.cat([b[1] for b in dls.valid])
        with torch.no_grad():
            logits = model.eval()(x)
        smoothed = F.cross_entropy(logits, y, label_smoothing=0.2).item()
        assert smoothed != pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3)
        learn = Learner(model, dls, F.cross_entropy, 0.1, [Smoothed()], audit_log=None)
        assert learn.validate()["loss"] == pytest.approx(smoothed, rel=1e-6)

        losses: list[torch.Tensor] = []

        class Keep(Callback):
            def after_loss(self, learn):
                losses.append(learn.loss.detach())

        smoothing = Learner(mlp(), dls, F.cross_entropy, 0.1, [Smoothed(), Keep()], audit_log=None)
        smoothing.fit(1)
        first_x, first_y = dls.train[0]
        with torch.no_grad():
            first = F.cross_entropy(mlp()(first_x), first_y, label_smoothing=0.2)
        assert torch.equal(losses[0], first)

    def test_predict_runs_skip_compute_loss(self):
        """get_preds() never computes a loss: neither the override nor the loss function runs."""
        calls: list[str] = []

        class Count(Callback):
            def compute_loss(self, learn, proceed):
                calls.append(learn.kind)
                proceed()

        def no_loss(preds, target):
            raise AssertionError("a predict run computed a loss")

        learn = Learner(mlp(), batches_dls(1, 3), no_loss, 0.1, [Count()], audit_log=None)
        preds, targets = learn.get_preds()
        assert (calls, preds.shape, targets is not None) == ([], torch.Size([24, 10]), True)

    def test_predict_and_compute_loss_overrides_compose_in_order(self):
        """The lower order wraps the higher: it sees and may change what the inner one did."""
        dls = batches_dls(1, 2)
        model = Scalable()
        x, y = torch.cat([b[0] for b in dls.valid]), torch.cat([b[1] for b in dls.valid])
        with torch.no_grad():
            plain = model.eval()(x)

        class Shift(Callback):
            order = 1

            def predict(self, learn, proceed):
                proceed()
                learn.preds = learn.preds + 1

            def compute_loss(self, learn, proceed):
                proceed()
                learn.loss = learn.loss / 2

        class Double(Callback):
            order = 2

            def predict(self, learn, proceed):
                learn.output = learn.preds = learn.model(learn.batch[0], scale=2.0)

            def compute_loss(self, learn, proceed):
                learn.loss = F.cross_entropy(learn.preds, learn.target, label_smoothing=0.2)

        inner_first = Learner(model, dls, F.cross_entropy, 0.1, [Double(), Shift()], audit_log=None)
        preds, _ = inner_first.get_preds()
        assert torch.equal(preds, 2 * plain + 1)
        loss = F.cross_entropy(2 * plain + 1, y, label_smoothing=0.2).item() / 2
        assert inner_first.validate()["loss"] == pytest.approx(loss, rel=1e-6)

        class Last(Shift):
            order = 3

        shift_inner = Learner(model, dls, F.cross_entropy, 0.1, [Last(), Double()], audit_log=None)
        preds, _ = shift_inner.get_preds()  # Double never proceeds: the shift never runs
        assert torch.equal(preds, 2 * plain)


class Scalable(nn.Module):
    """The MLP with a keyword its callers may pass: ``model(x, scale=2.0)`` doubles the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.net(x) * scale


def ordered_digits() -> DataLoaders:
    """512 training and 128 validation digits in batches of 64, in the same order every epoch."""
    x, y = digits_tensors()
    return DataLoaders(
        DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64),
        DataLoader(TensorDataset(x[1400:1528], y[1400:1528]), batch_size=64),
    )


def adam_learner() -> Learner:
    return Learner(mlp(), ordered_digits(), F.cross_entropy, 0.01, opt_func=torch.optim.Adam)


def trained_state(learn: Learner) -> tuple[dict, dict]:
    assert learn.opt is not None
    return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())


class TestOptimizerAcrossFits:
    def test_two_fits_of_two_epochs_are_one_of_four(self):
        """Adam's moments and step count carry over: weights and state equal fit(4) bit for bit."""
        once = adam_learner()
        once.fit(4)
        twice = adam_learner()
        twice.fit(2)
        opt = twice.opt
        twice.fit(2)
        assert twice.opt is opt
        weights, state = trained_state(twice)
        assert same(weights, once.model.state_dict())
        assert same(state, once.opt.state_dict())
        assert state["state"][0]["step"].item() == 4 * 8  # 8 training batches an epoch

    def test_reset_opt_starts_a_new_optimizer(self):
        """fit(2, reset_opt=True) builds a fresh Adam: its steps restart, the weights differ."""
        once = adam_learner()
        once.fit(4)
        reset = adam_learner()
        reset.fit(2)
        first = reset.opt
        reset.fit(2, reset_opt=True)
        assert reset.opt is not first
        weights, state = trained_state(reset)
        assert state["state"][0]["step"].item() == 2 * 8
        assert not same(weights, once.model.state_dict())

    def test_a_user_set_optimizer_is_used_and_kept(self):
        """learn.opt set before the first fit is the one that steps; opt_func is never called."""
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        built: list[object] = []

        def opt_func(params, lr):
            built.append(lr)
            return torch.optim.SGD(params, lr)

        learn = Learner(model, ordered_digits(), F.cross_entropy, 0.1, opt_func=opt_func)
        learn.opt = opt
        before = copy.deepcopy(model.state_dict())
        learn.fit(1)
        learn.fit(1)
        assert (learn.opt, built) == (opt, [])
        assert opt.param_groups[0]["lr"] == 0.05  # the learner's lr does not overwrite it
        assert all(opt.state[p]["momentum_buffer"] is not None for p in model.parameters())
        assert not same(before, model.state_dict())
        learn.lr = 0.2
        assert opt.param_groups[0]["lr"] == 0.2  # until lr is set: then it is the optimizer's

    def test_param_groups_reach_the_optimizer(self):
        """param_groups(model) is what opt_func gets: a group with lr 0 keeps its weights."""

        def frozen_first_layer(model):
            return [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}]

        learn = Learner(
            mlp(), ordered_digits(), F.cross_entropy, 0.1, param_groups=frozen_first_layer
        )
        first, last = (learn.model[i].weight.detach().clone() for i in (0, 2))
        learn.fit(1)
        assert learn.opt is not None
        assert [g["lr"] for g in learn.opt.param_groups] == [0.0, 0.1]
        assert torch.equal(first, learn.model[0].weight)
        assert not torch.equal(last, learn.model[2].weight)

    def test_a_new_model_gets_a_new_optimizer(self):
        """learn.model replaced between fits: the kept optimizer holds none of its parameters,
        so the learner builds one for it, and the new model trains."""
        learn = adam_learner()
        learn.fit(1)
        old = learn.opt
        learn.model = mlp(seed=1)
        before = copy.deepcopy(learn.model.state_dict())
        result = learn.fit(1)
        assert learn.opt is not old
        assert not same(before, learn.model.state_dict())
        assert result.status == "completed"

    def test_a_new_opt_func_builds_a_new_optimizer(self):
        """opt_func changed between fits: the next fit builds from it."""
        learn = adam_learner()
        learn.fit(1)
        learn.opt_func = torch.optim.SGD
        learn.fit(1)
        assert isinstance(learn.opt, torch.optim.SGD)

    def test_an_optimizer_of_another_model_is_refused(self):
        """A user's optimizer that holds none of the model's parameters trains nothing: refused
        at fit, before the run, with what to do instead."""
        learn = adam_learner()
        learn.opt = torch.optim.SGD(mlp(seed=3).parameters(), lr=0.1)
        with pytest.raises(ConfigurationError, match=r"learn\.opt \(SGD\) holds none of"):
            learn.fit(1)
        assert learn.fit(1, reset_opt=True).status == "completed"

    @pytest.mark.parametrize(
        ("setting", "message"),
        [
            (
                {"opt_func": lambda _params, _lr: 1 / 0},
                r"opt_func\(param_groups\(model\), lr\) raised ZeroDivisionError",
            ),
            (
                {"opt_func": lambda _params, _lr: "adam"},
                r"opt_func must return a torch\.optim\.Optimizer, got 'adam'",
            ),
            (
                {"param_groups": lambda _model: 1 / 0},
                r"param_groups\(model\) raised ZeroDivisionError",
            ),
        ],
    )
    def test_an_optimizer_that_cannot_be_built(self, setting, message):
        """A failing opt_func or param_groups is a ConfigurationError naming it, before any run."""
        learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, **setting)
        with pytest.raises(ConfigurationError, match=message):
            learn.fit(1)
        assert (learn.state, learn.run_id, learn.opt) == ("idle", "", None)

    def test_a_model_without_parameters(self):
        """torch refuses an empty parameter list: the message says what was called with what."""
        learn = Learner(nn.Flatten(), ordered_digits(), F.cross_entropy, 0.1)
        with pytest.raises(ConfigurationError, match=r"empty parameter list .* 0 parameter\(s\)"):
            learn.fit(1)

    @pytest.mark.parametrize(
        ("groups", "message"),
        [
            (
                lambda _model: [{"lr": 0.1}],
                r"opt_func\(param_groups\(model\), lr\) raised KeyError: 'params'",
            ),
            (
                lambda model: {"params": model.parameters()},
                r"returned one dict; .*\(wrap one group",
            ),
            (lambda model: model, r"returned one Sequential"),
        ],
    )
    def test_param_groups_that_give_no_groups(self, groups, message):
        """param_groups giving one dict, the model, or groups without params: a message."""
        learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, param_groups=groups)
        with pytest.raises(ConfigurationError, match=message):
            learn.fit(1)

    def test_settings_that_build_the_optimizer_are_checked_when_set(self):
        """opt_func and param_groups set on the learner are checked as in the constructor;
        an optimizer given as opt_func is told where it belongs."""
        learn = adam_learner()
        with pytest.raises(
            ConfigurationError, match="param_groups must be callable or None, got 5"
        ):
            learn.param_groups = 5  # type: ignore[assignment]
        built = torch.optim.Adam(learn.model.parameters())
        with pytest.raises(ConfigurationError, match=r"set learn\.opt to the optimizer itself"):
            learn.opt_func = built  # type: ignore[assignment]

    def test_an_opt_that_is_no_optimizer(self):
        """learn.opt set to something else is refused at the next fit, not at its first step."""
        learn = adam_learner()
        learn.opt = "adam"  # type: ignore[assignment]
        with pytest.raises(
            ConfigurationError, match=r"learn\.opt must be a torch\.optim\.Optimizer, .* got 'adam'"
        ):
            learn.fit(1)

    def test_every_fit_starts_from_the_optimizer_s_own_rates(self):
        """A one-cycle fit ends at its final rate and momentum; the next fit starts from the
        optimizer's own (its lr, learn.lr once set), as the header records."""
        from callbacks import BatchSchedCB

        sgd = partial(torch.optim.SGD, momentum=0.5)
        learn = Learner(
            mlp(), ordered_digits(), F.cross_entropy, 0.1, [BatchSchedCB.one_cycle(1.0)], sgd
        )
        learn.fit(1)
        assert learn.opt is not None
        (group,) = learn.opt.param_groups
        assert group["lr"] == pytest.approx(1.0 / 25 / 1e4)
        learn.cbs = []
        seen: list[tuple[float, float]] = []

        class Rates(Callback):
            def after_step(self, learn):
                seen.append((group["lr"], group["momentum"]))

        learn.cbs = [Rates()]
        result = learn.fit(1)
        assert set(seen) == {(0.1, 0.5)}
        header = orjson.loads(result.audit_path.read_bytes().split(b"\n", 1)[0])
        assert header["lr"] == 0.1
        learn.lr = 0.02
        seen.clear()
        learn.fit(1)
        assert set(seen) == {(0.02, 0.5)}

    def test_a_rate_the_user_sets_in_the_optimizer_between_fits_is_kept(self):
        """A rate set in opt.param_groups by hand between fits is the user's: the next fit
        starts from it (only what a schedule left is set back)."""
        learn = adam_learner()
        learn.fit(1)
        assert learn.opt is not None
        learn.opt.param_groups[0]["lr"] = 0.001
        learn.fit(1)
        assert learn.opt.param_groups[0]["lr"] == 0.001
        assert learn.lr == 0.001

    def test_learn_lr_is_a_user_optimizer_s_rate(self):
        """With the user's optimizer, learn.lr reads its rate, before and after a fit."""
        model = mlp()
        learn = Learner(model, ordered_digits(), F.cross_entropy, 0.5)
        learn.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        learn.fit(1)
        assert learn.lr == 0.01

    def test_the_header_records_a_user_optimizer_s_rate(self):
        """With the user's optimizer at lr 0.01, the header says 0.01, not Learner(lr=0.5)'s."""
        model = mlp()
        learn = Learner(model, ordered_digits(), F.cross_entropy, 0.5)
        learn.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        result = learn.fit(1)
        header = orjson.loads(result.audit_path.read_bytes().split(b"\n", 1)[0])
        assert header["lr"] == 0.01


class TestWorkThatSetsNothing:
    def test_a_predict_override_that_sets_no_preds(self):
        """An override that skips proceed() and sets no preds fails the batch, naming itself,
        rather than reusing the last batch's predictions."""

        class Skip(Callback):
            def predict(self, learn, proceed):
                if learn.iter == 0:
                    proceed()

        learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, [Skip()])
        with pytest.raises(
            InvalidCallbackError,
            match=r"the predict work of batch 1 set no learn\.preds: its overrides \(Skip\) must",
        ):
            learn.get_preds()
        assert learn.last_result is not None
        assert learn.last_result.status == "failed"

    def test_a_compute_loss_override_that_sets_no_loss(self):
        """The same for compute_loss: validate() fails rather than averaging a stale loss."""

        class NoLoss(Callback):
            def compute_loss(self, learn, proceed):
                return None

        learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, [NoLoss()])
        with pytest.raises(
            InvalidCallbackError, match=r"compute_loss work of batch 0 set no learn\.loss"
        ):
            learn.validate()


class TestMessagesOfTheDefaultWork:
    def test_a_loss_per_sample_in_a_fit(self):
        """reduction='none': backward's bare error gets a note naming the shape and the fix."""
        learn = Learner(
            mlp(),
            ordered_digits(),
            lambda preds, target: F.cross_entropy(preds, target, reduction="none"),
            0.1,
        )
        with pytest.raises(RuntimeError) as info:
            learn.fit(1)
        assert any(
            "learn.loss has shape [" in note and "reduction='mean'" in note
            for note in info.value.__notes__
        )

    def test_a_dict_output_without_logits(self):
        """The model returns {"scores": ...}: loss_func's error says learn.preds is that dict."""

        class Scores(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x):
                return {"scores": self.net(x)}

        learn = Learner(Scores(), ordered_digits(), F.cross_entropy, 0.1)
        with pytest.raises(TypeError) as info:
            learn.fit(1)
        assert any("learn.preds = the model's output, a dict" in n for n in info.value.__notes__)

    def test_a_plain_tuple_output_is_not_read_for_a_loss(self):
        """loss_func=None and a (loss, logits) tuple: the error says plain tuples have no names."""

        class Pair(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x, y):
                logits = self.net(x)
                return F.cross_entropy(logits, y), logits

        learn = Learner(Pair(), ordered_digits(), None, 0.1)
        with pytest.raises(InvalidBatchError, match="a plain tuple has no names"):
            learn.fit(1)

    def test_last_result_is_none_after_a_refused_call(self):
        """A call refused before its run started leaves no last_result (not the last run's)."""
        learn = adam_learner()
        learn.fit(1)
        assert learn.last_result is not None
        with pytest.raises(ConfigurationError):
            learn.fit(-1)
        assert learn.last_result is None


class TestCancelledGradients:
    @pytest.mark.parametrize("cancel", [CancelBatchException, CancelEpochException])
    def test_a_batch_cancelled_after_its_backward_leaves_no_gradient(self, cancel):
        """Cancelled in after_backward, a batch's gradients are dropped: the weights end as if
        it had been cancelled before its forward pass."""

        def cancelling(hook: str) -> Callback:
            class Cancel(Callback):
                pass

            def raise_at_one(self, learn):
                if learn.training and learn.iter == 1:
                    raise cancel

            setattr(Cancel, hook, raise_at_one)
            return Cancel()

        runs = []
        for hook in ("before_batch", "after_backward"):
            torch.manual_seed(0)
            learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, [cancelling(hook)])
            learn.fit(2)
            runs.append(copy.deepcopy(learn.model.state_dict()))
        assert same(*runs)
        assert all(p.grad is None for p in learn.model.parameters())

    def test_a_cancel_inside_the_backward_work_drops_its_gradients(self):
        """A backward override that computes the gradients (proceed) and then cancels: the
        state is still loss, and the gradients are dropped all the same."""

        class CancelAfterProceed(Callback):
            order = 20

            def backward(self, learn, proceed):
                proceed()
                if learn.iter == 1:
                    raise CancelBatchException

        class CancelBefore(Callback):
            def before_batch(self, learn):
                if learn.training and learn.iter == 1:
                    raise CancelBatchException

        runs = []
        for cb in (CancelBefore(), CancelAfterProceed()):
            torch.manual_seed(0)
            learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, [cb])
            learn.fit(1)
            runs.append(copy.deepcopy(learn.model.state_dict()))
        assert same(*runs)

    def test_a_failure_after_backward_leaves_no_gradient_for_the_next_fit(self):
        """after_backward raises: the failed fit's gradients are dropped, so the next fit
        trains as one started clean."""

        class FailOnce(Callback):
            failed = False

            def after_backward(self, learn):
                if not self.failed:
                    self.failed = True
                    raise ValueError("once")

        torch.manual_seed(0)
        learn = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1, [FailOnce()])
        before = copy.deepcopy(learn.model.state_dict())
        with pytest.raises(ValueError, match="once"):
            learn.fit(1)
        assert all(p.grad is None for p in learn.model.parameters())
        assert same(before, learn.model.state_dict())
        learn.fit(1)
        clean = Learner(mlp(), ordered_digits(), F.cross_entropy, 0.1)
        clean.fit(1)
        assert same(learn.model.state_dict(), clean.model.state_dict())


class TestDataSetLater:
    def test_dls_set_later_is_checked(self):
        """learn.dls set after construction is checked as at construction (an iterator)."""
        learn = adam_learner()
        batches = list(ordered_digits().train)
        with pytest.raises(InvalidDataLoadersError, match=r"dls\.train is a list_iterator"):
            learn.dls = DataLoaders(iter(batches), [])
        assert learn.dls.train is not None


class TestNoSync:
    def test_loop_reads_nothing_back_from_tensors(self):
        """The loop, with its audit log on, never reads a tensor value back to the host."""
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1)
        with HostReads() as reads:
            learn.fit(2)
        assert reads.count == 0

    def test_host_reads_counts_what_a_hook_reads(self):
        """The counter is live: a hook that calls .item() per batch is counted per batch."""

        class Reader(Callback):
            def after_loss(self, learn):
                learn.loss.item()

        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [Reader()])
        with HostReads() as reads:
            learn.fit(2)
        assert reads.count == 2 * (3 + 2)


def test_model_other_than_mlp_trains():
    """A small CNN, to show the loop is not MLP-shaped."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    losses: list[torch.Tensor] = []

    class Keep(Callback):
        def after_batch(self, learn):
            if not learn.training:
                losses.append(learn.loss.detach())

    Learner(model, digits_dls(), F.cross_entropy, 0.1, [Keep()]).fit(2)
    per_epoch = torch.stack(losses).view(2, -1).mean(1)
    assert per_epoch[1] < per_epoch[0] < 2.3
