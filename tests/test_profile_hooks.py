"""Learner(profile_hooks=True): time per (callback, hook) in hook_times notes, and in the audit.

The durations asserted are lower bounds (a hook that sleeps took at least its sleeps) and
orders far apart (a hook sleeping 5 ms a batch against hooks doing nothing); everything
else is counted exactly: notes, rows, calls.
"""

from __future__ import annotations

import inspect
import re
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch.nn.functional as F
from audit_logs import header_line, reseal, seal_blocks
from helpers import Boom, batches_dls, digits_dls, mlp, raising_learner, run_records

from callbacks import MetricsCB
from fsm_learner import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    ConfigurationError,
    Hook,
    IllegalCancelError,
    Learner,
    RunStatus,
    Trigger,
)
from fsm_learner.audit.codec import MAX_NOTE_BYTES, Encoder, Field
from fsm_learner.audit.replay import MAX_HOOK_TIMES_KEPT, RunReport, audit_file
from fsm_learner.audit.summary import render_report
from fsm_learner.cli import main

SLEEP_S = 0.005
"""What Sleepy's after_batch sleeps: 5 ms a batch, against hooks that do nothing."""
TRAIN_BATCHES, VALID_BATCHES = 5, 2
"""digits_dls(64, 320, 128): five training batches of 64 digits, two validation batches."""


class Sleepy(Callback):
    """Sleeps SLEEP_S in every after_batch: by far the slowest hook of its fits."""

    def after_batch(self, learn: Learner) -> None:
        time.sleep(SLEEP_S)


class Tick(Callback):
    """Does nothing in before_batch and after_batch, nor at the fit's end (after, cleanup)."""

    def before_batch(self, learn: Learner) -> None:
        pass

    def after_batch(self, learn: Learner) -> None:
        pass

    def after_fit(self, learn: Learner) -> None:
        pass

    def cleanup_fit(self, learn: Learner) -> None:
        pass


class Quiet(Callback):
    """Implements no hook: it is in learn.cbs, but in no route."""


class FailsThirdBatch(Callback):
    """Raises Boom in the third after_batch; does nothing in after_fail."""

    def __init__(self) -> None:
        self.batches = 0

    def after_batch(self, learn: Learner) -> None:
        self.batches += 1
        if self.batches == 3:
            raise Boom

    def after_fail(self, learn: Learner) -> None:
        pass


Key = tuple[str, int, str]


def hook_notes(learn: Learner) -> list[dict[str, Any]]:
    """The hook_times notes of the learner's last run, in log order."""
    return [r for r in run_records(learn) if r["ev"] == "note" and r["name"] == "hook_times"]


def rows_of(note: dict[str, Any]) -> dict[Key, tuple[int, int]]:
    """A note's rows: (callback, index, hook) -> (calls, ns)."""
    return {(name, index, hook): (calls, ns) for name, index, hook, calls, ns in note["hooks"]}


def calls_of(note: dict[str, Any]) -> dict[Key, int]:
    return {key: calls for key, (calls, _) in rows_of(note).items()}


def summed(notes: list[dict[str, Any]]) -> dict[Key, tuple[int, int]]:
    """What the notes add up to, per (callback, index, hook)."""
    calls: Counter[Key] = Counter()
    spent: Counter[Key] = Counter()
    for note in notes:
        for key, (n, ns) in rows_of(note).items():
            calls[key] += n
            spent[key] += ns
    return {key: (calls[key], spent[key]) for key in calls}


def the_report(learn: Learner) -> RunReport:
    """The audit's report of the learner's last run."""
    reports, problem = audit_file(learn.audit_path)
    assert problem is None
    [report] = [r for r in reports if r.run_id == learn.run_id]
    return report


def routes_of(learn: Learner) -> list[Any]:
    """Every compiled route of the learner's last run (the claim is about these objects)."""
    compiled = learn._compiled.values()
    return [route for routes in compiled for node in routes.values() for route in node.values()]


def dispatch_of(learn: Learner) -> Any:
    return learn._dispatch  # what the routes were compiled from


