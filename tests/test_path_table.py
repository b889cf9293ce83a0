"""The path table, generated from the transition table, checked against real runs.

`fsm-learner diagram --write` writes it into the README (between markers) and into
diagrams/learner.md; here each row's hooks are compared with what real fits, validate runs
and predict runs fire, so the generator cannot drift from the learner.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp

from fsm_learner import (
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    Hook,
    Learner,
)
from fsm_learner import diagram as dg
from fsm_learner.testing import RecordingCallback

README = Path(__file__).parents[1] / "README.md"
H = Hook
FIT_ONLY = re.compile(r"`(\w+)` \((?:in a fit run|fit in progress)\)")
"""A hook the table says runs in a fit only: validate and predict runs never open a fit."""


def rows(table: str) -> dict[str, str]:
    """The rows of a path table: path -> its cell."""
    found = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and "`" in cells[1]:
            found[cells[0]] = cells[1]
    return found


def hooks(cell: str) -> list[str]:
    """The hooks a cell names, in order."""
    return re.findall(r"`(\w+)`", cell)


def path_table() -> dict[str, list[str]]:
    """The rows of the generated path table: path -> the hooks it names, in order."""
    return {path: hooks(cell) for path, cell in rows(dg.path_table()).items()}


def learner(plan=None, n_train=0, n_valid=0) -> tuple[Learner, RecordingCallback]:
    rec = RecordingCallback(order=-1)
    learn = Learner(
        mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, [rec, Raiser(plan or {})]
    )
    return learn, rec


def trace(n_train, n_valid, plan=None, n_epochs=1):
    """The hooks a real fit fires, in order."""
    learn, rec = learner(plan, n_train, n_valid)
    with contextlib.suppress(Boom):
        learn.fit(n_epochs)
    assert learn.state == "idle"
    return [str(h) for h in rec.hooks]


def inference(run: str, n_batches: int, plan=None):
    """The hooks a real validate or predict run over ``n_batches`` fires, in order."""
    learn, rec = learner(plan, n_valid=n_batches)
    with contextlib.suppress(Boom):
        getattr(learn, run)()
    assert learn.state == "idle"
    return [str(h) for h in rec.hooks]


def after(hooks, hook):
    """The hooks from the first call of ``hook`` on."""
    return hooks[hooks.index(hook) :]


def ends(hooks):
    """The first hook and the last two: a unit's begin, end and cleanup."""
    return [hooks[0], *hooks[-2:]]


EXPECTED = {
    # each path, as the slice of a real trace that shows it
    "fit": lambda: trace(0, 0, n_epochs=0),
    "pass": lambda: trace(0, 0)[1:4],
    "validate run": lambda: ends(inference("validate", 0)),
    "predict run": lambda: ends(inference("get_preds", 0)),
    "training batch": lambda: trace(1, 0)[2:-7],
    "validation batch": lambda: trace(0, 1)[5:-4],
    "predict batch": lambda: inference("get_preds", 1)[1:-2],
    "cancel batch": lambda: after(
        trace(2, 0, {(H.BEFORE_BATCH, 1): CancelBatchException}), "after_cancel_batch"
    )[:3],
    "cancel epoch": lambda: after(
        trace(1, 0, {(H.AFTER_STEP, 1): CancelEpochException}), "after_cancel_epoch"
    )[:4],
    "cancel fit": lambda: after(
        trace(1, 1, {(H.AFTER_LOSS, 1): CancelFitException}), "after_cancel_fit"
    ),
    "failure": lambda: after(trace(1, 1, {(H.AFTER_LOSS, 1): Boom}), "after_fail"),
}
# what follows the documented hooks ("then the next batch", "then the next pass")
NEXT = {"cancel batch": ["before_batch"], "cancel epoch": ["before_epoch"]}
# paths no real run shows yet, as the table says them, checked by hand: the learner does not
# preempt (stop a fit on SIGTERM) yet; move each to EXPECTED, as a real run, when it does
NOT_RUN_YET = {
    # between two batches: the pass is in progress; between two passes (from fit) it is not
    "preempt": "`after_preempt`, `cleanup_epoch` (epoch in progress), `cleanup_fit`, then idle",
}


class TestRealRuns:
    def test_every_path_is_in_the_table(self):
        """The table has exactly the paths this test knows how to produce or wrote out."""
        assert set(path_table()) == set(EXPECTED) | set(NOT_RUN_YET)
        assert not set(EXPECTED) & set(NOT_RUN_YET)

    @pytest.mark.parametrize("path", list(NOT_RUN_YET))
    def test_path_no_run_shows_yet(self, path):
        """A path no real run takes yet reads as written out by hand."""
        assert rows(dg.path_table())[path] == NOT_RUN_YET[path]

    @pytest.mark.parametrize("path", list(EXPECTED))
    def test_path(self, path):
        """The hooks the table names for a path are the ones a real run fires, in order."""
        documented = path_table()[path] + NEXT.get(path, [])
        assert documented == EXPECTED[path]()

    @pytest.mark.parametrize(
        ("run", "path", "batch"),
        [
            ("validate", "validate run", "validation batch"),
            ("get_preds", "predict run", "predict batch"),
        ],
    )
    def test_an_inference_runs_batches(self, run, path, batch):
        """A validate run's batch is a validation batch; a predict run's, the predict batch."""
        assert f"each batch as a {batch}" in rows(dg.path_table())[path]
        assert inference(run, 1)[1:-2] == path_table()[batch]

    @pytest.mark.parametrize(
        ("path", "plan", "hook", "fit_only"),
        [
            (
                "cancel epoch",
                {(H.AFTER_PREDICT, 1): CancelEpochException},
                "after_cancel_epoch",
                [],
            ),
            (
                "cancel fit",
                {(H.AFTER_PREDICT, 1): CancelFitException},
                "after_cancel_fit",
                ["cleanup_fit"],
            ),
            ("failure", {(H.AFTER_PREDICT, 1): Boom}, "after_fail", ["cleanup_fit"]),
        ],
    )
    @pytest.mark.filterwarnings("ignore::fsm_learner.PartialResultWarning")  # cancelled on purpose
    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_an_inference_run_abandoned_in_a_batch(self, path, plan, hook, fit_only, run):
        """Abandoned mid-batch, a validate or predict run has no fit to clean up: it ends idle."""
        assert FIT_ONLY.findall(rows(dg.path_table())[path]) == fit_only
        documented = [h for h in path_table()[path] if h not in fit_only]
        assert after(inference(run, 2, plan), hook) == documented

    def test_a_cancel_between_batches_cleans_up_no_batch(self):
        """cancel_epoch raised in before_epoch: the batch's cleanup is the conditional one."""
        cell = rows(dg.path_table())["cancel epoch"]
        assert "`cleanup_batch` (batch in progress)" in cell
        hooks_ = trace(1, 0, {(H.BEFORE_EPOCH, 1): CancelEpochException})
        assert after(hooks_, "after_cancel_epoch")[:3] == [
            "after_cancel_epoch",
            "cleanup_epoch",
            "before_epoch",
        ]


class TestGenerated:
    def test_the_readme_holds_it_between_its_markers(self):
        """The README's path table is the generated one, between the markers."""
        text = README.read_text()
        between = text.split(dg.PATH_TABLE_START + "\n", 1)[1].split(dg.PATH_TABLE_END, 1)[0]
        assert between.strip() == dg.path_table().strip()

    def test_the_hooks_are_the_tables(self):
        """Every hook the path table names is a Hook; every hook of the table is in it."""
        named = {h for row in path_table().values() for h in row}
        assert named == {h.value for h in Hook}
