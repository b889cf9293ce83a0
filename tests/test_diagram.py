"""Diagrams drawn from the transition table: the three views, the formats, diagrams/ and the CLI.

The Mermaid and DOT outputs are parsed (a small parser for each, below), not grepped, and
compared with the table row by row.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import attrs
import pytest
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp

from fsm_learner import (
    TRANSITION_TABLE,
    Callback,
    CancelBatchException,
    CancelEpochException,
    ConfigurationError,
    DiagramFormat,
    Guard,
    Hook,
    InvalidCallbackError,
    Learner,
    RunKind,
    State,
    Trigger,
    machine,
)
from fsm_learner import diagram as dg
from fsm_learner.audit.codec import Field, RunStatus
from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.writer import AuditWriter
from fsm_learner.cli import main
from fsm_learner.testing import RecordingCallback

ROOT = Path(__file__).parents[1]
HAS_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="Graphviz's dot is not installed")

# every transition of the table, one per source
EXPANDED = Counter((spec.trigger, s, spec.dest) for spec in TRANSITION_TABLE for s in spec.sources)


def row(trigger: str, source: str, dest: str, table=TRANSITION_TABLE):
    """The row of the table a drawn transition stands for."""
    [found] = [
        spec
        for spec in table
        if spec.trigger == trigger and source in spec.sources and spec.dest == dest
    ]
    return found


def guard_text(spec, *, cancels: bool) -> str | None:
    if spec.guard is not None:
        return str(spec.guard)
    return spec.cancel.__name__ if cancels and spec.cancel else None


# -- a parser for the Mermaid we write -------------------------------------------------------


@attrs.frozen
class Mermaid:
    states: set[str]
    start: list[str]
    edges: list[tuple[str, str, list[str]]]
    """(source, dest, the label of each transition the arrow stands for)."""


def parse_mermaid(text: str) -> Mermaid:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "stateDiagram-v2"
    states, start, edges = set(), [], []
    for line in lines[1:]:
        if line.startswith("%%"):
            continue
        arrow = re.fullmatch(r"(\S+) --> (\S+)(?: : (.+))?", line)
        if arrow is None:
            assert re.fullmatch(r"\w+", line), f"not a state declaration: {line!r}"
            states.add(line)
        elif arrow[1] == "[*]":
            start.append(arrow[2])
        else:
            edges.append((arrow[1], arrow[2], arrow[3].split(" | ")))
    assert {s for e in edges for s in e[:2]} <= states
    return Mermaid(states, start, edges)


MERMAID_PART = re.compile(r"(?P<trigger>\w+)(?: \[(?P<guard>\w+)\])?(?P<rest>.*)")


def mermaid_transitions(parsed: Mermaid):
    """Yield (trigger, source, dest, guard, rest of the label) per transition drawn."""
    for src, dst, parts in parsed.edges:
        for part in parts:
            m = MERMAID_PART.fullmatch(part)
            assert m, part
            yield m["trigger"], src, dst, m["guard"], m["rest"]


# -- a parser for the DOT we write ------------------------------------------------------------

DOT_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<arrow>->)|(?P<punct>[{}\[\];,=])|(?P<id>[\w.]+))'
)


def tokens(text: str) -> list[str]:
    found, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = DOT_TOKEN.match(text, pos)
        assert m, f"cannot read DOT at {text[pos : pos + 30]!r}"
        found.append(m[0].strip())
        pos = m.end()
    return found


def unquote(token: str) -> str:
    if not token.startswith('"'):
        return token
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], token[1:-1])


@attrs.define
class Dot:
    graph: dict[str, str] = attrs.Factory(dict)
    nodes: dict[str, dict[str, str]] = attrs.Factory(dict)
    edges: list[tuple[str, str, dict[str, str]]] = attrs.Factory(list)
    clusters: dict[str, set[str]] = attrs.Factory(dict)
    """Each cluster with every node inside it, nested clusters' included."""
    same_rank: list[list[str]] = attrs.Factory(list)


class DotParser:
    """Reads the statements our DOT uses: attributes, nodes, edges, (nested) subgraphs."""

    def __init__(self, text: str):
        self.toks, self.pos, self.dot = tokens(text), 0, Dot()

    def take(self) -> str:
        self.pos += 1
        return self.toks[self.pos - 1]

    def attr_list(self) -> dict[str, str]:
        values = {}
        if self.toks[self.pos] != "[":
            return values
        self.take()
        while self.toks[self.pos] != "]":
            key = self.take()
            assert self.take() == "="
            values[key] = unquote(self.take())
            if self.toks[self.pos] == ",":
                self.take()
        self.take()
        return values

    def block(self, enclosing: list[str]) -> None:
        ids: list[str] = []
        rank = False
        while self.toks[self.pos] != "}":
            first = self.take()
            if first == ";":
                continue
            if first in {"graph", "node", "edge"}:
                values = self.attr_list()
                if first == "graph":
                    self.dot.graph.update(values)
            elif first == "subgraph":
                name = self.take()
                assert self.take() == "{"
                self.dot.clusters[name] = set()
                self.block([*enclosing, name])
            elif first == "{":
                self.block(enclosing)
            elif self.toks[self.pos] == "=":
                self.take()
                rank = rank or (first, unquote(self.take())) == ("rank", "same")
            elif self.toks[self.pos] == "->":
                self.take()
                self.dot.edges.append((first, self.take(), self.attr_list()))
            else:
                self.node(first, enclosing)
                ids.append(first)
        self.take()
        if rank:
            self.dot.same_rank.append(ids)

    def node(self, name: str, enclosing: list[str]) -> None:
        self.dot.nodes.setdefault(name, {}).update(self.attr_list())
        for cluster in enclosing:
            self.dot.clusters[cluster].add(name)


def parse_dot(text: str) -> Dot:
    parser = DotParser(text)
    assert parser.toks[:3] == ["digraph", "fsm_learner", "{"], parser.toks[:3]
    parser.pos = 3
    parser.block([])
    assert parser.pos == len(parser.toks), parser.toks[parser.pos :]
    dot = parser.dot
    assert {n for e in dot.edges for n in e[:2]} <= set(dot.nodes)
    return dot


