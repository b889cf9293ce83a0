"""Lineages of resumed fits: each resumed run checked against the run it resumes, and as a whole.

A fit resumed from a checkpoint is a run of its own whose header's ``resumed_from`` names
the run the checkpoint was taken in, that run's record count R and chain head H at the
checkpoint (its seal after its R-th record), the checkpoint file's SHA-256 and where the
resume re-enters the fit (``at``: the pass, and how many of its batches were begun). The
learner seals (H, after R records), writes each checkpoint file, notes each one (a
``resume_point`` note per file, consecutive, with the same R, H, SHA-256 and position) and
seals again: only a run killed in between, its verified log ending at R, has no note.

Runs so linked form a lineage, root -> ... -> leaf. When one run is resumed twice the links
form a tree; each root-to-leaf path is then a lineage of its own (a history that could have
happened), checked and reported on its own. ``Lineages`` takes every audited run's report
(``add``) and keeps the resumed ones; ``check`` then audits the files again for the runs
they resume, reads again the files that hold linked runs, only those runs' lines up to
their last verified seal, and returns one ``LineageReport`` per leaf. A link verifies when

- the resumed run's header is in a block that verifies (else its link is not its own);
- H is a verified seal of the run it names, after exactly R of that run's records, and
  not the seal that follows its notes of a checkpoint;
- when that run's verified records go on after R, they go on with its ``resume_point``
  notes of (H, R), one of which names the same checkpoint file (SHA-256) and position
  (no note there: no checkpoint was taken there); when they end at R, the file is
  unconfirmed, a note, no failure;
- ``at`` is where that run was after R records: in the pass (ep, tr) with ``it`` batches
  begun (the last one ``it - 1``), or between two passes with (ep, tr) the next (``it``
  0); the machine in ``epoch`` or ``fit``, where checkpoints are taken;

and a lineage when its links do and, taking the root's passes up to the first link's R,
each resumed run's up to the next link's R (the leaf's to its end), the passes come in
order from epoch 0's training pass, each begins its batches 0, 1, ... once each, and a
completed leaf ends after the last epoch's validation pass. Every run of the lineage must
verify on its own, but for a killed run whose only problem is that it was killed.

A pass cancelled (``cancel_epoch``) ends after the batches it began: those are checked
once each like any other, and the lineage names the pass, whose later batches never ran;
it does not claim "every batch of every pass". Such a lineage is still ``complete``:
complete says the lineage is the whole history of one fit, from its beginning to its end
and with no gap or repeat in what it began, as an unresumed fit that cancelled a pass
completes; ``cancelled`` says which batches that fit never ran. A run whose parent's log was
not given is no failure: its lineage starts there and is checked from ``at`` on. The
batches a link redoes are those its parent began after R (between the checkpoint and its
end), as far as they were sealed; lines never sealed are counted, not read.

A run that was killed (truncated, every sealed block verifying) and is resumed, in a
lineage that verifies (so every one of its runs verifies, but for such deaths), is
accounted for: its ``LineageRun`` names the run that continued it (``continued_by``), and
the command does not count it among the runs that fail.

Memory: nothing per audited run unless it is linked; one small entry per resumed run and
per run resumed; per linked run, its passes as ranges of batch indices (one per pass,
split at its links' R), never its records. With no resumed run, no second reading; the
second reading looks each line up by its run id, whatever the number of runs linked.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson

from fsm_learner._display import shown
from fsm_learner.audit.codec import (
    Field,
    Footer,
    Note,
    Record,
    RecordError,
    RunStatus,
    Seal,
    Transition,
    decode,
)
from fsm_learner.audit.files import NotRegularError, Overlong, Unreadable, open_log, read_chunks
from fsm_learner.audit.replay import FileAudit, Problem
from fsm_learner.machine import RunKind, State, Trigger

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence
    from pathlib import Path

    from fsm_learner.audit.replay import RunReport

__all__ = [
    "RESUME_POINT",
    "BatchRange",
    "LineageReport",
    "LineageRun",
    "Lineages",
    "LinkReport",
    "PassPosition",
    "RunKey",
    "run_key",
    "was_killed",
]

RESUME_POINT: Final = "resume_point"
"""The note a run writes after each checkpoint it can be resumed from."""
_AT_BOUNDARY: Final = frozenset({State.EPOCH.value, State.FIT.value})
"""The states a checkpoint is taken in: between two batches, or between two passes."""
_DIGEST: Final = re.compile(r"[0-9a-f]{32}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_RUN_FIELD: Final = re.compile(rb'"run"\s*:\s*("(?:[^"\\]|\\.)*")')
"""A ``"run"`` field and its value, a JSON string (its escapes as they are)."""
_ID_SHOWN: Final = 40
_CANCELLED_KEPT: Final = 5
"""How many cancelled passes a lineage names (it counts them all)."""
_KILLED: Final = "truncated (a killed run?)"
"""How the replay's problem for a run with no footer, all its sealed blocks verifying, begins."""

Pass = tuple[int, bool]
"""A pass of a fit: (epoch, training)."""


def _pass_word(training: bool) -> str:
    return "train" if training else "valid"


def _pass_name(key: Pass) -> str:
    return f"epoch {key[0]} {_pass_word(key[1])} pass"


