"""Audit logs built record by record and sealed with the schema's own chain, for reader tests.

A tiny run is a header, ``begin_fit``, ``end_fit`` and a footer: four lines that verify.
Runs built one after another in a file bind to it as the writer binds them: each header's
``prev`` is the hash of the last line before it.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from fsm_learner.audit.schema import PREV_FIELD, SCHEMA_VERSION, Chain
from fsm_learner.machine import table_digest


def body(record: dict) -> bytes:
    """A record as the bytes the chain hashes: its JSON without the closing brace."""
    return orjson.dumps(record)[:-1]


def run_bodies(
    run_id: str,
    *,
    prev: str = "",
    rank: int = 0,
    keyed: bool = False,
    header: dict | None = None,
    failure: dict | None = None,
) -> list[bytes]:
    """The bodies of a tiny run; ``failure`` makes it end failed in ``fit``."""
    start = {"run": run_id, "seq": 0, "t": 0, "ev": "run_start", "schema": SCHEMA_VERSION}
    start |= {"keyed": keyed, "table": table_digest(), "rank": rank, PREV_FIELD: prev}
    start |= header or {}
    common = {"ep": 0, "it": 0, "tr": False, "rk": rank}
    last = ("fail", "fit", "idle") if failure else ("end_fit", "fit", "idle")
    footer = {"run": run_id, "seq": 3, "t": 30, "ev": "run_end"}
    footer |= {"status": "failed" if failure else "completed", "records": 3}
    footer |= {"counts": {"begin_fit": [0, 1], last[0]: [0, 1]}}
    if failure:
        footer["failure"] = failure
    begin = {"run": run_id, "seq": 1, "t": 10, "ev": "begin_fit", "src": "idle", "dst": "fit"}
    end = {"run": run_id, "seq": 2, "t": 20, "ev": last[0], "src": last[1], "dst": last[2]}
    return [body(start), body(begin | common), body(end | common), body(footer)]


def seal_run(bodies: list[bytes], key: bytes | None = None) -> tuple[bytes, str]:
    """Seal a run's bodies: its lines, and its head (the last hash, hex)."""
    chain = Chain(key)
    data = chain.seal_all(bodies)
    return data, chain.head.hex()


def tiny_run(run_id: str, *, prev: str = "", **kwargs) -> tuple[bytes, str]:
    """A tiny run's lines and head."""
    return seal_run(run_bodies(run_id, prev=prev, **kwargs))


def runs_file(path: Path, run_ids: list[str], *, prev: str = "") -> list[str]:
    """Write runs bound one to the next, as the writer appends them; return their heads."""
    heads, chunks = [], []
    for run_id in run_ids:
        data, prev = tiny_run(run_id, prev=prev)
        chunks.append(data)
        heads.append(prev)
    path.write_bytes(b"".join(chunks))
    return heads


def lines(path: Path) -> list[bytes]:
    """A file's lines, each with its newline."""
    return path.read_bytes().splitlines(keepends=True)
