"""Checkpoints a fit can resume from exactly: what they hold, how they are written and read.

A checkpoint is one ``torch.save`` file of plain containers and tensors (read back with
``torch.load(weights_only=True)`` only: nothing in it can run code)::

    format, version      "fsm_learner.checkpoint", 1
    model                the unwrapped model's state_dict (no "module." or "_orig_mod.")
    grads                gradients not yet stepped (gradient accumulation mid-cycle)
    optimizer, hypers    the optimizer's state_dict, and the rates every fit starts from
    callbacks            each callback's state_dict(), keyed by class name ("MetricsCB#1")
    rng                  torch (and CUDA), numpy and random generator states
    position             the machine's position: state, epoch, pass, batch, counts
    pass                 mid-pass: the generators' states when the pass began, the loader's
    run                  the run id, and its log's record count and chain head

The position is a boundary of the machine: between two batches of a pass (state
``epoch``; ``it`` batches of the pass already begun), between two passes (state ``fit``;
the pass named is the next one), or ``idle`` (``Learner.save``). A resume re-enters the
machine there (``Learner.fit(n, resume_from=...)``).

Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
directory; a process killed mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from fsm_learner._display import exception_text, safe_text
from fsm_learner.exceptions import CheckpointError, ConfigurationError
from fsm_learner.machine import State, Trigger

if TYPE_CHECKING:
    from pathlib import Path

    from fsm_learner.callback import Callback
    from fsm_learner.learner import Learner

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "Checkpointer",
    "Position",
    "callback_keys",
    "find_latest",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "skip_batches",
    "unwrap_model",
    "write_atomic",
]

FORMAT: Final = "fsm_learner.checkpoint"
VERSION: Final = 1
_SUFFIX: Final = ".pt"


@runtime_checkable
class Checkpointer(Protocol):
    """A callback that writes checkpoints (``callbacks.CheckpointCB``).

    It asks for one with ``learn.request_checkpoint()``; at the next boundary the learner
    asks it where to write (``checkpoint_path``), writes, and tells it (``checkpoint_written``).
    A fit with a checkpointer is preemptible: SIGTERM checkpoints and stops it.
    """

    def checkpoint_path(self, learn: Learner, at: Position) -> Path:
        """Return where to write the checkpoint of position ``at``."""
        ...

    def checkpoint_written(self, learn: Learner, path: Path) -> None:
        """Hear that the checkpoint at ``path`` is written (prune older ones, say)."""
        ...


@attrs.frozen
class Position:
    """Where a checkpoint was taken: the pass (``epoch``, ``training``) and its batches begun.

    ``state`` is ``epoch`` between two batches (``iter`` batches begun, > 0), ``fit``
    between two passes (the pass named is the next; ``iter`` is 0), ``idle`` at rest.
    """

    state: State
    epoch: int = 0
    training: bool = True
    iter: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the position as the log writes it (``at``, in notes and headers)."""
        return {"ep": self.epoch, "tr": self.training, "it": self.iter}

    def describe(self) -> str:
        """Say where, in words: ``epoch 1, training pass, after 12 batches``."""
        if self.state is State.IDLE:
            return "at idle (between fits)"
        where = f"epoch {self.epoch}, {'training' if self.training else 'validation'} pass"
        if self.state is State.FIT:
            return f"before the {where}"
        return f"{where}, after {self.iter} batch(es)"


# -- random generators --------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Return the states of torch's (and CUDA's), numpy's and Python's generators."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "random": _python_rng()}
    if torch.cuda.is_available() and _cuda_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy_state = _numpy_rng()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    return state


