"""`fsm-learner audit --diff A B` on real runs; the header fields a reproducibility diff reads."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import torch
import torch.nn.functional as F
from audit_logs import reseal, tiny_run
from helpers import digits_dls, mlp
from torchmetrics.classification import MulticlassAccuracy

from callbacks import CheckpointCB, MetricsCB
from fsm_learner import Callback, CancelBatchException, Learner
from fsm_learner.audit import diff as diff_module
from fsm_learner.audit.codec import Field
from fsm_learner.audit.diff import (
    HEADER_ROWS_SHOWN,
    METRIC_ROWS_SHOWN,
    HeaderDifference,
    MetricDifference,
    Pass,
    diff_runs,
    render_diff,
    runs_by_id,
    runs_in_files,
)
from fsm_learner.cli import main

N_EPOCHS = 3


class CancelBatchAt(Callback):
    """Cancels one training batch in before_batch: the run takes cancel_batch there."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def before_batch(self, learn: Learner) -> None:
        if learn.training and (learn.epoch, learn.iter) == (self.epoch, self.batch):
            raise CancelBatchException


def fit(log: Path, *, seed: int = 0, cbs: tuple[Callback, ...] = (), n_epochs: int = N_EPOCHS):
    """A small MLP on 5 training and 2 validation batches of digits, seeded with ``seed``."""
    metrics = MetricsCB(MulticlassAccuracy(num_classes=10))
    learn = Learner(
        mlp(seed),  # torch.manual_seed(seed), then the model
        digits_dls(64, 320, 128),
        F.cross_entropy,
        0.1,
        [metrics, *cbs],
        audit_log=log,
    )
    learn.fit(n_epochs)
    return learn, metrics


def records(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The log's records (of one run, if given), seals left out."""
    found = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in found if r["ev"] != "seal" and (run_id is None or r["run"] == run_id)]


def header(path: Path, run_id: str | None = None) -> dict[str, Any]:
    return next(r for r in records(path, run_id) if r["ev"] == "run_start")


def transitions(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records(path, run_id) if "src" in r]


def metric_notes(path: Path, run_id: str | None = None) -> dict[tuple[int, str], dict[str, Any]]:
    """Each pass's metrics note fields, by (epoch, pass)."""
    stamped = {"ev", "run", "t", "ep", "it", "tr", "name"}
    return {
        (r["ep"], "train" if r["tr"] else "valid"): {k: v for k, v in r.items() if k not in stamped}
        for r in records(path, run_id)
        if r.get("name") == "metrics"
    }


def audit(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def audit_json(*args: str, capsys) -> tuple[int, dict[str, Any]]:
    code, out, _ = audit(*args, "--json", capsys=capsys)
    return code, orjson.loads(out)


def expected_metrics(a: Path, b: Path) -> list[dict[str, Any]]:
    """The metrics entries the diff should give, computed from the two logs' notes."""
    notes_a, notes_b = metric_notes(a), metric_notes(b)
    order = {"train": 0, "valid": 1}
    out = []
    for epoch, name in sorted(notes_a.keys() | notes_b.keys(), key=lambda k: (k[0], order[k[1]])):
        fields_a, fields_b = notes_a.get((epoch, name), {}), notes_b.get((epoch, name), {})
        for field in dict.fromkeys([*fields_a, *fields_b]):
            if field == "complete":  # a bool: no metric
                continue
            entry: dict[str, Any] = {"epoch": epoch, "pass": name, "name": field}
            if field in fields_a:
                entry["a"] = fields_a[field]
            if field in fields_b:
                entry["b"] = fields_b[field]
            both = field in fields_a and field in fields_b
            entry["diff"] = fields_b[field] - fields_a[field] if both else None
            out.append(entry)
    return out


def first_step_difference(a: Path, b: Path) -> tuple[int, dict | None, dict | None]:
    """The first index where the logs' transitions differ, and each one's there."""
    key = ("ev", "src", "dst", "tr", "ep", "it")
    steps_a, steps_b = transitions(a), transitions(b)
    index = next(
        (
            i
            for i, (x, y) in enumerate(zip(steps_a, steps_b, strict=False))
            if [x[k] for k in key] != [y[k] for k in key]
        ),
        min(len(steps_a), len(steps_b)),
    )
    return (
        index,
        steps_a[index] if index < len(steps_a) else None,
        steps_b[index] if index < len(steps_b) else None,
    )


def step_json(record: dict[str, Any]) -> dict[str, Any]:
    """How the diff describes a transition record inside a batch of a fit."""
    return {
        "trigger": record["ev"],
        "source": record["src"],
        "dest": record["dst"],
        "epoch": record["ep"],
        "pass": "train" if record["tr"] else "valid",
        "batch": record["it"],
    }


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Any]:
    """Real fits, each in its own log: the same seed twice, another seed, a cancelled batch."""
    directory = tmp_path_factory.mktemp("diff")
    fits = {
        "base": fit(directory / "base.jsonl", seed=0),
        "same": fit(directory / "same.jsonl", seed=0),
        "seed": fit(directory / "seed.jsonl", seed=1),
        "cancel": fit(directory / "cancel.jsonl", seed=0, cbs=(CancelBatchAt(1, 2),)),
        "short": fit(directory / "short.jsonl", seed=0, n_epochs=N_EPOCHS - 1),
    }
    return {name: (directory / f"{name}.jsonl", *fit) for name, fit in fits.items()}


