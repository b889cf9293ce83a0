"""CSVLoggerCB: the rows of real fits on digits, read back with csv.DictReader."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch.nn.functional as F
from helpers import Boom, batches_dls, callback_of, checkpointed_fit, mlp, resumed_fit
from torchmetrics.classification import MulticlassAccuracy

from callbacks import CSVLoggerCB, MetricsCB
from fsm_learner import (
    Callback,
    CancelEpochException,
    CheckpointError,
    ConfigurationError,
    Learner,
)
from fsm_learner.distributed import World
from fsm_learner.testing import HostReads

COLUMNS = ["epoch", "pass", "loss", "accuracy", "seconds", "complete"]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def learner(path: Path, *cbs: Callback, n_train: int = 3) -> Learner:
    """The seeded MLP on real digits, with accuracy and a CSVLoggerCB writing ``path``."""
    metrics = MetricsCB(MulticlassAccuracy(10))
    cbs = [metrics, CSVLoggerCB(path), *cbs]
    return Learner(mlp(), batches_dls(n_train, 2), F.cross_entropy, 0.1, cbs, audit_log=None)


def expected(history: list[dict[str, float]], complete: str = "True") -> list[dict[str, str]]:
    """The rows MetricsCB's history makes (the seconds left out)."""
    return [
        {
            "epoch": str(row["epoch"]),
            "pass": phase,
            "loss": repr(row[f"{phase}_loss"]),
            "accuracy": repr(row[f"{phase}_accuracy"]),
            "complete": complete,
        }
        for row in history
        for phase in ("train", "valid")
    ]


def without_seconds(read: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read]


class TestRows:
    def test_one_row_per_pass_exactly(self, tmp_path):
        """Two epochs: four rows, MetricsCB's values exactly, positive seconds."""
        path = tmp_path / "metrics.csv"
        learn = learner(path)
        learn.fit(2)
        read = rows(path)
        assert without_seconds(read) == expected(callback_of(learn, MetricsCB).history)
        assert all(float(row["seconds"]) > 0 for row in read)
        assert callback_of(learn, CSVLoggerCB).columns == COLUMNS

    def test_the_header_once_and_rows_appended_across_fits(self, tmp_path):
        """A second fit, of another learner, appends its rows under the one header."""
        path = tmp_path / "runs" / "metrics.csv"
        first, second = learner(path), learner(path)
        first.fit(2)
        second.fit(1)
        history = callback_of(first, MetricsCB).history + callback_of(second, MetricsCB).history
        assert without_seconds(rows(path)) == expected(history)
        assert path.read_text().count("epoch,pass") == 1

    def test_an_empty_file_gets_the_header(self, tmp_path):
        """A file that exists but is empty is new: the header comes first."""
        path = tmp_path / "metrics.csv"
        path.touch()
        learner(path).fit(1)
        assert len(rows(path)) == 2

    def test_each_row_is_on_disk_when_its_pass_ends(self, tmp_path):
        """Read by a later callback as each pass ends: the rows so far are in the file."""
        path = tmp_path / "metrics.csv"
        seen = []

        class ReadBack(Callback):
            order = 40

            def cleanup_epoch(self, learn):
                seen.append(len(rows(path)))

        learner(path, ReadBack()).fit(2)
        assert seen == [1, 2, 3, 4]

    def test_a_cancelled_pass_is_written_incomplete(self, tmp_path):
        """A training pass cancelled after its second batch: its row holds what MetricsCB
        reports for the two batches, marked complete False; the fit goes on."""

        class CancelFirstTraining(Callback):
            order = 40

            def after_batch(self, learn):
                if learn.training and learn.epoch == 0 and learn.iter == 1:
                    raise CancelEpochException

        path = tmp_path / "metrics.csv"
        learn = learner(path, CancelFirstTraining())
        learn.fit(2)
        history = callback_of(learn, MetricsCB).history
        want = expected(history)
        want[0]["complete"] = "False"
        assert without_seconds(rows(path)) == want

    def test_a_failed_pass_writes_no_row(self, tmp_path):
        """A fit failing in epoch 1's training pass: the rows of epoch 0 only."""

        class FailInSecondEpoch(Callback):
            def after_batch(self, learn):
                if learn.epoch == 1:
                    raise Boom

        path = tmp_path / "metrics.csv"
        learn = learner(path, FailInSecondEpoch())
        with pytest.raises(Boom):
            learn.fit(2)
        history = callback_of(learn, MetricsCB).history
        assert without_seconds(rows(path)) == expected(history[:1])

    def test_validate_and_predict_write_nothing(self, tmp_path):
        """Runs that are not fits add no row."""
        path = tmp_path / "metrics.csv"
        learn = learner(path)
        learn.fit(1)
        written = path.read_bytes()
        learn.validate()
        learn.get_preds()
        assert path.read_bytes() == written

    def test_no_host_read_per_batch(self, tmp_path):
        """A fit of 6 batches a pass reads from the device what one of 2 does."""

        def reads(n_train: int) -> int:
            learn = learner(tmp_path / f"{n_train}.csv", n_train=n_train)
            with HostReads() as counter:
                learn.fit(2)
            return counter.count

        assert reads(2) == reads(6)

    def test_rank_1_writes_nothing(self, tmp_path, monkeypatch):
        """Off rank 0 the file is neither checked nor written."""
        monkeypatch.setattr("fsm_learner.learner.start_world", lambda _config: World(rank=1))
        path = tmp_path / "metrics.csv"
        path.write_text("other,columns\n")
        learner(path).fit(2)
        assert path.read_text() == "other,columns\n"