_cuda_initialized: Callable[[], bool] = torch.cuda.is_initialized
"""Whether this process uses CUDA already (its generators are saved only then)."""


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators to ``state`` (what ``rng_state`` returned)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        _set_numpy_rng(numpy_state)


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> dict[str, Any] | None:
    try:
        import numpy as np  # noqa: PLC0415 (numpy is optional)
    except ImportError:  # pragma: no cover (numpy comes with torch's usual installs)
        return None
    legacy = np.random.get_state(legacy=True)  # noqa: NPY002 (the global generator users seed)
    if isinstance(legacy, dict):  # pragma: no cover (legacy=True gives the tuple)
        return None
    name, keys, pos, has_gauss, cached = legacy
    return {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_rng(state: Mapping[str, Any]) -> None:
    import numpy as np  # noqa: PLC0415 (numpy is optional)

    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002 (the global generator users seed)
        (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])
    )


def loader_generators(data: object) -> list[torch.Generator]:
    """Return the torch generators a DataLoader draws its order from (each once)."""
    found: list[torch.Generator] = []
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(g is not generator for g in found):
            found.append(generator)
    return found


# -- models ---------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module under DDP, DataParallel and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel) and isinstance(
            model.module, nn.Module
        ):
            model = model.module
        elif isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def callback_keys(cbs: Iterable[Callback]) -> list[tuple[str, Callback]]:
    """Key each callback by its class name, ``#n`` after the first of a class (list order)."""
    seen: dict[str, int] = {}
    keyed = []
    for cb in cbs:
        name = type(cb).__qualname__
        n = seen.get(name, 0)
        seen[name] = n + 1
        keyed.append((name if n == 0 else f"{name}#{n}", cb))
    return keyed


# -- files ----------------------------------------------------------------------------------


def write_atomic(path: Path, payload: Mapping[str, Any]) -> str:
    """Write ``payload`` to ``path`` atomically; return the file's SHA-256 (hex).

    A temporary file next to it, flushed and fsynced, renamed over ``path``, then the
    directory fsynced: a death at any moment leaves either the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as fh:
            torch.save(dict(payload), fh)
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256_of(partial)
        partial.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    _sync_directory(path.parent)
    return digest


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: Path) -> str:
    """Return the SHA-256 of the file at ``path`` (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@attrs.frozen
class Checkpoint:
    """A checkpoint read back and checked: its file, SHA-256 and contents."""

    path: Path
    sha256: str
    payload: Mapping[str, Any]

    @property
    def position(self) -> Position:
        """Where it was taken."""
        raw = self.payload["position"]
        return Position(State(raw["state"]), raw["epoch"], raw["training"], raw["iter"])

    @property
    def n_epochs(self) -> int:
        """The epochs of the fit it was taken in (0 at idle)."""
        n: int = self.payload["position"]["n_epochs"]
        return n

    @property
    def run(self) -> Mapping[str, Any] | None:
        """The run it was taken in: ``id``, its log's ``records`` and ``head`` (None: none)."""
        run: Mapping[str, Any] | None = self.payload.get("run")
        return run


_REQUIRED: Final = {
    "format": str,
    "version": int,
    "model": dict,
    "grads": dict,
    "callbacks": dict,
    "rng": dict,
    "position": dict,
}
_POSITION: Final = {"state": str, "epoch": int, "training": bool, "iter": int, "n_epochs": int}
_UNSAFE: Final = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)")
"""torch's words for a global the weights-only reader refuses (two wordings: not allowed,
or in a module it blocks, such as os)."""
_WHY_REFUSED: Final = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
"""The reason in torch's message for a weights-only refusal (the rest is advice on torch.load)."""
_COUNT_FIELDS: Final = 3
_LOOP_FIELDS: Final = 2
_RANDOM_FIELDS: Final = 3
_STATES: Final = frozenset({State.IDLE.value, State.FIT.value, State.EPOCH.value})


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check the checkpoint at ``path``; a bad one is a one-line CheckpointError."""
    name = safe_text(path, 300)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "missing"
        msg = f"checkpoint {name} is {what}; give a checkpoint file (.pt) or a directory of them"
        raise CheckpointError(msg)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSAFE.search(str(exc))
        if found is None:  # an opcode the reader lacks: garbage bytes, most likely
            why = _WHY_REFUSED.search(str(exc))
            _unreadable(name, exc if why is None else why.group(1))
        msg = (
            f"checkpoint {name} holds the global {found.group(1)}: refused, since loading it "
            f"could run code (checkpoints are read with torch.load(weights_only=True))"
        )
        raise CheckpointError(msg) from None
    except Exception as exc:  # noqa: BLE001 (garbage makes the unpickler raise anything)
        _unreadable(name, exc)
    _check_payload(payload, name)
    return Checkpoint(path, sha256_of(path), payload)


def _unreadable(name: str, exc: BaseException | str) -> NoReturn:
    """Refuse a file torch.load cannot read, with the reason's first line."""
    if isinstance(exc, str):
        reason = safe_text(exc, 160)
    else:
        reason = exception_text(exc, 160).splitlines()[0] if str(exc) else type(exc).__name__
    msg = (
        f"checkpoint {name} cannot be read (truncated, corrupt, or not a torch.save file "
        f"of plain data): {reason}"
    )
    raise CheckpointError(msg) from None


