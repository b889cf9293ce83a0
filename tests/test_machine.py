"""The transition table, the transitions machine built from it, and the compiled routes."""

from __future__ import annotations

import logging

import attrs
import pytest
import transitions
import transitions.core
from hypothesis import given, settings
from hypothesis import strategies as st

from fsm_learner import TRANSITION_TABLE, Hook, HookTiming, RunKind, State, Trigger, build_machine
from fsm_learner import machine as machine_module
from fsm_learner.exceptions import CancelException
from fsm_learner.machine import (
    HOOK_OF,
    MODES,
    TIMING_OF,
    Guard,
    MachineModel,
    cancel_trigger,
    cleanup_hooks,
    compile_routes,
    table_digest,
)

H, S = Hook, State
CLEANUPS = {H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT}


def every_cleanup_run() -> set[Hook]:
    """The cleanup hooks some row of the table runs, in some kind of run."""
    return {
        hook
        for spec in TRANSITION_TABLE
        for source in spec.sources
        for kind in RunKind
        for hook in cleanup_hooks(source, spec.dest, kind)
    }


class TestTable:
    def test_every_state_trigger_and_hook_is_used(self):
        """The enums hold exactly what the table uses: no dead state, trigger or hook."""
        assert {s.trigger for s in TRANSITION_TABLE} == set(Trigger)
        assert {s.hook for s in TRANSITION_TABLE} == set(Hook) - CLEANUPS
        assert every_cleanup_run() == CLEANUPS
        used = {s.dest for s in TRANSITION_TABLE} | {x for s in TRANSITION_TABLE for x in s.sources}
        assert used == set(State)
        assert {s.guard for s in TRANSITION_TABLE} - {None} == set(Guard)

    def test_each_trigger_fires_one_hook(self):
        """A trigger with several rows (end_batch) fires the same hook with the same timing."""
        for trigger in Trigger:
            rows = [s for s in TRANSITION_TABLE if s.trigger is trigger]
            assert len({(r.hook, r.timing) for r in rows}) == 1, trigger

    def test_only_end_transitions_run_hooks_before_the_change(self):
        """A unit is in progress until its after_x returns: only end_* hook before changing."""
        before = {s.trigger for s in TRANSITION_TABLE if s.timing is HookTiming.BEFORE_CHANGE}
        assert before == {Trigger.END_BATCH, Trigger.END_EPOCH, Trigger.END_FIT}

    def test_states_compare_equal_to_strings(self):
        """StrEnums: learn.state == "idle" holds."""
        assert State.IDLE == "idle"
        assert str(Trigger.CANCEL_FIT) == "cancel_fit"

    def test_cancel_trigger_maps_each_cancel(self):
        """Each cancel exception asks for its own transition; a stray subclass is refused."""
        from fsm_learner import CancelBatchException, CancelEpochException, CancelFitException

        assert cancel_trigger(CancelBatchException()) is Trigger.CANCEL_BATCH
        assert cancel_trigger(CancelEpochException()) is Trigger.CANCEL_EPOCH
        assert cancel_trigger(CancelFitException()) is Trigger.CANCEL_FIT

        class Stray(CancelException):
            pass

        assert cancel_trigger(Stray()) is None

    def test_digest_is_hex(self):
        """The table digest is 16 bytes of hex: what a log header's ``table`` holds."""
        assert len(table_digest()) == 32
        int(table_digest(), 16)

    @pytest.mark.parametrize(
        "change",
        [
            {"dest": S.IDLE},
            {"hook": H.AFTER_FAIL},
            {"timing": HookTiming.BEFORE_CHANGE},
            {"guard": Guard.TRAINING},
            {"sources": (S.BATCH, S.LOSS)},
            {"trigger": Trigger.END_BATCH},
        ],
    )
    def test_digest_changes_with_any_field_of_any_row(self, change, monkeypatch):
        """Changing one field of one row gives another digest: a log names the machine it ran on."""
        digest = table_digest.__wrapped__  # the digest computed afresh, not the cached one
        assert digest() == table_digest()
        for i, spec in enumerate(TRANSITION_TABLE):
            edited = (
                *TRANSITION_TABLE[:i],
                attrs.evolve(spec, **change),
                *TRANSITION_TABLE[i + 1 :],
            )
            if edited == TRANSITION_TABLE:
                continue  # this row already has that value
            monkeypatch.setattr(machine_module, "TRANSITION_TABLE", edited)
            assert digest() != table_digest(), (i, change)
        monkeypatch.undo()
        assert digest() == table_digest()


