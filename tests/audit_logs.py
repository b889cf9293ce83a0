"""Audit logs built with the codec and sealed as the writer seals them, for reader tests.

A tiny run is one block: a header, ``begin_fit``, ``end_fit`` (or ``fail``) and a footer,
then its seal: five lines. Runs built one after another in a file bind to it as the
writer binds them: each header's ``prev`` is the digest of the last seal before it, and
each block is sealed over its run's previous seal, the file's last seal before it and its
lines (``SealChain``). ``training_run`` builds a longer run (one training pass, then
validation) in blocks, ``inference_blocks`` a validate or predict run; ``SharedFile`` appends
blocks of several runs in any order.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from fsm_learner.audit.codec import (
    Encoder,
    Field,
    RunStatus,
    SealChain,
)
from fsm_learner.machine import table_digest

BATCH = [
    ("begin_batch", "epoch", "batch"),
    ("predict", "batch", "predict"),
    ("compute_loss", "predict", "loss"),
    ("backward", "loss", "backward"),
    ("step", "backward", "step"),
    ("end_batch", "step", "epoch"),
]
VALID_BATCH = [*BATCH[:3], ("end_batch", "loss", "epoch")]
PREDICT_BATCH = [*BATCH[:2], ("end_batch", "predict", "epoch")]


def transitions_of(run_id: str) -> Encoder:
    """An encoder of the run's transition lines, as the writer writes them."""
    return Encoder(run_id)


def header_line(
    encoder: Encoder,
    *,
    prev: str = "",
    rank: int = 0,
    keyed: bool = False,
    header: dict | None = None,
) -> bytes:
    fields = {Field.TABLE: table_digest(), Field.RANK: rank, Field.N_EPOCHS: 1}
    fields |= header or {}
    return encoder.header(fields, keyed=keyed, prev=bytes.fromhex(prev))


def run_lines(
    run_id: str,
    *,
    prev: str = "",
    rank: int = 0,
    keyed: bool = False,
    header: dict | None = None,
    failure: dict | None = None,
    hook_ns: dict | None = None,
) -> list[bytes]:
    """The lines of a tiny run (no seal); ``failure`` makes it end failed in ``fit``."""
    enc = Encoder(run_id)
    last = "fail" if failure else "end_fit"
    footer = enc.footer(
        t_ns=30,
        status=RunStatus.FAILED if failure else RunStatus.COMPLETED,
        records=3,
        counts={"begin_fit": [0, 1], last: [0, 1]},
        hook_ns=hook_ns or {},
        failure=failure,
    )
    return [
        header_line(enc, prev=prev, rank=rank, keyed=keyed, header=header),
        transitions_of(run_id).transition(("begin_fit", "idle", "fit", False), 0, 0, 10),
        transitions_of(run_id).transition((last, "fit", "idle", False), 0, 0, 20),
        footer,
    ]


def seal_blocks(
    run_id: str,
    blocks: list[list[bytes]],
    key: bytes | None = None,
    head: bytes = b"",
    before: bytes | None = None,
) -> tuple[list[bytes], bytes]:
    """Seal blocks following one another in a file, as the writer does; return them and the head.

    ``head`` is the run's last seal, ``before`` the file's last seal before the first
    block (by default ``head``: the run's own seal ends the file so far).
    """
    enc, chain = Encoder(run_id), SealChain(key)
    before = head if before is None else before
    sealed = []
    for block in blocks:
        head = before = chain.digest(head, before, b"".join(block))
        sealed.append(b"".join(block) + enc.seal(len(block), head))
    return sealed, head


class SharedFile:
    """A log that writers of several runs append blocks to, sealed as each writer seals them."""

    def __init__(self, key: bytes | None = None) -> None:
        self.chain = SealChain(key)
        self.heads: dict[str, bytes] = {}
        self.before = b""
        self.data = bytearray()

    @property
    def prev(self) -> str:
        """The last seal in the file (hex): what a header written now binds to."""
        return self.before.hex()

    def append(self, run_id: str, block: list[bytes]) -> bytes:
        """Seal ``block`` (lines of ``run_id``) after the file so far, append it, return it."""
        head = self.chain.digest(self.heads.get(run_id, b""), self.before, b"".join(block))
        self.heads[run_id] = self.before = head
        sealed = b"".join(block) + Encoder(run_id).seal(len(block), head)
        self.data += sealed
        return sealed


def tiny_run(
    run_id: str, *, prev: str = "", key: bytes | None = None, **kwargs
) -> tuple[bytes, str]:
    """A tiny run's bytes (one sealed block after the seal ``prev``) and its head (hex)."""
    lines_ = run_lines(run_id, prev=prev, keyed=key is not None, **kwargs)
    [data], head = seal_blocks(run_id, [lines_], key, before=bytes.fromhex(prev))
    return data, head.hex()