def _check_payload(payload: object, name: str) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = f"keys {sorted(map(str, payload))[:8]}" if isinstance(payload, dict) else "no dict"
        msg = (
            f"{name} is not an fsm_learner checkpoint (Learner.save or CheckpointCB writes "
            f"them; format {FORMAT!r}); it holds {got}"
        )
        raise CheckpointError(msg)
    if payload.get("version") != VERSION:
        msg = f"checkpoint {name} is version {payload.get('version')!r}; this reads {VERSION}"
        raise CheckpointError(msg)
    _check_fields(payload, _REQUIRED, name, "")
    _check_fields(payload["position"], _POSITION, name, "position.")
    if payload["position"]["state"] not in _STATES:
        msg = (
            f"checkpoint {name}: position.state is {payload['position']['state']!r}; a "
            f"checkpoint is taken in one of {sorted(_STATES)}"
        )
        raise CheckpointError(msg)
    _check_structure(payload, name)


def _refuse(name: str, where: str, expected: str, value: object) -> NoReturn:
    got = type(value).__name__ if not isinstance(value, int | str) else repr(value)[:60]
    msg = f"checkpoint {name}: {where} must be {expected}, got {got}"
    raise CheckpointError(msg)


def _check_structure(payload: Mapping[str, Any], name: str) -> None:
    """Check what the loop reads from a checkpoint, so a bad one fails before the fit runs."""
    position = payload["position"]
    for field in ("epoch", "iter", "n_epochs"):
        if position[field] < 0:
            _refuse(name, f"position.{field}", "an int >= 0", position[field])
    _check_counts(position.get("counts", []), name)
    loop = position.get("loop", [0, 0])
    if not (
        isinstance(loop, list | tuple)
        and len(loop) == _LOOP_FIELDS
        and all(type(n) is int and n >= 0 for n in loop)
    ):
        _refuse(name, "position.loop", "the loop's [epoch, batch index]", loop)
    _check_rng(payload["rng"], name, "rng")
    if position["state"] == State.EPOCH.value:
        start = payload.get("pass")
        if not isinstance(start, dict) or not isinstance(start.get("generators"), list):
            _refuse(name, "pass", "the state of the pass in progress (rng, generators)", start)
        _check_rng(start.get("rng"), name, "pass.rng")
    _check_containers(payload, name)


def _check_containers(payload: Mapping[str, Any], name: str) -> None:
    grads, states = payload["grads"], payload["callbacks"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in grads.items()):
        _refuse(name, "grads", "a dict of parameter names to tensors", grads)
    if not all(isinstance(k, str) and isinstance(v, dict) for k, v in states.items()):
        _refuse(name, "callbacks", "a dict of callback names to state dicts", states)
    for field in ("optimizer", "hypers", "run", "loaders"):
        if payload.get(field) is not None and not isinstance(payload[field], dict):
            _refuse(name, field, "a dict or None", payload[field])
    for snapshot in (payload.get("loaders") or {}).values():
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("generators"), list):
            _refuse(name, "loaders", "each loader's generators (a list) and state", snapshot)