class TestIdenticalRuns:
    def test_same_seed_same_everything(self, logs, capsys):
        """Two fits with one seed: exit 0, no header field differs, paths and metrics equal."""
        a, b = logs["base"][0], logs["same"][0]
        code, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert code == 0
        assert found["header_differences"] == []
        assert (found["table_same"], found["paths_identical"], found["identical"]) == (
            True,
            True,
            True,
        )
        assert found["first_difference"] is None
        assert found["metrics"] == expected_metrics(a, b)
        assert {m["diff"] for m in found["metrics"]} == {0.0}
        assert len(found["metrics"]) == sum(len(n) - 1 for n in metric_notes(a).values())

    def test_what_the_left_out_fields_hide(self, logs, capsys):
        """Only wall (and prev) differ between the raw headers: the diff leaves them out."""
        a, b = logs["base"][0], logs["same"][0]
        raw_a, raw_b = header(a), header(b)
        differ = {k for k in raw_a.keys() | raw_b.keys() if raw_a.get(k) != raw_b.get(k)}
        assert differ == {"run", "wall"}
        _, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert found["left_out"] == ["wall", "prev"]

    def test_text_report(self, logs, capsys):
        """The text says what was compared, and ends with the verdict."""
        a, b = logs["base"][0], logs["same"][0]
        code, out, err = audit("--diff", str(a), str(b), capsys=capsys)
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith(f"a: {a}  run {header(a)['run']}  fit  completed  verified")
        assert lines[1].startswith(f"b: {b}  run {header(b)['run']}  fit  completed  verified")
        assert "header: no field differs (not compared: wall, prev)" in lines
        assert f"path: identical, {len(transitions(a))} transitions" in lines
        values = sum(len(n) - 1 for n in metric_notes(a).values())
        assert f"metrics: {values} values in {2 * N_EPOCHS} passes, all equal" in lines
        assert lines[-1] == "identical paths"


class TestChangedSeed:
    def test_seed_is_the_one_header_difference(self, logs, capsys):
        """Seeds 0 and 1: the header lists seed alone, and the paths are the same (exit 0)."""
        a, b = logs["base"][0], logs["seed"][0]
        code, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        differences = found["header_differences"]
        assert differences[0] == {"field": "seed", "a": 0, "b": 1}
        assert {d["field"] for d in differences[1:]} <= {"rng"}  # the RNG state's digest
        assert (code, found["paths_identical"], found["identical"]) == (0, True, True)

    def test_metric_differences_are_the_notes(self, logs, capsys):
        """Every value is each run's note's, the difference b - a exactly; MetricsCB's history."""
        a, b = logs["base"][0], logs["seed"][0]
        _, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert found["metrics"] == expected_metrics(a, b)
        losses = [m for m in found["metrics"] if m["name"].endswith("_loss")]
        assert all(m["diff"] != 0 for m in losses)
        for side, (_, _, metrics) in (("a", logs["base"]), ("b", logs["seed"])):
            history = {
                (row["epoch"], name.split("_")[0], name): value
                for row in metrics.history
                for name, value in row.items()
                if name != "epoch"
            }
            assert len(history) == 4 * N_EPOCHS  # loss and accuracy, two passes an epoch
            from_diff = {
                (m["epoch"], m["pass"], m["name"]): m[side]
                for m in found["metrics"]
                if m["name"] != "batches"
            }
            assert from_diff == history

    def test_text_names_the_largest_difference(self, logs, capsys):
        """The text lists the values that differ and the largest |b - a| among the floats."""
        a, b = logs["base"][0], logs["seed"][0]
        code, out, _ = audit("--diff", str(a), str(b), capsys=capsys)
        expected = expected_metrics(a, b)
        floats = [m for m in expected if isinstance(m["diff"], float) and m["diff"] != 0]
        largest = max(floats, key=lambda m: abs(m["diff"]))
        line = next(x for x in out.splitlines() if x.startswith("metrics: "))
        assert f"{len(floats)} differ; largest |b - a| {abs(largest['diff']):.6g}" in line
        assert f"({largest['name']}, epoch {largest['epoch']} {largest['pass']})" in line
        assert code == 0


