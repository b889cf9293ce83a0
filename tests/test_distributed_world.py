"""fsm_learner.distributed in one process: settings, the one-process world, loaders, messages.

What happens across real ranks is in tests/test_distributed.py (torchrun).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_dls, mlp
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    SequentialSampler,
    TensorDataset,
)

from fsm_learner import ConfigurationError, Distributed, Learner
from fsm_learner.distributed import (
    LOCAL,
    World,
    as_distributed,
    distributed_loader,
    first_difference,
    set_sampler_epoch,
    start_world,
)


class TestSettings:
    """Distributed(...) and Learner(distributed=...) refuse what they cannot use, saying why."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            (
                {"timeout": 0},
                "Distributed(timeout=...) must be a positive number of seconds, got 0",
            ),
            (
                {"timeout": math.inf},
                "Distributed(timeout=...) must be a positive number of seconds, got inf",
            ),
            (
                {"timeout": True},
                "Distributed(timeout=...) must be a positive number of seconds, got True",
            ),
            ({"init": "yes"}, "Distributed(init=...) must be True or False, got 'yes'"),
            (
                {"backend": "tcp"},
                "Distributed(backend=...) must be None, 'gloo', 'nccl', 'mpi' or 'ucc', got 'tcp'",
            ),
        ],
    )
    def test_bad_settings_are_named(self, kwargs: dict[str, object], message: str) -> None:
        """Each bad setting: a ConfigurationError naming it, the value and what is valid."""
        with pytest.raises(ConfigurationError) as caught:
            Distributed(**kwargs)  # type: ignore[arg-type]
        assert str(caught.value) == message

    def test_learner_distributed_takes_none_bools_or_settings(self) -> None:
        """None: defaults; True: start the group; False: off; anything else refused."""
        assert as_distributed(None) == Distributed()
        assert as_distributed(True) == Distributed(init=True)
        assert as_distributed(False) is None
        settings = Distributed(timeout=5.0)
        assert as_distributed(settings) is settings
        with pytest.raises(ConfigurationError) as caught:
            Learner(mlp(), digits_dls(), distributed="ddp")  # type: ignore[arg-type]
        assert str(caught.value) == (
            "distributed must be None (across ranks under a started process group), True "
            "(start one from torchrun's environment), False (never) or a Distributed(...), "
            "got 'ddp'"
        )


class TestOneProcess:
    """Without a process group a fit runs on LOCAL, as before: rank 0 of 1, no agreement."""

    def test_without_a_group_the_world_is_local(self) -> None:
        """start_world finds no group: LOCAL, whose sum and barrier do nothing."""
        assert start_world(Distributed()) is LOCAL
        assert start_world(None) is LOCAL
        assert (LOCAL.rank, LOCAL.size, LOCAL.is_main, LOCAL.distributed) == (0, 1, True, False)
        assert LOCAL.sum([1.5, 2]) == [1.5, 2.0]
        LOCAL.barrier()

    def test_init_outside_torchrun_trains_on_one_process(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """distributed=True outside torchrun: a fit on one process, its log unsuffixed."""
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, distributed=True)
        result = learn.fit(1)
        assert learn.world is LOCAL
        assert result.audit_path is not None
        assert result.audit_path.name == f"{result.run_id}.jsonl"
        assert not torch.distributed.is_initialized()

    def test_init_with_half_an_environment_says_what_is_missing(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """RANK set but no rendezvous address: a ConfigurationError naming what is missing."""
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name, raising=False)
        learn = Learner(mlp(), digits_dls(), F.cross_entropy, distributed=True, audit_log=None)
        with pytest.raises(ConfigurationError) as caught:
            learn.fit(1)
        assert str(caught.value) == (
            "Distributed(init=True) needs torchrun's environment; MASTER_ADDR, MASTER_PORT "
            "not set (run under torchrun, or start the process group yourself)"
        )

    def test_a_fit_on_one_process_warns_nothing(self) -> None:
        """A fit on one process with default settings warns nothing about distribution."""
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Learner(mlp(), digits_dls(), F.cross_entropy, audit_log=None).fit(1)


