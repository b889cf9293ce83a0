"""``fsm-learner demo``: train a small CNN on scikit-learn's digits, end to end.

It uses the stock callbacks a newcomer expects (DeviceCB, MetricsCB, ProgressCB,
Recorder), writes the audit log, a loss-and-metrics plot and the run's diagram to
``out``, then audits its own log and says where each file went. Needs the ``demo``
extra: ``pip install 'fsm-learner[demo]'``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F

from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.summary import render_reports
from fsm_learner.diagram import DiagramFormat, render, run_view
from fsm_learner.examples import digits_dataloaders, small_cnn
from fsm_learner.learner import FitResult, Learner

if TYPE_CHECKING:
    from callbacks import MetricsCB, Recorder
    from fsm_learner.audit.replay import RunReport
    from fsm_learner.callback import Callback

__all__ = ["DemoResult", "DemoSettings", "run_demo"]


@attrs.frozen
class DemoSettings:
    """The demo's options, as ``fsm-learner demo`` takes them."""

    epochs: int = 8
    lr: float = 1e-2
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    out: Path = Path("runs")


@attrs.frozen
class DemoResult:
    """What the demo produced."""

    fit: FitResult
    valid_accuracy: float
    history: list[dict[str, float]]
    report: RunReport
    files: dict[str, Path]


def _callbacks(settings: DemoSettings, file: IO[str]) -> tuple[list[Callback], MetricsCB, Recorder]:
    from torchmetrics.classification import MulticlassAccuracy  # noqa: PLC0415 (demo extra)

    from callbacks import DeviceCB, MetricsCB, ProgressCB, Recorder  # noqa: PLC0415

    device = None if settings.device == "auto" else settings.device
    metrics = MetricsCB(accuracy=MulticlassAccuracy(num_classes=10))
    recorder = Recorder()
    return [DeviceCB(device), metrics, ProgressCB(file=file), recorder], metrics, recorder


def _diagram(log: Path, run_id: str, out: Path) -> Path:
    view = run_view(log, run_id=run_id)
    if shutil.which("dot") is not None:
        path = out / f"{run_id}-diagram.svg"
        path.write_bytes(render(view, DiagramFormat.SVG))
    else:
        path = out / f"{run_id}-diagram.mmd"
        path.write_bytes(render(view, DiagramFormat.MERMAID))
    return path


def run_demo(settings: DemoSettings, *, file: IO[str] | None = None) -> DemoResult:
    """Train, plot, draw, audit; print progress and the summary to ``file``."""
    file = file if file is not None else sys.stdout
    torch.manual_seed(settings.seed)
    cbs, metrics, recorder = _callbacks(settings, file)
    learn = Learner(
        small_cnn(settings.seed),
        digits_dataloaders(settings.batch_size, seed=settings.seed),
        F.cross_entropy,
        settings.lr,
        cbs,
        torch.optim.Adam,
        audit_log=settings.out,
    )
    fit = learn.fit(settings.epochs)
    log = settings.out / f"{fit.run_id}.jsonl"
    plot = recorder.plot(settings.out / f"{fit.run_id}-loss.png")
    diagram = _diagram(log, fit.run_id, settings.out)
    [report], _ = audit_file(log)
    print(render_reports([report]), file=file)
    files = {"audit log": log, "plot": plot, "diagram": diagram}
    for name, path in files.items():
        print(f"{name}: {path}", file=file)
    history = list(metrics.history)
    accuracy = history[-1]["valid_accuracy"] if history else float("nan")
    print(f"validation accuracy: {accuracy:.4f}", file=file)
    return DemoResult(fit, accuracy, history, report, files)