class TestChangedCallback:
    def test_cbs_listed_and_the_first_difference_named(self, logs, capsys):
        """A callback that cancels a batch: cbs listed, the first transition that differs named
        as each run's log has it, and exit 1."""
        a, b = logs["cancel"][0], logs["base"][0]
        code, found = audit_json("--diff", str(b), str(a), capsys=capsys)
        cbs = [[type(cb).__name__, cb.order] for cb in logs["cancel"][1].cbs]
        base_cbs = [[type(cb).__name__, cb.order] for cb in logs["base"][1].cbs]
        assert found["header_differences"] == [{"field": "cbs", "a": base_cbs, "b": cbs}]
        index, step_base, step_cancel = first_step_difference(b, a)
        assert found["first_difference"] == {
            "index": index,
            "a": step_json(step_base),
            "b": step_json(step_cancel),
        }
        cancel = next(cb for cb in logs["cancel"][1].cbs if isinstance(cb, CancelBatchAt))
        assert (step_cancel["ev"], step_cancel["ep"], step_cancel["it"], step_cancel["tr"]) == (
            "cancel_batch",
            cancel.epoch,
            cancel.batch,
            True,
        )
        assert (code, found["paths_identical"], found["identical"]) == (1, False, False)

    def test_metrics_after_the_cancel_differ(self, logs, capsys):
        """The cancelled batch's pass counts one batch fewer; the passes before it are equal."""
        a, b = logs["base"][0], logs["cancel"][0]
        _, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert found["metrics"] == expected_metrics(a, b)
        batches = {
            (m["epoch"], m["pass"]): m["diff"] for m in found["metrics"] if m["name"] == "batches"
        }
        assert batches[1, "train"] == -1
        assert all(m["diff"] == 0 for m in found["metrics"] if m["epoch"] == 0)

    def test_text_report(self, logs, capsys):
        """The text: the callbacks as name and order, where the paths part, the verdict."""
        a, b = logs["base"][0], logs["cancel"][0]
        code, out, _ = audit("--diff", str(a), str(b), capsys=capsys)
        index, step_a, step_b = first_step_difference(a, b)
        assert code == 1
        assert "header: 1 field differs (not compared: wall, prev)" in out
        assert "MetricsCB 20, CancelBatchAt 0" in out
        counts = f"(a has {len(transitions(a))}, b {len(transitions(b))})"
        assert f"path: differs after {index} common transitions {counts}" in out
        rows = [
            [c.strip() for c in x.split("│")[1:-1]] for x in out.splitlines() if x.startswith("│ ")
        ]
        assert ["a", step_a["ev"], f"{step_a['src']} -> {step_a['dst']}", "1", "train", "2"] in rows
        assert ["b", "cancel_batch", f"{step_b['src']} -> epoch", "1", "train", "2"] in rows
        assert out.splitlines()[-1] == "not identical: the paths differ"

    def test_a_shorter_fit(self, logs, capsys):
        """One epoch fewer: n_epochs listed, the shorter ends its fit where the other begins an
        epoch, and the last epoch's values are in the longer run only."""
        a, b = logs["short"][0], logs["base"][0]
        code, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert found["header_differences"] == [
            {"field": "n_epochs", "a": N_EPOCHS - 1, "b": N_EPOCHS}
        ]
        index, step_a, step_b = first_step_difference(a, b)
        assert (step_a["ev"], step_b["ev"]) == ("end_fit", "begin_epoch")
        assert found["first_difference"] == {
            "index": index,
            "a": {
                "trigger": "end_fit",
                "source": "fit",
                "dest": "idle",
                "epoch": step_a["ep"],
                "pass": None,
                "batch": None,
            },
            "b": {
                "trigger": "begin_epoch",
                "source": "fit",
                "dest": "epoch",
                "epoch": N_EPOCHS - 1,
                "pass": "train",
                "batch": None,
            },
        }
        only_b = [m for m in found["metrics"] if "a" not in m]
        assert {m["epoch"] for m in only_b} == {N_EPOCHS - 1}
        assert all(m["diff"] is None and "b" in m for m in only_b)
        assert found["metrics"] == expected_metrics(a, b)
        assert code == 1


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three fits in one log: seed 0, seed 0 again, and seed 0 with a cancelled batch."""
    path = tmp_path_factory.mktemp("shared") / "all.jsonl"
    learners = [
        fit(path, seed=0)[0],
        fit(path, seed=0)[0],
        fit(path, seed=0, cbs=(CancelBatchAt(0, 1),))[0],
    ]
    return path, [learn.run_id for learn in learners]


class TestRunIdsInOneFile:
    def test_two_runs_of_one_file(self, shared, capsys):
        """PATH then --diff RUN RUN: the runs are found by id; the second binds to the first's
        seal (prev), which is left out, so identical set-ups show no header difference."""
        path, ids = shared
        code, found = audit_json(str(path), "--diff", ids[0], ids[1], capsys=capsys)
        assert header(path, ids[0])["prev"] != header(path, ids[1])["prev"]
        assert (found["a"]["run_id"], found["b"]["run_id"]) == (ids[0], ids[1])
        assert (found["a"]["path"], found["b"]["path"]) == (str(path), str(path))
        assert found["header_differences"] == []
        assert (code, found["identical"]) == (0, True)

    def test_the_path_difference_in_one_file(self, shared, capsys):
        """The cancelled batch of the third run, found as in two files."""
        path, ids = shared
        code, found = audit_json(str(path), "--diff", ids[0], ids[2], capsys=capsys)
        difference = found["first_difference"]
        assert (difference["b"]["trigger"], difference["b"]["epoch"], difference["b"]["batch"]) == (
            "cancel_batch",
            0,
            1,
        )
        assert code == 1

    def test_a_directory_of_logs(self, shared, capsys):
        """A directory as PATH: its logs are searched."""
        path, ids = shared
        code, found = audit_json(str(path.parent), "--diff", ids[2], ids[1], capsys=capsys)
        assert (found["a"]["run_id"], found["b"]["run_id"], code) == (ids[2], ids[1], 1)

    def test_a_file_stands_for_its_last_run(self, shared, logs, capsys):
        """Without PATH, a log of several runs stands for its last, and the diff says so."""
        path, ids = shared
        code, found = audit_json("--diff", str(logs["base"][0]), str(path), capsys=capsys)
        assert (found["b"]["run_id"], found["b"]["chosen"]) == (
            ids[2],
            "the last of 3 runs in its file",
        )
        assert found["a"]["chosen"] is None
        assert code == 1
        _, out, _ = audit("--diff", str(logs["base"][0]), str(path), capsys=capsys)
        assert out.splitlines()[1].endswith("  (the last of 3 runs in its file)")


class TestJson:
    def test_shape(self, logs, capsys):
        """One document: both runs, what was left out, the table, header, path and metrics."""
        a, b = logs["base"][0], logs["cancel"][0]
        _, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        assert list(found) == [
            "a",
            "b",
            "left_out",
            "kinds_same",
            "resumes",
            "table_same",
            "header_differences",
            "paths_identical",
            "compared_from",
            "first_difference",
            "metrics",
            "metrics_left_out",
            "identical",
        ]
        assert found["a"] == {
            "path": str(a),
            "run_id": header(a)["run"],
            "rank": 0,
            "kind": "fit",
            "status": "completed",
            "verified": True,
            "problem": None,
            "problems": [],
            "continued_by": None,
            "transitions": len(transitions(a)),
            "chosen": None,
        }
        assert set(found["first_difference"]) == {"index", "a", "b"}
        assert all(set(m) == {"epoch", "pass", "name", "a", "b", "diff"} for m in found["metrics"])

    def test_the_library_gives_the_same(self, logs, capsys):
        """runs_in_files and diff_runs: what the command prints."""
        a, b = logs["base"][0], logs["cancel"][0]
        _, found = audit_json("--diff", str(a), str(b), capsys=capsys)
        diff = diff_runs(*runs_in_files(str(a), str(b), key=None))
        assert orjson.loads(orjson.dumps(diff.to_json())) == found
        by_id = diff_runs(*runs_by_id(header(a)["run"], header(b)["run"], [a, b], key=None))
        assert by_id.to_json() == diff.to_json()


METRIC_ROW = re.compile(r"^[│ ]\s*\d+\s*│?\s*(train|valid)\s")


class TestTextLimits:
    @pytest.mark.parametrize("rich", [True, False], ids=["boxed", "plain"])
    def test_at_most_so_many_rows_of_values(self, logs, rich):
        """Of many differing values the text lists the first METRIC_ROWS_SHOWN, and says so."""
        diff = diff_runs(*runs_in_files(str(logs["base"][0]), str(logs["seed"][0]), key=None))
        differing = [m for m in diff.metrics if m.differs]
        assert differing
        many = attrs.evolve(
            diff, metrics=tuple(differing * (METRIC_ROWS_SHOWN // len(differing) + 2))
        )
        text = render_diff(many, rich=rich)
        rows = [line for line in text.splitlines() if METRIC_ROW.match(line)]
        assert len(rows) == METRIC_ROWS_SHOWN
        assert f"({METRIC_ROWS_SHOWN} of {len(many.metrics)} shown; every value in --json)" in text
        few = render_diff(diff, rich=rich)
        assert len([line for line in few.splitlines() if METRIC_ROW.match(line)]) == len(differing)


class TestRanks:
    def test_the_lowest_rank_of_a_fit_across_ranks(self, tmp_path, capsys):
        """A run id found once per rank's log: its rank 0 log is compared, and the diff says so."""
        for rank in (1, 0):
            data, _ = tiny_run("aaaaaaaaaaaa", rank=rank, header={Field.WORLD_SIZE: 2})
            (tmp_path / f"aaaaaaaaaaaa.rank{rank}.jsonl").write_bytes(data)
        (tmp_path / "bbbbbbbbbbbb.jsonl").write_bytes(tiny_run("bbbbbbbbbbbb")[0])
        code, found = audit_json(
            str(tmp_path), "--diff", "aaaaaaaaaaaa", "bbbbbbbbbbbb", capsys=capsys
        )
        assert found["a"]["path"] == str(tmp_path / "aaaaaaaaaaaa.rank0.jsonl")
        assert found["a"]["rank"] == 0
        assert found["a"]["chosen"].startswith("rank 0's log of a fit across 2 ranks")
        assert found["header_differences"] == [{"field": "world_size", "a": 2}]
        assert (code, found["identical"]) == (0, True)