def _check_counts(counts: object, name: str) -> None:
    triggers = {trigger.value for trigger in Trigger}
    if not isinstance(counts, list) or not all(
        isinstance(entry, list | tuple)
        and len(entry) == _COUNT_FIELDS
        and entry[0] in triggers
        and isinstance(entry[1], bool)
        and type(entry[2]) is int
        and entry[2] >= 0
        for entry in counts
    ):
        _refuse(name, "position.counts", "[trigger, training, count] triples", counts)


def _check_rng(state: object, name: str, where: str) -> None:
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("torch"), torch.Tensor)
        and state["torch"].dtype == torch.uint8
        and isinstance(state.get("random"), list | tuple)
        and len(state["random"]) == _RANDOM_FIELDS
    )
    if not ok or not _settable(state):
        _refuse(name, where, "generator states (torch's, random's)", state)


def _settable(state: Any) -> bool:
    """Whether ``set_rng_state`` takes ``state``: tried on generators of its own."""
    try:
        torch.Generator().set_state(state["torch"])
        version, internal, gauss = state["random"]
        random.Random().setstate((version, tuple(internal), gauss))  # noqa: S311 (a check only)
        numpy_state = state.get("numpy")
        if numpy_state is not None:
            import numpy as np  # noqa: PLC0415 (numpy is optional)

            keys = numpy_state["keys"].numpy().astype(np.uint32)
            np.random.RandomState().set_state(
                (
                    numpy_state["name"],
                    keys,
                    numpy_state["pos"],
                    numpy_state["has_gauss"],
                    numpy_state["cached"],
                )
            )
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError, OverflowError):
        return False
    return True


def _check_fields(
    record: Mapping[str, Any], fields: Mapping[str, type], name: str, at: str
) -> None:
    for field, kind in fields.items():
        value = record.get(field)
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            got = "missing" if field not in record else type(value).__name__
            msg = f"checkpoint {name}: {at}{field} must be a {kind.__name__}, got {got}"
            raise CheckpointError(msg)


def checkpoint_files(directory: Path, *, rank: int = 0, world_size: int = 1) -> list[Path]:
    """Return this process's checkpoint files of ``directory``, newest first.

    Its files are those ``file_name`` names for ``rank`` of ``world_size``: across ranks
    those of that rank only, on one process those without a ``.rank<r>`` part. Temporary
    files are left out.
    """
    part = rank_part(rank, world_size)
    try:
        entries = [p for p in directory.iterdir() if p.suffix == _SUFFIX and p.is_file()]
    except OSError:
        return []
    entries = [p for p in entries if not p.name.startswith(".") and _rank_part_of(p) == part]

    def newest(path: Path) -> tuple[int, str]:
        try:
            return (path.stat().st_mtime_ns, path.name)
        except OSError:
            return (-1, path.name)

    return sorted(entries, key=newest, reverse=True)


def find_latest(
    directory: Path, *, rank: int = 0, world_size: int = 1
) -> tuple[Checkpoint | None, list[str]]:
    """Return the newest checkpoint of ``directory`` that reads, and why newer ones did not.

    Only this process's files are looked at (``checkpoint_files``): across ranks, rank
    ``rank``'s of ``world_size``; on one process, those without a rank in their name.
    """
    skipped: list[str] = []
    for path in checkpoint_files(directory, rank=rank, world_size=world_size):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, skipped


# -- skipping to a batch ------------------------------------------------------------------