def hook_function(cb: Callback, hook: str) -> Any:
    return getattr(type(cb), hook)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> tuple[Learner, list[dict[str, Any]]]:
    """Two epochs on digits with MetricsCB, Sleepy and Tick, profiled; and its notes."""
    logs = tmp_path_factory.mktemp("profiled")
    cbs = [MetricsCB(), Sleepy(), Tick()]
    dls = digits_dls(64, n_train=64 * TRAIN_BATCHES, n_valid=64 * VALID_BATCHES)
    learn = Learner(mlp(), dls, F.cross_entropy, 0.1, cbs, audit_log=logs, profile_hooks=True)
    learn.fit(2)
    return learn, hook_notes(learn)


class TestTheNotes:
    def test_one_note_per_pass_then_one_at_the_end(self, profiled):
        """After each pass's end_epoch, then after end_fit for the fit's last hooks."""
        learn, notes = profiled
        assert [(n["ep"], n["tr"]) for n in notes] == [
            (0, True),
            (0, False),
            (1, True),
            (1, False),
            (1, False),
        ]
        records = run_records(learn)
        before = [
            next(r for r in reversed(records[: records.index(note)]) if r["ev"] != "note")
            for note in notes
        ]
        assert [r["ev"] for r in before] == [*["end_epoch"] * 4, "end_fit"]
        assert records[records.index(notes[-1]) + 1]["ev"] == "run_end"
        assert set(rows_of(notes[-1])) == {("Tick", 2, "after_fit"), ("Tick", 2, "cleanup_fit")}

    def test_calls_are_the_hooks_calls_in_that_pass(self, profiled):
        """Per pass: a batch hook once a batch, a pass hook once, before_fit in the first."""
        _, notes = profiled
        for note, batches in zip(notes, [TRAIN_BATCHES, VALID_BATCHES] * 2, strict=False):
            calls = calls_of(note)
            assert {key: n for key, n in calls.items() if key[0] != "MetricsCB"} == {
                ("Sleepy", 1, "after_batch"): batches,
                ("Tick", 2, "before_batch"): batches,
                ("Tick", 2, "after_batch"): batches,
            }
            assert calls["MetricsCB", 0, "after_batch"] == batches
            assert (
                calls["MetricsCB", 0, "before_epoch"] == calls["MetricsCB", 0, "after_epoch"] == 1
            )
        assert [("MetricsCB", 0, "before_fit") in calls_of(note) for note in notes] == [
            True,
            *[False] * 4,
        ]

    def test_a_sleeping_hook_took_at_least_its_sleeps(self, profiled):
        """Sleepy's after_batch: at least calls x 5 ms in every note (a lower bound)."""
        _, notes = profiled
        for note in notes[:4]:
            calls, ns = rows_of(note)["Sleepy", 1, "after_batch"]
            assert ns >= calls * SLEEP_S * 1e9

    def test_the_audit_adds_the_notes_up(self, profiled):
        """The report holds the sums of the notes; the run verifies; Sleepy comes first."""
        learn, notes = profiled
        report = the_report(learn)
        assert report.verified
        assert report.hook_times == summed(notes)
        assert report.hook_times_left_out == 0
        first = report.to_json()["hook_times"][0]
        calls = 2 * (TRAIN_BATCHES + VALID_BATCHES)
        assert (first["callback"], first["index"], first["hook"], first["calls"]) == (
            "Sleepy",
            1,
            "after_batch",
            calls,
        )

    def test_the_audit_text_and_json(self, profiled, capsys):
        """`fsm-learner audit` has a time-per-callback table led by Sleepy; --json the rows."""
        learn, notes = profiled
        assert main(["audit", str(learn.audit_path)]) == 0
        text = capsys.readouterr().out
        table = text[text.index("time per callback") : text.index("slowest transitions")]
        names = ("Sleepy", "MetricsCB", "Tick")
        rows = [line for line in table.splitlines() if any(name in line for name in names)]
        assert len(rows) == len(summed(notes))
        assert "Sleepy" in rows[0]
        assert "after_batch" in rows[0]
        assert main(["audit", "--json", str(learn.audit_path)]) == 0
        [run] = orjson.loads(capsys.readouterr().out)["runs"]
        got = {
            (r["callback"], r["index"], r["hook"]): (r["calls"], r["ns"]) for r in run["hook_times"]
        }
        assert got == summed(notes)
        assert run["hook_times_left_out"] == 0

    def test_an_inference_run_notes_its_pass(self):
        """validate(): one pass, one note, its batch hooks counted."""
        learn = Learner(
            mlp(), batches_dls(2, 3), F.cross_entropy, 0.1, [Tick()], profile_hooks=True
        )
        learn.validate()
        [note] = hook_notes(learn)
        assert calls_of(note) == {("Tick", 0, "before_batch"): 3, ("Tick", 0, "after_batch"): 3}
        assert the_report(learn).verified


