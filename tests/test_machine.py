"""The transition table, the transitions machine built from it, and the compiled routes."""

from __future__ import annotations

import logging

import transitions
import transitions.core
from hypothesis import given, settings
from hypothesis import strategies as st

from fsm_learner import TRANSITION_TABLE, Hook, HookTiming, State, Trigger, build_machine
from fsm_learner.exceptions import CancelException
from fsm_learner.machine import MachineModel, cancel_trigger, compile_routes, table_digest


class TestTable:
    def test_every_state_trigger_and_hook_is_used(self):
        """The enums hold exactly what the table uses: no dead state, trigger or hook."""
        assert {s.trigger for s in TRANSITION_TABLE} == set(Trigger)
        assert {s.hook for s in TRANSITION_TABLE} == set(Hook)
        used = {s.dest for s in TRANSITION_TABLE} | {x for s in TRANSITION_TABLE for x in s.sources}
        assert used == set(State)

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

    def test_digest_is_stable_and_hex(self):
        """The table digest names the table; computing it twice gives the same value."""
        assert table_digest() == table_digest()
        assert len(table_digest()) == 32
        int(table_digest(), 16)


class TestBuiltMachine:
    def test_machine_is_flat_without_auto_transitions(self):
        """The machine has exactly the table's triggers: no to_<state> auto transitions."""
        machine = build_machine()
        assert set(machine.events) == {t.value for t in Trigger}
        assert set(machine.states) == {s.value for s in State}

    def test_a_training_batch_walks_through_the_machine(self):
        """Firing triggers on the transitions machine itself follows the table."""
        model = MachineModel(training=True)
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


TRIGGERS = st.sampled_from(list(Trigger))


class TestCompiledRoutesMatchTheMachine:
    """The hot path's routes and the transitions machine accept exactly the same sequences."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(TRIGGERS, st.booleans()), max_size=40))
    def test_same_acceptance_and_states(self, steps):
        """For any trigger sequence (and training flag per step) both agree at every step."""
        routes = compile_routes(build_machine())
        model = MachineModel()
        machine = build_machine(model)
        state = State.IDLE
        for trigger, training in steps:
            model.training = training
            expected = routes[training][state].get(trigger)
            try:
                accepted = machine.events[trigger].trigger(model)
            except transitions.core.MachineError:
                accepted = False
            assert accepted == (expected is not None), (state, trigger, training)
            if expected is not None:
                state = expected
            assert model.state == state.value

    def test_routes_cover_each_row(self):
        """Every (source, trigger) of the table is routed for some value of training."""
        routes = compile_routes(build_machine())
        for spec in TRANSITION_TABLE:
            for source in spec.sources:
                dests = {routes[t][source].get(spec.trigger) for t in (True, False)}
                assert spec.dest in dests
