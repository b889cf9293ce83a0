"""ProgressCB: exact plain lines off a terminal, bars and a throttled live loss on one, a table."""

from __future__ import annotations

import io
import re

import pytest
import torch.nn.functional as F
from helpers import (
    BatchLosses,
    Boom,
    SelfLossMLP,
    as_mappings,
    batches_dls,
    callback_of,
    checkpointed_fixture,
    mlp,
    resumed_fit,
)
from rich.console import Console
from torchmetrics.classification import MulticlassAccuracy

from callbacks.metrics import MetricsCB
from callbacks.progress import ProgressCB
from fsm_learner import (
    Callback,
    CancelEpochException,
    CancelFitException,
    ConfigurationError,
    Learner,
)
from fsm_learner.exceptions import CheckpointError
from fsm_learner.testing import HostReads

SECONDS = re.compile(r"\d+\.\ds")


def plain_lines(text: str) -> list[str]:
    """The output's lines with every duration replaced by 'Ts'."""
    return [SECONDS.sub("Ts", line) for line in text.splitlines()]


def fmt(value: float) -> str:
    return f"{value:.4f}"


class TestPlain:
    def test_one_line_per_pass_and_a_table_exactly(self):
        """Off a terminal: a line per pass with MetricsCB's values, then the per-epoch table."""
        out = io.StringIO()
        metrics = MetricsCB(MulticlassAccuracy(10, average="micro"))
        learn = Learner(
            mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, ProgressCB(file=out)]
        )
        learn.fit(2)
        h = metrics.history

        def line(epoch: int, phase: str) -> str:
            row = h[epoch]
            return (
                f"epoch {epoch + 1}/2 {phase} loss {fmt(row[f'{phase}_loss'])} "
                f"accuracy {fmt(row[f'{phase}_accuracy'])} Ts"
            )

        def table_row(epoch: int) -> str:
            keys = ["train_loss", "train_accuracy", "valid_loss", "valid_accuracy"]
            cells = [fmt(h[epoch][k]) for k in keys]
            widths = [10, 14, 10, 14]
            return "  ".join(
                [
                    str(epoch + 1).rjust(5),
                    *(c.rjust(w) for c, w in zip(cells, widths, strict=True)),
                    "Ts",
                ]
            )

        assert plain_lines(out.getvalue()) == [
            line(0, "train"),
            line(0, "valid"),
            line(1, "train"),
            line(1, "valid"),
            "epoch  train_loss  train_accuracy  valid_loss  valid_accuracy  time",
            table_row(0),
            table_row(1),
        ]

    def test_without_metrics_the_mean_loss_is_shown(self):
        """Without MetricsCB, ProgressCB averages the loss itself, weighted by batch size."""
        out, losses = io.StringIO(), BatchLosses()
        progress = ProgressCB(file=out, table=False)
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [losses, progress]).fit(1)
        assert plain_lines(out.getvalue()) == [
            f"epoch 1/1 train loss {fmt(losses.mean(0, True))} Ts",
            f"epoch 1/1 valid loss {fmt(losses.mean(0, False))} Ts",
        ]

    def test_mapping_batches_and_a_model_s_own_loss(self):
        """{"pixels", "labels"} batches to a model computing its loss: the lines of (x, y)."""
        dls = batches_dls(3, 2)
        mapped = as_mappings(dls)
        outs = io.StringIO(), io.StringIO()
        plain = Learner(mlp(), dls, F.cross_entropy, 0.1, [ProgressCB(file=outs[0], table=False)])
        plain.fit(2)
        cbs = [ProgressCB(file=outs[1], table=False)]
        Learner(SelfLossMLP(), mapped, None, 0.1, cbs).fit(2)
        expected = plain_lines(outs[0].getvalue())
        assert len(expected) == 4
        assert plain_lines(outs[1].getvalue()) == expected

    @pytest.mark.parametrize("hook", ["before_epoch", "before_batch"])
    def test_a_cancelled_pass_says_so(self, hook):
        """A cancelled pass gets its line, marked '(cancelled)', even one cancelled before
        ProgressCB saw it start."""

        def cancel_validation(self, learn):
            if not learn.training:
                raise CancelEpochException

        canceller = type("CancelValidation", (Callback,), {hook: cancel_validation})()
        out = io.StringIO()
        learn = Learner(
            mlp(),
            batches_dls(2, 2),
            F.cross_entropy,
            0.1,
            [canceller, ProgressCB(file=out, table=False)],
        )
        learn.fit(1)
        lines = plain_lines(out.getvalue())
        assert lines[1] == "epoch 1/1 valid loss - Ts (cancelled)"

    def test_a_cancelled_fit_prints_the_cut_pass_then_the_table(self):
        """A cancel_fit at training batch 2 of epoch 2: that pass's line, marked, comes
        before the table, whose second row holds the cut pass's values."""

        class StopAtSecondEpoch(Callback):
            def before_batch(self, learn):
                if learn.epoch == 1 and learn.iter == 2:
                    raise CancelFitException

        out, losses = io.StringIO(), BatchLosses()
        progress = ProgressCB(file=out)
        cbs = [StopAtSecondEpoch(), losses, progress]
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs).fit(3)
        lines = plain_lines(out.getvalue())
        assert lines[2] == f"epoch 2/3 train loss {fmt(losses.mean(1, True))} Ts (cancelled)"
        assert lines[3] == "epoch  train_loss  valid_loss  time"
        assert lines[5].split()[:3] == ["2", fmt(losses.mean(1, True)), "-"]
        assert len(lines) == 6

    def test_a_failed_fit_prints_no_table(self):
        """After a failure only the lines of the passes that ended before it are printed."""

        class Fail(Callback):
            def before_batch(self, learn):
                if learn.epoch == 1:
                    raise Boom

        out = io.StringIO()
        learn = Learner(
            mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Fail(), ProgressCB(file=out)]
        )
        with pytest.raises(Boom):
            learn.fit(2)
        assert [line.split()[:3] for line in plain_lines(out.getvalue())] == [
            ["epoch", "1/2", "train"],
            ["epoch", "1/2", "valid"],
        ]

    def test_no_host_read_per_batch(self):
        """Off a terminal nothing is read per batch: the reads do not grow with the batches."""

        def reads(n_train: int) -> int:
            progress = ProgressCB(file=io.StringIO())
            learn = Learner(mlp(), batches_dls(n_train, 2), F.cross_entropy, 0.1, [progress])
            with HostReads() as counter:
                learn.fit(2)
            assert progress.live_loss_reads == 0
            return counter.count

        assert reads(2) == reads(6)


