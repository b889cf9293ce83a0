"""learn.note: what a note may hold, and how values JSON lacks are written."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp, run_records

from fsm_learner import Callback, InvalidTransitionError, Learner, RunStatus
from fsm_learner.audit.replay import audit_file


class Noter(Callback):
    """Notes ``fields`` once, at the end of the first training pass."""

    def __init__(self, name="probe", **fields) -> None:
        self.name, self.fields = name, fields

    def after_epoch(self, learn: Learner) -> None:
        if learn.training:
            learn.note(self.name, **self.fields)


def fit_with(noter: Noter) -> Learner:
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [noter])
    learn.fit(1)
    return learn


def notes_in(learn: Learner) -> list[dict]:
    return [r for r in run_records(learn) if r["ev"] == "note"]


class TestValuesJsonLacks:
    def test_non_finite_floats_are_written_by_name(self):
        """NaN used to be written as null; now NaN and infinities keep their names."""
        learn = fit_with(
            Noter(loss=math.nan, high=math.inf, low=-math.inf, nested={"v": [math.nan, 1.5]})
        )
        [note] = notes_in(learn)
        assert {k: note[k] for k in ("loss", "high", "low", "nested")} == {
            "loss": "NaN",
            "high": "Infinity",
            "low": "-Infinity",
            "nested": {"v": ["NaN", 1.5]},
        }
        assert float(note["loss"]) != float(note["loss"])  # float() reads the names back
        [report], _ = audit_file(learn.audit_path)
        assert report.verified

    def test_numpy_floats(self):
        """numpy.float64 is a float: it is written as one (orjson used to refuse it)."""
        learn = fit_with(Noter(score=np.float64(0.25), scores=[np.float64(math.inf)]))
        [note] = notes_in(learn)
        assert (note["score"], note["scores"]) == (0.25, ["Infinity"])


def failing_fit(noter: Noter) -> tuple[Learner, BaseException]:
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [noter])
    with pytest.raises((TypeError, ValueError)) as info:
        learn.fit(1)
    [report], _ = audit_file(learn.audit_path)
    assert (report.verified, report.status) == (True, RunStatus.FAILED)
    assert learn.state == "idle"
    return learn, info.value


class TestNotesRefused:
    def test_a_cyclic_value(self):
        """A note holding itself used to recurse until RecursionError."""
        cyclic: list[object] = [1]
        cyclic.append(cyclic)
        _, exc = failing_fit(Noter(values=cyclic))
        assert isinstance(exc, TypeError)
        assert str(exc) == (
            "audit note field 'values' nests deeper than 32 levels (or holds itself); notes "
            "hold plain JSON values: flatten it"
        )

    def test_a_huge_note(self):
        """A note longer than half a log line's limit is refused, naming its size."""
        _, exc = failing_fit(Noter(blob="x" * 600_000))
        assert isinstance(exc, ValueError)
        assert str(exc).startswith("audit note 'probe' is 600,")
        assert "a note may be at most 524,288 (a log line at most 1,048,576)" in str(exc)

    def test_a_name_that_is_not_text(self):
        """The name of a note is a str."""
        _, exc = failing_fit(Noter(name=3))
        assert str(exc) == "a note's name must be a str, got int"


class TestWhereNotesBelong:
    def test_outside_a_run(self):
        """Notes belong to a run: before any, and after one closed, note() is refused."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1)
        with pytest.raises(InvalidTransitionError, match=r"note\('x'\) outside a run"):
            learn.note("x", a=1)
        learn.fit(1)
        with pytest.raises(InvalidTransitionError, match=r"note\('x'\) outside a run"):
            learn.note("x", a=1)

    def test_in_cleanup_hooks_and_inference_runs(self):
        """A cleanup hook of a fit, and a hook of a validate or predict run, note into their run."""

        class Closing(Callback):
            def cleanup_fit(self, learn):
                learn.note("closing", kind=str(learn.kind))

            def cleanup_epoch(self, learn):
                if learn.kind != "fit":
                    learn.note("closing", kind=str(learn.kind))

        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Closing()])
        for run in (lambda: learn.fit(1), learn.validate, learn.get_preds):
            run()
            [note] = notes_in(learn)
            assert (note["name"], note["kind"], note["run"]) == (
                "closing",
                learn.kind,
                learn.run_id,
            )
            [report], _ = audit_file(learn.audit_path)
            assert report.verified

    def test_checked_when_the_log_is_off_and_for_json(self):
        """A note JSON cannot hold fails in the hook that made it, log on or off."""

        class Big(Callback):
            def before_fit(self, learn):
                learn.note("big", value=2**70)

        for log in (None, "runs"):
            learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Big()], audit_log=log)
            with pytest.raises(TypeError, match="cannot be written as JSON") as info:
                learn.fit(1)
            assert "in hook before_fit of Big" in info.value.__notes__[0]