class TestRefused:
    def test_other_columns_than_the_files(self, tmp_path):
        """A fit whose metrics differ from the file's header fails before writing anything."""
        path = tmp_path / "metrics.csv"
        learner(path).fit(1)
        written = path.read_bytes()
        cbs = [MetricsCB(), CSVLoggerCB(path)]
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, audit_log=None)
        with pytest.raises(
            ConfigurationError,
            match=(
                r"metrics.csv has the columns \['epoch', 'pass', 'loss', 'accuracy', 'seconds', "
                r"'complete'\], this fit's are \['epoch', 'pass', 'loss', 'seconds', 'complete'\]"
                r"; give CSVLoggerCB another path, or move the file away"
            ),
        ):
            learn.fit(1)
        assert path.read_bytes() == written

    def test_no_metrics_callback(self, tmp_path):
        """Without a metrics callback the fit fails at its start, saying which to add."""
        path = tmp_path / "metrics.csv"
        cbs = [CSVLoggerCB(path)]
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, audit_log=None)
        with pytest.raises(ConfigurationError, match=r"add callbacks\.MetricsCB\(\)"):
            learn.fit(1)
        assert not path.exists()

    def test_a_metric_named_as_a_column(self, tmp_path):
        """A metric may not take the name of a column the callback writes itself."""
        metrics = MetricsCB(seconds=MulticlassAccuracy(10))
        cbs = [metrics, CSVLoggerCB(tmp_path / "m.csv")]
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, audit_log=None)
        with pytest.raises(ConfigurationError, match=r"names a value 'seconds', a column"):
            learn.fit(1)

    @pytest.mark.parametrize(
        ("path", "match"),
        [
            ("", r"path must be a non-empty str or os.PathLike .* got str ''"),
            (3, r"path must be a non-empty str or os.PathLike .* got int 3"),
            (".", r"path must name a file, got the directory '.'"),
        ],
    )
    def test_a_path_that_is_no_file(self, path, match):
        """The message says what the path must be, and what was given."""
        with pytest.raises(ConfigurationError, match=match):
            CSVLoggerCB(path)


RESUMES = {
    "before-any-row": (0, True, 2),
    "mid-training": (1, True, 2),
    "between-epochs": (1, True, 0),
    "mid-validation": (0, False, 1),
}


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_the_file_as_the_uninterrupted_one(self, tmp_path, at):
        """The rows written past the checkpoint are cut, and written again by the resume."""
        path = tmp_path / "metrics.csv"

        def make() -> Learner:
            return learner(path)

        ref, files = checkpointed_fit(make, 2, tmp_path / "checkpoints", [at])
        uninterrupted = without_seconds(rows(path))
        assert uninterrupted == expected(callback_of(ref, MetricsCB).history)
        resumed_fit(make, 2, files[at])
        assert without_seconds(rows(path)) == uninterrupted

    def test_loaded_at_idle_the_file_stays(self, tmp_path):
        """A state loaded at idle cuts nothing, and a state at idle holds no size."""
        path = tmp_path / "metrics.csv"
        learn = learner(path)
        learn.fit(1)
        cb = callback_of(learn, CSVLoggerCB)
        written = path.read_bytes()
        cb.load_state_dict({"path": str(path.absolute()), "size": 0})
        assert path.read_bytes() == written
        assert cb.state_dict() == {"path": str(path.absolute()), "size": None}

    @pytest.mark.parametrize(
        ("state", "match"),
        [
            ({"path": "m.csv", "size": -1}, r"state\['size'\] must be None or an int >= 0, got -1"),
            ({"path": 3, "size": 0}, r"state\['path'\] must be a str .* got 3 of type int"),
            ({"size": 0}, r"lacks path; expected the keys path, size"),
        ],
    )
    def test_a_bad_state_is_refused(self, state, match):
        """CheckpointError naming the key, what was expected and what came."""
        with pytest.raises(CheckpointError, match=match):
            CSVLoggerCB().load_state_dict(state)
