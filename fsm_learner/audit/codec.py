"""The audit log's records: every kind, its fields, its encoder and its decoder, in one place.

A log is JSON lines (schema version 2). A run is a ``run_start`` header, one record per
transition, any ``note`` records, and a ``run_end`` footer. The writer appends them in
blocks; each block is followed by one ``seal`` record::

    {"ev":"run_start","run":"d5a6..","t":0,"schema":2,"keyed":false,"prev":"",...}
    {"ev":"begin_fit","src":"idle","dst":"fit","tr":false,"run":"d5a6..","ep":0,"it":0,"t":8120}
    ...
    {"ev":"seal","run":"d5a6..","n":14,"h":"9f0c.."}

The seal's ``h`` is a BLAKE2b (keyed with the chain key, when there is one) over the
previous seal of the same run, the previous seal line in the file (of whatever run) and
the exact bytes of the ``n`` lines before the seal, and a seal line must be exactly the
bytes the encoder renders: editing, removing, inserting or reordering records, blocks or
whole runs breaks a seal, and without the key nobody can recompute one. Records carry no
hash of their own. The header's ``prev`` names the file's last seal before the run (""
at the start of a file): its first block's binding, readable.

The loop counters are spelled the same in every record that has them: ``ep`` (epoch),
``it`` (batch within the pass) and ``tr`` (training pass or not); ``t`` is nanoseconds
since the run started. ``record.schema.json`` (next to this module) documents every kind.

Encoding is byte templates (a transition's fields are fixed per route, only the numbers
vary). Decoding comes in two speeds that agree: ``decode`` parses one line of any kind and
checks every field, with a one-line reason for what is wrong; ``TransitionReader`` reads a
run's transition lines in bulk when they are all the writer's exact bytes, and leaves
anything else to ``decode``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from functools import cache
from typing import TYPE_CHECKING, Any, Final, NoReturn

import attrs
import orjson

from fsm_learner._compat import StrEnum
from fsm_learner._display import safe_text, shown
from fsm_learner.machine import State, Trigger, table_routes

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DIGEST_BYTES",
    "KEY_ENV",
    "MAX_LINE_BYTES",
    "MAX_NOTE_BYTES",
    "SCHEMA_VERSION",
    "SEAL_START",
    "AgreePoint",
    "Encoder",
    "FailureField",
    "Field",
    "Footer",
    "Header",
    "Note",
    "Record",
    "RecordError",
    "RecordKind",
    "RouteKey",
    "RunStatus",
    "Seal",
    "SealChain",
    "Transition",
    "TransitionReader",
    "Transitions",
    "decode",
    "derive_key",
    "is_seal_line",
    "json_value",
    "kind_of",
    "note_fields",
    "route_keys",
]

SCHEMA_VERSION: Final = 2
DIGEST_BYTES: Final = 16
"""Digest size of the seals: 128 bits, 32 hex characters."""
KEY_ENV: Final = "FSM_LEARNER_AUDIT_KEY"
"""Environment variable holding the chain key, for the learner and for the audit alike."""
MAX_LINE_BYTES: Final = 1 << 20
"""The longest line a log may hold (newline included): the reader calls a longer line
malformed without holding it in memory."""
MAX_NOTE_BYTES: Final = MAX_LINE_BYTES // 2
"""The largest note (as JSON) a run may write."""


class Field(StrEnum):
    """Every field name a record may have; nothing else in fsm_learner spells them."""

    EVENT = "ev"
    RUN = "run"
    TIME_NS = "t"
    # transitions
    SOURCE = "src"
    DEST = "dst"
    TRAINING = "tr"
    EPOCH = "ep"
    ITER = "it"
    # notes
    NAME = "name"
    # header
    SCHEMA = "schema"
    KEYED = "keyed"
    PREV = "prev"
    WALL = "wall"
    TABLE = "table"
    VERSION = "fsm_learner"
    CALLBACKS = "cbs"
    MODEL = "model"
    OPTIMIZER = "opt"
    PARAMS = "params"
    N_EPOCHS = "n_epochs"
    LR = "lr"
    DEVICE = "device"
    TORCH = "torch"
    PYTHON = "python"
    SEED = "seed"
    DETERMINISTIC = "deterministic"
    CUBLAS_WORKSPACE = "cublas_workspace_config"
    THREADS = "threads"
    VERSIONS = "versions"
    RNG = "rng"
    OPT_GROUPS = "opt_groups"
    LOSS = "loss_func"
    RANK = "rank"
    WORLD_SIZE = "world_size"
    KIND = "kind"
    RESUMED_FROM = "resumed_from"
    # footer
    STATUS = "status"
    RECORDS = "records"
    COUNTS = "counts"
    HOOK_NS = "hook_ns"
    FAILURE = "failure"
    # seal
    COUNT = "n"
    DIGEST = "h"


class FailureField(StrEnum):
    """The fields of a footer's ``failure`` (and of the ``run_failed`` event)."""

    TYPE = "type"
    MESSAGE = "message"
    STATE = "state"
    HOOK = "hook"
    CALLBACK = "callback"


