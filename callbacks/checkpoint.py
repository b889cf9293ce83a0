"""CheckpointCB: full-state checkpoints a fit resumes from exactly, and preemption.

Every ``every_n_batches`` batches (training and validation batches alike, counted over
the fit) and at the end of every ``every_n_epochs``-th epoch, it asks the learner for a
checkpoint (``learn.request_checkpoint()``). The learner writes it at the next boundary,
once the batch or the pass has ended (every hook of it run), into
``<dir>/ckpt_e<epoch>_<pass>_b<batch>_<run>.pt``, atomically, with everything an exact
resume needs (``fsm_learner.checkpoint``), and notes it in the audit log
(``resume_point``: the file's SHA-256 and the log's chain head there). Only the newest
``keep`` files it wrote are kept (None: all).

Across ranks (a fit under torch.distributed, ``learn.world.size`` > 1) every rank writes
its own file, ``<dir>/ckpt_..._<run>.rank<r>.pt`` (its own generators and loader
position), at the same boundaries, and keeps its own newest ``keep``: a rank removes
only files of its own rank. A resumed fit reads each rank's newest file of its rank
(``fsm_learner.checkpoint.find_latest``). The directory may be shared by the ranks.

With it in ``learn.cbs``, the fit is preemptible: on SIGTERM the learner finishes the
batch, checkpoints, and stops (``preempt``, status ``preempted``).
``learn.fit(n, resume_from=dir)`` finishes the fit from the newest checkpoint.

Checkpoints: ``state_dict()`` holds the batches counted and the files written, so that
a resumed fit checkpoints where the uninterrupted one would, and prunes the same files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from callbacks._checks import check_count
from fsm_learner import Callback, CheckpointError, ConfigurationError
from fsm_learner.checkpoint import Position, file_name, of_rank
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner

__all__ = ["CheckpointCB"]


def _check_dir(directory: object) -> Path:
    if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
        msg = (
            f"dir must be a non-empty str or os.PathLike (where checkpoints go), got "
            f"{type(directory).__name__} {directory!r}"
        )
        raise ConfigurationError(msg)
    return Path(directory)


def _optional_count(name: str, value: object, meaning: str) -> int | None:
    return None if value is None else check_count(name, value, minimum=1, meaning=meaning)


class CheckpointCB(Callback):
    """Checkpoint the fit every ``every_n_batches`` batches and ``every_n_epochs`` epochs.

    Either may be None (never by that count); ``keep`` newest files are kept (None: all).
    """

    order = 90  # after the callbacks whose state it saves have seen the batch

    def __init__(
        self,
        dir: str | os.PathLike[str] = "checkpoints",  # noqa: A002 (the issue's name for it)
        every_n_batches: int | None = None,
        every_n_epochs: int | None = 1,
        keep: int | None = 3,
    ) -> None:
        """Check the settings; nothing is written before a fit asks."""
        self.dir = _check_dir(dir)
        self.every_n_batches = _optional_count("every_n_batches", every_n_batches, "batches")
        self.every_n_epochs = _optional_count("every_n_epochs", every_n_epochs, "epochs")
        self.keep = _optional_count("keep", keep, "newest files kept")
        self.batches = 0
        """Batches of the fit seen so far (both passes)."""
        self.written: list[Path] = []
        """The files written (newest last), those pruned excepted."""

    def before_fit(self, learn: Learner) -> None:
        """Count the fit's batches from 0 (a resume gives the count back after this)."""
        self.batches = 0

    def after_batch(self, learn: Learner) -> None:
        """Ask for a checkpoint after every ``every_n_batches``-th batch of the fit."""
        if learn.kind is not RunKind.FIT:
            return
        self.batches += 1
        every = self.every_n_batches
        if every is not None and self.batches % every == 0:
            learn.request_checkpoint()

    def after_epoch(self, learn: Learner) -> None:
        """Ask for a checkpoint after the validation pass of every ``every_n_epochs``-th epoch."""
        every = self.every_n_epochs
        fit_epoch = learn.kind is RunKind.FIT and not learn.training
        if fit_epoch and every is not None and (learn.epoch + 1) % every == 0:
            learn.request_checkpoint()

    def checkpoint_path(self, learn: Learner, at: Position) -> Path:
        """Return where the checkpoint of ``at`` goes; it is listed before it is written.

        Across ranks the name says the rank: ``..._<run>.rank<r>.pt``.
        """
        world = learn.world
        path = self.dir / file_name(at, learn.run_id, rank=world.rank, world_size=world.size)
        if path not in self.written:
            self.written.append(path)
        return path

    def checkpoint_written(self, learn: Learner, path: Path) -> None:
        """Remove the files beyond the newest ``keep`` (this rank's, in ``dir``, only)."""
        keep = self.keep
        if keep is None or len(self.written) <= keep:
            return
        stale, self.written = self.written[:-keep], self.written[-keep:]
        world = learn.world
        for old in stale:
            # only its own: a fit resumed from a checkpoint elsewhere (an archive, another
            # worker's) or from another rank's file leaves that one where it is
            own = old.parent == self.dir and of_rank(old, rank=world.rank, world_size=world.size)
            if old != path and own:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def state_dict(self) -> dict[str, Any]:
        """Return the batches counted and the files written."""
        return {"batches": self.batches, "written": [os.fspath(p) for p in self.written]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the batches counted and the files written."""
        batches, written = state.get("batches"), state.get("written")
        if type(batches) is not int or not isinstance(written, list):
            msg = (
                f"CheckpointCB state must hold 'batches' (an int) and 'written' (a list of "
                f"paths); got {sorted(state)}"
            )
            raise CheckpointError(msg)
        self.batches = batches
        self.written = [Path(p) for p in written]

    def __repr__(self) -> str:
        """Name the directory and the schedule."""
        return (
            f"CheckpointCB(dir={os.fspath(self.dir)!r}, every_n_batches={self.every_n_batches}, "
            f"every_n_epochs={self.every_n_epochs}, keep={self.keep})"
        )
