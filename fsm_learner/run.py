"""One fit's run: its id and its audit log, apart from the loop that drives the machine.

The learner opens a ``Run`` when a fit starts, appends each transition to ``run.pending``
(the hot path: one tuple), and hands it notes, pass ends and the outcome; the run owns
everything about the log: the run id, the header, the writer, flushing, the footer, the
failure detail it records and the chain head. It knows the record format only through
the codec (``fsm_learner.audit.codec``); the learner does not know it at all.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import random
import sys
import uuid
from array import array
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

import torch

from fsm_learner.audit.codec import FailureField, Field, RunStatus, note_fields
from fsm_learner.audit.writer import AuditWriter, PendingRecord, emit_run_event
from fsm_learner.machine import State, Trigger, table_digest

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

__all__ = ["Run", "log_path"]


def _is_log_file(path: Path) -> bool:
    """Say whether ``path`` is one file of runs: .jsonl (any case) and not a directory."""
    return path.suffix.lower() == ".jsonl" and not path.is_dir()


def log_path(target: Path, run_id: str, rank: int, world_size: int = 1) -> Path:
    """Where a run writes: ``target`` itself (a .jsonl file) or ``<target>/<run_id>.jsonl``.

    Under torch.distributed, rank N > 0 writes ``*.rankN.jsonl``: one file per process;
    a fit across ranks (``world_size`` > 1) writes ``*.rank<r>.jsonl`` on every rank.
    """
    suffix = f".rank{rank}" if rank or world_size > 1 else ""
    if _is_log_file(target):
        return target.with_name(f"{target.stem}{suffix}{target.suffix}")
    return target / f"{run_id}{suffix}.jsonl"


def reproducibility() -> dict[Field, Any]:
    """Return what a reproducibility audit compares: seed, determinism, threads, versions.

    ``seed`` is ``torch.initial_seed()`` (the default generator's seed: what
    ``torch.manual_seed`` set, or the random one torch drew), ``deterministic`` is
    ``"warn"`` when ``torch.use_deterministic_algorithms(True, warn_only=True)`` is on,
    ``threads`` is [intra-op, inter-op]. Nothing here initialises CUDA.
    """
    deterministic: bool | str = torch.are_deterministic_algorithms_enabled()
    if deterministic and torch.is_deterministic_algorithms_warn_only_enabled():
        deterministic = "warn"
    return {
        Field.SEED: torch.initial_seed(),
        Field.DETERMINISTIC: deterministic,
        Field.CUBLAS_WORKSPACE: os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        Field.THREADS: [torch.get_num_threads(), torch.get_num_interop_threads()],
        Field.VERSIONS: _versions(),
        Field.RNG: _rng_digests(),
    }


def _rng_digests() -> dict[str, str]:
    """Digest the generators' states: two fits after one ``manual_seed`` start apart.

    torch's default CPU generator, Python's ``random`` and, when numpy is imported,
    numpy's global generator (CUDA's would initialise CUDA: left out). 16 hex digits each.
    """
    numpy = sys.modules.get("numpy")
    version, keys, gauss = random.getstate()
    digests = {
        "torch": _digest(_cpu_bytes(torch.get_rng_state())),
        "random": _digest(array("Q", keys).tobytes() + repr((version, gauss)).encode()),
    }
    if numpy is not None:
        kind, keys, *rest = numpy.random.get_state()  # the legacy tuple: its keys an array
        digests["numpy"] = _digest(repr((kind, *rest)).encode() + keys.tobytes())
    return digests


def _cpu_bytes(tensor: torch.Tensor) -> bytes:
    """Return a CPU tensor's bytes without a tensor read: no item/tolist/numpy call.

    The generator's state is a CPU ByteTensor; copying its storage's memory is no
    host-device sync, and does not count as a read of a value (``testing.HostReads``).
    """
    storage = tensor.untyped_storage()
    return ctypes.string_at(storage.data_ptr(), storage.nbytes())


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


_MAX_GROUPS: Final = 64
_MAX_TEXT: Final = 200


def optimizer_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Return each param group's hyperparameters (all but its params), as JSON values.

    Numbers, booleans, None and strings as they are; tuples and lists of them as lists; a
    one-element tensor as its number; anything else as its repr, cut to 200 characters.
    At most 64 groups (a header stays small).
    """
    return [
        {str(key): json_setting(value) for key, value in group.items() if key != "params"}
        for group in opt.param_groups[:_MAX_GROUPS]
    ]