def _next_pass(key: Pass) -> Pass:
    epoch, training = key
    return (epoch, False) if training else (epoch + 1, True)


def _order(key: Pass) -> tuple[int, int]:
    """Sort passes as a fit runs them: each epoch's training pass, then its validation pass."""
    return key[0], 0 if key[1] else 1


def _run(run_id: str) -> str:
    return f"run {shown(run_id, _ID_SHOWN)}"


# -- what a lineage report holds -------------------------------------------------------------


@attrs.frozen
class PassPosition:
    """A place in a fit: a pass, and how many of its batches were begun (``it``)."""

    epoch: int
    training: bool
    it: int = 0

    @property
    def pass_key(self) -> Pass:
        """The pass, as (epoch, training)."""
        return self.epoch, self.training

    def __str__(self) -> str:
        """Say where it is: at a pass's start, or after one of its batches."""
        if not self.it:
            return f"the start of {_pass_name(self.pass_key)}"
        return f"{_pass_name(self.pass_key)} after batch {self.it - 1}"

    def to_json(self) -> dict[str, Any]:
        """As the log writes it: ``{"ep", "tr", "it"}``."""
        return {"ep": self.epoch, "tr": self.training, "it": self.it}


@attrs.frozen
class BatchRange:
    """Consecutive batches of one pass: ``first`` to ``last``, both included."""

    epoch: int
    training: bool
    first: int
    last: int

    @property
    def count(self) -> int:
        """How many batches."""
        return self.last - self.first + 1

    def __str__(self) -> str:
        """Say ``epoch 1 train batches 12-17`` (``batch 12`` for one)."""
        batches = f"batch {self.first}" if self.count == 1 else f"batches {self.first}-{self.last}"
        return f"epoch {self.epoch} {_pass_word(self.training)} {batches}"

    def to_json(self) -> dict[str, Any]:
        """As data: epoch, pass ("train" or "valid"), first and last batch index."""
        return {
            "epoch": self.epoch,
            "pass": _pass_word(self.training),
            "first": self.first,
            "last": self.last,
        }


@attrs.frozen
class LineageRun:
    """A run of a lineage: its id, its file (printable) and how it ended."""

    run_id: str
    path: str
    status: RunStatus
    rank: int | None = None
    continued_by: str | None = None
    """The run that resumed it, when it was killed and the lineage verifies: its death is
    accounted for."""


@attrs.frozen
class LinkReport:
    """A resumed run's link to the run it resumes, and the batches it redoes."""

    run_id: str
    resumes: str
    records: int
    head: str
    sha256: str
    at: PassPosition
    checkpoint: str
    """``confirmed`` (the parent noted this file), ``unconfirmed`` (the parent's verified
    log ends at the seal: it died before noting it), ``missing`` (the parent went on without
    noting a checkpoint there), ``mismatch`` (it noted another file or position),
    ``unchecked`` (the link broke first)."""
    redone: tuple[BatchRange, ...] = ()
    """The batches the parent began after the checkpoint (as far as they were sealed)."""
    unsealed: int = 0
    """Lines of the parent after its last seal, never sealed (not read)."""

    def to_json(self) -> dict[str, Any]:
        """Everything the summary shows of the link, as JSON-able data."""
        return {
            "run_id": self.run_id,
            "resumes": self.resumes,
            "records": self.records,
            "head": self.head,
            "sha256": self.sha256,
            "at": self.at.to_json(),
            "checkpoint": self.checkpoint,
            "redone": [batches.to_json() for batches in self.redone],
            "unsealed": self.unsealed,
        }


@attrs.define
class LineageReport:
    """What the audit found in one lineage, root first."""

    runs: list[LineageRun] = attrs.Factory(list)
    links: list[LinkReport] = attrs.Factory(list)
    problems: list[Problem] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    missing_parent: str | None = None
    """The run the root resumes, when its log was not given."""
    unverified: int = 0
    """How many of its runs do not verify on their own (a killed run's death aside)."""
    coverage: str = ""
    """One sentence: whether the lineage began every batch of every pass exactly once."""
    cancelled: list[PassPosition] = attrs.Factory(list)
    """The first passes cancelled (``cancel_epoch``), each with the batches it began."""
    cancelled_passes: int = 0
    """How many passes were cancelled: their later batches never ran."""
    complete: bool = False
    batches: int = 0
    passes: int = 0

    @property
    def verified(self) -> bool:
        """True when every link and the batches of the lineage check out."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """Everything the summary shows, as JSON-able data."""
        return {
            "runs": [
                {
                    "run_id": run.run_id,
                    "path": run.path,
                    "status": run.status.value,
                    "rank": run.rank,
                    "continued_by": run.continued_by,
                }
                for run in self.runs
            ],
            "links": [link.to_json() for link in self.links],
            "missing_parent": self.missing_parent,
            "coverage": self.coverage,
            "complete": self.complete,
            "cancelled": [at.to_json() for at in self.cancelled],
            "cancelled_passes": self.cancelled_passes,
            "batches": self.batches,
            "passes": self.passes,
            "notes": self.notes,
            "problems": [str(problem) for problem in self.problems],
            "verified": self.verified,
        }


# -- what the first reading keeps --------------------------------------------------------------


@attrs.frozen
class _Link:
    """A header's ``resumed_from``, checked."""

    parent: str
    records: int
    head: str
    sha256: str
    at: PassPosition
    logless: bool = False
    """The resumed run wrote no audit log (``records`` and ``head`` null): nothing to check."""