class TestOff:
    def test_off_by_default_no_note(self):
        """Without the option, no hook_times note and no table."""
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Tick(), Sleepy()])
        learn.fit(1)
        assert learn.profile_hooks is False
        assert hook_notes(learn) == []
        report = the_report(learn)
        assert report.hook_times == {}
        assert "time per callback" not in render_report(report)

    def test_off_the_routes_run_the_bound_hooks_themselves(self):
        """Each route's calls are the dispatch's own tuple of bound methods: nothing wraps them."""
        cbs = [MetricsCB(), Tick(), Sleepy()]
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, cbs, profile_hooks=False)
        learn.fit(1)
        hooks = dispatch_of(learn).hooks
        routes = routes_of(learn)
        assert routes
        for route in routes:
            if route.trigger is not Trigger.FAIL:
                assert route.calls is hooks[route.hook]
            for cb, call in route.calls:
                assert type(call) is types.MethodType
                assert (call.__self__, call.__func__) == (cb, hook_function(cb, route.hook))
            for hook, cb, call in route.cleanups:
                assert type(call) is types.MethodType
                assert (call.__self__, call.__func__) == (cb, hook_function(cb, hook))

    def test_on_every_hook_call_is_timed_once_per_callback_and_hook(self):
        """Profiled, each call wraps its bound hook; one wrapper per (callback, hook), shared."""
        cbs = [MetricsCB(), Tick(), Sleepy()]
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, cbs, profile_hooks=True)
        learn.fit(1)
        wrappers: dict[tuple[int, str], set[int]] = {}
        calls = [
            (route.hook, cb, call) for route in routes_of(learn) for cb, call in route.calls
        ] + [item for route in routes_of(learn) for item in route.cleanups]
        assert calls
        for hook, cb, call in calls:
            assert type(call) is not types.MethodType
            assert call.__wrapped__ == getattr(cb, hook)
            wrappers.setdefault((id(cb), hook), set()).add(id(call))
        assert all(len(ids) == 1 for ids in wrappers.values())

    @pytest.mark.parametrize("value", [1, "yes", None])
    def test_the_option_is_checked(self, value):
        """True or False only, at construction and when set."""
        message = f"profile_hooks must be True or False, got {value!r}"
        if value is None:
            message = "profile_hooks must be True or False, got a NoneType"
        with pytest.raises(ConfigurationError, match=message):
            Learner(mlp(), batches_dls(1, 1), F.cross_entropy, profile_hooks=value)
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match=message):
            learn.profile_hooks = value
        assert learn.profile_hooks is False

    def test_turned_on_and_off_between_fits(self):
        """The option takes effect at the next run, both ways (the routes are recompiled)."""
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [Tick()])
        noted = []
        for profile in (False, True, True, False):
            learn.profile_hooks = profile
            learn.fit(1)
            noted.append(len(hook_notes(learn)))
        assert noted == [0, 3, 3, 0]  # two passes, then after_fit and cleanup_fit


class TestCallbacksByIndex:
    def test_two_of_one_class_stay_apart(self):
        """Two Ticks: one row each per hook, by their index in learn.cbs."""
        cbs = [Tick(), Sleepy(), Tick()]
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, profile_hooks=True)
        learn.fit(1)
        total = summed(hook_notes(learn))
        for index in (0, 2):
            assert total["Tick", index, "before_batch"][0] == 5
            assert total["Tick", index, "after_fit"][0] == 1
        report = the_report(learn)
        assert report.verified
        assert report.hook_times == total

    def test_the_index_follows_the_list(self):
        """A callback moved in learn.cbs is named by its new place (the header's cbs agree)."""
        tick = Tick()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Quiet(), tick])
        learn.profile_hooks = True
        indices = []
        for cbs in ([Quiet(), tick], [tick, Quiet()]):
            learn.cbs = cbs
            learn.fit(1)
            indices.append({index for _, index, _ in summed(hook_notes(learn))})
            assert the_report(learn).verified
        assert indices == [{1}, {0}]