def json_setting(value: object) -> object:
    """Return a setting as a header holds it (see ``optimizer_groups``)."""
    if value is None or isinstance(value, bool | int | str):
        return value if not isinstance(value, str) else value[:_MAX_TEXT]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, tuple | list) and len(value) <= _MAX_GROUPS:
        return [json_setting(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return json_setting(value.item())
    return repr(value)[:_MAX_TEXT]


def callable_name(func: object) -> str | None:
    """Name a loss function as a header shows it: ``cross_entropy(label_smoothing=0.1)``.

    A ``functools.partial`` shows its arguments; a module (``nn.CrossEntropyLoss()``) its
    repr; None (the model computes its own loss) stays None. At most 200 characters.
    """
    if func is None:
        return None
    if isinstance(func, functools.partial):
        args = [repr(arg) for arg in func.args]
        args += [f"{key}={value!r}" for key, value in func.keywords.items()]
        return f"{callable_name(func.func)}({', '.join(args)})"[:_MAX_TEXT]
    if isinstance(func, torch.nn.Module):
        return repr(func)[:_MAX_TEXT]
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return str(name)[:_MAX_TEXT]


@cache
def _versions() -> dict[str, str | None]:
    """Return the versions the numbers depend on besides torch and Python (once a process)."""
    cudnn_version: Callable[[], int | None] = torch.backends.cudnn.version  # untyped in torch
    cudnn = cudnn_version()
    return {
        "numpy": _distribution_version("numpy"),
        "transitions": _distribution_version("transitions"),
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
    }


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def _version() -> str:
    from fsm_learner import __version__  # noqa: PLC0415 (the package imports this module)

    return __version__


_HOOK_PAIR: Final = 2


class Run:
    """One fit's run: created by ``Run.open`` when the fit starts, closed when it ends."""

    def __init__(self) -> None:
        """Start a run with a new id and no log yet (``open`` opens it)."""
        self.run_id = uuid.uuid4().hex[:12]
        self.head: str | None = None
        self.status: RunStatus | None = None
        self.active = True
        """Whether the run is in progress: until it finishes, fails or is abandoned."""
        self._writer: AuditWriter | None = None
        self._path: Path | None = None
        """Where the log went, kept when the writer is let go."""

    @property
    def pending(self) -> list[PendingRecord] | None:
        """The writer's pending records, the list the learner appends transitions to."""
        writer = self._writer
        return None if writer is None else writer.pending

    @property
    def path(self) -> Path | None:
        """Where the run's log goes (None: no log)."""
        writer = self._writer
        return self._path if writer is None else writer.path

    def open(
        self,
        target: Path | None,
        *,
        key: bytes | None,
        rank: int,
        world_size: int = 1,
        settings: Callable[[], Mapping[Field, Any]],
    ) -> None:
        """Open the run's log under ``target`` (None: no log); the header goes with its first block.

        ``settings()`` returns the learner's header fields (asked only when there is a
        log); the run adds the rest.
        """
        if target is None:
            return
        header = {
            Field.WALL: datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            Field.TABLE: table_digest(),
            Field.VERSION: _version(),
            Field.PYTHON: platform.python_version(),
            **reproducibility(),
            Field.RANK: rank,
            **({Field.WORLD_SIZE: world_size} if world_size > 1 else {}),
            **settings(),
        }
        path = log_path(target, self.run_id, rank, world_size)
        # one statement: from here on, whatever interrupts, abandon() closes the file
        self._writer = AuditWriter(path, run_id=self.run_id, key=key, header=header)

    def start(self) -> None:
        """Say the run started; its header goes out with its first block (within a second)."""
        path = None if self.path is None else os.fspath(self.path)
        emit_run_event("run_start", run_id=self.run_id, audit_path=path)

    def note(
        self, name: str, fields: Mapping[str, Any], *, epoch: int, it: int, training: bool
    ) -> None:
        """Add a note stamped with the loop counters (checked even when there is no log)."""
        writer = self._writer
        if writer is None:
            note_fields(name, fields)
            return
        writer.note(name, fields, epoch=epoch, it=it, tr=training)

    def flush_if_due(self) -> None:
        """Write what is pending if the last write is a second ago, or ``pending`` is long."""
        if self._writer is not None:
            self._writer.flush_if_due()

    def seal(self) -> tuple[int, str] | None:
        """Write what is pending now; return the records written and the chain head (None: no log).

        A checkpoint calls it first, so that the checkpoint names the seal it follows.
        """
        writer = self._writer
        if writer is None:
            return None
        writer.flush()
        return writer.records, writer.head

    def end_pass(self, *, epoch: int, training: bool, batches: int) -> None:
        """Write the pass's records if the last write is a second ago; say so on the logger."""
        self.flush_if_due()
        emit_run_event(
            "pass_end", run_id=self.run_id, epoch=epoch, training=training, batches=batches
        )

    def log_state(self, fallback: State) -> State:
        """Return the state the log leaves the machine in (``fallback`` without a log)."""
        writer = self._writer
        return fallback if writer is None else State(writer.log_state())

    def settle(self) -> None:
        """Take in a write whose commit an interrupt cut short (the failure path asks first)."""
        if self._writer is not None:
            self._writer.settle()

    @property
    def closed(self) -> bool:
        """Whether the run's log is closed (or there never was one)."""
        return self._writer is None

    @property
    def footed(self) -> bool:
        """Whether the run's footer is written (its log is complete)."""
        return self._writer is not None and self._writer.footed

    def finish(self, status: RunStatus, hook_ns: Mapping[tuple[Trigger, bool], int]) -> None:
        """Close the run as ``status``: footer, then the file; emit ``run_end``."""
        writer, self.status = self._writer, status
        self.active = False
        if writer is not None:
            self.head = writer.finish(status, hook_ns=_per_trigger(hook_ns))
            self._detach()
        emit_run_event("run_end", run_id=self.run_id, status=str(status), head=self.head)

    def fail(
        self,
        detail: Mapping[FailureField, object],
        hook_ns: Mapping[tuple[Trigger, bool], int],
        fire_fail: Callable[[], None],
    ) -> None:
        """Close the run as failed: fail record (``fire_fail``) unless logged, footer, file.

        What is pending (the header too, if it never made it) goes out with the footer.
        Interrupted, the run stays open, so that the learner can call this again (and
        ``abandon`` it at last).
        """
        self.status = RunStatus.FAILED
        self.active = False
        writer = self._writer
        if writer is not None and not writer.footed:
            if not writer.has(Trigger.FAIL):
                fire_fail()
            self.head = writer.finish(
                RunStatus.FAILED, hook_ns=_per_trigger(hook_ns), failure=detail
            )
        self.abandon()
        emit_run_event("run_failed", run_id=self.run_id, **{str(k): v for k, v in detail.items()})

    def abandon(self) -> None:
        """Close the log as it is (again: nothing); cut off only a write that never committed."""
        writer = self._writer
        self.active = False
        self._detach()
        if writer is not None:
            writer.abandon()

    def _detach(self) -> None:
        writer = self._writer
        if writer is not None:
            self._path = writer.path
        self._writer = None


def _per_trigger(hook_ns: Mapping[tuple[Trigger, bool], int]) -> dict[str, list[int]]:
    """Time per (trigger, training) as the footer writes it: ``{trigger: [train, valid]}``."""
    out: dict[str, list[int]] = {}
    for (trigger, training), ns in hook_ns.items():
        if ns:
            out.setdefault(trigger.value, [0] * _HOOK_PAIR)[0 if training else 1] += ns
    return out
