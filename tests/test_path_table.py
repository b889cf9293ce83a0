"""The README's path table, checked against real fits: the docs say what the code does."""

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
from fsm_learner.testing import RecordingCallback

README = Path(__file__).parents[1] / "README.md"
H = Hook


def path_table() -> dict[str, list[str]]:
    """The rows of the README's path table: path -> the hooks it names, in order."""
    text = README.read_text()
    section = text.split("### The path table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and "`" in cells[1]:
            rows[cells[0]] = re.findall(r"`(\w+)`", cells[1])
    return rows


def trace(n_train, n_valid, plan=None, n_epochs=1):
    rec = RecordingCallback(order=-1)
    learn = Learner(
        mlp(), batches_dls(n_train, n_valid), F.cross_entropy, 0.1, [rec, Raiser(plan or {})]
    )
    with contextlib.suppress(Boom):
        learn.fit(n_epochs)
    assert learn.state == "idle"
    return [str(h) for h in rec.hooks]


def after(hooks, hook):
    """The hooks from the first call of ``hook`` on."""
    return hooks[hooks.index(hook) :]


EXPECTED = {
    # each documented path, as the slice of a real trace that shows it
    "fit": lambda: [trace(0, 0, n_epochs=0)[0], trace(0, 0, n_epochs=0)[-1]],
    "pass": lambda: trace(0, 0)[1:3],
    "training batch": lambda: trace(1, 0)[2:-4],
    "validation batch": lambda: trace(0, 1)[4:-2],
    "cancel batch": lambda: after(
        trace(2, 0, {(H.BEFORE_BATCH, 1): CancelBatchException}), "after_cancel_batch"
    )[:2],
    "cancel epoch": lambda: after(
        trace(1, 0, {(H.AFTER_STEP, 1): CancelEpochException}), "after_cancel_epoch"
    )[:2],
    "cancel fit": lambda: after(
        trace(1, 1, {(H.AFTER_LOSS, 1): CancelFitException}), "after_cancel_fit"
    ),
    "failure": lambda: after(trace(1, 1, {(H.AFTER_LOSS, 1): Boom}), "after_fail"),
}
# what follows the documented hooks ("then the next batch", "then the next pass")
NEXT = {"cancel batch": ["before_batch"], "cancel epoch": ["before_epoch"]}


def test_every_path_is_documented():
    """The table has exactly the paths this test knows how to produce."""
    assert set(path_table()) == set(EXPECTED)


@pytest.mark.parametrize("path", list(EXPECTED))
def test_path(path):
    """The hooks the README names for a path are the ones a real fit fires, in order."""
    documented = path_table()[path] + NEXT.get(path, [])
    assert documented == EXPECTED[path]()