def _position(value: object) -> PassPosition | None:
    if type(value) is not dict:
        return None
    epoch, training, it = value.get("ep"), value.get("tr"), value.get("it")
    if type(epoch) is not int or type(training) is not bool or type(it) is not int:
        return None
    return PassPosition(epoch, training, it) if epoch >= 0 and it >= 0 else None


def _link(value: object) -> _Link | str:  # noqa: PLR0911 (a reason per field)
    """Read a header's ``resumed_from``; a one-line reason when it is malformed."""
    if not isinstance(value, dict):
        return f"header field 'resumed_from' must be an object, got {shown(value)}"
    run, records, head, sha = (value.get(k) for k in ("run", "records", "head", "sha256"))
    at = _position(value.get("at"))
    if not isinstance(run, str) or not run:
        return _malformed("run", run)
    if records is None and head is None and isinstance(sha, str) and _SHA256.fullmatch(sha):
        return _malformed("at", value.get("at")) if at is None else _Link(run, 0, "", sha, at, True)
    if type(records) is not int or records < 1:
        return _malformed("records", records)
    if not isinstance(head, str) or not _DIGEST.fullmatch(head):
        return _malformed("head", head)
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        return _malformed("sha256", sha)
    if at is None:
        return _malformed("at", value.get("at"))
    return _Link(run, records, head, sha, at)


def _malformed(name: str, value: object) -> str:
    return f"header field 'resumed_from' has no valid {name!r} (got {shown(value, 80)})"


@attrs.frozen
class _Seen:
    """What the audit keeps of a linked fit: where it is, how far it verifies, how it ended."""

    file: int
    first_line: int
    limit: int
    """Its last verified line: its seals up to there verify, and the records they seal."""
    status: RunStatus
    unsealed: int
    killed: bool
    """Its only problem is that it was killed: no footer, every sealed block verifying."""
    fails: bool
    """It does not verify, and not only because it was killed: no lineage may rest on it."""

    @property
    def header_verified(self) -> bool:
        """Whether its header is in a block that verifies: only then is its link its own."""
        return self.limit >= self.first_line


def _verified_to(report: RunReport) -> int:
    """Return the last line of the run that verifies (0: none).

    The replay's chain head is the last seal whose block matched; a problem inside that
    block (a record the table refuses) leaves only the seals before the problem.
    """
    limit, problem = report.head_line, report.problem
    if problem is not None and problem.line < limit:
        return problem.line - 1
    return limit


@attrs.frozen
class _Resumed:
    """A run whose header names the run it resumes."""

    link: _Link | str
    n_epochs: int | None


RunKey = tuple[int | None, str]
"""(rank, run id): the ranks of a distributed fit share its id, one log each."""


def run_key(report: RunReport) -> RunKey:
    """Return the run's (rank, run id)."""
    rank = report.header.get(Field.RANK.value)
    return rank if type(rank) is int else None, report.run_id


def was_killed(report: RunReport) -> bool:
    """Say whether the run's only problem is that it was killed: a lineage may account for it."""
    problem = report.problem
    return (
        report.status is RunStatus.TRUNCATED
        and problem is not None
        and problem.reason.startswith(_KILLED)
    )


