"""Training on several processes: the world a fit runs in, and what its ranks agree on.

Under an initialized ``torch.distributed`` process group of more than one rank, a fit is
one run across ranks: the run id is rank 0's, each rank writes its own log, the model is
wrapped in DDP and each loader gives each rank its share (``set_epoch`` every pass).

Ranks agree on cancels. A cancel a hook raises is a proposal (none < batch < epoch < fit
< fail); the learner takes it at the next point where ranks agree: after ``before_fit``
and each ``before_epoch``, before a training batch's forward and its backward (DDP makes
both collective: no rank skips what the others take), before the step when a hook or an
override sits between backward and step, at the end of each batch, pass and fit (after
their ``after_`` hooks, before the state changes), and once the fit is over. There one
all-reduce (MAX) of eight integers decides, for all ranks:
the highest proposal (and the lowest rank that made it), and whether every rank got
there by the same path (a digest of the transitions since the last point, and the point
itself). A rank that fails proposes ``fail`` at once; the others fail at their next
point, naming it. A rank that stops answering (dead, or hung past ``timeout``) is
named by the ranks still answering the process group's store.

Agreement and the callbacks' reductions (``World.sum``) use a gloo group of their own,
on the CPU: agreeing costs no host-device synchronization, whatever the backend.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import time
import weakref
from collections.abc import Mapping
from datetime import timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from fsm_learner._display import exception_text, safe_text
from fsm_learner.audit.codec import AgreePoint
from fsm_learner.checkpoint import loader_settings
from fsm_learner.exceptions import (
    ConfigurationError,
    DistributedError,
    DivergenceError,
    FsmLearnerError,
    RankFailedError,
    RankLostError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch.distributed import ProcessGroup

__all__ = [
    "LOCAL",
    "AgreePoint",
    "Agreement",
    "Distributed",
    "Proposal",
    "World",
    "distributed_loader",
    "set_sampler_epoch",
    "start_world",
    "wrap_model",
]


class Proposal(IntEnum):
    """What a rank asks all ranks to do at the next agreement point, in rising order."""

    NONE = 0
    BATCH = 1
    EPOCH = 2
    FIT = 3
    FAIL = 4


_MASK: Final = (1 << 62) - 1
"""Marks are 62-bit: their negation fits an int64, so one MAX gives both max and min."""
_GRACE_S: Final = 5.0
"""How long the ranks still answering wait for the others in the store, at most."""


@attrs.frozen
class Distributed:
    """How a learner runs under torch.distributed: ``Learner(distributed=Distributed(...))``.

    ``init``: start the process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``...) when none is started; otherwise a fit runs
    across ranks only under a process group the user started. ``backend``: the group's
    backend when the learner starts it (default ``nccl`` with CUDA, else ``gloo``).
    ``timeout``: seconds a rank waits for the others at an agreement or a reduction
    before it names those that did not come. ``wrap_model``: wrap the model in DDP
    for the fit when it is not already. ``distribute_samplers``: give each rank its
    share of each torch DataLoader (a ``DistributedSampler``); ``ddp_options``: what
    ``DistributedDataParallel`` is built with besides the model and its device.
    """

    init: bool = attrs.field(default=False, kw_only=True)
    backend: str | None = attrs.field(default=None, kw_only=True)
    timeout: float = attrs.field(default=60.0, kw_only=True)
    wrap_model: bool = attrs.field(default=True, kw_only=True)
    distribute_samplers: bool = attrs.field(default=True, kw_only=True)
    ddp_options: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True)
    """Keyword arguments for ``DistributedDataParallel`` (``find_unused_parameters=True``)."""

    def __attrs_post_init__(self) -> None:
        """Check every setting: a bad one is named with what would be valid."""
        for name in ("init", "wrap_model", "distribute_samplers"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                msg = f"Distributed({name}=...) must be True or False, got {value!r}"
                raise ConfigurationError(msg)
        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            msg = f"Distributed(timeout=...) must be a positive number of seconds, got {timeout!r}"
            raise ConfigurationError(msg)
        if not isinstance(self.ddp_options, Mapping) or not all(
            isinstance(k, str) for k in self.ddp_options
        ):
            msg = (
                f"Distributed(ddp_options=...) must map DistributedDataParallel's keyword "
                f"names to values, got {safe_text(repr(self.ddp_options), 80)}"
            )
            raise ConfigurationError(msg)
        if self.backend is not None and self.backend not in {"gloo", "nccl", "mpi", "ucc"}:
            msg = (
                f"Distributed(backend=...) must be None, 'gloo', 'nccl', 'mpi' or 'ucc', "
                f"got {safe_text(repr(self.backend), 80)}"
            )
            raise ConfigurationError(msg)


def as_distributed(value: object) -> Distributed | None:
    """Read ``Learner(distributed=...)``: None (a started group), True (start one), False (off)."""
    if value is None:
        return Distributed()
    if value is True:
        return Distributed(init=True)
    if value is False:
        return None
    if isinstance(value, Distributed):
        return value
    msg = (
        f"distributed must be None (across ranks under a started process group), True "
        f"(start one from torchrun's environment), False (never) or a Distributed(...), "
        f"got {safe_text(repr(value), 80)}"
    )
    raise ConfigurationError(msg)


@attrs.frozen
class Agreement:
    """What the ranks agreed at a point: the proposal taken, and by which rank it was made."""

    proposal: Proposal
    rank: int
    """The lowest rank that proposed it (-1 when nothing was proposed)."""
    diverged: bool
    """Whether the ranks reached the point by different paths (or at different points)."""
    boundary: bool = False
    """Whether a rank was asked to stop (SIGTERM): every rank checkpoints and preempts."""
    escaped: bool = False
    """Whether a rank agrees where a cancel escaped a batch's work (its path is cut short)."""
    collective: bool = False
    """Whether a rank agrees before a callback's reduction (where no cancel is taken)."""
    stepped_apart: bool = False
    """Whether a rank cancelled in its step work while another did not (and so stepped)."""

    @property
    def parted(self) -> bool:
        """Whether the ranks are not where they should be together: they diverged.

        Marks may differ where a cancel escaped a batch's work; a reduction meets only
        ranks in a reduction too, with nothing to take; a cancel in the step work of
        some ranks only leaves the others stepped.
        """
        if self.proposal is Proposal.FAIL:
            return False
        if self.stepped_apart:
            return True
        if self.collective and (self.proposal or self.escaped or self.diverged):
            return True
        return self.diverged and not self.escaped


