"""CheckpointCB: its settings, which files it writes and keeps, its state, where it is inert."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp

from callbacks.checkpoint import CheckpointCB
from fsm_learner import (
    Callback,
    CheckpointError,
    ConfigurationError,
    InvalidTransitionError,
    Learner,
    RunStatus,
    State,
)
from fsm_learner.checkpoint import (
    Position,
    checkpoint_files,
    file_name,
    find_latest,
    of_rank,
    read_checkpoint,
)

N_TRAIN, N_VALID = 3, 2
"""Batches per pass: 5 batches an epoch."""


def learner(cb: CheckpointCB, *cbs: Callback) -> Learner:
    """The seeded MLP on 3 training and 2 validation batches of digits."""
    return Learner(mlp(), batches_dls(N_TRAIN, N_VALID), F.cross_entropy, 0.1, [cb, *cbs])


def names(directory: str = "ck") -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir()) if Path(directory).exists() else []


def ckpt(epoch: int, pass_: str, batch: int, run_id: str) -> str:
    return f"ckpt_e{epoch:04d}_{pass_}_b{batch:06d}_{run_id}.pt"


class TestSettings:
    """Bad settings are refused at construction, naming the setting and what is valid."""

    def test_defaults(self):
        """Every epoch, never by batches, the newest 3 kept, into ./checkpoints."""
        cb = CheckpointCB()
        assert (cb.dir, cb.every_n_batches, cb.every_n_epochs, cb.keep) == (
            Path("checkpoints"),
            None,
            1,
            3,
        )
        assert repr(cb) == (
            "CheckpointCB(dir='checkpoints', every_n_batches=None, every_n_epochs=1, keep=3)"
        )
        assert cb.order == 90

    def test_a_path_is_a_dir(self, tmp_path):
        """A pathlib.Path is taken as it is."""
        assert CheckpointCB(tmp_path / "ck").dir == tmp_path / "ck"

    @pytest.mark.parametrize(
        ("value", "shown"),
        [(3, "int 3"), ("", "str ''"), (None, "NoneType None"), (b"ck", "bytes b'ck'")],
    )
    def test_bad_dir(self, value, shown):
        """dir is a non-empty str or os.PathLike."""
        with pytest.raises(ConfigurationError) as caught:
            CheckpointCB(value)
        assert str(caught.value) == (
            f"dir must be a non-empty str or os.PathLike (where checkpoints go), got {shown}"
        )

    @pytest.mark.parametrize(
        ("setting", "meaning"),
        [
            ("every_n_batches", "batches"),
            ("every_n_epochs", "epochs"),
            ("keep", "newest files kept"),
        ],
    )
    @pytest.mark.parametrize(
        ("value", "shown"), [(0, "0"), (-2, "-2"), (True, "True"), (1.5, "1.5")]
    )
    def test_bad_counts(self, setting, meaning, value, shown):
        """Each count is an int >= 1 (a bool is no count); None is never."""
        with pytest.raises(ConfigurationError) as caught:
            CheckpointCB("ck", **{setting: value})
        assert str(caught.value) == f"{setting} must be an int >= 1 ({meaning}), got {shown}"

    def test_none_everywhere(self):
        """None: never by batches, never by epochs, keep all."""
        cb = CheckpointCB("ck", None, None, None)
        assert (cb.every_n_batches, cb.every_n_epochs, cb.keep) == (None, None, None)


class TestFiles:
    """Which files a fit writes, named after their position and the run."""

    def test_every_epoch(self):
        """every_n_epochs=1: one file after each epoch, named by the pass that comes next."""
        learn = learner(CheckpointCB("ck", keep=None))
        run = learn.fit(2).run_id
        assert names() == [ckpt(1, "train", 0, run), ckpt(2, "train", 0, run)]
        assert read_checkpoint(Path("ck", ckpt(1, "train", 0, run))).position == Position(
            State.FIT, 1, True, 0
        )

    def test_every_other_epoch(self):
        """every_n_epochs=2 over 3 epochs: once, after the second."""
        run = learner(CheckpointCB("ck", every_n_epochs=2, keep=None)).fit(3).run_id
        assert names() == [ckpt(2, "train", 0, run)]

    def test_every_two_batches(self):
        """every_n_batches=2 counts training and validation batches over the fit."""
        cb = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=None)
        run = learner(cb).fit(2).run_id
        assert names() == [
            ckpt(0, "train", 2, run),  # batch 2
            ckpt(0, "valid", 1, run),  # batch 4
            ckpt(1, "train", 1, run),  # batch 6
            ckpt(1, "train", 3, run),  # batch 8: the training pass's last
            ckpt(1, "valid", 2, run),  # batch 10: the fit's last
        ]
        assert cb.batches == 10

    def test_batches_and_epochs(self):
        """Both: a batch's checkpoint and the epoch's, even at the same moment, are two files."""
        cb = CheckpointCB("ck", every_n_batches=5, every_n_epochs=1, keep=None)
        run = learner(cb).fit(2).run_id
        assert names() == [
            ckpt(0, "valid", 2, run),  # batch 5, the epoch's last
            ckpt(1, "train", 0, run),  # after epoch 0
            ckpt(1, "valid", 2, run),  # batch 10
            ckpt(2, "train", 0, run),  # after epoch 1
        ]

    def test_neither(self):
        """Neither count: nothing is written (only a preemption would write)."""
        cb = CheckpointCB("ck", every_n_batches=None, every_n_epochs=None)
        assert learner(cb).fit(2).status is RunStatus.COMPLETED
        assert names() == []
        assert cb.written == []

    def test_written_lists_the_files(self):
        """``written`` holds the files of the fit, oldest first."""
        cb = CheckpointCB("ck", keep=None)
        run = learner(cb).fit(2).run_id
        assert cb.written == [
            Path("ck", ckpt(1, "train", 0, run)),
            Path("ck", ckpt(2, "train", 0, run)),
        ]

    def test_each_file_resumes(self):
        """The files are whole checkpoints: the last resumes the fit to its end at once."""
        cb = CheckpointCB("ck", keep=None)
        first = learner(cb)
        run = first.fit(1).run_id
        resumed = learner(CheckpointCB("again"))
        assert resumed.fit(1, resume_from=Path("ck", ckpt(1, "train", 0, run))).status is (
            RunStatus.COMPLETED
        )
        for key, value in resumed.model.state_dict().items():
            assert torch.equal(value, first.model.state_dict()[key]), key


class TestKeep:
    """Only the newest ``keep`` files remain."""

    def test_keep_two(self):
        """Of five files, the newest two are left, and ``written`` lists just those."""
        cb = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=2)
        run = learner(cb).fit(2).run_id
        assert names() == [ckpt(1, "train", 3, run), ckpt(1, "valid", 2, run)]
        assert cb.written == [Path("ck", n) for n in names()]

    def test_keep_one(self):
        """keep=1: the last file only."""
        cb = CheckpointCB("ck", every_n_batches=1, every_n_epochs=1, keep=1)
        run = learner(cb).fit(2).run_id
        assert names() == [ckpt(2, "train", 0, run)]

    def test_files_of_others_are_left_alone(self):
        """Pruning removes only files the callback wrote; other files of the directory stay."""
        Path("ck").mkdir()
        Path("ck/mine.pt").write_bytes(b"not the callback's")
        cb = CheckpointCB("ck", every_n_batches=1, every_n_epochs=None, keep=1)
        run = learner(cb).fit(1).run_id
        assert names() == [ckpt(0, "valid", 2, run), "mine.pt"]

    def test_a_file_already_gone(self):
        """A file removed by hand before its turn to be pruned is no error."""

        class RemoveFirst(Callback):
            order = 95

            def after_epoch(self, learn: Learner) -> None:
                if learn.epoch == 0 and not learn.training:  # the oldest, pruned later
                    cb.written[0].unlink()

        cb = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=2)
        run = learner(cb, RemoveFirst()).fit(2).run_id
        assert names() == [ckpt(1, "train", 3, run), ckpt(1, "valid", 2, run)]

    def test_keep_across_a_resume(self):
        """A preempted fit and its resume keep the newest 3 across both runs' files."""

        class Sigterm(Callback):
            def after_batch(self, learn: Learner) -> None:
                if learn.epoch == 1 and learn.training and learn.iter == 0:
                    os.kill(os.getpid(), signal.SIGTERM)

        previous = signal.getsignal(signal.SIGTERM)
        cb = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=3)
        first = learner(cb, Sigterm())
        assert first.fit(2).status is RunStatus.PREEMPTED
        assert signal.getsignal(signal.SIGTERM) is previous
        one = first.run_id
        # batches 2 and 4, then batch 6 (epoch 1's first) preempts
        assert names() == [
            ckpt(0, "train", 2, one),
            ckpt(0, "valid", 1, one),
            ckpt(1, "train", 1, one),
        ]
        again = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=3)
        second = learner(again)
        assert second.fit(2, resume_from="ck").status is RunStatus.COMPLETED
        two = second.run_id
        # the resumed fit counts on from batch 6: batches 8 and 10, and prunes run one's
        assert names() == sorted(
            [ckpt(1, "train", 1, one), ckpt(1, "train", 3, two), ckpt(1, "valid", 2, two)]
        )
        assert again.batches == 10
        assert again.written == [
            Path("ck", ckpt(1, "train", 1, one)),
            Path("ck", ckpt(1, "train", 3, two)),
            Path("ck", ckpt(1, "valid", 2, two)),
        ]

    def test_a_resume_from_another_directory_prunes_only_its_own(self):
        """Resumed from an archived checkpoint into another directory: the archive stays."""
        learner(CheckpointCB("archive", every_n_batches=2, every_n_epochs=None, keep=None)).fit(2)
        archived = names("archive")
        assert len(archived) == 5
        cb = CheckpointCB("ck", every_n_batches=2, every_n_epochs=None, keep=1)
        learner(cb).fit(2, resume_from=Path("archive", archived[0]))  # after batch 2
        assert names("archive") == archived
        assert len(names()) == 1


