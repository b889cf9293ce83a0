"""Every code block and command in the README runs, so the README cannot rot."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
# versions (torch 2.13.0+cpu, 2.14.1+cu130), ids and numbers vary from run to run
HEX_OR_NUMBER = re.compile(r"\d+\.\d+\.\d+(\+\w+)?|[0-9a-f]{12,}|\d[\d,]*(\.\d+)?")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.DOTALL)


def commands() -> list[str]:
    return [
        line[2:]
        for block in blocks("console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]


def shown_outputs() -> dict[str, str]:
    """Each command whose console block is followed by a text block: the output shown."""
    fences = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)
    shown = {}
    for (lang, body), (next_lang, next_body) in itertools.pairwise(fences):
        if lang == "console" and next_lang == "text":
            last = [line[2:] for line in body.splitlines() if line.startswith("$ ")][-1]
            shown[last] = next_body
    return shown


# Long commands run shortened here (same code paths, less work); the README shows full runs.
SHORT_BENCH = ["--pairs", "2", "--warmup", "0", "--epochs", "1", "--audit-records", "2000"]
QUICK = {
    "fsm-learner bench": SHORT_BENCH,
    "fsm-learner demo": ["--epochs", "2"],
    "fsm-learner bench --agreement": SHORT_BENCH,
}


def run_command(command: str) -> subprocess.CompletedProcess[str]:
    args = shlex.split(command)
    assert args[0] == "fsm-learner", command
    return subprocess.run(
        [sys.executable, "-m", "fsm_learner.cli", *args[1:], *QUICK.get(command, [])],
        capture_output=True,
        text=True,
        check=False,
    )


def shape(line: str) -> str:
    return HEX_OR_NUMBER.sub("N", line.strip())


def test_python_blocks_then_commands_run_in_order():
    """Python blocks run in one namespace, top to bottom; then the commands run on their output."""
    namespace: dict[str, object] = {"__name__": "readme"}
    assert blocks("python"), "the README has no Python block"
    for block in blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    shown = shown_outputs()
    assert shown, "the README shows no command output"
    for command in commands():
        if command.startswith(("make ", "torchrun ")):  # torchrun: its own test, below
            continue
        result = run_command(command)
        assert result.returncode == 0, (command, result.stderr)
        if command in shown:
            lines = [x for x in shown[command].splitlines() if x and not x.startswith(("...", "("))]
            real = {shape(x) for x in result.stdout.splitlines()}
            for line in (lines[0], lines[-1]):
                assert shape(line) in real, (command, line)


def test_example_record_has_the_documented_fields():
    """The JSON example is a transition record with exactly the fields of the schema table."""
    [example] = blocks("json")
    record = orjson.loads(example)
    table = README.split("| field | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(
        re.findall(r"`(\w+)`", "".join(row.split("|")[1] for row in table.splitlines()[2:]))
    )
    assert set(record) == documented
    assert len(example.strip()) <= 160


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith("make ")])
def test_make_commands_are_real_targets(command):
    """make commands: the target exists and its recipe expands (-n), without recursing into it."""
    args = command.split()
    result = subprocess.run(
        [*args[:1], "-n", *args[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_every_command_is_covered():
    """Each console command is a make target, an fsm-learner command or torchrun, run here."""
    assert all(c.startswith(("make ", "fsm-learner ", "torchrun ")) for c in commands()), commands()


def audit_log_section() -> str:
    return README.split("\n## The audit log\n", 1)[1].split("\n### `fsm-learner audit`\n", 1)[0]


def test_reading_a_log_with_pandas_and_duckdb():
    """The audit log section's blocks, on a real fit with metrics: what they read is the log."""
    import torch.nn.functional as F
    from helpers import batches_dls, mlp

    from callbacks import MetricsCB
    from fsm_learner import Learner

    code = re.findall(r"```python\n(.*?)```", audit_log_section(), flags=re.DOTALL)
    assert len(code) == 3, "the section's blocks: fit, pandas, DuckDB"
    learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [MetricsCB()])
    namespace: dict[str, object] = {"__name__": "readme", "learn": learn}
    for block in code:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    path = namespace["result"].audit_path
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    log = namespace["log"]
    assert list(log["ev"]) == [r["ev"] for r in records]
    assert set(log["run"]) == {namespace["result"].run_id}
    losses = {
        (r["ep"], field): value
        for r in records
        if r.get("name") == "metrics"
        for field, value in r.items()
        if field.endswith("_loss")
    }
    assert namespace["per_epoch"].fetchall() == [
        (ep, losses[ep, "train_loss"], losses[ep, "valid_loss"]) for ep in (0, 1)
    ]
    transitions = [r for r in records if "src" in r]
    per_state = namespace["per_state"].fetchall()
    assert sum(exits for _, exits, _ in per_state) == len(transitions)
    assert sum(ms or 0 for *_, ms in per_state) == pytest.approx(
        (transitions[-1]["t"] - transitions[0]["t"]) / 1e6
    )