class TestFailurePath:
    def fit(self, *, profile: bool) -> tuple[Learner, BaseException]:
        cbs = [Tick(), FailsThirdBatch()]
        learn = Learner(mlp(), batches_dls(4, 1), F.cross_entropy, 0.1, cbs, profile_hooks=profile)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        return learn, info.value

    def test_the_times_so_far_in_a_log_that_verifies(self):
        """A hook raising: the last note, before run_end, has every call made, its own included."""
        learn, _ = self.fit(profile=True)
        report = the_report(learn)
        assert (report.verified, report.status) == (True, RunStatus.FAILED)
        records = run_records(learn)
        last = hook_notes(learn)[-1]
        assert records[records.index(last) + 1]["ev"] == "run_end"
        assert records[records.index(last) - 1]["ev"] == "fail"
        assert {key: calls for key, (calls, _) in summed(hook_notes(learn)).items()} == {
            ("Tick", 0, "before_batch"): 3,
            ("Tick", 0, "after_batch"): 3,
            ("FailsThirdBatch", 1, "after_batch"): 3,
            ("FailsThirdBatch", 1, "after_fail"): 1,
            ("Tick", 0, "cleanup_fit"): 1,
        }

    def test_the_failure_is_told_as_without_profiling(self):
        """Where it failed (state, hook, callback) and the exception's first note: the same."""
        told = []
        for profile in (False, True):
            learn, exc = self.fit(profile=profile)
            failure = learn.failure
            assert failure is not None
            told.append((failure.state, failure.hook, type(failure.callback), exc.__notes__[0]))
            assert failure.exception is exc
        assert told[0] == told[1]
        assert told[0][1:3] == (Hook.AFTER_BATCH, FailsThirdBatch)


CANCEL_PLANS = [
    pytest.param({(Hook.AFTER_LOSS, 1): CancelBatchException}, id="batch"),
    pytest.param({(Hook.AFTER_BATCH, 2): CancelEpochException}, id="epoch"),
    pytest.param({(Hook.BEFORE_EPOCH, 2): CancelFitException}, id="fit"),
    pytest.param({(Hook.CLEANUP_BATCH, 1): CancelBatchException}, id="illegal-in-a-cleanup"),
    pytest.param({(Hook.BEFORE_FIT, 1): CancelBatchException}, id="illegal-in-before_fit"),
]


class TestCancels:
    def run(self, plan, *, profile: bool) -> tuple[object, ...]:
        """Fit with the plan; return the trace, how it ended, where it failed, learner, raiser."""
        learn, rec, raiser = raising_learner(plan)
        learn.profile_hooks = profile
        try:
            ended: object = learn.fit(1).status
        except IllegalCancelError as exc:
            ended = str(exc)
        failure = learn.failure
        where = None if failure is None else (failure.state, failure.hook, failure.callback)
        return rec.records, ended, where, learn, raiser

    @pytest.mark.parametrize("plan", CANCEL_PLANS)
    def test_the_same_path_profiled(self, plan):
        """Every hook, status, message and failure as without profiling; the log verifies."""
        records, ended, where, _, raiser = self.run(plan, profile=False)
        p_records, p_ended, p_where, learn, p_raiser = self.run(plan, profile=True)
        assert p_records == records
        assert p_ended == ended
        assert (where is None) is (p_where is None)
        if where is not None:
            assert p_where[:2] == where[:2]
            assert (where[2], p_where[2]) == (raiser, p_raiser)
        assert the_report(learn).verified

    @pytest.mark.parametrize("plan", CANCEL_PLANS[:3])
    def test_the_cancelling_call_is_counted(self, plan):
        """The hook that raised the cancel: its calls, that one included, are in the notes."""
        [(hook, n)] = plan
        *_, learn, _ = self.run(plan, profile=True)
        total = summed(hook_notes(learn))
        assert total["Raiser", 0, hook.value][0] >= n


# -- what the audit makes of hook_times notes it is given ------------------------------------


