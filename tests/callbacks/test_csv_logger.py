"""CSVLoggerCB: the rows of real fits on digits, read back with csv.DictReader."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch.nn.functional as F
from helpers import (
    Boom,
    batches_dls,
    callback_of,
    checkpointed_fit,
    mlp,
    resumed_fit,
    saved_state,
)
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

COLUMNS = ["run_id", "epoch", "pass", "loss", "accuracy", "seconds", "complete"]


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


def expected(history: list[dict[str, float]], run_id: str) -> list[dict[str, str]]:
    """The rows MetricsCB's history of the run ``run_id`` makes (the seconds left out)."""
    return [
        {
            "run_id": run_id,
            "epoch": str(row["epoch"]),
            "pass": phase,
            "loss": repr(row[f"{phase}_loss"]),
            "accuracy": repr(row[f"{phase}_accuracy"]),
            "complete": "True",
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
        run_id = learn.fit(2).run_id
        read = rows(path)
        assert without_seconds(read) == expected(callback_of(learn, MetricsCB).history, run_id)
        assert all(float(row["seconds"]) > 0 for row in read)
        assert callback_of(learn, CSVLoggerCB).columns == COLUMNS

    def test_the_header_once_and_rows_appended_across_fits(self, tmp_path):
        """A second fit, of another learner, appends its rows under the one header."""
        path = tmp_path / "runs" / "metrics.csv"
        first, second = learner(path), learner(path)
        first_id, second_id = first.fit(2).run_id, second.fit(1).run_id
        assert without_seconds(rows(path)) == [
            *expected(callback_of(first, MetricsCB).history, first_id),
            *expected(callback_of(second, MetricsCB).history, second_id),
        ]
        assert path.read_text().count("run_id,epoch,pass") == 1

    def test_the_run_id_tells_two_fits_of_one_learner_apart(self, tmp_path):
        """fit(2) then fit(3) on one learner: the epochs start again at 0, and the run_id
        column, first, is each fit's run id (which names its audit log and TensorBoard run)."""
        path = tmp_path / "metrics.csv"
        learn = learner(path)
        metrics = callback_of(learn, MetricsCB)
        first = learn.fit(2).run_id
        first_history = list(metrics.history)
        second = learn.fit(3).run_id
        assert first != second
        assert without_seconds(rows(path)) == [
            *expected(first_history, first),
            *expected(metrics.history, second),
        ]
        assert path.read_text().startswith("run_id,")

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

    def test_the_file_is_checked_and_its_header_written_before_training(self, tmp_path):
        """At before_fit, its directories created: the header alone, before any batch."""
        path = tmp_path / "new" / "dir" / "metrics.csv"
        seen = []

        class ReadFirst(Callback):
            order = 40

            def before_batch(self, learn):
                seen.append(path.read_bytes())

        learner(path, ReadFirst()).fit(1)
        assert seen[0] == (",".join(COLUMNS) + "\r\n").encode()

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
        run_id = learn.fit(2).run_id
        history = callback_of(learn, MetricsCB).history
        want = expected(history, run_id)
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
        assert without_seconds(rows(path)) == expected(history[:1], learn.run_id)

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
                r"metrics.csv has the columns \['run_id', 'epoch', 'pass', 'loss', 'accuracy', "
                r"'seconds', 'complete'\], this fit's are \['run_id', 'epoch', 'pass', 'loss', "
                r"'seconds', 'complete'\]; give CSVLoggerCB another path, or move the file away"
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

    def test_two_callbacks_writing_one_file(self, tmp_path):
        """Two CSVLoggerCB on one file (spelt two ways) fail the fit at its start, naming
        the file, before writing anything: each would write every row."""
        path = tmp_path / "metrics.csv"
        twin = CSVLoggerCB(tmp_path / "sub" / ".." / "metrics.csv")
        learn = learner(path, twin)
        with pytest.raises(ConfigurationError, match=r"two CSVLoggerCB writing .*metrics\.csv"):
            learn.fit(1)
        assert learn.failure is not None
        assert learn.failure.hook == "before_fit"
        assert not path.exists()

    def test_a_path_that_cannot_be_written_fails_before_training(self, tmp_path):
        """A path under a regular file fails the fit in CSVLoggerCB's before_fit, naming
        the file, before any batch runs."""
        (tmp_path / "plain").write_text("x")
        batches = []

        class CountBatches(Callback):
            def before_batch(self, learn):
                batches.append(learn.iter)

        learn = learner(tmp_path / "plain" / "m.csv", CountBatches())
        with pytest.raises(ConfigurationError, match=r"cannot write the CSV file .*plain/m\.csv"):
            learn.fit(1)
        assert batches == []
        assert learn.failure is not None
        assert (learn.failure.hook, learn.failure.callback) == (
            "before_fit",
            callback_of(learn, CSVLoggerCB),
        )

    @pytest.mark.parametrize(
        ("content", "match"),
        [
            (b"A" * 300_000, r"cannot read the header of .*m\.csv as CSV \(field larger than"),
            (bytes(range(1, 256)) * 10, r"m\.csv has the columns \['\\x01"),
        ],
        ids=["over-the-field-limit", "binary"],
    )
    def test_a_file_whose_header_is_no_csv(self, tmp_path, content, match):
        """An existing file whose header cannot be read, or is garbage: ConfigurationError
        naming the file (not csv's own error), the file left as it was."""
        path = tmp_path / "m.csv"
        path.write_bytes(content)
        with pytest.raises(ConfigurationError, match=match):
            learner(path).fit(1)
        assert path.read_bytes() == content

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
ROWS_BEFORE = {"before-any-row": 0, "mid-training": 2, "between-epochs": 2, "mid-validation": 1}
"""The rows the checkpointed fit had written at each position of RESUMES."""


class TestResume:
    @pytest.mark.parametrize("at", RESUMES.values(), ids=list(RESUMES))
    def test_a_resumed_fit_ends_the_file_as_the_uninterrupted_one(self, tmp_path, at):
        """The rows written past the checkpoint are cut, and written again by the resume,
        under the checkpointed fit's run id."""
        path = tmp_path / "metrics.csv"

        def make() -> Learner:
            return learner(path)

        ref, files = checkpointed_fit(make, 2, tmp_path / "checkpoints", [at])
        uninterrupted = without_seconds(rows(path))
        assert uninterrupted == expected(callback_of(ref, MetricsCB).history, ref.run_id)
        resumed = resumed_fit(make, 2, files[at])
        assert resumed.run_id != ref.run_id
        assert without_seconds(rows(path)) == uninterrupted

    @pytest.mark.parametrize("name", list(RESUMES))
    def test_the_rows_of_other_fits_stay(self, tmp_path, name):
        """Another fit appends to the file after the checkpoint: resuming removes only the
        checkpointed run's rows past the checkpoint; the other fit's rows stay as they were,
        the resumed rows come after them, and no temporary file is left."""
        path, at, kept = tmp_path / "metrics.csv", RESUMES[name], ROWS_BEFORE[name]

        def make() -> Learner:
            return learner(path)

        ref, files = checkpointed_fit(make, 2, tmp_path / "checkpoints", [at])
        assert saved_state(files[at], "CSVLoggerCB")["rows"] == kept
        other_id = make().fit(3).run_id
        before = rows(path)
        resumed_fit(make, 2, files[at])
        after = rows(path)
        assert after[: kept + 6] == before[:kept] + before[4:]
        assert {row["run_id"] for row in after[kept : kept + 6]} == {other_id}
        assert without_seconds(after[kept + 6 :]) == without_seconds(before[kept:4])
        assert {row["run_id"] for row in after[kept + 6 :]} == {ref.run_id}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "metrics.csv"]

    def test_resuming_one_checkpoint_twice_ends_as_once(self, tmp_path):
        """The second resume removes what the first wrote past the checkpoint."""
        path = tmp_path / "metrics.csv"

        def make() -> Learner:
            return learner(path)

        _, files = checkpointed_fit(make, 2, tmp_path / "checkpoints", [(1, True, 2)])
        uninterrupted = without_seconds(rows(path))
        resumed_fit(make, 2, files[1, True, 2])
        resumed_fit(make, 2, files[1, True, 2])
        assert without_seconds(rows(path)) == uninterrupted

    def test_a_header_other_than_the_checkpoints_is_refused(self, tmp_path):
        """Loaded in a fit, a state whose columns are not the file's header fails the fit
        with a CheckpointError naming both, the file left as it was."""
        path = tmp_path / "metrics.csv"
        other = ["run_id", "epoch", "pass", "loss", "seconds", "complete"]

        class LoadOtherColumns(Callback):
            order = 40

            def before_epoch(self, learn):
                state = {"path": str(path.absolute()), "run": "r", "columns": other, "rows": 0}
                callback_of(learn, CSVLoggerCB).load_state_dict(state)

        learn = learner(path, LoadOtherColumns())
        with pytest.raises(CheckpointError) as raised:
            learn.fit(1)
        assert f"{path} has the columns {COLUMNS}" in str(raised.value)
        assert f"the checkpoint's rows were written under {other}" in str(raised.value)
        assert path.read_bytes() == (",".join(COLUMNS) + "\r\n").encode()

    def test_loaded_at_idle_the_file_stays(self, tmp_path):
        """A state loaded at idle cuts nothing, and a state at idle counts no rows."""
        path = tmp_path / "metrics.csv"
        learn = learner(path)
        run_id = learn.fit(1).run_id
        cb = callback_of(learn, CSVLoggerCB)
        written = path.read_bytes()
        cb.load_state_dict(
            {"path": str(path.absolute()), "run": run_id, "columns": COLUMNS, "rows": 0}
        )
        assert path.read_bytes() == written
        assert cb.state_dict() == {
            "path": str(path.absolute()),
            "run": run_id,
            "columns": COLUMNS,
            "rows": None,
        }

    @pytest.mark.parametrize(
        ("state", "match"),
        [
            (
                {"path": "m.csv", "run": "r", "columns": [], "rows": -1},
                r"state\['rows'\] must be None or an int >= 0, got -1",
            ),
            (
                {"path": 3, "run": "r", "columns": [], "rows": 0},
                r"state\['path'\] must be a str .* got 3 of type int",
            ),
            (
                {"path": "m.csv", "run": "r", "columns": "epoch", "rows": 0},
                r"state\['columns'\] must be a list of str .* got 'epoch' of type str",
            ),
            (
                {"path": "m.csv", "size": 0},
                r"lacks run, columns, rows; expected the keys path, run, columns, rows",
            ),
        ],
    )
    def test_a_bad_state_is_refused(self, state, match):
        """CheckpointError naming the key, what was expected and what came."""
        with pytest.raises(CheckpointError, match=match):
            CSVLoggerCB().load_state_dict(state)
