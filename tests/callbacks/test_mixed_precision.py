"""MixedPrecisionCB: autocast where it belongs, accumulation composes, skipped steps cancel."""

from __future__ import annotations

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Boom,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    mlp,
    resumed_fit,
    same_weights,
    saved_state,
)
from torch import nn

from callbacks.grad_accum import GradientAccumulationCB
from callbacks.mixed_precision import MixedPrecisionCB
from fsm_learner import (
    Callback,
    CancelBatchException,
    ConfigurationError,
    DataLoaders,
    Learner,
    RunStatus,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.exceptions import CheckpointError, ResumeWarning


def autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


class ProbedMLP(nn.Module):
    """The seeded MLP, noting whether autocast is on in each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.autocast: list[bool] = []

    def forward(self, x):
        self.autocast.append(autocast_on())
        return self.net(x)


class ProbedLoss:
    """Cross-entropy, noting whether autocast is on each time it runs."""

    def __init__(self) -> None:
        self.autocast: list[bool] = []

    def __call__(self, preds, target):
        self.autocast.append(autocast_on())
        return F.cross_entropy(preds, target)


class Look(Callback):
    """Whether autocast is on in the hooks, and in which dtype the predictions come."""

    order = 30

    def __init__(self) -> None:
        self.seen: dict[str, set[object]] = {"hooks": set(), "preds": set()}

    def after_predict(self, learn):
        self.seen["hooks"].add(autocast_on())
        self.seen["preds"].add(learn.preds.dtype)

    def after_loss(self, learn):
        self.seen["hooks"].add(autocast_on())

    def after_backward(self, learn):
        self.seen["hooks"].add(autocast_on())


class InsideOverride(Callback):
    """A predict override: whether autocast is on where its order puts it."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.autocast: list[bool] = []

    def predict(self, learn, proceed):
        self.autocast.append(autocast_on())
        proceed()


def learner(cbs, *, n_train=4, lr=0.5, **kwargs):
    return Learner(mlp(), batches_dls(n_train, 2), F.cross_entropy, lr, cbs, **kwargs)


class TestAutocastRegion:
    def test_bfloat16_on_cpu_for_forward_and_loss_only(self):
        """The model's forward and the loss run under bf16 autocast; no hook does, nor the
        backward pass, and autocast is off after the fit."""
        look, mp, model, loss = Look(), MixedPrecisionCB(), ProbedMLP(), ProbedLoss()
        Learner(model, batches_dls(4, 2), loss, 0.5, [mp, look], audit_log=None).fit(1)
        assert model.autocast == loss.autocast == [True] * 6
        assert look.seen == {"hooks": {False}, "preds": {torch.bfloat16}}
        assert mp.scaler is None
        assert not autocast_on()

    def test_overrides_of_higher_order_run_inside_the_region(self):
        """Overrides compose outer to inner by order: 10 runs outside autocast, 20 inside."""
        outer, inner = InsideOverride(order=10), InsideOverride(order=20)
        learner([outer, MixedPrecisionCB(), inner], audit_log=None).fit(1)
        assert outer.autocast == [False] * 6
        assert inner.autocast == [True] * 6

    def test_validate_and_predict_runs_are_under_autocast_too(self):
        """Runs without before_fit: the forward runs in bf16, and the loss agrees with a
        float32 validation within bf16 precision."""
        model, loss = ProbedMLP(), ProbedLoss()
        learn = Learner(model, batches_dls(4, 3), loss, 0.5, [MixedPrecisionCB()], audit_log=None)
        mixed = learn.validate()
        preds, _ = learn.get_preds()
        assert model.autocast == [True] * 6
        assert loss.autocast == [True] * 3
        assert preds.dtype == torch.bfloat16
        learn.cbs = []
        plain = learn.validate()
        assert mixed["loss"] == pytest.approx(plain["loss"], rel=2e-2)
        assert mixed["loss"] != plain["loss"]

    def test_training_still_learns(self):
        """bf16 forward passes train the model: the training loss falls over 3 epochs."""
        losses: list[float] = []

        class Loss(Callback):
            def after_epoch(self, learn):
                if learn.training:
                    losses.append(float(learn.loss.detach()))

        learner([MixedPrecisionCB(), Loss()], n_train=20, lr=0.5, audit_log=None).fit(3)
        assert losses[-1] < losses[0]

    @pytest.mark.parametrize("cancel", [CancelBatchException, Boom])
    def test_a_batch_ended_inside_the_region_leaves_it(self, cancel):
        """A cancel or a failure inside the forward pass does not leak autocast."""

        class Raise(Callback):
            order = 20

            def predict(self, learn, proceed):
                assert autocast_on()
                raise cancel

        learn = learner([MixedPrecisionCB(), Raise()], audit_log=None)
        if cancel is Boom:
            with pytest.raises(Boom):
                learn.fit(1)
        else:
            learn.fit(1)
        assert not autocast_on()


def one_step(cbs, k=4) -> dict[str, torch.Tensor]:
    """Weights after k accumulated batches of 8 digits: one SGD step."""
    cbs = [GradientAccumulationCB(k), *cbs]
    learn = Learner(mlp(), batches_dls(k, 1), F.cross_entropy, 0.5, cbs, audit_log=None)
    learn.fit(1)
    return learn.model.state_dict()


class TestWithAccumulation:
    def test_bf16_with_accumulation_matches_accumulation_alone(self):
        """Accumulation decides whether to step, MP how: same step within bf16 tolerance."""
        start = mlp().state_dict()
        alone, mixed = one_step([]), one_step([MixedPrecisionCB()])
        for name in alone:
            update, mixed_update = alone[name] - start[name], mixed[name] - start[name]
            assert update.abs().max() > 1e-3
            torch.testing.assert_close(mixed_update, update, rtol=0, atol=2e-2 * update.abs().max())

    def test_fp16_scaler_with_accumulation_matches_accumulation_alone(self):
        """With a GradScaler, the scaled accumulated gradient steps like the plain one."""
        alone = one_step([])
        mp = MixedPrecisionCB(dtype=torch.float16)
        mixed = one_step([mp])
        assert mp.skipped == 0
        for name in alone:
            torch.testing.assert_close(mixed[name], alone[name], rtol=0, atol=5e-5)


def notes(path, name):
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in records if r["ev"] == "note" and r["name"] == name]


