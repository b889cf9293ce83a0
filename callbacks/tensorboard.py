"""TensorBoardCB: a fit's learning rates, metrics and hyperparameters, written for TensorBoard.

This module owns what a fit writes through ``torch.utils.tensorboard.SummaryWriter``.
Each fit writes one TensorBoard run, the directory ``<log_dir>/<run_id>`` (``learn.run_id``,
which names the fit's audit log too):

- ``lr/group<i>``: the learning rate of each param group at each optimizer step, read
  as a Python float from ``learn.opt.param_groups`` by a step hook of the optimizer
  (``register_step_post_hook``), so it is the rate the step used, before a scheduler
  moves it; the TensorBoard step is the count of the fit's optimizer steps before it
  (from 0). Only steps the optimizer took count: a batch whose step gradient
  accumulation defers, or a GradScaler skips, writes nothing. The step hook does no
  I/O: it keeps the rates, and the callback writes them in its own hooks (``after_batch``,
  the pass's and the fit's cleanup), so a writer's error is raised from, and blamed on,
  a TensorBoardCB hook;
- ``<pass>/<name>``: at the end of each pass of the fit, the values of the learner's
  metrics callback (``MetricsCB``, or any ``MetricsProvider``: its ``last_pass()``):
  ``train/loss``, ``valid/loss``, ``valid/accuracy``...; the TensorBoard step is the
  epoch (from 0). A pass cut short by a cancel is written with what its completed
  batches gave, as the metrics callback reports it; a failed pass writes nothing;
- ``seconds/<pass>``: the pass's wall time, ``time.perf_counter`` from its
  ``before_epoch`` to its end (host time: with a metrics callback, which reads its
  values back at the pass end, the device's work is in it);
- the hyperparameters of the run, for the HParams tab: ``run_id``, ``n_epochs``,
  ``lr`` (``learn.lr``), ``optimizer`` and ``model`` (class names), ``batch_size``
  (when ``dls.train`` is a DataLoader that has one), ``world_size``, and the
  ``hparams`` given to the callback (which win over these on a shared name, except
  ``run_id``: the run's own id is always the one written). They are
  written as the session start of the run directory itself (no sub-run, unlike
  ``SummaryWriter.add_hparams``), and without an experiment summary, so TensorBoard
  builds the HParams table from every run under the log directory: the union of the
  runs' hyperparameters, and, as metric columns, the last value of every scalar (the
  final ``valid/accuracy``, ``valid/loss``, ...).

Without a metrics callback it writes the learning rates, the seconds and the
hyperparameters. Validate and predict runs write nothing. Nothing here syncs with the
device per batch: the rates are Python floats (a rate held as a tensor, as capturable
optimizers may, is copied on its device at the step and read back at the pass's end), and
the metrics are the floats the metrics
callback computed once per pass. ``log_dir`` is checked when the callback is
constructed (an existing path that is not a directory is refused), and the run directory
is created at ``before_fit`` (on rank 0), so a place that cannot be written fails the fit
there, before any training, with a ConfigurationError naming it. The writer is opened at
the first value written, and flushed and closed when the fit ends, by any route
(``cleanup_fit``).

Across ranks (``learn.world.size`` > 1) only rank 0 (``learn.world.is_main``) writes;
the metrics callback's values are the same on every rank.

Needs the ``tensorboard`` extra: ``pip install 'fsm-learner[tensorboard]'``; importing
this module does not, constructing a ``TensorBoardCB`` does.

Checkpoints: ``state_dict()`` holds the run directory's name, the optimizer steps
counted and, during a fit on rank 0, the run directory's event files with their sizes,
taken after flushing the writer (so everything written before the checkpoint is on disk
with it). Loaded after ``before_fit`` (a resumed fit, which has a run id of its own),
the fit goes on in the checkpointed run's directory, its steps numbered on from the
checkpoint's, so TensorBoard shows one run (the directory ``before_fit`` created for the
resumed fit's own run id is removed while still empty); on rank 0 each event file there
is first cut back to its size at the checkpoint (a file begun since, to nothing), so the
points the interrupted process wrote past the checkpoint go and the resumed fit writes
them again: the run ends as the uninterrupted fit's. The cut cannot take another fit's
points: each fit writes only its own run directory, named by its unique run id. Loaded
at idle, the files are left as they are, and the next fit's ``before_fit`` starts a run
of its own, as it would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from callbacks._state import state_keys, state_optional, state_value
from callbacks.metrics import pass_name
from callbacks.monitor import metrics_of
from fsm_learner import Callback, ConfigurationError
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Iterator

    from torch.optim import Optimizer
    from torch.utils.hooks import RemovableHandle
    from torch.utils.tensorboard import SummaryWriter

    from fsm_learner import Learner
    from fsm_learner.callback import MetricsProvider

__all__ = ["HParam", "TensorBoardCB"]

HParam = str | int | float | bool
"""A hyperparameter's value: a string or a number (a bool is written as 0 or 1).

