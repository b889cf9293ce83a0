"""A training process for tests/test_resume_processes.py to kill, preempt and resume.

Not a test module (pytest collects ``test_*.py`` only). Run as a script (torchrun does)::

    python resume_worker.py {train,resume} STATE [--workers N] [--seed S] [faults...]

or as the target of a process the tests start from a preloading fork server (``child``),
which spares each run the seconds of importing torch, torchmetrics and scikit-learn.

It fits a small model (BatchNorm, Dropout) on scikit-learn's digits with a shuffling torch
DataLoader, Adam and stock callbacks with state, checkpointing to ``STATE/ckpt`` every 3
batches and every epoch (keeping 3 files), logging to ``STATE/runs``; ``resume`` fits with
``resume_from=STATE/ckpt``. It says one line per event (printed and flushed, or sent on
the connection it was given)::

    PLAN <epochs> <train batches> <valid batches>
    BATCH <epoch> <train|valid> <iter> <digest>        after_batch of every batch: the
                                                       state's hash then (``digest``)
    EPOCH <epoch>                                      --pause-before-epoch's epoch begins
    CKPT <epoch> <train|valid> <iter> <sha256> <path>  a checkpoint written (iter: batches
                                                       of the pass done; train 0: between
                                                       epochs)
    WRITING <path>                                     --slow-write: half of the file written
    PAUSED                                             at a fault's point (see ``pause``)
    WARNING <category>: <message>                      a warning the fit raised
    RESUMED <checkpoint path>                          the fit resumed this checkpoint
    DONE <status>                                      STATE/final.pt is saved

Faults, each at most once a process: ``--pause-at EP:PASS:IT`` pauses in that batch's
after_batch, ``--pause-before-epoch EP`` in epoch EP's before_epoch (after the checkpoint
between epochs), ``--slow-write K`` once half of the K-th checkpoint (from 1) is written;
``--self-kill-at EP:PASS:IT`` SIGKILLs itself in that batch's after_batch, under torchrun
on the first attempt only (TORCHELASTIC_RESTART_COUNT 0).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch._dynamo  # an optimizer's first build imports it (3 s): the fork server, once
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import fsm_learner.checkpoint
import fsm_learner.learner
from callbacks import BatchSchedCB, CheckpointCB, GradientAccumulationCB, MetricsCB, Recorder
from fsm_learner import Callback, DataLoaders, Learner
from fsm_learner.audit import writer

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

EPOCHS = 3
BATCH_SIZE = 64
N_TRAIN = 1216  # 19 training batches: odd, so the last accumulation cycle of a pass is short
N_VALID = 448  # 7 validation batches
PAUSE_S = 60.0  # a paused worker is killed or continued long before this

_conn: Connection | None = None
"""Where ``say`` sends the lines (None: stdout)."""


def say(*words: object) -> None:
    """Say one line of the protocol, at once (the test may kill this process next)."""
    line = " ".join(map(str, words))
    if _conn is None:
        print(line, flush=True)  # noqa: T201 (the protocol is printed)
    else:
        _conn.send(line)


def pause() -> None:
    """Say PAUSED, then wait to be killed, or told to go on (``continue`` on the connection).

    A signal in between is handled as it arrives (SIGTERM asks the fit to stop).
    """
    say("PAUSED")
    if _conn is not None and _conn.poll(PAUSE_S) and _conn.recv() == "continue":
        return
    if _conn is None:
        time.sleep(PAUSE_S)
    say("PAUSE_EXPIRED")
    sys.exit(3)


def position(text: str | None) -> tuple[int, str, int] | None:
    """Parse ``EP:PASS:IT``."""
    if text is None:
        return None
    ep, pass_name, it = text.split(":")
    return int(ep), pass_name, int(it)


def pass_of(training: bool) -> str:
    """Name a pass as the protocol does."""
    return "train" if training else "valid"


class Protocol(Callback):
    """Say every batch; pause or die at the faults' points."""

    order = 100  # after every stock callback has seen the batch (CheckpointCB is 90)

    def __init__(self, args: argparse.Namespace) -> None:
        """Keep the fault points."""
        self.pause_at = position(args.pause_at)
        self.pause_before_epoch = args.pause_before_epoch
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.kill_at = position(args.self_kill_at) if first_attempt else None

    def before_epoch(self, learn: Learner) -> None:
        """Pause as the epoch named begins (the checkpoint between epochs is written)."""
        if learn.training and learn.epoch == self.pause_before_epoch:
            say("EPOCH", learn.epoch)
            pause()

    def after_batch(self, learn: Learner) -> None:
        """Say the batch; pause or die there if a fault says so."""
        here = (learn.epoch, pass_of(learn.training), learn.iter)
        say("BATCH", *here, digest(learn))
        if here == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if here == self.pause_at:
            pause()


