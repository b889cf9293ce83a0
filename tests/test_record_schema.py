"""record.schema.json: current with the table and the codec, and right about every record kind.

The enums of triggers, states, hooks, run kinds and run statuses are generated from the
code; after changing the table, ``python tests/test_record_schema.py`` writes them into the
file (the rest of the file is edited by hand). conftest.py checks every log the suite writes against
the schema; the cases here say what it accepts and what it refuses.
"""

from __future__ import annotations

import ast
import copy
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from callbacks import DeviceCB, MetricsCB, SaveModelCB
from fsm_learner import Learner
from fsm_learner.audit.codec import (
    DIGEST_BYTES,
    SCHEMA_VERSION,
    Encoder,
    FailureField,
    Field,
    RecordKind,
    RunStatus,
    note_fields,
    route_keys,
)
from fsm_learner.callback import Override
from fsm_learner.machine import Hook, RunKind, State, Trigger

SCHEMA_FILE = resources.files("fsm_learner.audit").joinpath("record.schema.json")
CALLBACKS = Path(__file__).parents[1] / "callbacks"
LEARNER = Path(__file__).parents[1] / "fsm_learner" / "learner.py"
OPTIONAL_HEADER = {"resumed_from", "world_size"}
"""Header fields only some runs have (a resumed fit, a fit across ranks)."""
KINDS = ("run_start", "transition", "note", "run_end", "seal")
RUN = "d5a648a66bb8"


def generated(schema: dict[str, Any]) -> dict[str, Any]:
    """Return ``schema`` with the parts generated from the code written in."""
    schema = copy.deepcopy(schema)
    defs = schema["$defs"]
    defs["trigger"]["enum"] = [t.value for t in Trigger]
    defs["state"]["enum"] = [s.value for s in State]
    defs["hook"]["enum"] = [h.value for h in Hook]
    defs["override"]["enum"] = [o.value for o in Override]
    defs["run_start"]["properties"][Field.KIND]["enum"] = [k.value for k in RunKind]
    ended = [s.value for s in RunStatus if s is not RunStatus.TRUNCATED]
    defs["run_end"]["properties"][Field.STATUS]["enum"] = ended
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def load() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


SCHEMA = load()
DEFS = SCHEMA["$defs"]
VALIDATOR = Draft202012Validator(SCHEMA)


def valid(record: object) -> bool:
    return VALIDATOR.is_valid(record)


def line(data: bytes) -> dict[str, Any]:
    return orjson.loads(data)


def stock_note_names() -> dict[str, str]:
    """{note name: its $defs entry}, as the note definition selects them."""
    return {
        rule["if"]["properties"]["name"]["const"]: rule["then"]["$ref"].rpartition("/")[2]
        for rule in DEFS["note"]["allOf"]
    }


def names_noted_in(source: str) -> set[str]:
    """The names of the ``*.note("name", ...)`` calls in a module's source."""
    return {
        node.args[0].value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "note"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }


def properties_of(node: object) -> list[tuple[str, object]]:
    """Every (name, subschema) of every ``properties``/``patternProperties`` in the schema.

    The conditions of ``if`` name properties without describing them: they are left out.
    """
    found = []
    if isinstance(node, dict):
        for key in ("properties", "patternProperties"):
            found += list(node.get(key, {}).items())
        for key, value in node.items():
            if key != "if":
                found += properties_of(value)
    elif isinstance(node, list):
        for value in node:
            found += properties_of(value)
    return found


# -- records the codec renders ------------------------------------------------------------