class TestSkippedStep:
    def test_a_skipped_step_takes_the_cancel_path(self):
        """Inf gradients at batch 1: GradScaler skips the step; the log shows cancel_batch."""
        weights: list[torch.Tensor] = []  # before each training batch

        class Poison(Callback):
            def before_batch(self, learn):
                if learn.training:
                    weights.append(learn.model[0].weight.detach().clone())

            def after_backward(self, learn):
                if learn.iter == 1:
                    learn.model[0].weight.grad[0, 0] = float("inf")

        mp = MixedPrecisionCB(dtype=torch.float16)
        learn = learner([mp, Poison()])
        result = learn.fit(1)
        assert result.status is RunStatus.COMPLETED
        assert mp.skipped == 1
        report = audit_file(result.audit_path)[0][0]
        assert report.cancels["cancel_batch"] == 1
        assert report.batches == (3, 2)
        (note,) = notes(result.audit_path, "mixed_precision_skip")
        assert note["new_scale"] == note["scale"] / 2
        assert (note["ep"], note["it"], note["tr"]) == (0, 1, True)
        assert set(note) - {"ev", "run", "ep", "it", "tr", "t", "name"} == {
            "reason",
            "scale",
            "new_scale",
        }
        assert not torch.equal(weights[1], weights[0])  # batch 0 stepped
        assert torch.equal(weights[2], weights[1])  # batch 1 did not
        assert not torch.equal(weights[3], weights[2])  # batch 2 stepped, from clean gradients
        assert torch.isfinite(learn.model[0].weight).all()


