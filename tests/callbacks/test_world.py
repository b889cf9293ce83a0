"""The stock callbacks on one rank of a fit across ranks, the other ranks simulated in-process.

``SimulatedWorld`` is the ``learn.world`` of a fit on rank ``rank`` of ``size`` that makes
no torch.distributed call: the other ranks agree with whatever this one proposes and
take the same path; its ``sum`` adds what they contribute (by default the same values
as this rank's: ranks that saw the same samples), its ``barrier`` counts. The fixture
``on_rank`` makes ``Learner.fit`` run in one (it patches ``fsm_learner.learner.start_world``);
the learner then agrees, names its log and takes its cancels as on a real rank, without
DDP or samplers (``SHARED``). Reductions across real processes are tested under torchrun
by tests/test_distributed.py.
"""

from __future__ import annotations

import io
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp, same_weights
from rich.console import Console
from torchmetrics.classification import MulticlassAccuracy

from callbacks.checkpoint import CheckpointCB
from callbacks.metrics import MetricsCB
from callbacks.progress import ProgressCB
from callbacks.save_model import SaveModelCB
from fsm_learner import Callback, CancelFitException, Distributed, Learner, RunStatus
from fsm_learner.checkpoint import find_latest
from fsm_learner.distributed import Agreement, Proposal, World

SHARED = Distributed(wrap_model=False, distribute_samplers=False)
"""Across ranks, but every rank trains the one model on all the batches (nothing to wrap)."""
SECONDS = re.compile(r"\d+\.\ds")


@attrs.define(eq=False)
class SimulatedWorld(World):
    """Rank ``rank`` of ``size``; the other ranks simulated, doing as this one does.

    ``other``: what the other ranks add up to at every ``sum`` (None: each the same
    values as this rank). ``sums`` keeps this rank's values of each call; ``barriers``
    counts the barriers.
    """

    other: Sequence[float] | None = None
    sums: list[list[float]] = attrs.field(factory=list)
    barriers: int = 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Return this rank's values plus the other ranks' (see the class doc)."""
        own = [float(v) for v in values]
        self.sums.append(own)
        if self.other is None:
            return [v * self.size for v in own]
        return [v + o for v, o in zip(own, self.other, strict=True)]

    def barrier(self) -> None:
        """Count it: the other ranks are there already."""
        self.barriers += 1

    def collective_check(self) -> None:
        """No rank failed."""

    def agree(
        self,
        proposal: Proposal,
        mark: int,
        *,
        boundary: bool = False,
        escaped: bool = False,
        collective: bool = False,
    ) -> Agreement:
        """Take this rank's own proposal; the others came the same way."""
        rank = self.rank if proposal else -1
        return Agreement(proposal, rank, False, boundary, escaped, collective)

    def broadcast_text(self, text: str, src: int) -> str:
        """Return ``text``: every rank says the same."""
        return text

    def gather(self, obj: object) -> list[object]:
        """Return ``obj`` for every rank."""
        return [obj] * self.size


OnRank = Callable[..., SimulatedWorld]


@pytest.fixture
def on_rank(monkeypatch: pytest.MonkeyPatch) -> OnRank:
    """Make the next fits run on rank ``rank`` of ``size`` (``other`` as SimulatedWorld's)."""

    def patch(rank: int, size: int = 2, other: Sequence[float] | None = None) -> SimulatedWorld:
        world = SimulatedWorld(rank, size, other=other)
        monkeypatch.setattr("fsm_learner.learner.start_world", lambda _config: world)
        return world

    return patch


def learner(*cbs: Callback, lr: float = 0.1, n_train: int = 3, n_valid: int = 2) -> Learner:
    """The seeded MLP on real digits, across ranks when ``on_rank`` patched the world."""
    dls = batches_dls(n_train, n_valid)
    return Learner(mlp(), dls, F.cross_entropy, lr, list(cbs), distributed=SHARED)


def notes(path: Path | None, name: str) -> list[dict[str, object]]:
    assert path is not None
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r for r in records if r["ev"] == "note" and r["name"] == name]


