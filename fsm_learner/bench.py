"""``fsm-learner bench``: what the machine and its log cost per batch, against a bare loop.

For each model, in one process and interleaved (bare, fsm log off, fsm log on, bare, ...),
a bare PyTorch loop of ``epochs`` epochs (training pass with backward/step/zero_grad,
validation pass under no_grad, the same DataLoader) and ``Learner.fit(epochs)`` on an
identical model, with the log off and on. What a fit costs once (building the optimizer,
opening, writing and closing the log) is measured apart, on a fit with no batch. Each run
is timed with the process's CPU time (wall time plus a device sync on CUDA), each fsm run
is divided by the bare run of its round, and the median of those per-round ratios is
reported with its min and max: the machines this runs on are shared and noisy, and
rounds cancel most of the drift. A benchmark, not a test: nothing here asserts.

When asked (``agreement=True``, ``fsm-learner bench --agreement``), it also measures what
agreeing across ranks costs: two worker processes on this machine form a gloo group, build
the learner's agreement group (``start_world``) and time ``World.agree`` (one all-reduce of
eight integers) against a bare all-reduce of as many, then a ``tiny`` fit across the
two ranks (no DDP, every rank all the data) against the same fit in one process. That is
wall time (waiting for the other rank is the cost), on rank 0.

When asked (``profile_hooks=True``, ``fsm-learner bench --profile-hooks``), it also
measures what ``Learner(..., profile_hooks=True)`` costs: a ``tiny`` fit with
``N_PROFILED_CALLBACKS`` callbacks that implement every batch hook (doing nothing, so
that the timing is all there is to see), log on, with profiling off and on in turn; the
hook calls per fit are read back from the profiled fit's own ``hook_times`` notes.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fsm_learner.audit.codec import Field, RecordError, RunStatus, Transition, decode
from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.writer import AuditWriter
from fsm_learner.callback import Callback
from fsm_learner.distributed import Distributed, Proposal, World, start_world
from fsm_learner.examples import digits_dataloaders, small_cnn, tiny_mlp, wide_mlp
from fsm_learner.learner import DataLoaders, Learner
from fsm_learner.machine import Hook, table_digest

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import nn

__all__ = [
    "AGREEMENTS_PER_TRAINING_BATCH",
    "AGREEMENTS_PER_VALIDATION_BATCH",
    "AgreementCost",
    "BenchReport",
    "CaseResult",
    "ProfileHooksCost",
    "agreement_cost",
    "audit_throughput",
    "profile_hooks_cost",
    "run_bench",
    "write_synthetic_log",
]

_Timed = TypeVar("_Timed")

N_NOOP_CALLBACKS: Final = 50
N_PROFILED_CALLBACKS: Final = 5
"""Callbacks of the profile_hooks case, each hooked on every batch hook."""
_LR: Final = 0.1


@attrs.frozen
class _Config:
    name: str
    model: Callable[[int], nn.Module]
    batch_size: int


CONFIGS: Final = {
    "tiny": _Config("tiny", tiny_mlp, 64),
    "small": _Config("small", small_cnn, 128),
    "few": _Config("few", wide_mlp, 256),
}
"""``few``: an MLP 64-128-10 on batches of 256, 8 batches per epoch: a fit's fixed cost shows."""


@attrs.frozen
class CaseResult:
    """One case: medians per batch, and the per-pair ratio fsm / bare."""

    name: str
    pairs: int
    batches_per_run: int
    bare_us_per_batch: float
    fsm_us_per_batch: float
    overhead_us_per_batch: float
    ratio_median: float
    ratio_min: float
    ratio_max: float


@attrs.frozen
class AgreementCost:
    """What agreeing across ranks costs: one all-reduce per agreement (gloo, on the CPU).

    Wall time per call on rank 0, each round's mean; the median of the rounds, with min
    and max. Per batch: times the agreements of a training and of a validation batch
    (``AGREEMENTS_PER_*``); passes and fits agree once more at their start and end.
    """

    backend: str
    ranks: int
    rounds: int
    calls_per_round: int
    us_per_agreement: float
    us_per_agreement_min: float
    us_per_agreement_max: float
    us_per_all_reduce: float
    """A bare ``all_reduce`` of as many int64 on the same group, in the same rounds."""
    cpu_us_per_agreement: float
    """CPU time of rank 0's process per agreement (gloo's threads included): the work alone."""
    agreements_per_training_batch: int
    agreements_per_validation_batch: int
    us_per_training_batch: float
    us_per_validation_batch: float
    fit: CaseResult
    """A ``tiny`` fit across the ranks (no DDP, every rank all the data) against one process.

    ``bare_*`` is the fit in one process, ``fsm_*`` the fit across ranks; per batch, what
    the fit across ranks costs once (the run id, the pass and fit agreements) included.
    """