``hparams`` may also give None, written as the string ``"None"``; a number must be one
TensorBoard holds as a float64 exactly (an int beyond 2**53 may not: give it as a str),
and a float finite.
"""

_INSTALL: Final = "pip install 'fsm-learner[tensorboard]'"
_EVENTS: Final = "events.out.tfevents."
"""How the names of the SummaryWriter's event files start."""
_SessionStart = Callable[[dict[str, HParam], dict[str, float]], tuple[object, object, object]]


class _SummarySink(Protocol):
    """The part of the SummaryWriter's file writer that takes a ready ``Summary``."""

    def add_summary(self, summary: object) -> None:
        """Append ``summary`` to the event file."""


def _summary_writer_type() -> type[SummaryWriter]:
    """Return ``SummaryWriter``, or raise ConfigurationError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (an optional extra)
    except ImportError as exc:
        msg = f"TensorBoardCB needs tensorboard, which is not installed ({exc}): {_INSTALL}"
        raise ConfigurationError(msg) from exc
    return SummaryWriter


def _session_start(hparams: dict[str, HParam]) -> object:
    """Return the HParams plugin's session-start ``Summary`` of ``hparams``."""
    from torch.utils.tensorboard.summary import hparams as summaries  # noqa: PLC0415 (the extra)

    _experiment, start, _end = cast("_SessionStart", summaries)(hparams, {})
    return start


def _kept_rate(lr: object) -> float | torch.Tensor:
    """Keep a param group's rate as the step used it: a float, or a copy of its tensor.

    A tensor is copied on its device (no sync) and read back when the rates are written.
    """
    if isinstance(lr, torch.Tensor):
        return lr.detach().clone()
    return float(cast("float", lr))


def _as_floats(rates: list[float | torch.Tensor]) -> Iterator[float]:
    """Return the rates as floats, the tensors among them read back in one transfer."""
    tensors = [
        rate.reshape(()).to(torch.float64) for rate in rates if isinstance(rate, torch.Tensor)
    ]
    if len({t.device for t in tensors}) > 1:  # groups on several devices: one read each
        read: Iterator[float] = (t.item() for t in tensors)
    else:
        read = iter(torch.stack(tensors).tolist() if tensors else [])
    return (next(read) if isinstance(rate, torch.Tensor) else rate for rate in rates)


def _check_log_dir(log_dir: object) -> Path:
    if not isinstance(log_dir, str | os.PathLike) or not os.fspath(log_dir):
        msg = (
            f"TensorBoardCB: log_dir must be a non-empty str or os.PathLike (each fit writes "
            f"<log_dir>/<run_id>), got {type(log_dir).__name__} {log_dir!r}"
        )
        raise ConfigurationError(msg)
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        msg = (
            f"TensorBoardCB: log_dir must be a directory (each fit writes <log_dir>/<run_id>), "
            f"got {os.fspath(log_dir)!r}, which is a file"
        )
        raise ConfigurationError(msg)
    return path


def _check_hparams(hparams: object) -> dict[str, HParam]:
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        msg = (
            f"TensorBoardCB: hparams must be a dict of names to strings or numbers "
            f"({{'weight_decay': 0.01}}, say), got {type(hparams).__name__}"
        )
        raise ConfigurationError(msg)
    return {
        _hparam_name(name, value): _hparam_value(name, value) for name, value in hparams.items()
    }


def _hparam_name(name: object, value: object) -> str:
    if not isinstance(name, str) or not name:
        msg = (
            f"TensorBoardCB: each hparam must have a non-empty str name, got {name!r}: "
            f"{_shown(value)}"
        )
        raise ConfigurationError(msg)
    return name


def _hparam_value(name: str, value: object) -> HParam:
    """Return ``value`` as the HParams tab holds it (None as "None"), or refuse it."""
    if value is None:
        return "None"
    if isinstance(value, str | bool):
        return value
    if not isinstance(value, int | float):
        msg = (
            f"TensorBoardCB: each hparam must be a str, int, float, bool or None, got "
            f"{name!r}: {_shown(value)} ({type(value).__name__})"
        )
        raise ConfigurationError(msg)
    if not _exact_float64(value):
        msg = (
            f"TensorBoardCB: hparam {name!r} is {_shown(value)}, which TensorBoard cannot hold "
            f"as a float64 (it keeps numbers as finite float64s); give a finite float, an int "
            f"within 2**53, or the value as a str"
        )
        raise ConfigurationError(msg)
    return value


