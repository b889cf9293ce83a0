"""TensorBoardCB: what a real fit on digits writes, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib
import json
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Boom, batches_dls, callback_of, checkpointed_fit, digits_dls, mlp, resumed_fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassAccuracy

from callbacks import BatchSchedCB, GradientAccumulationCB, MetricsCB, TensorBoardCB
from fsm_learner import Callback, CheckpointError, ConfigurationError, Learner
from fsm_learner.distributed import World
from fsm_learner.optim import weight_decay_groups
from fsm_learner.testing import HostReads

SESSION_START = "_hparams_/session_start_info"


def events(path: Path) -> EventAccumulator:
    """TensorBoard's reading of a run directory (or one event file)."""
    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return accumulator


def points(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def as_float32(values: list[float]) -> list[float]:
    """The values as TensorBoard stores a scalar: a float32."""
    return torch.tensor(values, dtype=torch.float32).tolist()


def session_start(accumulator: EventAccumulator) -> dict[str, object]:
    """The hyperparameters of the run's session start, by name."""
    content = accumulator.PluginTagToContent("hparams")[SESSION_START]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {
        name: value.string_value if value.HasField("string_value") else value.number_value
        for name, value in info.hparams.items()
    }


class RatesUsed(Callback):
    """Keeps each param group's rate as every optimizer step is about to use it.

    A step override of order 9: inside gradient accumulation's (5), outside the
    scheduler's (10), which moves the rate after the step.
    """

    order = 9

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def step(self, learn, proceed):
        self.rates.append([group["lr"] for group in learn.opt.param_groups])
        proceed()


def one_cycle_two_groups(log_dir: Path, *cbs: Callback, n_train: int = 4) -> Learner:
    """Two param groups, each on its own one-cycle schedule, with accuracy metrics."""
    schedule = BatchSchedCB(with_total_steps=lambda opt, n: OneCycleLR(opt, [0.4, 0.1], n))
    metrics = MetricsCB(MulticlassAccuracy(10))
    return Learner(
        mlp(),
        batches_dls(n_train, 2),
        F.cross_entropy,
        0.1,
        [schedule, metrics, TensorBoardCB(log_dir), *cbs],
        param_groups=weight_decay_groups(0.01),
        audit_log=None,
    )


class TestScalars:
    def test_one_rate_per_optimizer_step_as_the_step_used(self, tmp_path):
        """lr/group<i>: steps 0..n-1, each the rate the optimizer step used (float32)."""
        used = RatesUsed()
        learn = one_cycle_two_groups(tmp_path, used)
        learn.fit(2)
        run = events(callback_of(learn, TensorBoardCB).run_dir)
        assert len(used.rates) == 8
        for group in (0, 1):
            rates = [step[group] for step in used.rates]
            assert points(run, f"lr/group{group}") == list(enumerate(as_float32(rates)))
        assert used.rates[0] != used.rates[1]  # the schedule moved the rate between steps

    def test_pass_values_are_the_metrics_history(self, tmp_path):
        """train/* and valid/* at steps 0, 1 (the epochs): MetricsCB's values, exactly."""
        learn = one_cycle_two_groups(tmp_path)
        learn.fit(2)
        run = events(callback_of(learn, TensorBoardCB).run_dir)
        history = callback_of(learn, MetricsCB).history
        assert set(run.Tags()["scalars"]) == {
            "lr/group0",
            "lr/group1",
            "train/loss",
            "train/accuracy",
            "valid/loss",
            "valid/accuracy",
            "seconds/train",
            "seconds/valid",
        }
        for phase in ("train", "valid"):
            for name in ("loss", "accuracy"):
                expected = [(row["epoch"], row[f"{phase}_{name}"]) for row in history]
                assert points(run, f"{phase}/{name}") == expected

    def test_seconds_of_each_pass(self, tmp_path):
        """seconds/train and seconds/valid: one positive wall time per epoch."""
        learn = one_cycle_two_groups(tmp_path)
        learn.fit(2)
        run = events(callback_of(learn, TensorBoardCB).run_dir)
        for phase in ("train", "valid"):
            seconds = points(run, f"seconds/{phase}")
            assert [step for step, _ in seconds] == [0, 1]
            assert all(value > 0 for _, value in seconds)

    def test_gradient_accumulation_writes_the_steps_taken(self, tmp_path):
        """With GradientAccumulationCB(2), 5 batches a pass take 3 optimizer steps: 6 in all."""
        used = RatesUsed()
        learn = one_cycle_two_groups(tmp_path, used, GradientAccumulationCB(2), n_train=5)
        learn.fit(2)
        lrs = points(events(callback_of(learn, TensorBoardCB).run_dir), "lr/group0")
        assert len(used.rates) == 6
        assert lrs == list(enumerate(as_float32([step[0] for step in used.rates])))

    def test_without_metrics_the_rates_and_seconds(self, tmp_path):
        """Without a metrics callback: the rates, the seconds and the hyperparameters."""
        cb = TensorBoardCB(tmp_path)
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [cb], audit_log=None).fit(2)
        run = events(cb.run_dir)
        assert set(run.Tags()["scalars"]) == {"lr/group0", "seconds/train", "seconds/valid"}
        assert points(run, "lr/group0") == list(enumerate(as_float32([0.1] * 6)))
        assert session_start(run)["n_epochs"] == 2

    def test_no_host_read_per_batch(self, tmp_path):
        """The rates are Python floats: a fit of 6 batches a pass reads what one of 2 does."""

        def reads(n_train: int) -> int:
            cbs = [MetricsCB(), TensorBoardCB(tmp_path / str(n_train))]
            learn = Learner(mlp(), batches_dls(n_train, 1), F.cross_entropy, 0.1, cbs)
            with HostReads() as counter:
                learn.fit(2)
            return counter.count

        assert reads(2) == reads(6)

    def test_a_rate_held_as_a_tensor_is_read_once_a_pass(self, tmp_path):
        """A tensor rate (capturable optimizers hold one) is read back at the pass end, not
        at every step: what the callback adds to the reads (SGD reads a tensor rate itself)
        is the same for 6 batches a pass as for 2, and every step's rate is written."""

        def opt(params, lr):
            return torch.optim.SGD(params, lr=torch.tensor(lr))

        def reads(n_train: int, cbs: list[Callback]) -> int:
            learn = Learner(mlp(), batches_dls(n_train, 1), F.cross_entropy, 0.05, cbs, opt)
            with HostReads() as counter:
                learn.fit(2)
            return counter.count

        def added(n_train: int) -> int:
            return reads(n_train, [TensorBoardCB(tmp_path / str(n_train))]) - reads(n_train, [])

        assert added(2) == added(6)
        run = events(tmp_path / "6" / next(p.name for p in (tmp_path / "6").iterdir()))
        assert points(run, "lr/group0") == list(enumerate(as_float32([0.05] * 12)))

    def test_validate_and_predict_write_nothing(self, tmp_path):
        """Runs that are not fits leave the run directory as the fit left it."""
        learn = one_cycle_two_groups(tmp_path)
        learn.fit(1)
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        learn.validate()
        learn.get_preds()
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


