"""LRFinderCB and lr_find: a real sweep on digits, exact restoration, suggestion and plot."""

from __future__ import annotations

import copy
import io
import math
import sys
from functools import partial
from pathlib import Path

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Boom,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    digits_dls,
    mlp,
    resumed_fit,
    same,
    same_weights,
    saved_state,
)
from torch.optim.lr_scheduler import StepLR

from callbacks.checkpoint import CheckpointCB
from callbacks.csv_logger import CSVLoggerCB
from callbacks.lr_finder import LRFinderCB, lr_find
from callbacks.metrics import MetricsCB
from callbacks.progress import ProgressCB
from callbacks.save_model import SaveModelCB, load_checkpoint
from callbacks.schedulers import BatchSchedCB, EpochSchedCB
from callbacks.tensorboard import TensorBoardCB
from fsm_learner import (
    Callback,
    ConfigurationError,
    DataLoaders,
    FsmLearnerError,
    Learner,
    RunStatus,
)
from fsm_learner.audit.replay import audit_file
from fsm_learner.exceptions import CheckpointError

SGD_MOMENTUM = partial(torch.optim.SGD, momentum=0.9)


class OptAtStart(Callback):
    """Keeps a copy of the optimizer's state as the fit found it (before the finder's)."""

    order = 0

    def before_fit(self, learn):
        self.state = copy.deepcopy(learn.opt.state_dict())


def learner(cbs=(), lr=0.05):
    return Learner(mlp(), digits_dls(), F.cross_entropy, lr, list(cbs), SGD_MOMENTUM)


def note(result, name):
    records = [orjson.loads(line) for line in result.audit_path.read_bytes().splitlines()]
    (found,) = [r for r in records if r["ev"] == "note" and r["name"] == name]
    return found


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


class TestSweep:
    def test_diverging_sweep_cancels_the_fit_and_restores_everything(self):
        """Up to lr=10 the loss explodes: cancel_fit, a note, then exact model and optimizer."""
        start = OptAtStart()
        learn = learner([start])
        weights = copy.deepcopy(learn.model.state_dict())
        finder = lr_find(learn, end_lr=10.0, num_it=100)
        assert finder.diverged
        assert finder.result is not None
        assert finder.result.status is RunStatus.CANCELLED
        report = audit_file(finder.result.audit_path)[0][0]
        assert report.status is RunStatus.CANCELLED
        assert report.cancels["cancel_fit"] == 1
        diverged = note(finder.result, "lr_finder")
        assert diverged["outcome"] == "diverged"
        assert diverged["lr"] == finder.lrs[-1]
        smoothed = float(diverged["smoothed_loss"])  # a number, or "Infinity"/"NaN"
        assert not math.isfinite(smoothed) or smoothed > diverged["div"] * diverged["best_loss"]
        per_epoch = len(learn.dls.train)  # the note is stamped with the last batch's counters
        assert diverged["tr"] is True
        assert diverged["ep"] * per_epoch + diverged["it"] + 1 == len(finder.lrs)
        assert len(finder.lrs) < 100
        assert_same_state(learn.model.state_dict(), weights)
        assert learn.opt is None  # there was none before the sweep: the sweep's is dropped
        assert start.state["param_groups"][0]["lr"] == 0.05
        assert learn.cbs == [start]  # lr_find took its callback back out

    def test_complete_sweep_ends_the_passes_and_the_fit_completes(self):
        """30 batches over 22-batch epochs: 2 epochs, no validation, status completed."""
        applied: list[float] = []

        class SeenLR(Callback):
            order = 71

            def after_step(self, learn):
                applied.append(learn.opt.param_groups[0]["lr"])

        learn = learner([SeenLR()])
        weights = copy.deepcopy(learn.model.state_dict())
        finder = lr_find(learn, start_lr=1e-4, end_lr=1e-2, num_it=30)
        assert not finder.diverged
        assert finder.result.status is RunStatus.COMPLETED
        report = audit_file(finder.result.audit_path)[0][0]
        assert report.epochs == 2
        assert report.batches == (29, 0)  # the 30th ends the sweep: cancelled with its pass
        assert report.cancels == {"cancel_batch": 0, "cancel_epoch": 3, "cancel_fit": 0}
        assert applied == finder.lrs
        assert len(finder.lrs) == 30
        assert finder.lrs[0] == pytest.approx(1e-4)
        assert finder.lrs[-1] == pytest.approx(1e-2)
        ratios = [b / a for a, b in zip(finder.lrs, finder.lrs[1:], strict=False)]
        assert max(ratios) == pytest.approx(min(ratios))
        assert_same_state(learn.model.state_dict(), weights)

    def test_restores_after_a_failure_too(self):
        """A failure mid-sweep still loads the weights back, drops the sweep's optimizer and
        takes the finder out."""

        class Fail(Callback):
            def after_step(self, learn):
                if learn.iter == 5:
                    raise Boom

        learn = learner([Fail()])
        weights = copy.deepcopy(learn.model.state_dict())
        with pytest.raises(Boom):
            lr_find(learn, num_it=50)
        assert_same_state(learn.model.state_dict(), weights)
        assert learn.opt is None
        assert len(learn.cbs) == 1

    def test_as_a_plain_callback_the_sweep_stops_the_fit_it_is_in(self):
        """Added by hand to a longer fit, later epochs are cancelled as they begin."""
        finder = LRFinderCB(1e-4, 1e-2, num_it=10)
        result = learner([finder]).fit(3)
        assert result.status is RunStatus.COMPLETED
        assert len(finder.lrs) == 10
        assert audit_file(result.audit_path)[0][0].cancels["cancel_epoch"] == 6