@attrs.define(eq=False)
class World:
    """The processes a fit runs on: this one's rank, how many, and their agreement group.

    ``learn.world`` in a hook. One process (``LOCAL``): rank 0 of 1, and ``sum`` and
    ``barrier`` do nothing. Callbacks that write files ask ``is_main``; callbacks that
    decide on values computed per rank reduce them with ``sum``.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout: float = 60.0
    group: ProcessGroup | None = attrs.field(default=None, repr=False)
    run_id: str = ""
    """The run the ranks are in (names the store's keys when a rank is lost)."""
    serial: int = 0
    """How many fits across ranks this process started before: the same on every rank."""
    broken: bool = False
    """A collective failed (a rank lost, a timeout): no agreement can be made any more."""
    check: Callable[[], None] | None = attrs.field(default=None, repr=False)
    """The learner's agreement before a callback's collective (its path, its failures)."""

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0: the one that prints and writes model files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the fit runs on more than one process."""
        return self.size > 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Return ``values`` summed over every rank (in float64); the same on every rank.

        Every rank must call it at the same point of its hooks. A rank that failed
        meanwhile makes this raise ``RankFailedError`` naming it.
        """
        floats = [float(v) for v in values]  # a bad value raises before any collective
        if self.size == 1:
            return floats
        self.collective_check()
        tensor = torch.tensor(floats, dtype=torch.float64)
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group))
        return [float(v) for v in tensor.tolist()]

    def barrier(self) -> None:
        """Wait for every rank to get here (a file rank 0 wrote is then there for all)."""
        if self.size > 1:
            self.collective_check()

    def collective_check(self) -> None:
        """Agree before a callback's collective that every rank is there and none failed.

        In a fit the learner's own agreement does it (the ranks' paths compared too);
        otherwise only a failure is looked for.
        """
        if self.check is not None:
            self.check()
            return
        agreement = self.agree(Proposal.NONE, 0, collective=True)
        if agreement.proposal is Proposal.FAIL:
            raise self.failed_elsewhere(agreement, AgreePoint.COLLECTIVE)

    def agree(  # noqa: PLR0913 (each flag is one integer of the all-reduce)
        self,
        proposal: Proposal,
        mark: int,
        *,
        boundary: bool = False,
        escaped: bool = False,
        collective: bool = False,
        in_step: bool = False,
    ) -> Agreement:
        """Agree with every rank: one all-reduce (MAX) of eight integers.

        ``mark`` says where this rank is and how it got there; ranks whose marks differ
        diverged. The proposal code puts the lowest rank first among equal proposals.
        ``boundary``: this rank was asked to stop; ``escaped``: a cancel escaped its
        work (``in_step``: the step work); ``collective``: it is before a callback's
        reduction.
        """
        size = self.size
        code = proposal * size + (size - 1 - self.rank) if proposal else 0
        mark &= _MASK
        step = int(in_step and escaped)
        sent = [code, mark, -mark, -step, step, int(boundary), int(escaped), int(collective)]
        tensor = torch.tensor(sent, dtype=torch.int64)
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group))
        got = [int(v) for v in tensor.tolist()]
        top, high, neg_low, not_all_step, *flags = got
        if (
            not 0 <= top < len(Proposal) * size
            or not_all_step not in {-1, 0}
            or any(flag not in {0, 1} for flag in flags)
        ):
            msg = (
                f"rank {self.rank}'s agreement got {got} back: the ranks' collectives are "
                f"out of step (a rank in another collective)"
            )
            raise DivergenceError(msg)
        taken = Proposal(top // size)
        rank = size - 1 - top % size if taken else -1
        any_step, stop, escape, reduction = (bool(flag) for flag in flags)
        apart = any_step and not_all_step == 0  # some cancelled in the step work, not all
        return Agreement(taken, rank, high != -neg_low, stop, escape, reduction, apart)

    def failed_elsewhere(self, agreement: Agreement, at: AgreePoint) -> RankFailedError:
        """Return the error of a rank that takes ``fail`` for another's failure (told by it)."""
        text = self.broadcast_text("", agreement.rank)
        return RankFailedError(
            f"rank {agreement.rank} failed: {text} (rank {self.rank} takes fail at the {at} "
            f"agreement)",
            agreement.rank,
            at,
            text,
        )

    def broadcast_text(self, text: str, src: int) -> str:
        """Return rank ``src``'s ``text`` on every rank (at most 2000 characters)."""
        box: list[Any] = [text[:2000]]
        self._collective(lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return str(box[0])

    def gather(self, obj: object) -> list[Any]:
        """Return every rank's ``obj``, by rank (pickled: small things only)."""
        out: list[Any] = [None] * self.size
        self._collective(lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def agree_run_id(self, run_id: str) -> str:
        """Return rank 0's run id on every rank: the ranks' logs share it."""
        self.run_id = self.broadcast_text(run_id, 0) if self.size > 1 else run_id
        return self.run_id

    def _collective(self, call: Callable[[], object]) -> None:
        try:
            call()
        except FsmLearnerError:  # TerminatedError from SIGTERM meanwhile, say
            raise
        except RuntimeError as exc:  # gloo: a peer closed its end, or the timeout passed
            self.broken = True
            raise self.lost(exc) from exc

    def lost(self, exc: BaseException) -> RankLostError:
        """Name the ranks that no longer answer, asking the store; return the error to raise."""
        missing, how = self._unanswered()
        reason = exception_text(exc, 300)
        if missing:
            names = ", ".join(str(r) for r in missing)
            ranks = "rank" if len(missing) == 1 else "ranks"
            msg = (
                f"{ranks} {names} stopped answering (died, or hung past the "
                f"{self.timeout:g} s timeout): {reason}"
            )
        else:
            msg = f"a collective with the other ranks failed ({how}): {reason}"
        return RankLostError(msg, missing)

    def _unanswered(self) -> tuple[tuple[int, ...], str]:
        """Return the ranks that did not say they are here within the grace period."""
        try:
            store = dist.distributed_c10d._get_default_store()  # noqa: SLF001 (no public way)
            prefix = f"fsm_learner/{self.serial}/{self.run_id}/here/"
            store.set(f"{prefix}{self.rank}", "1")
            deadline = time.monotonic() + min(self.timeout, _GRACE_S)
            while True:
                missing = tuple(r for r in range(self.size) if not store.check([f"{prefix}{r}"]))
                if not missing or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except FsmLearnerError:  # SIGTERM meanwhile (torchrun stopping this worker)
            raise
        except (RuntimeError, OSError, ValueError) as store_exc:  # it may have died with a rank
            return (), f"the store did not answer either: {exception_text(store_exc, 200)}"
        how = "every rank answered the store: none died" if not missing else ""
        return missing, how


LOCAL: Final = World()
"""One process: rank 0 of 1."""


def start_world(config: Distributed | None) -> World:
    """Return the world a fit runs in: ``LOCAL``, or the started group's ranks.

    With ``init``, start the process group from torchrun's environment first. The
    agreement group is created once per process group (every rank creates it in turn).
    """
    if config is None or not dist.is_available():
        return LOCAL
    if config.init and not dist.is_initialized():
        _init_from_env(config)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return LOCAL
    group = _agreement_group(config.timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank, size = dist.get_rank(), dist.get_world_size()
    world = World(rank, size, local_rank, config.timeout, group, serial=next(_SERIAL))
    _WORLDS.add(world)
    return world


_SERIAL: Final = itertools.count()
"""Numbers the worlds a process starts: its store keys never meet an earlier fit's."""


def _init_from_env(config: Distributed) -> None:
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    absent = [k for k in needed if k not in os.environ]
    if absent:
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            return  # not under torchrun: one process, as without distributed
        msg = (
            f"Distributed(init=True) needs torchrun's environment; {', '.join(absent)} "
            f"not set (run under torchrun, or start the process group yourself)"
        )
        raise ConfigurationError(msg)
    backend = config.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=max(config.timeout, 60.0)))
    _STARTED.append(dist.distributed_c10d._get_default_group())  # noqa: SLF001 (ours to end)


_GROUPS: dict[float, tuple[ProcessGroup, ProcessGroup]] = {}
"""By timeout: the process group an agreement group was made in, and that group."""
_WORLDS: Final[weakref.WeakSet[World]] = weakref.WeakSet()
"""The worlds started: each holds its agreement group, let go at exit."""
_STARTED: Final[list[ProcessGroup]] = []
"""The process group the learner started (``Distributed(init=True)``), ended at exit."""


def _release_groups() -> None:
    """At exit, while the interpreter is whole: end the groups this module holds.

    A gloo group destroyed during the interpreter's finalization can abort the process
    (its threads still hold tensors); so the agreement groups, and the process group
    the learner started, are ended here, and no reference to them is left to finalize.
    """
    for world in list(_WORLDS):
        world.group = None
    groups = [made for _, made in _GROUPS.values()]
    _GROUPS.clear()
    started = _STARTED[:]
    _STARTED.clear()
    if not dist.is_available() or not dist.is_initialized():
        return
    for group in groups:
        with contextlib.suppress(Exception):  # destroyed already with its process group
            dist.destroy_process_group(group)
    default = dist.distributed_c10d._get_default_group()  # noqa: SLF001 (is it ours?)
    if any(group is default for group in started):
        dist.destroy_process_group()


atexit.register(_release_groups)


def _agreement_group(timeout: float) -> ProcessGroup:
    """Return the agreement group for ``timeout``, made once per process group.

    The process group it was made in is kept with it: a group started anew (after
    ``destroy_process_group``) gets a new agreement group, never a dead one.
    """
    default = dist.distributed_c10d._get_default_group()  # noqa: SLF001 (identifies the group)
    cached = _GROUPS.get(timeout)
    if cached is not None and cached[0] is default:
        return cached[1]
    try:
        made: ProcessGroup | None = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=timeout)
        )
    except RuntimeError as exc:  # a store timeout: the other ranks are not starting a fit
        msg = (
            f"rank {dist.get_rank()} could not agree on a group with the other ranks: every "
            f"rank of the process group must start the fit (Learner(distributed=False) fits "
            f"on this process alone): {exception_text(exc, 300)}"
        )
        raise DistributedError(msg) from exc
    if made is None:  # pragma: no cover (every rank is in the group it makes)
        msg = "torch.distributed.new_group returned no group for this rank"
        raise DistributedError(msg)
    _GROUPS[timeout] = (default, made)
    return made