HEADER_FIELDS = {
    Field.WALL: "2026-12-01T16:04:21.257+00:00",
    Field.TABLE: "1d05d9e19e06dad221d8fbd242965273",
    Field.VERSION: "0.1.0",
    Field.PYTHON: "3.11.7",
    Field.RANK: 0,
    Field.CALLBACKS: [["MetricsCB", 20], ["DeviceCB", -20]],
    Field.MODEL: "Sequential",
    Field.OPTIMIZER: "SGD",
    Field.PARAMS: 650,
    Field.N_EPOCHS: 2,
    Field.LR: 0.1,
    Field.DEVICE: "cpu",
    Field.TORCH: "2.13.0+cpu",
    Field.KIND: "fit",
}
FAILURE = {
    FailureField.TYPE: "ZeroDivisionError",
    FailureField.MESSAGE: "division by zero",
    FailureField.STATE: State.LOSS.value,
    FailureField.HOOK: Hook.AFTER_LOSS.value,
    FailureField.CALLBACK: "Boom",
}
STOCK_NOTES = {
    "device": {"device": "cuda:0"},
    "early_stopping": {
        "monitor": "valid_loss",
        "mode": "min",
        "value": 0.52,
        "best": 0.5,
        "best_epoch": 3,
        "patience": 1,
        "min_delta": 0.0,
    },
    "lr_finder": {
        "outcome": "diverged",
        "lr": 3.2,
        "smoothed_loss": math.inf,
        "best_loss": 0.4,
        "div": 4.0,
        "batches": 57,
    },
    "metrics": {"batches": 3, "complete": True, "train_loss": 2.38, "train_accuracy": math.nan},
    "mixed_precision_skip": {
        "reason": "non-finite gradients",
        "scale": 65536.0,
        "new_scale": 32768.0,
    },
    "checkpoint": {"path": "best/model.pt", "monitor": "valid_loss", "value": 0.5},
    "load_best": {"path": "best/model.pt", "epoch": 3},
    "resume_point": {
        "path": "checkpoints/ckpt_e0001_train_b000012_d5a648a66bb8.pt",
        "sha256": "0123456789abcdef" * 4,
        "records": 113,
        "head": "606d" * 8,
        "at": {"ep": 1, "tr": True, "it": 12},
    },
    "agreed": {
        "cancel": "fail",
        "rank": 1,
        "at": "backward",
        "error": "ValueError: boom (in after_loss of Boom)",
    },
    "hook_times": {
        "hooks": [
            ["MetricsCB", 0, "after_batch", 22, 1_234_567],
            ["SlowCB", 1, "after_fit", 1, 0],
            ["SlowCB", 1, "step", 16, 80_000_000],
        ]
    },
    "single_batch": {"reason": "SingleBatchCB stops after one training batch"},
    "terminate_on_nan": {"reason": "non-finite loss", "loss": math.nan, "batches_checked": 1},
}


def header(**changes: object) -> dict[str, Any]:
    record = line(Encoder(RUN).header(HEADER_FIELDS, keyed=False, prev=b""))
    return {**record, **changes}


def transition(**changes: object) -> dict[str, Any]:
    key = (Trigger.BEGIN_EPOCH.value, State.FIT.value, State.EPOCH.value, True)
    return {**line(Encoder(RUN).transition(key, 1, 0, 432650)), **changes}


def note(name: str = "probe", fields: dict[str, Any] | None = None, /, **changes: object) -> dict:
    fields = {"score": 0.25} if fields is None else fields
    rendered = Encoder(RUN).note(
        name, note_fields(name, fields), epoch=1, it=2, training=False, t_ns=99
    )
    return {**line(rendered), **changes}


def footer(status: RunStatus = RunStatus.COMPLETED, /, **changes: object) -> dict[str, Any]:
    rendered = Encoder(RUN).footer(
        t_ns=1234,
        status=status,
        records=70,
        counts={"begin_fit": [0, 1], "end_fit": [0, 1]},
        hook_ns={"begin_fit": [0, 271804]},
        failure=FAILURE if status is RunStatus.FAILED else None,
    )
    return {**line(rendered), **changes}


def seal(**changes: object) -> dict[str, Any]:
    return {**line(Encoder(RUN).seal(14, bytes(range(DIGEST_BYTES)))), **changes}


