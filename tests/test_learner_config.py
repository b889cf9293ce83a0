"""Bad arguments to Learner and fit get clear errors before anything runs."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import (
    Callback,
    ConfigurationError,
    DataLoaders,
    InvalidCallbackError,
    InvalidDataLoadersError,
    Learner,
)
from fsm_learner.testing import RecordingCallback


class TestLearnerArguments:
    def test_model_must_be_a_module(self):
        """A function is not a model."""
        with pytest.raises(
            ConfigurationError, match=r"model must be a torch\.nn\.Module, got function"
        ):
            Learner(lambda x: x, batches_dls(1, 1))  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("dls", "shown"),
        [
            ([1, 2], "list whose .train is missing"),
            (DataLoaders(3, []), "DataLoaders whose .train is int"),
        ],  # type: ignore[arg-type]
    )
    def test_dls_needs_train_and_valid(self, dls, shown):
        """dls must have iterable .train and .valid; the message shows what came instead."""
        with pytest.raises(InvalidDataLoadersError, match=shown):
            Learner(mlp(), dls)

    @pytest.mark.parametrize("lr", [-0.1, "0.1", True, float("nan"), float("inf")])
    def test_lr(self, lr):
        """lr is a finite number >= 0."""
        with pytest.raises(
            ConfigurationError, match=f"lr must be a finite number >= 0, got {lr!r}"
        ):
            Learner(mlp(), batches_dls(1, 1), F.cross_entropy, lr)

    def test_loss_func_must_be_callable(self):
        """A string is not a loss function."""
        with pytest.raises(ConfigurationError, match="loss_func must be callable, got 'mse'"):
            Learner(mlp(), batches_dls(1, 1), "mse")  # type: ignore[arg-type]

    def test_defaults_follow_the_seed(self):
        """Defaults: mse loss, lr 0.1, no callbacks, SGD."""
        learn = Learner(mlp(), batches_dls(1, 1))
        assert (learn.loss_func, learn.lr, learn.cbs, learn.opt_func) == (
            F.mse_loss,
            0.1,
            [],
            torch.optim.SGD,
        )


class TestFitArguments:
    @pytest.mark.parametrize("n", [-1, 1.0, "2", None, False])
    def test_n_epochs(self, n):
        """n_epochs is an int >= 0; the learner stays idle and runs nothing."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match=f"n_epochs must be an int >= 0, got {n!r}"):
            learn.fit(n)  # type: ignore[arg-type]
        assert learn.state == "idle"
        assert learn.seq == 0


class TestSettingsAreCheckedWheneverSet:
    def test_an_int_beyond_any_float(self):
        """lr=10**400 used to escape as a raw OverflowError."""
        with pytest.raises(
            ConfigurationError, match=r"lr must be a finite number >= 0, got 1000000000"
        ):
            Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 10**400)

    @pytest.mark.parametrize("lr", [float("nan"), -1, "0.1", None])
    def test_lr_set_after_construction(self, lr):
        """learn.lr = nan used to train to NaN weights; now it is refused where it is set."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match="lr must be a finite number >= 0, got"):
            learn.lr = lr
        assert learn.lr == 0.1

    def test_lr_set_after_construction_is_what_the_optimizer_gets(self):
        """A valid lr set later is the one the next fit's optimizer is built with."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=None)
        learn.lr = 3
        learn.fit(1)
        assert learn.opt is not None
        assert learn.opt.param_groups[0]["lr"] == 3.0

    def test_one_callback_alone(self):
        """cbs=Callback() (not in a list) used to raise a raw TypeError; fastai takes it."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, cbs=rec, audit_log=None)
        assert learn.cbs == [rec]
        learn.fit(1)
        assert rec.hooks[0] == "before_fit"

    @pytest.mark.parametrize(
        ("cbs", "shown"), [("cb", "str"), (5, "int"), ({"a": Callback()}, "dict")]
    )
    def test_what_is_not_callbacks(self, cbs, shown):
        """Strings, numbers and mappings are refused with what was received."""
        with pytest.raises(
            InvalidCallbackError,
            match=rf"cbs must be a list \(or other iterable\) of fsm_learner.Callback .* {shown}$",
        ):
            Learner(mlp(), batches_dls(1, 1), cbs=cbs)

    def test_cbs_set_after_construction(self):
        """None means no callbacks; a generator is read once into a list; junk is refused."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=None)
        learn.cbs = None
        assert learn.cbs == []
        rec = RecordingCallback()
        learn.cbs = (cb for cb in [rec])
        assert learn.cbs == [rec]
        learn.fit(1)
        assert rec.hooks[0] == "before_fit"
        with pytest.raises(InvalidCallbackError, match=r"cbs\[0\] must be an instance"):
            learn.cbs = [object()]
        assert learn.cbs == [rec]

    @pytest.mark.parametrize(("key", "shown"), [(123, "int"), ([1, 2], "list"), (1.5, "float")])
    def test_audit_key_must_be_text_or_bytes(self, key, shown):
        """audit_key=123 used to become 123 zero bytes (a guessable key)."""
        with pytest.raises(
            ConfigurationError, match=rf"audit_key must be a str or bytes .* got {shown}$"
        ):
            Learner(mlp(), batches_dls(1, 1), audit_key=key)


