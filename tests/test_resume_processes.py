"""Real training processes killed, preempted and restarted, then resumed in new processes.

Each test runs ``resume_worker.py`` (a small real fit on digits: a shuffling DataLoader,
Dropout, BatchNorm, Adam, a one-cycle schedule, gradient accumulation, MetricsCB, Recorder
and CheckpointCB), stops it at a point drawn by a seeded ``random.Random`` (the seed is in
the test id) and resumes it in a new process with ``fit(n, resume_from=dir)``. Then:

- after every batch, every process's state (weights, buffers, gradients, torch's
  generator) hashes as the uninterrupted run's did after that batch;
- the final model, optimizer, metric history and record equal the uninterrupted run's,
  bit for bit;
- ``fsm-learner audit --json`` verifies every run, and the lineage: complete, each link
  redoing the batches begun after its checkpoint.

The processes come from a fork server that imported torch, torchmetrics and scikit-learn
once (``resume_worker.child``): each is a process of its own, and a kill takes its process
group (it and its DataLoader workers). The torchrun test starts real interpreters. Every
wait is bounded, and every process a test starts is killed when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest
import resume_worker
import torch

from fsm_learner.checkpoint import sha256_of
from fsm_learner.cli import main

WORKER = Path(__file__).with_name("resume_worker.py")
TIMEOUT_S = 60.0
"""The longest wait for a line of a worker, or for its exit (a whole run takes seconds)."""
TORCHRUN_TIMEOUT_S = 240.0
PRELOAD = ["torch", "torch._dynamo", "torchmetrics.classification", "sklearn.datasets", "callbacks"]
"""What the worker imports, by names the fork server finds (it imports them before it sets
its sys.path, which the tests folder is on: each process imports resume_worker itself)."""

Batch = tuple[int, str, int]
"""(epoch, "train" or "valid", batch index)."""


# -- worker processes ----------------------------------------------------------------------


class Worker:
    """A worker process from the fork server: the lines it said, and how it ended."""

    def __init__(self, ctx: Any, argv: list[str], state: Path) -> None:
        self.argv, self.state = argv, state
        self.lines: list[str] = []
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=resume_worker.child, args=(argv, child_conn, str(state / "worker.log"))
        )
        self.process.start()
        child_conn.close()

    def expect(self, prefix: str) -> str:
        """Read lines until one starts with ``prefix``; return it (fail after TIMEOUT_S)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.conn.poll(remaining):
                pytest.fail(f"no {prefix!r} line within {TIMEOUT_S} s{self.said()}")
            try:
                line = self.conn.recv()
            except EOFError:
                pytest.fail(f"the worker ended before a {prefix!r} line{self.said()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        """SIGKILL the worker's process group (it and its DataLoader workers); wait for it."""
        self._signal_group(signal.SIGKILL)
        self.process.join(TIMEOUT_S)
        assert self.process.exitcode == -signal.SIGKILL, self.said()

    def finish(self) -> str:
        """Wait for DONE and the exit (status 0); return the run status DONE names."""
        status = self.expect("DONE ").split()[1]
        self.process.join(TIMEOUT_S)
        assert self.process.exitcode == 0, self.said()
        return status

    def stop(self) -> None:
        """Kill whatever is left of the worker (its group, or it alone before setsid)."""
        if self.process.exitcode is None:
            self._signal_group(signal.SIGKILL)
            self.process.join(TIMEOUT_S)
        self.conn.close()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:  # not yet a group of its own, or gone
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    def said(self) -> str:
        """The last lines and the log, for a failure message."""
        log = self.state / "worker.log"
        text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        return f"\nworker {self.argv}\nlast lines: {self.lines[-8:]}\nworker.log:\n{text}"


@dataclass
class Checkpoint:
    """A CKPT line: where it was taken (``it`` batches of the pass done), its hash, its file."""

    epoch: int
    split: str
    it: int
    sha256: str
    path: Path

    @classmethod
    def parse(cls, line: str) -> Checkpoint:
        """Read ``CKPT <epoch> <pass> <it> <sha256> <path>``."""
        _, epoch, split, it, sha256, path = line.split(" ", 5)
        return cls(int(epoch), split, int(it), sha256, Path(path))

    @property
    def position(self) -> Batch:
        """(epoch, pass, batches of the pass done)."""
        return self.epoch, self.split, self.it

    @property
    def at(self) -> dict[str, Any]:
        """The position as a log's ``resumed_from.at`` writes it."""
        return {"ep": self.epoch, "tr": self.split == "train", "it": self.it}


def batch_of(line: str) -> tuple[Batch, str]:
    """Read ``BATCH <epoch> <pass> <iter> <digest>``."""
    _, epoch, split, it, digest = line.split()
    return (int(epoch), split, int(it)), digest


@dataclass
class Outcome:
    """One process: its run (its log's name), its lines, its status (None: killed)."""

    run_id: str
    lines: list[str]
    status: str | None = None

    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoints it wrote, in order."""
        return [Checkpoint.parse(line) for line in self.lines if line.startswith("CKPT ")]

    def digests(self) -> list[tuple[Batch, str]]:
        """Each batch it ran, and the hash of the state after it."""
        return [batch_of(line) for line in self.lines if line.startswith("BATCH ")]

    def batches_after(self, checkpoint: Checkpoint) -> list[Batch]:
        """The batches it ran after it wrote ``checkpoint``."""
        said = [line for line in self.lines if line.startswith(("CKPT ", "BATCH "))]
        index = said.index(next(line for line in said if line.endswith(f" {checkpoint.path}")))
        return [batch_of(line)[0] for line in said[index + 1 :] if line.startswith("BATCH ")]


@dataclass
class Fleet:
    """Starts workers on one state directory, and keeps what each one did."""

    ctx: Any
    state: Path
    workers: int
    outcomes: list[Outcome] = field(default_factory=list)

    @contextlib.contextmanager
    def start(self, mode: str, *faults: str) -> Any:
        """Start a worker; on leaving, kill what is left of it and keep its outcome."""
        runs = self.state / "runs"
        before = set(runs.glob("*.jsonl"))
        argv = [mode, str(self.state), "--workers", str(self.workers), *faults]
        worker = Worker(self.ctx, argv, self.state)
        try:
            yield worker
        finally:
            worker.stop()
            [log] = set(runs.glob("*.jsonl")) - before
            self.outcomes.append(Outcome(log.stem, worker.lines))

    def complete(self, mode: str) -> Outcome:
        """Run a worker to the end of its fit; check it completed."""
        with self.start(mode) as worker:
            status = worker.finish()
        assert status == "completed", worker.said()
        self.outcomes[-1].status = status
        return self.outcomes[-1]


@dataclass
class Reference:
    """An uninterrupted run: what it said and its final state."""

    outcome: Outcome
    final: dict[str, Any]

    @property
    def plan(self) -> tuple[int, int, int]:
        """Epochs, training batches and validation batches of the fit."""
        _, epochs, train, valid = self.outcome.lines[0].split()
        return int(epochs), int(train), int(valid)

    def draw(self, rng: random.Random, split: str | None = None) -> Batch:
        """A batch of the fit, drawn by ``rng`` (of the pass named, else of either)."""
        epochs, n_train, n_valid = self.plan
        split = split or rng.choice(["train", "valid"])
        n = n_train if split == "train" else n_valid
        return rng.randrange(epochs), split, rng.randrange(n)

    def after(self, checkpoint: Checkpoint | None) -> list[str]:
        """What the run said after it wrote a checkpoint where ``checkpoint`` was taken."""
        if checkpoint is None:
            return self.outcome.lines
        lines = self.outcome.lines
        at = (checkpoint.epoch, checkpoint.split, checkpoint.it)
        [index] = [
            n
            for n, line in enumerate(lines)
            if line.startswith("CKPT ") and Checkpoint.parse(line).position == at
        ]
        return lines[index + 1 :]

    def check_batches(self, outcomes: list[Outcome]) -> None:
        """Each batch of each process left the state the uninterrupted run had after it."""
        want = dict(self.outcome.digests())
        for n, outcome in enumerate(outcomes):
            for at, digest in outcome.digests():
                where = f"process {n} (run {outcome.run_id}), after batch {at}"
                assert at in want, f"{where}: a batch the uninterrupted run did not run"
                assert digest == want[at], f"{where}: the state differs"


@pytest.fixture(scope="module")
def ctx():
    """A fork server that has imported the worker's dependencies (torch, ...) once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    yield context
    forkserver._forkserver._stop()  # its memory back; a later user starts a fresh one
    context.set_forkserver_preload([])


class Runs:
    """Starts fleets of workers from one fork server; runs each uninterrupted run once."""

    def __init__(self, ctx: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.ctx, self._tmp = ctx, tmp_path_factory
        self._references: dict[int, Reference] = {}

    def fleet(self, state: Path, workers: int) -> Fleet:
        """Workers with ``workers`` DataLoader workers each, on the state directory ``state``."""
        return Fleet(self.ctx, state, workers)

    def reference(self, workers: int) -> Reference:
        """The uninterrupted run with ``workers`` DataLoader workers."""
        if workers not in self._references:
            fleet = self.fleet(self._tmp.mktemp(f"reference{workers}"), workers)
            outcome = fleet.complete("train")
            self._references[workers] = Reference(outcome, final_state(fleet.state))
        return self._references[workers]


@pytest.fixture(scope="module")
def runs(ctx, tmp_path_factory):
    """Fleets from the fork server, and the uninterrupted runs, run once a module."""
    return Runs(ctx, tmp_path_factory)


def drawn(seed: int) -> random.Random:
    """The generator that draws a test's stopping points."""
    return random.Random(seed)  # noqa: S311 (seeded for replay, not secrets)


def final_state(state: Path) -> dict[str, Any]:
    """What the worker saved at the end: model, optimizer, metric history, record."""
    loaded: dict[str, Any] = torch.load(state / "final.pt", weights_only=True)
    return loaded


def assert_identical(got: object, want: object, where: str = "final") -> None:
    """Every tensor bit for bit (same dtype, torch.equal), every other value equal."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype, where
        assert torch.equal(got, want), f"{where} differs"
    elif isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(got, key=str) == sorted(want, key=str), where
        for key in want:
            assert_identical(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple), where
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_identical(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def audit(runs: Path, capsys) -> tuple[int, dict[str, Any]]:
    """``fsm-learner audit <runs> --json``: its exit code and its document."""
    capsys.readouterr()
    code = main(["audit", str(runs), "--json"])
    return code, json.loads(capsys.readouterr().out)


def ranges(batches: list[Batch]) -> list[dict[str, Any]]:
    """Consecutive batches of a pass as the audit writes them: epoch, pass, first, last."""
    out: list[dict[str, Any]] = []
    for epoch, split, it in batches:
        last = out[-1] if out else None
        if last and (last["epoch"], last["pass"], last["last"] + 1) == (epoch, split, it):
            last["last"] = it
        else:
            out.append({"epoch": epoch, "pass": split, "first": it, "last": it})
    return out


def check_audit(
    outcomes: list[Outcome], resumed: list[Checkpoint], redone: list[Any], runs: Path, capsys
) -> None:
    """Every run verifies (a killed one is truncated); each resumed run names its checkpoint;
    one lineage, complete, each link redoing ``redone``."""
    code, report = audit(runs, capsys)
    found = {run["run_id"]: run for run in report["runs"]}
    ids = [outcome.run_id for outcome in outcomes]
    assert sorted(found) == sorted(ids)
    for outcome in outcomes:
        run = found[outcome.run_id]
        if outcome.status is None:  # killed: its log ends where it died
            assert run["status"] == "truncated", run
        else:
            assert (run["status"], run["verified"]) == (outcome.status, True), run
    for parent, child, checkpoint in zip(outcomes[:-1], outcomes[1:], resumed, strict=True):
        link = found[child.run_id]["header"]["resumed_from"]
        want = (parent.run_id, checkpoint.at, checkpoint.sha256, str(checkpoint.path))
        assert (link["run"], link["at"], link["sha256"], link["path"]) == want
    if "lineages" not in report:  # an audit that does not check lineages yet
        return
    assert (code, report["problems"], report["verified"]) == (0, [], True)
    [lineage] = report["lineages"]
    assert [run["run_id"] for run in lineage["runs"]] == ids
    assert (lineage["complete"], lineage["verified"]) == (True, True), lineage
    assert [link["redone"] for link in lineage["links"]] == redone


# -- killed (SIGKILL) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """Where a worker is SIGKILLed: in a batch, between epochs, or writing a checkpoint."""

    kind: str
    """``train`` or ``valid`` (in that pass's batch, after its after_batch hooks ran),
    ``between`` (as an epoch begins, after the checkpoint between epochs), ``write``
    (half of a checkpoint written)."""
    seed: int

    def args(self, reference: Reference, resumed_from: Checkpoint | None) -> list[str]:
        """The worker's fault option, at a point drawn by ``random.Random(seed)`` among those
        the uninterrupted run reached after ``resumed_from`` (None: all)."""
        rng = drawn(self.seed)
        later = reference.after(resumed_from)
        if self.kind == "write":  # not its first: the run resumes one this process wrote
            count = sum(line.startswith("CKPT ") for line in later)
            return ["--slow-write", str(rng.randrange(2, count + 1))]
        if self.kind == "between":
            epochs = [
                int(line.split()[1])
                for line in later
                if line.startswith("CKPT ") and line.split()[2:4] == ["train", "0"]
            ]
            return ["--pause-before-epoch", str(rng.choice(epochs[:-1]))]  # the last ends the fit
        batches = [batch_of(line)[0] for line in later if line.startswith("BATCH ")]
        epoch, split, it = rng.choice([b for b in batches if b[1] == self.kind])
        return ["--pause-at", f"{epoch}:{split}:{it}"]

    def redone(self, killed: Outcome, checkpoint: Checkpoint) -> list[dict[str, Any]]:
        """The batches the killed run began after ``checkpoint``, as far as its log sealed them.

        The worker's log is sealed after every batch and at every checkpoint: killed in a
        batch's after_batch, a process never sealed that batch.
        """
        batches = killed.batches_after(checkpoint)
        return ranges(batches[:-1] if self.kind in {"train", "valid"} else batches)


def kill_at(
    fleet: Fleet, kill: Kill, reference: Reference, resumed_from: Checkpoint | None
) -> Outcome:
    """Start a worker (resuming ``resumed_from``, or fresh), SIGKILL it at the point; check
    the checkpoints it wrote are whole."""
    args = kill.args(reference, resumed_from)
    with fleet.start("train" if resumed_from is None else "resume", *args) as worker:
        writing = worker.expect("WRITING ") if kill.kind == "write" else None
        worker.expect("PAUSED")
        worker.kill()
        pid = worker.process.pid
    killed = fleet.outcomes[-1]
    directory = fleet.state / "ckpt"
    said = {c.path: c.sha256 for c in killed.checkpoints()}
    for path in directory.glob("*.pt"):
        if path in said:  # not pruned: as it was written
            assert sha256_of(path) == said[path], path
    if writing is not None:  # the partial file may remain; the name it was for is free
        partial = Path(writing.split(" ", 1)[1])
        target = directory / partial.name.removeprefix(".").rsplit(".", 2)[0]
        assert partial == directory / f".{target.name}.{pid}.partial"
        assert target.suffix == ".pt"
        assert not target.exists()
    return killed


@dataclass(frozen=True)
class KillCase:
    """Kills one after the other (each in the process that resumed the last), and the
    DataLoader workers; ``corrupt``: the newest checkpoint is cut short after each kill."""

    kills: tuple[Kill, ...]
    workers: int
    corrupt: bool = False


KILLS = [
    pytest.param(KillCase((Kill("train", 13),), 0), id="train-pass-nw0-seed13"),
    pytest.param(KillCase((Kill("train", 19),), 2), id="train-pass-nw2-seed19"),
    pytest.param(KillCase((Kill("valid", 14),), 2), id="valid-pass-nw2-seed14"),
    pytest.param(KillCase((Kill("between", 16),), 0), id="between-epochs-nw0-seed16"),
    pytest.param(KillCase((Kill("write", 15),), 0), id="checkpoint-write-nw0-seed15"),
    pytest.param(KillCase((Kill("train", 11),), 0, corrupt=True), id="newest-corrupt-nw0-seed11"),
    pytest.param(KillCase((Kill("valid", 17), Kill("write", 18)), 0), id="twice-nw0-seed17-18"),
]


class TestKilled:
    @pytest.mark.parametrize("case", KILLS)
    def test_resumed_run_ends_bit_identical(self, runs, tmp_path, capsys, case):
        """SIGKILLed at drawn points, resumed in a new process from the directory: every
        batch and the final state are the uninterrupted run's; the audit finds one complete
        lineage, each link redoing the batches begun after its checkpoint. A newest
        checkpoint cut short is skipped with a ResumeWarning naming it."""
        reference = runs.reference(case.workers)
        fleet = runs.fleet(tmp_path, case.workers)
        resumed_from, redone, corrupted = [], [], []
        for kill in case.kills:
            killed = kill_at(fleet, kill, reference, resumed_from[-1] if resumed_from else None)
            checkpoints = killed.checkpoints()
            if case.corrupt:
                newest = checkpoints.pop().path
                newest.write_bytes(newest.read_bytes()[:1000])
                corrupted.append(newest)
            resumed_from.append(checkpoints[-1])
            redone.append(kill.redone(killed, checkpoints[-1]))
        resumed = fleet.complete("resume")
        assert f"RESUMED {resumed_from[-1].path}" in resumed.lines
        warned = [line for line in resumed.lines if line.startswith("WARNING ResumeWarning: ")]
        assert len(warned) == len(corrupted), resumed.lines[-5:]
        for warning, path in zip(warned, corrupted, strict=True):
            assert str(path) in warning
        reference.check_batches(fleet.outcomes)
        assert_identical(final_state(tmp_path), reference.final)
        check_audit(fleet.outcomes, resumed_from, redone, tmp_path / "runs", capsys)


# -- preempted (SIGTERM) ---------------------------------------------------------------------


@dataclass(frozen=True)
class PreemptCase:
    """The DataLoader workers, and the seed that draws the batch SIGTERM comes in."""

    workers: int
    seed: int


class TestPreempted:
    @pytest.mark.parametrize(
        "case",
        [
            pytest.param(PreemptCase(2, 38), id="nw2-seed38"),
            pytest.param(PreemptCase(0, 26), id="nw0-seed26"),
        ],
    )
    def test_preempted_run_resumes_exactly(self, runs, tmp_path, capsys, case):
        """SIGTERM in a drawn batch: the worker finishes the batch, checkpoints after it, and
        its fit returns status preempted; the process exits 0; resumed in a new process,
        the fit ends bit-identical to the uninterrupted one, redoing no batch."""
        reference = runs.reference(case.workers)
        fleet = runs.fleet(tmp_path, case.workers)
        epoch, split, it = reference.draw(drawn(case.seed))
        with fleet.start("train", "--pause-at", f"{epoch}:{split}:{it}") as worker:
            worker.expect("PAUSED")
            worker.process.terminate()  # SIGTERM, to the training process alone
            worker.conn.send("continue")
            assert worker.finish() == "preempted", worker.said()
        preempted = fleet.outcomes[-1]
        preempted.status = "preempted"
        last = preempted.lines.index("PAUSED")
        [checkpoint] = [
            Checkpoint.parse(line) for line in preempted.lines[last:] if line.startswith("CKPT ")
        ]
        assert (checkpoint.epoch, checkpoint.split, checkpoint.it) == (epoch, split, it + 1)
        assert checkpoint.path.is_file()
        assert sha256_of(checkpoint.path) == checkpoint.sha256
        assert not [line for line in preempted.lines[last:] if line.startswith("BATCH ")]
        fleet.complete("resume")
        reference.check_batches(fleet.outcomes)
        assert_identical(final_state(tmp_path), reference.final)
        check_audit(fleet.outcomes, [checkpoint], [[]], tmp_path / "runs", capsys)


# -- restarted by torchrun -------------------------------------------------------------------


class TestTorchrunRestart:
    def test_restarted_worker_carries_on(self, runs, tmp_path, capsys):
        """Under ``torchrun --max_restarts 1``, a worker always fitting with
        resume_from=dir SIGKILLs itself in a drawn batch on its first attempt (an empty
        directory: it starts afresh); the restarted worker resumes and finishes the fit
        bit-identical to the uninterrupted one."""
        torchrun = Path(sys.executable).with_name("torchrun")
        if not torchrun.is_file():
            pytest.skip(f"no torchrun next to {sys.executable} (torch's console script)")
        reference = runs.reference(0)
        epoch, split, it = reference.draw(drawn(31))
        command = [
            str(torchrun), "--standalone", "--nnodes", "1", "--nproc_per_node", "1",
            "--max_restarts", "1", str(WORKER), "resume", str(tmp_path),
            "--self-kill-at", f"{epoch}:{split}:{it}",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not end within {TORCHRUN_TIMEOUT_S} s")
        finally:
            if proc.poll() is None:  # torchrun stops its workers (own sessions) on SIGTERM
                proc.terminate()
                try:
                    proc.communicate(timeout=TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, output[-3000:]
        lines = output.splitlines()
        attempts = [n for n, line in enumerate(lines) if line.startswith("PLAN ")]
        assert len(attempts) == 2, output[-3000:]
        first, second = lines[attempts[0] : attempts[1]], lines[attempts[1] :]
        assert "DONE completed" in second
        logs = {
            log.stem: json.loads(log.read_text().splitlines()[0])
            for log in (tmp_path / "runs").glob("*.jsonl")
        }
        [restarted] = [run for run, header in logs.items() if header.get("resumed_from")]
        [killed] = set(logs) - {restarted}
        outcomes = [Outcome(killed, first), Outcome(restarted, second, "completed")]
        checkpoint = outcomes[0].checkpoints()[-1]
        killed_in, _ = batch_of([line for line in first if line.startswith("BATCH ")][-1])
        assert killed_in == (epoch, split, it)
        reference.check_batches(outcomes)
        assert_identical(final_state(tmp_path), reference.final)
        redone = Kill(split, 31).redone(outcomes[0], checkpoint)  # killed in after_batch too
        check_audit(outcomes, [checkpoint], [redone], tmp_path / "runs", capsys)
