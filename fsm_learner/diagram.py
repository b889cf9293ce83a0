"""State diagrams drawn from the transition table: the table's, a learner's and a run's view.

The graph is the ``transitions`` ``GraphMachine`` that ``build_machine`` builds from
``TRANSITION_TABLE``: its states, and its transitions (one per source, guards as
conditions), are what is drawn; each transition's row of the table adds its hook and its
cancel exception. The loop never uses that machine (it restyles its graph on every
transition); this module only reads it, and is imported only when a diagram is drawn.

Formats: Mermaid ``stateDiagram-v2`` and Graphviz DOT are text written here, with no
extra dependency; SVG and PNG are that DOT rendered by Graphviz's ``dot`` program.

The rows with many sources (a cancel leaves every state of the unit it cancels, ``fail``
every state) are drawn compactly in DOT: each such row's sources, less its destination,
make a cluster ("batch in progress", ...), nested as the table nests them, and the row
one dashed edge leaving that cluster, plus one edge per source left over (``fail`` loops
on ``idle``). Mermaid cannot draw an edge between states of different composite states,
so there each source has its own edge, and the transitions between the same two states
share one edge, their labels joined by `` | ``.

Views: ``table_view()`` labels each edge with its trigger, guard and hook;
``callbacks_view(cbs)`` adds the callbacks that run on it, in order; ``run_view(log)``
labels it with how many times one audited run took it, greys what the run never took,
and marks the failure edge.

Text from outside the table (a callback's class name, a run id or failure read from a
log, a title) is escaped: control characters become visible escapes, so a newline
cannot start a forged line nor an ANSI sequence reach a terminal; in Mermaid, the
characters its lexer acts on inside a label (``: ; # %`` and the like) are written as
its entity codes (``#59;``).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from fsm_learner import machine
from fsm_learner._compat import StrEnum
from fsm_learner._display import exception_text, printable, shown
from fsm_learner.audit.codec import FailureField
from fsm_learner.callback import resolve_dispatch, validate_callbacks
from fsm_learner.exceptions import ConfigurationError
from fsm_learner.machine import Hook, State, TransitionSpec, Trigger

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from fsm_learner.audit.replay import RunReport
    from fsm_learner.learner import Learner

__all__ = [
    "DOCS_FILES",
    "GRAPHVIZ_HINT",
    "Cluster",
    "DiagramFormat",
    "DiagramView",
    "Edge",
    "callbacks_view",
    "check_docs",
    "clusters",
    "dot_edges",
    "learner_from_factory",
    "mermaid_edges",
    "render",
    "render_text",
    "run_view",
    "table_view",
    "write_docs",
]


class DiagramFormat(StrEnum):
    """What a diagram is rendered as: text (Mermaid, DOT, SVG) or an image (PNG)."""

    MERMAID = "mermaid"
    DOT = "dot"
    SVG = "svg"
    PNG = "png"


_TEXT_FORMATS: Final = (DiagramFormat.MERMAID, DiagramFormat.DOT, DiagramFormat.SVG)
_GRAPHVIZ_FORMATS: Final = (DiagramFormat.SVG, DiagramFormat.PNG)
GRAPHVIZ_HINT: Final = (
    "install Graphviz (Debian and Ubuntu: apt-get install graphviz; macOS: brew install "
    "graphviz); the mermaid and dot formats need nothing"
)
"""What to do when ``dot`` is missing: SVG and PNG need the program, no Python package."""


@attrs.frozen
class Cluster:
    """States that several transitions leave alike, drawn as one box in DOT."""

    name: str
    label: str
    states: frozenset[State]


@attrs.frozen
class Edge:
    """One arrow: a row of the table, from the states it stands for, to the row's dest."""

    spec: TransitionSpec
    sources: tuple[State, ...]
    cluster: Cluster | None = None

    @property
    def tail(self) -> State:
        """The node the arrow is drawn from; from a cluster, it starts at the border."""
        return self.sources[0]


@attrs.frozen
class DiagramView:
    """What a diagram shows besides the table: callbacks per hook, or one run's counts."""

    title: str
    calls: Mapping[Hook, tuple[str, ...]] | None = None
    counts: Mapping[tuple[Trigger, State, State], int] | None = None
    """Per (trigger, source, dest): how many times the run took that transition."""
    failed_in: State | None = None
    failure: str = ""


# -- the graph, read off the GraphMachine --------------------------------------------------