def tampered(path: Path, edit, which: int = 0) -> Path:
    """The log with a hook_times note (the first) edited by ``edit(fields)``, seals recomputed."""
    content = path.read_bytes().splitlines(keepends=True)
    at = [i for i, line in enumerate(content) if b'"name":"hook_times"' in line][which]
    record = orjson.loads(content[at])
    edit(record)
    content[at] = orjson.dumps(record) + b"\n"
    out = path.with_name("tampered.jsonl")
    out.write_bytes(reseal(b"".join(content)))
    return out


def problem_of(path: Path) -> str:
    [report], _ = audit_file(path)
    assert report.problem is not None
    return report.problem.reason


def first_row(edit):
    def on_record(record: dict[str, Any]) -> None:
        edit(record["hooks"][0])

    return on_record


def set_item(index: int, value: object):
    def edit(row: list[object]) -> None:
        row[index] = value

    return first_row(edit)


@pytest.fixture
def log(tmp_path) -> Path:
    """The log of a small profiled fit: Tick, Sleepy, Tick."""
    cbs = [Tick(), Sleepy(), Tick()]
    learn = Learner(
        mlp(),
        batches_dls(2, 1),
        F.cross_entropy,
        0.1,
        cbs,
        audit_log=tmp_path / "x.jsonl",
        profile_hooks=True,
    )
    learn.fit(1)
    assert the_report(learn).verified
    return learn.audit_path


@pytest.mark.unchecked_records("hook_times notes tampered with, seals recomputed")
class TestHostileNotes:
    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            (set_item(1, 9), "row 0: callback index 9, but the header lists 3 callback(s)"),
            (
                set_item(0, "Other"),
                "row 0: callback 0 is named 'Other', but the header's cbs[0] is 'Tick'",
            ),
            (set_item(3, 0), "row 0: ['Tick', 0, 'before_batch', 0, "),
            (set_item(2, "after_everything"), "is no [callback class name, index in cbs, hook"),
            (set_item(4, -1), "is no [callback class name"),
            (set_item(4, 1.5), "is no [callback class name"),
            (first_row(lambda row: row.append(0)), "is no [callback class name"),
            (
                lambda r: r["hooks"].append(list(r["hooks"][0])),
                "before_batch of callback 0 a second time in the note",
            ),
            (lambda r: r.update(extra=1), "holds fields ['extra', 'hooks']: it holds exactly"),
            (lambda r: r.update(hooks={"a": 1}), "holds {'a': 1}: it holds exactly 'hooks'"),
            (lambda r: r.update(hooks=[]), "a hook_times note of 0 rows: it has 1 to 1,024"),
        ],
    )
    def test_a_malformed_note_is_a_problem(self, log, edit, reason):
        """Each is named on one line, at the note's line."""
        found = problem_of(tampered(log, edit))
        assert reason in found
        assert "\n" not in found

    def test_more_time_than_the_footer_gives_hooks(self, log):
        """The hook rows' time is inside the footer's hook_ns: 1 ns more does not verify."""
        records = [orjson.loads(line) for line in log.read_bytes().splitlines()]
        footer = next(r for r in records if r["ev"] == "run_end")
        hook_ns = sum(map(sum, footer["hook_ns"].values()))
        noted = sum(row[4] for r in records if r.get("name") == "hook_times" for row in r["hooks"])

        def edit(record: dict[str, Any]) -> None:
            record["hooks"][0][4] += hook_ns - noted + 1

        found = problem_of(tampered(log, edit, which=-1))
        assert found == (
            f"the hook_times notes give {hook_ns + 1:,} ns to callbacks' hooks, but run_end "
            f"hook_ns counts only {hook_ns:,} ns of hooks"
        )

    def test_more_time_than_the_run_has_had(self, log):
        """The notes' time so far is inside the run's time so far: 10**15 ns is not."""
        found = problem_of(tampered(log, set_item(4, 10**15)))
        assert re.fullmatch(
            r"the hook_times notes so far give callbacks 1,000,000,\d{3},\d{3},\d{3} ns, "
            r"but only [\d,]+ ns of the run have passed by this note",
            found,
        )

    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            (
                set_item(3, 10**18),
                (
                    "row 0: before_batch of callback 0 with 1,000,000,000,000,000,000 call(s) "
                    "since the last note, but the replay counts at most 3 call(s) the run's "
                    "transitions allow since"
                ),
            ),
            (
                set_item(3, 2**64 - 1),
                "row 0: before_batch of callback 0 with 18,446,744,073,709,551,615 call(s)",
            ),
            (
                lambda r: r["hooks"].append(["Tick", 0, "step", 3, 1]),
                (
                    "step of callback 0 with 3 call(s) since the last note, but the replay "
                    "counts at most 2 batch(es) that run it since"
                ),
            ),
        ],
    )
    def test_more_calls_than_the_run_made(self, log, edit, reason):
        """Calls beyond the window's transitions (+1 per cancel or failure, +1): one line."""
        found = problem_of(tampered(log, edit))
        assert reason in found
        assert "\n" not in found

    def test_a_training_hook_in_a_validation_pass_note(self, log):
        """The validation pass's note: no after_backward ran since the training pass's note."""
        found = problem_of(
            tampered(log, lambda r: r["hooks"].append(["Tick", 0, "after_backward", 2, 1]), which=1)
        )
        assert "after_backward of callback 0 with 2 call(s) since the last note, but the " in found
        assert "at most 1 call(s)" in found

    def test_an_override_of_training_in_a_validate_run(self, tmp_path):
        """A validate run has no training batch: a step row there does not verify."""
        learn = Learner(
            mlp(),
            batches_dls(2, 2),
            F.cross_entropy,
            0.1,
            [Tick()],
            audit_log=tmp_path / "v.jsonl",
            profile_hooks=True,
        )
        learn.validate()
        edit = lambda r: r["hooks"].append(["Tick", 0, "backward", 1, 0])
        assert "most 0 batch(es) that run it" in problem_of(tampered(learn.audit_path, edit))

    def test_the_json_of_a_forged_log_is_written(self, log, capsys):
        """Calls of 2**64 - 1 in every row: a problem, and --json still writes (no overflow)."""

        def edit(record: dict[str, Any]) -> None:
            for row in record["hooks"]:
                row[3] = 2**64 - 1

        path = tampered(log, edit)
        assert main(["audit", "--json", str(path)]) == 1
        [run] = orjson.loads(capsys.readouterr().out)["runs"]
        assert run["verified"] is False

    def test_a_note_in_a_run_whose_header_lists_no_callbacks(self, log):
        """Without the header's cbs nothing names the rows: a problem."""
        content = log.read_bytes().splitlines(keepends=True)
        header = orjson.loads(content[0])
        del header[Field.CALLBACKS.value]
        content[0] = orjson.dumps(header) + b"\n"
        log.write_bytes(reseal(b"".join(content)))
        assert "header lists no callbacks (cbs)" in problem_of(log)