class TestSimulatedWorld:
    def test_a_fit_on_rank_1_trains_as_one_process(self, on_rank):
        """The learner runs across ranks (rank 1's log), and the weights are one process's."""
        alone = learner()
        alone.fit(2)
        world = on_rank(1)
        across = learner()
        result = across.fit(2)
        assert across.world is world
        assert across.rank == 1
        assert result.status is RunStatus.COMPLETED
        assert result.audit_path is not None
        assert result.audit_path.name.endswith(".rank1.jsonl")
        assert same_weights(alone, across)


def plain(text: str) -> list[str]:
    return [SECONDS.sub("Ts", line) for line in text.splitlines()]


class TestProgressCB:
    def test_rank_1_prints_nothing(self, on_rank):
        """Off a terminal, rank 1 prints no line and no table."""
        on_rank(1)
        out = io.StringIO()
        learner(MetricsCB(), ProgressCB(file=out)).fit(2)
        assert out.getvalue() == ""

    def test_rank_1_draws_no_bars_and_reads_no_live_loss(self, on_rank):
        """On a terminal, rank 1 starts no bars: nothing drawn, the loss never read per batch."""
        on_rank(1)
        console = Console(file=io.StringIO(), force_terminal=True, width=100)
        progress = ProgressCB(console=console, refresh_s=0.0)
        learner(MetricsCB(), progress).fit(2)
        assert console.file.getvalue() == ""
        assert progress.live_loss_reads == 0

    def test_rank_0_prints_what_one_process_prints(self, on_rank):
        """Rank 0 prints every line and the table, as a fit on one process does."""
        alone = io.StringIO()
        learner(MetricsCB(), ProgressCB(file=alone)).fit(2)
        on_rank(0)
        across = io.StringIO()
        learner(MetricsCB(), ProgressCB(file=across)).fit(2)
        assert len(plain(across.getvalue())) == 4 + 3  # a line per pass, a table of 2 rows
        assert plain(across.getvalue()) == plain(alone.getvalue())

    def test_a_validate_run_after_a_fit_on_rank_1_prints_nothing(self, on_rank):
        """learn.world stays the last fit's: a validate run on rank 1 is silent, as the fit was."""
        on_rank(1)
        out = io.StringIO()
        learn = learner(MetricsCB(), ProgressCB(file=out))
        learn.fit(1)
        assert out.getvalue() == ""
        learn.validate()
        assert (learn.world.rank, out.getvalue()) == (1, "")


def save_learner(cb: SaveModelCB) -> Learner:
    """MetricsCB and ``cb`` on 4 + 4 batches at a rate whose validation loss goes up and down."""
    return learner(MetricsCB(), cb, lr=1.0, n_train=4, n_valid=4)