@attrs.frozen
class ProfileHooksCost:
    """What ``profile_hooks=True`` costs: the same fits with hooked callbacks, profiled or not.

    In each case ``bare_*`` is the fit with profiling off, ``fsm_*`` with it on (log on
    both). ``fit`` trains the tiny MLP on digits; ``loop`` runs the same callbacks over
    batches whose work (predict, loss, backward, step) is overridden to do nothing: the
    machine and its hooks alone, where the timing is most of what changes.
    """

    callbacks: int
    hooks_per_callback: int
    hook_calls_per_run: int
    """Hook calls of one digits fit, as its ``hook_times`` notes count them."""
    loop_hook_calls_per_run: int
    """Hook calls of one ``loop`` fit, as its notes count them."""
    ns_per_hook_call: float
    """The ``loop`` case's median per-round extra time, per hook call."""
    fit: CaseResult
    loop: CaseResult


@attrs.frozen
class BenchReport:
    """Everything ``fsm-learner bench`` measured."""

    torch_version: str
    device: str
    threads: int
    cases: tuple[CaseResult, ...]
    noop_callbacks: CaseResult
    epochs_per_run: int
    fit_fixed_us_log_off: float
    fit_fixed_us_log_on: float
    """With the runs appended to one .jsonl file."""
    fit_fixed_us_log_on_new_file: float
    """With a directory: each run creates its own file (the file system's cost included)."""
    writer_us_per_record_batched: float
    writer_us_per_record_one_call_each: float
    bytes_per_transition: float
    audit_records: int
    audit_records_per_s: float
    agreement: AgreementCost | None = None
    """Agreement across ranks, when asked for (``None`` otherwise)."""
    profile_hooks: ProfileHooksCost | None = None
    """What profiling the hooks costs, when asked for (``None`` otherwise)."""

    def to_json(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return attrs.asdict(self)


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            return time.perf_counter() - start
        start = time.process_time()
        run()
        return time.process_time() - start


def _bare_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    dls: DataLoaders,
    epochs: int,
) -> None:
    for _ in range(epochs):
        _bare_epoch(model, opt, dls)


def _bare_epoch(model: nn.Module, opt: torch.optim.Optimizer, dls: DataLoaders) -> None:
    model.train()
    for x, y in dls.train:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.backward(loss)
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        for x, y in dls.valid:
            F.cross_entropy(model(x), y)


def _n_batches(dls: DataLoaders) -> int:
    return sum(1 for _ in dls.train) + sum(1 for _ in dls.valid)


def _rounds(
    runs: Sequence[Callable[[], object]],
    *,
    pairs: int,
    warmup: int,
    timer: Callable[[Callable[[], object]], _Timed],
) -> list[list[_Timed]]:
    """Time ``runs`` in turn, ``pairs`` rounds after ``warmup``; the times per run."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[_Timed]] = [[] for _ in runs]
    for _ in range(pairs):
        for run, kept in zip(runs, times, strict=True):
            kept.append(timer(run))
    return times


def _result(name: str, times_a: list[float], times_b: list[float], batches: int) -> CaseResult:
    """B against A, round by round: the per-round ratios' median, min and max."""
    ratios = [b / a for a, b in zip(times_a, times_b, strict=True)]
    overheads = [(b - a) / batches * 1e6 for a, b in zip(times_a, times_b, strict=True)]
    return CaseResult(
        name=name,
        pairs=len(ratios),
        batches_per_run=batches,
        bare_us_per_batch=statistics.median(times_a) / batches * 1e6,
        fsm_us_per_batch=statistics.median(times_b) / batches * 1e6,
        overhead_us_per_batch=statistics.median(overheads),
        ratio_median=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
    )


@attrs.frozen
class _Knobs:
    device: torch.device
    pairs: int
    warmup: int
    epochs: int