def wrap_model(
    model: nn.Module, world: World, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """Return ``model`` in DDP (on its device), unless it already is or has nothing to train."""
    if isinstance(model, DistributedDataParallel):
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else world.local_rank]
    kwargs = {"device_ids": ids if device.type == "cuda" else None, **(options or {})}
    return DistributedDataParallel(model, **kwargs)


def distributed_loader(data: Any, world: World) -> tuple[Any, str | None]:
    """Return ``data`` giving this rank its share, and a warning when it cannot.

    A torch DataLoader over a map-style dataset with a stock sampler gets a twin with a
    ``DistributedSampler`` (shuffling as it did; seeded by its generator's initial seed,
    or 0). One that already has a DistributedSampler, or an iterable dataset, is kept.
    Anything else is kept, with a warning: every rank would go over all of it.
    """
    if not isinstance(data, DataLoader):
        return data, (
            f"a {safe_text(type(data).__name__, 80)} is not a torch DataLoader: every rank "
            f"goes over all of it (give each rank its share yourself)"
        )
    if isinstance(data.dataset, torch.utils.data.IterableDataset):
        return data, None  # the dataset shards itself (get_worker_info / rank), or not
    if isinstance(_sampler(data), DistributedSampler):
        return data, None
    batches = data.batch_sampler
    if data.batch_size is None or type(batches) is not BatchSampler:
        return data, (
            "a DataLoader with its own batch sampler is kept: every rank goes over all of "
            "it (give it a sampler that knows the rank)"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        data.dataset,
        num_replicas=world.size,
        rank=world.rank,
        shuffle=isinstance(data.sampler, RandomSampler),
        seed=data.generator.initial_seed() if data.generator is not None else 0,
    )
    settings = loader_settings(data)
    twin = DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        drop_last=data.drop_last,
        **settings,
    )
    return twin, None