class Lineages:
    """The resumed fits among the audited runs, and the runs they resume.

    ``add`` every run's report as the replay yields it, then ``check`` once with the same
    files: when a run resumes another, they are audited again for the runs resumed.
    """

    def __init__(self, *, key: bytes | None = None) -> None:
        """Start with no run; ``key`` checks keyed chains when the files are audited again."""
        self._key = key
        self._files: dict[Path, int] = {}
        self._paths: list[Path] = []
        self._names: list[str] = []
        self._seen: dict[RunKey, _Seen] = {}
        self._resumed: dict[RunKey, _Resumed] = {}

    def add(self, report: RunReport, path: Path) -> None:
        """Keep a resumed fit: its place, how far it verifies and the run it resumes."""
        resumed_from = report.header.get(Field.RESUMED_FROM.value)
        if resumed_from is None or report.kind is not RunKind.FIT or not report.run_id:
            return
        key = run_key(report)
        if key in self._resumed:
            return  # a run audited twice: the runs taken together already fail
        n_epochs = report.header.get(Field.N_EPOCHS.value)
        n_epochs = n_epochs if type(n_epochs) is int else None
        self._seen[key] = self._seen_of(report, path)
        self._resumed[key] = _Resumed(_link(resumed_from), n_epochs)

    def _seen_of(self, report: RunReport, path: Path) -> _Seen:
        return _Seen(
            self._file(path, report.path),
            report.first_line,
            _verified_to(report),
            report.status,
            report.unsealed,
            was_killed(report),
            not report.verified and not was_killed(report),
        )

    def _file(self, path: Path, name: str) -> int:
        index = self._files.get(path)
        if index is None:
            index = self._files[path] = len(self._paths)
            self._paths.append(path)
            self._names.append(name)
        return index

    def check(self, files: Sequence[Path]) -> list[LineageReport]:
        """Check every lineage; one report per leaf, in the order the leaves were audited.

        ``files`` are the files audited: read again for the runs resumed, if any.
        """
        if not self._resumed:
            return []
        self._find_parents(files)
        nodes = self._graph()
        errors = self._read(nodes.values())
        return [self._report(path, errors) for path in _paths(nodes)]

    def _find_parents(self, files: Sequence[Path]) -> None:
        """Audit the files again; keep the runs resumed (the first of each key, and how many)."""
        wanted = {
            (key[0], resumed.link.parent): 0
            for key, resumed in self._resumed.items()
            if not isinstance(resumed.link, str) and not resumed.link.logless
        }
        for path in files:
            for report in FileAudit(path, key=self._key):
                key = run_key(report)
                if key not in wanted or report.kind is not RunKind.FIT:
                    continue
                wanted[key] += 1
                if key not in self._seen:
                    self._seen[key] = self._seen_of(report, path)
        for key, times in wanted.items():
            seen = self._seen.get(key)
            if times > 1 and seen is not None and seen.killed:
                # a run twice among the files: neither death is accounted for
                self._seen[key] = attrs.evolve(seen, killed=False)

    def _graph(self) -> dict[RunKey, _Node]:
        """Link each resumed run to the run it names, when that run was audited."""
        nodes: dict[RunKey, _Node] = {}
        for key, resumed in self._resumed.items():
            node = nodes.setdefault(key, _Node(key, self._seen[key]))
            node.resumed = resumed
            if isinstance(resumed.link, str):
                continue
            parent_key = (key[0], resumed.link.parent)
            seen = None if resumed.link.logless else self._seen.get(parent_key)
            if seen is not None:
                parent = nodes.setdefault(parent_key, _Node(parent_key, seen))
                node.parent = parent
                parent.children.append(node)
        return nodes

    def _read(self, nodes: Iterable[_Node]) -> dict[int, str]:
        """Read the linked runs' verified lines again, file by file; return read errors."""
        by_file: dict[int, dict[str, _RunRead]] = {}
        for node in nodes:
            links = [child.link for child in node.children]
            node.read = _RunRead(node.run_id, node.seen, [link for link in links if link])
            by_file.setdefault(node.seen.file, {}).setdefault(node.run_id, node.read)
        errors = {}
        for file, reads in by_file.items():
            error = _read_file(self._paths[file], reads)
            if error is not None:
                errors[file] = error
            for read in reads.values():
                read.finish()
        return errors

    def _report(self, path: list[_Node], errors: Mapping[int, str]) -> LineageReport:
        report = LineageReport(
            runs=[
                LineageRun(node.run_id, self._names[node.seen.file], node.seen.status, node.key[0])
                for node in path
            ]
        )
        for node in path:
            error = errors.get(node.seen.file)
            if error is not None:
                where = self._names[node.seen.file]
                report.problems.append(Problem(where, 0, f"cannot read it again: {error}"))
                return report
        if _cycle(path):
            circle = " -> ".join(_run(node.run_id) for node in path)
            _problem(report, self._names, path[-1], f"resumed_from links go round: {circle}")
        _check_runs(report, path, self._names)
        _check_root(report, path[0], self._names)
        for parent, child in itertools.pairwise(path):
            report.links.append(_check_link(report, parent, child, self._names))
        if report.verified and not _cycle(path):
            _check_batches(report, path, self._names)
        if report.verified:
            _account_for_deaths(report, path)
        return report


def _check_runs(report: LineageReport, path: list[_Node], names: list[str]) -> None:
    """Fail the lineage on each of its runs that does not verify (a killed run's death aside)."""
    for node in {id(node): node for node in path}.values():
        if node.seen.fails:
            report.unverified += 1
            _problem(
                report,
                names,
                node,
                f"{_run(node.run_id)} does not verify: no lineage may rest on it",
            )


def _account_for_deaths(report: LineageReport, path: list[_Node]) -> None:
    """Name the run that continued each killed run of a lineage that verifies."""
    for index, (parent, child) in enumerate(itertools.pairwise(path)):
        if parent.seen.killed:
            report.runs[index] = attrs.evolve(report.runs[index], continued_by=child.run_id)


@attrs.define(eq=False)
class _Node:
    """A run of a lineage: what the first reading kept, its links, what the second read."""

    key: RunKey
    seen: _Seen
    resumed: _Resumed | None = None
    parent: _Node | None = None
    children: list[_Node] = attrs.Factory(list)
    read: _RunRead | None = None

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.key[1]

    @property
    def link(self) -> _Link | None:
        """The run's valid ``resumed_from``, if any."""
        link = None if self.resumed is None else self.resumed.link
        return None if isinstance(link, str) else link

    @property
    def reading(self) -> _RunRead:
        """What the second reading found (read before any check)."""
        if self.read is None:  # pragma: no cover (``_read`` reads every node first)
            msg = f"run {self.run_id} was not read"
            raise RuntimeError(msg)
        return self.read


def _paths(nodes: Mapping[RunKey, _Node]) -> Iterator[list[_Node]]:
    """Yield each lineage root first: the path up from each leaf (a cycle, once, cut)."""
    covered: set[int] = set()
    leaves = [node for node in nodes.values() if node.resumed is not None and not node.children]
    for node in leaves + list(nodes.values()):
        if id(node) in covered or node.resumed is None:
            continue
        path = _up(node)
        covered.update(map(id, path))
        yield path