class TestUsageErrors:
    def test_an_unknown_run_id(self, logs, capsys):
        """Exit 2, naming the id and the runs the logs hold."""
        a = logs["base"][0]
        code, out, err = audit(str(a), "--diff", header(a)["run"], "0123456789ab", capsys=capsys)
        assert (code, out) == (2, "")
        assert (
            f"no run '0123456789ab' in the 1 log(s) given; their runs: {header(a)['run']};" in err
        )

    def test_a_run_id_found_twice(self, logs, tmp_path, capsys):
        """The same run in two logs (a copy): exit 2, both places named."""
        a = logs["base"][0]
        shutil.copy(a, tmp_path / "one.jsonl")
        shutil.copy(a, tmp_path / "two.jsonl")
        run_id = header(a)["run"]
        code, _, err = audit(str(tmp_path), "--diff", run_id, run_id, capsys=capsys)
        assert code == 2
        assert f"run {run_id!r} is found 2 times (" in err
        assert "one.jsonl line 1" in err
        assert "two.jsonl line 1" in err

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--diff", "missing.jsonl", "x"], "missing.jsonl: no such file; without PATH"),
            (
                ["--diff", ".", "x"],
                (
                    ". is a directory, not a log file: give it as PATH with two of its run ids "
                    "(fsm-learner audit . --diff RUN_A RUN_B)"
                ),
            ),
            (["--diff", "", "x"], "'': the empty path names no log"),
            (["", "--diff", "x", "y"], "'': the empty path names no log"),
            (["missing", "--diff", "x", "y"], "missing: no such file or directory"),
            (["--expect-head", "00", "--diff", "x", "y"], "--expect-head goes with the audit"),
        ],
        ids=["missing", "directory", "empty", "empty-path", "missing-path", "head"],
    )
    def test_usage(self, args, message, capsys):
        """Each: exit 2, one line on stderr saying what is wrong."""
        code, out, err = audit(*args, capsys=capsys)
        assert (code, out) == (2, "")
        assert message in err
        assert err.count("\n") == 1

    def test_no_path_and_no_diff(self, capsys):
        """Nothing to audit or compare: argparse's usage error, saying what to give."""
        with pytest.raises(SystemExit) as exc:
            main(["audit"])
        assert exc.value.code == 2
        assert "error: give PATH (the logs to audit" in capsys.readouterr().err

    def test_diff_takes_two(self, capsys):
        """--diff with one argument: argparse's usage error."""
        with pytest.raises(SystemExit) as exc:
            main(["audit", "--diff", "only.jsonl"])
        assert exc.value.code == 2
        assert "--diff: expected 2 arguments" in capsys.readouterr().err

    def test_a_keyed_log_needs_its_key(self, logs, capsys, monkeypatch):
        """--key-env names an unset variable: a usage error, as in the audit."""
        monkeypatch.delenv("NO_SUCH_KEY", raising=False)
        a = str(logs["base"][0])
        code, _, err = audit("--diff", a, a, "--key-env", "NO_SUCH_KEY", capsys=capsys)
        assert code == 2
        assert "'NO_SUCH_KEY' is not set" in err


