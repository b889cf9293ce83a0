"""State diagrams drawn from the transition table: the table's, a learner's and a run's view.

The graph is the ``transitions`` ``GraphMachine`` that ``build_machine`` builds from
``TRANSITION_TABLE``: its states, and its transitions (one per source, guards as
conditions), are what is drawn; each transition's row of the table adds its hook and its
cancel exception. The loop never uses that machine (it restyles its graph on every
transition); this module only reads it, and is imported only when a diagram is drawn.

Formats: Mermaid ``stateDiagram-v2`` and Graphviz DOT are text written here, with no
extra dependency; SVG and PNG are that DOT rendered by Graphviz's ``dot`` program.

The rows with many sources (a cancel leaves every state of the unit it cancels, ``fail``
every state) are drawn compactly in DOT. The units of work (fit, pass, batch: the states
in which each is in progress, as ``cleanup_hooks`` reads them) that some row leaves from
every state of are clusters ("batch in progress", ...), nested as the units nest; such a
row is one edge leaving the outermost cluster it leaves, plus one edge per source left over
(``fail`` loops on ``idle``; ``preempt``, which leaves a fit from ``fit`` and ``epoch``
but never from inside a batch, is one edge from each). Mermaid cannot draw an edge
between states of different composite states, so there each source has its own edge,
and the transitions between the same two states share one edge, their labels joined by
`` | ``.

Views: ``table_view()`` labels each edge with its trigger, guard and hooks: the row's
own, then the cleanup hooks of the units the transition leaves, innermost first (one
that runs only in some runs, ``cleanup_fit`` on a cancel that also ends validate runs,
carries the guard that says which: ``cleanup_fit [fitting]``); ``callbacks_view(cbs)``
adds the callbacks that run on each of those hooks, in order; ``run_view(log)`` labels
each edge with how many times one audited run (a fit, a validate or a predict run) took
it, greys what the run never took, and marks the failure edge; given the logs of a fit's
ranks, it draws the run once, when every rank is there and the ranks are lockstep.

``path_table()`` is the path table (which hooks fire, in order, on the normal, cancel and
failure paths of each kind of run), generated from the table as well; ``write_docs``
writes it, with the diagrams, into ``diagrams/`` and between markers in the README.

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
from fsm_learner._display import exception_text, file_name, printable, shown
from fsm_learner.audit.codec import FailureField, Field
from fsm_learner.callback import resolve_dispatch, validate_callbacks
from fsm_learner.exceptions import ConfigurationError
from fsm_learner.machine import (
    GUARDS,
    HOOK_OF,
    MODES,
    Guard,
    Hook,
    Mode,
    Routes,
    RunKind,
    State,
    TransitionSpec,
    Trigger,
    cleanup_hooks,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from fsm_learner.audit.replay import RunReport
    from fsm_learner.learner import Learner

__all__ = [
    "DOCS_FILES",
    "GRAPHVIZ_HINT",
    "PATH_TABLE_END",
    "PATH_TABLE_START",
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
    "path_table",
    "readme_with_docs",
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

    @property
    def hooks(self) -> tuple[tuple[Hook, Guard | None], ...]:
        """The hooks the arrow runs: the row's, then its cleanups, innermost first.

        The cleanups are those of the units left from any of its sources; each with the
        guard that says in which runs it runs, when not in all the arrow's runs.
        """
        return ((self.spec.hook, None), *_cleanups(self.spec, self.sources))


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


@cache
def _compiled(_table: tuple[TransitionSpec, ...]) -> Mapping[Mode, Routes]:
    """Compile the routes of the machine built from the table, once per table (the key)."""
    return machine.compile_routes(machine.build_machine())


def _routes() -> Mapping[Mode, Routes]:
    """Return the routes of the table as it is now (a test may have replaced it)."""
    return _compiled(machine.TRANSITION_TABLE)


def _modes_taking(spec: TransitionSpec, source: State) -> list[Mode]:
    """Return the modes that route ``spec``'s trigger from ``source`` to its dest.

    Those that can reach ``source``; all that route it when none can (the table's
    ``cancel_epoch [inferring]`` leaves ``step``, which only a fit reaches).
    """
    routes = _routes()
    taking = [mode for mode in MODES if routes[mode][source].get(spec.trigger) is spec.dest]
    return [mode for mode in taking if source in _reached(mode)] or taking


def _reached(mode: Mode) -> frozenset[State]:
    """Return the states a run in ``mode`` reaches from idle (a validate run never fit)."""
    routes = _routes()[mode]
    found, frontier = {State.IDLE}, {State.IDLE}
    while frontier:
        frontier = {dest for state in frontier for dest in routes[state].values()} - found
        found |= frontier
    return frozenset(found)


def _cleanups(spec: TransitionSpec, sources: Iterable[State]) -> list[tuple[Hook, Guard | None]]:
    """Return the cleanups a row runs from ``sources``, each with the guard of where it runs."""
    taking: set[Mode] = set()
    running: dict[Hook, set[Mode]] = {}
    for source in sources:
        for mode in _modes_taking(spec, source):
            taking.add(mode)
            for hook in cleanup_hooks(source, spec.dest, mode[0]):
                running.setdefault(hook, set()).add(mode)
    order = list(Hook)  # declares the cleanups innermost first, as cleanup_hooks runs them
    return [
        (hook, None if modes == taking else _guard_of(modes, taking))
        for hook, modes in sorted(running.items(), key=lambda item: order.index(item[0]))
    ]


def _guard_of(modes: set[Mode], among: set[Mode]) -> Guard:
    """Return the guard that holds, of the modes ``among``, in exactly ``modes``."""
    for guard, holds in GUARDS.items():
        if {mode for mode in among if holds(*mode)} == modes:
            return guard
    msg = f"no guard holds in exactly the modes {sorted(modes)} of {sorted(among)}"
    raise LookupError(msg)


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


def _units() -> list[frozenset[State]]:
    """Return the units of work, each as the states it is in progress in; they nest.

    A unit is in progress where leaving for ``idle`` (in a fit, which opens them all)
    runs its cleanup hook.
    """
    open_in: dict[Hook, set[State]] = {}
    for state in State:
        for hook in cleanup_hooks(state, State.IDLE, RunKind.FIT):
            open_in.setdefault(hook, set()).add(state)
    return [frozenset(states) for states in open_in.values()]


def _outermost(states: frozenset[State]) -> str:
    """Name a cluster after its outermost state (``State`` declares them outermost first)."""
    return str(next(s for s in State if s in states))


def clusters() -> tuple[Cluster, ...]:
    """Return the units some multi-source row leaves from each of their states, outermost first.

    A row whose sources hold no whole unit (``preempt``: ``fit`` and ``epoch``, not the
    batch's states) makes no cluster; it is drawn one edge per source.
    """
    left = [
        frozenset(spec.sources) - {spec.dest}
        for spec in machine.TRANSITION_TABLE
        if len(spec.sources) > 1
    ]
    boxed = [unit for unit in _units() if len(unit) > 1 and any(unit <= s for s in left)]
    ordered = sorted(boxed, key=lambda s: (-len(s), [i for i, x in enumerate(State) if x in s]))
    return tuple(
        Cluster(f"cluster_{_outermost(s)}", f"{_outermost(s)} in progress", s) for s in ordered
    )


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


def run_view(
    path: Path | Sequence[Path], *, run_id: str | None = None, key: bytes | None = None
) -> DiagramView:
    """Show the path one audited run took; it must verify.

    ``path`` is one log (the run: its last unless ``run_id``), or several (the logs of a
    run's ranks, say): the run is then the one each of them ends with, unless ``run_id``.
    The run may be of any kind: a fit, a validate or a predict run. A fit across ranks
    (its header has a ``world_size``) is drawn once, from its lowest rank's log, when the
    logs given hold every rank and the ranks are lockstep (``fsm_learner.audit.ranks``);
    the title says which ranks it covers. One rank's log alone is drawn as that rank's.
    """
    paths = [path] if isinstance(path, Path) else list(path)
    if len(paths) == 1:
        report, ranks = _verified_run(paths[0], run_id, key), ""
        world = _world_size(report)
        if world > 1:
            ranks = f", rank {shown(report.header.get(Field.RANK.value))} of {world} only"
    else:
        report, ranks = _verified_ranks(paths, run_id, key)
    failed_in = None if report.failed_at is None else State(report.failed_at["state"])
    kind = report.kind or RunKind.FIT  # a run that verifies has a kind
    title = f"{kind} run {_clip(report.run_id, _RUN_ID_SHOWN)} ({report.status}){ranks}"
    return DiagramView(
        f"fsm_learner: {title}",
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


def _world_size(report: RunReport) -> int:
    from fsm_learner.audit.ranks import world_size_of  # noqa: PLC0415 (only this view)

    return world_size_of(report.header)


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


def _verified_ranks(
    paths: Sequence[Path], run_id: str | None, key: bytes | None
) -> tuple[RunReport, str]:
    """Return the run the logs hold (its lowest rank's report), and the ranks it covers.

    Several logs hold one run: the ranks of a fit across ranks, all there and lockstep.
    """
    from fsm_learner.audit.ranks import check_ranks  # noqa: PLC0415 (only this view)

    chosen = _chosen_runs(paths, run_id, key)
    name = _clip(chosen[0][0].run_id, _RUN_ID_SHOWN)
    for report, _ in chosen:
        if not report.verified:
            msg = f"run {name} ({report.path}) does not verify: {report.problem}"
            raise ConfigurationError(msg)
    if Field.WORLD_SIZE.value not in chosen[0][0].header:  # an invalid one: checked below
        if len(chosen) == 1:
            return chosen[0][0], ""
        files = ", ".join(report.path for report, _ in chosen[:3])
        msg = (
            f"run {name} is in {len(chosen)} of the logs ({files}) and is no fit across "
            "ranks (its header has no world_size): give one of them"
        )
        raise ConfigurationError(msg)
    ranks = check_ranks(chosen)
    problems = ranks.all_problems()
    if problems:
        raise ConfigurationError(str(problems[0]))
    lowest = min(chosen, key=lambda found: found[0].header[Field.RANK.value])[0]
    world = _world_size(lowest)  # every rank's says it, a valid one: no problem was found
    return lowest, f", ranks 0-{world - 1} of {world}, lockstep"


def _chosen_runs(
    paths: Sequence[Path], run_id: str | None, key: bytes | None
) -> list[tuple[RunReport, Path]]:
    """Audit the logs; return the runs of ``run_id`` (default: the run every log ends with)."""
    from fsm_learner.audit.replay import FileAudit, RunSet  # noqa: PLC0415 (only this view)

    runs = RunSet()
    found: list[tuple[RunReport, Path]] = []
    last: list[tuple[RunReport, Path]] = []
    ids: dict[str, None] = {}
    for path in paths:
        audit = FileAudit(path, key=key)
        ending: RunReport | None = None
        for report in audit:  # streamed: only the chosen runs are kept
            runs.add(report)
            if len(ids) < _RUN_IDS_LISTED:
                ids[_clip(report.run_id, _RUN_ID_SHOWN)] = None
            if report.run_id == run_id:
                found.append((report, path))
            ending = report
        if audit.problem is not None:
            msg = f"{audit.problem} (fsm-learner audit does not verify it)"
            raise ConfigurationError(msg)
        if ending is not None:
            last.append((ending, path))
    if run_id is None:
        found = last
        endings = sorted({report.run_id for report, _ in last})
        if len(endings) > 1:
            listed = ", ".join(_clip(e, _RUN_ID_SHOWN) for e in endings[:_RUN_IDS_LISTED])
            msg = f"the logs end with different runs ({listed}): choose one with --run-id"
            raise ConfigurationError(msg)
    if not found:
        msg = f"no run {shown(run_id)} in the {len(paths)} logs; their runs: {', '.join(ids)}"
        raise ConfigurationError(msg)
    return found


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


def _hook_text(hook: Hook, guard: Guard | None) -> str:
    return f"{hook} [{guard}]" if guard is not None else str(hook)


def _calls(view: DiagramView, hook: Hook) -> list[str]:
    return list(view.calls[hook]) if view.calls is not None else []


def _dot_label(view: DiagramView, edge: Edge) -> list[str]:
    spec = edge.spec
    first = f"{spec.trigger}{_guard(spec, cancels=True)}"
    if view.counts is not None:
        failure = printable(view.failure)
        failed = [f"failed in {view.failed_in}: {failure}"] if _is_failure(view, edge) else []
        return [f"{first} {_TIMES}{_count(view, edge)}", *failed]
    hooks = []
    for hook, guard in edge.hooks:
        calls = [printable(call) for call in _calls(view, hook)]
        hooks.append(_hook_text(hook, guard) + (f": {', '.join(calls)}" if calls else ""))
    # two lines at most: taller labels of a row's edges overlap the box around the row
    return [first, f"/ {'; '.join(hooks)}"]


_MERMAID_ENTITIES: Final = str.maketrans({c: f"#{ord(c)};" for c in '#:;%{}<>"|`'})
_MERMAID_DIRECTION: Final = re.compile(r"(direction) ", re.IGNORECASE)


def _mermaid_text(text: str) -> str:
    """Make outside text inert in a Mermaid label: one line, no character its lexer acts on.

    Inside a transition's label Mermaid's state-diagram lexer stops at ``:``, ``;`` and
    a newline, and reads a whole line with ``direction`` and a space in it as a
    direction statement; its entity codes (``#59;``) are decoded only when drawing.
    """
    return _MERMAID_DIRECTION.sub(r"\1#32;", printable(text).translate(_MERMAID_ENTITIES))


_MERMAID_COLON: Final = _mermaid_text(":")
_MERMAID_SEMICOLON: Final = _mermaid_text(";")


def _mermaid_label(view: DiagramView, edge: Edge) -> str:
    """Label an arrow: the trigger, its guard, and the count, or the callbacks on its hooks.

    The row's own hook goes unnamed (the trigger names it); a cleanup hook is named before
    its callbacks, ``; cleanup_batch: Cb(order=0)`` with ``:`` and ``;`` as entity codes.
    """
    spec = edge.spec
    text = f"{spec.trigger}{_guard(spec, cancels=False)}"
    if view.counts is not None:
        failure = _mermaid_text(view.failure)
        failed = f" (failed here, {failure})" if _is_failure(view, edge) else ""
        return f"{text} {_TIMES}{_count(view, edge)}{failed}"
    (own, _), *cleanups = edge.hooks
    parts = [", ".join(_mermaid_text(c) for c in _calls(view, own))]
    for hook, guard in cleanups:
        calls = ", ".join(_mermaid_text(c) for c in _calls(view, hook))
        if calls:
            parts.append(f"{_mermaid_text(_hook_text(hook, guard))}{_MERMAID_COLON} {calls}")
    calls = f"{_MERMAID_SEMICOLON} ".join(part for part in parts if part)
    return f"{text} / {calls}" if calls else text


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
    """Each state's distance from idle along the rows a fit may take: it ranks the states.

    A fit nests the most units (fit, pass, batch), so its ways forward rank them all;
    a validate run's shortcut (``idle -> epoch``) then points down the ranks too.
    """
    fitting = [mode for mode in MODES if mode[0] is RunKind.FIT]
    rows = [s for s in table if s.guard is None or any(GUARDS[s.guard](*m) for m in fitting)]
    depth, frontier = {State.IDLE: 0}, {State.IDLE}
    while frontier:
        step = len(set(depth.values()))
        frontier = {
            spec.dest for spec in rows if spec.dest not in depth and frontier & set(spec.sources)
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


# -- the path table ------------------------------------------------------------------------

_ABORTS: Final = frozenset(
    spec.trigger for spec in machine.TRANSITION_TABLE if spec.cancel or spec.trigger is Trigger.FAIL
)
"""Triggers that abandon units of work: the cancels, and ``fail``."""
_NEXT: Final = {State.EPOCH: "the next batch", State.FIT: "the next pass", State.IDLE: "idle"}
"""What follows an abandoned unit, by the state the abandoning transition goes to."""


def _code(hooks: Iterable[Hook]) -> str:
    return ", ".join(f"`{hook}`" for hook in hooks)


def _route(mode: Mode, source: State, trigger: Trigger) -> tuple[State, list[Hook]]:
    """Take ``trigger`` from ``source`` in ``mode``: where it goes, and the hooks it runs."""
    dest = _routes()[mode][source][trigger]
    return dest, [HOOK_OF[trigger], *cleanup_hooks(source, dest, mode[0])]


def _batch_path(mode: Mode) -> list[Hook]:
    """Return the hooks of a batch completed in ``mode``: from ``epoch`` back to ``epoch``."""
    routes = _routes()[mode]
    state, hooks = _route(mode, State.EPOCH, Trigger.BEGIN_BATCH)
    while state is not State.EPOCH:
        ahead = [trigger for trigger in routes[state] if trigger not in _ABORTS]
        if len(ahead) != 1:
            msg = f"a batch in {mode} has {len(ahead)} ways on from {state} ({ahead}), not one"
            raise LookupError(msg)
        state, more = _route(mode, state, ahead[0])
        hooks += more
    return hooks


def _unit_path(mode: Mode, outside: State, inside: str, *, begin: Trigger, end: Trigger) -> str:
    """Describe a unit that completes: its begin hooks, what runs ``inside``, its end hooks."""
    _, first = _route(mode, outside, begin)
    inner = _routes()[mode][outside][begin]
    _, last = _route(mode, inner, end)
    return f"{_code(first)}, then {inside}, then {_code(last)}"


def _kinds_text(modes: Iterable[Mode]) -> str:
    kinds = dict.fromkeys(kind for kind, _ in sorted(modes, key=MODES.index))
    return f"in a {' or '.join(kinds)} run"


def _abort_path(trigger: Trigger) -> str:
    """Describe the hooks an abandoning trigger runs, from wherever it fires, then what next.

    Its own hook, then the cleanups of the units it leaves, innermost first, each with
    when it runs if not always: only with its unit in progress, or only in some kinds of
    run.
    """
    taking: set[Mode] = set()
    sources: set[State] = set()
    running: dict[Hook, set[tuple[Mode, State]]] = {}
    nexts: dict[State, set[Mode]] = {}
    for spec in (s for s in machine.TRANSITION_TABLE if s.trigger is trigger):
        for source in spec.sources:
            for mode in _modes_taking(spec, source):
                taking.add(mode)
                sources.add(source)
                nexts.setdefault(spec.dest, set()).add(mode)
                for hook in cleanup_hooks(source, spec.dest, mode[0]):
                    running.setdefault(hook, set()).add((mode, source))
    order = list(Hook)  # declares the cleanups innermost first
    cells = [f"`{HOOK_OF[trigger]}`"]
    for hook in sorted(running, key=order.index):
        modes = {mode for mode, _ in running[hook]}
        if {source for _, source in running[hook]} != sources:
            cells.append(f"`{hook}` ({hook.removeprefix('cleanup_')} in progress)")
        elif modes != taking:
            cells.append(f"`{hook}` ({_kinds_text(modes)})")
        else:
            cells.append(f"`{hook}`")
    if len(nexts) == 1:
        after = _NEXT[next(iter(nexts))]
    else:
        after = ", ".join(f"{_NEXT[dest]} {_kinds_text(m)}" for dest, m in nexts.items())
    raised = " and the exception is re-raised" if trigger is Trigger.FAIL else ""
    return f"{', '.join(cells)}, then {after}{raised}"


_BATCHES: Final = {
    "training batch": (RunKind.FIT, True),
    "validation batch": (RunKind.FIT, False),
    "validate batch": (RunKind.VALIDATE, False),
    "predict batch": (RunKind.PREDICT, False),
}
"""The batches of the path table: one per mode, those with the same hooks named once."""


def path_table() -> str:
    """Return the path table: which hooks fire, in order, on each path, as a Markdown table.

    Generated from the table: the units' begin and end hooks, every mode's batch (one
    row for the modes whose batches run the same hooks), and the hooks of the cancels,
    the preemption and the failure from wherever they fire, cleanups included.
    """
    batches: dict[str, list[Hook]] = {}
    name_of: dict[Mode, str] = {}
    for name, mode in _BATCHES.items():
        hooks = _batch_path(mode)
        name_of[mode] = next((n for n, h in batches.items() if h == hooks), name)
        batches.setdefault(name_of[mode], hooks)
    fit = (RunKind.FIT, False)
    rows = {
        "fit": _unit_path(
            fit,
            State.IDLE,
            "per epoch the training pass and the validation pass",
            begin=Trigger.BEGIN_FIT,
            end=Trigger.END_FIT,
        ),
        "pass": _unit_path(
            fit, State.FIT, "each batch", begin=Trigger.BEGIN_EPOCH, end=Trigger.END_EPOCH
        ),
        **{
            f"{mode[0]} run": _unit_path(
                mode,
                State.IDLE,
                f"each batch as a {name_of[mode]}",
                begin=Trigger.BEGIN_EPOCH,
                end=Trigger.END_EPOCH,
            )
            for mode in MODES
            if mode[0] is not RunKind.FIT
        },
        **{name: _code(hooks) for name, hooks in batches.items()},
        **{
            trigger.value.replace("_", " "): _abort_path(trigger)
            for trigger in (
                Trigger.CANCEL_BATCH,
                Trigger.CANCEL_EPOCH,
                Trigger.CANCEL_FIT,
                Trigger.PREEMPT,
            )
        },
        "failure": _abort_path(Trigger.FAIL),
    }
    lines = ["| path | hooks, in order |", "|---|---|"]
    lines += [f"| {path} | {hooks} |" for path, hooks in rows.items()]
    return "\n".join(lines) + "\n"


# -- the committed docs: diagrams/ and the README's generated parts ------------------------

DOCS_FILES: Final = ("learner.md", "learner.dot", "learner.svg")
"""What ``diagrams/`` holds, all generated from the table."""

_CHECKOUT: Final = Path(__file__).resolve().parents[1]
PATH_TABLE_START: Final = (
    "<!-- the path table: generated from the transition table by `make diagrams`; do not edit -->"
)
PATH_TABLE_END: Final = "<!-- end of the path table -->"
_PATH_TABLE_HEADING: Final = "### The path table"
_MERMAID_BLOCK: Final = re.compile(r"```mermaid\n.*?```\n", re.DOTALL)
_TABLE_LINES: Final = re.compile(r"^(?:\|.*\n)+", re.MULTILINE)


def _learner_md() -> str:
    return (
        "# The fsm_learner state machine\n\n"
        "Generated from `fsm_learner.TRANSITION_TABLE` by `make diagrams`; do not edit. "
        "`fsm-learner diagram --check` fails when a file here differs from what the table "
        "generates.\n\n"
        f"```mermaid\n{_mermaid(table_view())}```\n\n"
        "The same machine drawn by Graphviz ([learner.dot](learner.dot)), each transition with "
        "its hooks: its own, then the cleanup hooks of the units it leaves, innermost first. The "
        "cancels, dashed orange, and the failure, dashed red, leave the box of every state they "
        "leave from, running the cleanups of the units in progress there; a hook that runs in "
        "some kinds of run only carries the guard that says which (`cleanup_fit [fitting]`). "
        "`preempt`, which stops a fit at a boundary (between two batches or two passes), "
        "leaves from `fit` and `epoch` only: an edge from each.\n\n"
        "![the transition table](learner.svg)\n\n"
        "## The path table\n\n"
        "Which hooks fire, in order, on each path, cleanup hooks included; one in parentheses "
        "runs only as they say.\n\n"
        f"{path_table()}"
    )


def readme_with_docs(text: str, *, name: str = "README.md") -> str:
    """Return the README ``text`` with its generated parts as the table generates them.

    Those are its one Mermaid block (the table's diagram) and the path table between its
    markers; a README with no markers yet gets them around the table of its
    ``### The path table`` section. Raise ConfigurationError naming what is missing.
    """
    return _with_path_table(_with_diagram(text, name), name)


def _with_diagram(text: str, name: str) -> str:
    blocks = _MERMAID_BLOCK.findall(text)
    if len(blocks) != 1:
        msg = f"{name} has {len(blocks)} Mermaid blocks; it must have one: the table's diagram"
        raise ConfigurationError(msg)
    return _MERMAID_BLOCK.sub(lambda _: f"```mermaid\n{_mermaid(table_view())}```\n", text)


def _with_path_table(text: str, name: str) -> str:
    generated = f"{PATH_TABLE_START}\n\n{path_table()}\n{PATH_TABLE_END}\n"
    head, start, rest = text.partition(PATH_TABLE_START + "\n")
    if start:
        _, end, tail = rest.partition(PATH_TABLE_END + "\n")
        if not end:
            msg = f"{name} has the path table's start marker but not its end: {PATH_TABLE_END}"
            raise ConfigurationError(msg)
        return head + generated + tail
    head, heading, rest = text.partition(_PATH_TABLE_HEADING + "\n")
    table = _TABLE_LINES.search(rest.split("\n#", 1)[0])
    if not heading or table is None:
        msg = (
            f"{name} has no path table to generate: neither its markers nor a table in a "
            f"{_PATH_TABLE_HEADING!r} section"
        )
        raise ConfigurationError(msg)
    return head + heading + rest[: table.start()] + generated + rest[table.end() :]


def _docs(*, svg: bool) -> dict[str, bytes]:
    files = {
        "learner.md": _learner_md().encode(),
        "learner.dot": render(table_view(), DiagramFormat.DOT),
    }
    if svg:
        files["learner.svg"] = render(table_view(), DiagramFormat.SVG)
    return files


def _readme_of(directory: Path | None, readme: Path | None) -> Path | None:
    """Return the README whose generated parts go with the docs (the checkout's with its own)."""
    if readme is not None:
        return readme
    return _CHECKOUT / "README.md" if directory is None else None


def _read(readme: Path) -> str:
    try:
        return readme.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else None
        msg = (
            f"cannot read {file_name(readme)} ({reason or exc}); its generated parts are "
            "written in a checkout of fsm_learner"
        )
        raise ConfigurationError(msg) from None


def write_docs(directory: Path | None = None, *, readme: Path | None = None) -> list[Path]:
    """Regenerate the docs; return the paths written.

    The docs are ``diagrams/`` (or ``directory``) and the generated parts of ``readme``
    (by default the checkout's README, with the checkout's ``diagrams/``; none with another
    directory), which is written only when they changed.
    """
    readme = _readme_of(directory, readme)
    directory = directory if directory is not None else _CHECKOUT / "diagrams"
    files = _docs(svg=shutil.which("dot") is not None)
    paths = {directory / name: content for name, content in files.items()}
    if readme is not None:
        text = _read(readme)
        fresh = readme_with_docs(text, name=file_name(readme))
        if fresh != text:
            paths[readme] = fresh.encode()
    directory.mkdir(parents=True, exist_ok=True)
    for path, content in paths.items():
        path.write_bytes(content)
    if len(files) < len(DOCS_FILES):
        wrote = ", ".join(path.name for path in paths)
        msg = f"wrote {wrote} but not learner.svg, which needs dot: {GRAPHVIZ_HINT}"
        raise ConfigurationError(msg)
    return list(paths)


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

    The docs are those ``write_docs`` writes. Mermaid, DOT and Markdown must match exactly;
    the SVG is regenerated where ``dot`` is installed and compared byte for byte (text for
    text across Graphviz versions).
    """
    readme = _readme_of(directory, readme)
    directory = directory if directory is not None else _CHECKOUT / "diagrams"
    has_dot = shutil.which("dot") is not None
    fresh = _docs(svg=has_dot)
    stale = []
    for name, content in fresh.items():
        path = directory / name
        committed = path.read_bytes() if path.is_file() else b""
        same = _same_svg(committed, content) if name.endswith(".svg") else committed == content
        if not same:
            stale.append(path)
    if readme is not None:
        text = _read(readme)
        if readme_with_docs(text, name=file_name(readme)) != text:
            stale.append(readme)
    skipped = [] if has_dot else [f"{directory / 'learner.svg'} not checked: {GRAPHVIZ_HINT}"]
    return stale, skipped
