"""The run header's reproducibility fields: what tells two set-ups, or two starts, apart."""

from __future__ import annotations

import functools

import orjson
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp
from torch import nn

from fsm_learner import DataLoaders, Learner


def header_of(learn: Learner) -> dict:
    """The header of the learner's last run (each run writes its own file in runs/)."""
    return orjson.loads(learn.audit_path.read_bytes().split(b"\n", 1)[0])


def fitted(**kwargs) -> dict:
    learn = Learner(mlp(), batches_dls(2, 1), **{"loss_func": F.cross_entropy, **kwargs})
    learn.fit(1)
    return header_of(learn)


class TestGenerators:
    """``rng``: the generators' states when the run started, as digests."""

    def test_two_fits_after_one_seed_start_apart(self):
        """A shuffling loader draws from torch's generator: the second fit starts elsewhere."""
        model = mlp()  # seeds torch with 0
        x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
        loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), 8, shuffle=True)
        learn = Learner(model, DataLoaders(loader, loader), F.cross_entropy)
        learn.fit(1)
        first = header_of(learn)
        learn.fit(1)
        second = header_of(learn)
        assert first["seed"] == second["seed"] == 0
        assert first["rng"]["torch"] != second["rng"]["torch"]

    def test_the_same_seed_gives_the_same_digests(self):
        torch.manual_seed(3)
        first = fitted()
        torch.manual_seed(3)
        again = fitted()
        assert first["rng"]["torch"] == again["rng"]["torch"]
        assert set(first["rng"]) >= {"torch", "random"}
        assert all(len(d) == 16 for d in first["rng"].values())


class TestSetUp:
    """``opt_groups`` and ``loss_func``: the settings a class name does not show."""

    def test_optimizer_hyperparameters_per_group(self):
        header = fitted(lr=0.1, opt_func=functools.partial(torch.optim.AdamW, weight_decay=0.5))
        [group] = header["opt_groups"]
        assert (group["lr"], group["weight_decay"], group["betas"]) == (0.1, 0.5, [0.9, 0.999])
        assert "params" not in group

    def test_a_partial_loss_shows_its_arguments(self):
        smooth = functools.partial(F.cross_entropy, label_smoothing=0.3)
        assert fitted(loss_func=smooth)["loss_func"] == "cross_entropy(label_smoothing=0.3)"
        assert fitted()["loss_func"] == "cross_entropy"
        assert fitted(loss_func=nn.CrossEntropyLoss())["loss_func"] == "CrossEntropyLoss()"

    def test_inference_runs_have_no_optimizer_groups(self):
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy)
        learn.validate()
        header = header_of(learn)
        assert header["opt_groups"] is None
        assert header["kind"] == "validate"

    def test_a_rate_held_as_a_tensor_is_written_as_its_number(self):
        """A tensor lr (capturable optimizers hold one) used to fail the run's header."""

        def opt(params, lr):
            return torch.optim.SGD(params, lr=torch.tensor(lr))

        header = fitted(lr=0.25, opt_func=opt)
        assert header["lr"] == 0.25
        assert header["opt_groups"][0]["lr"] == 0.25
