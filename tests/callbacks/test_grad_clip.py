"""GradientClipCB: the optimizer never sees a gradient norm above max_norm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    SelfLossMLP,
    as_mappings,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    mlp,
    resumed_fit,
    same_weights,
)

from callbacks.grad_accum import GradientAccumulationCB
from callbacks.grad_clip import GradientClipCB
from callbacks.mixed_precision import MixedPrecisionCB
from fsm_learner import Callback, ConfigurationError, Learner
from fsm_learner.exceptions import CheckpointError


def grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


class NormProbe(Callback):
    """Records the gradient norm as the step override of its order sees it."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.norms: list[float] = []

    def step(self, learn, proceed):
        self.norms.append(grad_norm(learn.model))
        proceed()


def fit(cbs, *, n_train=6, lr=0.5):
    learn = Learner(mlp(), batches_dls(n_train, 1), F.cross_entropy, lr, cbs, audit_log=None)
    learn.fit(2)
    return learn


class TestBound:
    def test_the_step_sees_at_most_max_norm(self):
        """Before clipping the norms exceed 0.05; what the optimizer steps with does not."""
        before, after = NormProbe(order=7), NormProbe(order=9)
        clip = GradientClipCB(0.05)
        fit([before, clip, after])
        assert len(after.norms) == 12
        assert min(before.norms) > 0.05
        assert max(after.norms) <= 0.05 * (1 + 1e-5)
        assert isinstance(clip.last_norm, torch.Tensor)
        assert clip.last_norm.item() == pytest.approx(before.norms[-1], rel=1e-5)

    def test_small_gradients_are_left_alone(self):
        """Norms far below max_norm reach the step unchanged."""
        before, after = NormProbe(order=7), NormProbe(order=9)
        fit([before, GradientClipCB(1e6), after])
        assert after.norms == before.norms

    def test_max_norm_type(self):
        """norm_type=inf bounds the largest absolute gradient entry."""
        seen: list[float] = []

        class MaxAbs(Callback):
            order = 9

            def step(self, learn, proceed):
                seen.append(max(float(p.grad.abs().max()) for p in learn.model.parameters()))
                proceed()

        fit([GradientClipCB(0.01, norm_type=math.inf), MaxAbs()])
        assert max(seen) <= 0.01 * (1 + 1e-5)

    def test_with_accumulation_the_accumulated_gradient_is_clipped_once_per_step(self):
        """Clipping sits inside accumulation's step: it sees the summed gradient of a group."""
        before, after = NormProbe(order=7), NormProbe(order=9)
        fit([GradientAccumulationCB(3), before, GradientClipCB(0.05), after])
        assert len(after.norms) == 4  # 6 batches / 3, two epochs
        assert max(after.norms) <= 0.05 * (1 + 1e-5)

    def test_scaled_gradients_are_unscaled_before_clipping(self):
        """float16 + GradScaler (on CPU here): the clip bounds the true gradient, not the scaled."""
        after = NormProbe(order=9)
        fp16 = MixedPrecisionCB(dtype=torch.float16)
        learn = fit([GradientClipCB(0.05), after, fp16], lr=0.1)
        assert fp16.scaler is not None
        assert fp16.scaler.get_scale() > 1000  # the gradients the probe saw were scaled
        assert max(after.norms) <= 0.05 * (1 + 1e-3)
        plain = fit([GradientClipCB(0.05)], lr=0.1)
        for a, b in zip(learn.model.parameters(), plain.model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


class TestOtherBatchesAndRuns:
    def test_mapping_batches_and_inference_runs(self):
        """A model computing its own loss from mapping batches is clipped like any; validate
        and get_preds take no step, so nothing is clipped in them."""

        dls = batches_dls(6, 2)
        mapped = as_mappings(dls)
        before, after = NormProbe(order=7), NormProbe(order=9)
        learn = Learner(SelfLossMLP(), mapped, None, 0.5, [before, GradientClipCB(0.05), after])
        learn.fit(1)
        assert min(before.norms) > 0.05
        assert len(after.norms) == 6
        assert max(after.norms) <= 0.05 * (1 + 1e-5)
        assert math.isfinite(learn.validate()["loss"])
        assert learn.get_preds()[0].shape == (16, 10)
        assert len(after.norms) == 6


class TestConfiguration:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"max_norm": 0}, "max_norm must be a finite number > 0, got 0"),
            ({"max_norm": -1.0}, "max_norm must be a finite number > 0, got -1.0"),
            ({"max_norm": math.nan}, "max_norm must be a finite number > 0, got nan"),
            ({"max_norm": math.inf}, "max_norm must be a finite number > 0, got inf"),
            ({"max_norm": True}, "max_norm must be a finite number > 0, got True"),
            ({"norm_type": 0}, "norm_type must be a number > 0, got 0"),
            ({"norm_type": math.nan}, "norm_type must be a number > 0, got nan"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        """Each bad setting is named with what was received (norm_type may be inf)."""
        assert GradientClipCB(norm_type=math.inf).norm_type == math.inf
        with pytest.raises(ConfigurationError, match=match):
            GradientClipCB(**kwargs)


def clipped_learner() -> Learner:
    cbs = [GradientClipCB(0.5)]
    return Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, audit_log=None)


RESUMES = {
    "mid-training": (1, True, 1),
    "before-validation": (1, False, 0),
    "mid-validation": (1, False, 1),
}


clipped = checkpointed_fixture(clipped_learner, 2, RESUMES.values())


class TestState:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_with_the_same_last_norm_and_weights(self, clipped, at):
        """The last training step's norm comes back when no step follows the checkpoint."""
        ref, files = clipped
        learn = resumed_fit(clipped_learner, 2, files[at])
        last = callback_of(learn, GradientClipCB).last_norm
        assert last is not None
        assert torch.equal(last, callback_of(ref, GradientClipCB).last_norm)
        assert same_weights(learn, ref)

    def test_a_wrong_type_is_refused(self):
        """A float is not the norm tensor."""
        with pytest.raises(
            CheckpointError,
            match=(
                r"GradientClipCB: state\['last_norm'\] must be None or a 0-d tensor,"
                r" got 1.0 of type float"
            ),
        ):
            GradientClipCB().load_state_dict({"last_norm": 1.0})