def _machine_transitions() -> list[tuple[Trigger, State, State, tuple[str, ...]]]:
    """Build the GraphMachine from the table; return its transitions, one per source."""
    from transitions.extensions.diagrams import GraphMachine  # noqa: PLC0415 (off the loop)

    graph = machine.build_machine(machine_cls=GraphMachine, graph_engine="mermaid")
    if not isinstance(graph, GraphMachine):  # pragma: no cover (build_machine honours it)
        msg = f"build_machine returned {type(graph).__name__}, not a GraphMachine"
        raise TypeError(msg)
    return [
        (
            Trigger(t["trigger"]),
            State(t["source"]),
            State(t["dest"]),
            tuple(t.get("conditions", ())),
        )
        for t in graph.markup["transitions"]
    ]


def _row_of(trigger: Trigger, source: State, dest: State, guards: Sequence[str]) -> TransitionSpec:
    """Return the row of the table that a transition of the machine was built from."""
    for spec in machine.TRANSITION_TABLE:
        own = (str(spec.guard),) if spec.guard else ()
        if (spec.trigger, spec.dest, own) == (trigger, dest, tuple(guards)) and (
            source in spec.sources
        ):
            return spec
    msg = f"the machine's transition {trigger}: {source} -> {dest} is no row of the table"
    raise LookupError(msg)


def _transitions() -> list[tuple[TransitionSpec, State]]:
    """Each transition of the GraphMachine, as (its row, its source)."""
    return [
        (_row_of(trigger, source, dest, guards), source)
        for trigger, source, dest, guards in _machine_transitions()
    ]


def mermaid_edges() -> list[tuple[State, State, tuple[Edge, ...]]]:
    """Return the Mermaid arrows: one per (source, dest), with its transitions in order."""
    by_pair: dict[tuple[State, State], list[Edge]] = {}
    for spec, source in _transitions():
        by_pair.setdefault((source, spec.dest), []).append(Edge(spec, (source,)))
    return [(src, dst, tuple(edges)) for (src, dst), edges in by_pair.items()]


def _nests(sets: Iterable[frozenset[State]]) -> bool:
    items = list(sets)
    return all(a <= b or b <= a or not a & b for a in items for b in items)


def _entry(states: frozenset[State]) -> str:
    """Name a cluster after the one state that transitions from outside enter it at."""
    entries = {
        spec.dest
        for spec in machine.TRANSITION_TABLE
        if spec.dest in states and not set(spec.sources) <= states
    }
    if len(entries) == 1:
        return str(entries.pop())
    return "_".join(s for s in State if s in states)


def clusters() -> tuple[Cluster, ...]:
    """Return the clusters multi-source rows leave, outermost first; none unless they nest."""
    sets = {
        frozenset(spec.sources) - {spec.dest}
        for spec in machine.TRANSITION_TABLE
        if len(spec.sources) > 1
    }
    sets = {s for s in sets if len(s) > 1}
    if not _nests(sets):
        return ()
    ordered = sorted(sets, key=lambda s: (-len(s), [i for i, x in enumerate(State) if x in s]))
    return tuple(Cluster(f"cluster_{_entry(s)}", f"{_entry(s)} in progress", s) for s in ordered)


def dot_edges() -> list[Edge]:
    """Return the DOT arrows: per row, one from each cluster it leaves, one per other source."""
    rows: dict[TransitionSpec, list[State]] = {}
    for spec, source in _transitions():
        rows.setdefault(spec, []).append(source)
    found = clusters()
    edges: list[Edge] = []
    for spec, sources in rows.items():
        left = list(sources)
        for cluster in found if len(sources) > 1 else ():
            if cluster.states <= set(left):
                edges.append(Edge(spec, tuple(s for s in left if s in cluster.states), cluster))
                left = [s for s in left if s not in cluster.states]
        edges.extend(Edge(spec, (s,)) for s in left)
    return edges


# -- views ---------------------------------------------------------------------------------


def table_view() -> DiagramView:
    """Show the table alone: each edge with its trigger, guard and hook."""
    return DiagramView("fsm_learner: the transition table")


def callbacks_view(cbs: Iterable[object], title: str = "") -> DiagramView:
    """Show the table with the callbacks that run on each transition, in the order they run."""
    dispatch = resolve_dispatch(validate_callbacks(cbs))
    calls = {
        hook: tuple(f"{type(cb).__name__}(order={cb.order})" for cb, _ in dispatch.hooks[hook])
        for hook in Hook
    }
    return DiagramView(title or "fsm_learner: what runs where", calls=calls)


