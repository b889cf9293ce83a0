"""The stock callbacks that come with fsm_learner, one module each.

Their orders, and which force a host-device sync, are in the README's table. Importing
this package needs the ``callbacks`` extra (torchmetrics, rich, matplotlib):
``pip install 'fsm-learner[callbacks]'``. ``TensorBoardCB`` also needs the
``tensorboard`` extra, when one is constructed: importing this package does not.
"""

from callbacks.checkpoint import CheckpointCB
from callbacks.csv_logger import CSVLoggerCB
from callbacks.device import DeviceCB
from callbacks.early_stopping import EarlyStoppingCB
from callbacks.grad_accum import GradientAccumulationCB
from callbacks.grad_clip import GradientClipCB
from callbacks.lr_finder import LRFinderCB, lr_find
from callbacks.metrics import MetricsCB
from callbacks.mixed_precision import MixedPrecisionCB
from callbacks.monitor import Monitor, metrics_of
from callbacks.progress import ProgressCB
from callbacks.recorder import Recorder
from callbacks.save_model import SaveModelCB, load_checkpoint
from callbacks.schedulers import BatchSchedCB, EpochSchedCB
from callbacks.single_batch import SingleBatchCB
from callbacks.tensorboard import TensorBoardCB
from callbacks.terminate_on_nan import TerminateOnNaNCB

__all__ = [
    "BatchSchedCB",
    "CSVLoggerCB",
    "CheckpointCB",
    "DeviceCB",
    "EarlyStoppingCB",
    "EpochSchedCB",
    "GradientAccumulationCB",
    "GradientClipCB",
    "LRFinderCB",
    "MetricsCB",
    "MixedPrecisionCB",
    "Monitor",
    "ProgressCB",
    "Recorder",
    "SaveModelCB",
    "SingleBatchCB",
    "TensorBoardCB",
    "TerminateOnNaNCB",
    "load_checkpoint",
    "lr_find",
    "metrics_of",
]