def _loader(**kwargs: object) -> DataLoader[tuple[torch.Tensor, ...]]:
    data = TensorDataset(torch.arange(20.0).unsqueeze(1), torch.arange(20))
    return DataLoader(data, **kwargs)  # type: ignore[arg-type]


class TestLoaders:
    """Each rank's share of a DataLoader: a DistributedSampler twin, or a warning why not."""

    def test_a_stock_loader_gets_each_rank_its_share(self) -> None:
        """Batch 4 over 20 samples on rank 1 of 2: samples 1, 3, 5... in batches of 4."""
        twin, warning = distributed_loader(_loader(batch_size=4), World(rank=1, size=2))
        assert warning is None
        assert isinstance(twin.sampler, DistributedSampler)
        assert [b[1].tolist() for b in twin] == [[1, 3, 5, 7], [9, 11, 13, 15], [17, 19]]

    def test_shuffling_is_kept_and_set_epoch_reshuffles(self) -> None:
        """A shuffling loader's twin shuffles; set_epoch changes the order; ranks never overlap."""
        shares = [
            distributed_loader(_loader(batch_size=5, shuffle=True), World(rank=r, size=2))[0]
            for r in (0, 1)
        ]
        first = [sorted(int(i) for b in share for i in b[1]) for share in shares]
        assert sorted(first[0] + first[1]) == list(range(20))
        before = [int(i) for b in shares[0] for i in b[1]]
        set_sampler_epoch(shares[0], 1)
        after = [int(i) for b in shares[0] for i in b[1]]
        assert before != after
        assert len(before) == len(after) == 10  # half of the samples, drawn anew each epoch

    def test_what_cannot_be_shared_is_kept_with_a_warning(self) -> None:
        """A list of batches, or a custom batch sampler: kept as they are, with the reason."""
        batches = [(torch.zeros(2, 1), torch.zeros(2))]
        kept, warning = distributed_loader(batches, World(rank=0, size=2))
        assert kept is batches
        assert warning == (
            "a list is not a torch DataLoader: every rank goes over all of it (give each rank "
            "its share yourself)"
        )

        class Pairs(BatchSampler):
            pass

        custom = _loader(batch_sampler=Pairs(SequentialSampler(range(20)), 2, drop_last=False))
        kept, warning = distributed_loader(custom, World(rank=0, size=2))
        assert kept is custom
        assert warning is not None
        assert warning.startswith("a DataLoader with its own batch sampler")

    def test_a_loader_already_shared_is_kept(self) -> None:
        """One with a DistributedSampler already: kept, no warning."""
        data = TensorDataset(torch.arange(8.0))
        loader = DataLoader(
            data, sampler=DistributedSampler(data, num_replicas=2, rank=0), batch_size=2
        )
        assert distributed_loader(loader, World(rank=0, size=2)) == (loader, None)


class TestFirstDifference:
    """The divergence message names the first transition where the ranks' trails part."""

    def test_names_each_ranks_step(self) -> None:
        """A begin_batch against an agreement point; nothing more against a step."""
        same = ("end_batch", 0, 4, True)
        trails = [
            [same, ("begin_batch", 0, 5, True)],
            [same, ("@end_epoch", 0, 4, True)],
        ]
        assert first_difference(trails) == (
            "transition 2 since the ranks last agreed differs (rank 0: begin_batch at epoch 0, "
            "batch 5, training; rank 1: at the end_epoch agreement of epoch 0, batch 4, training)"
        )
        assert first_difference([[same, same], [same]]) == (
            "transition 2 since the ranks last agreed differs (rank 0: end_batch at epoch 0, "
            "batch 4, training; rank 1: nothing more)"
        )