def _cases(config: _Config, log_dir: Path, knobs: _Knobs) -> list[CaseResult]:
    """Time the bare loop, fsm with the log off and fsm with it on, in turn each round.

    The two fsm runs are each divided by the bare run of the same round, so the log's
    cost is read off runs made side by side.
    """
    device, epochs = knobs.device, knobs.epochs
    dls = digits_dataloaders(config.batch_size, device=device)
    bare_model = config.model(0).to(device)
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=_LR)
    off = Learner(config.model(0).to(device), dls, F.cross_entropy, _LR, audit_log=None)
    on = Learner(config.model(0).to(device), dls, F.cross_entropy, _LR, audit_log=log_dir)
    bare, fsm_off, fsm_on = _rounds(
        [
            lambda: _bare_epochs(bare_model, bare_opt, dls, epochs),
            lambda: off.fit(epochs),
            lambda: on.fit(epochs),
        ],
        pairs=knobs.pairs,
        warmup=knobs.warmup,
        timer=_Timer(device),
    )
    batches = _n_batches(dls) * epochs
    return [
        _result(f"{config.name}, log off", bare, fsm_off, batches),
        _result(f"{config.name}, log on", bare, fsm_on, batches),
    ]


class _NoOp(Callback):
    """A callback that implements no hook: it must cost nothing."""


def _noop_case(knobs: _Knobs) -> CaseResult:
    device, epochs = knobs.device, knobs.epochs
    config = CONFIGS["tiny"]
    dls = digits_dataloaders(config.batch_size, device=device)
    plain = Learner(config.model(0).to(device), dls, F.cross_entropy, _LR, audit_log=None)
    noops = [_NoOp() for _ in range(N_NOOP_CALLBACKS)]
    busy = Learner(config.model(0).to(device), dls, F.cross_entropy, _LR, noops, audit_log=None)
    plain_times, busy_times = _rounds(
        [lambda: plain.fit(epochs), lambda: busy.fit(epochs)],
        pairs=knobs.pairs,
        warmup=knobs.warmup,
        timer=_Timer(device),
    )
    name = f"tiny, {N_NOOP_CALLBACKS} no-op callbacks vs none"
    return _result(name, plain_times, busy_times, _n_batches(dls) * epochs)


class _EveryBatchHook(Callback):
    """A callback on every batch hook that does nothing: what its hooks cost is the timing."""

    def before_batch(self, _learn: Learner) -> None:
        """Do nothing."""

    def after_predict(self, _learn: Learner) -> None:
        """Do nothing."""

    def after_loss(self, _learn: Learner) -> None:
        """Do nothing."""

    def after_backward(self, _learn: Learner) -> None:
        """Do nothing."""

    def after_step(self, _learn: Learner) -> None:
        """Do nothing."""

    def after_batch(self, _learn: Learner) -> None:
        """Do nothing."""


def _hooks_of(kind: type[Callback]) -> int:
    """Count the hooks a callback class implements."""
    return sum(getattr(kind, hook) is not getattr(Callback, hook) for hook in Hook)


_NOTHING: Final = torch.zeros(())
_LOOP_BATCHES: Final = (200, 100)
"""Training and validation batches of the ``loop`` case."""


class _NoWork(Callback):
    """Overrides a batch's work with nothing: the fit is the machine and its hooks alone."""

    def predict(self, learn: Learner, _proceed: Callable[[], None]) -> None:
        """Predict nothing (a constant)."""
        learn.preds = _NOTHING

    def compute_loss(self, learn: Learner, _proceed: Callable[[], None]) -> None:
        """Compute no loss (a constant)."""
        learn.loss = _NOTHING

    def backward(self, _learn: Learner, _proceed: Callable[[], None]) -> None:
        """Go back through nothing."""

    def step(self, _learn: Learner, _proceed: Callable[[], None]) -> None:
        """Step nothing."""


def profile_hooks_cost(knobs: _Knobs, log_dir: Path) -> ProfileHooksCost:
    """Time fits with hooked callbacks, profile_hooks off and on in turn (log on)."""
    config = CONFIGS["tiny"]
    digits = digits_dataloaders(config.batch_size, device=knobs.device)
    fit, calls = _profile_case(digits, [], knobs, log_dir)
    train, valid = _LOOP_BATCHES
    nothing = DataLoaders([0] * train, [0] * valid)
    loop, loop_calls = _profile_case(nothing, [_NoWork()], knobs, log_dir)
    extra = [
        (on - off) / loop_calls * 1e9
        for off, on in zip(loop[0], loop[1], strict=True)  # per round
    ]
    return ProfileHooksCost(
        callbacks=N_PROFILED_CALLBACKS,
        hooks_per_callback=_hooks_of(_EveryBatchHook),
        hook_calls_per_run=calls,
        loop_hook_calls_per_run=loop_calls,
        ns_per_hook_call=statistics.median(extra),
        fit=_result(_profile_name("tiny"), *fit, _n_batches(digits) * knobs.epochs),
        loop=_result(_profile_name("tiny, no work"), *loop, (train + valid) * knobs.epochs),
    )