def digest(learn: Learner) -> str:
    """Hash the model's weights, buffers and gradients, and torch's generator: the state now."""
    sha = hashlib.sha256(torch.get_rng_state().numpy().tobytes())
    for name, tensor in learn.model.state_dict().items():
        sha.update(name.encode())
        sha.update(tensor.numpy().tobytes())
    for param in learn.model.parameters():
        sha.update(b"-" if param.grad is None else param.grad.numpy().tobytes())
    return sha.hexdigest()[:16]


def patch_writes(slow_write: int | None) -> None:
    """Say every checkpoint written; make the ``slow_write``-th stop halfway, and pause."""
    real_write, real_save = fsm_learner.learner.write_atomic, torch.save
    count = 0

    def write_atomic(path: Path, payload: Any) -> str:
        nonlocal count
        count += 1
        if count == slow_write:
            fsm_learner.checkpoint.torch.save = half_save
        digest = real_write(path, payload)
        at = payload["position"]
        say("CKPT", at["epoch"], pass_of(at["training"]), at["iter"], digest, path)
        return digest

    def half_save(obj: object, fh: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        say("WRITING", fh.name)
        pause()

    fsm_learner.learner.write_atomic = write_atomic


def digits(workers: int, seed: int) -> DataLoaders:
    """A shuffled training loader and a validation loader over a fixed split of digits."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    valid = TensorDataset(x[N_TRAIN : N_TRAIN + N_VALID], y[N_TRAIN : N_TRAIN + N_VALID])
    gen = torch.Generator().manual_seed(seed)
    # fork, as a script's loader does: a fork server's child would start them from the server
    context = {"num_workers": workers, "multiprocessing_context": "fork" if workers else None}
    return DataLoaders(
        DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=gen, **context),
        DataLoader(valid, batch_size=BATCH_SIZE, **context),
    )


def model(seed: int) -> nn.Module:
    """A small MLP with BatchNorm and Dropout, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10)
    )


def parse(argv: list[str]) -> argparse.Namespace:
    """Read the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="resume_worker.py")
    parser.add_argument("mode", choices=["train", "resume"])
    parser.add_argument("state", type=Path)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause-at")
    parser.add_argument("--pause-before-epoch", type=int)
    parser.add_argument("--slow-write", type=int)
    parser.add_argument("--self-kill-at")
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    """Fit (or resume), save the final state to STATE/final.pt, say how the fit ended."""
    args = parse(argv)
    torch.set_num_threads(1)
    writer.FLUSH_EVERY_NS = 0  # seal after every batch: a kill loses only the batch under way
    patch_writes(args.slow_write)
    dls = digits(args.workers, args.seed)
    metrics, recorder = MetricsCB(MulticlassAccuracy(num_classes=10)), Recorder()
    cbs = [
        metrics,
        recorder,
        BatchSchedCB.one_cycle(1e-2),
        GradientAccumulationCB(2),
        CheckpointCB(args.state / "ckpt", every_n_batches=3, every_n_epochs=1, keep=3),
        Protocol(args),
    ]
    learn = Learner(
        model(args.seed),
        dls,
        F.cross_entropy,
        1e-2,
        cbs,
        opt_func=torch.optim.Adam,
        audit_log=args.state / "runs",
    )
    say("PLAN", EPOCHS, len(dls.train), len(dls.valid))
    resume_from = args.state / "ckpt" if args.mode == "resume" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = learn.fit(EPOCHS, resume_from=resume_from)
    for warning in caught:
        say("WARNING", f"{warning.category.__name__}: {warning.message}")
    if learn.resumed_from is not None:
        say("RESUMED", learn.resumed_from["path"])
    final = {
        "model": learn.model.state_dict(),
        "optimizer": None if learn.opt is None else learn.opt.state_dict(),
        "history": metrics.history,
        "lrs": recorder.lrs,
        "losses": recorder.losses,
        "epochs": recorder.epochs,
    }
    torch.save(final, args.state / "final.pt")
    say("DONE", result.status.value)
    return 0


def child(argv: list[str], conn: Connection, log: str) -> None:
    """Run as a fork server's child: a process group of its own, output to ``log``."""
    global _conn  # noqa: PLW0603 (one process, one connection)
    _conn = conn
    os.setsid()  # the test kills the group: this process and its DataLoader workers
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(run(argv))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