def _sampler(data: DataLoader[Any]) -> object:
    batches = data.batch_sampler
    inner = getattr(batches, "sampler", None) if batches is not None else None
    return inner if inner is not None else data.sampler


def set_sampler_epoch(data: object, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on a DataLoader's DistributedSampler, if it has one."""
    if isinstance(data, DataLoader):
        sampler = _sampler(data)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def first_difference(trails: Sequence[Sequence[tuple[str, int, int, bool]]]) -> str:
    """Name the first transition where the ranks' trails differ (rank: trigger, ep, it, pass)."""
    longest = max(len(t) for t in trails)
    for index in range(longest):
        steps = [t[index] if index < len(t) else None for t in trails]
        if len(set(steps)) > 1:
            shown = "; ".join(f"rank {r}: {_step(s)}" for r, s in enumerate(steps))
            return f"transition {index + 1} since the ranks last agreed differs ({shown})"
    return "the ranks reached different agreement points by the same transitions"


def _step(step: tuple[str, int, int, bool] | None) -> str:
    if step is None:
        return "nothing more"
    trigger, epoch, it, training = step
    if trigger == f"@{AgreePoint.COLLECTIVE}":
        return f"in a callback's reduction at epoch {epoch}, batch {it}, {_pass(training)}"
    if trigger.startswith("@"):
        return f"at the {trigger[1:]} agreement of epoch {epoch}, batch {it}, {_pass(training)}"
    return f"{trigger} at epoch {epoch}, batch {it}, {_pass(training)}"


def _pass(training: bool) -> str:
    return "training" if training else "validation"
