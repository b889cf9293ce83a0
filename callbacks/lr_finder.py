"""LRFinderCB and ``lr_find``: an exponential learning-rate sweep that suggests a rate.

Over ``num_it`` training batches the learning rate of every parameter group grows
exponentially from ``start_lr`` to ``end_lr`` (set in ``before_batch``; order 70, after
any scheduler, so the sweep wins; ``lr_find`` runs none). After each batch the loss is
smoothed (an exponential moving average with bias correction) and recorded with its
rate in ``lrs``/``losses``. The sweep ends in one of two ways:

- the smoothed loss exceeds ``div`` times the best so far (or is not finite): a
  ``lr_finder`` note says so, and ``CancelFitException`` ends the fit, whose audit log
  then has status ``cancelled``;
- ``num_it`` batches were recorded: the rest of the training pass is cancelled and every
  later pass is cancelled as it begins (``CancelEpochException``), so the fit completes.

Validation passes are skipped (cancelled as they begin). Whatever the ending (failure
included: ``cleanup_fit``), the model's state dict and the optimizer's state dict
(learning rates and the other hyperparameters of each param group, momentum buffers)
are loaded back as ``keep_state`` took them (in ``before_fit``, unless taken before):
the sweep leaves no trace but ``lrs``, ``losses`` and the audit log. The random number
generators are not restored. Validate and predict runs (``learn.kind`` is not
``RunKind.FIT``) are no sweep: the finder does nothing in them.

``lr_find(learn, ...)`` runs a sweep: it fits with the finder added to ``learn.cbs`` for
as many epochs as ``num_it`` batches need (``ceil(num_it / len(train))``; ``num_it``
epochs when the training data loader has no ``len()``), then removes it. The learner's
optimizer persists across fits, so ``lr_find`` leaves it as it found it: none when there
was none (the sweep's own is dropped), else the same optimizer with the state it had
when ``lr_find`` was called (kept before the fit starts, so before anything that runs
at a fit's start changes it), keys and values of every param group included. The
sweep's passes are not epochs of training, so ``lr_find`` takes out of ``learn.cbs`` for
the sweep, and puts back after, the callbacks that treat them as such: ProgressCB (it
would print a line per cancelled pass and a table), BatchSchedCB and EpochSchedCB
(their schedules would fight the sweep for the rate), SaveModelCB (it would count the
sweep's passes as epochs), CheckpointCB (a sweep is no fit to resume: it would leave
checkpoints a restart would take for the fit's), CSVLoggerCB and TensorBoardCB (the
sweep's passes would be rows and runs of the experiment's log) and any other LRFinderCB.
``suggestion()`` proposes a rate, ``plot(path)`` draws the curve (matplotlib, the
``callbacks`` extra).

Checkpoints: ``state_dict()`` holds the sweep so far (``lrs``, ``losses``, ``diverged``,
the smoothing average and the best smoothed loss) and ``kept``, the model's and
optimizer's state dicts that the sweep's end loads back (None when none is kept: at idle,
after the sweep). Loaded after ``before_fit`` (a resumed sweep; ``before_fit`` kept the
resume point's weights), the sweep goes on at the same rates and still ends by loading
back the weights from before it. Loaded at idle, the curve is there for ``suggestion()``
and ``plot()``; the next sweep starts afresh. ``lr_find`` itself is one call: a sweep it
ran that a preemption stopped is run again rather than resumed through it.

Host-device sync: once per training batch, to read the loss. It is inherent: deciding
after each batch whether the loss diverged needs its value on the host.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import torch

from callbacks._checks import check_count, check_number
from callbacks._state import state_keys, state_list, state_optional, state_value
from callbacks.checkpoint import CheckpointCB
from callbacks.csv_logger import CSVLoggerCB
from callbacks.progress import ProgressCB
from callbacks.save_model import SaveModelCB
from callbacks.schedulers import BatchSchedCB, EpochSchedCB
from callbacks.tensorboard import TensorBoardCB
from fsm_learner import (
    Callback,
    CancelEpochException,
    CancelFitException,
    ConfigurationError,
    FsmLearnerError,
)
from fsm_learner.checkpoint import unwrap_model
from fsm_learner.machine import RunKind

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    from fsm_learner import FitResult, Learner

__all__ = ["LRFinderCB", "Suggestion", "lr_find"]

Suggestion = Literal["steepest", "minimum"]
_SUGGESTIONS: Final = ("steepest", "minimum")
_EXTRA_HINT: Final = "pip install 'fsm-learner[callbacks]'"


def _check_settings(start_lr: float, end_lr: float, beta: float) -> None:
    if end_lr <= start_lr:
        msg = f"end_lr must be above start_lr ({start_lr:g}), got {end_lr!r}"
        raise ConfigurationError(msg)
    if beta >= 1:
        msg = f"beta must be in [0, 1) (0: no smoothing), got {beta!r}"
        raise ConfigurationError(msg)


class LRFinderCB(Callback):
    """Sweep the learning rate exponentially over ``num_it`` batches; stop on divergence."""

    order = 70

    def __init__(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_it: int = 100,
        *,
        beta: float = 0.98,
        div: float = 4.0,
    ) -> None:
        """Check the settings; ``beta`` smooths the loss, ``div`` says when it diverged."""
        self.start_lr = check_number("start_lr", start_lr, strict=True)
        self.end_lr = check_number("end_lr", end_lr, strict=True)
        self.beta = check_number("beta", beta)
        self.div = check_number("div", div, low=1.0, strict=True)
        _check_settings(self.start_lr, self.end_lr, self.beta)
        self.num_it = check_count("num_it", num_it, minimum=2, meaning="batches in the sweep")
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.diverged = False
        self.result: FitResult | None = None
        self._avg = 0.0
        self._best = math.inf
        self._saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    @property
    def done(self) -> bool:
        """Whether the sweep is over: diverged, or ``num_it`` batches recorded."""
        return self.diverged or len(self.lrs) >= self.num_it

    def lr_at(self, index: int) -> float:
        """Return the learning rate of the sweep's batch ``index`` (0 to ``num_it - 1``)."""
        ratio = self.end_lr / self.start_lr
        return float(self.start_lr * ratio ** (index / (self.num_it - 1)))

    # -- the state loaded back ---------------------------------------------------------

    def keep_state(self, learn: Learner) -> None:
        """Keep the model's and the optimizer's state now, to load back when the fit ends.

        ``before_fit`` calls it unless a state is already kept: ``lr_find`` calls it before
        fitting, so that nothing that runs as the fit starts changes what is loaded back.
        """
        opt = learn.opt
        model = unwrap_model(learn.model)  # across ranks the fit wraps it in DDP
        model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_state = {} if opt is None else copy.deepcopy(opt.state_dict())
        self._saved = (model_state, opt_state)

    def restore(self, learn: Learner) -> None:
        """Load the kept state back into the model and the optimizer, and forget it.

        Nothing when no state is kept (it was loaded back already).
        """
        saved, self._saved = self._saved, None
        if saved is None:
            return
        model_state, opt_state = saved
        unwrap_model(learn.model).load_state_dict(model_state)
        if learn.opt is not None and opt_state:
            learn.opt.load_state_dict(opt_state)

    def state_dict(self) -> dict[str, Any]:
        """Return the sweep so far and the state it loads back (see the module doc)."""
        kept = None if self._saved is None else {"model": self._saved[0], "opt": self._saved[1]}
        return {
            "lrs": list(self.lrs),
            "losses": list(self.losses),
            "diverged": self.diverged,
            "avg": self._avg,
            "best": self._best,
            "kept": kept,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back the sweep, at idle or after ``before_fit`` (a resumed sweep)."""
        owner = type(self).__name__
        state = state_keys(owner, state, ("lrs", "losses", "diverged", "avg", "best", "kept"))
        lrs = state_list(owner, state, "lrs", float, "floats (learning rates)")
        losses = state_list(owner, state, "losses", float, "floats (smoothed losses)")
        diverged = state_value(owner, state, "diverged", bool, "a bool")
        avg = state_value(owner, state, "avg", float, "a float (the loss average)")
        best = state_value(owner, state, "best", float, "a float (the best smoothed loss)")
        kept = state_optional(owner, state, "kept", dict, "a dict (model and opt states)")
        if kept is not None:
            state_keys(f"{owner} kept", kept, ("model", "opt"))
        self.lrs, self.losses, self.diverged = lrs, losses, diverged
        self._avg, self._best = avg, best
        self._saved = None if kept is None else (dict(kept["model"]), dict(kept["opt"]))

    # -- hooks -------------------------------------------------------------------------

    def before_fit(self, learn: Learner) -> None:
        """Keep the state to load back afterwards (unless kept already); start recording."""
        if self._saved is None:
            self.keep_state(learn)
        self.lrs, self.losses = [], []
        self.diverged = False
        self._avg, self._best = 0.0, math.inf

    def before_epoch(self, learn: Learner) -> None:
        """Skip validation passes, and every pass once the sweep is over (in fits only)."""
        if learn.kind is not RunKind.FIT:
            return
        if self.done or not learn.training:
            msg = "LRFinderCB: sweep over" if self.done else "LRFinderCB: no validation"
            raise CancelEpochException(msg)

    def before_batch(self, learn: Learner) -> None:
        """Set the sweep's learning rate for this training batch."""
        if learn.training and learn.opt is not None:
            lr = self.lr_at(len(self.lrs))
            for group in learn.opt.param_groups:
                group["lr"] = lr

    def after_batch(self, learn: Learner) -> None:
        """Record the smoothed loss; stop on divergence, end the pass when the sweep is over."""
        if not learn.training:
            return
        smoothed = self._record(float(learn.loss.detach()))  # the inherent sync
        if not math.isfinite(smoothed) or smoothed > self.div * self._best:
            self._diverge(learn, smoothed)
        self._best = min(self._best, smoothed)
        if self.done:
            msg = f"LRFinderCB: {self.num_it} batches swept"
            raise CancelEpochException(msg)

    def cleanup_fit(self, learn: Learner) -> None:
        """Load the model and optimizer back, however the fit ended."""
        self.restore(learn)

    # -- the sweep ---------------------------------------------------------------------

    def _record(self, loss: float) -> float:
        self.lrs.append(self.lr_at(len(self.lrs)))
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smoothed = self._avg / (1 - self.beta ** len(self.lrs))
        self.losses.append(smoothed)
        return smoothed

    def _diverge(self, learn: Learner, smoothed: float) -> None:
        self.diverged = True
        learn.note(
            "lr_finder",
            outcome="diverged",
            lr=self.lrs[-1],
            smoothed_loss=smoothed,
            best_loss=self._best,
            div=self.div,
            batches=len(self.lrs),
        )
        msg = f"LRFinderCB: loss diverged at lr {self.lrs[-1]:.3g} ({smoothed:.4g})"
        raise CancelFitException(msg)

    # -- results -----------------------------------------------------------------------

    def suggestion(self, method: Suggestion = "steepest") -> float:
        """Propose a learning rate from the recorded curve.

        ``"steepest"``: where the smoothed loss falls fastest against log(lr), before its
        minimum; ``"minimum"``: a tenth of the rate at the minimum.
        """
        if method not in _SUGGESTIONS:
            msg = f"method must be one of {', '.join(map(repr, _SUGGESTIONS))}, got {method!r}"
            raise ConfigurationError(msg)
        self._need_points()
        lowest = min(range(len(self.losses)), key=self.losses.__getitem__)
        if method == "minimum":
            return self.lrs[lowest] / 10
        return self.lrs[self._steepest(lowest)]

    def _steepest(self, lowest: int) -> int:
        if lowest == 0:
            return 0
        slopes = [
            (self.losses[i + 1] - self.losses[i])
            / (math.log(self.lrs[i + 1]) - math.log(self.lrs[i]))
            for i in range(lowest)
        ]
        return min(range(lowest), key=slopes.__getitem__)

    def _need_points(self) -> None:
        if len(self.losses) < 2:
            msg = (
                f"LRFinderCB recorded {len(self.losses)} point(s); at least 2 are needed: "
                "run a sweep first (lr_find(learn) or a fit with the callback)"
            )
            raise FsmLearnerError(msg)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw smoothed loss against learning rate (log scale) into ``path``; return it."""
        self._need_points()
        try:
            from matplotlib.figure import Figure  # noqa: PLC0415 (an optional extra)
        except ImportError as exc:
            msg = f"LRFinderCB.plot needs matplotlib, an optional extra: {_EXTRA_HINT}"
            raise ImportError(msg) from exc
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(self.lrs, self.losses)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("smoothed loss")
        suggested = self.suggestion()
        ax.axvline(suggested, linestyle="--", color="tab:red", label=f"suggestion {suggested:.2g}")
        ax.legend()
        target = Path(path)
        fig.savefig(target)
        return target


_SET_ASIDE: Final = (
    ProgressCB,
    BatchSchedCB,
    EpochSchedCB,
    SaveModelCB,
    CheckpointCB,
    CSVLoggerCB,
    TensorBoardCB,
    LRFinderCB,
)
"""The callbacks ``lr_find`` takes out for the sweep (see the module doc)."""


def _epochs_for(train: object, num_it: int) -> int:
    """Epochs enough for ``num_it`` batches; the finder ends the fit once it has them.

    Across ranks each rank goes over its share only: as many times more epochs.
    """
    if not isinstance(train, Sized):
        return num_it
    if len(train) == 0:
        msg = "lr_find needs training batches; learn.dls.train is empty"
        raise ConfigurationError(msg)
    dist = torch.distributed
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return math.ceil(num_it * ranks / len(train))


def lr_find(  # noqa: PLR0913 (the finder's settings, keyword-only)
    learn: Learner,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    beta: float = 0.98,
    div: float = 4.0,
) -> LRFinderCB:
    """Sweep the learning rate on ``learn`` and return the finder (see the module doc)."""
    finder = LRFinderCB(start_lr, end_lr, num_it, beta=beta, div=div)
    n_epochs = _epochs_for(learn.dls.train, num_it)
    cbs, opt = learn.cbs, learn.opt
    learn.cbs = [*(cb for cb in cbs if not isinstance(cb, _SET_ASIDE)), finder]
    finder.keep_state(learn)  # before the fit starts: nothing of its start is kept
    try:
        finder.result = learn.fit(n_epochs)
    finally:
        finder.restore(learn)  # already done, unless the fit failed before it began
        learn.cbs = cbs
        learn.opt = opt  # the sweep's own optimizer, built when there was none, goes
    return finder
