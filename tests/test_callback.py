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
        [
            ("before_btach", "before_batch"),
            ("after_los", "after_loss"),
            ("afterfit", "after_fit"),
            ("compute_los", "compute_loss"),
            ("prdict", "predict"),
            ("backwards", "backward"),
            ("stepp", "step"),
        ],
    )
    def test_misspelt_hook(self, name, suggestion):
        """A method that looks like a hook but is none is refused with the likely hook."""

        def hook(self, learn):
            return None

        bad = type("Bad", (Callback,), {name: hook})
        with pytest.raises(
            InvalidCallbackError,
            match=(
                f"Bad.{name} looks like a hook or an override but is none: "
                f"did you mean {suggestion}"
            ),
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
        """Ordinary helper names are not mistaken for hooks: accepted, and never called."""
        called: list[str] = []

        class Fine(Callback):
            def reset(self):
                called.append("reset")

            def _private(self):
                called.append("_private")

        fine = Fine()
        learn = make([fine])
        assert learn.cbs == [fine]
        assert learn.fit(1).status == "completed"
        assert called == []
        dispatch = resolve_dispatch([fine])
        assert not any(dispatch.hooks.values())
        assert not any(dispatch.overrides.values())

    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [("cleanup_btach", "cleanup_batch"), ("cleanupfit", "cleanup_fit")],
    )
    def test_misspelt_cleanup_hook(self, name, suggestion):
        """The cleanup hooks are hooks too: a near miss is refused with the likely one."""

        def hook(self, learn):
            return None

        bad = type("Bad", (Callback,), {name: hook})
        with pytest.raises(InvalidCallbackError, match=f"did you mean {suggestion}"):
            make([bad()])

    @pytest.mark.parametrize("name", ["cleanup_all", "cleanup_run"])
    def test_cleanup_prefix_without_close_match(self, name):
        """A cleanup_ name far from every cleanup hook never runs: it is refused, like after_x."""

        def hook(self, learn):
            return None

        bad = type("Bad", (Callback,), {name: hook})
        with pytest.raises(
            InvalidCallbackError, match=f"Bad.{name} looks like a hook or an override but is none"
        ):
            make([bad()])

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

    def test_a_class_changed_between_runs_is_checked_again(self):
        """Checks are kept per class while its methods stay the same: a misspelt hook, or a
        hook with a wrong signature, given to the class after a run is refused at the next."""

        class Late(Callback):
            def after_fit(self, learn):
                return None

        learn = make([Late()])
        learn.fit(0)

        def before_btach(self, learn):
            return None

        Late.before_btach = before_btach  # type: ignore[attr-defined]
        with pytest.raises(InvalidCallbackError, match="did you mean before_batch"):
            learn.fit(0)
        del Late.before_btach  # type: ignore[attr-defined]
        learn.fit(0)

        def after_fit(self):
            return None

        Late.after_fit = after_fit  # type: ignore[method-assign, assignment]
        with pytest.raises(InvalidCallbackError, match=r"Late.after_fit must accept \(learn\)"):
            learn.fit(0)

    @pytest.mark.parametrize("override", list(Override))
    def test_override_signature(self, override):
        """An override must take (learn, proceed); the message shows what it takes."""

        def old(self, learn):
            return None

        bad = type("Old", (Callback,), {override.value: old})
        with pytest.raises(
            InvalidCallbackError,
            match=rf"Old.{override} must accept \(learn, proceed\), got {override}\(learn\)",
        ):
            make([bad()])

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
        assert dict(dispatch.overrides) == dict.fromkeys(Override, ())

    def test_overrides_are_found(self):
        """A callback defining predict, compute_loss, backward or step is the override for it."""

        class Acc(Callback):
            def backward(self, learn, proceed):
                return None

        class Smooth(Callback):
            order = -1

            def compute_loss(self, learn, proceed):
                return None

            def predict(self, learn, proceed):
                return None

        acc, smooth, late = Acc(), Smooth(), Smooth()
        late.order = 3
        overrides = resolve_dispatch([late, acc, smooth]).overrides
        assert dict(overrides) == {
            Override.PREDICT: (smooth, late),
            Override.COMPUTE_LOSS: (smooth, late),
            Override.BACKWARD: (acc,),
            Override.STEP: (),
        }

    def test_cleanup_hooks_are_dispatched(self):
        """A cleanup hook is dispatched like any hook: to exactly the callbacks that have it."""

        class Tidy(Callback):
            def cleanup_epoch(self, learn):
                return None

        tidy = Tidy()
        dispatch = resolve_dispatch([Callback(), tidy])
        assert {h for h in Hook if dispatch.hooks[h]} == {Hook.CLEANUP_EPOCH}
        assert [cb for cb, _ in dispatch.hooks[Hook.CLEANUP_EPOCH]] == [tidy]

    def test_a_new_equal_callback_is_dispatched(self):
        """Dispatch is resolved every run: a new callback equal to the old one runs, not the old."""
        import attrs

        calls = []

        @attrs.define
        class Tagged(Callback):
            tag: str = "x"

            def before_fit(self, learn):
                calls.append(id(self))

        first = Tagged()
        learn = make([first])
        learn.fit(0)
        second = Tagged()
        assert first == second
        learn.cbs[0] = second
        learn.fit(0)
        assert calls == [id(first), id(second)]

    def test_a_hook_added_to_the_class_between_runs_runs(self):
        """A method given to a callback's class after a run is dispatched in the next one."""
        calls: list[str] = []

        class Late(Callback):
            pass

        learn = make([Late()])
        learn.fit(0)

        def after_fit(self, learn):
            calls.append("after_fit")

        Late.after_fit = after_fit  # type: ignore[method-assign]
        learn.fit(0)
        learn.validate()
        assert calls == ["after_fit"]