def learner_from_factory(spec: str) -> Learner:
    """Import ``MODULE:FACTORY``, call it, and return the Learner it builds."""
    from fsm_learner.learner import Learner  # noqa: PLC0415 (the package imports this module)

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        msg = f"a learner factory is MODULE:FACTORY (a function returning a Learner), got {spec!r}"
        raise ConfigurationError(msg)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 (whatever the user's module raises, say it in one line)
        msg = f"cannot import {module_name!r}: {exception_text(exc, 300)}"
        raise ConfigurationError(msg) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        msg = f"{module_name} has no function {name!r} (got {type(factory).__name__})"
        raise ConfigurationError(msg)
    try:
        learn = factory()
    except Exception as exc:  # noqa: BLE001 (the same: one line, no traceback)
        msg = f"{spec} raised {exception_text(exc, 300)}"
        raise ConfigurationError(msg) from None
    if not isinstance(learn, Learner):
        msg = f"{spec} returned {type(learn).__name__}, not a fsm_learner.Learner"
        raise ConfigurationError(msg)
    return learn


def run_view(path: Path, *, run_id: str | None = None, key: bytes | None = None) -> DiagramView:
    """Show the path one audited run took (the file's last unless ``run_id``); it must verify."""
    report = _verified_run(path, run_id, key)
    failed_in = None if report.failed_at is None else State(report.failed_at["state"])
    return DiagramView(
        f"fsm_learner: run {_clip(report.run_id, _RUN_ID_SHOWN)} ({report.status})",
        counts={
            (Trigger(trigger), State(source), State(dest)): n
            for (trigger, source, dest), n in report.edges.items()
        },
        failed_in=failed_in,
        failure=_failure_text(report),
    )


_RUN_ID_SHOWN: Final = 64
_RUN_IDS_LISTED: Final = 8


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verified_run(path: Path, run_id: str | None, key: bytes | None) -> RunReport:
    from fsm_learner.audit.replay import FileAudit, RunSet  # noqa: PLC0415 (only this view)

    audit, runs = FileAudit(path, key=key), RunSet()
    chosen: RunReport | None = None
    ids: list[str] = []
    count = 0
    for report in audit:  # streamed: only the chosen run is kept
        runs.add(report)
        count += 1
        if len(ids) < _RUN_IDS_LISTED:
            ids.append(_clip(report.run_id, _RUN_ID_SHOWN))
        if run_id is None or (chosen is None and report.run_id == run_id):
            chosen = report
    if audit.problem is not None:
        msg = f"{audit.problem} (fsm-learner audit does not verify it)"
        raise ConfigurationError(msg)
    if chosen is None:
        more = f" and {count - len(ids)} more" if count > len(ids) else ""
        msg = f"{audit.name} has no run {shown(run_id)}; its runs: {', '.join(ids)}{more}"
        raise ConfigurationError(msg)
    if not chosen.verified:
        msg = f"run {_clip(chosen.run_id, _RUN_ID_SHOWN)} does not verify: {chosen.problem}"
        raise ConfigurationError(msg)
    return chosen


def _failure_text(report: RunReport) -> str:
    failure = report.failure or {}
    text = _field_text(failure.get(FailureField.TYPE.value, ""))
    hook = failure.get(FailureField.HOOK.value)
    if hook:
        callback = failure.get(FailureField.CALLBACK.value)
        text += f" in {_field_text(hook)} of {_field_text(callback)}"
    return text


def _field_text(value: object) -> str:
    """Show a field of a log's failure record as short text, whatever the log put there."""
    return _clip(value, 80) if isinstance(value, str) else shown(value)


# -- labels --------------------------------------------------------------------------------


_TIMES: Final = "×"  # noqa: RUF001 (a count reads as "times 3")


def _guard(spec: TransitionSpec, *, cancels: bool) -> str:
    if spec.guard is not None:
        return f" [{spec.guard}]"
    if cancels and spec.cancel is not None:
        return f" [{spec.cancel.__name__}]"
    return ""


def _count(view: DiagramView, edge: Edge) -> int:
    counts = view.counts or {}
    return sum(counts.get((edge.spec.trigger, s, edge.spec.dest), 0) for s in edge.sources)


def _is_fail(edge: Edge) -> bool:
    return edge.spec.trigger is Trigger.FAIL


def _is_failure(view: DiagramView, edge: Edge) -> bool:
    return _is_fail(edge) and view.failed_in in edge.sources


def _dot_label(view: DiagramView, edge: Edge) -> list[str]:
    spec = edge.spec
    first = f"{spec.trigger}{_guard(spec, cancels=True)}"
    if view.counts is not None:
        failure = printable(view.failure)
        failed = [f"failed in {view.failed_in}: {failure}"] if _is_failure(view, edge) else []
        return [f"{first} {_TIMES}{_count(view, edge)}", *failed]
    calls = [printable(call) for call in view.calls[spec.hook]] if view.calls is not None else []
    # two lines at most: taller labels of a row's edges overlap the box around the row
    return [first, f"/ {spec.hook}" + (f": {', '.join(calls)}" if calls else "")]


_MERMAID_ENTITIES: Final = str.maketrans({c: f"#{ord(c)};" for c in '#:;%{}<>"|`'})
_MERMAID_DIRECTION: Final = re.compile(r"(direction) ", re.IGNORECASE)


def _mermaid_text(text: str) -> str:
    """Make outside text inert in a Mermaid label: one line, no character its lexer acts on.

    Inside a transition's label Mermaid's state-diagram lexer stops at ``:``, ``;`` and
    a newline, and reads a whole line with ``direction`` and a space in it as a
    direction statement; its entity codes (``#59;``) are decoded only when drawing.
    """
    return _MERMAID_DIRECTION.sub(r"\1#32;", printable(text).translate(_MERMAID_ENTITIES))


def _mermaid_label(view: DiagramView, edge: Edge) -> str:
    spec = edge.spec
    text = f"{spec.trigger}{_guard(spec, cancels=False)}"
    if view.counts is not None:
        failure = _mermaid_text(view.failure)
        failed = f" (failed here, {failure})" if _is_failure(view, edge) else ""
        return f"{text} {_TIMES}{_count(view, edge)}{failed}"
    calls = [_mermaid_text(c) for c in view.calls[spec.hook]] if view.calls is not None else []
    return f"{text} / {', '.join(calls)}" if calls else text


# -- Mermaid -------------------------------------------------------------------------------


def _mermaid(view: DiagramView) -> str:
    # a comment to the end of its line; Mermaid scans even comments for %%{...}%% directives
    title = printable(view.title).replace("%", "#37;").replace("{", "#123;").replace("}", "#125;")
    lines = ["stateDiagram-v2", f"    %% {title}", *(f"    {s}" for s in State)]
    lines.append(f"    [*] --> {State.IDLE}")
    for src, dst, edges in mermaid_edges():
        label = " | ".join(_mermaid_label(view, edge) for edge in edges)
        lines.append(f"    {src} --> {dst} : {label}")
    return "\n".join(lines) + "\n"


# -- DOT -----------------------------------------------------------------------------------

_FONT: Final = "Helvetica"
_GRAPH: Final = {
    "rankdir": "TB",
    "compound": "true",
    "newrank": "true",
    "fontname": _FONT,
    "labelloc": "t",
    "style": "rounded,dashed",
    "color": "gray50",
    "fontcolor": "gray30",
}
_NODE: Final = {"shape": "box", "style": "rounded", "fontname": _FONT}
_EDGE: Final = {"fontname": _FONT, "fontsize": "10"}
_CANCEL: Final = {"style": "dashed", "color": "darkorange3", "fontcolor": "darkorange3"}
_FAIL: Final = {"style": "dashed", "color": "red3", "fontcolor": "red3"}
_NOT_TAKEN: Final = {"color": "gray75", "fontcolor": "gray60"}
_FAILED_HERE: Final = {"style": "bold", "color": "red3", "fontcolor": "red3", "penwidth": "2"}


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _attrs(values: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={_quote(v)}" for k, v in values.items())


@cache
def _depth(table: tuple[TransitionSpec, ...]) -> dict[State, int]:
    """Each state's distance from idle along the table: it ranks the states."""
    depth, frontier = {State.IDLE: 0}, {State.IDLE}
    while frontier:
        step = len(set(depth.values()))
        frontier = {
            spec.dest for spec in table if spec.dest not in depth and frontier & set(spec.sources)
        }
        depth.update(dict.fromkeys(frontier, step))
    return depth


def _edge_style(view: DiagramView, edge: Edge) -> dict[str, str]:
    dashed = edge.spec.cancel is not None or _is_fail(edge)
    if view.counts is not None and _is_failure(view, edge):
        return dict(_FAILED_HERE)
    if view.counts is not None and not _count(view, edge):
        return {**_NOT_TAKEN, "style": "dashed"} if dashed else dict(_NOT_TAKEN)
    if edge.spec.cancel is not None:
        return dict(_CANCEL)
    return dict(_FAIL) if dashed else {}


def _dot_edge(view: DiagramView, edge: Edge) -> str:
    dest = edge.spec.dest
    values = {"label": "\n".join(_dot_label(view, edge)), **_edge_style(view, edge)}
    if edge.cluster is not None:
        values["ltail"] = edge.cluster.name
    depth = _depth(machine.TRANSITION_TABLE)
    if depth.get(dest, 0) <= depth.get(edge.tail, 0):
        values["constraint"] = "false"  # a way back: only the ways forward rank the states
    if dest == edge.tail:
        values.update(tailport="n", headport="n")  # a loop on top keeps its label clear
    return f"{edge.tail} -> {dest} [{_attrs(values)}];"


def _visited(view: DiagramView) -> set[State]:
    if view.counts is None:
        return set(State)
    taken = [key for key, n in view.counts.items() if n]
    return {State.IDLE} | {src for _, src, _ in taken} | {dst for _, _, dst in taken}


def _children(scope: frozenset[State], found: Sequence[Cluster]) -> list[Cluster]:
    inner = [c for c in found if c.states < scope]
    return [c for c in inner if not any(c.states < o.states for o in inner)]


def _dot_scope(view: DiagramView, scope: frozenset[State], found: Sequence[Cluster]) -> list[str]:
    """Declare the states of ``scope`` outside its clusters, then each cluster, nested."""
    children = _children(scope, found)
    held = frozenset().union(*(c.states for c in children))
    visited = _visited(view)
    own = [s for s in State if s in scope and s not in held]
    lines = [f"{s};" if s in visited else f"{s} [{_attrs(_NOT_TAKEN)}];" for s in own]
    if not children and scope != frozenset(State):  # an innermost cluster reads as one row
        lines.append("{rank=same; " + "; ".join(own) + ";}")
    for child in children:
        lines += [f"subgraph {child.name} {{", f"    label={_quote(child.label)};"]
        lines += [f"    {line}" for line in _dot_scope(view, child.states, found)]
        lines.append("}")
    return lines


def _dot(view: DiagramView) -> str:
    lines = [
        "digraph fsm_learner {",
        f"    graph [{_attrs(_GRAPH)}, label={_quote(printable(view.title))}];",
        f"    node [{_attrs(_NODE)}];",
        f"    edge [{_attrs(_EDGE)}];",
        *(f"    {line}" for line in _dot_scope(view, frozenset(State), clusters())),
        *(f"    {_dot_edge(view, edge)}" for edge in dot_edges()),
        "}",
    ]
    return "\n".join(lines) + "\n"


# -- rendering -----------------------------------------------------------------------------


def _format(fmt: DiagramFormat | str) -> DiagramFormat:
    try:
        return DiagramFormat(fmt)
    except ValueError:
        msg = f"unknown diagram format {fmt!r}; valid: {', '.join(DiagramFormat)}"
        raise ConfigurationError(msg) from None


def _graphviz(source: str, fmt: DiagramFormat) -> bytes:
    dot = shutil.which("dot")
    if dot is None:
        msg = f"{fmt} needs Graphviz's dot program, which is not on PATH: {GRAPHVIZ_HINT}"
        raise ConfigurationError(msg)
    done = subprocess.run(  # noqa: S603 (dot from PATH, reading our own DOT on stdin)
        [dot, f"-T{fmt}"], input=source.encode(), capture_output=True, check=False, timeout=120
    )
    if done.returncode:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        msg = f"dot -T{fmt} failed: {said[0] if said else f'exit status {done.returncode}'}"
        raise ConfigurationError(msg)
    return done.stdout


def render(view: DiagramView, fmt: DiagramFormat | str = DiagramFormat.MERMAID) -> bytes:
    """Render ``view`` as ``fmt``: Mermaid and DOT need nothing, SVG and PNG need ``dot``."""
    fmt = _format(fmt)
    if fmt is DiagramFormat.MERMAID:
        return _mermaid(view).encode()
    source = _dot(view)
    return _graphviz(source, fmt) if fmt in _GRAPHVIZ_FORMATS else source.encode()


def render_text(view: DiagramView, fmt: DiagramFormat | str = DiagramFormat.MERMAID) -> str:
    """Render ``view`` as text: Mermaid, DOT or SVG (PNG is binary: ``render`` it)."""
    fmt = _format(fmt)
    if fmt not in _TEXT_FORMATS:
        msg = f"{fmt} is an image, not text; text formats: {', '.join(_TEXT_FORMATS)}"
        raise ConfigurationError(msg)
    return render(view, fmt).decode()


# -- the committed docs: diagrams/ ---------------------------------------------------------

DOCS_FILES: Final = ("learner.md", "learner.dot", "learner.svg")
"""What ``diagrams/`` holds, all generated from the table (and the README's path table)."""

_CHECKOUT: Final = Path(__file__).resolve().parents[1]
_PATH_TABLE: Final = "### The path table"


def _path_table(readme: Path) -> str:
    """Return the README's path-table section, its one written copy, as a level-2 section."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as exc:
        msg = (
            f"cannot read the path table from {readme} ({exc.strerror or exc}); diagrams/ is "
            "generated in a checkout of fsm_learner"
        )
        raise ConfigurationError(msg) from None
    if _PATH_TABLE not in text:
        msg = f"{readme} has no {_PATH_TABLE!r} section to copy into learner.md"
        raise ConfigurationError(msg)
    section = re.split(r"^#", text.split(_PATH_TABLE, 1)[1], maxsplit=1, flags=re.MULTILINE)[0]
    return f"## The path table\n\n{section.strip()}\n"


def _learner_md(readme: Path) -> str:
    return (
        "# The fsm_learner state machine\n\n"
        "Generated from `fsm_learner.TRANSITION_TABLE` (and the README's path table) by "
        "`make diagrams`; do not edit. `fsm-learner diagram --check` fails when a file here "
        "differs from what the table generates.\n\n"
        f"```mermaid\n{_mermaid(table_view())}```\n\n"
        "The same machine drawn by Graphviz ([learner.dot](learner.dot)): the cancels, dashed "
        "orange, and the failure, dashed red, leave the box of every state they leave from.\n\n"
        f"![the transition table](learner.svg)\n\n{_path_table(readme)}"
    )


def _docs(readme: Path, *, svg: bool) -> dict[str, bytes]:
    files = {
        "learner.md": _learner_md(readme).encode(),
        "learner.dot": render(table_view(), DiagramFormat.DOT),
    }
    if svg:
        files["learner.svg"] = render(table_view(), DiagramFormat.SVG)
    return files


def write_docs(directory: Path | None = None, *, readme: Path | None = None) -> list[Path]:
    """Regenerate the docs (default: the checkout's ``diagrams/``); return the paths written."""
    directory = directory if directory is not None else _CHECKOUT / "diagrams"
    files = _docs(readme or _CHECKOUT / "README.md", svg=shutil.which("dot") is not None)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    if len(files) < len(DOCS_FILES):
        msg = f"wrote {', '.join(files)} but not learner.svg, which needs dot: {GRAPHVIZ_HINT}"
        raise ConfigurationError(msg)
    return [directory / name for name in files]


_SVG_VERSION: Final = re.compile(rb"<!-- Generated by graphviz version (\S+)")
_SVG_TEXT: Final = re.compile(rb"<(?:text|title)\b[^>]*>([^<]*)</(?:text|title)>")


def _same_svg(committed: bytes, fresh: bytes) -> bool:
    """Compare bytes; across Graphviz versions, which move shapes, compare titles and texts."""
    if committed == fresh:
        return True
    found = (_SVG_VERSION.search(committed), _SVG_VERSION.search(fresh))
    versions = {m.group(1) for m in found if m}
    if len(versions) < 2:
        return False
    return sorted(_SVG_TEXT.findall(committed)) == sorted(_SVG_TEXT.findall(fresh))


def check_docs(
    directory: Path | None = None, *, readme: Path | None = None
) -> tuple[list[Path], list[str]]:
    """Compare the docs with what the table generates: (stale files, notes on what was skipped).

    Mermaid, DOT and Markdown must match exactly; the SVG is regenerated where ``dot`` is
    installed and compared byte for byte (text for text across Graphviz versions).
    """
    directory = directory if directory is not None else _CHECKOUT / "diagrams"
    has_dot = shutil.which("dot") is not None
    fresh = _docs(readme or _CHECKOUT / "README.md", svg=has_dot)
    stale = []
    for name, content in fresh.items():
        path = directory / name
        committed = path.read_bytes() if path.is_file() else b""
        same = _same_svg(committed, content) if name.endswith(".svg") else committed == content
        if not same:
            stale.append(path)
    skipped = [] if has_dot else [f"{directory / 'learner.svg'} not checked: {GRAPHVIZ_HINT}"]
    return stale, skipped