def _up(node: _Node) -> list[_Node]:
    """Return the runs from the root down to ``node``; in a cycle of links, once round it."""
    path, seen = [node], {id(node)}
    parent = node.parent
    while parent is not None:
        path.append(parent)
        if id(parent) in seen:
            break
        seen.add(id(parent))
        parent = parent.parent
    path.reverse()
    return path


def _cycle(path: list[_Node]) -> bool:
    return len({id(node) for node in path}) < len(path)


# -- the second reading ------------------------------------------------------------------------

_BEGIN, _BATCHES, _END, _CANCELLED = range(4)


@attrs.define
class _Event:
    """A pass begun or ended, or consecutive batches begun, at a record of a run."""

    record: int
    kind: int
    epoch: int
    training: bool
    first: int = 0
    last: int = -1

    @property
    def pass_key(self) -> Pass:
        return self.epoch, self.training


@attrs.frozen
class _Sealed:
    """How far the run's reading is sealed: what to keep of it."""

    records: int = 0
    events: int = 0
    last: int = -1
    notes: int = 0
    state: str = State.IDLE.value


class _RunRead:
    """One linked run read again: its passes and batches, the seals and notes its links name."""

    def __init__(self, run_id: str, seen: _Seen, links: list[_Link]) -> None:
        self.run_id = run_id
        self.first_line, self.limit = seen.first_line, seen.limit
        self.cuts = {link.records for link in links}
        self.heads = {link.head for link in links}
        self.records = 0
        self.state = State.IDLE.value
        self.events: list[_Event] = []
        self.split = False
        self.notes: list[tuple[int, dict[str, Any]]] = []
        """The fields of the ``resume_point`` notes right after a link's R: (R, fields)."""
        self.after_note: set[int] = set()
        """The links' R whose seal follows a ``resume_point`` note: the seal after the notes."""
        self._noting: int | None = None
        """The link's R whose notes are being read (None: the last record was none of them)."""
        self._noted = False
        """Whether the last record was a ``resume_point`` note."""
        self.state_at: dict[int, str] = {}
        """Per link's R: the state the run's log left the machine in after R records."""
        self.seal_at: dict[int, str] = {}
        """Per link's R: the digest of the run's seal after exactly R records."""
        self.records_at: dict[str, int] = {}
        """Per link's H: the records the run's seal of that digest follows."""
        self._sealed = _Sealed()

    def take(self, record: Record) -> None:
        """Take the run's next record (a verified line)."""
        if isinstance(record, Seal):
            self._seal(record)
            return
        if isinstance(record, Footer):
            return
        index = self.records
        if index in self.cuts:
            self.state_at[index] = self.state
            self.split = True
            self._noting = index
        self.records += 1
        self._noted = isinstance(record, Note) and record.name == RESUME_POINT
        if not self._noted:
            self._noting = None
        elif self._noting is not None and isinstance(record, Note):
            self.notes.append((self._noting, record.fields))
        if isinstance(record, Transition):
            self._transition(record, index)

    def _transition(self, record: Transition, index: int) -> None:
        self.state = record.dest
        trigger = record.trigger
        if trigger == Trigger.BEGIN_BATCH:
            last = self.events[-1] if self.events else None
            if (
                last is not None
                and not self.split
                and last.kind == _BATCHES
                and last.pass_key == (record.epoch, record.training)
                and last.last + 1 == record.iter
            ):
                last.last = record.iter
                return
            kind = _BATCHES
        elif trigger == Trigger.BEGIN_EPOCH:
            kind = _BEGIN
        elif trigger == Trigger.END_EPOCH:
            kind = _END
        elif trigger == Trigger.CANCEL_EPOCH:
            kind = _CANCELLED
        else:
            return
        self.events.append(
            _Event(index, kind, record.epoch, record.training, record.iter, record.iter)
        )
        self.split = False

    def _seal(self, seal: Seal) -> None:
        digest = seal.digest.hex()
        if self.records in self.cuts:
            self.seal_at.setdefault(self.records, digest)
            if self._noted:
                self.after_note.add(self.records)
        if digest in self.heads:
            self.records_at.setdefault(digest, self.records)
        last = self.events[-1].last if self.events else -1
        self._sealed = _Sealed(self.records, len(self.events), last, len(self.notes), self.state)

    def finish(self) -> None:
        """Keep only what the run's last verified seal seals."""
        sealed = self._sealed
        del self.events[sealed.events :]
        if self.events:
            self.events[-1].last = sealed.last
        del self.notes[sealed.notes :]
        self.records = sealed.records
        if sealed.records in self.cuts:
            self.state_at.setdefault(sealed.records, sealed.state)
        self.state_at = {r: s for r, s in self.state_at.items() if r <= sealed.records}
        self.after_note = {r for r in self.after_note if r <= sealed.records}


