"""`fsm-learner demo`: a real CNN on real digits, audited, plotted and drawn."""

from __future__ import annotations

import io

import pytest

from fsm_learner.cli import main
from fsm_learner.demo import DemoSettings, run_demo


def test_defaults_reach_95_percent_and_write_every_file(tmp_path):
    """With the defaults the demo passes 95% validation accuracy and its log verifies."""
    out = io.StringIO()
    result = run_demo(DemoSettings(out=tmp_path / "runs"), file=out)
    assert result.valid_accuracy >= 0.95
    assert result.report.verified
    assert result.report.notes == 17  # a metrics note per pass (8 epochs), and the device
    assert set(result.files) == {"audit log", "plot", "diagram"}
    assert all(path.is_file() and path.stat().st_size > 0 for path in result.files.values())
    assert result.files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.getvalue()
    assert "epoch 8/8 valid loss" in text
    assert "1 run(s): 1 verified, 0 do not verify" in text
    assert f"audit log: {result.files['audit log']}" in text


def test_same_seed_same_results(tmp_path):
    """Two CPU runs with one seed give the same history; another seed does not."""
    runs = [
        run_demo(DemoSettings(epochs=2, seed=seed, out=tmp_path / str(i)), file=io.StringIO())
        for i, seed in enumerate((3, 3, 4))
    ]
    assert runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_cli_runs(tmp_path, capsys):
    """`fsm-learner demo --epochs 1` exits 0 and says where the files went."""
    assert main(["demo", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    assert "diagram: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["--batch-size", "x"], "argument --batch-size: invalid _positive value: 'x'"),
    ],
)
def test_bad_options_are_usage_errors(args, message, capsys):
    """argparse-style errors, exit 2, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(["demo", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [("cuda", "torch.cuda.is_available() is False"), ("cdua", "unknown device 'cdua'")],
)
def test_unavailable_or_unknown_device(device, message, capsys, monkeypatch):
    """--device cuda without CUDA, or a device torch does not know: one line, exit 2."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["demo", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fsm-learner demo: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