class TestRunDirectory:
    def test_each_fit_writes_a_run_named_by_its_run_id(self, tmp_path):
        """Two fits: <log_dir>/<run_id> each, their steps each from 0."""
        learn = one_cycle_two_groups(tmp_path)
        cb = callback_of(learn, TensorBoardCB)
        first = learn.fit(1).run_id
        assert cb.run_dir == tmp_path / first
        second = learn.fit(2).run_id
        assert cb.run_dir == tmp_path / second
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, second])
        assert [s for s, _ in points(events(tmp_path / first), "lr/group0")] == list(range(4))
        assert [s for s, _ in points(events(tmp_path / second), "lr/group0")] == list(range(8))
        assert cb.steps == 8

    def test_a_failed_fit_closes_the_writer_and_unhooks(self, tmp_path):
        """A fit failing in epoch 1: what came before is on disk, the failed pass wrote
        nothing, the writer is closed (its thread is gone) and the optimizer unhooked."""

        class FailInSecondEpoch(Callback):
            def after_batch(self, learn):
                if learn.epoch == 1 and learn.iter == 2:
                    raise Boom

        learn = one_cycle_two_groups(tmp_path, FailInSecondEpoch())
        threads = set(threading.enumerate())
        with pytest.raises(Boom):
            learn.fit(2)
        assert set(threading.enumerate()) == threads
        cb = callback_of(learn, TensorBoardCB)
        run = events(cb.run_dir)
        assert [s for s, _ in points(run, "lr/group0")] == list(range(7))
        assert [s for s, _ in points(run, "train/loss")] == [0]
        assert [s for s, _ in points(run, "valid/loss")] == [0]
        learn.opt.step()
        assert cb.steps == 7


