"""DeviceCB: the model and batches end up on the device, moved without a sync; bad devices fail."""

from __future__ import annotations

from typing import NamedTuple

import orjson
import pytest
import torch
import torch.nn.functional as F
from helpers import batches_dls, mlp
from torch import nn
from torch.overrides import TorchFunctionMode

from callbacks.device import DeviceCB, default_device, resolve_device, to_device
from fsm_learner import Callback, ConfigurationError, DataLoaders, Learner
from fsm_learner.exceptions import InvalidCallbackError


class BatchDevices(Callback):
    """Records the device of each batch's inputs and targets, and of the model, per batch."""

    def __init__(self):
        self.seen: list[tuple[str, str, str]] = []

    def after_batch(self, learn):
        x, y = learn.batch
        param = next(learn.model.parameters())
        self.seen.append((x.device.type, y.device.type, param.device.type))


class ToCalls(TorchFunctionMode):
    """Records the non_blocking flag of every Tensor.to call."""

    def __init__(self):
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "to":
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


class Pair(NamedTuple):
    x: torch.Tensor
    y: int


class TestMoves:
    def test_cpu_training_puts_batches_and_model_on_cpu(self):
        """On 'cpu' every batch and the model are on the CPU, and the model trains."""
        probe = BatchDevices()
        learn = Learner(mlp(), batches_dls(3, 2), F.cross_entropy, 0.1, [DeviceCB("cpu"), probe])
        before = [p.clone() for p in learn.model.parameters()]
        learn.fit(1)
        assert probe.seen == [("cpu", "cpu", "cpu")] * 5
        assert any(
            not torch.equal(a, b) for a, b in zip(before, learn.model.parameters(), strict=True)
        )

    def test_meta_device_moves_everything_and_the_optimizer_follows(self):
        """A move that replaces the parameters ('meta') repoints the fresh optimizer to them."""
        probe = BatchDevices()
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [DeviceCB("meta"), probe])
        learn.fit(1)
        assert probe.seen == [("meta", "meta", "meta")] * 3
        params = list(learn.model.parameters())
        assert learn.opt is not None
        assert [id(p) for p in learn.opt.param_groups[0]["params"]] == [id(p) for p in params]
        assert learn.state == "idle"

    def test_loss_module_moves_with_the_model(self):
        """A loss module with class weights is moved too, so the loss can be computed."""
        loss = nn.CrossEntropyLoss(weight=torch.ones(10))
        Learner(mlp(), batches_dls(1, 1), loss, 0.1, [DeviceCB("meta")]).fit(1)
        assert loss.weight is not None
        assert loss.weight.device.type == "meta"

    def test_batches_are_moved_non_blocking(self):
        """Every copy DeviceCB makes is non_blocking: it never waits for the device."""
        cb = DeviceCB("cpu")
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, [cb])
        learn.batch = batches_dls(1, 0).train[0]
        with ToCalls() as calls:
            cb.before_batch(learn)
        assert calls.non_blocking == [True, True]

    def test_to_device_rebuilds_containers(self):
        """Tuples, named tuples, lists and dicts are rebuilt; other values pass through."""
        batch = {
            "a": (torch.ones(2), [torch.zeros(1), "label"]),
            "b": Pair(torch.ones(1), 3),
        }
        moved = to_device(batch, torch.device("meta"))
        assert moved["a"][0].device.type == "meta"
        assert moved["a"][1][0].device.type == "meta"
        assert moved["a"][1][1] == "label"
        assert isinstance(moved["b"], Pair)
        assert moved["b"].x.device.type == "meta"
        assert moved["b"].y == 3


class DtypeProbe(Callback):
    """Records the dtypes of each batch's tensors, flattened, and of the predictions."""

    def __init__(self):
        self.batches: list[list[torch.dtype]] = []
        self.preds: list[torch.dtype] = []

    def after_predict(self, learn):
        self.batches.append([t.dtype for t in flatten(learn.batch)])
        self.preds.append(learn.preds.dtype)


def flatten(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for value in batch.values() for t in flatten(value)]
    return [t for item in batch for t in flatten(item)]


