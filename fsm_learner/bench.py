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
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import torch
import torch.nn.functional as F

from fsm_learner.audit.codec import Field, RecordError, RunStatus, Transition, decode
from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.writer import AuditWriter
from fsm_learner.callback import Callback
from fsm_learner.examples import digits_dataloaders, small_cnn, tiny_mlp, wide_mlp
from fsm_learner.learner import DataLoaders, Learner
from fsm_learner.machine import table_digest

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import nn

__all__ = [
    "BenchReport",
    "CaseResult",
    "audit_throughput",
    "run_bench",
    "write_synthetic_log",
]

N_NOOP_CALLBACKS: Final = 50
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
    runs: Sequence[Callable[[], object]], *, pairs: int, warmup: int, timer: _Timer
) -> list[list[float]]:
    """Time ``runs`` in turn, ``pairs`` rounds after ``warmup``; the times per run."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
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


def run_bench(  # noqa: PLR0913 (each knob is a command-line option)
    *,
    configs: Sequence[str] = ("tiny", "small", "few"),
    pairs: int = 30,
    warmup: int = 3,
    device: str = "cpu",
    threads: int = 1,
    epochs: int = 5,
    audit_records: int = 1_000_000,
) -> BenchReport:
    """Run every case and return the report."""
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
    return "\n".join(lines)