def _exact_float64(value: float) -> bool:
    """Whether ``value`` is a finite float64 exactly (an int: one that converts back)."""
    try:
        as_float = float(value)
    except OverflowError:
        return False
    return math.isfinite(as_float) and (isinstance(value, float) or int(as_float) == value)


def _shown(value: object) -> str:
    """``repr(value)``, shortened to 80 characters (an int of 400 digits, say)."""
    if isinstance(value, int) and abs(value) >= 10**60:  # str() of a huge int may refuse
        return f"an int of {int(math.log10(abs(value))) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _run_hparams(learn: Learner) -> dict[str, HParam]:
    """Return what the HParams tab shows of the fit, but its run id (see the module doc)."""
    model = learn.model
    if isinstance(model, DistributedDataParallel):  # across ranks: name the model given
        model = model.module
    hparams: dict[str, HParam] = {
        "n_epochs": learn.n_epochs,
        "lr": learn.lr,
        "optimizer": type(learn.opt).__name__,
        "model": type(model).__name__,
        "world_size": learn.world.size,
    }
    train = learn.dls.train
    if isinstance(train, DataLoader) and train.batch_size is not None:
        hparams["batch_size"] = train.batch_size
    return hparams


def _make_run_dir(run_dir: Path) -> Path | None:
    """Create ``run_dir`` (and its parents); return it when it did not exist before."""
    existed = run_dir.is_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = (
            f"TensorBoardCB: cannot create the run directory {run_dir} ({exc}); give a "
            f"log_dir it can write"
        )
        raise ConfigurationError(msg) from exc
    return None if existed else run_dir


def _event_files(run_dir: Path) -> dict[str, int]:
    """Return the event files of ``run_dir`` by name, with their sizes in bytes."""
    if not run_dir.is_dir():
        return {}
    return {path.name: path.stat().st_size for path in run_dir.glob(f"{_EVENTS}*")}


def _cut_back(run_dir: Path, sizes: Mapping[str, int]) -> None:
    """Cut each event file of ``run_dir`` back to its size in ``sizes`` (0 when absent)."""
    for name, size in _event_files(run_dir).items():
        kept = sizes.get(name, 0)
        if size > kept:
            with (run_dir / name).open("r+b") as fh:
                fh.truncate(kept)


def _check_run(owner: str, run: str) -> str:
    if Path(run).name != run or run == "..":
        msg = f"{owner}: state['run'] must be a directory name (a run id), got {run!r}"
        raise CheckpointError(msg)
    return run


def _check_sizes(owner: str, sizes: dict[Any, Any] | None) -> dict[str, int] | None:
    if sizes is None or all(
        isinstance(name, str) and isinstance(size, int) and not isinstance(size, bool) and size >= 0
        for name, size in sizes.items()
    ):
        return sizes
    msg = (
        f"{owner}: state['files'] must be None or map event file names to sizes in bytes "
        f"(ints >= 0), got {sizes!r}"
    )
    raise CheckpointError(msg)