class TestCleanupHooks:
    @pytest.mark.parametrize(
        ("source", "dest", "kind", "expected"),
        [
            (S.STEP, S.EPOCH, RunKind.FIT, [H.CLEANUP_BATCH]),
            (S.EPOCH, S.FIT, RunKind.FIT, [H.CLEANUP_EPOCH]),
            (S.FIT, S.IDLE, RunKind.FIT, [H.CLEANUP_FIT]),
            (S.BACKWARD, S.IDLE, RunKind.FIT, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH, H.CLEANUP_FIT]),
            (S.LOSS, S.FIT, RunKind.FIT, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH]),
            (S.EPOCH, S.IDLE, RunKind.VALIDATE, [H.CLEANUP_EPOCH]),
            (S.PREDICT, S.IDLE, RunKind.PREDICT, [H.CLEANUP_BATCH, H.CLEANUP_EPOCH]),
            (S.IDLE, S.FIT, RunKind.FIT, []),
            (S.FIT, S.EPOCH, RunKind.FIT, []),
            (S.BATCH, S.PREDICT, RunKind.FIT, []),
            (S.IDLE, S.IDLE, RunKind.FIT, []),
        ],
    )
    def test_the_units_a_transition_leaves(self, source, dest, kind, expected):
        """Innermost first; entering or staying inside a unit cleans nothing up."""
        assert list(cleanup_hooks(source, dest, kind)) == expected


class TestBuiltMachine:
    def test_machine_is_flat_without_auto_transitions(self):
        """The machine has exactly the table's triggers: no to_<state> auto transitions."""
        machine = build_machine()
        assert set(machine.events) == {t.value for t in Trigger}
        assert set(machine.states) == {s.value for s in State}

    def test_a_training_batch_walks_through_the_machine(self):
        """Firing triggers on the transitions machine itself follows the table."""
        model = MachineModel(kind=RunKind.FIT, training=True)
        build_machine(model)
        for trigger in ("begin_fit", "begin_epoch", "begin_batch", "predict", "compute_loss"):
            model.trigger(trigger)  # type: ignore[attr-defined]
        assert model.state == "loss"
        model.trigger("backward")  # type: ignore[attr-defined]
        model.trigger("step")  # type: ignore[attr-defined]
        model.trigger("end_batch")  # type: ignore[attr-defined]
        assert model.state == "epoch"

    def test_validation_cannot_backward(self):
        """The training guard refuses backward in a validation pass."""
        model = MachineModel(training=False)
        build_machine(model)
        for trigger in ("begin_fit", "begin_epoch", "begin_batch", "predict", "compute_loss"):
            model.trigger(trigger)  # type: ignore[attr-defined]
        assert model.trigger("backward") is False  # type: ignore[attr-defined]
        assert model.state == "loss"

    @pytest.mark.parametrize(
        ("kind", "work", "refused"),
        [
            (RunKind.VALIDATE, ("predict", "compute_loss"), "backward"),
            (RunKind.PREDICT, ("predict",), "compute_loss"),
        ],
    )
    def test_inference_runs_enter_a_pass_from_idle(self, kind, work, refused):
        """validate and predict: idle -> epoch -> idle, no fit, no backward (predict: no loss)."""
        model = MachineModel(kind=kind, training=False)
        build_machine(model)
        assert model.trigger("begin_fit") is False  # type: ignore[attr-defined]
        for trigger in ("begin_epoch", "begin_batch", *work):
            model.trigger(trigger)  # type: ignore[attr-defined]
        assert model.trigger(refused) is False  # type: ignore[attr-defined]
        model.trigger("end_batch")  # type: ignore[attr-defined]
        assert model.state == "epoch"
        model.trigger("end_epoch")  # type: ignore[attr-defined]
        assert model.state == "idle"

    def test_quiets_transitions_without_touching_root(self, caplog):
        """transitions' INFO chatter is quieted on its own logger; the root logger is untouched."""
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        logging.getLogger("transitions").setLevel(logging.NOTSET)
        model = MachineModel()
        build_machine(model)
        with caplog.at_level(logging.DEBUG, logger="fsm_learner"):
            model.trigger("begin_fit")  # type: ignore[attr-defined]
        assert not [r for r in caplog.records if r.name.startswith("transitions")]
        assert logging.getLogger("transitions").level == logging.WARNING
        assert (root.level, root.handlers) == (level, handlers)

    def test_an_application_level_for_transitions_is_kept(self):
        """If the application set a level on transitions' logger, it stays."""
        lib = logging.getLogger("transitions")
        lib.setLevel(logging.DEBUG)
        try:
            build_machine()
            assert lib.level == logging.DEBUG
        finally:
            lib.setLevel(logging.NOTSET)