class TestTheLearnerAfterwards:
    def test_a_trained_optimizer_is_kept_with_its_state(self):
        """After a fit the optimizer has momentum buffers; the sweep (which diverges and
        moves them) leaves the same optimizer with exactly the same state."""
        learn = learner()
        learn.fit(1)
        opt = learn.opt
        assert opt is not None
        state = copy.deepcopy(opt.state_dict())
        assert state["state"]  # momentum buffers exist
        weights = copy.deepcopy(learn.model.state_dict())
        finder = lr_find(learn, num_it=100)
        assert finder.diverged
        assert learn.opt is opt
        assert_same_state(opt.state_dict(), state)
        assert_same_state(learn.model.state_dict(), weights)

    def test_no_checkpoint_of_the_sweep(self, tmp_path):
        """A CheckpointCB writes nothing for the sweep (it is no fit to resume), and is back."""
        checkpoints = CheckpointCB(tmp_path / "ck", every_n_batches=1)
        learn = learner([checkpoints])
        lr_find(learn, num_it=20)
        assert not (tmp_path / "ck").exists()
        assert (learn.cbs, checkpoints.batches, checkpoints.written) == ([checkpoints], 0, [])
        learn.fit(1)
        assert len(checkpoints.written) == 3

    def test_no_epoch_lines_during_the_sweep(self):
        """A ProgressCB prints nothing for the sweep's cancelled passes, and is back after."""
        out = io.StringIO()
        progress = ProgressCB(file=out)
        learn = learner([progress])
        lr_find(learn, start_lr=1e-4, end_lr=1e-2, num_it=30)
        assert out.getvalue() == ""
        assert learn.cbs == [progress]
        learn.fit(1)
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("epoch 1/1 train loss ")
        assert lines[1].startswith("epoch 1/1 valid loss ")

    def test_the_experiment_loggers_log_no_sweep(self, tmp_path):
        """CSVLoggerCB and TensorBoardCB write nothing for the sweep, and are back after."""
        cbs = [MetricsCB(), CSVLoggerCB(tmp_path / "m.csv"), TensorBoardCB(tmp_path / "tb")]
        learn = learner(cbs)
        lr_find(learn, num_it=20)
        assert not (tmp_path / "m.csv").exists()
        assert not (tmp_path / "tb").exists()
        assert learn.cbs == cbs
        learn.fit(1)
        assert len((tmp_path / "m.csv").read_text().splitlines()) == 3  # header, train, valid
        assert [p.name for p in (tmp_path / "tb").iterdir()] == [learn.run_id]


