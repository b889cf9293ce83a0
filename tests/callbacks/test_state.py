"""Every stock callback's state_dict() after a fit survives torch.load(weights_only=True).

A checkpoint is read with weights_only=True (callbacks/_state.py checks what comes back), so
a state holding anything but tensors, numbers, strings and containers could not be resumed.
Each callback's resume from real checkpoints is tested in its own module.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp, same
from torch.optim.lr_scheduler import StepLR
from torchmetrics.classification import MulticlassAccuracy

from callbacks import (
    BatchSchedCB,
    CheckpointCB,
    DeviceCB,
    EarlyStoppingCB,
    EpochSchedCB,
    GradientAccumulationCB,
    GradientClipCB,
    LRFinderCB,
    MetricsCB,
    MixedPrecisionCB,
    ProgressCB,
    Recorder,
    SaveModelCB,
    SingleBatchCB,
    TerminateOnNaNCB,
)
from fsm_learner import Learner

STOCK = {  # files go to the test's directory (conftest's _in_tmp_dir)
    "BatchSchedCB": lambda: BatchSchedCB.one_cycle(0.5),
    "CheckpointCB": lambda: CheckpointCB("checkpoints"),
    "DeviceCB": lambda: DeviceCB("cpu"),
    "EarlyStoppingCB": lambda: EarlyStoppingCB("valid_loss", patience=5),
    "EpochSchedCB": lambda: EpochSchedCB(lambda opt: StepLR(opt, step_size=1)),
    "GradientAccumulationCB": lambda: GradientAccumulationCB(2),
    "GradientClipCB": lambda: GradientClipCB(0.5),
    "LRFinderCB": lambda: LRFinderCB(num_it=4),
    "MetricsCB": lambda: MetricsCB(MulticlassAccuracy(num_classes=10)),
    "MixedPrecisionCB": lambda: MixedPrecisionCB(dtype=torch.float16, scaler=True),
    "ProgressCB": lambda: ProgressCB(file=io.StringIO()),
    "Recorder": Recorder,
    "SaveModelCB": lambda: SaveModelCB("best.pt", monitor="valid_loss"),
    "SingleBatchCB": SingleBatchCB,
    "TerminateOnNaNCB": lambda: TerminateOnNaNCB(check_every=2),
}


@pytest.mark.parametrize("name", STOCK)
def test_the_state_after_a_fit_loads_back_from_a_weights_only_file(tmp_path, name):
    """torch.save, torch.load(weights_only=True), load_state_dict: the same state again."""
    cb = STOCK[name]()
    cbs = [cb] if isinstance(cb, MetricsCB) else [MetricsCB(), cb]
    Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, cbs, audit_log=None).fit(2)
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert same(state, cb.state_dict())
    fresh = STOCK[name]()
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), state)