class RecordKind(StrEnum):
    """Values of ``ev`` that are not triggers."""

    RUN_START = "run_start"
    NOTE = "note"
    RUN_END = "run_end"
    SEAL = "seal"


class AgreePoint(StrEnum):
    """Where in a fit the ranks agree: an ``agreed`` note's ``at`` (see fsm_learner.distributed)."""

    OPEN = "open"
    """Before the run opens its log: a rank whose fit could not start says so here."""
    BEGIN_FIT = "begin_fit"
    BEGIN_EPOCH = "begin_epoch"
    FORWARD = "forward"
    """Before a training batch's forward (DDP's forward may be collective): after before_batch."""
    BACKWARD = "backward"
    STEP = "step"
    """Before the step, when a hook or override between backward and step may cancel."""
    END_BATCH = "end_batch"
    END_EPOCH = "end_epoch"
    END_FIT = "end_fit"
    COLLECTIVE = "collective"
    """A callback's reduction (``World.sum``, ``World.barrier``): only a failure is taken."""
    CANCEL = "cancel"
    """A cancel raised outside a hook (in a batch's work): agreed where it was raised."""
    FAILURE = "failure"
    """A rank that failed: it proposes ``fail`` where it failed."""
    CLOSE = "close"
    """After the fit's last transition and cleanups: a rank failing there tells the others."""