def _profile_name(case: str) -> str:
    return f"{case}, {N_PROFILED_CALLBACKS} hooked callbacks, profile_hooks on vs off"


def _profile_case(
    dls: DataLoaders, extra: list[Callback], knobs: _Knobs, log_dir: Path
) -> tuple[tuple[list[float], list[float]], int]:
    """Time tiny fits of ``dls``, profiling off and on in turn; return the times and hook calls."""

    def learner(*, profile: bool) -> Learner:
        cbs = [*extra, *(_EveryBatchHook() for _ in range(N_PROFILED_CALLBACKS))]
        model = CONFIGS["tiny"].model(0).to(knobs.device)
        return Learner(
            model, dls, F.cross_entropy, _LR, cbs, audit_log=log_dir, profile_hooks=profile
        )

    off, on = learner(profile=False), learner(profile=True)
    off_times, on_times = _rounds(
        [lambda: off.fit(knobs.epochs), lambda: on.fit(knobs.epochs)],
        pairs=knobs.pairs,
        warmup=knobs.warmup,
        timer=_Timer(knobs.device),
    )
    return (off_times, on_times), _hook_calls(on)


def _hook_calls(learn: Learner) -> int:
    """Return the hook calls of the learner's last fit, as its log's hook_times notes say."""
    path = learn.audit_path
    if path is None:  # pragma: no cover (the case logs every fit)
        msg = "the profile_hooks case wrote no log"
        raise RuntimeError(msg)
    reports, _ = audit_file(path)
    [report] = [r for r in reports if r.run_id == learn.run_id]
    if not report.verified:  # pragma: no cover (a bug if it happens)
        msg = f"the profile_hooks case's log did not verify: {report.problem}"
        raise RuntimeError(msg)
    hooks = frozenset(Hook)  # the overrides' rows (_NoWork's) are no hook calls
    return sum(calls for (_, _, hook), (calls, _) in report.hook_times.items() if hook in hooks)


def _fixed_cost_us(target: Path | None, *, pairs: int) -> float:
    """Median CPU time of a whole fit with no batch: what each fit costs once."""
    learn = Learner(tiny_mlp(0), DataLoaders([], []), F.cross_entropy, _LR, audit_log=target)
    learn.fit(1)
    times = []
    for _ in range(pairs):
        start = time.process_time()
        learn.fit(1)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e6


def _bytes_per_transition(log_dir: Path) -> float:
    """Mean bytes of a transition record, newline included, over the logs in ``log_dir``."""
    sizes, count = 0, 0
    for path in log_dir.glob("*.jsonl"):
        for line in path.read_bytes().splitlines(keepends=True):
            try:
                record = decode(line)
            except RecordError:  # pragma: no cover (the bench's own logs)
                continue
            if isinstance(record, Transition):
                sizes += len(line)
                count += 1
    return sizes / count if count else 0.0


_BATCH_PATH: Final = (
    ("begin_batch", "epoch", "batch"),
    ("predict", "batch", "predict"),
    ("compute_loss", "predict", "loss"),
    ("backward", "loss", "backward"),
    ("step", "backward", "step"),
    ("end_batch", "step", "epoch"),
)