class TestSaveModelCB:
    @pytest.mark.parametrize(
        ("settings", "path"),
        [({"monitor": "valid_loss"}, "model.pt"), ({}, "model.pt"), ({"every_epoch": True}, "")],
        ids=["best", "latest", "every_epoch"],
    )
    def test_rank_1_writes_nothing_and_keeps_rank_0_s_account(self, on_rank, settings, path):
        """Rank 1 writes no file and notes no checkpoint; it lists the files rank 0 wrote,
        and has rank 0's count and best."""
        saves: dict[int, SaveModelCB] = {}
        for rank in (1, 0):
            on_rank(rank)
            saves[rank] = SaveModelCB(Path(f"r{rank}", path), **settings)
            result = save_learner(saves[rank]).fit(5)
            assert bool(notes(result.audit_path, "checkpoint")) is (rank == 0)
        assert not Path("r1").exists()
        assert all(p.is_file() for p in saves[0].saved)
        account = [
            ([p.relative_to(f"r{rank}") for p in cb.saved], cb.epochs, cb.best, cb.best_epoch)
            for rank, cb in sorted(saves.items())
        ]
        assert account[0] == account[1]
        assert len(account[0][0]) == (5 if settings.get("every_epoch") else 1)

    def test_load_best_on_rank_1_reads_the_file_rank_0_wrote(self, on_rank):
        """Each rank calls the barrier once, when the fit ends; rank 1 then loads rank 0's best
        (its weights rank 0's), and notes it."""
        rank0 = on_rank(0)
        main = save_learner(SaveModelCB("best.pt", monitor="valid_loss", load_best=True))
        main.fit(5)
        written = Path("best.pt").read_bytes()
        rank1 = on_rank(1)
        quiet_cb = SaveModelCB("best.pt", monitor="valid_loss", load_best=True)
        quiet = save_learner(quiet_cb)
        result = quiet.fit(5)
        assert (rank0.barriers, rank1.barriers) == (1, 1)
        assert Path("best.pt").read_bytes() == written
        assert quiet_cb.best_epoch is not None
        assert 0 <= quiet_cb.best_epoch < 4  # not the last epoch: loading changes the weights
        best = torch.load("best.pt", weights_only=True)["model"]
        assert all(torch.equal(w, best[k]) for k, w in quiet.model.state_dict().items())
        assert same_weights(main, quiet)
        loaded = notes(result.audit_path, "load_best")
        assert [(n["path"], n["epoch"]) for n in loaded] == [("best.pt", quiet_cb.best_epoch)]

    def test_every_rank_meets_at_the_barrier_even_without_a_best(self, on_rank):
        """A fit cancelled before any epoch has no best: the barrier is called all the same
        (the ranks meet whatever each has seen), and nothing is loaded."""

        class CancelAtOnce(Callback):
            def before_fit(self, learn):
                raise CancelFitException

        world = on_rank(1)
        cb = SaveModelCB("best.pt", monitor="valid_loss", load_best=True)
        result = learner(MetricsCB(), CancelAtOnce(), cb).fit(2)
        assert result.status is RunStatus.CANCELLED
        assert world.barriers == 1
        assert notes(result.audit_path, "load_best") == []


class TestMetricsCB:
    def test_one_sum_per_pass_of_this_rank_s_loss_sum_samples_and_updates(self, on_rank):
        """world.sum is called once per pass, with the pass's loss sum, its samples and its
        metric updates: never per batch."""
        world = on_rank(1)
        metrics = MetricsCB(MulticlassAccuracy(num_classes=10, average="micro"))
        learner(metrics).fit(2)
        assert [(count, updates) for _, count, updates in world.sums] == [
            (24.0, 3.0),
            (16.0, 2.0),
            (24.0, 3.0),
            (16.0, 2.0),
        ]
        assert all(loss_sum > 0 for loss_sum, _, _ in world.sums)

    def test_the_loss_is_the_mean_over_every_rank_s_samples(self, on_rank):
        """A second rank whose 16 samples had a loss sum of 40 (mean 2.5) moves every pass's
        loss to the mean over both ranks' samples, in the values and in the log."""
        world = on_rank(1, other=[40.0, 16.0, 2.0])
        metrics = MetricsCB()
        result = learner(metrics).fit(1)
        (train_sum, train_n, _), (valid_sum, valid_n, _) = world.sums
        assert metrics.values["train_loss"] == pytest.approx((train_sum + 40) / (train_n + 16))
        assert metrics.values["valid_loss"] == pytest.approx((valid_sum + 40) / (valid_n + 16))
        assert metrics.values["valid_loss"] != pytest.approx(valid_sum / valid_n)
        logged = notes(result.audit_path, "metrics")
        assert [n.get("valid_loss", n.get("train_loss")) for n in logged] == [
            metrics.values["train_loss"],
            metrics.values["valid_loss"],
        ]
        assert [n["batches"] for n in logged] == [3, 2]  # this rank's own

    def test_ranks_with_the_same_samples_report_one_process_s_values(self, on_rank):
        """Two ranks that saw the same samples give exactly the values of one process."""
        alone = MetricsCB(MulticlassAccuracy(num_classes=10, average="micro"))
        learner(alone).fit(2)
        on_rank(1)
        across = MetricsCB(MulticlassAccuracy(num_classes=10, average="micro"))
        learner(across).fit(2)
        assert across.history == alone.history

    @pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
    def test_another_rank_s_updates_make_this_one_compute(self, on_rank):
        """A rank whose batches had no metric update still computes when another rank's had
        (torchmetrics gathers in compute: every rank must call it); none computes when no
        rank updated. (torchmetrics warns, on rank 0, of a compute before any update.)"""
        computed: list[int] = []

        class Counted(MulticlassAccuracy):
            def compute(self) -> torch.Tensor:
                computed.append(self.update_count)
                return torch.tensor(0.5)

        on_rank(1, other=[0.0, 0.0, 1.0])
        metrics = MetricsCB(accuracy=Counted(num_classes=10))
        learner(metrics, n_train=1, n_valid=0).fit(1)
        assert computed == [1, 0]  # the training pass's own update; validation: another rank's
        assert metrics.values["valid_accuracy"] == 0.5
        assert math.isnan(metrics.values["valid_loss"])  # no rank had a validation sample
        on_rank(1, other=[0.0, 0.0, 0.0])
        computed.clear()
        learner(metrics, n_train=1, n_valid=0).fit(1)
        assert computed == [1]
        assert math.isnan(metrics.values["valid_accuracy"])