def without(record: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != field}


BASES = [
    header(),
    transition(),
    note(),
    *(note(name, fields) for name, fields in STOCK_NOTES.items()),
    footer(),
    footer(RunStatus.FAILED),
    seal(),
]
POOL = [
    *(0, 1, 2**64 - 1, 1e20, -1, 5.0, 0.5, True, False, None),
    *("", "x", "NaN", "idle", "0" * 32, "A" * 32, "begin_fit", "failed", "completed"),
    *STOCK_NOTES,
    *([0, 1], [0, -1], [0], [], {}, {"begin_fit": [0, 1]}, {"nope": [0, 1]}),
    {str(k): v for k, v in FAILURE.items()},
]  # as orjson.loads gives them: ints beyond 64 bits come as floats
VALUES = st.sampled_from(POOL)


# -- the tests ----------------------------------------------------------------------------


class TestTheFileIsCurrent:
    def test_generated_parts_match_the_code(self):
        """Triggers, states, hooks, overrides, kinds, statuses are the code's: regenerate them."""
        text = SCHEMA_FILE.read_text()
        assert text == render(generated(json.loads(text))), (
            "record.schema.json is stale: run `python tests/test_record_schema.py`"
        )

    def test_it_is_a_draft_2020_12_schema(self):
        """The file is itself a valid schema of the draft it names."""
        assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(SCHEMA)

    def test_one_definition_per_record_kind(self):
        """oneOf has one branch per kind; each non-transition kind pins ev to its RecordKind."""
        assert [branch["$ref"] for branch in SCHEMA["oneOf"]] == [f"#/$defs/{k}" for k in KINDS]
        assert DEFS["note"]["$ref"] == "#/$defs/note_envelope"
        kinds = ("run_start", "note_envelope", "run_end", "seal")
        pinned = {DEFS[kind]["properties"][Field.EVENT]["const"] for kind in kinds}
        assert pinned == {kind.value for kind in RecordKind}

    def test_every_field_of_the_codec_is_a_property(self):
        """The record kinds' properties are exactly codec.Field; failure's are FailureField."""
        kinds = ("run_start", "transition", "note_envelope", "run_end", "seal")
        named = {name for kind in kinds for name in DEFS[kind]["properties"]}
        assert named == {field.value for field in Field}
        assert set(DEFS["failure"]["properties"]) == {field.value for field in FailureField}

    def test_every_property_is_described(self):
        """Every field, in every kind and every note, says what it holds."""
        undescribed = [name for name, sub in properties_of(SCHEMA) if "description" not in sub]
        assert undescribed == []
        assert all("description" in DEFS[kind] for kind in (*KINDS, *stock_note_names().values()))

    def test_version_and_digest_size_are_the_codecs(self):
        """schema is SCHEMA_VERSION; digests are DIGEST_BYTES as lower-case hex."""
        assert DEFS["run_start"]["properties"][Field.SCHEMA]["const"] == SCHEMA_VERSION
        assert DEFS["digest"]["pattern"] == f"^[0-9a-f]{{{2 * DIGEST_BYTES}}}$"

    def test_the_reserved_note_fields_are_the_codecs(self):
        """The envelope every note carries is what note_fields refuses as a note's own field."""
        reserved = set()
        for field in Field:
            try:
                note_fields("probe", {field.value: 1})
            except ValueError:
                reserved.add(field.value)
        assert set(DEFS["note_envelope"]["properties"]) == reserved
        assert set(DEFS["note_envelope"]["required"]) == reserved

    def test_every_stock_note_has_a_definition(self):
        """Each note("name", ...) of callbacks/ and the learner has a $defs entry; nothing else."""
        sources = [*CALLBACKS.glob("*.py"), LEARNER]
        noted = set().union(*(names_noted_in(p.read_text()) for p in sources))
        assert set(stock_note_names()) == noted
        assert set(STOCK_NOTES) == noted