def groups(opt):
    """Each param group's hyperparameters (all but its params), keys and values."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def adam_on_lists(cbs):
    """Adam on fixed lists of digit batches: fits repeat exactly, whatever ran between."""
    return Learner(mlp(), batches_dls(4, 2), F.cross_entropy, 1e-3, cbs, torch.optim.Adam)


def one_cycle():
    return BatchSchedCB.one_cycle(0.05)


def step_lr():
    return EpochSchedCB(lambda opt: StepLR(opt, step_size=1, gamma=0.5))


class TestWithSchedulers:
    @pytest.mark.parametrize("make_sched", [one_cycle, step_lr])
    def test_the_optimizer_is_given_back_exactly(self, make_sched):
        """After a scheduled fit, lr_find leaves every param group as it found it (the same
        keys, none a scheduler adds, and the same values: lr, betas) and the same state."""
        sched = make_sched()
        learn = adam_on_lists([sched])
        learn.fit(1)
        before, state = groups(learn.opt), copy.deepcopy(learn.opt.state_dict())
        lr_find(learn, num_it=20)
        assert groups(learn.opt) == before
        assert_same_state(learn.opt.state_dict(), state)
        assert learn.cbs == [sched]

    @pytest.mark.parametrize("make_sched", [one_cycle, step_lr])
    def test_the_schedule_runs_in_the_next_fit_as_without_the_sweep(self, make_sched):
        """fit, lr_find, fit trains exactly as fit, fit: the scheduler is back and works."""
        sched, twin = make_sched(), make_sched()
        learn, other = adam_on_lists([sched]), adam_on_lists([twin])
        learn.fit(1)
        other.fit(1)
        lr_find(learn, num_it=20)
        learn.fit(2)
        other.fit(2)
        assert_same_state(learn.model.state_dict(), other.model.state_dict())
        assert_same_state(learn.opt.state_dict(), other.opt.state_dict())
        assert groups(learn.opt) == groups(other.opt)
        assert sched.scheduler is not None
        assert sched.scheduler.last_epoch == twin.scheduler.last_epoch > 0

    def test_the_sweep_runs_without_the_scheduler(self):
        """The rates the optimizer steps with are the sweep's alone, not a schedule's."""
        applied: list[float] = []

        class SeenLR(Callback):
            order = 71

            def after_step(self, learn):
                applied.append(learn.opt.param_groups[0]["lr"])

        sched = one_cycle()
        learn = adam_on_lists([sched, SeenLR()])
        finder = lr_find(learn, start_lr=1e-5, end_lr=1e-3, num_it=10)
        assert applied == finder.lrs
        assert sched.scheduler is None  # it never built one: it was out for the sweep


class TestOtherCallbacksDuringTheSweep:
    def test_save_model_does_not_count_the_sweep(self):
        """A SaveModelCB is taken out for the sweep: it saves nothing, and the next fit's
        epochs are numbered from 0."""
        save = SaveModelCB("ckpts", every_epoch=True)
        learn = adam_on_lists([save])
        lr_find(learn, num_it=20)
        assert learn.cbs == [save]
        assert (save.epochs, save.saved) == (0, [])
        learn.fit(1)
        assert save.saved == [Path("ckpts/epoch_0.pt")]
        assert load_checkpoint("ckpts/epoch_0.pt", mlp(seed=1)) == 0


class TestOtherRuns:
    def test_validate_and_get_preds_ignore_the_finder(self):
        """A finder left in cbs does nothing in validate and predict runs: their results are
        those of the same learner without it, and it records nothing."""
        finder = LRFinderCB()
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, 0.05, [finder])
        plain = Learner(mlp(), digits_dls(), F.cross_entropy, 0.05, [])
        assert learn.validate() == plain.validate()
        assert math.isfinite(learn.validate()["loss"])
        preds, targets = learn.get_preds()
        plain_preds, plain_targets = plain.get_preds()
        assert preds.shape == (397, 10)
        assert torch.equal(preds, plain_preds)
        assert torch.equal(targets, plain_targets)
        assert (finder.lrs, finder.losses) == ([], [])

    def test_a_sweep_after_them_still_runs(self):
        """After validate and get_preds, the same finder sweeps in a fit as usual."""
        finder = LRFinderCB(1e-4, 1e-2, num_it=10)
        learn = learner([finder])
        learn.validate()
        learn.get_preds()
        assert learn.fit(1).status is RunStatus.COMPLETED
        assert len(finder.lrs) == 10


class TestSuggestion:
    def test_on_a_real_sweep(self):
        """The suggestions lie inside the sweep, below the rate of the lowest loss."""
        finder = lr_find(learner(), num_it=100)
        lowest = finder.lrs[min(range(len(finder.losses)), key=finder.losses.__getitem__)]
        for method in ("steepest", "minimum"):
            lr = finder.suggestion(method)
            assert finder.lrs[0] <= lr <= lowest
        assert finder.suggestion("minimum") == pytest.approx(lowest / 10)

    def test_steepest_on_a_known_curve(self):
        """On a hand-made curve: steepest fall and a tenth of the minimum."""
        finder = LRFinderCB(1e-3, 1.0, num_it=4)
        finder.lrs = [1e-3, 1e-2, 1e-1, 1.0]
        finder.losses = [2.0, 1.9, 1.0, 5.0]
        assert finder.suggestion() == 1e-2  # the biggest fall starts there
        assert finder.suggestion("minimum") == pytest.approx(1e-2)

    def test_needs_a_sweep(self):
        """No recorded points: the message says to run a sweep."""
        with pytest.raises(FsmLearnerError, match="recorded 0 point"):
            LRFinderCB().suggestion()

    def test_bad_method(self):
        """An unknown method is named with the valid ones."""
        with pytest.raises(ConfigurationError, match="method must be one of 'steepest'"):
            LRFinderCB().suggestion("valley")


class TestPlot:
    def test_writes_a_png(self, tmp_path):
        """plot() writes a real PNG file."""
        finder = lr_find(learner(), num_it=40)
        path = finder.plot(tmp_path / "lr.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_without_matplotlib_the_error_names_the_extra(self, monkeypatch):
        """Without matplotlib the error names the extra to install."""
        finder = LRFinderCB(1e-3, 1.0, num_it=2)
        finder.lrs, finder.losses = [1e-3, 1.0], [2.0, 1.0]
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        with pytest.raises(ImportError, match=r"fsm-learner\[callbacks\]"):
            finder.plot("lr.png")


class TestConfiguration:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"start_lr": 0}, "start_lr must be a finite number > 0, got 0"),
            ({"end_lr": math.inf}, "end_lr must be a finite number > 0, got inf"),
            ({"start_lr": 1.0, "end_lr": 0.1}, r"end_lr must be above start_lr \(1\), got 0.1"),
            ({"num_it": 1}, "num_it must be an int >= 2.*got 1"),
            ({"num_it": 10.0}, "num_it must be an int >= 2.*got 10.0"),
            ({"beta": 1.0}, r"beta must be in \[0, 1\)"),
            ({"beta": -0.1}, "beta must be a finite number >= 0, got -0.1"),
            ({"div": 1}, "div must be a finite number > 1, got 1"),
        ],
    )
    def test_bad_settings(self, kwargs, match):
        """Each bad setting is named with what was received."""
        with pytest.raises(ConfigurationError, match=match):
            LRFinderCB(**kwargs)

    def test_empty_training_data(self):
        """No training batch: lr_find says so before fitting."""
        learn = Learner(mlp(), DataLoaders([], []), F.cross_entropy, 0.1)
        with pytest.raises(ConfigurationError, match=r"learn\.dls\.train is empty"):
            lr_find(learn)


def sweep_learner() -> Learner:
    finder = LRFinderCB(1e-4, 1.0, num_it=10)
    return Learner(mlp(), batches_dls(4, 1), F.cross_entropy, 0.1, [finder], audit_log=None)


RESUMES = {
    "mid-training": (1, True, 2),
    "before-validation": (0, False, 0),
    "last-pass": (2, True, 1),
}


swept = checkpointed_fixture(sweep_learner, 3, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_sweep_records_the_same_curve_and_loads_the_first_weights(self, swept, at):
        """The same rates and losses; the weights the sweep started from, not the checkpoint's."""
        ref_learn, files = swept
        ref = callback_of(ref_learn, LRFinderCB)
        learn = resumed_fit(sweep_learner, 3, files[at])
        finder = callback_of(learn, LRFinderCB)
        assert (finder.lrs, finder.losses) == (ref.lrs, ref.losses)
        assert len(finder.lrs) == 10
        assert same_weights(learn, ref_learn)
        assert same(learn.model.state_dict(), mlp().state_dict())

    def test_the_checkpoint_holds_the_sweep_so_far(self, swept):
        """After six batches: six rates, and the weights to load back."""
        state = saved_state(swept[1][1, True, 2], "LRFinderCB")
        assert len(state["lrs"]) == 6
        assert same(state["kept"]["model"], mlp().state_dict())

    def test_a_state_lacking_keys_is_refused(self):
        """The missing keys are named."""
        with pytest.raises(
            CheckpointError, match=r"LRFinderCB: the state to load lacks best, kept"
        ):
            LRFinderCB().load_state_dict({"lrs": [], "losses": [], "diverged": False, "avg": 0.0})
