"""ProgressCB: progress bars with a live loss on a terminal, plain lines elsewhere, a table.

This module owns what a run prints. On a terminal (``console.is_terminal``) a fit shows
two rich progress bars, the epochs of the fit and the batches of the current pass, with
the latest loss; otherwise it writes one plain line per pass, for logs and CI. Either way
every pass ends with a summary line and the fit with a table of the values per epoch:
the metrics callback's (``last_pass()``) when the learner has one, else the mean loss
ProgressCB keeps itself. A validate run prints its one line (``validate loss ...``); a
predict run, which has no loss, prints nothing.

The lines and the table are printed when their unit ends by any route (``cleanup_epoch``,
``cleanup_fit``), so a pass cut short by a cancel gets its line, marked ``(cancelled)``,
before the table; after a failure only the bars are stopped, leaving the terminal to the
traceback.

Across ranks (a fit under torch.distributed, ``learn.world.size`` > 1) only rank 0
(``learn.world.is_main``, read at ``before_fit``) prints and draws: the other ranks keep
the same rows and running loss (their checkpoints hold them) and print nothing, so a
torchrun job shows one progress. The values shown are MetricsCB's, the same on every
rank (over every rank's samples); without a metrics callback the loss shown is rank 0's
own mean, over its share of the batches. A validate or predict run is on one process
(``learn.world`` is ``LOCAL`` there): every process that runs one prints its line.

The live loss is the only host-device sync ProgressCB makes per batch, and it is
throttled: ``learn.loss`` is read at most once every ``refresh_s`` seconds (0.25 by
default), and only on a terminal. The per-pass loss without MetricsCB is summed on the
device and read once per pass.

Checkpoints: ``state_dict()`` holds the rows of the fit's table so far and, without a
metrics callback, the current pass's running loss (sum and count), so a resumed fit's
lines and table show the same values as the uninterrupted fit's. A resumed pass's time
counts from the resume; the bars, the refresh clock and ``live_loss_reads`` are this
process's display and are not kept. The table is per fit: loaded at idle, the rows are
dropped by the next fit's ``before_fit``, as they would have been.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from typing import IO, TYPE_CHECKING, Any, Final

try:
    from rich import box
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table
except ModuleNotFoundError as exc:  # pragma: no cover (rich is in the extra)
    msg = "callbacks.progress needs rich: pip install 'fsm-learner[callbacks]'"
    raise ModuleNotFoundError(msg) from exc

from callbacks._checks import check_number
from callbacks._state import state_keys, state_list, state_value
from callbacks.metrics import PASS_PREFIXES, RunningMean, pass_name
from callbacks.monitor import metrics_of
from fsm_learner import Callback, ConfigurationError
from fsm_learner.batch import batch_size
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import MetricsProvider

__all__ = ["ProgressCB"]

_TIME: Final = "time"


def _format_value(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _length(dl: object) -> int | None:
    return len(dl) if isinstance(dl, Sized) else None


class ProgressCB(Callback):
    """Show a run's progress: bars and a live loss on a terminal, plain lines otherwise.

    Output goes to ``console`` (a rich Console) or, when only ``file`` is given, to a
    Console on that stream; by default to standard output. Each pass of a fit ends with a
    line such as ``epoch 1/3 train loss 0.5120 accuracy 0.8710 1.2s`` (``(cancelled)``
    added when the pass was), and the fit with a per-epoch table (``table=False`` leaves
    it out); a validate run prints ``validate loss 0.4410 accuracy 0.8900 0.3s``; a
    predict run prints nothing. On a terminal the displayed loss and bars refresh at most
    every ``refresh_s`` seconds, the only time ProgressCB reads the loss back from the
    device during a pass. Order 40: after MetricsCB (20), so a pass's values are ready
    when its line is printed.
    """

    order = 40

    def __init__(
        self,
        *,
        file: IO[str] | None = None,
        console: Console | None = None,
        refresh_s: float = 0.25,
        table: bool = True,
    ) -> None:
        """Check the settings; nothing is printed until a run starts."""
        if file is not None and console is not None:
            msg = "ProgressCB: give file or console, not both (a console has its own file)"
            raise ConfigurationError(msg)
        self.refresh_s = check_number("refresh_s", refresh_s, finite=False)
        self.console = console if console is not None else Console(file=file)
        self.table = table
        self.live_loss_reads = 0
        """How many times the live loss was read from the device (each one a sync)."""
        self._progress: Progress | None = None
        self._fit_task: TaskID | None = None
        self._pass_task: TaskID | None = None
        self._metrics: MetricsProvider | None = None
        self._loss = RunningMean()
        self._rows: dict[int, dict[str, float]] = {}
        self._pass_start = 0.0
        self._pass_completed = False
        self._next_refresh = 0.0
        self._shown = True
        """Whether this process prints: rank 0 of a fit across ranks, any process else."""

    @property
    def is_terminal(self) -> bool:
        """Whether the output is a terminal (bars) rather than a stream (plain lines)."""
        return self.console.is_terminal

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics callback; on a terminal, start the bars (on rank 0 only)."""
        self._metrics = metrics_of(learn)
        self._shown = learn.world.is_main
        self._rows = {}
        self.live_loss_reads = 0
        self._next_refresh = 0.0
        if self.is_terminal and self._shown:
            self._start_bars(learn.n_epochs)

    def before_epoch(self, learn: Learner) -> None:
        """Start timing the pass, and reset its bar; a validate run finds its metrics here."""
        if learn.kind is RunKind.VALIDATE:  # no before_fit
            self._metrics = metrics_of(learn)
            self._shown = learn.world.is_main
        self._pass_start = time.monotonic()
        self._loss.reset()
        if self._progress is not None and self._pass_task is not None:
            description = f"epoch {learn.epoch + 1}/{learn.n_epochs} {pass_name(learn.training)}"
            self._progress.reset(
                self._pass_task, total=_length(learn.dl), description=description, loss=""
            )
            self._progress.refresh()

    def after_batch(self, learn: Learner) -> None:
        """Advance the bar; refresh the live loss when ``refresh_s`` has passed."""
        if learn.kind is RunKind.PREDICT:  # no loss
            return
        if self._metrics is None:
            self._loss.add(learn.loss, batch_size(learn.batch, learn.target_key))
        if self._progress is None or self._pass_task is None:
            return
        self._progress.advance(self._pass_task)
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_s
            self.live_loss_reads += 1
            loss = float(learn.loss.detach())  # the throttled sync
            self._progress.update(self._pass_task, loss=f"loss {loss:.4f}")
            self._progress.refresh()

    def after_epoch(self, learn: Learner) -> None:
        """Mark the pass complete: its line, printed when it ends, is not ``(cancelled)``."""
        self._pass_completed = True

    def cleanup_epoch(self, learn: Learner) -> None:
        """Print the pass's line, unless the run failed or predicts."""
        completed, self._pass_completed = self._pass_completed, False
        if learn.kind is not RunKind.PREDICT and learn.failure is None:
            self._end_pass(learn, cancelled=not completed)

    def cleanup_fit(self, learn: Learner) -> None:
        """Stop the bars; print the table of the epochs that ran, unless the fit failed."""
        self._stop_bars()
        if learn.failure is None and self.table and self._rows and self._shown:
            self._print_table()

    def state_dict(self) -> dict[str, Any]:
        """Return the table's rows so far and the pass's running loss (see the module doc)."""
        return {"rows": [dict(row) for row in self._rows.values()], "loss": self._loss.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the rows and the running loss, at idle or after before_fit/before_epoch."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("rows", "loss"))
        rows = state_list(owner, state, "rows", dict, "dicts (one table row per epoch)")
        if not all(isinstance(row.get("epoch"), int) for row in rows):
            msg = f"{owner}: each of state['rows'] must have an int 'epoch' (from 1), got {rows!r}"
            raise CheckpointError(msg)
        self._loss.load_state_dict(state_value(owner, state, "loss", dict, "a dict"), owner)
        self._rows = {int(row["epoch"]) - 1: dict(row) for row in rows}

    # -- the pass's values and lines ---------------------------------------------------

    def _end_pass(self, learn: Learner, *, cancelled: bool) -> None:
        seconds = time.monotonic() - self._pass_start
        values = self._pass_values()
        self._pass_start = time.monotonic()  # so a pass cancelled before it began shows its own
        self._loss.reset()
        if learn.kind is RunKind.FIT:
            prefix = pass_name(learn.training)
            row = self._rows.setdefault(learn.epoch, {"epoch": learn.epoch + 1, _TIME: 0.0})
            row.update((f"{prefix}_{name}", value) for name, value in values.items())
            row[_TIME] += seconds
        self._print_line(learn, self._line(learn, values, seconds, cancelled=cancelled))

    def _pass_values(self) -> dict[str, float]:
        if self._metrics is None:
            return {"loss": float(self._loss.mean())}  # one sync per pass
        return dict(self._metrics.last_pass())

    def _print_line(self, learn: Learner, line: str) -> None:
        if not self._shown:
            return
        progress = self._progress
        if progress is not None:
            progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            if not learn.training and self._fit_task is not None:
                progress.advance(self._fit_task)
            progress.refresh()
        elif self.is_terminal:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    @staticmethod
    def _line(learn: Learner, values: dict[str, float], seconds: float, *, cancelled: bool) -> str:
        if learn.kind is RunKind.FIT:
            head = f"epoch {learn.epoch + 1}/{learn.n_epochs} {pass_name(learn.training)}"
        else:
            head = str(learn.kind)
        shown = [f"{name} {_format_value(v)}" for name, v in values.items()]
        line = " ".join([head, *shown, f"{seconds:.1f}s"])
        return line + " (cancelled)" if cancelled else line

    # -- bars and table ----------------------------------------------------------------

    def _start_bars(self, n_epochs: int) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            auto_refresh=False,  # refreshed by ProgressCB at its own pace, no thread
        )
        self._progress.start()
        self._fit_task = self._progress.add_task("fit", total=n_epochs, loss="")
        self._pass_task = self._progress.add_task("pass", total=None, loss="")

    def _stop_bars(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._fit_task = self._pass_task = None

    def _columns(self) -> list[str]:
        keys: list[str] = []
        for row in self._rows.values():
            keys += [k for k in row if k not in {"epoch", _TIME, *keys}]
        return ["epoch", *sorted(keys, key=_column_key), _TIME]

    def _print_table(self) -> None:
        columns = self._columns()
        cells = [[_cell(row, column) for column in columns] for row in self._rows.values()]
        if self.is_terminal:
            table = Table(title="metrics per epoch", box=box.SIMPLE_HEAVY)
            for column in columns:
                table.add_column(column, justify="right")
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
            return
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        for line in [columns, *cells]:
            self.console.file.write(
                "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
            )
            self.console.file.write("\n")
        self.console.file.flush()


def _column_key(key: str) -> tuple[int, int]:
    """Training values first, then validation; the loss first within each."""
    phase = 0 if key.startswith(PASS_PREFIXES[0] + "_") else 1
    return phase, 0 if key.endswith("_loss") else 1


def _cell(row: dict[str, float], column: str) -> str:
    if column == "epoch":
        return str(int(row["epoch"]))
    if column == _TIME:
        return f"{row[_TIME]:.1f}s"
    return _format_value(row.get(column, math.nan))
