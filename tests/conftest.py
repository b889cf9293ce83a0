"""Shared fixtures; the data and models live in helpers.py."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Generator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pytest
import torch
from helpers import batches_dls
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from fsm_learner import DataLoaders
from fsm_learner.audit.codec import MAX_LINE_BYTES, Header, Record, RecordError, decode

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Each test runs in its own directory, so default audit logs (runs/) land there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def dls() -> DataLoaders:
    """Three training batches and two validation batches of digits."""
    return batches_dls(3, 2)


# -- every record the suite writes matches record.schema.json ------------------------------
#
# After each test that used tmp_path (every test: _in_tmp_dir uses it), every record of
# every *.jsonl under it is validated against the schema, and the test fails naming the
# file, the line and the schema's complaint. A record is a line of a run whose header the
# codec reads (schema version 2) that the codec reads too; other lines are the hostile
# input that tests write on purpose (the audit's tests check that it is refused), or logs
# of another version. A test that hand-writes records the codec reads but the schema need
# not accept (a field tampered with) says so with @pytest.mark.unchecked_records(reason).
#
# Cost: the validator is compiled once a session, and records are validated once per
# *summary*: the record with each "free" field replaced by True when its value satisfies
# the field's schema (kept as [value] when not). A field is free when its schema is a
# simple test (an integer >= 0, a number >= 0, a boolean, a string, a string matching a
# pattern, a fixed-length array of such, an object whose values are such) and no `if`
# reads it (a note's name, a footer's status are kept). Two records with one summary agree
# on every other field, and on whether each free field passes its test, so the schema
# accepts both or neither. Run ids, clocks, counters, digests and footer counts are free:
# the suite's ~300k lines come down to about 500 validations. A transition in the writer's
# own bytes (_WRITER_TRANSITION: numbers of at most 18 digits, which orjson reads as ints)
# is not even parsed: its summary is that of the first line of its (ev, src, dst). Each
# record is validated against the kind its ev selects, the one oneOf branch it can match
# (the kinds' ev values are disjoint), in a schema without annotations. test_record_schema
# checks each of these claims.

_COUNT = rb"(?:0|[1-9][0-9]{0,17})"
_WRITER_TRANSITION = re.compile(
    rb'\{"ev":"([a-z_]+)","src":"([a-z_]+)","dst":"([a-z_]+)","tr":(?:true|false),'
    rb'"run":"([0-9a-f]{12})","ep":%s,"it":%s,"t":%s\}' % (_COUNT, _COUNT, _COUNT)
)
_ANNOTATIONS = frozenset({"description", "title", "$comment", "format"})  # no format checker
_Summary = Callable[[object], object]


def _lean(node: object, *, names: bool = False) -> object:
    """The schema without annotations (a map of names to schemas keeps every name)."""
    if isinstance(node, list):
        return [_lean(item) for item in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {name: _lean(sub) for name, sub in node.items()}
    maps = {"properties", "patternProperties", "$defs", "dependentSchemas"}
    return {k: _lean(v, names=k in maps) for k, v in node.items() if k not in _ANNOTATIONS}


def _resolved(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema ``node`` without annotations, a lone ``$ref`` followed."""
    node = {k: v for k, v in node.items() if k not in _ANNOTATIONS}
    if set(node) == {"$ref"}:
        return _resolved(defs[node["$ref"].rpartition("/")[2]], defs)
    return node


_TYPES: dict[str, Callable[[object], bool]] = {  # exact types: bool is no integer in JSON
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
    "string": lambda v: type(v) is str,
    "null": lambda v: v is None,
}


def _test_of(node: dict[str, Any], defs: dict[str, Any]) -> Callable[[object], bool] | None:
    """A Python test that implies ``node`` holds, for the simple schemas; None for others."""
    node = _resolved(node, defs)
    kind, keys = node.get("type"), node.keys() - {"type"}
    if kind == "array":
        return _array_test(node, keys, defs)
    if isinstance(kind, list) and not keys and set(kind) <= _TYPES.keys():
        tests = [_TYPES[k] for k in kind]
        return lambda v: any(t(v) for t in tests)
    if kind in {"integer", "number"} and keys == {"minimum"}:
        of_type, low = _TYPES[kind], node["minimum"]
        return lambda v: of_type(v) and v >= low
    if kind == "string" and keys == {"pattern"}:
        pattern = node["pattern"]  # jsonschema searches, as re.search does
        return lambda v: type(v) is str and re.search(pattern, v) is not None
    return _TYPES.get(kind) if isinstance(kind, str) and not keys else None


