"""CSVLoggerCB: one row per pass of a fit in a CSV file, appended across fits.

This module owns the CSV file a fit's values go to. Each pass of a fit adds a row:

``run_id``, ``epoch``, ``pass``, then the metrics callback's values by name (``loss``,
``accuracy``, ...: ``MetricsCB.last_pass()``), then ``seconds`` and ``complete``:

- ``run_id`` is the fit's ``learn.run_id``, which names its audit log
  (``<audit_log>/<run_id>.jsonl``) and its TensorBoard run (``<log_dir>/<run_id>``); a
  resumed fit goes on writing the run id of the fit it resumes (as TensorBoardCB goes on
  in that run's directory; the resumed fit's own audit log names it in
  ``resumed_from``), so the rows of one run tell apart the fits that share the file;
- ``epoch`` counts from 0 (as ``MetricsCB.history``); ``pass`` is ``train`` or ``valid``;
- the values are written as Python writes floats (``repr``: a float read back with
  ``float()`` is the same float), ``nan`` for a value the pass did not produce;
- ``seconds`` is the pass's wall time, ``time.perf_counter`` from its ``before_epoch``
  to its end (host time: the metrics callback reads its values back at the pass end, so
  the device's work is in it);
- ``complete`` is ``True`` for a pass that ran all its batches (its ``after_epoch``
  ran), ``False`` for one cut short by a cancel, whose row holds what its completed
  batches gave, as the metrics callback reports it. A pass that fails writes no row.

The rows need a metrics callback (``callbacks.MetricsCB``, or any ``MetricsProvider``;
``MetricsCB()`` with no metrics reports the loss alone): a fit without one fails at
``before_fit`` with a ConfigurationError saying so. Its ``names()`` decide the columns.

The file, checked at ``before_fit`` before anything trains: its parent directories are
created, it is opened for appending once, and the header is written when the file is
new or empty; every fit after that appends to it. Each of these fails the fit there with
a ConfigurationError naming the file: a place that cannot be written, an existing file
whose header cannot be read as CSV, a header other than this fit's columns (naming
both: give another path, or move the file away), and a second CSVLoggerCB in
``learn.cbs`` writing the same file (which would write every row twice). Each row is
written by opening the file, appending and closing it, so a killed run keeps every row
it wrote. Validate and predict runs write nothing. Across ranks (``learn.world.size`` >
1) only rank 0 (``learn.world.is_main``) checks and writes the file; the metrics
callback's values are the same on every rank. No host-device sync: the values are the
floats the metrics callback computed once per pass.

Checkpoints: ``state_dict()`` holds the file's absolute path, the run id, the columns
and, during a fit on rank 0, the count of rows the run had written then (None
otherwise). Loaded after ``before_fit`` (a resumed fit) into a callback that writes the
same file, it removes the rows of that run id past that count (those the interrupted
process wrote after the checkpoint; the resumed fit writes them again) and leaves every
other row, the other fits' among them: the file is rewritten whole (a temporary file in
its directory, then ``os.replace``), and left untouched when no row goes. A file whose
header is no longer the checkpoint's columns is refused (CheckpointError) rather than
guessed at. The run's rows then end as the uninterrupted fit's (the seconds aside).
Loaded at idle, the file is left as it is.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from callbacks._state import state_keys, state_list, state_optional, state_value
from callbacks.metrics import PASS_PREFIXES, pass_name
from callbacks.monitor import metrics_of
from fsm_learner import Callback, ConfigurationError
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import MetricsProvider

__all__ = ["CSVLoggerCB"]

_LEADING: Final = ("run_id", "epoch", "pass")
_TRAILING: Final = ("seconds", "complete")
_MOVE_AWAY: Final = "give CSVLoggerCB another path, or move the file away"


def _check_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        msg = (
            f"CSVLoggerCB: path must be a non-empty str or os.PathLike (the CSV file), got "
            f"{type(path).__name__} {path!r}"
        )
        raise ConfigurationError(msg)
    target = Path(path)
    if target.is_dir():
        msg = f"CSVLoggerCB: path must name a file, got the directory {os.fspath(path)!r}"
        raise ConfigurationError(msg)
    return target


def _columns(names: list[str]) -> tuple[str, ...]:
    """Return the file's columns for a provider's ``<pass>_<name>`` keys (see the module doc)."""
    by_name: dict[str, None] = {}
    for key in names:
        prefix, _, name = key.partition("_")
        by_name[name if prefix in PASS_PREFIXES and name else key] = None
    clash = [name for name in by_name if name in (*_LEADING, *_TRAILING)]
    if clash:
        msg = (
            f"CSVLoggerCB: the metrics callback names a value {clash[0]!r}, a column "
            f"CSVLoggerCB writes itself ({', '.join(_LEADING + _TRAILING)}); rename the metric"
        )
        raise ConfigurationError(msg)
    return (*_LEADING, *by_name, *_TRAILING)


def _header(path: Path) -> list[str] | None:
    """Return the file's header, or None when there is no file or it is empty."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            return next(csv.reader(fh), [])
    except (OSError, csv.Error) as exc:
        msg = f"CSVLoggerCB: cannot read the header of {path} as CSV ({exc}); {_MOVE_AWAY}"
        raise ConfigurationError(msg) from exc