def runs_file(path: Path, run_ids: list[str], *, prev: str = "") -> list[str]:
    """Write tiny runs bound one to the next, as the writer appends them; return their heads."""
    heads, chunks = [], []
    for run_id in run_ids:
        data, prev = tiny_run(run_id, prev=prev)
        chunks.append(data)
        heads.append(prev)
    path.write_bytes(b"".join(chunks))
    return heads


def training_blocks(
    run_id: str,
    batches: int,
    *,
    valid: int = 0,
    prev: str = "",
    block: int = 8192,
    start_ns: int = 0,
    step_ns: int = 1000,
) -> list[list[bytes]]:
    """A run of one epoch (``batches`` training, ``valid`` validation), in blocks of records."""
    enc, moves = Encoder(run_id), transitions_of(run_id)
    lines = [header_line(enc, prev=prev)]
    t = start_ns
    counts: dict[str, list[int]] = {}

    def add(trigger: str, source: str, dest: str, training: bool, it: int = 0) -> None:
        nonlocal t
        t += step_ns
        lines.append(moves.transition((trigger, source, dest, training), 0, it, t))
        counts.setdefault(trigger, [0, 0])[0 if training else 1] += 1

    add("begin_fit", "idle", "fit", True)
    for training, n, path in ((True, batches, BATCH), (False, valid, VALID_BATCH)):
        if training or n:
            add("begin_epoch", "fit", "epoch", training)
            for it in range(n):
                for trigger, source, dest in path:
                    add(trigger, source, dest, training, it)
            add("end_epoch", "epoch", "fit", training)
    add("end_fit", "fit", "idle", False)
    lines.append(
        enc.footer(
            t_ns=t + step_ns,
            status=RunStatus.COMPLETED,
            records=len(lines),
            counts=counts,
            hook_ns={},
        )
    )
    return [lines[i : i + block] for i in range(0, len(lines), block)]


def inference_blocks(
    run_id: str, kind: str, batches: int, *, step_ns: int = 1000, hook_ns: dict | None = None
) -> list[list[bytes]]:
    """A validate or predict run of ``batches`` batches, as one block of records."""
    enc, moves = Encoder(run_id), transitions_of(run_id)
    lines = [header_line(enc, header={Field.KIND: kind, Field.N_EPOCHS: 0})]
    path = VALID_BATCH if kind == "validate" else PREDICT_BATCH
    counts: dict[str, list[int]] = {}
    t = 0

    def add(trigger: str, source: str, dest: str, it: int = 0) -> None:
        nonlocal t
        t += step_ns
        lines.append(moves.transition((trigger, source, dest, False), 0, it, t))
        counts.setdefault(trigger, [0, 0])[1] += 1

    add("begin_epoch", "idle", "epoch")
    for it in range(batches):
        for trigger, source, dest in path:
            add(trigger, source, dest, it)
    add("end_epoch", "epoch", "idle")
    footer = enc.footer(
        t_ns=t + step_ns,
        status=RunStatus.COMPLETED,
        records=len(lines),
        counts=counts,
        hook_ns=hook_ns or {},
    )
    return [[*lines, footer]]


def training_run(run_id: str, batches: int, **kwargs) -> tuple[bytes, str]:
    """A longer run's bytes, sealed in blocks (after the seal ``prev``), and its head (hex)."""
    before = bytes.fromhex(kwargs.get("prev", ""))
    sealed, head = seal_blocks(run_id, training_blocks(run_id, batches, **kwargs), before=before)
    return b"".join(sealed), head.hex()


def lines(path: Path) -> list[bytes]:
    """A file's lines, each with its newline."""
    return path.read_bytes().splitlines(keepends=True)


def spaced(line: bytes) -> bytes:
    """The same record in other bytes: JSON with spaces after its commas and colons."""
    return json.dumps(orjson.loads(line), separators=(", ", ": ")).encode() + b"\n"


def sealed_run(line: bytes) -> str | None:
    """The run of a line that reads as a seal, in whatever bytes; None for any other line."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:  # an edited line is no seal
        return None
    if not isinstance(record, dict) or record.get(Field.EVENT.value) != "seal":
        return None
    run = record.get(Field.RUN.value)
    return run if isinstance(run, str) else None


def reseal(data: bytes, key: bytes | None = None) -> bytes:
    """Recompute every seal of a log, as a forger without the key (or with it) would.

    Each line that reads as a seal (in any bytes) is written again in the writer's
    bytes, keeping its run: its count and digest become those of the lines before it,
    chained per run and bound to the seal before them, as the writer binds them.
    """
    file = SharedFile(key)
    out, block = [], []
    for line in data.splitlines(keepends=True):
        run = sealed_run(line)
        if run is None:
            block.append(line)
            continue
        out.append(file.append(run, block))
        block = []
    return b"".join(out + block)
