"""`fsm-learner bench` runs and its output is well formed (a benchmark, not a timed test)."""

from __future__ import annotations

import itertools
import math
import os
import signal

import attrs
import orjson
import pytest
import torch
import torch.nn.functional as F

from fsm_learner import Callback, DataLoaders, Distributed, Learner, bench
from fsm_learner.audit.replay import audit_file
from fsm_learner.bench import (
    AGREEMENTS_PER_TRAINING_BATCH,
    AGREEMENTS_PER_VALIDATION_BATCH,
    AgreementCost,
    CaseResult,
    ProfileHooksCost,
    agreement_cost,
    render_bench,
    run_bench,
    write_synthetic_log,
)
from fsm_learner.cli import main
from fsm_learner.distributed import World
from fsm_learner.examples import tiny_mlp

# generous: on a loaded 2-core machine, starting two ranks alone (importing torch) takes 15 s
RANKS_TIMEOUT_S = 180.0


def test_report_shape_and_text():
    """A short run fills every field with finite, positive numbers and renders them."""
    report = run_bench(configs=("tiny",), pairs=2, warmup=0, epochs=1, audit_records=2_000)
    assert [c.name for c in report.cases] == ["tiny, log off", "tiny, log on"]
    for case in (*report.cases, report.noop_callbacks):
        assert case.pairs == 2
        assert case.batches_per_run == 29  # 22 training + 7 validation batches of 64 digits
        values = (case.bare_us_per_batch, case.fsm_us_per_batch, case.ratio_median)
        assert all(math.isfinite(v) and v > 0 for v in values)
        assert case.ratio_min <= case.ratio_median <= case.ratio_max
    assert 100 < report.bytes_per_transition <= 160
    assert report.writer_us_per_record_batched > 0
    assert report.writer_us_per_record_one_call_each > 0
    assert report.audit_records_per_s > 0
    assert report.agreement is None
    assert report.to_json()["agreement"] is None
    text = render_bench(report)
    assert text.splitlines()[0].startswith("fsm-learner bench: torch ")
    assert "tiny, 50 no-op callbacks vs none" in text
    assert "agreement" not in text
    assert report.profile_hooks is None
    assert "profile_hooks" not in text


