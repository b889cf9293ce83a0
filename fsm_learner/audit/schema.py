"""The audit log's record schema and its hash chain, shared by the writer and the reader.

A log is JSON lines. Each run is a ``run_start`` header, then one record per transition
(and any ``note`` records callbacks add), then a ``run_end`` footer. Every record carries
the run id, its position ``seq`` in the run (0 for the header), the time since the run
started in ns, and ``h``: a BLAKE2b hash chained from the previous record's, so editing,
deleting, inserting or reordering records breaks the chain. With a key, the chain is a
keyed BLAKE2b (a MAC): without the key nobody can recompute it.

``h`` is always the last field of a line, and what is hashed is the line's exact bytes
before it (the record's JSON without its closing brace, up to ``,"h":"``): the reader
never re-serialises what it checks.
"""

from __future__ import annotations

import binascii
import hashlib
import os
from typing import Final

from fsm_learner._compat import StrEnum

__all__ = [
    "HASH_BYTES",
    "KEY_ENV",
    "MAX_LINE_BYTES",
    "PREV_FIELD",
    "SCHEMA_VERSION",
    "Chain",
    "Field",
    "RecordKind",
    "RunStatus",
    "chain_hash",
    "derive_key",
    "seal",
    "unseal",
]

SCHEMA_VERSION: Final = 1
HASH_BYTES: Final = 8
"""Digest size of the chain: 64 bits, 16 hex characters per record."""
KEY_ENV: Final = "FSM_LEARNER_AUDIT_KEY"
"""Environment variable holding the chain key, for the learner and for the audit alike."""
MAX_LINE_BYTES: Final = 1 << 20
"""The longest line a log may hold (newline included): the writer refuses a longer record
(a note, say) and the reader calls a longer line malformed without holding it in memory."""
PREV_FIELD: Final = "prev"
"""Header field binding a run to what came before it in its file: the ``h`` of the last
line before the header that carries a well-formed seal, or "" when there is none."""


class Field(StrEnum):
    """The fields every record has (short, to keep a transition record near 130 bytes)."""

    RUN = "run"
    SEQ = "seq"
    TIME_NS = "t"
    EVENT = "ev"
    HASH = "h"
    # transition records also have:
    SOURCE = "src"
    DEST = "dst"
    EPOCH = "ep"
    ITER = "it"
    TRAINING = "tr"
    RANK = "rk"


class RecordKind(StrEnum):
    """Values of ``ev`` that are not triggers."""

    RUN_START = "run_start"
    NOTE = "note"
    RUN_END = "run_end"


class RunStatus(StrEnum):
    """How a run ended, as its footer says (``truncated`` is the audit's word for no footer)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    TRUNCATED = "truncated"


def derive_key(material: bytes | str | None) -> bytes | None:
    """Turn key material of any length into a 32-byte BLAKE2b key (None: no key).

    ``None`` falls back to the ``FSM_LEARNER_AUDIT_KEY`` environment variable; an empty
    value means no key.
    """
    if material is None:
        material = os.environ.get(KEY_ENV) or None
    if material is None or material in {"", b""}:
        return None
    raw = material.encode() if isinstance(material, str) else bytes(material)
    return hashlib.blake2b(raw, digest_size=32, person=b"fsm-learner-key").digest()


def chain_hash(prev: bytes, body: bytes, key: bytes | None) -> bytes:
    """Return the hash of ``body`` chained from ``prev`` (the previous record's hash)."""
    return hashlib.blake2b(prev + body, digest_size=HASH_BYTES, key=key or b"").digest()


class Chain:
    """The running hash chain of one run, as the writer extends it and the reader checks it.

    Equal to folding ``chain_hash`` over the bodies (a test checks it); copying a primed
    BLAKE2b state is cheaper than keying a new one for every record.
    """

    def __init__(self, key: bytes | None) -> None:
        """Start an empty chain, keyed when ``key`` is given."""
        self._base = hashlib.blake2b(digest_size=HASH_BYTES, key=key or b"")
        self.head = b""

    def digest(self, body: bytes) -> bytes:
        """Return what the chain's next hash would be after ``body`` (no change)."""
        hasher = self._base.copy()
        hasher.update(self.head + body)
        return hasher.digest()

    def seal_all(self, bodies: list[bytes]) -> bytes:
        """Extend the chain by each body and return the sealed lines (``seal``, looped tight)."""
        base, head, out = self._base, self.head, []
        for body in bodies:
            hasher = base.copy()
            hasher.update(head + body)
            head = hasher.digest()
            out.append(seal(body, head))
        self.head = head
        return b"".join(out)


_SEAL_OPEN: Final = b',"h":"'
_SEAL_LEN: Final = len(_SEAL_OPEN) + 2 * HASH_BYTES + len(b'"}')


def seal(body: bytes, digest: bytes) -> bytes:
    """Close an open JSON object (no final brace) with the hash field, and end the line."""
    return body + _SEAL_OPEN + binascii.hexlify(digest) + b'"}\n'


def unseal(line: bytes) -> tuple[bytes, bytes] | None:
    """Split a sealed line into (the bytes that were hashed, the digest); None if malformed.

    The hashed bytes are the record's JSON without its closing brace: add ``b"}"`` to parse.
    """
    line = line.removesuffix(b"\n")  # only LF: the writer's bytes exactly, no CR
    if len(line) <= _SEAL_LEN or not line.endswith(b'"}'):
        return None
    head, tail = line[:-_SEAL_LEN], line[-_SEAL_LEN:]
    hexdigest = tail[len(_SEAL_OPEN) : -2]
    if not tail.startswith(_SEAL_OPEN) or hexdigest.strip(b"0123456789abcdef"):
        return None  # lower-case hex only, as the writer writes it
    return head, binascii.unhexlify(hexdigest)
