"""Reading logs needs no torch: `fsm-learner audit` and `diagram --from-log` start at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson
import pytest
from audit_logs import inference_blocks, seal_blocks, training_run

import fsm_learner

COMMAND = textwrap.dedent(
    """
    import contextlib, io, json, sys

    from fsm_learner.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(sys.argv[1:])
    print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
    """
)


def fit_run(run_id: str) -> bytes:
    """A fit of 50 training and 10 validation batches, in blocks of 100 records."""
    return training_run(run_id, 50, valid=10, block=100)[0]


def predict_run(run_id: str) -> bytes:
    """A predict run of 50 batches, sealed as the writer seals it."""
    [data], _ = seal_blocks(run_id, inference_blocks(run_id, "predict", 50))
    return data


@pytest.mark.parametrize("log", [fit_run, predict_run], ids=["fit", "predict"])
@pytest.mark.parametrize(
    "args",
    [["audit"], ["audit", "--json"], ["diagram", "--from-log"]],
    ids=["audit", "audit-json", "diagram"],
)
def test_reading_a_log_imports_no_torch(args, log, tmp_path):
    """In a fresh interpreter: exit 0, torch never imported (it would cost about a second).

    The guard is that torch stays out of sys.modules, not a time limit: a loaded CI machine
    makes any limit flaky, and the import's cost is what ``-X importtime`` shows.
    """
    data = log("0123456789ab")
    (tmp_path / "x.jsonl").write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", COMMAND, *args, str(tmp_path / "x.jsonl")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    found = orjson.loads(done.stdout)
    assert (found["code"], found["torch"]) == (0, False), done.stderr


def test_the_learner_is_imported_on_first_use():
    """fsm_learner's torch-using names come from their module, once, and dir() lists them."""
    names = set(dir(fsm_learner))
    assert {"Learner", "DataLoaders", "Failure", "FitResult", "DiagramFormat"} <= names
    assert set(fsm_learner.__all__) <= names
    from fsm_learner.learner import Learner

    assert fsm_learner.Learner is Learner
    assert "Learner" in vars(fsm_learner)
    with pytest.raises(AttributeError, match="module 'fsm_learner' has no attribute 'Lerner'"):
        _ = fsm_learner.Lerner