class TestHParams:
    def test_the_session_start_of_the_run_itself(self, tmp_path):
        """The fit's hyperparameters and the given ones (which win), in the run itself."""
        cb = TensorBoardCB(tmp_path, hparams={"weight_decay": 0.01, "lr": 0.5})
        dls = digits_dls(batch_size=128, n_train=256, n_valid=128)
        learn = Learner(mlp(), dls, F.cross_entropy, 0.1, [MetricsCB(), cb], audit_log=None)
        run_id = learn.fit(1).run_id
        run = events(cb.run_dir)
        assert set(run.PluginTagToContent("hparams")) == {SESSION_START}
        assert session_start(run) == {
            "run_id": run_id,
            "n_epochs": 1,
            "lr": 0.5,
            "optimizer": "SGD",
            "model": "Sequential",
            "batch_size": 128,
            "world_size": 1,
            "weight_decay": 0.01,
        }
        assert [p for p in cb.run_dir.iterdir() if p.is_dir()] == []

    def test_the_hparams_tab_lists_each_run_with_its_final_metrics(self, tmp_path):
        """TensorBoard's HParams plugin: one session per fit, its run id, its last values."""
        fits = {}
        for lr in (0.1, 0.3):
            metrics = MetricsCB(MulticlassAccuracy(10))
            cbs = [metrics, TensorBoardCB(tmp_path)]
            learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, lr, cbs, audit_log=None)
            run_id = learn.fit(2).run_id
            fits[run_id] = (lr, metrics.history[-1])
        groups = hparams_plugin_groups(tmp_path)
        assert len(groups) == 2
        for group in groups:
            session = group["sessions"][0]
            lr, last = fits[session["name"]]
            assert group["hparams"]["run_id"] == session["name"]
            assert group["hparams"]["lr"] == lr
            metrics = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
            assert metrics["valid/accuracy"] == last["valid_accuracy"]
            assert metrics["train/loss"] == last["train_loss"]

    @pytest.mark.parametrize(
        ("hparams", "match"),
        [
            ([("a", 1)], r"hparams must be a dict .* got list"),
            ({"": 1}, r"non-empty str name, got '': 1"),
            (
                {"layers": [32]},
                r"str, int, float, bool or None, got 'layers': \[32\] \(list\)",
            ),
            ({"x": 10**400}, r"hparam 'x' is an int of 401 digits, which TensorBoard cannot"),
            ({"x": 2**53 + 1}, r"hparam 'x' is 9007199254740993, which TensorBoard cannot"),
            ({"x": float("nan")}, r"hparam 'x' is nan, which TensorBoard cannot hold"),
            ({"x": -float("inf")}, r"hparam 'x' is -inf, which TensorBoard cannot hold"),
        ],
    )
    def test_bad_hparams_are_refused(self, hparams, match):
        """Refused at construction: the message says what a hyperparameter may be, and
        what was given (a number TensorBoard cannot hold as a float64 among them)."""
        with pytest.raises(ConfigurationError, match=match):
            TensorBoardCB(hparams=hparams)

    def test_none_and_the_edges_of_float64_are_written(self, tmp_path):
        """None is written as the string "None"; a bool as 1; 2**53 and the largest float
        exactly."""
        hparams = {"sched": None, "flag": True, "big": 2**53, "huge": sys.float_info.max}
        cb = TensorBoardCB(tmp_path, hparams=hparams)
        Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb], audit_log=None).fit(1)
        written = session_start(events(cb.run_dir))
        assert (written["sched"], written["flag"], written["big"], written["huge"]) == (
            "None",
            1.0,
            2.0**53,
            sys.float_info.max,
        )

    def test_the_run_id_is_always_the_runs_own(self, tmp_path):
        """An hparams entry named run_id does not pass for the run's id (review)."""
        cb = TensorBoardCB(tmp_path, hparams={"run_id": "spoofed", "hidden": 32})
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb], audit_log=None)
        learn.fit(1)
        written = session_start(events(cb.run_dir))
        assert (written["run_id"], written["hidden"]) == (learn.run_id, 32.0)