class TestRankNames:
    """Across ranks each rank names its files ``.rank<r>.pt`` and finds only its own."""

    AT = Position(State.FIT, 2, True, 0)

    @pytest.mark.parametrize(
        ("rank", "world_size", "name"),
        [
            (0, 1, "ckpt_e0002_train_b000000_abc.pt"),
            (0, 2, "ckpt_e0002_train_b000000_abc.rank0.pt"),
            (3, 4, "ckpt_e0002_train_b000000_abc.rank3.pt"),
        ],
    )
    def test_file_name(self, rank, world_size, name):
        """One process: no rank part (the names as before); across ranks, every rank's."""
        assert file_name(self.AT, "abc", rank=rank, world_size=world_size) == name
        assert of_rank(Path(name), rank=rank, world_size=world_size)

    @pytest.mark.parametrize(
        ("rank", "world_size", "message"),
        [
            (1, 1, "rank must be an int from 0 to 0 (of 1), got 1"),
            (2, 2, "rank must be an int from 0 to 1 (of 2), got 2"),
            (-1, 2, "rank must be an int from 0 to 1 (of 2), got -1"),
            (True, 2, "rank must be an int from 0 to 1 (of 2), got True"),
            (0, 0, "world_size must be an int >= 1 (the processes of the fit), got 0"),
            (0, 2.0, "world_size must be an int >= 1 (the processes of the fit), got 2.0"),
        ],
    )
    def test_a_bad_rank_is_refused(self, rank, world_size, message):
        """A rank outside the world, or a world of no process, names what is valid."""
        with pytest.raises(ConfigurationError) as caught:
            file_name(self.AT, "abc", rank=rank, world_size=world_size)
        assert str(caught.value) == message
        with pytest.raises(ConfigurationError):
            find_latest(Path("ck"), rank=rank, world_size=world_size)

    def test_find_latest_reads_only_this_process_s_files(self):
        """In a directory of one process's files and ranks' (each rank's the oldest of all,
        rank 1's newest unreadable), each process finds its own newest that reads."""
        run = learner(CheckpointCB("ck", keep=None)).fit(2).run_id
        one = Path("ck", ckpt(2, "train", 0, run))
        ranked = [Path("ck", ckpt(1, "train", 0, f"{run}.rank{rank}")) for rank in range(3)]
        for path in ranked:
            shutil.copy(Path("ck", ckpt(1, "train", 0, run)), path)
            os.utime(path, ns=(1, 1))
        garbage = Path("ck", ckpt(9, "train", 0, f"{run}.rank1"))
        garbage.write_bytes(b"garbage")
        os.utime(garbage, ns=(2, 2))

        def newest(**world: int) -> tuple[Path | None, list[str]]:
            found, skipped = find_latest(Path("ck"), **world)
            return (None if found is None else found.path), skipped

        assert newest() == (one, [])
        assert newest(rank=0, world_size=2) == (ranked[0], [])
        found, skipped = newest(rank=1, world_size=2)
        assert found == ranked[1]
        assert [garbage.name in reason for reason in skipped] == [True]
        assert newest(rank=2, world_size=3) == (ranked[2], [])
        assert checkpoint_files(Path("ck"), rank=3, world_size=4) == []