def edited(path: Path, old: bytes, new: bytes) -> bytes:
    data = path.read_bytes()
    assert data.count(old) == 1, old
    return data.replace(old, new)


class TestUntrusted:
    def test_a_tampered_log(self, logs, tmp_path, capsys):
        """A loss edited in b's log: b does not verify, the problem is named, exit 1; what it
        says is still shown."""
        a = logs["base"][0]
        note = metric_notes(a)[1, "valid"]
        old = orjson.dumps(note["valid_loss"])
        forged = tmp_path / "forged.jsonl"
        forged.write_bytes(edited(a, b'"valid_loss":' + old, b'"valid_loss":' + b"1.5"))
        code, found = audit_json("--diff", str(a), str(forged), capsys=capsys)
        assert code == 1
        assert (found["a"]["verified"], found["b"]["verified"], found["identical"]) == (
            True,
            False,
            False,
        )
        assert "the seal does not match the lines" in found["b"]["problem"]["reason"]
        assert found["paths_identical"] is True
        [changed] = [m for m in found["metrics"] if m["diff"] != 0]
        assert (changed["name"], changed["a"], changed["b"]) == (
            "valid_loss",
            note["valid_loss"],
            1.5,
        )
        code, out, err = audit("--diff", str(a), str(forged), capsys=capsys)
        assert code == 1
        assert out.splitlines()[1].startswith(f"b: {forged}  run ")
        assert "  DOES NOT VERIFY" in out.splitlines()[1]
        assert out.splitlines()[2].startswith(f"   problem: {forged}:")
        assert out.splitlines()[-1] == (
            "not identical: run b does not verify, so the diff cannot be trusted"
        )
        assert "the seal does not match the lines" in err

    @pytest.mark.unchecked_records("a header field named with an ANSI escape")
    def test_another_table(self, logs, tmp_path, capsys):
        """A run whose header names another table (resealed, so that is its only problem): the
        tables differ, the paths are not compared, and what the log holds is shown inert."""
        a = logs["base"][0]
        digest = header(a)["table"]
        other = "0" * 32
        data = edited(
            a, f'"table":"{digest}"'.encode(), f'"table":"{other}","\\u001b[2J":1'.encode()
        )
        moved = tmp_path / "moved.jsonl"
        moved.write_bytes(reseal(data))
        code, found = audit_json("--diff", str(a), str(moved), capsys=capsys)
        assert code == 1
        assert "written by a machine whose table digest is" in found["b"]["problem"]["reason"]
        assert (found["table_same"], found["paths_identical"], found["first_difference"]) == (
            False,
            None,
            None,
        )
        assert found["header_differences"] == [
            {"field": "table", "a": digest, "b": other},
            {"field": "\x1b[2J", "b": 1},
        ]
        code, out, _ = audit("--diff", str(a), str(moved), capsys=capsys)
        assert f"table: differs (a {digest}, b {other}): runs of different machines" in out
        assert "path: not compared" in out
        assert "\\x1b[2J" in out
        assert "\x1b" not in out
        assert code == 1