def _array_test(
    node: dict[str, Any], keys: set[str], defs: dict[str, Any]
) -> Callable[[object], bool] | None:
    if keys == {"items"}:
        test = _test_of(node["items"], defs)  # no bounds: each item passing is all it takes
        return None if test is None else lambda v: type(v) is list and all(map(test, v))
    if keys != {"prefixItems", "items", "minItems"} or node["items"] is not False:
        return None
    tests = [_test_of(item, defs) for item in node["prefixItems"]]
    if node["minItems"] != len(tests) or None in tests:
        return None
    return lambda v: (
        type(v) is list
        and len(v) == len(tests)
        and all(t(x) for t, x in zip(tests, v, strict=True) if t is not None)
    )


def _in_place(node: dict[str, Any], defs: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The schemas that apply to the instance ``node`` applies to ($refs followed), each once.

    Also whether an ``if`` among them reads more than the fields its ``properties`` name
    (those are added to the ``read`` list of each ``if`` by ``_read_by_conditions``).
    """
    schemas: list[dict[str, Any]] = []
    todo: list[object] = [node]
    while todo:
        item = todo.pop()
        if not isinstance(item, dict) or any(item is seen for seen in schemas):
            continue
        schemas.append(item)
        if "$ref" in item:
            todo.append(defs[item["$ref"].rpartition("/")[2]])
        for key in ("allOf", "anyOf", "oneOf"):
            todo += item.get(key, [])
        todo += [item.get(key) for key in ("not", "then", "else")]
        todo += list(item.get("dependentSchemas", {}).values())
    return schemas, any(set(cond) - {"properties", "required"} for cond in _conditions(schemas))


def _conditions(schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s["if"] for s in schemas if isinstance(s.get("if"), dict)]


def _summary_of(node: dict[str, Any], defs: dict[str, Any]) -> _Summary:
    """How to summarise a value of schema ``node`` (see above)."""
    test = _test_of(node, defs)
    if test is not None:
        return lambda v: True if test(v) else [v]
    schemas, opaque = _in_place(node, defs)
    mentions: dict[str, list[dict[str, Any]]] = {}
    for schema in schemas:
        for name, sub in schema.get("properties", {}).items():
            mentions.setdefault(name, []).append(sub)
    read = {name for cond in _conditions(schemas) for name in cond.get("properties", {})}
    patterns = [p for schema in schemas for p in schema.get("patternProperties", {})]
    extras = [
        schema[key]
        for schema in schemas
        for key in ("additionalProperties", "unevaluatedProperties")
        if isinstance(schema.get(key), dict)
    ]
    fields = {
        name: _summary_of(subs[0], defs)
        for name, subs in mentions.items()
        if len(subs) == 1
        and name not in read
        and not any(re.search(p, name) for p in patterns)
        and not extras
        and not opaque
    }
    if len(extras) == 1 and not mentions and not patterns and not opaque:
        rest = _summary_of(extras[0], defs)  # {trigger: [training, validation]}
        return lambda v: {k: rest(x) for k, x in v.items()} if type(v) is dict else v
    if not fields:
        return _same

    def summary(value: object) -> object:
        if type(value) is not dict:
            return value
        return {k: fields.get(k, _same)(v) for k, v in value.items()}

    return summary


def _same(value: object) -> object:
    return value


def _parsed(line: bytes) -> dict[str, Any]:
    """The line's JSON object; {} when it is none."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _decoded(line: bytes) -> Record | None:
    """The codec's reading of a line; None when it refuses it."""
    try:
        return decode(line)
    except RecordError:
        return None


def _starts_a_run(line: bytes, runs: set[str]) -> bool:
    """Add the run of a header the codec reads (schema 2) to ``runs``; say if it was one."""
    header = _decoded(line)
    if isinstance(header, Header):
        runs.add(header.run)
        return True
    return False


def _lines(fh: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Number each line (no newline); a line longer than a log may hold comes as None."""
    number = 0
    while chunk := fh.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(chunk) > MAX_LINE_BYTES:
            while chunk and not chunk.endswith(b"\n"):  # skip it without holding it
                chunk = fh.readline(MAX_LINE_BYTES)
            yield number, None
        else:
            yield number, chunk.removesuffix(b"\n")


class RecordCheck:
    """Validates log files against record.schema.json, each summary once a session."""

    KINDS = ("run_start", "transition", "note", "run_end", "seal")

    def __init__(self) -> None:
        text = resources.files("fsm_learner.audit").joinpath("record.schema.json").read_text()
        self.schema = json.loads(text)
        defs = self.schema["$defs"]
        # oneOf by ev: the kinds' ev values are disjoint, so a record is valid when the kind
        # its ev selects accepts it (faster, and that kind's errors are the ones to show)
        lean = {k: v for k, v in _lean(self.schema).items() if k != "oneOf"}
        self.validators = {
            kind: Draft202012Validator({**lean, "$ref": f"#/$defs/{kind}"}) for kind in self.KINDS
        }
        self._summaries = {kind: _summary_of(defs[kind], defs) for kind in self.KINDS}
        self._fast = {} if self._summarises_transitions() else None
        self.seen: set[bytes] = set()
        self.validated = 0

    def _summarises_transitions(self) -> bool:
        """Whether all a transition's fields but ev, src and dst are free (``check_line``)."""
        line = b'{"ev":"a","src":"b","dst":"c","tr":true,"run":"d5a648a66bb8","ep":0,"it":0,"t":0}'
        fields = dict.fromkeys(("tr", "run", "ep", "it", "t"), True)
        return orjson.loads(self.summary(_parsed(line))) == [
            "transition",
            {"ev": "a", "src": "b", "dst": "c", **fields},
        ]

    def kind_of(self, record: dict[str, Any]) -> str:
        """The record kind whose definition ``ev`` selects (an unknown ev: transition's)."""
        event = record.get("ev")
        return event if event in self.KINDS else "transition"

    def summary(self, record: dict[str, Any]) -> bytes:
        """The record's summary: records with one summary are valid or invalid together."""
        kind = self.kind_of(record)
        return orjson.dumps([kind, self._summaries[kind](record)])

    def check_tree(self, root: Path) -> None:
        """Fail (pytest.fail) at the first line under ``root`` that the schema refuses."""
        for path in sorted(root.rglob("*.jsonl")):
            self.check_file(path)

    def check_file(self, path: Path) -> None:
        """Fail at the first line of ``path`` that the schema refuses (a regular file only)."""
        if path.is_symlink() or not path.is_file():
            return  # FIFOs and devices of the hostile tests: nothing the writer wrote
        runs: set[str] = set()
        try:
            with path.open("rb") as fh:
                for number, line in _lines(fh):
                    problem = None if line is None else self.check_line(line, runs)
                    if problem is not None:
                        pytest.fail(f"{path}:{number}: {problem}\n  {line[:300]!r}", pytrace=False)
        except OSError:
            return  # unreadable on purpose (permissions): the writer wrote nothing there

    def check_line(self, line: bytes, runs: set[str]) -> str | None:
        """Say why the schema refuses a line the codec reads; None when all is well.

        Only records of ``runs`` are checked: the file's runs whose header the codec reads
        (a schema-2 header), which this adds to ``runs`` as it meets them. The rest are the
        hostile tests' input, or logs of another schema version.
        """
        match = None if self._fast is None else _WRITER_TRANSITION.fullmatch(line)
        if match is not None:  # not parsed: its summary is that of its (ev, src, dst)
            if match[4].decode() not in runs:
                return None
            if self._fast.get(match.group(1, 2, 3)) in self.seen:
                return None  # most lines of most logs end here
        record = _parsed(line)
        run = record.get("run")
        if not isinstance(run, str) or (run not in runs and not _starts_a_run(line, runs)):
            return None
        key = self.key(record, line)
        if key in self.seen:
            return None
        self.validated += 1
        problem = self._problem(line, record)
        if problem is None:
            self.seen.add(key)  # a problem is not remembered: every test writing it fails
            if match is not None and self._fast is not None:
                self._fast[match.group(1, 2, 3)] = key
        return problem

    def key(self, record: dict[str, Any], line: bytes) -> bytes:
        """A digest of the record's summary (of the line, when too deep to summarise)."""
        try:
            summary = self.summary(record)
        except TypeError:  # nested deeper than orjson writes: its exact bytes, then
            summary = b"\0" + line
        return hashlib.blake2b(summary, digest_size=16).digest()

    def _problem(self, line: bytes, record: dict[str, Any]) -> str | None:
        try:
            if self.validators[self.kind_of(record)].is_valid(record):
                return None
        except RecursionError:  # nested ~1,000 deep (the codec writes at most 32): hostile
            return None
        if _decoded(line) is None:
            return None  # the codec refuses it too: a test's hostile input
        return self.explain(record)

    def explain(self, record: dict[str, Any]) -> str:
        """The schema's complaint about a record, against the definition its ``ev`` selects."""
        kind = self.kind_of(record)
        error = best_match(self.validators[kind].iter_errors(record))
        message = "?" if error is None else error.message
        if len(message) > 300:
            message = message[:300] + "..."
        where = "" if error is None else error.json_path
        return f"{message} (at {where}, schema $defs/{kind})"


@functools.cache
def _record_check() -> RecordCheck:
    return RecordCheck()


@pytest.fixture(scope="session")
def record_check() -> RecordCheck:
    """The session's schema check (the one that runs after every test)."""
    return _record_check()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "unchecked_records(reason): the test hand-writes log lines that the codec reads but "
        "record.schema.json need not accept; its tmp_path is not checked against the schema",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After a test that passed, check the logs under its tmp_path against the schema."""
    result = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp_path is not None and item.get_closest_marker("unchecked_records") is None:
        _record_check().check_tree(tmp_path)
    return result