class TensorBoardCB(Callback):
    """Write each fit's learning rates, metrics and hyperparameters for TensorBoard.

    ``TensorBoardCB("runs/tensorboard", hparams={"weight_decay": 0.01})`` writes each fit
    to ``runs/tensorboard/<run_id>`` (``run_dir``); ``tensorboard --logdir
    runs/tensorboard`` shows them. The module doc lists the tags, their steps and the
    hyperparameters. Order 30: after MetricsCB (20) has computed a pass's values.
    """

    order = 30

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "runs/tensorboard",
        *,
        hparams: Mapping[str, HParam | None] | None = None,
    ) -> None:
        """Check the settings and that tensorboard is installed; nothing is written yet."""
        self._writer_type = _summary_writer_type()
        self.log_dir = _check_log_dir(log_dir)
        self.hparams = _check_hparams(hparams)
        self._run = ""
        self._steps = 0
        self._main = True
        self._fitting = False
        self._provider: MetricsProvider | None = None
        self._fit_hparams: dict[str, HParam] = {}
        self._writer: SummaryWriter | None = None
        self._hook: RemovableHandle | None = None
        self._pending: list[tuple[int, list[float | torch.Tensor]]] = []
        """The rates of the optimizer steps not written yet: (step, rate of each group)."""
        self._made: Path | None = None
        """The run directory ``before_fit`` created, until the fit writes there."""
        self._pass_start: float | None = None

    @property
    def run_dir(self) -> Path:
        """The current (or last) fit's run directory: ``<log_dir>/<run_id>``."""
        return self.log_dir / self._run

    @property
    def steps(self) -> int:
        """The optimizer steps of the current (or last) fit so far, a resumed one's included."""
        return self._steps

    def before_fit(self, learn: Learner) -> None:
        """Start the fit's run: its directory, the step count, the step hook."""
        self._close()
        self._run, self._steps, self._pending = learn.run_id, 0, []
        self._main = learn.world.is_main
        self._made = _make_run_dir(self.run_dir) if self._main else None
        self._provider = metrics_of(learn)
        self._fit_hparams = _run_hparams(learn) | self.hparams
        if learn.opt is not None:
            self._hook = learn.opt.register_step_post_hook(self._after_optimizer_step)
        self._fitting = True

    def _after_optimizer_step(
        self, opt: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Keep each param group's rate at this step (the step hook of the optimizer; no I/O)."""
        step, self._steps = self._steps, self._steps + 1
        if self._main:
            self._pending.append((step, [_kept_rate(group["lr"]) for group in opt.param_groups]))

    def before_epoch(self, learn: Learner) -> None:
        """Start the pass's clock."""
        self._pass_start = time.perf_counter()

    def after_batch(self, learn: Learner) -> None:
        """Write the rates of the optimizer steps taken since the last write.

        A rate held as a tensor (on the device, as capturable optimizers hold it) waits for
        the pass's end: reading it back here would sync with the device every batch.
        """
        if not any(isinstance(rate, torch.Tensor) for _, rates in self._pending for rate in rates):
            self._write_rates()

    def cleanup_epoch(self, learn: Learner) -> None:
        """Write a fit's pass that ended by any route but failure: its values and seconds."""
        start, self._pass_start = self._pass_start, None
        self._write_rates()
        if learn.kind is not RunKind.FIT or learn.failure is not None or not self._main:
            return
        phase = pass_name(learn.training)
        writer = self._open()
        seconds = math.nan if start is None else time.perf_counter() - start
        writer.add_scalar(f"seconds/{phase}", seconds, learn.epoch)
        if self._provider is not None:
            for name, value in self._provider.last_pass().items():
                writer.add_scalar(f"{phase}/{name}", value, learn.epoch)

    def cleanup_fit(self, learn: Learner) -> None:
        """Write the rates kept; remove the step hook; close the writer, whatever the end."""
        try:
            self._write_rates()
        finally:
            self._close()
            self._fitting, self._provider = False, None

    def state_dict(self) -> dict[str, Any]:
        """Return the run directory's name, the steps so far and, in a fit, its event files.

        The files (by name, with their sizes) are listed during a fit on rank 0 only,
        after flushing the writer; None otherwise.
        """
        files = None
        if self._fitting and self._main:
            self._write_rates()
            if self._writer is not None:
                self._writer.flush()
            files = _event_files(self.run_dir)
        return {"run": self._run, "steps": self._steps, "files": files}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on in the saved run directory, from its step count (see the module doc)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("run", "steps", "files"))
        run = _check_run(owner, state_value(owner, state, "run", str, "a str (a run id)"))
        steps = state_value(owner, state, "steps", int, "an int (optimizer steps counted)")
        files = _check_sizes(owner, state_optional(owner, state, "files", dict, "a dict"))
        if steps < 0:
            msg = f"{owner}: state['steps'] must be an int >= 0 (optimizer steps), got {steps}"
            raise CheckpointError(msg)
        self._run, self._steps = run or self._run, steps
        if self._fitting and self._main and files is not None:
            self._forget_made_dir()
            _cut_back(self.run_dir, files)

    def _write_rates(self) -> None:
        """Write the rates the step hook kept, and forget them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        writer = self._open()
        floats = _as_floats([rate for _, rates in pending for rate in rates])
        for step, rates in pending:
            for i in range(len(rates)):
                writer.add_scalar(f"lr/group{i}", next(floats), step)

    def _forget_made_dir(self) -> None:
        """Remove the run directory ``before_fit`` made when nothing was written there."""
        made, self._made = self._made, None
        if made is not None and made != self.run_dir and self._writer is None:
            with contextlib.suppress(OSError):  # not empty after all: leave it
                made.rmdir()

    def _open(self) -> SummaryWriter:
        """Return the run's writer, opening it (and writing the hyperparameters) the first time."""
        writer = self._writer
        if writer is None:
            writer = self._writer = self._writer_type(log_dir=str(self.run_dir))
            sink = cast("_SummarySink", writer.file_writer)
            run: dict[str, HParam] = {"run_id": self._run}
            sink.add_summary(_session_start(self._fit_hparams | run))  # the id is the run's
        return writer

    def _close(self) -> None:
        self._pending = []
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __repr__(self) -> str:
        """Name the log directory besides the class and the order."""
        return f"TensorBoardCB(log_dir={str(self.log_dir)!r}, order={self.order})"