def _read_file(path: Path, reads: Mapping[str, _RunRead]) -> str | None:
    """Give each run its verified lines of the file; return why the file cannot be read."""
    last = max(read.limit for read in reads.values())
    try:
        fh = open_log(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    except NotRegularError as exc:
        return str(exc)
    line = 0
    with fh:
        for chunk in read_chunks(fh):
            if isinstance(chunk, Unreadable):
                return chunk.reason
            if isinstance(chunk, Overlong):
                line += 1
                continue
            texts = chunk.split(b"\n")
            if chunk.endswith(b"\n"):
                texts.pop()
            for text in texts:
                line += 1
                if line > last:
                    return None
                if _runs_of(text) & reads.keys():
                    _give(reads, text, line)
    return None


def _runs_of(text: bytes) -> set[str]:
    """Return the run ids a line's ``"run"`` fields name: one, for a line the codec wrote.

    A line is looked up by its run id, whatever the number of runs linked: reading each
    line against every linked run's id took hours for a file of thousands.
    """
    runs = set()
    for match in _RUN_FIELD.finditer(text):
        try:
            run = orjson.loads(match[1])
        except orjson.JSONDecodeError:
            continue
        if isinstance(run, str):
            runs.add(run)
    return runs


def _give(reads: Mapping[str, _RunRead], text: bytes, line: int) -> None:
    try:
        record = decode(text)
    except RecordError:
        return
    read = reads.get(record.run)
    if read is not None and read.first_line <= line <= read.limit:
        read.take(record)


# -- the checks --------------------------------------------------------------------------------


def _problem(report: LineageReport, names: list[str], node: _Node, reason: str) -> None:
    report.problems.append(Problem(names[node.seen.file], node.seen.first_line, reason))


def _check_root(report: LineageReport, root: _Node, names: list[str]) -> None:
    """Say what the root resumes, when it resumes a run whose log was not given."""
    resumed = root.resumed
    if resumed is None:
        return
    if isinstance(resumed.link, str):
        _problem(report, names, root, f"{_run(root.run_id)}: {resumed.link}")
        return
    if root.parent is None and resumed.link.logless:
        report.missing_parent = resumed.link.parent
        report.notes.append(
            f"{_run(root.run_id)} resumes {_run(resumed.link.parent)}, which wrote no audit log "
            "(audit_log=None): the link cannot be checked"
        )
    elif root.parent is None:
        parent = resumed.link.parent
        report.missing_parent = parent
        report.notes.append(
            f"{_run(root.run_id)} resumes {_run(parent)}, whose log was not given (pass it to "
            "verify the lineage)"
        )


def _check_link(report: LineageReport, parent: _Node, child: _Node, names: list[str]) -> LinkReport:
    """Check that ``child`` resumes a checkpoint ``parent`` took where it says."""
    link = child.link
    if link is None:  # pragma: no cover (a node with a parent has a valid link)
        msg = f"run {child.run_id} has no link"
        raise RuntimeError(msg)
    read = parent.reading
    found = LinkReport(
        child.run_id,
        parent.run_id,
        link.records,
        link.head,
        link.sha256,
        link.at,
        "unchecked",
        _redone(read.events, link.records),
        parent.seen.unsealed,
    )
    what = f"{_run(child.run_id)} resumes {_run(parent.run_id)}"
    if not child.seen.header_verified:
        why = "its header is in no block that verifies: its resumed_from is not its own"
        _problem(report, names, child, f"{what}: {why}")
        return found
    reason = _seal_problem(link, parent, read)
    if reason is None:
        reason = _position_problem(link, parent, read)
    if reason is not None:
        _problem(report, names, child, f"{what}: {reason}")
        return found
    checkpoint, reason = _checkpoint(link, parent, read)
    if reason is not None:
        _problem(report, names, child, f"{what}: {reason}")
    elif checkpoint == "unconfirmed":
        died = parent.seen.status is RunStatus.TRUNCATED
        why = "died before noting it" if died else "verifies only up to that seal"
        report.notes.append(f"{what}: unconfirmed checkpoint file ({_run(parent.run_id)} {why})")
    return attrs.evolve(found, checkpoint=checkpoint)


def _seal_problem(link: _Link, parent: _Node, read: _RunRead) -> str | None:
    if read.seal_at.get(link.records) == link.head:
        return None
    reason = (
        f"resumed_from names head {link.head} at record {link.records}, which is no seal of "
        f"{_run(parent.run_id)}"
    )
    records = read.records_at.get(link.head)
    if records is not None:
        return f"{reason} (that head is its seal after {records} records)"
    digest = read.seal_at.get(link.records)
    if digest is not None:
        return f"{reason} (its seal after {link.records} records is {digest})"
    if link.records > read.records:
        return f"{reason} (only its first {read.records} records verify)"
    return reason


def _position_problem(link: _Link, parent: _Node, read: _RunRead) -> str | None:
    state = read.state_at.get(link.records)
    if state not in _AT_BOUNDARY:
        return (
            f"after {link.records} records {_run(parent.run_id)} was in state {state!r}, where "
            "no checkpoint is taken (only in 'epoch' or 'fit')"
        )
    walk = _Walk(None if parent.link is None else parent.link.at)
    reopen = parent.link is not None
    for event in read.events:
        if event.record >= link.records or not walk.take(event, parent.run_id, reopen=reopen):
            break
        reopen = False
    if walk.position == link.at:
        return None
    return (
        f"resumed_from says it re-enters at {link.at}, but after {link.records} records "
        f"{_run(parent.run_id)} was at {walk.position}"
    )


def _checkpoint(link: _Link, parent: _Node, read: _RunRead) -> tuple[str, str | None]:
    """Compare the checkpoint the link loaded with the ones its parent noted at that seal.

    The learner seals, writes each checkpoint file, notes each one (consecutive
    ``resume_point`` records) and seals again: a parent whose verified records go on
    after R took a checkpoint there only if they go on with its notes. Only a parent
    whose verified log ends at R may have died between the file and its note.
    """
    run, records = _run(parent.run_id), link.records
    if records in read.after_note:
        return "missing", (
            f"the seal of {run} after {records} records follows its notes of a checkpoint: no "
            "checkpoint was taken there"
        )
    noted = [fields for at, fields in read.notes if at == records]
    if not noted:
        if read.records > records:
            return "missing", (
                f"{run} noted no checkpoint at the seal after {records} records: no "
                "checkpoint was taken there"
            )
        return "unconfirmed", None
    of_seal = [f for f in noted if f.get("head") == link.head and f.get("records") == records]
    note = next((f for f in of_seal if f.get("sha256") == link.sha256), None)
    if note is None:
        written = " or ".join(shown(f.get("sha256"), 80) for f in of_seal) or "none of that seal"
        return "mismatch", (
            f"the checkpoint the resumed run loaded is not one {run} wrote there: sha256 "
            f"{link.sha256} != {written}"
        )
    at = _position(note.get("at"))
    if at != link.at:
        noted_at = "no valid position" if at is None else str(at)
        return "mismatch", (
            f"{run} noted that checkpoint at {noted_at}, the resumed run re-enters at {link.at}"
        )
    return "confirmed", None


def _redone(events: list[_Event], records: int) -> tuple[BatchRange, ...]:
    """Return the batches begun at or after record ``records``, merged per pass."""
    redone: list[BatchRange] = []
    for event in events:
        if event.record < records or event.kind != _BATCHES:
            continue
        last = redone[-1] if redone else None
        if (
            last is not None
            and (last.epoch, last.training) == event.pass_key
            and last.last + 1 == event.first
        ):
            redone[-1] = attrs.evolve(last, last=event.last)
        else:
            redone.append(BatchRange(event.epoch, event.training, event.first, event.last))
    return tuple(redone)


def _check_batches(report: LineageReport, path: list[_Node], names: list[str]) -> None:
    """Walk the lineage's passes and batches, each run up to where the next one resumes it."""
    root, leaf = path[0], path[-1]
    start = root.link.at if root.link is not None and root.parent is None else None
    walk = _Walk(start)
    for index, node in enumerate(path):
        child = path[index + 1].link if index + 1 < len(path) else None
        end = None if child is None else child.records
        reopen = index > 0 or start is not None
        for event in node.reading.events:
            if end is not None and event.record >= end:
                break
            if not walk.take(event, node.run_id, reopen=reopen):
                _problem(report, names, node, f"lineage: {walk.problem}")
                return
            reopen = False
    report.batches, report.passes = walk.batches, walk.passes
    _ending(report, walk, leaf, names, start)


def _ending(
    report: LineageReport, walk: _Walk, leaf: _Node, names: list[str], start: PassPosition | None
) -> None:
    counted = f"{walk.batches} batches over {walk.passes} passes"
    since = "" if start is None else f" from {start} on"
    report.cancelled, report.cancelled_passes = list(walk.cancelled_kept), walk.cancelled
    cancelled = _cancelled(walk)
    every = "every batch begun" if cancelled else "every batch"
    status = leaf.seen.status
    if status is not RunStatus.COMPLETED:
        report.coverage = (
            f"lineage not complete ({_run(leaf.run_id)} {status.value}): {every} so far"
            f"{since} exactly once{cancelled} ({counted})"
        )
        return
    n_epochs = None if leaf.resumed is None else leaf.resumed.n_epochs
    ended = walk.ended_after(n_epochs)
    if ended is not None:
        _problem(report, names, leaf, f"lineage: {_run(leaf.run_id)} completed, but {ended}")
        return
    report.complete = start is None
    if report.complete and not cancelled:
        report.coverage = f"complete lineage: every batch of every pass exactly once ({counted})"
    elif report.complete:
        report.coverage = (
            f"complete lineage: every pass in order, {every} exactly once{cancelled} ({counted})"
        )
    else:
        report.coverage = f"lineage complete{since}: {every} exactly once{cancelled} ({counted})"


def _cancelled(walk: _Walk) -> str:
    """Say which passes were cancelled ("" for none): their later batches never ran."""
    if not walk.cancelled:
        return ""
    named = ", ".join(
        f"{_pass_name(at.pass_key)} after batch {at.it - 1}"
        if at.it
        else f"{_pass_name(at.pass_key)} before its first batch"
        for at in walk.cancelled_kept
    )
    more = walk.cancelled - len(walk.cancelled_kept)
    named += f" and {more} more" if more else ""
    one = walk.cancelled == 1
    passes = "pass was" if one else "passes were"
    return (
        f"; {walk.cancelled} {passes} cancelled ({named}): {'its' if one else 'their'} later "
        "batches never ran"
    )


class _Walk:
    """The passes and batches of a fit, in the order its runs began them: the first gap or repeat.

    ``start`` is where the first run re-enters the fit (None: the fit's beginning).
    """

    def __init__(self, start: PassPosition | None) -> None:
        self.open: Pass | None = None
        self.ended: Pass | None = None
        self.next_pass: Pass = (0, True)
        self.next_it = 0
        self.ranges: list[tuple[int, int, str]] = []
        """The open pass's batches begun: (first, last, run)."""
        self.batches = self.passes = 0
        self.cancelled = 0
        """How many passes were cancelled (``cancel_epoch``): their later batches never ran."""
        self.cancelled_kept: list[PassPosition] = []
        """The first of them, each with the batches it began."""
        self.problem = ""
        if start is not None and start.it:
            self.open, self.next_it = start.pass_key, start.it
            self.passes = 1
        elif start is not None:
            self.next_pass = start.pass_key

    @property
    def position(self) -> PassPosition:
        """Where the fit is: in the open pass after ``next_it`` batches, or before the next."""
        if self.open is not None:
            return PassPosition(*self.open, self.next_it)
        return PassPosition(*self.next_pass)

    def take(self, event: _Event, run_id: str, *, reopen: bool = False) -> bool:
        """Take the run's next event; False, with ``problem`` said, at a gap or a repeat."""
        if event.kind == _BEGIN:
            self.problem = self._begin(event.pass_key, run_id, reopen=reopen)
        elif event.kind == _BATCHES:
            self.problem = self._batches(event, run_id)
        else:
            self.problem = self._end(event.pass_key, run_id, cancelled=event.kind == _CANCELLED)
        return not self.problem

    def _begin(self, key: Pass, run_id: str, *, reopen: bool) -> str:
        if self.open is not None:
            if key == self.open and reopen:
                return ""  # a resumed run re-enters the pass its checkpoint was taken in
            return self._left_open(f"{_run(run_id)} begins {_pass_name(key)}")
        if key != self.next_pass:
            if _order(key) < _order(self.next_pass):
                return f"{_pass_name(key)} runs again ({_run(run_id)})"
            missing = _pass_name(self.next_pass)
            return f"{missing} is missing: {_run(run_id)} begins {_pass_name(key)} next"
        self.open, self.next_it, self.ranges = key, 0, []
        self.passes += 1
        return ""

    def _left_open(self, then: str) -> str:
        open_ = self.open if self.open is not None else self.next_pass
        after = f"after batch {self.next_it - 1}" if self.next_it else "before its first batch"
        return f"{_pass_name(open_)} never ends ({after}): {then}"

    def _batches(self, event: _Event, run_id: str) -> str:
        key = event.pass_key
        if key != self.open:
            batches = BatchRange(*key, event.first, event.last)
            where = "no pass" if self.open is None else _pass_name(self.open)
            return f"{_run(run_id)} begins {batches} in {where}"
        if event.first > self.next_it:
            missing = BatchRange(*key, self.next_it, event.first - 1)
            verb = "is" if missing.count == 1 else "are"
            after = (
                f"after batch {self.next_it - 1} ({_run(self.ranges[-1][2])})"
                if self.ranges
                else "at the start of the pass"
            )
            return f"{missing} {verb} missing: {after} comes batch {event.first} ({_run(run_id)})"
        if event.first < self.next_it:
            twice = BatchRange(*key, event.first, min(event.last, self.next_it - 1))
            verb = "is" if twice.count == 1 else "are"
            first = self._who(event.first)
            return f"{twice} {verb} begun twice: by {first} and again by {_run(run_id)}"
        if self.ranges and self.ranges[-1][2] == run_id and self.ranges[-1][1] + 1 == event.first:
            self.ranges[-1] = (self.ranges[-1][0], event.last, run_id)
        else:
            self.ranges.append((event.first, event.last, run_id))
        self.next_it = event.last + 1
        self.batches += event.last - event.first + 1
        return ""

    def _who(self, it: int) -> str:
        """Name the run that began batch ``it`` of the open pass first."""
        for first, last, run_id in self.ranges:
            if first <= it <= last:
                return _run(run_id)
        return "the run resumed"  # before the partial lineage's first run

    def _end(self, key: Pass, run_id: str, *, cancelled: bool) -> str:
        if key != self.open:
            where = "no pass is open" if self.open is None else f"{_pass_name(self.open)} is"
            return f"{_run(run_id)} ends {_pass_name(key)} while {where}"
        if cancelled:
            self.cancelled += 1
            if len(self.cancelled_kept) < _CANCELLED_KEPT:
                self.cancelled_kept.append(PassPosition(*key, self.next_it))
        self.ended, self.open = key, None
        self.next_pass = _next_pass(key)
        return ""

    def ended_after(self, n_epochs: int | None) -> str | None:
        """Say how a completed fit of ``n_epochs`` does not end where it should (None: it does)."""
        if self.open is not None:
            return self._left_open("the fit ended")
        if n_epochs is None or self.next_pass == (n_epochs, True):
            return None
        last = "no pass" if self.ended is None else _pass_name(self.ended)
        return (
            f"its passes end with {last}, and a fit of {n_epochs} epochs ends with "
            f"{_pass_name((n_epochs - 1, False))}"
        )
