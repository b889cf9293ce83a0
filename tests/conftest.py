"""Shared fixtures; the data and models live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import batches_dls

from fsm_learner import DataLoaders

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Each test runs in its own directory, so default audit logs (runs/) land there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def dls() -> DataLoaders:
    """Three training batches and two validation batches of digits."""
    return batches_dls(3, 2)
