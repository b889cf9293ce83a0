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
from fsm_learner.testing import RecordingCallback, expected_hooks


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
            (DataLoaders(3, []), "DataLoaders whose .train is a int"),
            (DataLoaders([], None), "DataLoaders whose .valid is a NoneType"),
            (DataLoaders("abc", []), "DataLoaders whose .train is a str"),
            (DataLoaders([], {"x": 1}), "DataLoaders whose .valid is a dict"),
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
        """A string is not a loss function; None is valid (the model computes its own loss)."""
        with pytest.raises(
            ConfigurationError, match="loss_func must be callable or None, got 'mse'"
        ):
            Learner(mlp(), batches_dls(1, 1), "mse")  # type: ignore[arg-type]
        assert Learner(mlp(), batches_dls(1, 1), None).loss_func is None

    @pytest.mark.parametrize("name", ["opt_func", "param_groups"])
    def test_optimizer_factories_must_be_callable(self, name):
        """opt_func and param_groups run at the first fit: refused at once if not callable."""
        with pytest.raises(ConfigurationError, match=f"{name} must be callable.*, got 3"):
            Learner(mlp(), batches_dls(1, 1), F.cross_entropy, **{name: 3})

    @pytest.mark.parametrize(("key", "shown"), [("", "''"), (3, "3"), (None, "a NoneType")])
    def test_target_key(self, key, shown):
        """target_key names the target in mapping batches: a non-empty str."""
        with pytest.raises(
            ConfigurationError, match=rf"target_key must be a non-empty str .* got {shown}$"
        ):
            Learner(mlp(), batches_dls(1, 1), target_key=key)

    @pytest.mark.parametrize(("key", "shown"), [("", "''"), (3, "3"), (None, "a NoneType")])
    def test_target_key_is_checked_when_set(self, key, shown):
        """Set after construction, target_key is checked the same way, and kept on refusal."""
        learn = Learner(mlp(), batches_dls(1, 1), target_key="y")
        with pytest.raises(
            ConfigurationError, match=rf"target_key must be a non-empty str .* got {shown}$"
        ):
            learn.target_key = key
        assert learn.target_key == "y"
        learn.target_key = "labels"
        assert learn.target_key == "labels"

    @pytest.mark.parametrize("part", ["train", "valid"])
    @pytest.mark.parametrize(
        ("make", "kind"),
        [
            (lambda batches: (b for b in batches), "generator"),
            (iter, "list_iterator"),
            (lambda batches: map(tuple, batches), "map"),
        ],
    )
    def test_iterators_are_refused_as_data(self, part, make, kind):
        """An iterator runs dry after one pass: refused at construction, naming part and type."""
        good = batches_dls(2, 2)
        parts = {"train": good.train, "valid": good.valid}
        parts[part] = make(parts[part])
        with pytest.raises(
            InvalidDataLoadersError,
            match=rf"dls\.{part} is a {kind}, an iterator that can be read only once",
        ):
            Learner(mlp(), DataLoaders(**parts), F.cross_entropy)

    def test_defaults(self):
        """Defaults: mse loss, lr 0.1, no callbacks, SGD, targets under "labels", no optimizer."""
        learn = Learner(mlp(), batches_dls(1, 1))
        assert (learn.loss_func, learn.lr, learn.cbs, learn.opt_func) == (
            F.mse_loss,
            0.1,
            [],
            torch.optim.SGD,
        )
        assert (learn.target_key, learn.opt, learn.kind, learn.running) == (
            "labels",
            None,
            "fit",
            False,
        )
        assert list(learn.param_groups(learn.model)) == list(learn.model.parameters())


class TestRunArguments:
    @pytest.mark.parametrize("n", [-1, 1.0, "2", None, False])
    def test_n_epochs(self, n):
        """n_epochs is an int >= 0; the learner stays idle and runs nothing."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match=f"n_epochs must be an int >= 0, got {n!r}"):
            learn.fit(n)  # type: ignore[arg-type]
        assert learn.state == "idle"
        assert learn.seq == 0

    @pytest.mark.parametrize("value", [1, "yes", None])
    def test_reset_opt(self, value):
        """reset_opt is True or False; nothing runs and no optimizer is built otherwise."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(ConfigurationError, match="reset_opt must be True or False, got"):
            learn.fit(1, reset_opt=value)  # type: ignore[arg-type]
        assert (learn.opt, learn.seq, learn.run_id) == (None, 0, "")

    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_inference_data_must_be_iterable(self, run):
        """validate(dl) and get_preds(dl) take batches, or None for dls.valid."""
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy)
        with pytest.raises(
            InvalidDataLoadersError, match=rf"{run}\(dl\): dl must be an iterable .* got int"
        ):
            getattr(learn, run)(5)
        assert (learn.state, learn.run_id) == ("idle", "")


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

    def test_lr_set_between_fits_reaches_the_kept_optimizer(self):
        """The optimizer is kept across fits, so setting lr sets every one of its groups' lr."""
        groups = lambda model: [
            {"params": model[0].parameters()},
            {"params": model[2].parameters()},
        ]
        learn = Learner(
            mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, param_groups=groups, audit_log=None
        )
        learn.fit(1)
        opt = learn.opt
        assert opt is not None
        learn.lr = 0.5
        assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
        learn.fit(1)
        assert learn.opt is opt
        assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]

    def test_one_callback_alone(self):
        """cbs=Callback() (not in a list) used to raise a raw TypeError; fastai takes it."""
        rec = RecordingCallback()
        learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, cbs=rec, audit_log=None)
        assert learn.cbs == [rec]
        learn.fit(1)
        assert rec.hooks == expected_hooks(batches=(1, 1))

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
        assert rec.hooks == expected_hooks(batches=(1, 1))
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