class _SkippingSampler(Sized):
    """Iterates an index sampler (or batch sampler) from its ``skip``-th item on.

    The items skipped are drawn (a shuffled order is the same) but never loaded. The
    iterator is lazy, like a sampler's, so that a DataLoader draws its seeds in the same
    order; ``prime`` makes it draw and skip at once.
    """

    def __init__(self, inner: Iterable[Any], skip: int) -> None:
        self.inner, self.skip = inner, skip
        self._last: _SkippingIterator | None = None

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0) if isinstance(self.inner, Sized) else 0

    def __iter__(self) -> Iterator[Any]:
        self._last = _SkippingIterator(self.inner, self.skip)
        return self._last

    def prime(self) -> None:
        """Draw the order and skip now, if the loader has not made the iterator do it yet."""
        if self._last is not None:
            self._last.prime()


class _SkippingIterator(Iterator[Any]):
    def __init__(self, inner: Iterable[Any], skip: int) -> None:
        self._inner, self._skip = inner, skip
        self._it: Iterator[Any] | None = None

    def prime(self) -> Iterator[Any]:
        it = self._it
        if it is None:
            it = self._it = iter(self._inner)
            for _ in range(self._skip):
                next(it, None)
        return it

    def __next__(self) -> Any:
        return next(self.prime())


def skip_batches(data: Iterable[Any], skip: int) -> tuple[Iterator[Any], str | None]:
    """Return an iterator over ``data`` from batch ``skip`` on, and a warning, if any.

    A torch DataLoader over a map-style dataset gets a twin whose sampler skips (no batch
    before ``skip`` is loaded); a sequence is indexed from ``skip``. Anything else is
    iterated and the skipped batches dropped: they are loaded, said in the warning.
    Call it with the generators as they were when the pass began: the order is redrawn.
    """
    twin = _skipping_loader(data, skip)
    if twin is not None:
        loader, sampler = twin
        iterator = iter(loader)
        sampler.prime()
        return iterator, None
    if isinstance(data, Sequence):
        return (data[i] for i in range(skip, len(data))), None
    iterator = iter(data)
    for _ in range(skip):
        next(iterator, None)
    warning = (
        f"resuming mid-pass over a {safe_text(type(data).__name__, 80)}, which has no sampler "
        f"to advance: its first {skip} batch(es) were loaded again and dropped (a torch "
        f"DataLoader over a map-style dataset, a sequence, or a loader with state_dict() "
        f"skips without loading)"
    )
    return iterator, warning


def _skipping_loader(data: object, skip: int) -> tuple[Iterable[Any], _SkippingSampler] | None:
    loader = torch.utils.data.DataLoader
    if not isinstance(data, loader) or isinstance(data.dataset, torch.utils.data.IterableDataset):
        return None
    settings = loader_settings(data)
    if data.batch_sampler is not None:
        sampler = _SkippingSampler(data.batch_sampler, skip)
        return loader(data.dataset, batch_sampler=sampler, **settings), sampler
    sampler = _SkippingSampler(data.sampler, skip)
    return loader(data.dataset, batch_size=None, sampler=sampler, **settings), sampler


def loader_settings(data: torch.utils.data.DataLoader[Any]) -> dict[str, Any]:
    """Return what a twin of ``data`` (another sampler, the same loading) is built with."""
    settings: dict[str, Any] = {
        "num_workers": data.num_workers,
        "collate_fn": data.collate_fn,
        "pin_memory": data.pin_memory,
        "timeout": data.timeout,
        "worker_init_fn": data.worker_init_fn,
        "multiprocessing_context": data.multiprocessing_context,
        "generator": data.generator,
        "pin_memory_device": data.pin_memory_device,
    }
    if data.num_workers:
        settings["prefetch_factor"] = data.prefetch_factor
    if hasattr(data, "in_order"):
        settings["in_order"] = data.in_order
    return settings