def ckpt(epoch: int, run_id: str, rank: int) -> str:
    return f"ckpt_e{epoch:04d}_train_b000000_{run_id}.rank{rank}.pt"


class TestCheckpointCB:
    @pytest.mark.parametrize("rank", [0, 1])
    def test_each_rank_names_its_files(self, on_rank, rank):
        """Across ranks every rank's files end in .rank<r>.pt, rank 0's included."""
        on_rank(rank)
        run = learner(CheckpointCB("ck", keep=None)).fit(2).run_id
        assert sorted(p.name for p in Path("ck").iterdir()) == [
            ckpt(1, run, rank),
            ckpt(2, run, rank),
        ]

    def test_keep_prunes_this_rank_s_files_only(self, on_rank):
        """A rank keeps its own newest files; those of rank 0 and of one process, even listed
        in its state (a resume from them), stay."""
        alone = learner(CheckpointCB("ck", keep=None)).fit(1).run_id
        theirs = Path("ck", ckpt(1, alone, 0))
        shutil.copy(Path("ck", f"ckpt_e0001_train_b000000_{alone}.pt"), theirs)
        on_rank(1)
        cb = CheckpointCB("ck", keep=1)
        cb.load_state_dict({"batches": 0, "written": [str(p) for p in Path("ck").iterdir()]})
        run = learner(cb).fit(3).run_id
        assert sorted(p.name for p in Path("ck").iterdir()) == sorted(
            [f"ckpt_e0001_train_b000000_{alone}.pt", theirs.name, ckpt(3, run, 1)]
        )
        assert cb.written == [Path("ck", ckpt(3, run, 1))]

    def test_find_latest_finds_each_rank_s_newest(self, on_rank):
        """After fits on both ranks into one directory, each rank's newest file is its own."""
        runs = {}
        for rank in (0, 1):
            on_rank(rank)
            runs[rank] = learner(CheckpointCB("ck")).fit(2).run_id
        for rank in (0, 1):
            found, skipped = find_latest(Path("ck"), rank=rank, world_size=2)
            assert found is not None
            assert (found.path.name, skipped) == (ckpt(2, runs[rank], rank), [])
        assert find_latest(Path("ck")) == (None, [])

    def test_a_rank_resumes_from_its_own_newest_file(self, on_rank):
        """fit(n, resume_from=dir) on rank 1 resumes from rank 1's newest file, not from
        rank 0's, newer, in the same directory."""

        class StopAfterFirstEpoch(Callback):
            def before_epoch(self, learn):
                if learn.epoch == 1:  # after the first epoch's checkpoint
                    raise CancelFitException

        on_rank(1)
        run = learner(CheckpointCB("ck"), StopAfterFirstEpoch()).fit(2).run_id
        on_rank(0)
        learner(CheckpointCB("ck"), StopAfterFirstEpoch()).fit(2)
        on_rank(1)
        learn = learner(CheckpointCB("ck"))
        assert learn.fit(2, resume_from="ck").status is RunStatus.COMPLETED
        assert learn.resumed_from is not None
        assert learn.resumed_from["path"] == str(Path("ck", ckpt(1, run, 1)))
