"""Parameter groups for the optimizer (``Learner(..., param_groups=...)``), and its hyperparameters.

The learner builds its optimizer as ``opt_func(param_groups(model), lr)``. By default
``param_groups`` is ``model.parameters``; ``weight_decay_groups(wd)`` splits the
parameters the way fastai does by default: weight decay on weights, none on biases and
on normalisation layers (whose scale and shift decay would only fight the
normalisation)::

    Learner(model, dls, loss, 1e-3, opt_func=torch.optim.AdamW,
            param_groups=weight_decay_groups(0.01))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from fsm_learner.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["NORM_LAYERS", "SCHEDULED", "BaseHypers", "held_ids", "weight_decay_groups"]

NORM_LAYERS: Final[tuple[type[nn.Module], ...]] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
"""The layers whose parameters get no weight decay."""


def weight_decay_groups(weight_decay: float) -> Callable[[nn.Module], list[dict[str, Any]]]:
    """Return a ``param_groups`` function: ``weight_decay`` on weights, 0 on biases and norms.

    Each parameter is in exactly one group, in the model's order, frozen ones included (an
    optimizer skips a parameter without a gradient, and one unfrozen later then trains); a
    group with no parameter is left out (torch refuses empty groups).
    """
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, int | float)
        or not 0 <= weight_decay < math.inf
    ):
        msg = f"weight_decay must be a finite number >= 0, got {weight_decay!r}"
        raise ConfigurationError(msg)

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        decay, no_decay = _split(model)
        pairs = ((decay, float(weight_decay)), (no_decay, 0.0))
        return [{"params": ps, "weight_decay": wd} for ps, wd in pairs if ps]

    groups.__qualname__ = f"weight_decay_groups({weight_decay!r})"
    return groups


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the parameters: (decayed, not decayed), each once though shared."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = isinstance(module, NORM_LAYERS)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if norm or name.endswith("bias") else decay).append(param)
    return decay, no_decay


SCHEDULED: Final = ("lr", "momentum", "betas")
"""The hyperparameters schedulers change; every fit starts from the optimizer's own."""


def held_ids(params: Iterable[Any]) -> frozenset[int]:
    """Return the ids of the tensors in ``params``: tensors, or param groups (dicts)."""
    ids: set[int] = set()
    for item in params:
        if isinstance(item, dict):
            group = item.get("params", ())
            ids.update(map(id, [group] if isinstance(group, torch.Tensor) else group))
        else:
            ids.add(id(item))
    return frozenset(ids)


class BaseHypers:
    """An optimizer's scheduled hyperparameters per group, as it was built (or adopted).

    A fit's schedule may leave them elsewhere; the next fit starts from these again. What
    the user set in a group between two fits is theirs, and becomes the base.
    """

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        """Record ``opt``'s groups' ``lr``, ``momentum`` and ``betas`` as they are now."""
        self.opt = opt
        self._groups = _scheduled(opt)
        self._ended: list[dict[str, Any]] | None = None
        """The values the last fit ended with: a value changed since was set by the user."""

    def end_fit(self) -> None:
        """Note the values a fit ended with."""
        self._ended = _scheduled(self.opt)

    def restore(self) -> None:
        """Start a fit from the base values (taking in what the user set since the last)."""
        ended = self._ended or [{} for _ in self._groups]
        for group, base, last in zip(self.opt.param_groups, self._groups, ended, strict=False):
            for key in base:
                if key in last and group.get(key) != last[key]:  # the user's since
                    base[key] = group[key]
                group[key] = base[key]
        self._ended = None

    def state_dict(self) -> dict[str, Any]:
        """Return the base values (and those the last fit ended with), for a checkpoint."""
        return {"base": [dict(g) for g in self._groups], "ended": self._ended}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned."""
        base, ended = state["base"], state["ended"]
        if len(base) != len(self.opt.param_groups):
            msg = (
                f"the saved base rates are for {len(base)} parameter group(s); the optimizer "
                f"has {len(self.opt.param_groups)}"
            )
            raise ValueError(msg)
        self._groups = [dict(g) for g in base]
        self._ended = None if ended is None else [dict(g) for g in ended]

    @property
    def lr(self) -> float:
        """The first group's base rate: the rate the next fit starts from."""
        return float(self._groups[0]["lr"]) if self._groups else math.nan

    def set_lr(self, lr: float) -> None:
        """Make ``lr`` every group's rate, now and at every fit start."""
        for group, base in zip(self.opt.param_groups, self._groups, strict=False):
            group["lr"] = base["lr"] = lr


def _scheduled(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: g[k] for k in SCHEDULED if k in g} for g in opt.param_groups]