NO_TORCH = """
import contextlib, io, json, sys
from fsm_learner.cli import main

with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


class TestWithoutTorch:
    @pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
    def test_a_diff_imports_no_torch(self, logs, json_out):
        """In a fresh interpreter, a diff of two real logs never imports torch."""
        args = ["audit", "--diff", str(logs["base"][0]), str(logs["cancel"][0])]
        done = subprocess.run(
            [sys.executable, "-c", NO_TORCH, *args, *(["--json"] if json_out else [])],
            capture_output=True,
            timeout=60,
            check=True,
        )
        assert orjson.loads(done.stdout) == {"code": 1, "torch": False}, done.stderr


class TestReproducibilityHeader:
    """The header fields a reproducibility diff reads, from real fits."""

    def test_seed_is_torch_initial_seed(self, tmp_path):
        """After torch.manual_seed(n), the header's seed is n: each fit's own, not the first's."""
        for seed in (1234, 99):
            log = tmp_path / f"{seed}.jsonl"
            fit(log, seed=seed)
            assert header(log)["seed"] == seed == torch.initial_seed()

    @pytest.mark.parametrize(("warn_only", "expected"), [(False, True), (True, "warn")])
    def test_deterministic_algorithms(self, warn_only, expected, tmp_path):
        """torch.use_deterministic_algorithms(True) is recorded: true, or "warn" with warn_only."""
        before = torch.are_deterministic_algorithms_enabled()
        before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            fit(tmp_path / "on.jsonl", n_epochs=1)
        finally:
            torch.use_deterministic_algorithms(before, warn_only=before_warn)
        fit(tmp_path / "off.jsonl", n_epochs=1)
        assert header(tmp_path / "on.jsonl")["deterministic"] == expected
        assert header(tmp_path / "off.jsonl")["deterministic"] is before

    def test_cublas_workspace_config(self, tmp_path, monkeypatch):
        """CUBLAS_WORKSPACE_CONFIG as the environment holds it at the fit; null when unset."""
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        fit(tmp_path / "set.jsonl", n_epochs=1)
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        fit(tmp_path / "unset.jsonl", n_epochs=1)
        assert header(tmp_path / "set.jsonl")["cublas_workspace_config"] == ":4096:8"
        assert header(tmp_path / "unset.jsonl")["cublas_workspace_config"] is None

    def test_threads(self, tmp_path):
        """[intra-op, inter-op] threads at the fit."""
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(before + 1)
            fit(tmp_path / "more.jsonl", n_epochs=1)
        finally:
            torch.set_num_threads(before)
        interop = torch.get_num_interop_threads()
        assert header(tmp_path / "more.jsonl")["threads"] == [before + 1, interop]

    def test_the_diff_lists_each_that_differs(self, tmp_path, monkeypatch, capsys):
        """Deterministic algorithms, the cuBLAS workspace and the threads changed between two
        fits of one seed: the diff lists exactly those, and the paths are the same."""
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        fit(tmp_path / "plain.jsonl", n_epochs=1)
        before = torch.get_num_threads()
        assert not torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        try:
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(before + 1)
            fit(tmp_path / "strict.jsonl", n_epochs=1)
        finally:
            torch.use_deterministic_algorithms(False)
            torch.set_num_threads(before)
        code, found = audit_json(
            "--diff", str(tmp_path / "plain.jsonl"), str(tmp_path / "strict.jsonl"), capsys=capsys
        )
        interop = torch.get_num_interop_threads()
        assert found["header_differences"] == [
            {"field": "deterministic", "a": False, "b": True},
            {"field": "cublas_workspace_config", "a": None, "b": ":16:8"},
            {"field": "threads", "a": [before, interop], "b": [before + 1, interop]},
        ]
        assert (code, found["paths_identical"]) == (0, True)


def tiny_fit(run_id: str, **header: Any) -> bytes:
    """A tiny fit's sealed bytes, with ``header`` fields besides the usual ones."""
    return tiny_run(run_id, header={Field.KIND: "fit", **header})[0]


class TestTheAuditsVerdict:
    """The diff never vouches for a run that fsm-learner audit of the same files fails."""

    @pytest.mark.unchecked_records("a malformed resumed_from, as a forger writes it")
    @pytest.mark.parametrize("resumed_from", ["bogus", {}], ids=["string", "empty"])
    def test_a_malformed_resumed_from(self, tmp_path, resumed_from, capsys):
        """A run whose header's resumed_from is malformed: the audit fails it, so does the diff
        of the file with itself, naming the audit's problem."""
        log = tmp_path / "run.jsonl"
        log.write_bytes(tiny_fit("aaaaaaaaaaaa", resumed_from=resumed_from))
        code, _, audit_err = audit(str(log), capsys=capsys)
        assert code == 1
        code, out, err = audit("--diff", str(log), str(log), capsys=capsys)
        assert code == 1
        assert "header field 'resumed_from'" in err
        assert "header field 'resumed_from'" in audit_err
        assert out.splitlines()[-1] == (
            "not identical: run a and run b do not verify, so the diff cannot be trusted"
        )

    def test_a_link_to_a_seal_its_parent_never_had(self, tmp_path, capsys):
        """A child in its parent's file, resuming it at a seal it never had: the run verifies
        on its own, but its lineage does not; the diff says so, as the audit does."""
        parent, head = tiny_run("parent000000", header={Field.KIND: "fit"})
        link = {
            "run": "parent000000",
            "records": 2,
            "head": "ab" * 16,
            "sha256": "cd" * 32,
            "path": "ck.pt",
            "at": {"ep": 0, "tr": True, "it": 0},
        }
        child, _ = tiny_run(
            "child0000000", prev=head, header={Field.KIND: "fit", Field.RESUMED_FROM: link}
        )
        log = tmp_path / "both.jsonl"
        log.write_bytes(parent + child)
        assert audit(str(log), capsys=capsys)[0] == 1
        code, found = audit_json(str(log), "--diff", "child0000000", "child0000000", capsys=capsys)
        assert (code, found["identical"], found["b"]["verified"]) == (1, False, False)
        assert "which is no seal of run 'parent000000'" in found["b"]["problem"]["reason"]
        code, out, err = audit(str(log), "--diff", "child0000000", "child0000000", capsys=capsys)
        assert code == 1
        assert "which is no seal of run 'parent000000'" in err
        assert "not identical: run a and run b do not verify" in out

    def test_one_file_given_twice_is_audited_once(self, logs, capsys):
        """The same log as A and B: its run is not taken for a run id found twice."""
        a = str(logs["base"][0])
        code, found = audit_json("--diff", a, a, capsys=capsys)
        assert (code, found["identical"], found["a"]["problems"]) == (0, True, [])


BIG = 18446744073709551615  # 2**64 - 1: a uint64, beyond JSON parsers' int64