class TestState:
    """state_dict and load_state_dict: the batches counted and the files written."""

    def test_round_trip(self):
        """A fit's state, loaded into a fresh callback, gives the same state back."""
        cb = CheckpointCB("ck", every_n_batches=2, keep=None)
        learner(cb).fit(1)
        state = cb.state_dict()
        assert state == {"batches": 5, "written": [os.fspath(p) for p in cb.written]}
        fresh = CheckpointCB("ck")
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state
        assert (fresh.batches, fresh.written) == (cb.batches, cb.written)

    def test_fresh_state(self):
        """Before any fit: nothing counted, nothing written."""
        assert CheckpointCB("ck").state_dict() == {"batches": 0, "written": []}

    @pytest.mark.parametrize(
        "state",
        [{}, {"batches": 1}, {"batches": True, "written": []}, {"batches": 1, "written": "a.pt"}],
    )
    def test_bad_state(self, state):
        """A state without an int 'batches' and a list 'written' is a CheckpointError."""
        cb = CheckpointCB("ck")
        with pytest.raises(CheckpointError) as caught:
            cb.load_state_dict(state)
        assert str(caught.value) == (
            "CheckpointCB state must hold 'batches' (an int) and 'written' (a list of paths); "
            f"got {sorted(state)}"
        )
        assert cb.state_dict() == {"batches": 0, "written": []}

    def test_a_new_fit_counts_from_zero(self):
        """Each fit counts its own batches (a resumed fit gets its count from the checkpoint)."""
        cb = CheckpointCB("ck", every_n_batches=3, every_n_epochs=None, keep=None)
        learn = learner(cb)
        first = learn.fit(1).run_id
        second = learn.fit(1).run_id
        assert names() == sorted([ckpt(0, "train", 3, first), ckpt(0, "train", 3, second)])