def test_synthetic_log_verifies(tmp_path):
    """The million-record log the throughput figure uses is a valid run (here, 10,000)."""
    path = tmp_path / "big.jsonl"
    write_synthetic_log(path, 10_000)
    [report], problem = audit_file(path)
    assert problem is None
    assert report.verified
    # header, begin_fit, begin_epoch, 6 per batch, end_epoch, end_fit, footer
    assert report.records == 6 * ((10_000 - 6) // 6) + 6
    assert report.batches == ((10_000 - 6) // 6, 0)


def test_cli_json(capsys):
    """`fsm-learner bench --json` prints the report as JSON."""
    code = main(
        [
            "bench",
            "--config",
            "tiny",
            "--pairs",
            "2",
            "--warmup",
            "0",
            "--epochs",
            "1",
            "--audit-records",
            "2000",
            "--json",
        ],
    )
    assert code == 0
    data = orjson.loads(capsys.readouterr().out)
    assert {c["name"] for c in data["cases"]} == {"tiny, log off", "tiny, log on"}
    assert data["threads"] == 1
    assert data["agreement"] is None


class TestProfileHooksCost:
    """The profile_hooks section: the same hooked fits, profiled and not, interleaved."""

    def test_in_the_report(self):
        """Hook calls read back from the fits' notes: 5 callbacks, 6 hooks a training batch."""
        report = run_bench(
            configs=("tiny",), pairs=1, warmup=0, epochs=1, audit_records=2_000, profile_hooks=True
        )
        cost = report.profile_hooks
        assert cost is not None
        # a training batch runs the 6 batch hooks; a validation batch 4 (no backward, no step)
        assert cost.hook_calls_per_run == 5 * (22 * 6 + 7 * 4)
        assert cost.loop_hook_calls_per_run == 5 * (200 * 6 + 100 * 4)
        assert (cost.callbacks, cost.hooks_per_callback) == (5, 6)
        assert (cost.fit.pairs, cost.fit.batches_per_run) == (1, 29)
        assert (cost.loop.pairs, cost.loop.batches_per_run) == (1, 300)
        assert cost.fit.name == "tiny, 5 hooked callbacks, profile_hooks on vs off"
        assert cost.loop.name == "tiny, no work, 5 hooked callbacks, profile_hooks on vs off"
        values = [cost.ns_per_hook_call]
        for case in (cost.fit, cost.loop):
            values += [case.bare_us_per_batch, case.fsm_us_per_batch]
        assert all(math.isfinite(v) for v in values)
        assert render_bench(report).endswith("\n".join(bench._profile_lines(cost)))
        data = orjson.loads(orjson.dumps(report.to_json()))
        assert data["profile_hooks"]["hook_calls_per_run"] == 800

    def test_rendered_lines(self):
        """Off and on per batch in each case, the difference, and the cost per hook call."""
        fit = CaseResult("digits case", 20, 29, *[1.0] * 6)
        fit = attrs.evolve(fit, bare_us_per_batch=500.0, fsm_us_per_batch=508.25)
        loop = attrs.evolve(fit, name="no-work case", batches_per_run=300)
        cost = ProfileHooksCost(5, 6, 800, 8000, 300.4, fit, loop)
        first, second, third = bench._profile_lines(cost)
        assert first.startswith("digits case (log on, 20 pairs of 29 batches): 500.0 µs/batch off")
        assert second.startswith("no-work case (log on, 20 pairs of 300 batches): ")
        assert third == (
            "profile_hooks per hook call: 300 ns, from the no-work case (800 hook calls per "
            "digits fit, 27.6 per batch: 5 callbacks x 6 batch hooks)"
        )

    def test_cli_option(self, monkeypatch, capsys):
        """`fsm-learner bench --profile-hooks --json` has the section; without it, null."""
        fit = CaseResult("case", 1, 29, *[1.0] * 6)
        cost = ProfileHooksCost(5, 6, 800, 8000, 300.0, fit, fit)
        monkeypatch.setattr(bench, "profile_hooks_cost", lambda _knobs, _dir: cost)
        quick = ["--config", "tiny", "--pairs", "1", "--warmup", "0", "--epochs", "1"]
        for flag, expected in ((["--profile-hooks"], 800), ([], None)):
            assert main(["bench", *quick, "--audit-records", "2000", *flag, "--json"]) == 0
            section = orjson.loads(capsys.readouterr().out)["profile_hooks"]
            assert (section and section["hook_calls_per_run"]) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "huge"], "invalid choice: 'huge'"),
        (["--pairs", "0"], "argument --pairs: must be >= 1, got 0"),
    ],
)
def test_cli_bad_options(args, message, capsys):
    """Bad options are argparse usage errors (exit 2) with a one-line reason."""
    with pytest.raises(SystemExit) as info:
        main(["bench", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "unknown device 'gpu'"),
        ("cuda", "torch.cuda.is_available() is False"),
    ],
)
def test_cli_bad_device(device, message, capsys, monkeypatch):
    """A device torch does not know, or CUDA where there is none: exit 2, one line."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsm-learner bench: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1


def _recording_starts(monkeypatch):
    """Record every rank process the agreement bench starts."""
    started = []
    start = bench._start_rank

    def recording(*args):
        proc = start(*args)
        started.append(proc)
        return proc

    monkeypatch.setattr(bench, "_start_rank", recording)
    return started


def _gone(pid):
    """Whether no process has ``pid`` any more (it ended and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def measured():
    """One short agreement measurement on two ranks, and the processes it started."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        started = _recording_starts(monkeypatch)
        cost = agreement_cost(rounds=3, calls=20, fit_pairs=1, timeout_s=RANKS_TIMEOUT_S)
    return cost, started


class TestAgreementCost:
    """The agreement section: two gloo ranks on this machine, bounded and cleaned up."""

    def test_positive_numbers_of_the_rounds_asked(self, measured):
        """Every figure is finite and positive, from the rounds and calls asked for."""
        cost, _ = measured
        assert (cost.backend, cost.ranks, cost.rounds, cost.calls_per_round) == ("gloo", 2, 3, 20)
        figures = (
            cost.us_per_agreement,
            cost.us_per_all_reduce,
            cost.cpu_us_per_agreement,
            cost.fit.bare_us_per_batch,
            cost.fit.fsm_us_per_batch,
        )
        assert all(math.isfinite(v) and v > 0 for v in figures)
        assert cost.us_per_agreement_min <= cost.us_per_agreement <= cost.us_per_agreement_max

    def test_per_batch_is_agreements_per_batch(self, measured):
        """A training batch costs three agreements, a validation batch one."""
        cost, _ = measured
        assert (cost.agreements_per_training_batch, cost.agreements_per_validation_batch) == (3, 1)
        assert cost.us_per_training_batch == 3 * cost.us_per_agreement
        assert cost.us_per_validation_batch == cost.us_per_agreement

    def test_fit_across_ranks_against_one_process(self, measured):
        """The fit case is one pair of tiny fits of 2 epochs: 2 x (22 + 7) batches."""
        cost, _ = measured
        assert cost.fit.name == "tiny, 2 ranks vs 1 process"
        assert (cost.fit.pairs, cost.fit.batches_per_run) == (1, 58)
        assert cost.fit.ratio_min <= cost.fit.ratio_median <= cost.fit.ratio_max

    def test_ranks_are_gone(self, measured):
        """Both ranks exited 0 and were reaped."""
        _, started = measured
        assert [proc.returncode for proc in started] == [0, 0]
        assert all(_gone(proc.pid) for proc in started)

    def test_rendered_lines(self, measured):
        """The text gives the per-call figure and, per training batch, three times it."""
        cost, _ = measured
        per_call, per_batch = f"{cost.us_per_agreement:.1f}", f"{3 * cost.us_per_agreement:.1f}"
        first, second, third = bench._agreement_lines(cost)
        assert first.startswith("agreement across 2 ranks (gloo on CPU, wall time, median of 3 ")
        assert f": {per_call} µs per agreement [" in first
        assert f"{per_batch} µs per training batch (3 agreements)" in second
        assert f"{per_call} µs per validation batch (1)" in second
        assert third.startswith("tiny, 2 ranks vs 1 process (no DDP, every rank all the data")

    def test_in_the_bench_report(self, measured, monkeypatch):
        """run_bench(agreement=True) adds the section to the text and the JSON."""
        cost, _ = measured
        monkeypatch.setattr(bench, "agreement_cost", lambda: cost)
        report = run_bench(
            configs=("tiny",), pairs=1, warmup=0, epochs=1, audit_records=2_000, agreement=True
        )
        assert report.agreement is cost
        assert render_bench(report).endswith("\n".join(bench._agreement_lines(cost)))
        data = orjson.loads(orjson.dumps(report.to_json()))
        assert AgreementCost(**{**data["agreement"], "fit": cost.fit}) == cost
        assert data["agreement"]["fit"] == attrs.asdict(cost.fit)

    def test_cli_option(self, measured, monkeypatch, capsys):
        """`fsm-learner bench --agreement --json` has the section in its JSON."""
        cost, _ = measured
        monkeypatch.setattr(bench, "agreement_cost", lambda: cost)
        quick = ["--config", "tiny", "--pairs", "1", "--warmup", "0", "--epochs", "1"]
        assert main(["bench", *quick, "--audit-records", "2000", "--agreement", "--json"]) == 0
        data = orjson.loads(capsys.readouterr().out)
        assert data["agreement"]["us_per_training_batch"] == 3 * cost.us_per_agreement

    def test_hung_ranks_are_killed(self, monkeypatch):
        """Ranks not done within the timeout are killed and reaped; the error says so."""
        started = _recording_starts(monkeypatch)
        monkeypatch.setattr(bench, "_AGREE_WORKER", "import time; time.sleep(600)")
        with pytest.raises(RuntimeError, match=r"the ranks were not done within 0\.5 s"):
            agreement_cost(timeout_s=0.5)
        assert [proc.returncode for proc in started] == [-signal.SIGKILL] * 2
        assert all(_gone(proc.pid) for proc in started)

    def test_a_failed_rank_stops_the_other(self, monkeypatch):
        """A rank that exits non-zero has the other killed at once, and its output quoted."""
        started = _recording_starts(monkeypatch)
        worker = (
            "import os, sys, time\n"
            "if os.environ['RANK'] == '1':\n"
            "    sys.exit('rank one gives up')\n"
            "time.sleep(600)"
        )
        monkeypatch.setattr(bench, "_AGREE_WORKER", worker)
        with pytest.raises(RuntimeError, match="rank 1 exited with 1") as info:
            agreement_cost(timeout_s=RANKS_TIMEOUT_S)
        assert "rank1: rank one gives up" in str(info.value)
        assert [proc.returncode for proc in started] == [-signal.SIGKILL, 1]
        assert all(_gone(proc.pid) for proc in started)


class AgreementsAtBatch(Callback):
    """Keep how many all-reduces were sent at each batch's start, per pass."""

    def __init__(self, sent):
        self.sent = sent
        self.at = {True: [], False: []}

    def before_batch(self, learn):
        self.at[learn.training].append(len(self.sent))


def _between(counts):
    """The all-reduces sent from each batch's start to the next one's."""
    return [b - a for a, b in itertools.pairwise(counts)]


@pytest.fixture
def all_reduces(monkeypatch):
    """Run the next fits as rank 0 of 2 with no other process: each all-reduce is kept, not sent."""
    sent = []
    world = World(0, 2)
    monkeypatch.setattr("fsm_learner.learner.start_world", lambda _config: world)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, **_: sent.append(t.clone()))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda _objects, **_: None)
    return sent