def section(title: str) -> str:
    return README.split(f"\n### {title}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]


def test_batches_and_inference_sections(tmp_path, monkeypatch):
    """The dict-batch and inference blocks: the model trains on its own loss, validate and
    get_preds give the numbers a hand-written loop gives, each run logged with its kind."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    code = [
        *blocks("python")[:1],
        *re.findall(r"```python\n(.*?)```", section("Batches of any shape"), flags=re.DOTALL),
        *re.findall(
            r"```python\n(.*?)```",
            section("Inference: `validate` and `get_preds`"),
            flags=re.DOTALL,
        ),
    ]
    assert len(code) == 3, "quickstart, dict batches, inference"
    for block in code:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    import torch
    import torch.nn.functional as F

    learn, clf = namespace["learn"], namespace["clf"]
    x, y = namespace["x"], namespace["y"]
    with torch.no_grad():
        learn.model.eval()
        expected = learn.model(x[192:])
    assert torch.allclose(namespace["preds"], expected)
    assert namespace["scores"]["loss"] == pytest.approx(F.cross_entropy(expected, y[192:]).item())
    kinds = [
        orjson.loads(path.read_bytes().split(b"\n", 1)[0])["kind"]
        for path in sorted((tmp_path / "runs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    ]
    assert kinds[-3:] == ["validate", "predict", "predict"]
    text = namespace["text"]
    with torch.no_grad():
        clf.model.eval()
        losses = [clf.model(**batch)["loss"] for batch in text[3:]]
    assert clf.validate()["loss"] == pytest.approx(torch.stack(losses).mean().item())


def test_resuming_section(tmp_path, monkeypatch):
    """The resume block on a real fit: bit for bit, resumed mid training pass; then the audit
    of both logs confirms the checkpoint, names the batches redone, and covers every batch."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    code = [
        *blocks("python")[:1],
        *re.findall(r"```python\n(.*?)```", section("Resuming a fit"), flags=re.DOTALL),
    ]
    assert len(code) == 2, "quickstart, resuming"
    for block in code:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README is ours)
    whole, resumed = namespace["whole"], namespace["resumed"]
    assert whole.run_id == resumed.resumed_from["run"]
    assert dict(resumed.resumed_from["at"]) == {"ep": 1, "tr": True, "it": 4}
    result = subprocess.run(
        [sys.executable, "-m", "fsm_learner.cli", "audit", "runs", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    [lineage] = orjson.loads(result.stdout)["lineages"]
    [link] = lineage["links"]
    assert (link["resumes"], link["run_id"], link["checkpoint"]) == (
        whole.run_id,
        resumed.run_id,
        "confirmed",
    )
    # 6 training and 2 validation batches an epoch: the whole fit went on after the checkpoint
    assert link["redone"] == [
        {"epoch": 1, "pass": "train", "first": 4, "last": 5},
        {"epoch": 1, "pass": "valid", "first": 0, "last": 1},
        {"epoch": 2, "pass": "train", "first": 0, "last": 5},
        {"epoch": 2, "pass": "valid", "first": 0, "last": 1},
    ]
    assert (lineage["complete"], lineage["batches"], lineage["passes"]) == (True, 24, 6)


TORCHRUN_TIMEOUT_S = 240


def test_training_on_several_processes_section(tmp_path):
    """The section's script under its torchrun command (2 ranks, gloo): one run, a log per rank,
    the same metrics on both; then its audit command reads the two logs as one run."""
    text = section("Training on several processes")
    [script] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    [console] = re.findall(r"```console\n(.*?)```", text, flags=re.DOTALL)
    launch, audit = [line[2:] for line in console.splitlines() if line.startswith("$ ")]
    assert script.startswith("# train.py: " + launch)
    (tmp_path / "train.py").write_text(script)
    torchrun = Path(sys.executable).with_name("torchrun")
    args = shlex.split(launch)
    with socket.socket() as s:  # torchrun's default port may be taken by another test run
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("FSM_LEARNER_AUDIT_KEY", None)
    result = subprocess.run(
        [str(torchrun), "--master_port", port, *args[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=TORCHRUN_TIMEOUT_S,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = sorted((tmp_path / "runs").glob("*.jsonl"))
    run_id = logs[0].name.split(".")[0]
    assert [p.name for p in logs] == [f"{run_id}.rank0.jsonl", f"{run_id}.rank1.jsonl"]
    footers = [orjson.loads(p.read_bytes().splitlines()[-2]) for p in logs]  # then its seal
    status = footers[0]["status"]
    assert [f["status"] for f in footers] == [status, status]
    assert status in {"completed", "cancelled"}
    assert result.stdout.split() == ["2", status, f"runs/{run_id}.rank0.jsonl"]  # rank 0 alone
    metrics = [
        [r for r in map(orjson.loads, p.read_bytes().splitlines()) if r.get("name") == "metrics"]
        for p in logs
    ]
    assert [[m["ep"], m.get("valid_loss")] for m in metrics[0]] == [
        [m["ep"], m.get("valid_loss")] for m in metrics[1]
    ]
    checked = subprocess.run(
        [sys.executable, "-m", "fsm_learner.cli", *shlex.split(audit)[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        f"distributed run {run_id}: world size 2, ranks 0-1, {status}  verified" in checked.stdout
    )
    assert "  lockstep: yes, " in checked.stdout