class TestOtherRuns:
    def test_a_validate_run_prints_one_line(self):
        """validate() prints its values by name, those it returns; the fit's table stays."""
        out = io.StringIO()
        metrics = MetricsCB(MulticlassAccuracy(10, average="micro"))
        learn = Learner(
            mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, ProgressCB(file=out)]
        )
        learn.fit(1)
        fitted = out.getvalue()
        result = learn.validate()
        assert plain_lines(out.getvalue()[len(fitted) :]) == [
            f"validate loss {fmt(result['loss'])} accuracy {fmt(result['accuracy'])} Ts"
        ]

    def test_a_validate_run_without_metrics_shows_its_mean_loss(self):
        """Without MetricsCB the line holds ProgressCB's own sample-weighted mean loss."""
        out = io.StringIO()
        learn = Learner(mlp(), batches_dls(1, 3), F.cross_entropy, 0.1, [ProgressCB(file=out)])
        result = learn.validate()
        assert plain_lines(out.getvalue()) == [f"validate loss {fmt(result['loss'])} Ts"]

    def test_a_predict_run_prints_nothing(self):
        """get_preds has no loss to show: ProgressCB stays quiet, off a terminal and on one."""
        out, console = io.StringIO(), terminal()
        cbs = [ProgressCB(file=out), ProgressCB(console=console, refresh_s=0.0)]
        learn = Learner(mlp(), batches_dls(1, 3), F.cross_entropy, 0.1, cbs)
        preds, _ = learn.get_preds()
        assert preds.shape == (24, 10)
        assert out.getvalue() == console.file.getvalue() == ""
        assert cbs[1].live_loss_reads == 0


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