class TestAgreementsPerBatch:
    """The bench's multipliers are the learner's own agreements, counted in a fit across ranks."""

    def _fit(self, sent, *cbs):
        """Fit one epoch of 4 training and 3 validation batches; the counts at batch starts."""
        x, y = torch.rand(8, 64), torch.randint(0, 10, (8,))
        batches = [(x, y)] * 4
        counts = AgreementsAtBatch(sent)
        shared = Distributed(wrap_model=False, distribute_samplers=False)
        dls = DataLoaders(batches, batches[:3])
        learn = Learner(
            tiny_mlp(0),
            dls,
            F.cross_entropy,
            0.1,
            [counts, *cbs],
            audit_log=None,
            distributed=shared,
        )
        learn.fit(1)
        return counts.at

    def test_training_and_validation_batches(self, all_reduces):
        """Between two batches' starts: three agreements in training, one in validation."""
        at = self._fit(all_reduces)
        assert _between(at[True]) == [AGREEMENTS_PER_TRAINING_BATCH] * 3
        assert _between(at[False]) == [AGREEMENTS_PER_VALIDATION_BATCH] * 2

    def test_a_hook_between_backward_and_step_adds_one(self, all_reduces):
        """An after_backward hook makes the learner agree once more before the step."""

        class AfterBackward(Callback):
            def after_backward(self, learn):
                pass

        at = self._fit(all_reduces, AfterBackward())
        assert _between(at[True]) == [AGREEMENTS_PER_TRAINING_BATCH + 1] * 3

    def test_the_bare_all_reduce_is_as_big(self, all_reduces):
        """The bench's bare all-reduce sends what an agreement sends: eight int64."""
        self._fit(all_reduces)
        assert {(t.numel(), t.dtype) for t in all_reduces} == {(bench._AGREE_INTS, torch.int64)}
