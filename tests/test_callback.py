"""Callback validation and dispatch: bad callbacks are refused with a message that helps."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import Callback, Hook, InvalidCallbackError, Learner
from fsm_learner.callback import Override, resolve_dispatch


def make(cbs):
    return Learner(mlp(), batches_dls(1, 1), F.cross_entropy, 0.1, cbs)


class TestRegistration:
    def test_not_a_callback(self):
        """Anything that is not a Callback instance is refused, naming its position and type."""
        with pytest.raises(
            InvalidCallbackError, match=r"cbs\[1\] must be an instance .* got 3 of type int"
        ):
            make([Callback(), 3])

    def test_a_class_instead_of_an_instance(self):
        """Passing the class is the commonest slip; the message says so."""
        with pytest.raises(InvalidCallbackError, match="a class: pass an instance"):
            make([Callback])

    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [("before_btach", "before_batch"), ("after_los", "after_loss"), ("afterfit", "after_fit")],
    )
    def test_misspelt_hook(self, name, suggestion):
        """A method that looks like a hook but is none is refused with the likely hook."""

        def hook(self, learn):
            return None

        bad = type("Bad", (Callback,), {name: hook})
        with pytest.raises(
            InvalidCallbackError,
            match=f"Bad.{name} looks like a hook but is none: did you mean {suggestion}",
        ):
            make([bad()])

    def test_hook_prefix_without_close_match(self):
        """A before_/after_/on_ name far from every hook is refused and lists the valid hooks."""

        class Bad(Callback):
            def on_train_start(self, learn):
                return None

        with pytest.raises(InvalidCallbackError, match="valid hooks are before_fit, before_epoch"):
            make([Bad()])

    def test_helper_methods_are_fine(self):
        """Ordinary helper names are not mistaken for hooks."""

        class Fine(Callback):
            def reset(self):
                return None

            def _private(self):
                return None

        make([Fine()]).fit(1)

    @pytest.mark.parametrize("order", [1.5, "1", None, True])
    def test_order_must_be_an_int(self, order):
        """order is an int (not a bool, not a float or string)."""
        cb = Callback()
        cb.order = order  # type: ignore[assignment]
        with pytest.raises(InvalidCallbackError, match=f"order must be an int, got {order!r}"):
            make([cb])

    def test_checked_again_at_fit(self):
        """Callbacks appended after construction are checked when fit starts."""
        learn = make([])
        learn.cbs.append("nope")  # type: ignore[arg-type]
        with pytest.raises(InvalidCallbackError, match=r"cbs\[0\]"):
            learn.fit(1)
        assert learn.state == "idle"

    def test_override_signature(self):
        """An override must take (learn, proceed); the message shows what it takes."""

        class Old(Callback):
            def step(self, learn):
                return None

        with pytest.raises(
            InvalidCallbackError,
            match=r"Old.step must accept \(learn, proceed\), got step\(learn\)",
        ):
            make([Old()])

    def test_hook_signature(self):
        """A hook must take the learner."""

        class NoArg(Callback):
            def before_fit(self):
                return None

        with pytest.raises(InvalidCallbackError, match=r"NoArg.before_fit must accept \(learn\)"):
            make([NoArg()])


class TestDispatch:
    def test_only_implementers_are_dispatched(self):
        """A callback is listed on exactly the hooks it implements, in order."""

        class A(Callback):
            order = 2

            def before_fit(self, learn):
                return None

        class B(Callback):
            def before_fit(self, learn):
                return None

            def after_loss(self, learn):
                return None

        a, b, plain = A(), B(), Callback()
        dispatch = resolve_dispatch([a, b, plain])
        assert [cb for cb, _ in dispatch.hooks[Hook.BEFORE_FIT]] == [b, a]
        assert [cb for cb, _ in dispatch.hooks[Hook.AFTER_LOSS]] == [b]
        assert all(
            not dispatch.hooks[h] for h in Hook if h not in {Hook.BEFORE_FIT, Hook.AFTER_LOSS}
        )
        assert dict(dispatch.overrides) == {Override.BACKWARD: (), Override.STEP: ()}

    def test_overrides_are_found(self):
        """A callback defining backward or step is the override for it."""

        class Acc(Callback):
            def backward(self, learn, proceed):
                return None

        acc = Acc()
        overrides = resolve_dispatch([acc]).overrides
        assert dict(overrides) == {Override.BACKWARD: (acc,), Override.STEP: ()}