def write_synthetic_log(path: Path, n_records: int) -> None:
    """Write a valid one-run log of about ``n_records`` records: one long training pass."""
    header = {Field.TABLE: table_digest(), Field.N_EPOCHS: 1, Field.RANK: 0}
    writer = AuditWriter(path, run_id="0123456789ab", key=None, header=header)
    writer.start()
    t0, pending = writer.t0_ns, writer.pending
    n_batches = max((n_records - 6) // len(_BATCH_PATH), 0)
    pending.append((t0 + 1, ("begin_fit", "idle", "fit", False), 0, 0))
    pending.append((t0 + 2, ("begin_epoch", "fit", "epoch", True), 0, 0))
    for i in range(n_batches):
        for k, (trigger, source, dest) in enumerate(_BATCH_PATH):
            pending.append((t0 + 3 + i * 6 + k, (trigger, source, dest, True), 0, i))
        if len(pending) >= 8192:
            writer.flush()
    end = t0 + 3 + n_batches * 6
    pending.append((end, ("end_epoch", "epoch", "fit", True), 0, max(n_batches - 1, 0)))
    pending.append((end + 1, ("end_fit", "fit", "idle", False), 0, max(n_batches - 1, 0)))
    writer.finish(RunStatus.COMPLETED, hook_ns={})


_WRITER_RECORDS: Final = 20_000


def writer_cost_us(directory: Path, *, flush_every: int) -> float:
    """CPU µs per transition record through the audit writer, flushing every ``flush_every``.

    ``flush_every=1`` is one structlog call per record; the learner flushes per pass.
    """
    writer = AuditWriter(
        directory / f"writer-{flush_every}.jsonl", run_id="0" * 12, key=None, header={}
    )
    writer.start()
    key = ("compute_loss", "predict", "loss", True)
    start = time.process_time()
    for i in range(_WRITER_RECORDS):
        writer.pending.append((writer.t0_ns + i, key, 0, i))
        if len(writer.pending) >= flush_every:
            writer.flush()
    writer.flush()
    elapsed = time.process_time() - start
    writer.close()
    return elapsed / _WRITER_RECORDS * 1e6


def audit_throughput(n_records: int, directory: Path) -> float:
    """Audit a synthetic log of ``n_records``; return records per second of CPU time."""
    path = directory / "synthetic.jsonl"
    write_synthetic_log(path, n_records)
    start = time.process_time()
    reports, problem = audit_file(path)
    elapsed = time.process_time() - start
    if problem is not None or not reports[0].verified:  # pragma: no cover (a bug if it happens)
        msg = f"the synthetic log did not verify: {problem or reports[0].problem}"
        raise RuntimeError(msg)
    return reports[0].records / elapsed


AGREEMENTS_PER_TRAINING_BATCH: Final = 3
"""Before its forward, before its backward, at its end (DDP's forward and backward are
collective). One more before the step when a hook or an override sits between backward
and step."""
AGREEMENTS_PER_VALIDATION_BATCH: Final = 1
"""At its end."""
AGREEMENT_RANKS: Final = 2
_AGREE_ROUNDS: Final = 15
_AGREE_CALLS: Final = 100
_AGREE_FIT_PAIRS: Final = 8
_AGREE_FIT_EPOCHS: Final = 2
_AGREE_TIMEOUT_S: Final = 120.0
"""A bound on a hang: on a 2-core machine the ranks take 10 to 20 s, a third of it starting."""
_AGREE_INTS: Final = 8
"""What ``World.agree`` all-reduces: eight int64."""
_AGREE_MARK: Final = 0x5EED
"""The same mark on every rank: the ranks agree without diverging."""
_AGREE_WORKER: Final = "from fsm_learner.bench import _agreement_worker; _agreement_worker()"


@attrs.frozen
class _AgreeKnobs:
    rounds: int
    calls: int
    fit_pairs: int
    timeout_s: float


def agreement_cost(
    *,
    rounds: int = _AGREE_ROUNDS,
    calls: int = _AGREE_CALLS,
    fit_pairs: int = _AGREE_FIT_PAIRS,
    timeout_s: float = _AGREE_TIMEOUT_S,
) -> AgreementCost:
    """Start two ranks here (gloo), time their agreements and a tiny fit; return the cost.

    The ranks are killed if they are not done within ``timeout_s``, or as soon as one
    fails; either raises ``RuntimeError`` with the end of what they printed.
    """
    knobs = _AgreeKnobs(rounds, calls, fit_pairs, timeout_s)
    with tempfile.TemporaryDirectory(prefix="fsm-learner-agree-") as tmp:
        out = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            port = _free_port()
            for rank in range(AGREEMENT_RANKS):  # kept one by one: a failed start stops the rest
                procs.append(_start_rank(rank, port, out, knobs))  # noqa: PERF401
            problem = _join(procs, timeout_s)
        finally:
            _stop(procs)
        if problem is not None:
            raise RuntimeError(f"{problem}{_logs_tail(out)}")
        measured = json.loads((out / "rank0.json").read_text())
    return _agreement_report(measured, knobs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_rank(rank: int, port: int, out: Path, knobs: _AgreeKnobs) -> subprocess.Popen[bytes]:
    """Start rank ``rank`` in a new interpreter; its output goes to ``out/rank<r>.log``."""
    args = [sys.executable, "-c", _AGREE_WORKER, str(out), json.dumps(attrs.asdict(knobs))]
    with (out / f"rank{rank}.log").open("wb") as log:
        return subprocess.Popen(  # noqa: S603 (this interpreter, running this module)
            args, env=_rank_env(rank, port), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )


def _rank_env(rank: int, port: int) -> dict[str, str]:
    """Return what ``env://`` reads, one thread, and this ``fsm_learner`` first on the path."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(AGREEMENT_RANKS),
        OMP_NUM_THREADS="1",
        PYTHONPATH=path,
    )


def _join(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> str | None:
    """Wait until every rank exits 0; return what went wrong instead, if anything did."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [proc.poll() for proc in procs]
        for rank, code in enumerate(codes):
            if code not in {None, 0}:
                return f"agreement bench: rank {rank} exited with {code}"
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() >= deadline:
            return f"agreement bench: the ranks were not done within {timeout_s:g} s (killed)"
        time.sleep(0.05)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Kill every rank still running, then reap them all."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _logs_tail(out: Path) -> str:
    """Return the last lines each rank printed, for the error."""
    tails = []
    for log in sorted(out.glob("rank*.log")):
        lines = log.read_text(errors="replace").strip().splitlines()[-3:]
        if lines:
            tails.append(f"{log.stem}: " + " | ".join(lines))
    return "".join(f"\n  {tail}" for tail in tails)


def _agreement_report(measured: dict[str, Any], knobs: _AgreeKnobs) -> AgreementCost:
    per_call = [t / knobs.calls * 1e6 for t in measured["agree"]]
    median = statistics.median(per_call)
    bare = statistics.median(t / knobs.calls * 1e6 for t in measured["all_reduce"])
    cpu = statistics.median(t / knobs.calls * 1e6 for t in measured["agree_cpu"])
    fit = _result(
        f"tiny, {AGREEMENT_RANKS} ranks vs 1 process",
        measured["fit_one"],
        measured["fit_ranks"],
        measured["fit_batches"],
    )
    return AgreementCost(
        backend="gloo",
        ranks=AGREEMENT_RANKS,
        rounds=knobs.rounds,
        calls_per_round=knobs.calls,
        us_per_agreement=median,
        us_per_agreement_min=min(per_call),
        us_per_agreement_max=max(per_call),
        us_per_all_reduce=bare,
        cpu_us_per_agreement=cpu,
        agreements_per_training_batch=AGREEMENTS_PER_TRAINING_BATCH,
        agreements_per_validation_batch=AGREEMENTS_PER_VALIDATION_BATCH,
        us_per_training_batch=AGREEMENTS_PER_TRAINING_BATCH * median,
        us_per_validation_batch=AGREEMENTS_PER_VALIDATION_BATCH * median,
        fit=fit,
    )


def _agreement_worker() -> None:
    """One rank of ``agreement_cost``: ``python -c ... OUT KNOBS`` with ``env://`` set."""
    out, knobs = Path(sys.argv[1]), _AgreeKnobs(**json.loads(sys.argv[2]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=knobs.timeout_s))
    try:
        world = start_world(Distributed(timeout=knobs.timeout_s))
        measured = {**_time_agreements(world, knobs), **_time_fits(world, knobs)}
    finally:
        dist.destroy_process_group()
    if world.is_main:
        (out / "rank0.json").write_text(json.dumps(measured))


class _RankTimer:
    """Wall and CPU time of a run that every rank starts together (a barrier first, untimed)."""

    def __init__(self, world: World) -> None:
        self.group = world.group

    def __call__(self, run: Callable[[], object]) -> tuple[float, float]:
        dist.barrier(group=self.group)
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - wall, time.process_time() - cpu


def _repeat(call: Callable[[], object], times: int) -> None:
    for _ in range(times):
        call()


def _time_agreements(world: World, knobs: _AgreeKnobs) -> dict[str, list[float]]:
    """Time rounds of agreements and of bare all-reduces, in turn; seconds per round."""
    tensor = torch.zeros(_AGREE_INTS, dtype=torch.int64)

    def bare() -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=world.group)

    def agree() -> None:
        world.agree(Proposal.NONE, _AGREE_MARK)

    bare_times, agree_times = _rounds(
        [lambda: _repeat(bare, knobs.calls), lambda: _repeat(agree, knobs.calls)],
        pairs=knobs.rounds,
        warmup=1,
        timer=_RankTimer(world),
    )
    return {
        "all_reduce": [wall for wall, _ in bare_times],
        "agree": [wall for wall, _ in agree_times],
        "agree_cpu": [cpu for _, cpu in agree_times],
    }


def _time_fits(world: World, knobs: _AgreeKnobs) -> dict[str, Any]:
    """Time a tiny fit in this process alone and across the ranks, in turn."""
    config = CONFIGS["tiny"]
    dls = digits_dataloaders(config.batch_size)
    across = Distributed(timeout=knobs.timeout_s, wrap_model=False, distribute_samplers=False)
    one = Learner(config.model(0), dls, F.cross_entropy, _LR, audit_log=None, distributed=False)
    ranks = Learner(config.model(0), dls, F.cross_entropy, _LR, audit_log=None, distributed=across)
    one_times, ranks_times = _rounds(
        [lambda: one.fit(_AGREE_FIT_EPOCHS), lambda: ranks.fit(_AGREE_FIT_EPOCHS)],
        pairs=knobs.fit_pairs,
        warmup=1,
        timer=_RankTimer(world),
    )
    return {
        "fit_one": [wall for wall, _ in one_times],
        "fit_ranks": [wall for wall, _ in ranks_times],
        "fit_batches": _n_batches(dls) * _AGREE_FIT_EPOCHS,
    }


def run_bench(  # noqa: PLR0913 (each knob is a command-line option)
    *,
    configs: Sequence[str] = ("tiny", "small", "few"),
    pairs: int = 30,
    warmup: int = 3,
    device: str = "cpu",
    threads: int = 1,
    epochs: int = 5,
    audit_records: int = 1_000_000,
    agreement: bool = False,
    profile_hooks: bool = False,
) -> BenchReport:
    """Run every case and return the report.

    ``agreement``: time agreement across ranks too; ``profile_hooks``: what profiling
    the hooks costs too.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="fsm-learner-bench-") as tmp:
        log_dir = Path(tmp) / "runs"
        knobs = _Knobs(dev, pairs, warmup, epochs)
        cases = [case for name in configs for case in _cases(CONFIGS[name], log_dir, knobs)]
        noop = _noop_case(knobs)
        per_transition = _bytes_per_transition(log_dir)
        fixed_off = _fixed_cost_us(None, pairs=pairs)
        fixed_on = _fixed_cost_us(Path(tmp) / "fixed.jsonl", pairs=pairs)
        fixed_new_file = _fixed_cost_us(Path(tmp) / "fixed", pairs=pairs)
        batched = writer_cost_us(Path(tmp), flush_every=170)  # about one tiny pass
        one_each = writer_cost_us(Path(tmp), flush_every=1)
        throughput = audit_throughput(audit_records, Path(tmp))
        profiled = profile_hooks_cost(knobs, Path(tmp) / "profiled") if profile_hooks else None
    across = agreement_cost() if agreement else None
    return BenchReport(
        torch_version=torch.__version__,
        device=str(dev),
        threads=threads,
        cases=tuple(cases),
        noop_callbacks=noop,
        epochs_per_run=epochs,
        fit_fixed_us_log_off=fixed_off,
        fit_fixed_us_log_on=fixed_on,
        fit_fixed_us_log_on_new_file=fixed_new_file,
        writer_us_per_record_batched=batched,
        writer_us_per_record_one_call_each=one_each,
        bytes_per_transition=per_transition,
        audit_records=audit_records,
        audit_records_per_s=throughput,
        agreement=across,
        profile_hooks=profiled,
    )


def _row(case: CaseResult) -> str:
    return (
        f"{case.name:<34}{case.bare_us_per_batch:>10.1f}{case.fsm_us_per_batch:>10.1f}"
        f"{case.overhead_us_per_batch:>10.1f}   {case.ratio_median:.3f} "
        f"[{case.ratio_min:.3f}, {case.ratio_max:.3f}]"
    )


def render_bench(report: BenchReport) -> str:
    """Render the report as the text ``fsm-learner bench`` prints."""
    first = report.cases[0] if report.cases else report.noop_callbacks
    title = (
        f"fsm-learner bench: torch {report.torch_version}, device {report.device}, "
        f"{report.threads} thread(s), {first.pairs} interleaved pairs per case of "
        f"{report.epochs_per_run} epochs each, CPU time"
    )
    lines = [
        title,
        (
            f"{'case':<34}{'bare':>10}{'fsm':>10}{'overhead':>10}"
            "   ratio fsm/bare (median [min, max])"
        ),
        f"{'':<34}{'µs/batch':>10}{'µs/batch':>10}{'µs/batch':>10}",
    ]
    lines += [_row(case) for case in (*report.cases, report.noop_callbacks)]
    lines.append(
        f"once per fit: {report.fit_fixed_us_log_off:.0f} µs with the log off, "
        f"{report.fit_fixed_us_log_on:.0f} µs with it on (open, header, footer, close; "
        f"{report.fit_fixed_us_log_on_new_file:.0f} µs creating a file per run)",
    )
    lines.append(
        f"audit writer alone: {report.writer_us_per_record_batched:.2f} µs per record in "
        f"blocks of 170, {report.writer_us_per_record_one_call_each:.2f} µs with one sealed "
        "block (one structlog call, one write) per record",
    )
    lines.append(f"audit log: {report.bytes_per_transition:.1f} bytes per transition record")
    lines.append(
        f"fsm-learner audit: {report.audit_records_per_s:,.0f} records/s "
        f"({report.audit_records:,} records, one core)",
    )
    if report.agreement is not None:
        lines += _agreement_lines(report.agreement)
    if report.profile_hooks is not None:
        lines += _profile_lines(report.profile_hooks)
    return "\n".join(lines)


def _profile_lines(cost: ProfileHooksCost) -> list[str]:
    """Render the profile_hooks section: per batch off and on, in each case; per hook call."""
    per_batch = cost.hook_calls_per_run / cost.fit.batches_per_run
    return [
        *(_profile_case_line(case) for case in (cost.fit, cost.loop)),
        (
            f"profile_hooks per hook call: {cost.ns_per_hook_call:.0f} ns, from the no-work case "
            f"({cost.hook_calls_per_run:,} hook calls per digits fit, {per_batch:.1f} per batch: "
            f"{cost.callbacks} callbacks x {cost.hooks_per_callback} batch hooks)"
        ),
    ]


def _profile_case_line(case: CaseResult) -> str:
    return (
        f"{case.name} (log on, {case.pairs} pairs of {case.batches_per_run} batches): "
        f"{case.bare_us_per_batch:.1f} µs/batch off, {case.fsm_us_per_batch:.1f} on, "
        f"{case.overhead_us_per_batch:+.1f} µs/batch, ratio {case.ratio_median:.3f} "
        f"[{case.ratio_min:.3f}, {case.ratio_max:.3f}]"
    )


def _agreement_lines(cost: AgreementCost) -> list[str]:
    """Render the agreement section: per call, per batch, and the fit across ranks."""
    fit = cost.fit
    return [
        (
            f"agreement across {cost.ranks} ranks ({cost.backend} on CPU, wall time, median of "
            f"{cost.rounds} rounds of {cost.calls_per_round} calls): "
            f"{cost.us_per_agreement:.1f} µs per agreement [{cost.us_per_agreement_min:.1f}, "
            f"{cost.us_per_agreement_max:.1f}]; a bare all-reduce {cost.us_per_all_reduce:.1f} µs; "
            f"CPU time {cost.cpu_us_per_agreement:.1f} µs per agreement"
        ),
        (
            f"agreement per batch: {cost.us_per_training_batch:.1f} µs per training batch "
            f"({cost.agreements_per_training_batch} agreements), "
            f"{cost.us_per_validation_batch:.1f} µs per validation batch "
            f"({cost.agreements_per_validation_batch})"
        ),
        (
            f"{fit.name} (no DDP, every rank all the data, {fit.pairs} pairs of "
            f"{fit.batches_per_run} batches): {fit.fsm_us_per_batch:.1f} against "
            f"{fit.bare_us_per_batch:.1f} µs/batch, {fit.overhead_us_per_batch:+.1f} µs/batch, "
            f"ratio {fit.ratio_median:.3f} [{fit.ratio_min:.3f}, {fit.ratio_max:.3f}]"
        ),
    ]