class RunStatus(StrEnum):
    """How a run ended, as its footer says (``truncated`` is the audit's word for no footer)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    PREEMPTED = "preempted"
    TRUNCATED = "truncated"


RouteKey = tuple[str, str, str, bool]
"""(trigger, source, destination, training) of a route of the table, as plain values."""

_ENVELOPE: Final = frozenset({Field.EVENT.value, Field.RUN.value, Field.TIME_NS.value})
_COUNTERS: Final = frozenset({Field.EPOCH.value, Field.ITER.value, Field.TRAINING.value})
_NOTE_RESERVED: Final = _ENVELOPE | _COUNTERS | {Field.NAME.value}
_HEADER_OWN: Final = _ENVELOPE | {Field.SCHEMA.value, Field.KEYED.value, Field.PREV.value}
_ENDED: Final = (RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.PREEMPTED)


# -- keys and the seal chain -------------------------------------------------------------


def derive_key(material: bytes | str | None) -> bytes | None:
    """Turn key material of any length into a 32-byte BLAKE2b key (None: no key).

    ``None`` falls back to the ``FSM_LEARNER_AUDIT_KEY`` environment variable; an empty
    value means no key.
    """
    if material is None:
        material = os.environ.get(KEY_ENV) or None
    if material is None or material in {"", b""}:
        return None
    # surrogateescape: a key read from the environment may be any bytes, as os.environb has them
    raw = material.encode("utf-8", "surrogateescape") if isinstance(material, str) else material
    return hashlib.blake2b(raw, digest_size=32, person=b"fsm-learner-key").digest()


class SealChain:
    """The digests sealing a run's blocks, as the writer makes them and the audit checks.

    ``digest(head, before, block)`` is BLAKE2b over the run's previous seal ``head`` (b""
    before its first block), the file's previous seal ``before`` (the digest of the last
    seal line before the block, of whatever run; b"" at the start of a file) and the
    block's exact bytes; keyed when the chain is. Binding every block to both makes the
    file one chain: a block (or a run) removed, moved or inserted breaks the seal after it.
    """

    def __init__(self, key: bytes | None) -> None:
        """Chain keyed when ``key`` is given."""
        self._base = hashlib.blake2b(digest_size=DIGEST_BYTES, key=key or b"")

    def digest(self, head: bytes, before: bytes, block: bytes | memoryview) -> bytes:
        """Return the seal of ``block`` after the run's seal ``head`` and the file's ``before``."""
        hasher = self.begin(head, before)
        hasher.update(block)
        return hasher.digest()

    def begin(self, head: bytes, before: bytes) -> hashlib.blake2b:
        """Return a hasher primed with both seals: feed it a block piece by piece, then digest.

        ``begin(head, before)`` fed ``block`` digests to ``digest(head, before, block)``.
        """
        hasher = self._base.copy()
        hasher.update(bytes((len(head), len(before))))  # lengths first: no two readings
        hasher.update(head)
        hasher.update(before)
        return hasher


# -- values ------------------------------------------------------------------------------

_MAX_DEPTH: Final = 32
"""Nesting a note field may have (orjson refuses beyond 254; the audit's reports stay small)."""
_NON_FINITE: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_value(name: str, value: object, depth: int = 0) -> object:
    """Return ``value`` as JSON data; NaN and infinities become "NaN", "Infinity", "-Infinity".

    Raise TypeError, naming the field, for what JSON cannot hold or what nests too deep.
    """
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):  # numpy's float64 too: orjson takes only exact floats
        return float(value) if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if depth >= _MAX_DEPTH:
        msg = (
            f"audit note field {name!r} nests deeper than {_MAX_DEPTH} levels (or holds "
            "itself); notes hold plain JSON values: flatten it"
        )
        raise TypeError(msg)
    if isinstance(value, list | tuple):
        return [json_value(name, v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(f"{name}.{k}", v, depth + 1) for k, v in value.items()}
    msg = (
        f"audit note field {name!r} must be a JSON value (bool, int, float, str, None, "
        f"list, dict), got {type(value).__name__}; convert tensors yourself, once per pass"
    )
    raise TypeError(msg)


def note_fields(name: object, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check a note's name and fields; return the fields as JSON data.

    Raise TypeError or ValueError, saying what was received and what is valid.
    """
    if not isinstance(name, str):
        msg = f"a note's name must be a str, got {type(name).__name__}"
        raise TypeError(msg)
    clash = sorted(_NOTE_RESERVED & set(fields))
    if clash:
        msg = (
            f"audit note fields may not use the reserved names {clash} (the run stamps "
            f"{sorted(_NOTE_RESERVED)} on every note); rename them"
        )
        raise ValueError(msg)
    values = {k: json_value(k, v) for k, v in fields.items()}
    try:
        size = len(orjson.dumps(values)) + len(orjson.dumps(name))
    except orjson.JSONEncodeError as exc:
        msg = f"audit note {safe_text(name)!r} cannot be written as JSON: {exc}"
        raise TypeError(msg) from None
    if size > MAX_NOTE_BYTES:
        msg = (
            f"audit note {safe_text(name)!r} is {size:,} bytes as JSON; a note may be at most "
            f"{MAX_NOTE_BYTES:,} (a log line at most {MAX_LINE_BYTES:,}): note a summary"
        )
        raise ValueError(msg)
    return values


# -- encoding ----------------------------------------------------------------------------


def _json(value: object) -> bytes:
    return orjson.dumps(value)


_K: Final = {field: field.value for field in Field}
_PLAIN: Final = frozenset({str, int, bool, type(None)})
"""Types a header value may have that need no conversion (floats do: NaN has no JSON)."""
"""Field names as plain strings: orjson takes no str subclass as a key, and ``.value`` is slow."""


class Encoder:
    """Renders one run's records as the lines of its log (each ending in a newline)."""

    def __init__(self, run_id: str) -> None:
        """Render records of the run ``run_id``."""
        self.run_id = run_id
        self._templates: dict[RouteKey, bytes] = {}

    def header(
        self, fields: Mapping[Field, Any], *, keyed: bool, prev: bytes, t_ns: int = 0
    ) -> bytes:
        """Render the header: the run's own fields first, then ``fields`` (JSON values)."""
        clash = sorted(_HEADER_OWN & set(fields))
        if clash:
            msg = f"header fields {clash} are the codec's own; they cannot be given"
            raise ValueError(msg)
        record = {
            _K[Field.EVENT]: RecordKind.RUN_START.value,
            _K[Field.RUN]: self.run_id,
            _K[Field.TIME_NS]: t_ns,
            _K[Field.SCHEMA]: SCHEMA_VERSION,
            _K[Field.KEYED]: keyed,
            _K[Field.PREV]: prev.hex(),
        }
        for field, value in fields.items():
            name = _K.get(field) or str(field)
            record[name] = value if type(value) in _PLAIN else json_value(name, value)
        return _json(record) + b"\n"

    def template(self, key: RouteKey) -> bytes:
        """Return the byte template of a route's transition record: ``% (ep, it, t)``."""
        template = self._templates.get(key)
        if template is None:
            shape = _shape(key, self.run_id).replace(b"%", b"%%")  # a run id may hold a %
            template = shape + _EPOCH_OPEN + _NUMBERS
            self._templates[key] = template
        return template

    def transition(self, key: RouteKey, epoch: int, it: int, t_ns: int) -> bytes:
        """Render one transition record (the writer renders through ``template``)."""
        return self.template(key) % (epoch, it, t_ns)

    def note(  # noqa: PLR0913 (the counters stamped on a note, by name)
        self,
        name: str,
        fields: Mapping[str, Any],
        *,
        epoch: int,
        it: int,
        training: bool,
        t_ns: int,
    ) -> bytes:
        """Render a note whose fields ``note_fields`` checked, stamped with the counters."""
        record = {
            _K[Field.EVENT]: RecordKind.NOTE.value,
            _K[Field.RUN]: self.run_id,
            _K[Field.EPOCH]: epoch,
            _K[Field.ITER]: it,
            _K[Field.TRAINING]: training,
            _K[Field.TIME_NS]: t_ns,
            _K[Field.NAME]: name,
            **fields,
        }
        return _json(record) + b"\n"

    def footer(  # noqa: PLR0913 (the footer's fields, by name)
        self,
        *,
        t_ns: int,
        status: RunStatus,
        records: int,
        counts: Mapping[str, list[int]],
        hook_ns: Mapping[str, list[int]],
        failure: Mapping[FailureField, object] | None = None,
    ) -> bytes:
        """Render the footer: how the run ended, what it wrote, and its failure if any."""
        record: dict[str, Any] = {
            _K[Field.EVENT]: RecordKind.RUN_END.value,
            _K[Field.RUN]: self.run_id,
            _K[Field.TIME_NS]: t_ns,
            _K[Field.STATUS]: status.value,
            _K[Field.RECORDS]: records,
            _K[Field.COUNTS]: dict(counts),
            _K[Field.HOOK_NS]: dict(hook_ns),
        }
        if failure is not None:
            record[_K[Field.FAILURE]] = {str(k): json_value(str(k), v) for k, v in failure.items()}
        return _json(record) + b"\n"

    def seal(self, count: int, digest: bytes) -> bytes:
        """Render the seal of the ``count`` lines before it."""
        record = {
            _K[Field.EVENT]: RecordKind.SEAL.value,
            _K[Field.RUN]: self.run_id,
            _K[Field.COUNT]: count,
            _K[Field.DIGEST]: digest.hex(),
        }
        return _json(record) + b"\n"


_NUMBERS: Final = b'%d,"it":%d,"t":%d}\n'
_EPOCH_OPEN: Final = b',"' + Field.EPOCH.value.encode() + b'":'


def _shape(key: RouteKey, run_id: str) -> bytes:
    """Render a route's transition record up to its counters: the same bytes every time."""
    return _route_head(key) + _json(run_id)


@cache
def _route_head(key: RouteKey) -> bytes:
    """Render a route's transition record up to the run id, which follows ``"run":``."""
    trigger, source, dest, training = key
    record = {
        Field.EVENT.value: trigger,
        Field.SOURCE.value: source,
        Field.DEST.value: dest,
        Field.TRAINING.value: training,
        Field.RUN.value: "",
    }
    return _json(record)[: -len(b'""}')]


@cache
def route_keys() -> tuple[RouteKey, ...]:
    """Every route of the table in any mode, as plain values, in a fixed order."""
    keys = (
        (trigger.value, source.value, dest.value, training)
        for (_, training), routes in table_routes().items()
        for source, by_trigger in routes.items()
        for trigger, dest in by_trigger.items()
    )
    return tuple(dict.fromkeys(keys))


# -- decoding ----------------------------------------------------------------------------


class RecordError(Exception):
    """A line that is no valid record; the message is a one-line reason."""


@attrs.frozen
class Header:
    """A decoded ``run_start`` record; ``fields`` holds everything besides the envelope."""

    run: str
    t_ns: int
    schema: int
    keyed: bool
    prev: str
    fields: dict[str, Any]


@attrs.frozen
class Transition:
    """A decoded transition record."""

    run: str
    trigger: str
    source: str
    dest: str
    training: bool
    epoch: int
    iter: int
    t_ns: int

    @property
    def key(self) -> RouteKey:
        """The route it claims to take."""
        return (self.trigger, self.source, self.dest, self.training)


@attrs.frozen
class Note:
    """A decoded note: the counters when it was written, its name and its own fields."""

    run: str
    t_ns: int
    name: str
    epoch: int
    iter: int
    training: bool
    fields: dict[str, Any]


@attrs.frozen
class Footer:
    """A decoded ``run_end`` record."""

    run: str
    t_ns: int
    status: RunStatus
    records: int
    counts: dict[str, list[int]]
    hook_ns: dict[str, list[int]]
    failure: dict[str, Any] | None


@attrs.frozen
class Seal:
    """A decoded seal: the digest of the ``count`` lines before it."""

    run: str
    count: int
    digest: bytes


Record = Header | Transition | Note | Footer | Seal

_TRIGGERS: Final = frozenset(t.value for t in Trigger)
_KINDS: Final = frozenset(k.value for k in RecordKind)
_STATES: Final = frozenset(s.value for s in State)
_STATUSES: Final = frozenset(s.value for s in _ENDED)
_HEX: Final = re.compile(r"[0-9a-f]*")


def _fail(reason: str) -> NoReturn:
    raise RecordError(reason)


def _typed(value: object) -> str:
    """Describe a received value with its JSON-ish type: ``str '4'``, or ``missing``."""
    return "missing" if value is None else f"{type(value).__name__} {shown(value)}"


def _get(record: dict[str, Any], field: Field, kind: type) -> Any:
    value = record.get(field.value)
    if type(value) is not kind:
        _fail(f"field {field.value!r} must be {kind.__name__}, got {_typed(value)}")
    return value


def _count(record: dict[str, Any], field: Field) -> int:
    value: int = _get(record, field, int)
    if value < 0:
        _fail(f"field {field.value!r} must be >= 0, got {value}")
    return value


def _parse(line: bytes) -> dict[str, Any]:
    if b"\x00" in line:
        _fail("binary data (a NUL byte): this is not a JSON-lines audit log")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        _fail("not JSON")
    if not isinstance(record, dict):
        _fail(f"a JSON {type(record).__name__}, not a record object")
    return record


def kind_of(record: Mapping[str, Any]) -> str:
    """Return a parsed record's ``ev`` if it is a trigger or a record kind; raise otherwise."""
    event = record.get(Field.EVENT.value)
    if type(event) is not str or event not in _TRIGGERS | _KINDS:
        _fail(
            f"unknown event {shown(event)}: neither a trigger of the table nor one of "
            f"{sorted(_KINDS)}"
        )
    return event


def decode(line: bytes) -> Record:
    """Parse one line (its newline optional) and check every field; raise RecordError.

    A seal must also be in the writer's exact bytes: whatever reads seals (the audit, the
    writer looking for the file's last seal) then agrees on which lines are seals.
    """
    record = _parse(line)
    event = kind_of(record)
    run: str = _get(record, Field.RUN, str)
    if event == RecordKind.SEAL:
        return _exact(_seal(record, run), line)
    t_ns = _count(record, Field.TIME_NS)
    if event == RecordKind.RUN_START:
        return _header(record, run, t_ns)
    if event == RecordKind.RUN_END:
        return _footer(record, run, t_ns)
    if event == RecordKind.NOTE:
        return _note(record, run, t_ns)
    return _transition(record, run, t_ns, event)


def _header(record: dict[str, Any], run: str, t_ns: int) -> Header:
    schema = record.get(Field.SCHEMA.value)
    if schema != SCHEMA_VERSION or type(schema) is not int:
        hint = " (per-line hashes, fsm_learner 0.1)" if schema == 1 else ""
        _fail(
            f"schema version {shown(schema)}{hint}; this audit reads version {SCHEMA_VERSION} "
            "logs only"
        )
    keyed: bool = _get(record, Field.KEYED, bool)
    prev = record.get(Field.PREV.value)
    if type(prev) is not str or not _HEX.fullmatch(prev):
        _fail(
            f"header field {Field.PREV.value!r} must be the hex digest of the seal before the "
            f"run ('' at the start of a file), got {_typed(prev)}"
        )
    fields = {k: v for k, v in record.items() if k not in _HEADER_OWN}
    return Header(run, t_ns, schema, keyed, prev, fields)


def _transition(record: dict[str, Any], run: str, t_ns: int, event: str) -> Transition:
    for field in (Field.SOURCE, Field.DEST):
        value = record.get(field.value)
        if type(value) is not str or value not in _STATES:
            states = ", ".join(sorted(_STATES))
            _fail(f"field {field.value!r} is {shown(value)}, not a state of the table ({states})")
    training = record.get(Field.TRAINING.value)
    if type(training) is not bool:
        _fail(f"field {Field.TRAINING.value!r} must be true or false, got {shown(training)}")
    return Transition(
        run,
        event,
        record[Field.SOURCE.value],
        record[Field.DEST.value],
        training,
        _count(record, Field.EPOCH),
        _count(record, Field.ITER),
        t_ns,
    )


def _note(record: dict[str, Any], run: str, t_ns: int) -> Note:
    name: str = _get(record, Field.NAME, str)
    training: bool = _get(record, Field.TRAINING, bool)
    epoch, it = _count(record, Field.EPOCH), _count(record, Field.ITER)
    fields = {k: v for k, v in record.items() if k not in _NOTE_RESERVED}
    return Note(run, t_ns, name, epoch, it, training, fields)


def _footer(record: dict[str, Any], run: str, t_ns: int) -> Footer:
    status = record.get(Field.STATUS.value)
    if type(status) is not str or status not in _STATUSES:
        _fail(f"run_end status {shown(status)}, expected one of {sorted(_STATUSES)}")
    records = _count(record, Field.RECORDS)
    counts = _per_trigger(record, Field.COUNTS)
    hook_ns = _per_trigger(record, Field.HOOK_NS)
    failure = record.get(Field.FAILURE.value)
    if failure is not None and type(failure) is not dict:
        _fail(f"field {Field.FAILURE.value!r} must be an object, got {_typed(failure)}")
    return Footer(run, t_ns, RunStatus(status), records, counts, hook_ns, failure)


def _per_trigger(record: dict[str, Any], field: Field) -> dict[str, list[int]]:
    """Return a footer's ``{trigger: [training, validation]}`` map, checked (5.0 is no 5)."""
    value = record.get(field.value)
    if type(value) is dict and all(
        name in _TRIGGERS
        and type(pair) is list
        and len(pair) == 2
        and type(pair[0]) is int
        and type(pair[1]) is int
        and pair[0] >= 0
        and pair[1] >= 0
        for name, pair in value.items()
    ):
        return value
    return _fail(
        f"run_end field {field.value!r} must map triggers to [training, validation] counts, "
        f"got {shown(value)}"
    )


def _seal(record: dict[str, Any], run: str) -> Seal:
    count = _count(record, Field.COUNT)
    digest = record.get(Field.DIGEST.value)
    if type(digest) is not str or len(digest) != 2 * DIGEST_BYTES or not _HEX.fullmatch(digest):
        _fail(
            f"seal field {Field.DIGEST.value!r} must be {2 * DIGEST_BYTES} lower-case hex "
            f"digits, got {shown(digest)}"
        )
    return Seal(run, count, bytes.fromhex(digest))


def _exact(seal: Seal, line: bytes) -> Seal:
    """Refuse a seal line in any bytes but the writer's.

    No hash covers a seal line, so its bytes are fixed instead: those ``Encoder.seal``
    renders (a newline at the end optional, as for every line ``decode`` reads).
    """
    written = Encoder(seal.run).seal(seal.count, seal.digest)
    if line != written and line != written[:-1]:
        _fail(
            "a seal not in the writer's exact form (its fields reordered, respaced, added to "
            "or repeated)"
        )
    return seal


# -- seal lines ---------------------------------------------------------------------------

SEAL_START: Final = _json({Field.EVENT.value: RecordKind.SEAL.value})[:-1] + b","
"""How every seal line the writer writes begins."""


def is_seal_line(line: bytes) -> bool:
    """Say whether a line is a seal as the writer writes it (``decode`` tells for sure)."""
    return line.startswith(SEAL_START)


# -- bulk decoding of a run's transition lines -------------------------------------------

_RUN_OPEN: Final = b',"' + Field.RUN.value.encode() + b'":'
_DIGITS: Final = rb"[0-9]{1,19}+"
"""A number as the writer writes it, at most 19 digits: orjson reads longer ones as floats."""
_NUMBER_LINE: Final = re.escape(_NUMBERS[:-1]).replace(b"%d", _DIGITS)
_NUMBER_LINES: Final = re.compile(b"(?:" + _NUMBER_LINE + b"\n)*+" + _NUMBER_LINE)
"""The numbers of the writer's transition lines, joined by newlines."""
_NUMBER_GLUE: Final = bytes(sorted(set(_NUMBERS.replace(b"%d", b""))))
_NUMBERS_AS_JSON: Final = bytes.maketrans(
    _NUMBER_GLUE,
    bytes(b if b == ord(",") else ord(",") if b == ord("\n") else 32 for b in _NUMBER_GLUE),
)
"""Turns the writer's number lines into one JSON array: glue to blanks, line ends to commas."""


@cache
def _route_prefixes() -> dict[bytes, int]:
    """Each route's record prefix up to its run field, mapped to its index in route_keys()."""
    run_field = len(_RUN_OPEN) + len(_json(""))
    return {_shape(key, "")[:-run_field]: index for index, key in enumerate(route_keys())}


@attrs.frozen
class Transitions:
    """Consecutive transition lines of one run, read in bulk: what ``decode`` reads in them.

    ``routes[i]`` is the index in ``route_keys()`` of line i's route; ``numbers`` holds
    the epoch, batch index and time of each line in turn (``numbers[2::3]``: the times).
    """

    routes: bytes
    numbers: list[int]


class TransitionReader:
    """Reads a run's transition lines in bulk, when they are all as the writer writes them.

    Every such line is a route's prefix, the run's *cut* (``,"run":"<id>","ep":``) and
    the numbers. ``read`` replaces each cut with an empty line and splits once: the
    pieces must come in threes (a prefix of the table, a piece, numbers the writer's
    way), and the length the replacement saved must count exactly one cut per line.
    Prefixes and numbers are never empty, so the cuts' empty pieces are the middle ones,
    and no line can be anything but a transition of this run. Anything else (a note, a
    header, another run's record, a record in other bytes) makes ``read`` return None:
    ``decode`` those lines one by one. Both readings agree (a property test checks it).
    """

    def __init__(self, run_id: str) -> None:
        """Read the transition lines of the run ``run_id``."""
        self.cut = _RUN_OPEN + _json(run_id) + _EPOCH_OPEN
        self._saved = len(self.cut) - 2

    def read(self, data: bytes) -> Transitions | None:
        """Read ``data``, whole lines each ending in a newline; None unless all are transitions."""
        if not data:
            return Transitions(b"", [])
        split = data.replace(self.cut, b"\n\n")
        pieces = split.split(b"\n")
        lines = len(pieces) // 3
        if (
            len(pieces) != 3 * lines + 1
            or pieces[-1]
            or len(data) - len(split) != lines * self._saved
        ):
            return None
        try:
            routes = bytes(map(_route_prefixes().__getitem__, pieces[0:-1:3]))
        except KeyError:
            return None
        numbers = b"\n".join(pieces[2::3])
        if _NUMBER_LINES.fullmatch(numbers) is None:
            return None
        try:  # 19 digits at most, no sign: only a leading zero can make this fail
            values = orjson.loads(b"[" + numbers.translate(_NUMBERS_AS_JSON) + b"]")
        except orjson.JSONDecodeError:
            return None
        return Transitions(routes, values)