class TestConfiguration:
    def test_defaults_follow_the_device_and_dtype(self):
        """bf16 without a scaler on CPU; float16 with one, unless told otherwise."""
        learn = learner([], audit_log=None)
        for cb, scaled in (
            (MixedPrecisionCB(), False),
            (MixedPrecisionCB(dtype=torch.float16), True),
            (MixedPrecisionCB(dtype=torch.float16, scaler=False), False),
            (MixedPrecisionCB(dtype=torch.bfloat16, scaler=True), True),
        ):
            cb.before_fit(learn)
            assert (cb.scaler is not None) is scaled

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"dtype": torch.float32}, "dtype must be torch.float16, torch.bfloat16 or None"),
            ({"dtype": "bf16"}, "got 'bf16'"),
            ({"scaler": "yes"}, "scaler must be True, False or None.*got 'yes'"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        """Each bad setting is named with what was received."""
        with pytest.raises(ConfigurationError, match=match):
            MixedPrecisionCB(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_with_scaler():
    """On CUDA the defaults are float16 and a GradScaler, and the model trains."""
    x, y = batches_dls(4, 1).train[0]
    batches = [(x.cuda(), y.cuda())] * 4
    mp = MixedPrecisionCB()
    learn = Learner(mlp().cuda(), DataLoaders(batches, batches[:1]), F.cross_entropy, 0.5, [mp])
    learn.fit(1)
    assert mp.scaler is not None
    assert mp.skipped == 0


class Rescale(Callback):
    """Sets the scaler's scale to 1024 after the fit's first batch (as a skip would halve it)."""

    order = 20

    def after_batch(self, learn):
        if (learn.epoch, learn.training, learn.iter) == (0, True, 0):
            callback_of(learn, MixedPrecisionCB).scaler.update(new_scale=1024.0)


def fp16() -> MixedPrecisionCB:
    return MixedPrecisionCB(dtype=torch.float16, scaler=True)


def fp16_learner() -> Learner:
    cbs = [fp16(), Rescale()]
    return Learner(mlp(), batches_dls(4, 2), F.cross_entropy, 0.1, cbs, audit_log=None)


RESUMES = {
    "mid-training": (1, True, 3),
    "mid-validation": (0, False, 1),
    "between-epochs": (1, True, 0),
}


scaled = checkpointed_fixture(fp16_learner, 2, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_keeps_the_scaler_s_state(self, scaled, at):
        """The scale 1024 goes on, and the weights end as the uninterrupted fit's."""
        ref, files = scaled
        assert saved_state(files[at], "MixedPrecisionCB")["scaler"]["scale"] == 1024.0
        learn = resumed_fit(fp16_learner, 2, files[at])
        assert callback_of(learn, MixedPrecisionCB).scaler.get_scale() == 1024.0
        assert callback_of(ref, MixedPrecisionCB).scaler.get_scale() == 1024.0
        assert same_weights(learn, ref)

    def test_the_scaler_s_state_goes_on_into_the_next_fit(self):
        """fit then fit: the second fit's scaler starts at the first's scale."""
        learn = fp16_learner()
        learn.fit(1)
        learn.cbs = [callback_of(learn, MixedPrecisionCB)]
        learn.fit(1)
        assert learn.cbs[0].scaler.get_scale() == 1024.0

    def test_loaded_at_idle_the_next_fit_s_scaler_starts_from_it(self, tmp_path):
        """learn.save, then learn.load in a fresh learner: the state waits for before_fit."""
        learn = fp16_learner()
        learn.fit(1)
        path = learn.save(tmp_path / "idle.pt")
        fresh = fp16()
        again = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [fresh], audit_log=None)
        again.load(path)
        assert fresh.scaler is None
        assert fresh.state_dict()["scaler"]["scale"] == 1024.0
        again.fit(1)
        assert fresh.scaler.get_scale() == 1024.0

    def test_a_scaler_state_no_scaler_uses_warns(self, tmp_path):
        """bfloat16 without a scaler drops a saved scaler state, with a ResumeWarning."""
        learn = fp16_learner()
        learn.fit(1)
        mp = callback_of(learn, MixedPrecisionCB)
        bf16 = MixedPrecisionCB(dtype=torch.bfloat16)
        bf16.load_state_dict(mp.state_dict())
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [bf16], audit_log=None)
        with pytest.warns(
            ResumeWarning, match=r"a GradScaler state was saved, but this fit uses no scaler"
        ):
            learn.fit(1)
        assert bf16.scaler is None

    def test_a_state_lacking_keys_is_refused(self):
        """A CheckpointError names the callback and the missing key."""
        with pytest.raises(
            CheckpointError, match=r"MixedPrecisionCB: the state to load lacks skipped"
        ):
            fp16().load_state_dict({"scaler": None})