def dot_transitions(dot: Dot):
    """Yield (trigger, sources, dest, label lines, attrs) per DOT edge; a cluster's all sources."""
    for tail, head, values in dot.edges:
        lines = values["label"].split("\n")
        trigger = lines[0].split(" ")[0]
        cluster = values.get("ltail")
        sources = dot.clusters[cluster] if cluster else {tail}
        assert tail in sources
        yield trigger, sources, head, lines, values


# -- the table's view ------------------------------------------------------------------------

# What each DOT arrow of the table view runs: its hook, then the cleanup hooks of the units
# it leaves, innermost first; cleanup_fit only where a fit is left ([fitting] where the
# arrow also ends validate and predict runs, which open no fit).
DOT_HOOKS = {
    ("begin_fit", "idle", "fit"): "before_fit",
    ("begin_epoch", "fit", "epoch"): "before_epoch",
    ("begin_epoch", "idle", "epoch"): "before_epoch",
    ("begin_batch", "epoch", "batch"): "before_batch",
    ("predict", "batch", "predict"): "after_predict",
    ("compute_loss", "predict", "loss"): "after_loss",
    ("backward", "loss", "backward"): "after_backward",
    ("step", "backward", "step"): "after_step",
    ("end_batch", "step", "epoch"): "after_batch; cleanup_batch",
    ("end_batch", "loss", "epoch"): "after_batch; cleanup_batch",
    ("end_batch", "predict", "epoch"): "after_batch; cleanup_batch",
    ("end_epoch", "epoch", "fit"): "after_epoch; cleanup_epoch",
    ("end_epoch", "epoch", "idle"): "after_epoch; cleanup_epoch",
    ("end_fit", "fit", "idle"): "after_fit; cleanup_fit",
    ("cancel_batch", "batch", "epoch"): "after_cancel_batch; cleanup_batch",
    ("cancel_epoch", "epoch", "fit"): "after_cancel_epoch; cleanup_batch; cleanup_epoch",
    ("cancel_epoch", "epoch", "idle"): "after_cancel_epoch; cleanup_batch; cleanup_epoch",
    ("cancel_fit", "fit", "idle"): (
        "after_cancel_fit; cleanup_batch; cleanup_epoch; cleanup_fit [fitting]"
    ),
    # preempt stops a fit only, at a boundary: from fit (between passes), from epoch (between
    # batches); no batch is in progress, and no [fitting] on cleanup_fit: the row's guard says it
    ("preempt", "fit", "idle"): "after_preempt; cleanup_fit",
    ("preempt", "epoch", "idle"): "after_preempt; cleanup_epoch; cleanup_fit",
    ("fail", "fit", "idle"): "after_fail; cleanup_batch; cleanup_epoch; cleanup_fit [fitting]",
    ("fail", "idle", "idle"): "after_fail",
}


def hook_names(line: str) -> list[str]:
    """The hooks a DOT label's second line names, without guards or callbacks."""
    return [part.split(" ")[0].split(":")[0] for part in line.removeprefix("/ ").split("; ")]