class TestPreempt:
    """A fit asked to stop (SIGTERM) stops at a boundary: between two batches or two passes."""

    FIT_MODES = ((RunKind.FIT, True), (RunKind.FIT, False))

    @pytest.mark.parametrize("mode", FIT_MODES)
    def test_a_fit_is_preempted_from_fit_and_epoch(self, mode):
        """Between two passes (fit) or two batches (epoch), in a training or validation pass."""
        routes = compile_routes(build_machine())[mode]
        preempted = {
            state: r[Trigger.PREEMPT] for state, r in routes.items() if Trigger.PREEMPT in r
        }
        assert preempted == {S.FIT: S.IDLE, S.EPOCH: S.IDLE}

    @pytest.mark.parametrize("kind", [RunKind.VALIDATE, RunKind.PREDICT])
    def test_validate_and_predict_runs_are_never_preempted(self, kind):
        """The guard is fitting: a one-pass run is routed no preempt from any state."""
        routes = compile_routes(build_machine())[kind, False]
        assert [state for state in State if Trigger.PREEMPT in routes[state]] == []
        model = MachineModel(kind=kind, training=False)
        build_machine(model)
        model.trigger("begin_epoch")  # type: ignore[attr-defined]
        assert model.trigger("preempt") is False  # type: ignore[attr-defined]
        assert model.state == "epoch"

    @pytest.mark.parametrize("state", [S.IDLE, S.BATCH, S.PREDICT, S.LOSS, S.BACKWARD, S.STEP])
    def test_never_from_idle_nor_inside_a_batch(self, state):
        """No mode routes preempt from idle or a batch's states: a batch always completes."""
        routes = compile_routes(build_machine())
        assert [mode for mode in MODES if Trigger.PREEMPT in routes[mode][state]] == []

    def test_the_machine_itself_preempts_a_fit_between_batches(self):
        """Firing preempt on the transitions machine in a fit's pass ends in idle."""
        model = MachineModel(kind=RunKind.FIT, training=True)
        build_machine(model)
        for trigger in ("begin_fit", "begin_epoch", "begin_batch"):
            model.trigger(trigger)  # type: ignore[attr-defined]
        with pytest.raises(transitions.core.MachineError, match="from state batch"):
            model.trigger("preempt")  # type: ignore[attr-defined]
        for trigger in ("predict", "compute_loss", "backward", "step", "end_batch"):
            model.trigger(trigger)  # type: ignore[attr-defined]
        assert model.trigger("preempt") is True  # type: ignore[attr-defined]
        assert model.state == "idle"

    def test_its_hook_runs_after_the_change(self):
        """after_preempt, like the cancels' hooks, runs once the machine is idle."""
        assert HOOK_OF[Trigger.PREEMPT] is H.AFTER_PREEMPT
        assert TIMING_OF[Trigger.PREEMPT] is HookTiming.AFTER_CHANGE

    @pytest.mark.parametrize(
        ("source", "expected"),
        [(S.EPOCH, [H.CLEANUP_EPOCH, H.CLEANUP_FIT]), (S.FIT, [H.CLEANUP_FIT])],
    )
    def test_its_cleanups_are_those_of_the_units_it_leaves(self, source, expected):
        """Between batches it leaves the pass and the fit; between passes, the fit."""
        [spec] = [spec for spec in TRANSITION_TABLE if spec.trigger is Trigger.PREEMPT]
        assert source in spec.sources
        assert list(cleanup_hooks(source, spec.dest, RunKind.FIT)) == expected


TRIGGERS = st.sampled_from(list(Trigger))


class TestCompiledRoutesMatchTheMachine:
    """The hot path's routes and the transitions machine accept exactly the same sequences."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(list(RunKind)), st.lists(st.tuples(TRIGGERS, st.booleans()), max_size=40)
    )
    def test_same_acceptance_and_states(self, kind, steps):
        """For any run kind and trigger sequence (training per step) both agree at every step."""
        routes = compile_routes(build_machine())
        model = MachineModel(kind=kind)
        machine = build_machine(model)
        state = State.IDLE
        for trigger, flag in steps:
            training = flag and kind is RunKind.FIT  # only a fit has training passes
            model.training = training
            expected = routes[kind, training][state].get(trigger)
            try:
                accepted = machine.events[trigger].trigger(model)
            except transitions.core.MachineError:
                accepted = False
            assert accepted == (expected is not None), (state, trigger, training)
            if expected is not None:
                state = expected
            assert model.state == state.value

    def test_routes_cover_each_row(self):
        """Every (source, trigger) of the table is routed in some mode of some kind of run."""
        routes = compile_routes(build_machine())
        assert set(routes) == set(MODES)
        for spec in TRANSITION_TABLE:
            for source in spec.sources:
                dests = {routes[mode][source].get(spec.trigger) for mode in MODES}
                assert spec.dest in dests, (spec.trigger, source)

    def test_guards_split_the_rows_of_a_trigger_by_kind(self):
        """end_epoch and cancel_epoch go back to the fit in a fit, to idle in a validate run."""
        routes = compile_routes(build_machine())
        for trigger in (Trigger.END_EPOCH, Trigger.CANCEL_EPOCH):
            assert routes[RunKind.FIT, True][S.EPOCH][trigger] is S.FIT
            assert routes[RunKind.VALIDATE, False][S.EPOCH][trigger] is S.IDLE
            assert routes[RunKind.PREDICT, False][S.EPOCH][trigger] is S.IDLE