class TestTerminal:
    def test_bars_lines_and_table(self):
        """On a terminal: both bars, the pass lines above them, and the table at the end."""
        console = terminal()
        metrics = MetricsCB(MulticlassAccuracy(10, average="micro"))
        progress = ProgressCB(console=console)
        assert progress.is_terminal
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [metrics, progress]).fit(2)
        text = console.file.getvalue()
        assert "\x1b[" in text  # a terminal gets control codes
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        assert "fit" in plain
        assert "epoch 2/2 train" in plain
        assert "3/3" in plain
        assert "2/2" in plain
        assert f"epoch 2/2 valid loss {fmt(metrics.values['valid_loss'])}" in plain
        assert "metrics per epoch" in plain
        assert "valid_accuracy" in plain

    @pytest.mark.parametrize(("refresh_s", "expected"), [(3600.0, 1), (0.0, 10)])
    def test_live_loss_is_read_at_most_every_refresh_s(self, refresh_s, expected):
        """The live loss is read when refresh_s has passed: once in an hour, every batch at 0."""
        progress = ProgressCB(console=terminal(), refresh_s=refresh_s, table=False)
        Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [progress]).fit(2)
        assert progress.live_loss_reads == expected

    def test_failure_stops_the_bars(self):
        """A failing fit leaves no live display behind, so the traceback is readable."""

        class Fail(Callback):
            def after_batch(self, learn):
                raise Boom

        console = terminal()
        progress = ProgressCB(console=console)
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Fail(), progress])
        with pytest.raises(Boom):
            learn.fit(1)
        assert progress._progress is None
        assert console.file.getvalue().endswith("\x1b[?25h")  # the cursor is shown again


class TestConfiguration:
    def test_file_and_console_together_are_rejected(self):
        """A console has its own file: giving both is ambiguous."""
        with pytest.raises(ConfigurationError, match="give file or console, not both"):
            ProgressCB(file=io.StringIO(), console=terminal())

    @pytest.mark.parametrize("refresh_s", [-1, "fast", True])
    def test_bad_refresh_is_rejected(self, refresh_s):
        """refresh_s is a number of seconds >= 0; the message shows what was received."""
        with pytest.raises(ConfigurationError, match=re.escape(f"got {refresh_s!r}")):
            ProgressCB(refresh_s=refresh_s)


def printing_learner() -> Learner:
    cbs = [ProgressCB(file=io.StringIO())]
    return Learner(mlp(), batches_dls(4, 2), F.cross_entropy, 0.1, cbs, audit_log=None)


def printed(learn: Learner) -> list[str]:
    return plain_lines(callback_of(learn, ProgressCB).console.file.getvalue())


RESUMES = {
    "mid-training": (1, True, 2),
    "mid-validation": (0, False, 1),
    "between-epochs": (1, True, 0),
}


progressed = checkpointed_fixture(printing_learner, 2, RESUMES.values())


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_prints_the_same_lines_and_table(self, progressed, at):
        """Without MetricsCB: the line of each pass from the resumed one on, the whole table."""
        ref, files = progressed
        text = printed(resumed_fit(printing_learner, 2, files[at]))
        assert text == printed(ref)[-len(text) :]
        epoch, training, _ = at
        assert len([line for line in text if "/2 " in line]) == 4 - 2 * epoch - (not training)
        assert text[-3:-2] == ["epoch  train_loss  valid_loss  time"]

    def test_a_wrong_type_is_refused(self):
        """Rows need their epoch."""
        state = {"rows": [{"train_loss": 1.0}], "loss": {"sum": None, "count": 0}}
        with pytest.raises(
            CheckpointError, match=r"ProgressCB: each of state\['rows'\] must have an int 'epoch'"
        ):
            ProgressCB(file=io.StringIO()).load_state_dict(state)