class TestValidRecords:
    @pytest.mark.parametrize("key", route_keys(), ids=str)
    def test_every_route_of_the_table(self, key):
        """The codec's transition record of each route is valid."""
        assert valid(line(Encoder(RUN).transition(key, 3, 7, 10**12)))

    @pytest.mark.parametrize("status", [RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED])
    def test_footers(self, status):
        """Each way a run ends; a failed one with its failure."""
        assert valid(footer(status))

    @pytest.mark.parametrize("name", sorted(STOCK_NOTES))
    def test_stock_notes(self, name):
        """Each stock callback's note, with its own fields."""
        assert valid(note(name, STOCK_NOTES[name]))

    def test_the_other_kinds(self):
        """A header (keyed, after another run), a user's note with any fields, a seal."""
        assert valid(line(Encoder(RUN).header(HEADER_FIELDS, keyed=True, prev=b"\x01" * 16)))
        assert valid(note("probe", {"epoch": 3, "nested": {"v": [math.inf, None]}}))
        assert valid(note("probe", {}))
        assert valid(seal())

    @pytest.mark.parametrize("kind", [RunKind.VALIDATE, RunKind.PREDICT])
    def test_headers_of_inference_runs(self, kind):
        """A validate or predict run's header: its kind, no optimizer, no epochs asked for."""
        assert valid(header(kind=kind.value, opt=None, n_epochs=0))
        assert valid(without(header(), Field.KIND))  # a header without a kind is a fit's

    def test_optional_parts(self):
        """A checkpoint without a monitor; a failure outside any hook; a pass without batches."""
        assert valid(note("checkpoint", {"path": "model.pt"}))
        assert valid(footer(RunStatus.FAILED, failure={**FAILURE, "hook": None, "callback": None}))
        assert valid(note("metrics", {"batches": 0, "complete": True, "valid_loss": "NaN"}))


class TestARealFit:
    def test_every_record_is_valid_and_the_header_complete(self, tmp_path):
        """A fit with the stock callbacks that note, profiled: each line valid, the header whole."""
        cbs = [
            MetricsCB(),
            DeviceCB("cpu"),
            SaveModelCB(tmp_path / "model.pt", monitor="valid_loss"),
        ]
        learn = Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, cbs, profile_hooks=True)
        result = learn.fit(2)
        assert result.audit_path is not None
        records = [line(data) for data in result.audit_path.read_bytes().splitlines()]
        assert [r for r in records if not valid(r)] == []
        assert set(records[0]) == set(DEFS["run_start"]["properties"]) - OPTIONAL_HEADER
        noted = {r["name"] for r in records if r["ev"] == RecordKind.NOTE}
        assert noted == {"device", "metrics", "checkpoint", "hook_times"}

    @pytest.mark.parametrize("run", ["validate", "get_preds"])
    def test_every_record_of_an_inference_run_is_valid(self, run):
        """learn.validate() and learn.get_preds() with a noting callback: each line valid."""
        learn = Learner(mlp(), batches_dls(2, 3), F.cross_entropy, 0.1, [MetricsCB()])
        getattr(learn, run)()
        assert learn.audit_path is not None
        records = [line(data) for data in learn.audit_path.read_bytes().splitlines()]
        assert [r for r in records if not valid(r)] == []
        assert set(records[0]) == set(DEFS["run_start"]["properties"]) - OPTIONAL_HEADER
        kind = RunKind.VALIDATE if run == "validate" else RunKind.PREDICT
        assert (records[0]["kind"], records[0]["opt"], records[0]["n_epochs"]) == (kind, None, 0)