class TestAuditLogTargets:
    def test_empty_path(self):
        """audit_log='' used to write into the current directory."""
        with pytest.raises(ConfigurationError, match="audit_log is the empty path"):
            Learner(mlp(), batches_dls(1, 1), audit_log="")

    def test_a_nul_byte(self):
        """A NUL byte in the path used to escape as a raw ValueError."""
        with pytest.raises(ConfigurationError, match="holds a NUL byte; no file can have"):
            Learner(mlp(), batches_dls(1, 1), audit_log="x\x00.jsonl")

    @pytest.mark.parametrize("name", ["RUNS.JSONL", "runs.Jsonl"])
    def test_jsonl_in_any_case_is_a_file(self, name, tmp_path):
        """A .JSONL path collects runs in one file, as .jsonl does (not a directory)."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=tmp_path / name)
        learn.fit(1)
        learn.fit(1)
        assert (tmp_path / name).is_file()
        assert learn.audit_path == tmp_path / name

    def test_an_existing_directory_named_jsonl_is_a_directory(self, tmp_path):
        """A directory that happens to end in .jsonl gets <run_id>.jsonl files."""
        target = tmp_path / "logs.jsonl"
        target.mkdir()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=target)
        learn.fit(1)
        assert learn.audit_path == target / f"{learn.run_id}.jsonl"

    @pytest.mark.parametrize("kind", ["fifo", "device"])
    def test_not_a_regular_file_is_refused_at_once(self, kind, tmp_path):
        """A FIFO used to block the fit forever in open(); now it is refused."""
        target = tmp_path / "x.jsonl"
        if kind == "fifo":
            os.mkfifo(target)
        else:
            target.symlink_to("/dev/null")
        with _deadline(10):
            with pytest.raises(ConfigurationError, match="is neither a directory nor a regular"):
                Learner(mlp(), batches_dls(1, 1), audit_log=target)
            # made a FIFO after the learner was built: the fit refuses it, idle and reusable
            learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=tmp_path / "y")
            (tmp_path / "y").mkdir()
            learn.audit_log = tmp_path / "y" / "z.jsonl"
            os.mkfifo(tmp_path / "y" / "z.jsonl")
            with pytest.raises(ConfigurationError, match=r"z\.jsonl is a FIFO \(named pipe\)"):
                learn.fit(1)
        assert learn.state == "idle"
        learn.audit_log = None
        assert learn.fit(1).status == "completed"


@contextlib.contextmanager
def _deadline(seconds: int):
    """Raise TimeoutError in the main thread if the block blocks (a FIFO's open, say)."""

    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