def _open_for_rows(path: Path, columns: tuple[str, ...]) -> None:
    """Create the file's directories, open it for appending once, write a new file's header."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="", encoding="utf-8") as fh:
            if fh.tell() == 0:
                csv.writer(fh).writerow(columns)
    except OSError as exc:
        msg = f"CSVLoggerCB: cannot write the CSV file {path} ({exc}); give a path it can write"
        raise ConfigurationError(msg) from exc


def _no_provider(learn: Learner) -> ConfigurationError:
    have = ", ".join(type(cb).__name__ for cb in learn.cbs)
    return ConfigurationError(
        f"CSVLoggerCB writes the values of a metrics callback, and learn.cbs has none "
        f"(callbacks: {have}); add callbacks.MetricsCB() (with no metrics it reports the "
        f"loss alone), or any fsm_learner.MetricsProvider"
    )


def _check_one_writer(me: CSVLoggerCB, cbs: Iterable[object]) -> None:
    """Refuse a second CSVLoggerCB in ``cbs`` whose path is the same file as ``me``'s."""
    mine = me.path.resolve()
    for cb in cbs:
        if cb is not me and isinstance(cb, CSVLoggerCB) and cb.path.resolve() == mine:
            msg = (
                f"CSVLoggerCB: learn.cbs has two CSVLoggerCB writing {mine} ({me!r} and "
                f"{cb!r}), which would write every row twice; keep one, or give each a path "
                f"of its own"
            )
            raise ConfigurationError(msg)