def stateful(data: object) -> bool:
    """Whether a loader saves its own position (torchdata's StatefulDataLoader)."""
    return callable(getattr(data, "state_dict", None)) and callable(
        getattr(data, "load_state_dict", None)
    )


_NAME_SAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")


_LOGGED_PATH: Final = 1000
"""The most characters of a checkpoint's path the log holds (the audit keeps 4 KB a field)."""


def logged_path(path: Path) -> str:
    """Return a checkpoint's path as the log holds it: UTF-8 (odd bytes escaped), at most 1000."""
    raw = os.fsencode(path).decode("utf-8", "backslashreplace")
    return raw if len(raw) <= _LOGGED_PATH else raw[: _LOGGED_PATH - 3] + "..."


def file_name(at: Position, run_id: str, *, rank: int = 0, world_size: int = 1) -> str:
    """Name a checkpoint file after its position, run and rank: it sorts by position.

    Across ranks (``world_size`` > 1) each rank writes its own file, ``..._<run>.rank<r>.pt``
    (as each writes its own log); on one process the name has no rank part.
    """
    pass_name = "train" if at.training else "valid"
    run = _NAME_SAFE.sub("_", run_id)
    part = rank_part(rank, world_size)
    return f"ckpt_e{at.epoch:04d}_{pass_name}_b{at.iter:06d}_{run}{part}{_SUFFIX}"


_RANK_PART: Final = re.compile(r"\.rank[0-9]+(?=\.pt\Z)")
"""The rank part of a checkpoint file's name (``.rank1`` of ``..._<run>.rank1.pt``)."""


def rank_part(rank: int, world_size: int) -> str:
    """Return the part of a checkpoint's name that says its rank: ``.rank<r>``, or none.

    Across ranks (``world_size`` > 1) every rank's files have one, rank 0's included; on
    one process (``world_size`` 1, ``rank`` 0) none.
    """
    if type(world_size) is not int or world_size < 1:
        msg = f"world_size must be an int >= 1 (the processes of the fit), got {world_size!r}"
        raise ConfigurationError(msg)
    if type(rank) is not int or not 0 <= rank < world_size:
        msg = f"rank must be an int from 0 to {world_size - 1} (of {world_size}), got {rank!r}"
        raise ConfigurationError(msg)
    return f".rank{rank}" if world_size > 1 else ""


def _rank_part_of(path: Path) -> str:
    found = _RANK_PART.search(path.name)
    return "" if found is None else found.group(0)


def of_rank(path: Path, *, rank: int = 0, world_size: int = 1) -> bool:
    """Whether ``path`` is named as rank ``rank`` of ``world_size`` names its checkpoints."""
    return _rank_part_of(path) == rank_part(rank, world_size)