class TestInvalidRecords:
    @pytest.mark.parametrize(
        ("make", "field", "value"),
        [
            (transition, "ep", "1"),
            (transition, "it", 1.5),
            (transition, "t", -1),
            (transition, "tr", 1),
            (transition, "src", "nowhere"),
            (transition, "run", 5),
            (header, "schema", 1),
            (header, "keyed", "false"),
            (header, "prev", "ABCDEF"),
            (header, "cbs", [["MetricsCB", "20"]]),
            (header, "lr", -0.1),
            (header, "kind", "train"),
            (header, "kind", None),
            (header, "opt", 3),
            (header, "world_size", 1),
            (header, "world_size", "2"),
            (note, "name", 3),
            (note, "tr", None),
            (footer, "status", "truncated"),
            (footer, "counts", {"begin_fit": [1]}),
            (footer, "hook_ns", {"no_such_trigger": [0, 1]}),
            (seal, "n", -1),
        ],
    )
    def test_wrong_types_and_values(self, make, field, value):
        """A field of the wrong type, or out of its range."""
        assert valid(make())
        assert not valid(make(**{field: value}))

    @pytest.mark.parametrize("event", ["nope", "run_started", "Begin_fit", "", None, 3])
    def test_unknown_events(self, event):
        """ev must be a trigger of the table or a record kind."""
        assert not valid(transition(ev=event))
        assert not valid(note(ev=event))

    @pytest.mark.parametrize(
        ("make", "field"),
        [
            pytest.param(make, field, id=f"{make.__name__}-{field}")
            for make in (header, transition, note, footer, seal)
            for field in make()
            if not (make is note and field == "score")
            and not (make is header and field in HEADER_FIELDS)
        ],
    )
    def test_missing_fields(self, make, field):
        """Every field is required, but a note's own and the header's settings."""
        assert not valid(without(make(), field))

    def test_a_header_needs_only_the_codecs_fields(self):
        """Synthetic logs (fsm-learner bench) write headers with few of the learner's fields."""
        bare = line(Encoder(RUN).header({}, keyed=False, prev=b""))
        assert valid(bare)
        assert valid(bare | {"table": HEADER_FIELDS[Field.TABLE], "n_epochs": 1, "rank": 0})
        assert not valid(bare | {"n_epochs": "1"})

    def test_unknown_fields(self):
        """Kinds other than notes hold exactly their fields; stock notes exactly theirs."""
        assert not valid(transition(seq=2))
        assert not valid(header(rk=0))
        assert not valid(seal(seq=2))
        assert not valid(footer(extra=1))
        assert not valid(note("device", {"device": "cpu", "index": 0}))
        assert not valid(note("metrics", {"batches": 1, "complete": True, "loss": 0.5}))

    @pytest.mark.parametrize("name", ["metrics", "checkpoint", "terminate_on_nan"])
    def test_stock_notes_spell_the_counters_once(self, name):
        """epoch, training, iter: a stock note has ep, it and tr from the run, not its own."""
        for spelling in ("epoch", "training", "iter"):
            assert not valid(note(name, {**STOCK_NOTES[name], spelling: 1}))

    def test_a_note_using_a_reserved_name(self):
        """A field named like the envelope overwrites it (JSON keeps the last): it fails."""
        rendered = Encoder(RUN).note("probe", {}, epoch=0, it=0, training=True, t_ns=5)
        for field, value in (("ep", '"zero"'), ("tr", "1"), ("t", "-5"), ("name", "null")):
            clash = rendered[: -len(b"}\n")] + f',"{field}":{value}}}'.encode()
            assert not valid(line(clash)), field
        with pytest.raises(ValueError, match="reserved names"):
            note_fields("probe", {"ep": 0})  # the codec never writes one

    @pytest.mark.parametrize(
        "digest",
        ["0" * 31, "0" * 33, "A" * 32, "g" * 32, "0x" + "0" * 30, "", 0, None],
    )
    def test_bad_seal_digests(self, digest):
        """h is exactly 32 lower-case hex digits."""
        assert not valid(seal(h=digest))

    def test_failure_goes_with_failed(self):
        """A failed footer has its failure; other statuses have none."""
        assert not valid(without(footer(RunStatus.FAILED), "failure"))
        assert not valid(footer(RunStatus.COMPLETED, failure=FAILURE))
        assert not valid(footer(RunStatus.FAILED, failure={**FAILURE, "state": "nowhere"}))

    @pytest.mark.parametrize(
        ("name", "field", "value"),
        [
            ("metrics", "train_loss", "nan"),  # the codec writes "NaN"
            ("metrics", "complete", 1),
            ("early_stopping", "mode", "down"),
            ("lr_finder", "outcome", "finished"),
            ("checkpoint", "path", None),
            ("terminate_on_nan", "batches_checked", 0),
            ("hook_times", "hooks", []),
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batch", 0, 5]]),  # no call
            ("hook_times", "hooks", [["MetricsCB", -1, "after_batch", 1, 5]]),
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batches", 1, 5]]),
            ("hook_times", "hooks", [["MetricsCB", 0, "zero_grad", 1, 5]]),  # no override
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batch", 1, 5.5]]),
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batch", 1]]),
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batch", 1, 5, 6]]),
            ("hook_times", "hooks", [[None, 0, "after_batch", 1, 5]]),
            ("hook_times", "hooks", [["MetricsCB", 0, "after_batch", 1, 5]] * 1025),
        ],
    )
    def test_stock_note_fields_have_their_types(self, name, field, value):
        """A stock note's field of the wrong type or value."""
        assert not valid(note(name, {**STOCK_NOTES[name], field: value}))

    def test_a_checkpoint_value_goes_with_its_monitor(self):
        """monitor and value come together."""
        assert not valid(note("checkpoint", {"path": "m.pt", "monitor": "valid_loss"}))


