"""weight_decay_groups: weights decay, biases and normalisation layers do not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_dls
from torch import nn

from fsm_learner import ConfigurationError, Learner, weight_decay_groups


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.LayerNorm(32), nn.Linear(32, 10)
    )


class TestGroups:
    def test_biases_and_norms_get_no_decay(self):
        """Each parameter lands in one group: the two Linear weights decay, the rest do not."""
        model = _model()
        decay, no_decay = weight_decay_groups(0.05)(model)
        assert decay["weight_decay"] == 0.05
        assert no_decay["weight_decay"] == 0.0
        assert [id(p) for p in decay["params"]] == [id(model[0].weight), id(model[4].weight)]
        expected = [model[0].bias, model[1].weight, model[1].bias, model[3].weight]
        expected += [model[3].bias, model[4].bias]
        assert [id(p) for p in no_decay["params"]] == [id(p) for p in expected]

    def test_shared_and_frozen_parameters(self):
        """A shared parameter is listed once, a frozen one too; empty groups are left out."""
        layer = nn.Linear(4, 4, bias=False)
        model = nn.Sequential(layer, layer)
        assert [[id(p) for p in g["params"]] for g in weight_decay_groups(0.1)(model)] == [
            [id(layer.weight)]
        ]
        frozen = nn.Linear(4, 4)
        frozen.requires_grad_(False)
        decay, no_decay = weight_decay_groups(0.1)(nn.Sequential(model, frozen))
        assert [id(p) for p in decay["params"]] == [id(layer.weight), id(frozen.weight)]
        assert [id(p) for p in no_decay["params"]] == [id(frozen.bias)]

    def test_a_layer_frozen_for_the_first_fit_trains_after_unfreezing(self):
        """Freeze, fit, unfreeze, fit: the kept optimizer holds the frozen layer, which then
        moves; it did not move while frozen."""
        torch.manual_seed(0)
        model = _model()
        model[0].requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        learn = Learner(
            model,
            digits_dls(n_train=128, n_valid=64),
            F.cross_entropy,
            0.1,
            param_groups=weight_decay_groups(0.01),
            audit_log=None,
        )
        learn.fit(1)
        assert torch.equal(model[0].weight, frozen)
        opt = learn.opt
        model[0].requires_grad_(True)
        learn.fit(1)
        assert learn.opt is opt
        assert not torch.equal(model[0].weight, frozen)

    @pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "0.1", True, None])
    def test_bad_weight_decay_is_refused(self, bad):
        """A weight decay that is not a finite number >= 0 is refused, naming it."""
        with pytest.raises(ConfigurationError, match="weight_decay must be a finite number"):
            weight_decay_groups(bad)

    def test_only_weights_decay_in_a_fit(self):
        """With a zero loss, SGD's update is the decay alone: weights shrink by lr * wd, the
        biases and norm parameters do not move."""
        torch.manual_seed(0)
        model = _model()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        learn = Learner(
            model,
            digits_dls(n_train=128, n_valid=64),
            lambda preds, _target: preds.sum() * 0,
            0.1,
            param_groups=weight_decay_groups(0.5),
            audit_log=None,
        )
        learn.fit(1)
        steps = 2  # 128 samples, batches of 64
        for name, p in model.named_parameters():
            if name in {"0.weight", "4.weight"}:
                assert torch.allclose(p, before[name] * (1 - 0.1 * 0.5) ** steps)
            else:
                assert torch.equal(p, before[name]), name
