"""CSVLoggerCB: one row per pass of a fit in a CSV file, appended across fits.

This module owns the CSV file a fit's values go to. Each pass of a fit adds a row:

``epoch``, ``pass``, then the metrics callback's values by name (``loss``, ``accuracy``,
...: ``MetricsCB.last_pass()``), then ``seconds`` and ``complete``:

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

The file: the header is written when the file is new or empty; every fit after that
appends to it. A fit whose columns differ from the file's header fails at ``before_fit``
with a ConfigurationError naming both (give another path, or move the file away), before
anything is written. Each row is written by opening the file, appending and closing it,
so a killed run keeps every row it wrote. Validate and predict runs write nothing. Across
ranks (``learn.world.size`` > 1) only rank 0 (``learn.world.is_main``) checks and writes
the file; the metrics callback's values are the same on every rank. No host-device sync:
the values are the floats the metrics callback computed once per pass.

Checkpoints: ``state_dict()`` holds the file's absolute path and, during a fit on rank 0,
its size then (0 when there is none). Loaded after ``before_fit`` (a resumed fit) into a
callback that writes the same file, it cuts the file back to that size: the rows the
interrupted process wrote past the checkpoint go, and the resumed fit writes them again,
so the file ends as the uninterrupted fit's (the seconds aside). Loaded at idle, the file
is left as it is.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from callbacks._state import state_keys, state_optional, state_value
from callbacks.metrics import PASS_PREFIXES, pass_name
from callbacks.monitor import metrics_of
from fsm_learner import Callback, ConfigurationError
from fsm_learner.exceptions import CheckpointError
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fsm_learner import Learner
    from fsm_learner.callback import MetricsProvider

__all__ = ["CSVLoggerCB"]

_LEADING: Final = ("epoch", "pass")
_TRAILING: Final = ("seconds", "complete")


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
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        return next(csv.reader(fh), [])


def _no_provider(learn: Learner) -> ConfigurationError:
    have = ", ".join(type(cb).__name__ for cb in learn.cbs)
    return ConfigurationError(
        f"CSVLoggerCB writes the values of a metrics callback, and learn.cbs has none "
        f"(callbacks: {have}); add callbacks.MetricsCB() (with no metrics it reports the "
        f"loss alone), or any fsm_learner.MetricsProvider"
    )


class CSVLoggerCB(Callback):
    """Append a row per pass of each fit to a CSV file: epoch, pass, values, seconds.

    ``CSVLoggerCB("runs/metrics.csv")`` with ``MetricsCB(MulticlassAccuracy(10))`` writes
    the columns ``epoch,pass,loss,accuracy,seconds,complete``; ``csv.DictReader`` or
    ``pandas.read_csv`` reads them back. The module doc says what each column holds,
    when the header is written, and what a cancelled pass and a resumed fit write.
    Order 30: after MetricsCB (20) has computed a pass's values.
    """

    order = 30

    def __init__(self, path: str | os.PathLike[str] = "runs/metrics.csv") -> None:
        """Check the path; nothing is written until a pass of a fit ends."""
        self.path = _check_path(path)
        self._columns: tuple[str, ...] = ()
        self._provider: MetricsProvider | None = None
        self._main = True
        self._fitting = False
        self._completed = False
        self._pass_start: float | None = None

    @property
    def columns(self) -> list[str]:
        """The current (or last) fit's columns; empty before the first fit."""
        return list(self._columns)

    def before_fit(self, learn: Learner) -> None:
        """Find the metrics callback, work out the columns, check the file's header."""
        provider = metrics_of(learn)
        if provider is None:
            raise _no_provider(learn)
        columns = _columns(provider.names())
        self._main = learn.world.is_main
        header = _header(self.path) if self._main else None
        if header is not None and header != list(columns):
            msg = (
                f"CSVLoggerCB: {self.path} has the columns {header}, this fit's are "
                f"{list(columns)}; give CSVLoggerCB another path, or move the file away"
            )
            raise ConfigurationError(msg)
        self._provider, self._columns, self._fitting = provider, columns, True

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
            values = provider.last_pass()
            row = {"epoch": learn.epoch, "pass": pass_name(learn.training), **values}
            self._append(row | {"seconds": seconds, "complete": completed})

    def cleanup_fit(self, learn: Learner) -> None:
        """Forget the fit: a state loaded from now on leaves the file alone."""
        self._fitting, self._provider = False, None

    def state_dict(self) -> dict[str, Any]:
        """Return the file's absolute path and, during a fit on rank 0, its size now."""
        size = None
        if self._fitting and self._main:
            size = self.path.stat().st_size if self.path.is_file() else 0
        return {"path": str(self.path.absolute()), "size": size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """In a resumed fit, cut the file back to its size at the checkpoint (module doc)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("path", "size"))
        path = state_value(owner, state, "path", str, "a str (the file's absolute path)")
        size = state_optional(owner, state, "size", int, "an int (the file's size in bytes)")
        if size is not None and size < 0:
            msg = f"{owner}: state['size'] must be None or an int >= 0, got {size}"
            raise CheckpointError(msg)
        same_file = path == str(self.path.absolute())
        if self._fitting and self._main and size is not None and same_file:
            _cut(self.path, size)

    def _append(self, row: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if fh.tell() == 0:
                writer.writerow(self._columns)
            writer.writerow([row.get(column, math.nan) for column in self._columns])

    def __repr__(self) -> str:
        """Name the file besides the class and the order."""
        return f"CSVLoggerCB(path={str(self.path)!r}, order={self.order})"


def _cut(path: Path, size: int) -> None:
    """Truncate ``path`` to ``size`` bytes when it is longer."""
    if path.is_file() and path.stat().st_size > size:
        with path.open("r+b") as fh:
            fh.truncate(size)