class TestNumbers:
    """Every number is written: NaN and the infinities as the log writes them, big ints as text."""

    def test_a_metric_beyond_int64(self, logs, tmp_path, capsys):
        """--json of a metric value of 2**64 - 1 against a small one: no crash; the value and
        b - a written as their digits."""
        a = logs["base"][0]
        batches = metric_notes(a)[0, "train"]["batches"]
        forged = tmp_path / "big.jsonl"
        old = f'"batches":{batches}'.encode()
        data = a.read_bytes().replace(old, f'"batches":{BIG}'.encode(), 1)
        forged.write_bytes(reseal(data))
        code, found = audit_json("--diff", str(a), str(forged), capsys=capsys)
        [changed] = [m for m in found["metrics"] if m["diff"] not in (0, 0.0)]
        assert changed == {
            "epoch": 0,
            "pass": "train",
            "name": "batches",
            "a": batches,
            "b": str(BIG),
            "diff": str(BIG - batches),
        }
        assert code == 1  # b is a copy of a's run: one run id twice
        code, out, _ = audit("--diff", str(forged), str(a), capsys=capsys)
        assert "1.84467e+19" in out
        assert "-1.84467e+19" in out

    def test_a_header_beyond_int64(self, tmp_path, capsys):
        """A seed of 2**64 - 1 (torch.initial_seed() can be): the header difference is written."""
        (tmp_path / "a.jsonl").write_bytes(tiny_fit("aaaaaaaaaaaa", seed=BIG))
        (tmp_path / "b.jsonl").write_bytes(tiny_fit("bbbbbbbbbbbb", seed=0))
        code, found = audit_json(
            "--diff", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), capsys=capsys
        )
        assert found["header_differences"] == [{"field": "seed", "a": str(BIG), "b": 0}]
        assert code == 0

    @pytest.mark.parametrize(
        ("a", "b", "diff", "differs"),
        [
            (BIG, 1.5, -math.inf, True),  # past a float's range? no: 2**64 is a float
            (10**400, 1.5, -math.inf, True),
            (-(10**400), 10**400, 2 * 10**400, True),
            (math.inf, math.inf, None, False),  # inf - inf: NaN
            (math.nan, math.nan, None, False),
            (math.inf, 10**400, None, True),
        ],
        ids=["uint64-float", "huge-float", "huge-ints", "inf", "nan", "inf-huge"],
    )
    def test_differences_of_any_numbers(self, a, b, diff, differs):
        """b - a never raises: exact for two ints, else floats (a huge int an infinity)."""
        metric = MetricDifference(0, Pass.TRAIN, "loss", a, b)
        assert metric.differs is differs
        got = metric.diff
        if diff is None:
            assert math.isnan(got)
        elif isinstance(diff, int):
            assert got == diff
        else:
            assert got == pytest.approx(b - float(a)) if a == BIG else got == diff
        orjson.dumps(metric.to_json())


class TestKinds:
    def test_a_fit_against_a_validate_run(self, tmp_path, capsys):
        """fit then validate in one log: the kinds are said at the top, no metric is compared
        (a validate run's one pass is not a fit's epoch 0), and they are never identical."""
        log = tmp_path / "both.jsonl"
        learn, _ = fit(log, n_epochs=2)
        learn.validate()
        fit_id, validate_id = (r["run"] for r in records(log) if r["ev"] == "run_start")
        code, found = audit_json(str(log), "--diff", fit_id, validate_id, capsys=capsys)
        assert (found["a"]["kind"], found["b"]["kind"]) == ("fit", "validate")
        assert (found["kinds_same"], found["metrics"], found["identical"]) == (False, [], False)
        assert code == 1
        code, out, _ = audit(str(log), "--diff", fit_id, validate_id, capsys=capsys)
        assert out.splitlines()[2] == (
            "KINDS DIFFER: a is a fit, b a validate run: their passes are not comparable "
            "(metrics not compared)"
        )
        assert "metrics: not compared (the runs are of different kinds)" in out
        assert out.splitlines()[-1] == "not identical: a is a fit, b a validate run"


def checkpointed_fit(log: Path, directory: Path, *cbs: Callback, resume_from: Path | None = None):
    """fit() of the MLP with a checkpoint every 2 batches; resumed from ``resume_from``."""
    learn = Learner(
        mlp(0),
        digits_dls(64, 320, 128),
        F.cross_entropy,
        0.1,
        [MetricsCB(), CheckpointCB(directory, 2, 1, keep=None), *cbs],
        audit_log=log,
    )
    learn.fit(N_EPOCHS, resume_from=resume_from)
    return learn


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """A whole fit, a fit resumed from its checkpoint after 3 batches of epoch 1's training
    pass, and one resumed there that cancels the batch after the next: their logs, a's id."""
    directory = tmp_path_factory.mktemp("resumed")
    whole = checkpointed_fit(directory / "whole.jsonl", directory / "ck")
    [checkpoint] = (directory / "ck").glob(f"ckpt_e0001_train_b000003_{whole.run_id}.pt")
    checkpointed_fit(directory / "resumed.jsonl", directory / "ck2", resume_from=checkpoint)
    checkpointed_fit(
        directory / "cancel.jsonl", directory / "ck3", CancelBatchAt(1, 4), resume_from=checkpoint
    )
    return (
        directory / "whole.jsonl",
        directory / "resumed.jsonl",
        directory / "cancel.jsonl",
        (whole.run_id),
    )