# -- what a checkpoint holds, and putting it back -------------------------------------------


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the gradients the model holds (not yet stepped), by parameter name."""
    return {
        name: param.grad.detach().clone()
        for name, param in unwrap_model(model).named_parameters()
        if param.grad is not None
    }


def set_gradients(model: nn.Module, grads: Mapping[str, torch.Tensor], name: str) -> None:
    """Give the model back its gradients; the others become None."""
    params = dict(unwrap_model(model).named_parameters())
    check_gradients(params, grads, name)
    for key, param in params.items():
        grad = grads.get(key)
        param.grad = None if grad is None else grad.to(param.device, param.dtype)


def check_gradients(
    params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], name: str
) -> None:
    """Refuse saved gradients of parameters the model lacks, or of other shapes."""
    unknown = sorted(set(grads) - set(params))
    if unknown:
        msg = f"checkpoint {name} holds gradients of parameters the model lacks: {unknown[:5]}"
        raise CheckpointError(msg)
    shapes = [
        f"{key} {tuple(grad.shape)} vs {tuple(params[key].shape)}"
        for key, grad in grads.items()
        if grad.shape != params[key].shape
    ]
    if shapes:
        msg = f"checkpoint {name} holds gradients of other shapes than the model's: {shapes[:3]}"
        raise CheckpointError(msg)


def check_model(model: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """Refuse weights that do not fit the unwrapped model, naming what differs."""
    target = unwrap_model(model)
    own = target.state_dict()
    odd = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if odd:
        msg = f"checkpoint {name}: model holds entries that are no tensors: {odd[:5]}"
        raise CheckpointError(msg)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shapes differ: {shapes[:3]}" if shapes else "",
        ]
        msg = (
            f"checkpoint {name} does not fit learn.model ({type(target).__name__}): "
            f"{'; '.join(p for p in parts if p)}"
        )
        raise CheckpointError(msg)


def load_model(model: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """Load the weights into the unwrapped model, in their saved dtypes.

    A floating-point tensor saved in another dtype than the model's (a model converted to
    float64 by ``DeviceCB(dtype=...)``, say) converts the model's, in place: loading
    float64 weights into float32 would round them.
    """
    check_model(model, state, name)
    target = unwrap_model(model)
    for key, tensor in [*target.named_parameters(), *target.named_buffers()]:
        saved = state.get(key)
        if (
            isinstance(saved, torch.Tensor)
            and saved.dtype != tensor.dtype
            and saved.is_floating_point()
            and tensor.is_floating_point()
        ):
            tensor.data = tensor.data.to(saved.dtype)
    target.load_state_dict(state)


def callback_states(cbs: Iterable[Callback]) -> dict[str, Any]:
    """Return every callback's non-empty ``state_dict()``, keyed as ``callback_keys`` does."""
    states = {}
    for key, cb in callback_keys(cbs):
        state = cb.state_dict()
        if state:
            states[key] = state
    return states


def check_callbacks(cbs: Iterable[Callback], states: Mapping[str, Any], name: str) -> None:
    """Refuse a checkpoint whose callback states do not match the callbacks, naming both."""
    keys = [key for key, _ in callback_keys(cbs)]
    extra = sorted(set(states) - set(keys))
    if extra:
        msg = (
            f"checkpoint {name} holds the state of {extra}, which learn.cbs lacks "
            f"(it has {keys or 'none'}): resume with the callbacks the checkpointed fit had"
        )
        raise CheckpointError(msg)


def load_callbacks(cbs: Iterable[Callback], states: Mapping[str, Any], name: str) -> None:
    """Give each callback its saved state (those with none saved are left as they are)."""
    check_callbacks(cbs, states, name)
    for key, cb in callback_keys(cbs):
        state = states.get(key)
        if state is None:
            continue
        try:
            cb.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as exc:
            msg = (
                f"checkpoint {name}: {type(cb).__name__}.load_state_dict refused its saved "
                f"state: {exception_text(exc, 300)}"
            )
            raise CheckpointError(msg) from exc


def loader_state(data: object) -> Any:
    """Return a stateful loader's ``state_dict()`` (its position mid-pass), or None."""
    return getattr(data, "state_dict")() if stateful(data) else None  # noqa: B009 (a duck-typed loader)


def load_loader_state(data: object, state: Any) -> None:
    """Give a stateful loader its saved position back."""
    getattr(data, "load_state_dict")(state)  # noqa: B009 (a duck-typed loader)


def loader_snapshot(data: object, *, with_state: bool) -> dict[str, Any]:
    """Return a loader's generators' states, and its own state (a stateful one's) if asked."""
    return {
        "generators": [g.get_state() for g in loader_generators(data)],
        "state": loader_state(data) if with_state else None,
    }


def restore_generators(data: object, snapshot: Mapping[str, Any]) -> None:
    """Give a loader's generators their states of ``snapshot`` back.

    Only those: a stateful loader's own state is loaded only to resume a pass it was in
    (loaded between passes, a finished pass's state would change the next one's order).
    """
    for generator, state in zip(loader_generators(data), snapshot["generators"], strict=False):
        generator.set_state(state)