TRAINING_BATCH = [
    ("begin_batch", "epoch", "batch", True),
    ("predict", "batch", "predict", True),
    ("compute_loss", "predict", "loss", True),
    ("backward", "loss", "backward", True),
    ("step", "backward", "step", True),
    ("end_batch", "step", "epoch", True),
]


def noted_run(
    path: Path, callbacks: int, notes: list[list[list[object]]], *, batches: int = 0
) -> None:
    """Write a one-run log: a header naming ``callbacks`` callbacks, a fit of one training
    pass, ``batches`` training batches before each note."""
    run_id = "0123456789ab"
    enc = Encoder(run_id)
    cbs = [[f"C{index}", 0] for index in range(callbacks)]
    lines = [header_line(enc, header={Field.CALLBACKS: cbs})]
    keys = [("begin_fit", "idle", "fit", False), ("begin_epoch", "fit", "epoch", True)]
    t_ns = 10
    for rows in notes:
        keys += TRAINING_BATCH * batches
        lines += [enc.transition(key, 0, 0, t_ns) for key in keys]
        keys = []
        lines.append(
            enc.note("hook_times", {"hooks": rows}, epoch=0, it=0, training=True, t_ns=t_ns)
        )
    keys += [("end_epoch", "epoch", "fit", True), ("end_fit", "fit", "idle", False)]
    lines += [enc.transition(key, 0, 0, t_ns) for key in keys]
    counts: dict[str, list[int]] = {
        "begin_fit": [0, 1],
        "begin_epoch": [1, 0],
        "end_epoch": [1, 0],
        "end_fit": [0, 1],
    }
    for trigger, *_ in TRAINING_BATCH:
        if batches:
            counts[trigger] = [batches * len(notes), 0]
    lines.append(
        enc.footer(
            t_ns=t_ns,
            status=RunStatus.COMPLETED,
            records=len(lines),
            counts=counts,
            hook_ns={},
        )
    )
    [data], _ = seal_blocks(run_id, [lines])
    path.write_bytes(data)