class TestTableView:
    def test_mermaid_has_the_tables_states_and_transitions_and_nothing_else(self):
        """Every state, every transition (trigger, source, dest) once, each guard on its edge."""
        parsed = parse_mermaid(dg.render_text(dg.table_view(), "mermaid"))
        assert parsed.states == set(State)
        assert parsed.start == [State.IDLE]
        drawn = Counter()
        for trigger, src, dst, guard, rest in mermaid_transitions(parsed):
            drawn[trigger, src, dst] += 1
            assert guard == guard_text(row(trigger, src, dst), cancels=False)
            assert rest == ""
        assert drawn == EXPANDED
        assert {t for t, _, _ in drawn} == set(Trigger)
        # one arrow per pair of states: transitions between the same two share it
        pairs = [(src, dst) for src, dst, _ in parsed.edges]
        assert len(pairs) == len(set(pairs))

    def test_dot_has_the_tables_states_and_transitions_and_nothing_else(self):
        """Nodes are the states; the edges, a cluster standing for its states, are the table's."""
        dot = parse_dot(dg.render_text(dg.table_view(), "dot"))
        assert set(dot.nodes) == set(State)
        drawn = Counter()
        for trigger, sources, dest, lines, _ in dot_transitions(dot):
            spec = row(trigger, next(iter(sources)), dest)
            assert all(spec is row(trigger, s, dest) for s in sources)
            guard = guard_text(spec, cancels=True)
            assert lines[0] == (f"{trigger} [{guard}]" if guard else trigger)
            assert hook_names(lines[1])[0] == spec.hook
            drawn.update((Trigger(trigger), State(s), State(dest)) for s in sources)
        assert drawn == EXPANDED

    def test_dot_edges_run_their_hook_then_the_cleanups_of_the_units_they_leave(self):
        """Each arrow's second line: its hook, then its cleanups, innermost first (golden)."""
        dot = parse_dot(dg.render_text(dg.table_view(), "dot"))
        drawn = {}
        for tail, head, values in dot.edges:
            first, second = values["label"].split("\n")
            drawn[first.split(" ")[0], tail, head] = second
        assert drawn == {key: f"/ {hooks}" for key, hooks in DOT_HOOKS.items()}
        cleanups = {h for line in DOT_HOOKS.values() for h in hook_names(line)}
        assert {Hook.CLEANUP_BATCH, Hook.CLEANUP_EPOCH, Hook.CLEANUP_FIT} <= cleanups

    def test_the_new_rows_carry_their_guards(self):
        """Validate and predict runs' rows are drawn with the guards that choose them."""
        parsed = parse_mermaid(dg.render_text(dg.table_view(), "mermaid"))
        labels = {(src, dst): parts for src, dst, parts in parsed.edges}
        assert labels["idle", "epoch"] == ["begin_epoch [inferring]"]
        assert labels["idle", "fit"] == ["begin_fit [fitting]"]
        assert labels["predict", "loss"] == ["compute_loss [supervised]"]
        assert labels["predict", "epoch"] == ["end_batch [predicting]", "cancel_batch"]
        assert labels["epoch", "fit"] == ["end_epoch [fitting]", "cancel_epoch [fitting]"]
        assert labels["epoch", "idle"] == [
            "end_epoch [inferring]",
            "cancel_epoch [inferring]",
            "cancel_fit",
            "preempt [fitting]",
            "fail",
        ]
        assert labels["fit", "idle"] == ["end_fit", "cancel_fit", "preempt [fitting]", "fail"]

    def test_multi_source_rows_leave_nested_clusters(self):
        """Cancels and fail are one edge from the box of their sources, not one per state."""
        dot = parse_dot(dg.render_text(dg.table_view(), "dot"))
        assert dot.clusters == {
            "cluster_fit": set(State) - {State.IDLE},
            "cluster_epoch": set(State) - {State.IDLE, State.FIT},
            "cluster_batch": {State.BATCH, State.PREDICT, State.LOSS, State.BACKWARD, State.STEP},
        }
        per_trigger = Counter(t for t, *_ in dot_transitions(dot))
        assert per_trigger["cancel_batch"] == per_trigger["cancel_fit"] == 1
        assert (
            per_trigger["cancel_epoch"] == 2
        )  # a fit's to fit, a validate or predict run's to idle
        assert per_trigger["fail"] == 2  # from the fit's box, and the loop on idle
        # fit and epoch are no unit's states (a box around both would hold the batch's): an
        # edge from each, neither leaving a box
        preempts = [(tail, v) for tail, _, v in dot.edges if v["label"].startswith("preempt")]
        assert sorted(tail for tail, _ in preempts) == ["epoch", "fit"]
        assert all("ltail" not in values for _, values in preempts)
        assert dot.graph["compound"] == "true"
        assert dot.same_rank == [["batch", "predict", "loss", "backward", "step"]]

    def test_cancel_and_failure_edges_are_styled_apart(self):
        """Cancels dashed in one colour, fail dashed in another, the normal path plain."""
        dot = parse_dot(dg.render_text(dg.table_view(), "dot"))
        colours = {}
        for trigger, sources, dest, _, values in dot_transitions(dot):
            spec = row(trigger, next(iter(sources)), dest)
            kind = "cancel" if spec.cancel else "fail" if trigger == "fail" else "normal"
            colours.setdefault(kind, set()).add(values.get("color"))
            assert (values.get("style") == "dashed") == (kind != "normal"), (trigger, values)
        assert colours["normal"] == {None}
        assert len(colours["cancel"]) == len(colours["fail"]) == 1
        assert colours["cancel"] != colours["fail"]

    def test_rows_that_leave_no_whole_unit_are_drawn_per_source(self, monkeypatch):
        """A row leaving part of a unit is one edge per source; the units stay boxed."""
        table = tuple(
            attrs.evolve(spec, sources=(State.EPOCH, State.BATCH, State.PREDICT))
            if spec.trigger is Trigger.CANCEL_EPOCH
            else spec
            for spec in TRANSITION_TABLE
        )
        monkeypatch.setattr(machine, "TRANSITION_TABLE", table)
        # cancel_epoch leaves the batch's loss, backward and step no more: it leaves no unit
        # whole, but cancel_fit and fail still leave every unit from each of its states
        assert [c.name for c in dg.clusters()] == ["cluster_fit", "cluster_epoch", "cluster_batch"]
        dot = parse_dot(dg.render_text(dg.table_view(), "dot"))
        assert dot.clusters == {
            "cluster_fit": set(State) - {State.IDLE},
            "cluster_epoch": set(State) - {State.IDLE, State.FIT},
            "cluster_batch": {State.BATCH, State.PREDICT, State.LOSS, State.BACKWARD, State.STEP},
        }
        cancel_epoch = [(tail, v) for tail, _, v in dot.edges if v["label"].startswith("cancel_ep")]
        assert sorted(tail for tail, _ in cancel_epoch) == sorted(["epoch", "batch", "predict"] * 2)
        assert all("ltail" not in values for _, values in cancel_epoch)
        drawn = Counter()
        for trigger, sources, dest, _, _ in dot_transitions(dot):
            drawn.update((Trigger(trigger), State(s), State(dest)) for s in sources)
        assert drawn == Counter((t.trigger, s, t.dest) for t in table for s in t.sources)

    def test_the_graph_is_read_off_a_graph_machine(self, monkeypatch):
        """The edges come from transitions' GraphMachine built from the table."""
        from transitions.extensions.diagrams import GraphMachine

        built = []
        real = machine.build_machine

        def spy(*args, **kwargs):
            built.append(kwargs.get("machine_cls"))
            return real(*args, **kwargs)

        monkeypatch.setattr(machine, "build_machine", spy)
        dg.render_text(dg.table_view(), "mermaid")
        assert built == [GraphMachine]

    def test_the_training_loop_never_imports_the_graph_machine(self):
        """Importing fsm_learner and fitting leave transitions' diagram code unloaded."""
        code = textwrap.dedent(
            """
            import sys, torch
            from torch import nn
            from fsm_learner import Learner, DataLoaders
            data = [(torch.randn(4, 3), torch.randn(4, 1))]
            Learner(nn.Linear(3, 1), DataLoaders(data, data), audit_log=None).fit(1)
            print(sorted(m for m in sys.modules if m.startswith("transitions.extensions")))
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == "[]"

    @needs_dot
    def test_svg_is_valid_xml_with_a_node_per_state(self):
        """The SVG parses, and its nodes are the states."""
        svg = dg.render_text(dg.table_view(), "svg")
        root = ET.fromstring(svg)  # noqa: S314 (our own dot's output)
        ns = {"svg": "http://www.w3.org/2000/svg"}
        nodes = root.findall(".//svg:g[@class='node']/svg:title", ns)
        assert {n.text for n in nodes} == set(State)
        clusters = root.findall(".//svg:g[@class='cluster']/svg:title", ns)
        assert {c.text for c in clusters} == {"cluster_fit", "cluster_epoch", "cluster_batch"}

    @needs_dot
    def test_png(self):
        """PNG is rendered by dot, as bytes."""
        assert dg.render(dg.table_view(), DiagramFormat.PNG).startswith(b"\x89PNG\r\n\x1a\n")

    def test_outputs_are_deterministic(self):
        """Two renderings are the same text, so --check is stable."""
        for fmt in ("mermaid", "dot"):
            assert dg.render(dg.table_view(), fmt) == dg.render(dg.table_view(), fmt)


# -- a learner's view --------------------------------------------------------------------------


class Early(Callback):
    order = -3

    def before_batch(self, learn):
        pass

    def after_fail(self, learn):
        pass

    def cleanup_fit(self, learn):
        pass


class Middle(Callback):
    def before_batch(self, learn):
        pass

    def after_loss(self, learn):
        pass

    def after_cancel_epoch(self, learn):
        pass


class Late(Callback):
    order = 7

    def after_loss(self, learn):
        pass

    def after_epoch(self, learn):
        pass

    def after_cancel_batch(self, learn):
        pass

    def cleanup_batch(self, learn):
        pass


def implements(cb: Callback, hook: Hook) -> bool:
    return getattr(type(cb), hook) is not getattr(Callback, hook)


def sample_callbacks():
    # a tie (Middle and the recorder at order 0) keeps list order
    return [Late(), Middle(), RecordingCallback(order=0), Early()]


def expected_calls(cbs, hook: Hook) -> list[str]:
    ordered = sorted(cbs, key=lambda cb: cb.order)
    return [f"{type(cb).__name__}(order={cb.order})" for cb in ordered if implements(cb, hook)]


class TestLearnerView:
    @pytest.fixture
    def learn(self, dls):
        return Learner(mlp(), dls, F.cross_entropy, cbs=sample_callbacks())

    def test_dot_lists_each_callback_on_exactly_its_hooks_edges(self, learn):
        """Each hook of an edge lists the callbacks implementing it, in order, and no others."""
        dot = parse_dot(learn.diagram("dot"))
        on_edges = Counter()
        for tail, head, values in dot.edges:
            first, second = values["label"].split("\n")
            trigger = first.split(" ")[0]
            hooks = []
            for part in second.removeprefix("/ ").split("; "):
                hook_text, _, calls = part.partition(": ")
                hook = Hook(hook_text.split(" ")[0])
                hooks.append(hook)
                assert (calls.split(", ") if calls else []) == expected_calls(learn.cbs, hook)
                on_edges.update(calls.split(", ") if calls else [])
            assert hooks == hook_names(DOT_HOOKS[trigger, tail, head])
        for cb in learn.cbs:
            runs_on = [h for line in DOT_HOOKS.values() for h in hook_names(line)]
            expected = sum(implements(cb, Hook(hook)) for hook in runs_on)
            assert on_edges[f"{type(cb).__name__}(order={cb.order})"] == expected, cb
        assert on_edges["Late(order=7)"] > on_edges["Middle(order=0)"]  # cleanup_batch counted

    def test_mermaid_lists_each_callback_on_exactly_its_hooks_edges(self, learn):
        """The same in Mermaid, on every per-state edge: its hook's, then named cleanups'."""
        parsed = parse_mermaid(learn.diagram())
        drawn = Counter()
        for trigger, src, dst, _, rest in mermaid_transitions(parsed):
            spec = row(trigger, src, dst)
            own, cleanups = [], {}
            for part in rest.removeprefix(" / ").split("#59; ") if rest else []:
                hook_text, colon, calls = part.rpartition("#58; ")
                if colon:
                    cleanups[Hook(hook_text.split(" ")[0])] = calls.split(", ")
                else:
                    own = calls.split(", ")
            assert own == expected_calls(learn.cbs, spec.hook), (trigger, src)
            kind = RunKind.VALIDATE if spec.guard is Guard.INFERRING else RunKind.FIT
            left = machine.cleanup_hooks(State(src), State(dst), kind)
            expected = {h: expected_calls(learn.cbs, h) for h in left}
            assert cleanups == {h: calls for h, calls in expected.items() if calls}, (trigger, src)
            drawn[trigger, src, dst] += 1
        assert drawn == EXPANDED
        assert "Early(order=-3)" in parsed.edges[-1][2][0]  # idle's fail loop: after_fail

    def test_cleanup_fit_is_marked_where_a_run_may_have_no_fit(self):
        """From a pass a cancel_fit also ends validate runs: its cleanup_fit says [fitting]."""
        text = dg.render_text(dg.callbacks_view([Early()]), "mermaid")
        assert "fit --> idle : end_fit / cleanup_fit#58; Early(order=-3) | " in text
        # preempt ends fits only: its cleanup_fit always runs, and says no guard
        assert (
            "    epoch --> idle : end_epoch [inferring] | cancel_epoch [inferring] | cancel_fit / "
            "cleanup_fit [fitting]#58; Early(order=-3) | preempt [fitting] / cleanup_fit#58; "
            "Early(order=-3) | fail / Early(order=-3)#59; cleanup_fit [fitting]#58; "
            "Early(order=-3)\n"
        ) in text

    def test_order_is_shown_and_sorts(self, learn):
        """The before_batch edge reads Early, Middle, the recorder: ascending order, ties kept."""
        dot = parse_dot(learn.diagram("dot"))
        [label] = [v["label"] for _, h, v in dot.edges if v["label"].startswith("begin_batch")]
        assert label.splitlines()[1] == (
            "/ before_batch: Early(order=-3), Middle(order=0), RecordingCallback(order=0)"
        )

    def test_no_callbacks_is_the_table(self, dls):
        """A learner without callbacks draws the plain table (but for its title)."""
        learn = Learner(mlp(), dls, F.cross_entropy)
        plain = dg.render_text(dg.table_view(), "dot").splitlines()
        assert learn.diagram("dot").splitlines()[2:] == plain[2:]

    def test_png_is_not_text(self, learn):
        """learn.diagram returns text; PNG is refused with the valid formats named."""
        with pytest.raises(ConfigurationError, match="png is an image, not text; text formats"):
            learn.diagram("png")

    def test_bad_callbacks_are_refused(self):
        """The view checks its callbacks as the learner does."""
        with pytest.raises(InvalidCallbackError, match=r"cbs\[0\]"):
            dg.callbacks_view([object()])

    def test_cli_learner_factory(self, tmp_path, monkeypatch, capsys):
        """--learner MODULE:FACTORY draws the factory's learner, MODULE found in the cwd."""
        monkeypatch.setattr(sys, "path", list(sys.path))
        (tmp_path / "diagram_factory_ok.py").write_text(
            textwrap.dedent(
                """
                import torch.nn.functional as F
                from helpers import batches_dls, mlp
                from test_diagram import sample_callbacks
                from fsm_learner import Learner

                def make():
                    dls = batches_dls(1, 1)
                    return Learner(mlp(), dls, F.cross_entropy, cbs=sample_callbacks())
                """
            )
        )
        assert main(["diagram", "--learner", "diagram_factory_ok:make", "--format", "dot"]) == 0
        out = capsys.readouterr().out
        expected = dg.callbacks_view(sample_callbacks(), "x")
        assert out.splitlines()[2:] == dg.render_text(expected, "dot").splitlines()[2:]
        assert "diagram_factory_ok:make" in parse_dot(out).graph["label"]


# -- a run's view ------------------------------------------------------------------------------


def run_with_cancels_and_failure():
    plan = {
        (Hook.BEFORE_BATCH, 2): CancelBatchException,
        (Hook.AFTER_PREDICT, 5): CancelEpochException,
        (Hook.AFTER_LOSS, 8): Boom,
    }
    learn = Learner(
        mlp(), batches_dls(3, 2), F.cross_entropy, cbs=[Raiser(plan)], audit_log="runs/all.jsonl"
    )
    learn.fit(1)  # a first, completed run in the same file
    learn.cbs = [Raiser(plan)]
    with pytest.raises(Boom):
        learn.fit(3)
    return learn.audit_path


def audit_totals(path: Path, index: int = -1) -> Counter:
    reports, problem = audit_file(path)
    assert problem is None
    report = reports[index]
    assert report.verified
    return Counter({t: report.counts[t, True] + report.counts[t, False] for t in Trigger})


TRAINING_BATCH = [
    ("begin_batch", "epoch", "batch"),
    ("predict", "batch", "predict"),
    ("compute_loss", "predict", "loss"),
    ("backward", "loss", "backward"),
    ("step", "backward", "step"),
    ("end_batch", "step", "epoch"),
]


def preempted_fit(path: Path, run_id: str, moves: list[tuple[str, str, str]]) -> None:
    """Append to ``path`` the log of a fit that took ``moves`` in its training pass, preempted.

    Written by the audit writer as the learner writes a fit (the learner cannot preempt
    yet): the transitions, then the footer with the status ``preempted``.
    """
    header = {Field.TABLE: machine.table_digest(), Field.N_EPOCHS: 2, Field.RANK: 0}
    writer = AuditWriter(path, run_id=run_id, key=None, header=header)
    writer.start()
    for t, (trigger, source, dest) in enumerate(moves, start=1):
        writer.pending.append((writer.t0_ns + t, (trigger, source, dest, True), 0, 0))
    writer.finish(RunStatus.PREEMPTED, hook_ns={})


def preempted_fits(path: Path) -> Path:
    """Two preempted fits: one between two batches (from epoch), one between passes (fit)."""
    begin = [("begin_fit", "idle", "fit"), ("begin_epoch", "fit", "epoch"), *TRAINING_BATCH]
    preempted_fit(path, "between-batches", [*begin, ("preempt", "epoch", "idle")])
    between_passes = [*begin, ("end_epoch", "epoch", "fit"), ("preempt", "fit", "idle")]
    preempted_fit(path, "between-passes", between_passes)
    return path


def taken_edges(dot: Dot) -> dict[tuple[str, str, str], int]:
    """The edges a run view shows taken: (label without the count, tail, head) -> count.

    Each edge's count is checked against its colour: grey exactly when never taken.
    """
    taken = {}
    for tail, head, values in dot.edges:
        label, count = values["label"].split("\n")[0].rsplit(" ×", 1)  # noqa: RUF001
        greyed = values.get("color", "").startswith("gray")
        assert greyed == (count == "0"), label
        if not greyed:
            taken[label, tail, head] = int(count)
    return taken


class TestRunView:
    @pytest.fixture
    def log(self):
        return run_with_cancels_and_failure()

    def test_dot_counts_equal_the_audits(self, log):
        """Summed per trigger, the edge counts are the audit's counts; every edge has one."""
        view = dg.run_view(log)
        dot = parse_dot(dg.render_text(view, "dot"))
        drawn = Counter()
        for trigger, _, _, lines, values in dot_transitions(dot):
            count = int(re.fullmatch(r"\w+(?: \[\w+\])? ×(\d+)", lines[0])[1])  # noqa: RUF001
            drawn[Trigger(trigger)] += count
            greyed = values.get("color", "").startswith("gray")
            assert greyed == (count == 0), (trigger, values)
        totals = audit_totals(log)
        assert drawn == totals
        assert totals[Trigger.CANCEL_BATCH] > 0
        assert totals[Trigger.CANCEL_EPOCH] > 0
        assert totals[Trigger.FAIL] == 1

    def test_mermaid_counts_equal_the_audits(self, log):
        """The same per state in Mermaid."""
        parsed = parse_mermaid(dg.render_text(dg.run_view(log), "mermaid"))
        drawn = Counter()
        for trigger, *_, rest in mermaid_transitions(parsed):
            drawn[Trigger(trigger)] += int(re.match(r" ×(\d+)", rest)[1])  # noqa: RUF001
        assert drawn == audit_totals(log)

    def test_the_failure_edge_is_marked(self, log):
        """The fail edge from the state the run failed in is bold red and says where."""
        [report] = audit_file(log)[0][-1:]
        state = report.failed_at["state"]
        dot = parse_dot(dg.render_text(dg.run_view(log), "dot"))
        marked = [
            (sources, lines, values)
            for trigger, sources, _, lines, values in dot_transitions(dot)
            if "failed" in values["label"]
        ]
        [(sources, lines, values)] = marked
        assert state in sources
        assert lines[1] == f"failed in {state}: Boom in after_loss of Raiser"
        assert values["style"] == "bold"
        assert float(values["penwidth"]) > 1
        parsed = parse_mermaid(dg.render_text(dg.run_view(log), "mermaid"))
        [(src, part)] = [(s, p) for s, _, parts in parsed.edges for p in parts if "failed" in p]
        assert src == state
        assert part == "fail ×1 (failed here, Boom in after_loss of Raiser)"  # noqa: RUF001

    def test_an_earlier_run_by_id(self, log):
        """--run-id picks a run of the file; the completed one took no failure edge."""
        reports, _ = audit_file(log)
        view = dg.run_view(log, run_id=reports[0].run_id)
        assert view.failed_in is None
        assert reports[0].run_id in view.title
        dot = parse_dot(dg.render_text(view, "dot"))
        drawn = Counter()
        for trigger, _, _, lines, _ in dot_transitions(dot):
            drawn[Trigger(trigger)] += int(lines[0].rsplit("×", 1)[1])  # noqa: RUF001
        assert drawn == audit_totals(log, 0)
        assert drawn[Trigger.FAIL] == 0

    def test_cli_from_log(self, log, capsys):
        """The CLI prints what run_view renders."""
        assert main(["diagram", "--from-log", str(log), "--format", "dot"]) == 0
        assert capsys.readouterr().out == dg.render_text(dg.run_view(log), "dot")

    def test_a_log_that_fails_the_audit(self, log, capsys):
        """An edited record: exit 1, one line naming the file, the line and the reason."""
        content = log.read_bytes().splitlines(keepends=True)
        content[-5] = content[-5].replace(b'"tr":', b'"tr": ', 1)
        log.write_bytes(b"".join(content))
        assert main(["diagram", "--from-log", str(log)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1
        assert "does not verify" in err
        assert "the seal does not match the lines" in err

    def test_unknown_run_id(self, log, capsys):
        """A run id the file does not hold: exit 1, naming the ones it does."""
        reports, _ = audit_file(log)
        assert main(["diagram", "--from-log", str(log), "--run-id", "nope"]) == 1
        err = capsys.readouterr().err
        assert err.strip().endswith(f"its runs: {reports[0].run_id}, {reports[1].run_id}")

    def test_a_validate_run(self, tmp_path, capsys):
        """A validate run's path: idle -> epoch and back, its batches validated, no fit drawn."""
        learn = Learner(mlp(), batches_dls(2, 3), F.cross_entropy, audit_log=tmp_path / "v.jsonl")
        learn.validate()
        view = dg.run_view(learn.audit_path)
        assert view.title == f"fsm_learner: validate run {learn.run_id} (completed)"
        dot = parse_dot(dg.render_text(view, "dot"))
        assert taken_edges(dot) == {
            ("begin_epoch [inferring]", "idle", "epoch"): 1,
            ("begin_batch", "epoch", "batch"): 3,
            ("predict", "batch", "predict"): 3,
            ("compute_loss [supervised]", "predict", "loss"): 3,
            ("end_batch [validating]", "loss", "epoch"): 3,
            ("end_epoch [inferring]", "epoch", "idle"): 1,
        }
        assert dot.nodes["fit"] == {"color": "gray75", "fontcolor": "gray60"}  # never entered
        assert main(["diagram", "--from-log", str(learn.audit_path)]) == 0
        assert capsys.readouterr().out == dg.render_text(view, "mermaid")

    def test_a_predict_run_from_the_cli(self, tmp_path, capsys):
        """A predict run's batches end after predict: end_batch [predicting] taken, no loss."""
        learn = Learner(mlp(), batches_dls(2, 3), F.cross_entropy, audit_log=tmp_path / "p.jsonl")
        learn.get_preds()
        assert main(["diagram", "--from-log", str(learn.audit_path), "--format", "dot"]) == 0
        dot = parse_dot(capsys.readouterr().out)
        assert dot.graph["label"] == f"fsm_learner: predict run {learn.run_id} (completed)"
        labels = {v["label"] for _, _, v in dot.edges}
        assert "end_batch [predicting] ×3" in labels  # noqa: RUF001
        assert "compute_loss [supervised] ×0" in labels  # noqa: RUF001
        drawn = Counter()
        for trigger, _, _, lines, _ in dot_transitions(dot):
            drawn[Trigger(trigger)] += int(lines[0].rsplit("×", 1)[1])  # noqa: RUF001
        assert drawn == audit_totals(learn.audit_path)

    @pytest.mark.parametrize(
        ("run_id", "source"), [("between-batches", "epoch"), ("between-passes", "fit")]
    )
    def test_a_preempted_fit_from_the_cli(self, run_id, source, tmp_path, capsys):
        """A preempted fit's log draws its preempt edge, from where it stopped, and its status."""
        log = preempted_fits(tmp_path / "preempted.jsonl")
        reports, problem = audit_file(log)
        assert problem is None
        assert [(r.run_id, r.verified, r.status) for r in reports] == [
            ("between-batches", True, RunStatus.PREEMPTED),
            ("between-passes", True, RunStatus.PREEMPTED),
        ]
        args = ["diagram", "--from-log", str(log), "--run-id", run_id, "--format", "dot"]
        assert main(args) == 0
        dot = parse_dot(capsys.readouterr().out)
        assert dot.graph["label"] == f"fsm_learner: fit run {run_id} (preempted)"
        taken = taken_edges(dot)
        assert taken.pop(("preempt [fitting]", source, "idle")) == 1
        between_passes = 1 if source == "fit" else 0
        assert taken.pop(("end_epoch [fitting]", "epoch", "fit"), 0) == between_passes
        assert taken == {
            ("begin_fit [fitting]", "idle", "fit"): 1,
            ("begin_epoch", "fit", "epoch"): 1,
            ("begin_batch", "epoch", "batch"): 1,
            ("predict", "batch", "predict"): 1,
            ("compute_loss [supervised]", "predict", "loss"): 1,
            ("backward [training]", "loss", "backward"): 1,
            ("step", "backward", "step"): 1,
            ("end_batch", "step", "epoch"): 1,
        }
        assert main(["diagram", "--from-log", str(log), "--run-id", run_id]) == 0
        parsed = parse_mermaid(capsys.readouterr().out)
        labels = {(src, dst): parts for src, dst, parts in parsed.edges}
        other = "fit" if source == "epoch" else "epoch"
        assert "preempt [fitting] ×1" in labels[source, "idle"]  # noqa: RUF001
        assert "preempt [fitting] ×0" in labels[other, "idle"]  # noqa: RUF001

    def test_keyed_log(self, dls, monkeypatch, capsys):
        """A keyed log needs its key, read from --key-env's variable."""
        learn = Learner(mlp(), dls, F.cross_entropy, audit_key="secret")
        learn.fit(1)
        assert main(["diagram", "--from-log", str(learn.audit_path)]) == 1
        assert "keyed" in capsys.readouterr().err
        monkeypatch.setenv("MY_KEY", "secret")
        args = ["diagram", "--from-log", str(learn.audit_path), "--key-env", "MY_KEY"]
        assert main(args) == 0


# -- the committed docs: diagrams/ -------------------------------------------------------------


def mermaid_blocks(text: str) -> list[str]:
    return re.findall(r"```mermaid\n(.*?)```", text, flags=re.DOTALL)


def section(text: str, heading: str) -> str:
    """A section's body, up to the next heading, whatever its level."""
    body = text.split(heading + "\n", 1)[1]
    return re.split(r"^#", body, maxsplit=1, flags=re.MULTILINE)[0].strip()


class TestDocs:
    def test_committed_diagrams_are_up_to_date(self, capsys):
        """diagrams/ is what the table generates (the SVG checked where dot is installed)."""
        stale, skipped = dg.check_docs()
        assert stale == []
        assert bool(skipped) != HAS_DOT
        assert main(["diagram", "--check"]) == 0
        assert capsys.readouterr().out == "the diagrams are up to date with the transition table\n"

    def test_readme_embeds_the_tables_mermaid(self):
        """The README's Mermaid diagram is the one the table generates."""
        readme = (ROOT / "README.md").read_text()
        assert mermaid_blocks(readme) == [dg.render_text(dg.table_view(), "mermaid")]

    def test_learner_md_and_the_readme_have_the_generated_path_table(self):
        """learner.md: the same Mermaid and path table as the README, both generated."""
        readme = (ROOT / "README.md").read_text()
        learner_md = (ROOT / "diagrams" / "learner.md").read_text()
        assert mermaid_blocks(learner_md) == mermaid_blocks(readme)
        table = dg.path_table()
        assert section(learner_md, "## The path table").endswith(table.strip())
        assert f"{dg.PATH_TABLE_START}\n\n{table}\n{dg.PATH_TABLE_END}\n" in readme
        assert (
            "| cancel fit | `after_cancel_fit`, `cleanup_batch` (batch in progress), "
            "`cleanup_epoch` (epoch in progress), `cleanup_fit` (in a fit run), then idle |"
        ) in table

    def test_a_stale_readme_is_found_and_regenerated(self, tmp_path):
        """The README's path table and diagram are checked and written with the docs."""
        docs, readme = tmp_path / "docs", tmp_path / "README.md"
        text = (ROOT / "README.md").read_text()
        readme.write_text(text.replace("`cleanup_batch`, then the next batch", "then the next"))
        dg.write_docs(docs)
        assert dg.check_docs(docs, readme=readme)[0] == [readme]
        assert dg.write_docs(docs, readme=readme)[-1] == readme
        assert readme.read_text() == text
        assert dg.check_docs(docs, readme=readme)[0] == []
        assert readme not in dg.write_docs(docs, readme=readme)  # unchanged: not written

    def test_the_markers_are_placed_around_the_sections_table(self):
        """A README without markers gets them around its path table section's table."""
        text = (ROOT / "README.md").read_text()
        generated = text.split(dg.PATH_TABLE_START + "\n", 1)[1].split(dg.PATH_TABLE_END + "\n")[0]
        bare = text.replace(
            f"{dg.PATH_TABLE_START}\n{generated}{dg.PATH_TABLE_END}\n", "| a | b |\n"
        )
        assert dg.PATH_TABLE_START not in bare
        assert dg.readme_with_docs(bare) == text.replace(
            f"{dg.PATH_TABLE_START}\n{generated}", f"{dg.PATH_TABLE_START}\n\n{dg.path_table()}\n"
        )

    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            (
                lambda t: t.replace(dg.PATH_TABLE_END, ""),
                "has the path table's start marker but not its end",
            ),
            (lambda t: t + "```mermaid\nx\n```\n", "has 2 Mermaid blocks; it must have one"),
            (
                lambda t: t.replace(dg.PATH_TABLE_START, "").replace("### The path table", "## X"),
                "has no path table to generate",
            ),
        ],
        ids=["no-end-marker", "two-diagrams", "no-table"],
    )
    def test_a_readme_it_cannot_generate_into(self, edit, reason):
        """Missing markers or a second diagram: refused, naming what is wrong."""
        text = edit((ROOT / "README.md").read_text())
        with pytest.raises(ConfigurationError, match=re.escape(reason)):
            dg.readme_with_docs(text)

    def test_check_fails_after_a_table_change(self, tmp_path, monkeypatch, capsys):
        """Change the table: --check exits 1 naming the stale files; --write fixes them.

        With --dir, the checkout's README is left alone.
        """
        readme = (ROOT / "README.md").read_bytes()
        docs = tmp_path / "docs"
        wrote = 0 if HAS_DOT else 1  # without dot, --write writes the sources and exits 1
        assert main(["diagram", "--write", "--dir", str(docs)]) == wrote
        assert main(["diagram", "--check", "--dir", str(docs)]) == 0
        table = tuple(
            attrs.evolve(spec, sources=spec.sources[:-1])  # a batch cancelled before its step
            if spec.trigger is Trigger.CANCEL_BATCH
            else spec
            for spec in TRANSITION_TABLE
        )
        monkeypatch.setattr(machine, "TRANSITION_TABLE", table)
        capsys.readouterr()
        assert main(["diagram", "--check", "--dir", str(docs)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == (1 if HAS_DOT else 2)  # without dot: a line on the svg too
        assert f"stale: {docs / 'learner.md'}, {docs / 'learner.dot'}" in err
        [stale] = [line for line in err.splitlines() if "stale:" in line]
        assert ("learner.svg" in stale) == HAS_DOT
        assert main(["diagram", "--write", "--dir", str(docs)]) == wrote
        assert main(["diagram", "--check", "--dir", str(docs)]) == 0
        assert (ROOT / "README.md").read_bytes() == readme

    def test_check_names_a_missing_file(self, tmp_path, capsys):
        """A missing file is stale too."""
        for name, content in dg._docs(svg=HAS_DOT).items():
            (tmp_path / name).write_bytes(content)
        (tmp_path / "learner.dot").unlink()
        assert main(["diagram", "--check", "--dir", str(tmp_path)]) == 1
        assert f"stale: {tmp_path / 'learner.dot'} differ" in capsys.readouterr().err

    def test_without_dot_the_svg_is_skipped_by_check_and_refused_by_write(
        self, tmp_path, monkeypatch, capsys
    ):
        """No dot: --check checks the text files and says the SVG was not; --write exits 1."""
        monkeypatch.setattr(dg.shutil, "which", lambda _: None)
        assert main(["diagram", "--check"]) == 0
        assert "learner.svg not checked: install Graphviz" in capsys.readouterr().err
        assert main(["diagram", "--write", "--dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fsm-learner diagram: wrote learner.md, learner.dot but not")
        assert "apt-get install graphviz" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["learner.dot", "learner.md"]

    def test_svg_comparison_across_graphviz_versions(self):
        """Other Graphviz versions move shapes: then only the titles and texts must match."""
        svg = b"<!-- Generated by graphviz version %s (0)\n -->"
        svg += b'<title>idle</title><text x="%d">fit</text>'
        assert dg._same_svg(svg % (b"2.43.0", 1), svg % (b"2.43.0", 1))
        assert not dg._same_svg(svg % (b"2.43.0", 1), svg % (b"2.43.0", 2))
        assert dg._same_svg(svg % (b"2.43.0", 1), svg % (b"9.0.0", 2))
        other = svg.replace(b"fit", b"fat")
        assert not dg._same_svg(svg % (b"2.43.0", 1), other % (b"9.0.0", 1))


# -- bad input ---------------------------------------------------------------------------------


def diagram(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["diagram", *args])
    out, err = capsys.readouterr()
    return code, out, err


class TestBadInput:
    def test_unknown_format(self, capsys):
        """argparse refuses it, naming the valid formats (exit 2)."""
        with pytest.raises(SystemExit) as exit_info:
            main(["diagram", "--format", "gif"])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "invalid choice: 'gif' (choose from 'mermaid', 'dot', 'svg', 'png')" in last
        with pytest.raises(ConfigurationError, match="valid: mermaid, dot, svg, png"):
            dg.render(dg.table_view(), "gif")

    def test_factory_that_does_not_return_a_learner(self, tmp_path, monkeypatch, capsys):
        """Each problem with --learner is one line naming what was received."""
        monkeypatch.setattr(sys, "path", list(sys.path))
        (tmp_path / "diagram_factory_bad.py").write_text(
            "def number():\n    return 42\n\n"
            "def broken():\n    raise RuntimeError('no data here')\n\n"
            "NOT_CALLABLE = 3\n"
        )
        cases = {
            "diagram_factory_bad:number": "diagram_factory_bad:number returned int, not a "
            "fsm_learner.Learner",
            "diagram_factory_bad:broken": "diagram_factory_bad:broken raised RuntimeError: no "
            "data here",
            "diagram_factory_bad:NOT_CALLABLE": "diagram_factory_bad has no function "
            "'NOT_CALLABLE' (got int)",
            "diagram_factory_bad:missing": "has no function 'missing' (got NoneType)",
            "no_such_module_xyz:make": "cannot import 'no_such_module_xyz': "
            "ModuleNotFoundError: No module named 'no_such_module_xyz'",
            "just_a_module": "a learner factory is MODULE:FACTORY",
        }
        for spec, reason in cases.items():
            code, out, err = diagram("--learner", spec, capsys=capsys)
            assert (code, out) == (1, ""), spec
            assert err.count("\n") == 1, err
            assert err.startswith("fsm-learner diagram: ")
            assert reason in err, (spec, err)

    def test_no_traceback_from_the_real_command(self, tmp_path):
        """Run as a process: one line on stderr, exit 1, no traceback."""
        done = subprocess.run(
            [sys.executable, "-m", "fsm_learner.cli", "diagram", "--learner", "nope_xyz:f"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr

    def test_unwritable_output(self, capsys):
        """A path in a missing folder: exit 1, one line naming it."""
        code, _, err = diagram("--output", "no/such/dir/m.mmd", capsys=capsys)
        assert code == 1
        assert (
            err
            == "fsm-learner diagram: cannot write no/such/dir/m.mmd: No such file or directory\n"
        )

    def test_png_without_dot_names_the_package(self, monkeypatch, capsys):
        """No dot on PATH: exit 1, one line naming Debian's graphviz; no file written."""
        monkeypatch.setattr(dg.shutil, "which", lambda _: None)
        code, _, err = diagram("--format", "png", "--output", "m.png", capsys=capsys)
        assert code == 1
        assert err.count("\n") == 1
        assert "png needs Graphviz's dot program, which is not on PATH" in err
        assert "apt-get install graphviz" in err
        assert not Path("m.png").exists()

    @needs_dot
    def test_png_and_svg_files(self, capsys):
        """With dot: --output gets the image; svg may also go to stdout."""
        assert diagram("--format", "png", "--output", "m.png", capsys=capsys)[0] == 0
        assert Path("m.png").read_bytes().startswith(b"\x89PNG")
        code, out, _ = diagram("--format", "svg", capsys=capsys)
        assert code == 0
        assert out == dg.render_text(dg.table_view(), "svg")

    @pytest.mark.parametrize(
        ("args", "reason"),
        [
            (["--format", "png"], "png is an image, not text for stdout: give --output PATH"),
            (["--run-id", "x"], "--run-id goes with --from-log"),
            (["--dir", "d"], "--dir goes with --write or --check"),
            (["--check", "--format", "dot"], "--write and --check take no --format or --output"),
            (["--from-log", "missing.jsonl"], "missing.jsonl: no such file"),
        ],
    )
    def test_usage_errors(self, args, reason, capsys):
        """Options that do not go together: exit 2, one line."""
        code, out, err = diagram(*args, capsys=capsys)
        assert (code, out) == (2, "")
        assert err.startswith(f"fsm-learner diagram: {reason}")
        assert err.count("\n") == 1

    def test_default_is_mermaid_on_stdout(self, capsys):
        """With no option: the table's Mermaid diagram."""
        code, out, _ = diagram(capsys=capsys)
        assert code == 0
        assert out == dg.render_text(dg.table_view(), "mermaid")