class TestResumed:
    def test_identical_from_the_resume_point(self, resumed, capsys):
        """b resumes a at epoch 1, train batch 3: said, and both paths compared from there;
        identical, so exit 0; metrics of the passes both have."""
        whole, again, _, run_id = resumed
        code, found = audit_json("--diff", str(whole), str(again), capsys=capsys)
        assert found["resumes"] == [
            {"run": "b", "resumes": run_id, "at": {"ep": 1, "tr": True, "it": 3}}
        ]
        start_a, start_b = found["compared_from"]
        steps_a, steps_b = transitions(whole), transitions(again)
        assert [s["ev"] for s in steps_b[:start_b]] == ["begin_fit", "begin_epoch"]
        assert (steps_a[start_a]["ev"], steps_a[start_a]["ep"], steps_a[start_a]["it"]) == (
            "begin_batch",
            1,
            3,
        )
        assert len(steps_a) - start_a == len(steps_b) - start_b
        assert {(m["epoch"], m["pass"]) for m in found["metrics"]} == {
            (epoch, name) for epoch in range(1, N_EPOCHS) for name in ("train", "valid")
        }
        assert (code, found["paths_identical"], found["identical"]) == (0, True, True)
        code, out, _ = audit("--diff", str(whole), str(again), capsys=capsys)
        assert (
            f"b resumes run {run_id} at epoch 1, train batch 3: its path begins there; compare "
            "the lineage's runs with `fsm-learner audit DIR`"
        ) in out
        assert out.splitlines()[-1] == "identical from the resume point"
        assert code == 0

    def test_by_ids_with_the_lineage(self, resumed, capsys):
        """Both logs as PATH: the lineage is audited too, and verifies."""
        whole, again, _, run_id = resumed
        other = header(again)["run"]
        code, found = audit_json(str(whole), str(again), "--diff", other, run_id, capsys=capsys)
        assert found["resumes"][0]["run"] == "a"
        assert (code, found["identical"]) == (0, True)

    def test_a_difference_after_the_resume_point(self, resumed, capsys):
        """A batch cancelled after the resume point: where the paths part, counted from it."""
        whole, _, cancel, _ = resumed
        code, found = audit_json("--diff", str(whole), str(cancel), capsys=capsys)
        difference = found["first_difference"]
        assert (difference["b"]["trigger"], difference["b"]["epoch"], difference["b"]["batch"]) == (
            "cancel_batch",
            1,
            4,
        )
        start_a, start_b = found["compared_from"]
        index = difference["index"]
        assert index > 0
        assert transitions(whole)[start_a + index]["ev"] == difference["a"]["trigger"]
        assert transitions(cancel)[start_b + index]["ev"] == "cancel_batch"
        assert code == 1
        _, out, _ = audit("--diff", str(whole), str(cancel), capsys=capsys)
        assert out.splitlines()[-1] == "not identical: the paths differ from the resume point"


class TestExitCodes:
    @pytest.mark.parametrize("content", [b"", b"hello\n"], ids=["empty", "not-json"])
    def test_a_log_of_no_run_fails(self, logs, tmp_path, content, capsys):
        """A file that exists but holds no run: exit 1 (a check failed), as its audit."""
        empty = tmp_path / "none.jsonl"
        empty.write_bytes(content)
        assert audit(str(empty), capsys=capsys)[0] == 1
        code, out, err = audit("--diff", str(empty), str(logs["base"][0]), capsys=capsys)
        assert (code, out) == (1, "")
        assert "none.jsonl holds no run to compare" in err


class TestHeaderText:
    def diff_with(self, logs, *header: HeaderDifference):
        diff = diff_runs(*runs_in_files(str(logs["base"][0]), str(logs["same"][0]), key=None))
        return attrs.evolve(diff, header=header)

    def test_nested_fields_by_their_leaves(self, logs):
        """An object or list field that differs: a row per leaf that differs, named by its path
        (3 levels deep at most, then the value as a whole)."""
        a = {"torch": "0123", "numpy": "same", "groups": [{"lr": 0.1, "betas": [0.9, 0.99]}]}
        b = {"torch": "4567", "numpy": "same", "groups": [{"lr": 0.2, "betas": [0.9, 0.999]}]}
        text = render_diff(self.diff_with(logs, HeaderDifference("rng", a, b)), rich=False)
        rows = [line.split() for line in text.splitlines()]
        names = [row[0] for row in rows if row and row[0].startswith("rng")]
        assert names == ["rng.torch", "rng.groups[0].lr", "rng.groups[0].betas"]  # 3 deep
        assert "[0.9, 0.99]" in text

    def test_at_most_so_many_rows(self, logs):
        """A list of many differing values: HEADER_ROWS_SHOWN rows, and a line saying so."""
        many = HeaderDifference("many", list(range(100)), list(range(1, 101)))
        text = render_diff(self.diff_with(logs, many), rich=False)
        assert len([line for line in text.splitlines() if line.strip().startswith("many[")]) == (
            HEADER_ROWS_SHOWN
        )
        assert f"({HEADER_ROWS_SHOWN} of 100 shown; every field in --json)" in text


class TestMetricsBounded:
    def test_values_beyond_the_limit_are_counted(self, logs, monkeypatch):
        """At most METRIC_VALUES_KEPT values of a run are kept, the first passes'."""
        monkeypatch.setattr(diff_module, "METRIC_VALUES_KEPT", 4)
        diff = diff_runs(*runs_in_files(str(logs["base"][0]), str(logs["short"][0]), key=None))
        assert len(diff.metrics) == 4
        total = sum(len(fields) - 1 for fields in metric_notes(logs["base"][0]).values())
        total += sum(len(fields) - 1 for fields in metric_notes(logs["short"][0]).values())
        assert diff.metrics_left_out == total - 8
