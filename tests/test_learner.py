"""The Learner's normal path: whole traces, real training, what hooks may read and replace."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import batches_dls, digits_dls, mlp
from torch import nn

from fsm_learner import (
    Callback,
    DataLoaders,
    Hook,
    InvalidTransitionError,
    Learner,
    State,
)
from fsm_learner.testing import HookRecord, HostReads, RecordingCallback

H, S = Hook, State


def train_batch(epoch: int, it: int) -> list[HookRecord]:
    return [
        HookRecord(H.BEFORE_BATCH, S.BATCH, epoch, it, True),
        HookRecord(H.AFTER_PREDICT, S.PREDICT, epoch, it, True),
        HookRecord(H.AFTER_LOSS, S.LOSS, epoch, it, True),
        HookRecord(H.AFTER_BACKWARD, S.BACKWARD, epoch, it, True),
        HookRecord(H.AFTER_STEP, S.STEP, epoch, it, True),
        HookRecord(H.AFTER_BATCH, S.STEP, epoch, it, True),
    ]


def valid_batch(epoch: int, it: int) -> list[HookRecord]:
    return [
        HookRecord(H.BEFORE_BATCH, S.BATCH, epoch, it, False),
        HookRecord(H.AFTER_PREDICT, S.PREDICT, epoch, it, False),
        HookRecord(H.AFTER_LOSS, S.LOSS, epoch, it, False),
        HookRecord(H.AFTER_BATCH, S.LOSS, epoch, it, False),
    ]


class TestNormalPath:
    def test_whole_trace_of_two_epochs(self):
        """Two epochs of 2 training and 1 validation batch fire every hook in table order."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [rec])
        learn.fit(2)
        expected = [HookRecord(H.BEFORE_FIT, S.FIT, 0, 0, False)]
        for epoch in range(2):
            # iter is 0 when a pass starts, then the index of the current batch
            expected += [HookRecord(H.BEFORE_EPOCH, S.EPOCH, epoch, 0, True)]
            expected += train_batch(epoch, 0) + train_batch(epoch, 1)
            expected += [
                HookRecord(H.AFTER_EPOCH, S.EPOCH, epoch, 1, True),
                HookRecord(H.BEFORE_EPOCH, S.EPOCH, epoch, 0, False),
            ]
            expected += valid_batch(epoch, 0)
            expected += [HookRecord(H.AFTER_EPOCH, S.EPOCH, epoch, 0, False)]
        expected += [HookRecord(H.AFTER_FIT, S.FIT, 1, 0, False)]
        assert expected == rec.records
        assert learn.state == "idle"
        # 1 begin_fit + per epoch (2 passes x (begin+end) + 2 train x 6 + 1 valid x 4) + end_fit
        assert learn.seq == 1 + 2 * (4 + 12 + 4) + 1

    def test_fit_zero_epochs_and_empty_dataloaders(self):
        """n_epochs=0 is a fit with no epoch; empty dataloaders give passes with no batch."""
        rec = RecordingCallback()
        learn = Learner(mlp(), DataLoaders([], []), F.cross_entropy, 0.1, [rec])
        learn.fit(0)
        assert rec.hooks == [H.BEFORE_FIT, H.AFTER_FIT]
        rec.records.clear()
        learn.fit(1)
        assert rec.hooks == [
            H.BEFORE_FIT,
            H.BEFORE_EPOCH,
            H.AFTER_EPOCH,
            H.BEFORE_EPOCH,
            H.AFTER_EPOCH,
            H.AFTER_FIT,
        ]
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
        """Every attribute the issue lists is readable in a hook, with the right values."""
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
                        preds=learn.preds.shape,
                        loss=learn.loss.shape,
                        training=learn.training,
                        state=learn.state,
                    )

        model = mlp()
        Learner(model, dls, F.cross_entropy, 0.25, [Look()], torch.optim.Adam).fit(1)
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
            "preds": torch.Size([8, 10]),
            "loss": torch.Size([]),
            "training": True,
            "state": "loss",
        }

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
