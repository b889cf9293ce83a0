"""Bad arguments to Learner and fit get clear errors before anything runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import ConfigurationError, DataLoaders, InvalidDataLoadersError, Learner


class TestLearnerArguments:
    def test_model_must_be_a_module(self):
        """A function is not a model."""
        with pytest.raises(
            ConfigurationError, match=r"model must be a torch\.nn\.Module, got function"
        ):
            Learner(lambda x: x, batches_dls(1, 1))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("dls", "shown"),
        [
            ([1, 2], "list whose .train is missing"),
            (DataLoaders(3, []), "DataLoaders whose .train is int"),
        ],  # type: ignore[arg-type]
    )
    def test_dls_needs_train_and_valid(self, dls, shown):
        """dls must have iterable .train and .valid; the message shows what came instead."""
        with pytest.raises(InvalidDataLoadersError, match=shown):
            Learner(mlp(), dls)

    @pytest.mark.parametrize("lr", [-0.1, "0.1", True, float("nan"), float("inf")])
    def test_lr(self, lr):
        """lr is a finite number >= 0."""
        with pytest.raises(
            ConfigurationError, match=f"lr must be a finite number >= 0, got {lr!r}"
        ):
            Learner(mlp(), batches_dls(1, 1), F.cross_entropy, lr)

    def test_loss_func_must_be_callable(self):
        """A string is not a loss function."""
        with pytest.raises(ConfigurationError, match="loss_func must be callable, got 'mse'"):
            Learner(mlp(), batches_dls(1, 1), "mse")  # type: ignore[arg-type]

    def test_defaults_follow_the_seed(self):
        """Defaults: mse loss, lr 0.1, no callbacks, SGD."""
        learn = Learner(mlp(), batches_dls(1, 1))
        assert (learn.loss_func, learn.lr, learn.cbs, learn.opt_func) == (
            F.mse_loss,
            0.1,
            [],
            torch.optim.SGD,
        )


class TestFitArguments:
    @pytest.mark.parametrize("n", [-1, 1.0, "2", None, False])
    def test_n_epochs(self, n):
        """n_epochs is an int >= 0; the learner stays idle and runs nothing."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match=f"n_epochs must be an int >= 0, got {n!r}"):
            learn.fit(n)  # type: ignore[arg-type]
        assert learn.state == "idle"
        assert learn.seq == 0