class CSVLoggerCB(Callback):
    """Append a row per pass of each fit to a CSV file: run id, epoch, pass, values, seconds.

    ``CSVLoggerCB("runs/metrics.csv")`` with ``MetricsCB(MulticlassAccuracy(10))`` writes
    the columns ``run_id,epoch,pass,loss,accuracy,seconds,complete``; ``csv.DictReader``
    or ``pandas.read_csv`` reads them back. The module doc says what each column holds,
    when the file is checked and the header written, and what a cancelled pass and a
    resumed fit write. Order 30: after MetricsCB (20) has computed a pass's values.
    """

    order = 30

    def __init__(self, path: str | os.PathLike[str] = "runs/metrics.csv") -> None:
        """Check the path; the file is opened at the start of a fit."""
        self.path = _check_path(path)
        self._columns: tuple[str, ...] = ()
        self._provider: MetricsProvider | None = None
        self._run = ""
        self._written = 0
        self._main = True
        self._fitting = False
        self._completed = False
        self._pass_start: float | None = None

    @property
    def columns(self) -> list[str]:
        """The current (or last) fit's columns; empty before the first fit."""
        return list(self._columns)

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics callback, work out the columns, check and open the file."""
        provider = metrics_of(learn)
        if provider is None:
            raise _no_provider(learn)
        columns = _columns(provider.names())
        _check_one_writer(self, learn.cbs)
        self._main = learn.world.is_main
        if self._main:
            header = _header(self.path)
            if header is not None and header != list(columns):
                msg = (
                    f"CSVLoggerCB: {self.path} has the columns {header}, this fit's are "
                    f"{list(columns)}; {_MOVE_AWAY}"
                )
                raise ConfigurationError(msg)
            _open_for_rows(self.path, columns)
        self._provider, self._columns, self._fitting = provider, columns, True
        self._run, self._written = learn.run_id, 0

    def before_epoch(self, learn: Learner) -> None:
        """Start the pass's clock."""
        self._pass_start, self._completed = time.perf_counter(), False

    def after_epoch(self, learn: Learner) -> None:
        """Mark the pass complete."""
        self._completed = True

    def cleanup_epoch(self, learn: Learner) -> None:
        """Write the row of a fit's pass that ended by any route but failure."""
        start, self._pass_start = self._pass_start, None
        completed, self._completed = self._completed, False
        provider = self._provider
        if learn.kind is not RunKind.FIT or learn.failure is not None or provider is None:
            return
        if self._main:
            seconds = math.nan if start is None else time.perf_counter() - start
            row = {"run_id": self._run, "epoch": learn.epoch, "pass": pass_name(learn.training)}
            row |= provider.last_pass()
            self._append(row | {"seconds": seconds, "complete": completed})

    def cleanup_fit(self, learn: Learner) -> None:
        """Forget the fit: a state loaded from now on leaves the file alone."""
        self._fitting, self._provider = False, None

    def state_dict(self) -> dict[str, Any]:
        """Return the file's path, the run id, the columns and, in a fit, the rows written.

        The rows (those of the run so far) are counted during a fit on rank 0 only; None
        otherwise.
        """
        rows = self._written if self._fitting and self._main else None
        return {
            "path": str(self.path.absolute()),
            "run": self._run,
            "columns": list(self._columns),
            "rows": rows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """In a resumed fit, go on with the saved run, removing its rows past the checkpoint.

        Only that run's rows written after the checkpoint go (see the module doc).
        """
        owner = type(self).__name__
        state = state_keys(owner, state, ("path", "run", "columns", "rows"))
        path = state_value(owner, state, "path", str, "a str (the file's absolute path)")
        run = state_value(owner, state, "run", str, "a str (the run id of the rows)")
        columns = state_list(owner, state, "columns", str, "str (the file's header)")
        rows = state_optional(owner, state, "rows", int, "an int (the run's rows written)")
        if rows is not None and rows < 0:
            msg = f"{owner}: state['rows'] must be None or an int >= 0, got {rows}"
            raise CheckpointError(msg)
        same_file = path == str(self.path.absolute())
        if self._fitting and self._main and rows is not None and same_file:
            _drop_rows_past(self.path, columns, run, rows)
            self._run, self._written = run, rows

    def _append(self, row: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if fh.tell() == 0:
                writer.writerow(self._columns)
            writer.writerow([row.get(column, math.nan) for column in self._columns])
        self._written += 1

    def __repr__(self) -> str:
        """Name the file besides the class and the order."""
        return f"CSVLoggerCB(path={str(self.path)!r}, order={self.order})"


def _drop_rows_past(path: Path, columns: list[str], run: str, keep: int) -> None:
    """Remove the rows of ``run`` after its first ``keep`` from ``path``, atomically."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    table = _read_rows(path)
    if table[0] != columns:
        msg = (
            f"CSVLoggerCB: {path} has the columns {table[0]}, the checkpoint's rows were "
            f"written under {columns}; the file changed since the checkpoint, so which rows "
            f"to remove is unknown: restore the file, or resume with another path"
        )
        raise CheckpointError(msg)
    kept, seen = [table[0]], 0
    for row in table[1:]:
        ours = bool(row) and row[0] == run
        seen += ours
        if not ours or seen <= keep:
            kept.append(row)
    if len(kept) < len(table):
        _replace(path, kept)


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        msg = f"CSVLoggerCB: cannot read {path} as CSV to resume its run's rows ({exc})"
        raise CheckpointError(msg) from exc


def _replace(path: Path, rows: list[list[str]]) -> None:
    """Write ``rows`` to a temporary file beside ``path``, then put it in ``path``'s place."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)
        temp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
