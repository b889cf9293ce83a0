"""Real data and small models for the demo and the benchmark: scikit-learn's digits.

The 1,797 handwritten digits (8x8 grey levels) ship inside scikit-learn, so nothing is
downloaded. scikit-learn is an optional extra: ``pip install 'fsm-learner[demo]'``.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fsm_learner.exceptions import ConfigurationError
from fsm_learner.learner import DataLoaders

__all__ = [
    "N_VALID",
    "digits_dataloaders",
    "digits_tensors",
    "small_cnn",
    "tiny_mlp",
    "wide_mlp",
]

N_VALID = 397
"""Digits held out for validation (the rest, 1,400, train)."""


@cache
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (x: float32 [1797, 64] in [0, 1], y: int64 [1797])."""
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        msg = (
            "the digits data set comes with scikit-learn, which is not installed: "
            "pip install 'fsm-learner[demo]'"
        )
        raise ConfigurationError(msg) from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def digits_dataloaders(
    batch_size: int = 64,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DataLoaders:
    """Training (1,400, shuffled) and validation (397) DataLoaders over a seeded split."""
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ConfigurationError(msg)
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].to(device), y[perm].to(device)
    n_train = len(x) - N_VALID
    train = TensorDataset(x[:n_train], y[:n_train])
    valid = TensorDataset(x[n_train:], y[n_train:])
    shuffle = torch.Generator().manual_seed(seed)
    return DataLoaders(
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle),
        DataLoader(valid, batch_size=batch_size),
    )


def tiny_mlp(seed: int = 0) -> nn.Module:
    """Build the MLP 64-32-10, seeded: the case where per-batch overhead shows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def wide_mlp(seed: int = 0) -> nn.Module:
    """Build the MLP 64-128-10, seeded: on batches of 256, a fit has few batches."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def small_cnn(seed: int = 0) -> nn.Module:
    """Build a small CNN for 8x8 digits (two convolutions), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