def hparams_plugin_groups(log_dir: Path) -> list[dict]:
    """The session groups TensorBoard's HParams plugin lists for ``log_dir``."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from werkzeug import test, wrappers

    with warnings.catch_warnings():  # its vendored bleach warns that html5lib is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.plugins.hparams import hparams_plugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(log_dir))
    context = base_plugin.TBContext(logdir=str(log_dir), data_provider=provider)
    app = hparams_plugin.HParamsPlugin(context).get_plugin_apps()["/session_groups"]
    request = {
        "experimentName": "",
        "startIndex": 0,
        "sliceSize": 100,
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
        "colParams": [],
    }
    response = test.Client(app, wrappers.Response).post(
        "/session_groups", data=json.dumps(request), content_type="application/json"
    )
    assert response.status_code == 200
    return json.loads(response.get_data(as_text=True))["sessionGroups"]


class TestLogDirectory:
    def test_a_log_dir_that_is_a_file_is_refused(self, tmp_path):
        """An existing path that is no directory: ConfigurationError at construction."""
        (tmp_path / "plain").write_text("x")
        with pytest.raises(
            ConfigurationError, match=r"log_dir must be a directory .* got '.*plain', which is a"
        ):
            TensorBoardCB(tmp_path / "plain")

    def test_a_log_dir_that_cannot_be_made_fails_in_before_fit(self, tmp_path):
        """A log_dir under a regular file: the fit fails in TensorBoardCB's before_fit,
        naming the run directory, before any batch runs."""
        (tmp_path / "plain").write_text("x")
        batches = []

        class CountBatches(Callback):
            def before_batch(self, learn):
                batches.append(learn.iter)

        learn = one_cycle_two_groups(tmp_path / "plain" / "tb", CountBatches())
        with pytest.raises(ConfigurationError, match=r"cannot create the run directory .*plain/tb"):
            learn.fit(1)
        assert batches == []
        assert learn.failure is not None
        assert (learn.failure.hook, learn.failure.callback) == (
            "before_fit",
            callback_of(learn, TensorBoardCB),
        )

    def test_the_run_directory_is_made_at_before_fit(self, tmp_path):
        """Before the first batch, <log_dir>/<run_id> exists."""
        seen = []

        class LookFirst(Callback):
            def before_batch(self, learn):
                seen.append((tmp_path / "tb" / learn.run_id).is_dir())

        one_cycle_two_groups(tmp_path / "tb", LookFirst()).fit(1)
        assert seen[0] is True

    def test_a_writer_error_at_a_step_is_blamed_on_tensorboardcb(self, tmp_path, monkeypatch):
        """The optimizer's step hook writes nothing: a writer failing on the rates fails the
        fit in a TensorBoardCB hook (after_batch), and the failure names it."""
        add_scalar = SummaryWriter.add_scalar

        def failing(writer, tag, *args, **kwargs):
            if tag.startswith("lr/"):
                raise OSError(28, "No space left on device")
            return add_scalar(writer, tag, *args, **kwargs)

        monkeypatch.setattr(SummaryWriter, "add_scalar", failing)
        learn = one_cycle_two_groups(tmp_path)
        with pytest.raises(OSError, match="No space left on device"):
            learn.fit(1)
        assert learn.failure is not None
        assert (learn.failure.hook, learn.failure.callback) == (
            "after_batch",
            callback_of(learn, TensorBoardCB),
        )

    def test_the_rates_of_steps_a_failure_cut_short_are_written(self, tmp_path):
        """A failure in the step right after the optimizer's: the rate that step used is
        still written (the pass's cleanup writes what the step hook kept)."""
        used = RatesUsed()

        class FailAfterThirdStep(Callback):
            def after_step(self, learn):
                if len(used.rates) == 3:
                    raise Boom

        learn = one_cycle_two_groups(tmp_path, used, FailAfterThirdStep())
        with pytest.raises(Boom):
            learn.fit(1)
        run = events(callback_of(learn, TensorBoardCB).run_dir)
        rates = as_float32([step[0] for step in used.rates])
        assert points(run, "lr/group0") == list(enumerate(rates))


class TestRanks:
    def test_rank_1_writes_nothing(self, tmp_path, monkeypatch):
        """Off rank 0 nothing is written, and the steps are still counted (for checkpoints)."""
        monkeypatch.setattr("fsm_learner.learner.start_world", lambda _config: World(rank=1))
        learn = one_cycle_two_groups(tmp_path / "tb")
        learn.fit(2)
        assert not (tmp_path / "tb").exists()
        assert callback_of(learn, TensorBoardCB).steps == 8


RESUMES = {
    "first-pass": ((0, True, 2), 2),
    "mid-training": ((1, True, 2), 6),
    "between-epochs": ((1, True, 0), 4),
    "mid-validation": ((0, False, 1), 4),
}
"""Where the checkpoint is taken, and the optimizer steps taken before it."""


def everything(run: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run, by tag; the seconds by step alone (they are wall times)."""
    return {
        tag: [(s, 0.0 if tag.startswith("seconds/") else v) for s, v in points(run, tag)]
        for tag in run.Tags()["scalars"]
    }


class TestResume:
    @pytest.mark.parametrize(("at", "first_step"), RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_the_run_as_the_uninterrupted_one(self, tmp_path, at, first_step):
        """The resumed fit writes on in the checkpointed run, its steps numbered on; the
        points the interrupted fit wrote past the checkpoint are cut: one per step."""
        log_dir = tmp_path / "tb"

        def make() -> Learner:
            return one_cycle_two_groups(log_dir)

        ref, files = checkpointed_fit(make, 2, tmp_path / "checkpoints", [at])
        ref_cb = callback_of(ref, TensorBoardCB)
        uninterrupted = everything(events(ref_cb.run_dir))
        written = set(ref_cb.run_dir.iterdir())
        cb = callback_of(resumed_fit(make, 2, files[at]), TensorBoardCB)
        assert cb.run_dir == ref_cb.run_dir
        assert cb.steps == 8
        assert everything(events(cb.run_dir)) == uninterrupted
        assert list(log_dir.iterdir()) == [cb.run_dir]  # none left for the resume's own id
        (own,) = set(cb.run_dir.iterdir()) - written
        assert [s for s, _ in points(events(own), "lr/group0")] == list(range(first_step, 8))

    def test_the_state_in_a_fit_is_taken_after_a_flush(self, tmp_path, monkeypatch):
        """state_dict() in a fit flushes the writer first, then lists the event files."""
        flushes = []
        flush = SummaryWriter.flush
        monkeypatch.setattr(SummaryWriter, "flush", lambda w: flushes.append(w) or flush(w))
        states = []

        class TakeState(Callback):
            order = 40

            def after_batch(self, learn):
                if learn.iter == 1:
                    states.append(callback_of(learn, TensorBoardCB).state_dict())

        learn = one_cycle_two_groups(tmp_path, TakeState())
        learn.fit(1)
        assert len(flushes) == 2
        run_dir = callback_of(learn, TensorBoardCB).run_dir
        assert [state["steps"] for state in states] == [2, 4]
        assert [set(state["files"]) for state in states] == [
            {p.name for p in run_dir.iterdir()}
        ] * 2

    def test_loaded_at_idle_the_files_stay(self, tmp_path):
        """A state loaded at idle names the run, and cuts nothing."""
        learn = one_cycle_two_groups(tmp_path)
        learn.fit(1)
        cb = callback_of(learn, TensorBoardCB)
        sizes = {p: p.stat().st_size for p in cb.run_dir.iterdir()}
        assert cb.state_dict()["files"] is None
        cb.load_state_dict({"run": "0123456789ab", "steps": 3, "files": {}})
        assert {p: p.stat().st_size for p in sizes} == sizes
        assert (cb.run_dir, cb.steps) == (tmp_path / "0123456789ab", 3)

    @pytest.mark.parametrize(
        ("state", "match"),
        [
            ({"run": "r", "steps": -1, "files": None}, r"state\['steps'\] must be an int >= 0"),
            (
                {"run": "../r", "steps": 0, "files": None},
                r"a directory name \(a run id\), got '../r'",
            ),
            ({"run": "..", "steps": 0, "files": None}, r"a directory name \(a run id\), got '..'"),
            (
                {"run": "r", "steps": 0, "files": {"e": -1}},
                r"sizes in bytes \(ints >= 0\), got \{'e': -1\}",
            ),
            ({"run": "r", "steps": 0}, r"lacks files; expected the keys run, steps, files"),
        ],
    )
    def test_a_bad_state_is_refused(self, state, match):
        """CheckpointError naming the key, what was expected and what came."""
        with pytest.raises(CheckpointError, match=match):
            TensorBoardCB().load_state_dict(state)


class TestWithoutTensorBoard:
    def test_callbacks_import_and_the_callback_names_the_extra(self, monkeypatch):
        """Without tensorboard the package imports; constructing TensorBoardCB says what to do."""
        for name in ("tensorboard", "torch.utils.tensorboard"):
            monkeypatch.setitem(sys.modules, name, None)
        for name in ("callbacks", "callbacks.tensorboard"):
            monkeypatch.delitem(sys.modules, name)
        package = importlib.import_module("callbacks")
        with pytest.raises(ConfigurationError, match=r"pip install 'fsm-learner\[tensorboard\]'"):
            package.TensorBoardCB()
