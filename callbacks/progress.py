"""ProgressCB: progress bars with a live loss on a terminal, plain lines elsewhere, a table.

This module owns what a fit prints. On a terminal (``console.is_terminal``) it shows two
rich progress bars, the epochs of the fit and the batches of the current pass, with the
latest loss; otherwise it writes one plain line per pass, for logs and CI. Either way
every pass ends with a summary line and the fit with a table of the values per epoch:
MetricsCB's when the learner has one, else the mean loss ProgressCB keeps itself.

The live loss is the only host-device sync ProgressCB makes per batch, and it is
throttled: ``learn.loss`` is read at most once every ``refresh_s`` seconds (0.25 by
default), and only on a terminal. The per-pass loss without MetricsCB is summed on the
device and read once per pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sized
from typing import IO, TYPE_CHECKING, Final

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

from callbacks.metrics import PASS_PREFIXES, MetricsCB, RunningMean, batch_size, metrics_of
from fsm_learner import Callback, ConfigurationError

if TYPE_CHECKING:
    from fsm_learner import Learner

__all__ = ["ProgressCB"]

_TIME: Final = "time"


def _format_value(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _pass_name(training: bool) -> str:
    return PASS_PREFIXES[0] if training else PASS_PREFIXES[1]


def _length(dl: object) -> int | None:
    return len(dl) if isinstance(dl, Sized) else None


class ProgressCB(Callback):
    """Show a fit's progress: bars and a live loss on a terminal, plain lines otherwise.

    Output goes to ``console`` (a rich Console) or, when only ``file`` is given, to a
    Console on that stream; by default to standard output. Each pass ends with a line such
    as ``epoch 1/3 train loss 0.5120 accuracy 0.8710 1.2s`` (``(cancelled)`` added when the
    pass was), and the fit with a per-epoch table (``table=False`` leaves it out). On a
    terminal the displayed loss and bars refresh at most every ``refresh_s`` seconds, the
    only time ProgressCB reads the loss back from the device during a pass. Order 40:
    after MetricsCB (20), so a pass's values are ready when its line is printed.
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
        """Check the settings; nothing is printed until a fit starts."""
        if file is not None and console is not None:
            msg = "ProgressCB: give file or console, not both (a console has its own file)"
            raise ConfigurationError(msg)
        if isinstance(refresh_s, bool) or not isinstance(refresh_s, int | float) or refresh_s < 0:
            msg = f"ProgressCB: refresh_s must be a number of seconds >= 0, got {refresh_s!r}"
            raise ConfigurationError(msg)
        self.console = console if console is not None else Console(file=file)
        self.refresh_s = float(refresh_s)
        self.table = table
        self.live_loss_reads = 0
        """How many times the live loss was read from the device (each one a sync)."""
        self._progress: Progress | None = None
        self._fit_task: TaskID | None = None
        self._pass_task: TaskID | None = None
        self._metrics: MetricsCB | None = None
        self._loss = RunningMean()
        self._rows: dict[int, dict[str, float]] = {}
        self._pass_start = 0.0
        self._next_refresh = 0.0

    @property
    def is_terminal(self) -> bool:
        """Whether the output is a terminal (bars) rather than a stream (plain lines)."""
        return self.console.is_terminal

    def before_fit(self, learn: Learner) -> None:
        """Find MetricsCB; on a terminal, start the bars."""
        self._metrics = metrics_of(learn)
        self._rows = {}
        self.live_loss_reads = 0
        self._next_refresh = 0.0
        if self.is_terminal:
            self._start_bars(learn.n_epochs)

    def before_epoch(self, learn: Learner) -> None:
        """Start timing the pass, and reset its bar."""
        self._pass_start = time.monotonic()
        self._loss.reset()
        if self._progress is not None and self._pass_task is not None:
            description = f"epoch {learn.epoch + 1}/{learn.n_epochs} {_pass_name(learn.training)}"
            self._progress.reset(
                self._pass_task, total=_length(learn.dl), description=description, loss=""
            )
            self._progress.refresh()

    def after_batch(self, learn: Learner) -> None:
        """Advance the bar; refresh the live loss when ``refresh_s`` has passed."""
        if self._metrics is None:
            self._loss.add(learn.loss, batch_size(learn.batch))
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
        """Print the pass's line; a validation pass completes an epoch on the fit bar."""
        self._end_pass(learn, cancelled=False)

    def after_cancel_epoch(self, learn: Learner) -> None:
        """Print the cancelled pass's line."""
        self._end_pass(learn, cancelled=True)

    def after_fit(self, learn: Learner) -> None:  # noqa: ARG002 (the hook's signature)
        """Stop the bars and print the table."""
        self._finish()

    def after_cancel_fit(self, learn: Learner) -> None:  # noqa: ARG002 (the hook's signature)
        """Stop the bars and print the table of the epochs that ran."""
        self._finish()

    def after_fail(self, learn: Learner) -> None:  # noqa: ARG002 (the hook's signature)
        """Stop the bars, so the terminal is usable for the traceback."""
        self._stop_bars()

    # -- the pass's values and lines ---------------------------------------------------

    def _end_pass(self, learn: Learner, *, cancelled: bool) -> None:
        seconds = time.monotonic() - self._pass_start
        values = self._pass_values(learn.training)
        row = self._rows.setdefault(learn.epoch, {"epoch": learn.epoch + 1, _TIME: 0.0})
        row.update(values)
        row[_TIME] += seconds
        self._pass_start = time.monotonic()  # so a pass cancelled before it began shows its own
        self._loss.reset()
        line = self._line(learn, values, seconds, cancelled=cancelled)
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
            if not learn.training and self._fit_task is not None:
                self._progress.advance(self._fit_task)
            self._progress.refresh()
        else:
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def _pass_values(self, training: bool) -> dict[str, float]:
        prefix = _pass_name(training) + "_"
        if self._metrics is None:
            return {f"{prefix}loss": float(self._loss.mean())}  # one sync per pass
        return {k: v for k, v in self._metrics.values.items() if k.startswith(prefix)}

    @staticmethod
    def _line(learn: Learner, values: dict[str, float], seconds: float, *, cancelled: bool) -> str:
        phase = _pass_name(learn.training)
        cut = len(phase) + 1
        shown = [f"{key[cut:]} {_format_value(v)}" for key, v in values.items()]
        line = " ".join(
            [f"epoch {learn.epoch + 1}/{learn.n_epochs} {phase}", *shown, f"{seconds:.1f}s"]
        )
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

    def _finish(self) -> None:
        self._stop_bars()
        if self.table and self._rows:
            self._print_table()

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
