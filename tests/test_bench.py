"""`fsm-learner bench` runs and its output is well formed (a benchmark, not a timed test)."""

from __future__ import annotations

import math

import orjson
import pytest

from fsm_learner.audit.replay import audit_file
from fsm_learner.bench import render_bench, run_bench, write_synthetic_log
from fsm_learner.cli import main


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
    text = render_bench(report)
    assert text.splitlines()[0].startswith("fsm-learner bench: torch ")
    assert "tiny, 50 no-op callbacks vs none" in text


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
