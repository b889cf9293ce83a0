"""The record codec: every kind encodes to bytes that decode back to what was encoded."""

from __future__ import annotations

import pytest

from fsm_learner.audit.codec import (
    Encoder,
    FailureField,
    Field,
    Footer,
    Header,
    Note,
    RecordError,
    RunStatus,
    Seal,
    Transition,
    TransitionReader,
    decode,
    derive_key,
    note_fields,
    route_keys,
)
from fsm_learner.machine import table_routes

RUN_IDS = ["0123456789ab", "50%-off", '%d %s "quoted" \\ é']


class TestRoundTrips:
    @pytest.mark.parametrize("run_id", RUN_IDS)
    def test_every_route_of_the_table(self, run_id):
        """Each route's transition decodes to the route, counters and time encoded.

        A run id holding ``%`` used to break the byte template (``%`` is its format).
        """
        encoder = Encoder(run_id)
        for n, key in enumerate(route_keys()):
            line = encoder.transition(key, n, 2 * n, 3 * n)
            record = decode(line)
            assert isinstance(record, Transition)
            assert (record.run, record.key, record.epoch, record.iter, record.t_ns) == (
                run_id,
                key,
                n,
                2 * n,
                3 * n,
            )

    @pytest.mark.parametrize("run_id", RUN_IDS)
    def test_the_bulk_reader_reads_what_decode_reads(self, run_id):
        """TransitionReader and decode agree on a block of every route."""
        encoder = Encoder(run_id)
        keys = route_keys()
        data = b"".join(encoder.transition(key, 1, n, 10 + n) for n, key in enumerate(keys))
        read = TransitionReader(run_id).read(data)
        assert read is not None
        assert [keys[i] for i in read.routes] == list(keys)
        assert read.numbers[2::3] == [10 + n for n in range(len(keys))]

    def test_header_note_footer_seal(self):
        """The other kinds keep every field; the note carries the loop counters."""
        encoder = Encoder("r1")
        header = decode(encoder.header({Field.MODEL: "MLP"}, keyed=True, prev=b"\x01" * 16))
        assert header == Header("r1", 0, 2, True, "01" * 16, {"model": "MLP"})
        fields = note_fields("metrics", {"accuracy": 0.5, "nan": float("nan")})
        note = decode(encoder.note("metrics", fields, epoch=3, it=7, training=False, t_ns=9))
        assert note == Note("r1", 9, "metrics", 3, 7, False, {"accuracy": 0.5, "nan": "NaN"})
        failure = {FailureField.TYPE: "ValueError", FailureField.MESSAGE: "x"}
        footer = decode(
            encoder.footer(
                t_ns=99,
                status=RunStatus.FAILED,
                records=5,
                counts={"begin_fit": [0, 1]},
                hook_ns={"begin_fit": [0, 40]},
                failure=failure,
            )
        )
        assert footer == Footer(
            "r1",
            99,
            RunStatus.FAILED,
            5,
            {"begin_fit": [0, 1]},
            {"begin_fit": [0, 40]},
            {"type": "ValueError", "message": "x"},
        )
        assert decode(encoder.seal(4, b"\xab" * 16)) == Seal("r1", 4, b"\xab" * 16)

    def test_a_transition_record_is_short(self):
        """At most 125 bytes with a 12-character run id and large counters (it was 146)."""
        line = Encoder("0123456789ab").transition(
            ("compute_loss", "predict", "loss", True), 999, 99_999, 9_999_999_999_999
        )
        assert len(line) <= 125


class TestRouteKeys:
    def test_every_route_of_every_mode_once(self):
        """The route keys are the union of every mode's routes, each once, in a fixed order."""
        keys = route_keys()
        assert len(keys) == len(set(keys))
        expected = {
            (trigger.value, source.value, dest.value, training)
            for (_, training), routes in table_routes().items()
            for source, by_trigger in routes.items()
            for trigger, dest in by_trigger.items()
        }
        assert set(keys) == expected
        assert ("begin_epoch", "idle", "epoch", False) in keys  # a validate or predict run's
        assert ("end_batch", "predict", "epoch", False) in keys  # a predict run's
        assert len(keys) < 256  # the bulk reader keeps a route index in a byte


class TestRefused:
    @pytest.mark.parametrize("name", ["ep", "it", "tr", "t", "run", "ev", "name"])
    def test_a_note_may_not_spell_a_counter_or_the_envelope(self, name):
        """The run stamps ep/it/tr on every note: a note field by those names is refused."""
        with pytest.raises(ValueError, match="reserved names"):
            note_fields("probe", {name: 1})

    def test_schema_1_is_named(self):
        """A log of schema 1 is refused in one line that names its version."""
        line = b'{"run":"a","seq":0,"t":0,"ev":"run_start","schema":1,"keyed":false,"h":"00"}'
        with pytest.raises(RecordError, match="schema version 1"):
            decode(line)


class TestKeys:
    def test_a_key_of_any_bytes_from_the_environment(self, monkeypatch):
        """A key that is not UTF-8 reaches os.environ with surrogate escapes: it used to crash.

        It derives the same key as the raw bytes given to the Learner.
        """
        monkeypatch.setenv("FSM_LEARNER_AUDIT_KEY", "\udcff\udcfek")  # the bytes ff fe 6b
        assert derive_key(None) == derive_key(b"\xff\xfek")
        assert derive_key(None) is not None


class TestNoteSize:
    def test_the_name_counts_in_bytes(self):
        """A name of 300,000 emoji (1.2 MB in UTF-8) used to pass as 300,000 characters."""
        with pytest.raises(ValueError, match="bytes as JSON"):
            note_fields("\N{GRINNING FACE}" * 300_000, {})