class TestBounded:
    def test_distinct_pairs_beyond_the_cap_are_counted_not_kept(self, tmp_path):
        """300 callbacks x every hook: 4,096 pairs kept, the other rows counted; it verifies."""
        rows = [[f"C{i}", i, hook.value, 1, 0] for i in range(300) for hook in Hook]
        notes = [rows[start : start + 1024] for start in range(0, len(rows), 1024)]
        noted_run(tmp_path / "many.jsonl", 300, notes)
        [report], problem = audit_file(tmp_path / "many.jsonl")
        assert (problem, report.problem) == (None, None)
        assert len(report.hook_times) == MAX_HOOK_TIMES_KEPT
        assert report.hook_times_left_out == len(rows) - MAX_HOOK_TIMES_KEPT
        text = render_report(report)
        assert f"{len(rows) - MAX_HOOK_TIMES_KEPT:,} row(s) beyond the first 4,096" in text
        assert f"{MAX_HOOK_TIMES_KEPT - 20:,} more" in text

    def test_the_same_pair_in_many_notes_adds_up(self, tmp_path):
        """Rows of one pair in successive notes: one entry, calls and time summed."""
        notes = [[["C0", 0, "after_batch", 2, 0]], [["C0", 0, "after_batch", 3, 0]]]
        noted_run(tmp_path / "two.jsonl", 1, notes, batches=3)
        [report], _ = audit_file(tmp_path / "two.jsonl")
        assert report.verified
        assert report.hook_times == {("C0", 0, "after_batch"): (5, 0)}


# -- overrides of the batch's work, timed as self time -----------------------------------------

STEP_SLEEP_S, LOSS_SLEEP_S = 0.004, 0.002


class SlowStep(Callback):
    """Sleeps STEP_SLEEP_S in its step override, then proceeds (to the optimizer step)."""

    order = 2

    def step(self, learn: Learner, proceed) -> None:
        time.sleep(STEP_SLEEP_S)
        proceed()


class SlowLoss(Callback):
    """Sleeps LOSS_SLEEP_S in its compute_loss override, then proceeds."""

    order = 3

    def compute_loss(self, learn: Learner, proceed) -> None:
        time.sleep(LOSS_SLEEP_S)
        proceed()


class Outer(Callback):
    """A step override that only proceeds: to SlowStep's, which sleeps (order 2 runs inside)."""

    order = 1

    def step(self, learn: Learner, proceed) -> None:
        proceed()