class Requester(Callback):
    """Calls learn.request_checkpoint() in after_batch and keeps what it raised."""

    def __init__(self) -> None:
        self.raised: list[BaseException] = []

    def after_batch(self, learn: Learner) -> None:
        try:
            learn.request_checkpoint()
        except Exception as exc:
            self.raised.append(exc)


class TestRequests:
    """request_checkpoint belongs to a fit with a checkpointing callback."""

    def test_outside_a_fit(self):
        """At idle there is nothing to checkpoint."""
        learn = learner(CheckpointCB("ck"))
        with pytest.raises(InvalidTransitionError) as caught:
            learn.request_checkpoint()
        assert str(caught.value) == (
            "request_checkpoint() outside a fit: checkpoints are taken during a fit"
        )

    def test_without_a_checkpointer(self):
        """In a fit without a CheckpointCB, nothing would write it: a ConfigurationError."""
        requester = Requester()
        Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [requester]).fit(1)
        message = (
            "request_checkpoint(): no callback of this fit writes checkpoints; add "
            "callbacks.CheckpointCB(dir) to learn.cbs"
        )
        assert [str(e) for e in requester.raised] == [message] * 2
        assert all(isinstance(e, ConfigurationError) for e in requester.raised)

    def test_in_validate(self):
        """validate() is no fit: request_checkpoint refuses there."""
        requester = Requester()
        learner(CheckpointCB("ck"), requester).validate()
        assert [type(e) for e in requester.raised] == [InvalidTransitionError] * N_VALID

    def test_a_request_is_written_at_the_boundary(self):
        """Asked in after_batch, the checkpoint is written once the batch has ended."""
        requester = Requester()
        cb = CheckpointCB("ck", every_n_batches=None, every_n_epochs=None, keep=None)
        run = learner(cb, requester).fit(1).run_id
        assert requester.raised == []
        assert names() == [
            *(ckpt(0, "train", b, run) for b in (1, 2, 3)),
            *(ckpt(0, "valid", b, run) for b in (1, 2)),
        ]


class TestInert:
    """In validate() and get_preds() CheckpointCB counts nothing and writes nothing."""

    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_no_files_no_count(self, run):
        """Even asked for every batch, an inference run writes no checkpoint."""
        cb = CheckpointCB("ck", every_n_batches=1, every_n_epochs=1)
        learn = learner(cb)
        getattr(learn, run)()
        assert names() == []
        assert cb.state_dict() == {"batches": 0, "written": []}

    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_after_a_fit(self, run):
        """An inference run after a fit leaves the fit's count and files as they were."""
        cb = CheckpointCB("ck", every_n_batches=2, keep=None)
        learn = learner(cb)
        learn.fit(1)
        before, files = cb.state_dict(), names()
        getattr(learn, run)()
        assert (cb.state_dict(), names()) == (before, files)