class TwoInputs(nn.Module):
    """The seeded MLP on the sum of two views of the digits, fed a nested mapping batch."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, views, scale):
        left, (right,) = views
        return self.net((left + right) * scale[:, None])


def nested(batches):
    """Each (x, y) as {"views": (x / 2, [x / 2]), "scale": ones, "labels": y}."""
    return [
        {"views": (x / 2, [x / 2]), "scale": torch.ones(len(x), dtype=torch.float32), "labels": y}
        for x, y in batches
    ]


class TestDtype:
    def test_float64_trains_a_float64_model_on_float32_batches(self):
        """DeviceCB(dtype=torch.float64) converts the model and the float inputs, not the
        labels; the fit matches a float64 fit by hand to float64 precision."""
        probe = DtypeProbe()
        dls = batches_dls(3, 2)
        cbs = [DeviceCB("cpu", dtype=torch.float64), probe]
        learn = Learner(mlp(), dls, F.cross_entropy, 0.5, cbs, audit_log=None)
        learn.fit(2)
        assert {p.dtype for p in learn.model.parameters()} == {torch.float64}
        assert probe.batches == [[torch.float64, torch.int64]] * 10
        assert probe.preds == [torch.float64] * 10
        by_hand = mlp().double()
        opt = torch.optim.SGD(by_hand.parameters(), lr=0.5)
        for _ in range(2):
            for x, y in dls.train:
                F.cross_entropy(by_hand(x.double()), y).backward()
                opt.step()
                opt.zero_grad()
        for ours, theirs in zip(learn.model.parameters(), by_hand.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        assert learn.validate()["loss"] == pytest.approx(
            F.cross_entropy(
                by_hand(torch.cat([x for x, _ in dls.valid]).double()),
                torch.cat([y for _, y in dls.valid]),
            ).item(),
            rel=1e-12,
        )

    def test_nested_mapping_batches_are_converted_at_every_depth(self):
        """Tensors inside tuples inside a mapping are moved and converted; labels are not."""
        probe = DtypeProbe()
        dls = batches_dls(2, 1)
        mapped = DataLoaders(nested(dls.train), nested(dls.valid))
        cbs = [DeviceCB("cpu", dtype=torch.float64), probe]
        Learner(TwoInputs(), mapped, F.cross_entropy, 0.5, cbs, audit_log=None).fit(1)
        assert probe.batches == [[torch.float64, torch.float64, torch.float64, torch.int64]] * 3

    def test_an_optimizer_with_state_follows_the_conversion(self):
        """A fit in float32 leaves momentum buffers; a later fit with dtype=float64 converts
        them with the parameters, and trains."""
        sgd = torch.optim.SGD
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, None, sgd, audit_log=None)
        learn.opt = sgd(learn.model.parameters(), lr=0.1, momentum=0.9)
        learn.fit(1)
        learn.cbs = [DeviceCB("cpu", dtype=torch.float64)]
        before = learn.model[0].weight.detach().clone()
        learn.fit(1)
        assert not torch.equal(learn.model[0].weight, before.double())
        buffers = [s["momentum_buffer"] for s in learn.opt.state.values()]
        assert len(buffers) == 4
        assert {b.dtype for b in buffers} == {torch.float64}

    @pytest.mark.parametrize("dtype", [torch.int64, "float64", torch.complex64, 64])
    def test_a_bad_dtype_is_named(self, dtype):
        """Only floating-point torch dtypes; the message lists them and names what came."""
        with pytest.raises(ConfigurationError) as info:
            DeviceCB("cpu", dtype=dtype)
        message = str(info.value)
        assert message.startswith("dtype must be a floating-point torch.dtype (torch.float16, ")
        assert message.endswith(f"got {dtype!r}")


class TestOtherRuns:
    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_validate_and_predict_runs_place_the_model(self, run):
        """Without before_fit the model is placed in before_epoch (a float64 model comes
        back to float32 here), and the run's audit log has the device note."""
        probe = DtypeProbe()
        cbs = [DeviceCB("cpu", dtype=torch.float32), probe]
        learn = Learner(mlp().double(), batches_dls(1, 2), F.cross_entropy, 0.1, cbs)
        getattr(learn, run)()
        assert next(learn.model.parameters()).dtype == torch.float32
        assert probe.preds == [torch.float32] * 2
        notes = [
            orjson.loads(line)
            for line in learn.audit_path.read_bytes().splitlines()
            if b'"ev":"note"' in line
        ]
        assert [(n["name"], n["device"]) for n in notes] == [("device", "cpu")]

    def test_a_validate_run_in_float64_needs_no_fit(self):
        """validate() alone converts the model: the loss is the float64 one."""
        dls = batches_dls(1, 2)
        learn = Learner(mlp(), dls, F.cross_entropy, 0.1, [DeviceCB("cpu", dtype=torch.float64)])
        loss = learn.validate()["loss"]
        x, y = (torch.cat(part) for part in zip(*dls.valid, strict=True))
        assert loss == pytest.approx(
            F.cross_entropy(mlp().double()(x.double()), y).item(), rel=1e-12
        )
        assert next(learn.model.parameters()).dtype == torch.float64


class TestBadDevices:
    def test_unknown_device_string_lists_valid_types(self):
        """A typo is rejected naming what was received, the valid types and what is here."""
        with pytest.raises(ConfigurationError) as info:
            DeviceCB("cdua")
        message = str(info.value)
        assert message.startswith("unknown device 'cdua'; valid device types: cpu, cuda, mps")
        assert "available here: cpu" in message
        assert isinstance(info.value.__cause__, RuntimeError)  # torch's own full list

    def test_cuda_without_cuda_is_rejected(self, monkeypatch):
        """'cuda' when torch.cuda.is_available() is False says so, and what is available."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ConfigurationError, match=r"'cuda' is not available: torch\.cuda\."):
            DeviceCB("cuda")
        with pytest.raises(ConfigurationError, match=r"is_available\(\) is False"):
            resolve_device("cuda:0")

    def test_device_index_out_of_range(self, monkeypatch):
        """An index past the devices there are is rejected with the valid range."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(ConfigurationError, match="valid indices are 0 to 0"):
            resolve_device("cuda:3")

    def test_default_is_the_cpu_without_accelerators(self, monkeypatch):
        """None picks the first available accelerator, else the CPU."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
        assert default_device() == torch.device("cpu")
        assert DeviceCB().device == torch.device("cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert default_device() == torch.device("cuda")


def test_the_device_is_noted_in_the_audit_log():
    """The header predates the move; a `device` note says where the run trained."""
    learn = Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, [DeviceCB("cpu")])
    learn.fit(1)
    notes = [
        orjson.loads(line)
        for line in learn.audit_path.read_bytes().splitlines()
        if b'"ev":"note"' in line
    ]
    assert [(n["name"], n["device"]) for n in notes] == [("device", "cpu")]


class TestState:
    def test_state_with_keys_is_refused(self):
        """It keeps no state (test_state.py checks the empty one); one with keys is refused."""
        with pytest.raises(
            InvalidCallbackError, match=r"DeviceCB was given state \(device\) but keeps none"
        ):
            DeviceCB("cpu").load_state_dict({"device": "cpu"})