class StepCancels(Callback):
    """Cancels the second batch in its step override, and raises Boom in the fourth."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, learn: Learner, proceed) -> None:
        self.steps += 1
        if self.steps == 2:
            raise CancelBatchException
        if self.steps == 4:
            raise Boom
        proceed()


@pytest.fixture(scope="module")
def overridden(tmp_path_factory) -> Learner:
    """Two epochs of 5 training and 2 validation batches with Outer, SlowStep, SlowLoss."""
    logs = tmp_path_factory.mktemp("overridden")
    dls = digits_dls(64, n_train=64 * TRAIN_BATCHES, n_valid=64 * VALID_BATCHES)
    cbs = [Outer(), SlowStep(), SlowLoss()]
    learn = Learner(mlp(), dls, F.cross_entropy, 0.1, cbs, audit_log=logs, profile_hooks=True)
    learn.fit(2)
    return learn


class TestOverrides:
    def test_a_slow_override_is_named_with_its_calls_and_sleeps(self, overridden):
        """step once a training batch, compute_loss once a batch; each took its sleeps at least."""
        total = summed(hook_notes(overridden))
        step_calls, step_ns = total["SlowStep", 1, "step"]
        loss_calls, loss_ns = total["SlowLoss", 2, "compute_loss"]
        assert step_calls == 2 * TRAIN_BATCHES
        assert loss_calls == 2 * (TRAIN_BATCHES + VALID_BATCHES)
        assert step_ns >= step_calls * STEP_SLEEP_S * 1e9
        assert loss_ns >= loss_calls * LOSS_SLEEP_S * 1e9

    def test_an_outer_override_is_not_charged_the_inner_ones_time(self, overridden):
        """Outer proceeds into SlowStep: its self time is far under SlowStep's sleeps."""
        calls, ns = summed(hook_notes(overridden))["Outer", 0, "step"]
        assert calls == 2 * TRAIN_BATCHES
        assert ns < calls * STEP_SLEEP_S * 1e9

    def test_the_audit_verifies_and_shows_them(self, overridden):
        """The log verifies; the report adds the override rows up; the table names them."""
        report = the_report(overridden)
        assert report.verified
        assert report.hook_times == summed(hook_notes(overridden))
        text = render_report(report)
        table = text[text.index("time per callback") : text.index("slowest transitions")]
        assert "SlowStep" in table
        assert "compute_loss" in table

    def test_an_inference_run_times_its_compute_loss(self):
        """validate(): compute_loss once a batch, no step row; the log verifies."""
        learn = Learner(
            mlp(),
            batches_dls(2, 3),
            F.cross_entropy,
            0.1,
            [SlowStep(), SlowLoss()],
            profile_hooks=True,
        )
        learn.validate()
        assert calls_of(hook_notes(learn)[0]) == {("SlowLoss", 1, "compute_loss"): 3}
        assert the_report(learn).verified

    def test_off_the_chain_calls_the_bound_override(self):
        """Unprofiled, the step chain's link holds SlowStep.step itself; profiled, a wrapper."""
        slow = SlowStep()
        for profile in (False, True):
            learn = Learner(
                mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [slow], profile_hooks=profile
            )
            learn.fit(1)
            link = learn._step
            if profile:  # the chain, inside the wrapper that numbers its runs
                link = inspect.getclosurevars(link).nonlocals["chain"]
            method = inspect.getclosurevars(link).nonlocals["method"]
            if profile:
                assert type(method) is not types.MethodType
                assert method.__wrapped__ == slow.step
            else:
                assert type(method) is types.MethodType
                assert (method.__self__, method.__func__) == (slow, SlowStep.step)

    def test_cancels_and_failures_in_an_override_pass_through(self):
        """A step override that cancels, then raises: the same path profiled; the log verifies."""
        told = []
        for profile in (False, True):
            learn = Learner(
                mlp(),
                batches_dls(5, 1),
                F.cross_entropy,
                0.1,
                [StepCancels()],
                profile_hooks=profile,
            )
            with pytest.raises(Boom):
                learn.fit(1)
            told.append((learn.failure.state, learn.counts[Trigger.CANCEL_BATCH, True]))
            report = the_report(learn)
            assert (report.verified, report.status) == (True, RunStatus.FAILED)
        assert told[0] == told[1]
        assert summed(hook_notes(learn))["StepCancels", 0, "step"][0] == 4


class TestNoteSize:
    def test_long_class_names_split_the_note_by_size(self):
        """200 callbacks named with 3,000 characters: notes under the limit; the fit completes."""
        classes = [type("C" * 3000 + str(i), (Tick,), {}) for i in range(200)]
        learn = Learner(
            mlp(),
            batches_dls(3, 1),
            F.cross_entropy,
            0.1,
            [c() for c in classes],
            profile_hooks=True,
        )
        assert learn.fit(1).status is RunStatus.COMPLETED
        lines = [
            line for line in learn.audit_path.read_bytes().splitlines() if b'"hook_times"' in line
        ]
        assert len(lines) > 3  # the first pass's 600 rows alone take two notes
        assert max(map(len, lines)) < MAX_NOTE_BYTES
        total = summed(hook_notes(learn))
        assert len(total) == 200 * 4
        assert {total[c.__name__, i, "before_batch"][0] for i, c in enumerate(classes)} == {4}
        assert the_report(learn).verified

    def test_a_row_no_note_can_hold_is_left_out(self):
        """A class name of 600,000 characters: its rows are left out, the fit completes."""
        huge = type("C" * 600_000, (Tick,), {})
        learn = Learner(
            mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [Tick(), huge()], profile_hooks=True
        )
        assert learn.fit(1).status is RunStatus.COMPLETED
        assert {index for _, index, _ in summed(hook_notes(learn))} == {0}
        assert the_report(learn).verified