class TestTheSuiteCheck:
    """The check conftest.py runs after every test, on files outside any test's tmp_path."""

    def test_it_names_file_line_and_error(self, record_check, tmp_path_factory):
        """A record the codec reads but the schema refuses fails the test, saying where."""
        logs = tmp_path_factory.mktemp("bad_logs")
        encoder = Encoder(RUN)
        good = encoder.transition(route_keys()[0], 0, 0, 1)
        bad = good.replace(b'"ep":0', b'"ep":0,"epoch":0')
        head = encoder.header(HEADER_FIELDS, keyed=False, prev=b"")
        (logs / "bad.jsonl").write_bytes(head + good + bad)
        with pytest.raises(pytest.fail.Exception, match=r"bad\.jsonl:3: .*'epoch' was unexpected"):
            record_check.check_tree(logs)

    def test_only_records_of_schema_2_runs_are_checked(self, record_check, tmp_path_factory):
        """Garbage, over-long lines, lines the codec refuses, runs of another version: skipped."""
        logs = tmp_path_factory.mktemp("hostile_logs")
        head = Encoder(RUN).header(HEADER_FIELDS, keyed=False, prev=b"")
        seq = (
            b'{"ev":"begin_fit","src":"idle","dst":"fit","tr":false,"run":"%s","ep":0,"it":0,'
            b'"t":5,"seq":1}\n'
        )
        old = head.replace(b'"schema":2', b'"schema":1').replace(RUN.encode(), b"0ld")
        (logs / "x.jsonl").write_bytes(
            b"hello\n"
            + old
            + seq % b"0ld"  # the codec reads it; its run is a version 1 run
            + seq % b"n0header"
            + b"[" * (2 << 20)
            + b"\n"
            + head
            + b'{"ev":"begin_fit","run":"'
            + RUN.encode()
            + b'"}\n'  # the codec refuses it
        )
        record_check.check_tree(logs)

    def test_records_differing_in_free_fields_are_validated_once(
        self, record_check, tmp_path_factory
    ):
        """50 runs of a header and a transition, differing in ids and numbers: 2 validations."""
        logs = tmp_path_factory.mktemp("many_logs")
        key = (Trigger.FAIL.value, State.BACKWARD.value, State.IDLE.value, False)
        data = b""
        for run in range(50):
            encoder = Encoder(f"{run:012x}")
            data += encoder.header({**HEADER_FIELDS, Field.PARAMS: run}, keyed=False, prev=b"")
            data += encoder.transition(key, run, 2 * run, 3 * run)
        (logs / "x.jsonl").write_bytes(data)
        before = record_check.validated
        record_check.check_tree(logs)
        assert record_check.validated - before <= 2

    def test_what_a_summary_keeps(self, record_check):
        """Ids, clocks, counters, digests and counts are summarised; what an if reads is kept."""
        assert orjson.loads(record_check.summary(seal())) == [
            "seal",
            {"ev": "seal", "run": True, "n": True, "h": True},
        ]
        summary = orjson.loads(record_check.summary(footer(RunStatus.FAILED)))[1]
        assert summary["status"] == "failed"
        assert summary["counts"] == {"begin_fit": True, "end_fit": True}
        assert summary["failure"]["state"] == "loss"
        kept = orjson.loads(record_check.summary(note("metrics", STOCK_NOTES["metrics"])))[1]
        assert (kept["name"], kept["ep"], kept["train_loss"]) == ("metrics", True, 2.38)

    @pytest.mark.parametrize("record", BASES, ids=lambda r: r.get("name", r["ev"]))
    def test_a_change_that_keeps_the_summary_keeps_the_verdict(self, record_check, record):
        """Any one field of a valid record set to any value: one summary, valid again."""
        summary = record_check.summary(record)
        for field in record:
            for value in POOL:
                other = {**record, field: value}
                if record_check.summary(other) == summary:
                    assert valid(other), (field, value)

    @settings(max_examples=100, deadline=None)
    @given(data=st.data())
    def test_records_with_one_summary_are_valid_together(self, record_check, data):
        """Records differing in one field (after any changes): one summary, one verdict."""
        record = data.draw(st.sampled_from(BASES))
        for _ in range(data.draw(st.integers(0, 2))):
            record = {**record, data.draw(st.sampled_from(sorted(record))): data.draw(VALUES)}
        field = data.draw(st.sampled_from(sorted(record)))
        other = {**record, field: data.draw(VALUES)}
        if record_check.summary(record) == record_check.summary(other):
            assert valid(record) is valid(other)
        kind = record_check.validators[record_check.kind_of(record)]
        assert kind.is_valid(record) is valid(record)  # the kind ev selects: oneOf's verdict

    @given(
        key=st.sampled_from(route_keys()),
        lines=st.lists(
            st.tuples(
                st.text("0123456789abcdef", min_size=12, max_size=12),
                st.tuples(*[st.integers(0, 10**18 - 1)] * 3),
            ),
            min_size=2,
        ),
    )
    def test_a_routes_transitions_share_one_summary(self, record_check, key, lines):
        """What lets the check skip parsing them: run ids and counters are free."""
        summaries = {
            record_check.summary(line(Encoder(run).transition(key, *numbers)))
            for run, numbers in lines
        }
        assert [orjson.loads(summary)[1] for summary in summaries] == [
            {"ev": key[0], "src": key[1], "dst": key[2]}
            | dict.fromkeys(("tr", "run", "ep", "it", "t"), True)
        ]

    def test_the_kinds_ev_values_are_disjoint(self):
        """So the kind a record's ev selects is the only oneOf branch it can match."""
        consts = [DEFS[kind]["properties"][Field.EVENT]["const"] for kind in KINDS[:1] + KINDS[3:]]
        consts.append(DEFS["note_envelope"]["properties"][Field.EVENT]["const"])
        assert len(set(consts)) == len(consts) == len(KINDS) - 1
        assert not set(consts) & set(DEFS["trigger"]["enum"])


if __name__ == "__main__":
    Path(str(SCHEMA_FILE)).write_text(render(generated(load())))
