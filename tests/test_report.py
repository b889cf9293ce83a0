"""fsm-learner report: one run of an audit log as a self-contained HTML page.

The pages are drawn from real fits (an MLP on the digits), cancelled, failed, validate and
predict runs, a killed and a tampered log, hostile logs and huge synthetic ones; then read
back with an HTML parser, and opened in headless Chromium (the system browser, with every
request but the page's own aborted) where one is installed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch.nn.functional as F
from audit_logs import BATCH, VALID_BATCH, header_line, seal_blocks
from helpers import digits_dls, mlp
from torchmetrics.classification import MulticlassAccuracy

from callbacks import CheckpointCB, EarlyStoppingCB, MetricsCB
from fsm_learner import Callback, CancelBatchException, CancelFitException, Learner
from fsm_learner.audit.codec import Encoder, Field, RunStatus
from fsm_learner.audit.replay import RunReport, Work
from fsm_learner.cli import build_parser, main
from fsm_learner.report import RunPage, load_run, render_page

EPOCHS = 3
"""Epochs of the real fits: digits_dls() gives 22 training and 7 validation batches each."""
TIMES = "\N{MULTIPLICATION SIGN}"
"""How the diagram's labels write a count: ``begin_batch`` then this, then ``174``."""
SCREENSHOTS_ENV = "FSM_LEARNER_SCREENSHOTS"
"""A directory to copy the browser tests' screenshots to, for a person to look at."""


# -- real runs -------------------------------------------------------------------------------


class CancelsSome(Callback):
    """Cancels training batches 3 and 4 of epoch 1, then the fit at epoch 2's sixth batch."""

    def after_batch(self, learn: Learner) -> None:
        if learn.training and learn.epoch == 1 and learn.iter in {3, 4}:
            raise CancelBatchException
        if learn.training and learn.epoch == 2 and learn.iter == 5:
            raise CancelFitException


class FailsInValidation(Callback):
    """Raises ValueError at the third validation batch of epoch 1; its message holds markup."""

    def after_batch(self, learn: Learner) -> None:
        if not learn.training and learn.epoch == 1 and learn.iter == 2:
            msg = "boom <b>bold</b> & <script>alert(1)</script>\nsecond line"
            raise ValueError(msg)


def learner(log: Path, *cbs: Callback) -> Learner:
    """The tiny MLP on the digits with MetricsCB (loss and accuracy), logging to ``log``."""
    metrics = MetricsCB(MulticlassAccuracy(num_classes=10))
    return Learner(mlp(), digits_dls(), F.cross_entropy, 0.1, [metrics, *cbs], audit_log=log)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One log per kind of run: completed, cancelled, early-stopped, failed fits, a validate
    and a predict run."""
    folder = tmp_path_factory.mktemp("logs")
    names = ("completed", "cancelled", "early_stopped", "failed")
    found = {name: folder / f"{name}.jsonl" for name in names}
    learner(found["completed"]).fit(EPOCHS)
    learner(found["cancelled"], CancelsSome()).fit(EPOCHS + 2)
    # a falling loss never improves on the first epoch's in mode max: stops after epoch 1
    stops = EarlyStoppingCB("valid_loss", mode="max", patience=0)
    learner(found["early_stopped"], stops).fit(EPOCHS + 2)
    with pytest.raises(ValueError, match="boom"):
        learner(found["failed"], FailsInValidation()).fit(EPOCHS)
    for kind in ("validate", "predict"):
        found[kind] = folder / f"{kind}.jsonl"
        learn = learner(found[kind])
        learn.validate() if kind == "validate" else learn.get_preds()
    return found


@attrs.frozen
class Lineage:
    """A fit killed in epoch 2 and the fit that resumed it, a log each in one directory."""

    folder: Path
    killed: str
    resumer: str


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """The first fit checkpoints every 10 batches, its log is cut (in epoch 2), and the second
    resumes it from its checkpoint at epoch 1, training batch 11."""
    folder = tmp_path_factory.mktemp("lineage")
    (folder / "log").mkdir()
    first = learner(
        folder / "log" / "a.jsonl", CheckpointCB(folder / "ck", every_n_batches=10, keep=None)
    )
    killed_id = first.fit(EPOCHS).run_id
    killed(folder / "log" / "a.jsonl", folder / "log" / "a.jsonl")
    [checkpoint] = (folder / "ck").glob("ckpt_e0001_train_b000011_*.pt")
    second = learner(folder / "log" / "b.jsonl", CheckpointCB(folder / "ck2", every_n_batches=10))
    return Lineage(folder, killed_id, second.fit(EPOCHS, resume_from=checkpoint).run_id)


def killed(log: Path, into: Path) -> Path:
    """The log cut at two thirds: the run's last lines never sealed, as when it is killed."""
    lines = log.read_bytes().splitlines(keepends=True)
    into.write_bytes(b"".join(lines[: 2 * len(lines) // 3]))
    return into


def tampered(log: Path, into: Path) -> Path:
    """The log with one transition's epoch changed: the seal of its block no longer matches."""
    lines = log.read_bytes().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"ev":"end_batch"' in line)
    lines[at] = lines[at].replace(b'"ep":0', b'"ep":1')
    into.write_bytes(b"".join(lines))
    return into


# -- synthetic runs: huge ones, hostile ones ----------------------------------------------------


def synthetic_fit(
    run_id: str,
    epochs: int,
    train: int,
    valid: int,
    *,
    header: dict[Field, Any] | None = None,
    metric: str = "accuracy",
    hook_times: bool = False,
    losses: Sequence[float] = (),
) -> bytes:
    """A sealed fit of ``epochs`` epochs, metrics noted per pass, 1 µs per transition.

    ``losses``: the loss each pass notes, in turn (by default one that falls by epoch).

    ``hook_times``: the header lists two callbacks, and each pass notes their hooks' time
    as Learner(profile_hooks=True) does (Slow's after_batch 300 ns a batch, MetricsCB's 20).
    """
    enc = Encoder(run_id)
    cbs = [["MetricsCB", 20], ["Slow", 0]] if hook_times else [["MetricsCB", 20]]
    fields = {Field.N_EPOCHS: epochs, Field.CALLBACKS: cbs, Field.MODEL: "Sequential"}
    lines = [header_line(enc, header=fields | (header or {}))]
    counts: dict[str, list[int]] = {}
    hook_ns = {"end_batch": [0, 0]}
    t = 0

    def add(trigger: str, source: str, dest: str, *at: Any) -> None:
        training, epoch, it = at
        nonlocal t
        t += 1000
        lines.append(enc.transition((trigger, source, dest, training), epoch, it, t))
        counts.setdefault(trigger, [0, 0])[0 if training else 1] += 1

    def note(name: str, fields: dict[str, Any], epoch: int, n: int, training: bool) -> None:
        lines.append(enc.note(name, fields, epoch=epoch, it=n - 1, training=training, t_ns=t))

    add("begin_fit", "idle", "fit", False, 0, 0)
    for epoch in range(epochs):
        for training, n, path in ((True, train, BATCH), (False, valid, VALID_BATCH)):
            add("begin_epoch", "fit", "epoch", training, epoch, 0)
            for it in range(n):
                for trigger, source, dest in path:
                    add(trigger, source, dest, training, epoch, it)
            prefix = "train" if training else "valid"
            loss = 2.3 * math.exp(-epoch / 3) + (0 if training else 0.1)
            if losses:
                loss = losses[(2 * epoch + (not training)) % len(losses)]
            values = {f"{prefix}_loss": loss, f"{prefix}_{metric}": 1 - loss / 2.5}
            note("metrics", {"batches": n, "complete": True, **values}, epoch, n, training)
            if hook_times:
                rows = [
                    ["Slow", 1, "after_batch", n, 300 * n],
                    ["MetricsCB", 0, "after_batch", n, 20 * n],
                ]
                hook_ns["end_batch"][0 if training else 1] += 320 * n
                note("hook_times", {"hooks": rows}, epoch, n, training)
            add("end_epoch", "epoch", "fit", training, epoch, n - 1)
    add("end_fit", "fit", "idle", False, epochs - 1, valid - 1)
    footer = enc.footer(
        t_ns=t + 1000,
        status=RunStatus.COMPLETED,
        records=len(lines),
        counts=counts,
        hook_ns=hook_ns if hook_times else {},
    )
    lines.append(footer)
    blocks = [lines[i : i + 4096] for i in range(0, len(lines), 4096)]
    return b"".join(seal_blocks(run_id, blocks)[0])


HOSTILE_ID = "<script>alert('id')</script>\u202e"
HOSTILE_CALLBACK = '<img src=x onerror="alert(1)">'
HOSTILE_METRIC = "<svg onload=alert(2)>"


def hostile_run() -> bytes:
    """A fit whose run id, model, callback and metric names are markup; it failed, with markup."""
    enc = Encoder(HOSTILE_ID)
    header = {
        Field.CALLBACKS: [[HOSTILE_CALLBACK, 0]],
        Field.MODEL: "</title><script>alert(3)</script>",
        Field.DEVICE: "cpu\u202e<b>",
    }
    lines = [header_line(enc, header=header)]
    moves = [
        ("begin_fit", "idle", "fit", False),
        ("begin_epoch", "fit", "epoch", True),
        *((trigger, source, dest, True) for trigger, source, dest in BATCH),
    ]
    for t, key in enumerate(moves, start=1):
        lines.append(enc.transition(key, 0, 0, 1000 * t))
    metrics = {"batches": 1, "complete": False, f"train_{HOSTILE_METRIC}": 0.5, "train_loss": 1.0}
    lines.append(enc.note("metrics", metrics, epoch=0, it=0, training=True, t_ns=9000))
    lines.append(enc.transition(("fail", "epoch", "idle", True), 0, 1, 10_000))
    failure = {
        "type": "<i>Evil</i>Error",
        "message": "<script>alert(4)</script>\n\x1b[31mred",
        "state": "epoch",
        "hook": "before_batch",
        "callback": HOSTILE_CALLBACK,
    }
    counts: dict[str, list[int]] = {}
    for trigger, *_, training in [*moves, ("fail", "", "", True)]:
        counts.setdefault(trigger, [0, 0])[0 if training else 1] += 1
    lines.append(
        enc.footer(
            t_ns=11_000,
            status=RunStatus.FAILED,
            records=len(lines),
            counts=counts,
            hook_ns={},
            failure=failure,
        )
    )
    return seal_blocks(HOSTILE_ID, [lines])[0][0]


# -- reading a page back -------------------------------------------------------------------------

_VOID = frozenset({"meta", "link", "br", "img", "input", "hr"})


@attrs.frozen
class Element:
    """A start tag of the page: its name, its attributes, and the ids of the elements around it."""

    tag: str
    attrs: dict[str, str]
    within: tuple[str, ...]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class Page(HTMLParser):
    """A page read back: every element, and its text (unescaped, as a browser shows it)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self.stack: list[tuple[str, str]] = []
        self.texts: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.elements.append(Element(tag, values, tuple(i for _, i in self.stack if i)))
        if tag not in _VOID:
            self.stack.append((tag, values.get("id", "")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.elements.append(Element(tag, values, tuple(i for _, i in self.stack if i)))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())

    def find(self, tag: str, css: str = "", within: str = "") -> list[Element]:
        """The elements ``tag`` with the class ``css`` inside the element of id ``within``."""
        return [
            e
            for e in self.elements
            if e.tag == tag and (not css or css in e.classes) and (not within or within in e.within)
        ]


def page_of(path: Path, **kwargs: Any) -> tuple[RunPage, str]:
    run = load_run(path, **kwargs)
    return run, render_page(run)


def report(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["report", *args])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(html: str, after: str) -> dict[str, list[str]]:
    """The rows of the first table after the text ``after``: first cell -> the others."""
    table = html.split(after, 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table):
        cells = [unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def taken(report_: RunReport) -> dict[str, int]:
    """The transitions a run took, as the diagram names them: trigger:source:dest -> count."""
    return {f"{t}:{s}:{d}": n for (t, s, d), n in report_.edges.items() if n}


def drawn_edges(page: Page) -> dict[str, str]:
    """The diagram's arrows: data-edge -> the class of the path."""
    return {e.attrs["data-edge"]: e.attrs["class"] for e in page.find("path", "edge", "diagram")}


# -- the pages of real runs ----------------------------------------------------------------------


class TestCompletedFit:
    def test_the_command_writes_the_page_and_exits_0(self, logs, capsys):
        """Exit 0, one line saying where the page went; the page says the run verified."""
        code, out, err = report(str(logs["completed"]), "-o", "page.html", capsys=capsys)
        assert (code, err) == (0, "")
        assert out.startswith("wrote page.html: run ")
        assert out.strip().endswith("(completed, verified)")
        text = Page(Path("page.html").read_text(encoding="utf-8")).text
        assert "✓ Verified." in text
        assert "Does not verify" not in text

    def test_the_header_summary(self, logs):
        """Model, optimizer and lr, epochs, callbacks, device, seed and versions are shown."""
        run, html = page_of(logs["completed"])
        text = Page(html).text
        for said in (
            "model Sequential (2,410 parameters)",
            "optimizer SGD, lr 0.1",
            f"{EPOCHS} training passes begun, of {EPOCHS} asked for",
            "callbacks MetricsCB (order 20)",
            "device cpu",
            f"run id {run.report.run_id}",
            "fsm_learner 0.1.0, torch",
        ):
            assert said in text

    def test_the_diagram_draws_each_transition_taken_once_with_its_count(self, logs):
        """One arrow per (trigger, source, dest) the audit counted, labelled with the count."""
        run, html = page_of(logs["completed"])
        page = Page(html)
        assert set(drawn_edges(page)) == set(taken(run.report))
        labels = page.text
        assert f"end_batch {TIMES}{run.report.edges['end_batch', 'step', 'epoch']}" in labels
        assert f"{TIMES}{run.report.edges['begin_batch', 'epoch', 'batch']:,}" in labels
        states = {e.attrs.get("class") for e in page.find("g", within="diagram")}
        assert "state" in states  # every state entered
        assert "state unvisited" not in states

    def test_a_curve_per_metric_with_a_point_per_pass(self, logs):
        """loss and accuracy: a train and a valid polyline each, one point per epoch."""
        _, html = page_of(logs["completed"])
        page = Page(html)
        charts = [e.attrs["data-metric"] for e in page.find("svg", "chart")]
        assert charts == ["loss", "accuracy"]
        lines = page.find("polyline", "series")
        assert len(lines) == 4
        for line in lines:
            assert line.attrs["data-points"] == str(EPOCHS)
            assert len(line.attrs["points"].split()) == EPOCHS

    def test_the_timeline_has_a_bar_per_pass(self, logs):
        """Three training and three validation passes, all completed, on their own lanes."""
        page = Page(page_of(logs["completed"])[1])
        bars = page.find("rect", "pass", "timeline-chart")
        assert sorted(" ".join(sorted(b.classes)) for b in bars) == sorted(
            ["completed pass train"] * EPOCHS + ["completed pass valid"] * EPOCHS
        )

    def test_where_the_time_went_lists_the_work_that_took_time(self, logs):
        """A bar segment and a row per kind of work, as the audit adds them up."""
        run, html = page_of(logs["completed"])
        page = Page(html)
        worked = {work.value for work, ns in run.report.time_by_work_ns.items() if ns}
        segments = {c.removeprefix("w-") for e in page.find("rect", "seg") for c in e.classes}
        assert segments - {"seg"} == worked
        assert {Work.FORWARD.value, Work.BACKWARD.value, Work.HOOKS.value} <= worked

    def test_the_slowest_transitions(self, logs):
        """The audit's five slowest transitions, each with its line."""
        run, html = page_of(logs["completed"])
        text = Page(html).text
        assert len(run.report.slowest) == 5
        for slow in run.report.slowest:
            assert f"{slow.source} → {slow.dest}" in text

    def test_fit_hooks_are_the_fits_not_a_pass(self, logs):
        """begin_fit's and end_fit's hook time in the fit's column; a pass's in its pass's."""
        cells = table_rows(page_of(logs["completed"])[1], "Time in hooks")
        assert cells["begin_fit"][:2] == ["-", "-"]
        assert cells["begin_fit"][2] == cells["begin_fit"][3] != "-"
        assert "-" not in cells["end_batch"][:2]
        assert cells["end_batch"][2] == "-"

    def test_no_cancel_no_failure_and_no_time_per_callback_section(self, logs):
        """A run without hook_times notes has no time-per-callback section."""
        page = Page(page_of(logs["completed"])[1])
        assert "No cancel. No failure." in page.text
        assert not page.find("section", within="hooks")
        assert not [e for e in page.elements if e.attrs.get("id") == "hooks"]


class TestCancelledFit:
    def test_the_cancels_are_marked_and_listed(self, logs, capsys):
        """cancel_batch twice and cancel_fit: on the timeline, in the list, in the diagram."""
        code, _, _ = report(str(logs["cancelled"]), "-o", "c.html", capsys=capsys)
        assert code == 0
        page = Page(Path("c.html").read_text(encoding="utf-8"))
        text = page.text
        assert "Cancelled by cancel_fit in epoch 2, train batch 5" in text
        assert "cancel_batch 1 3 train" in text
        assert "cancel_batch 1 4 train" in text
        assert "cancel_fit 2 5 train" in text
        marks = page.find("path", "mark", "timeline-chart")
        assert {m for e in marks for m in e.classes} >= {"cancel_batch", "cancel_fit"}
        assert [e.attrs["class"] for e in page.find("rect", "cancelled")] == [
            "pass train cancelled"
        ]
        assert drawn_edges(page)["cancel_fit:step:idle"] == "edge cancel"

    def test_the_curves_mark_the_pass_cut_short(self, logs):
        """Epoch 2's training pass noted its completed batches: a hollow dot."""
        page = Page(page_of(logs["cancelled"])[1])
        partial = page.find("circle", "partial")
        assert len(partial) == 2  # loss and accuracy
        assert all("train" in dot.classes for dot in partial)


class TestFailedFit:
    def test_the_failure_is_shown_where_it_happened(self, logs, capsys):
        """The run verifies (exit 0); its failure: type, message, state, hook, callback."""
        code, _, _ = report(str(logs["failed"]), "-o", "f.html", capsys=capsys)
        assert code == 0
        html = Path("f.html").read_text(encoding="utf-8")
        text = Page(html).text
        assert "Failed: ValueError" in text
        assert "boom <b>bold</b> & <script>alert(1)</script> second line" in text
        assert "boom &lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;" in html
        assert "<script" not in html
        for said in ("state loss", "hook after_batch", "callback FailsInValidation"):
            assert said in text
        assert "where epoch 1, valid batch 2" in text

    def test_the_failure_edge_and_state_are_marked(self, logs):
        """The fail arrow from the state it failed in, that state outlined, the pass failed."""
        page = Page(page_of(logs["failed"])[1])
        assert drawn_edges(page)["fail:loss:idle"] == "edge failure"
        assert any("failed-in" in e.classes for e in page.find("g", "state", "diagram"))
        assert page.find("rect", "failed", "timeline-chart")


class TestInferenceRuns:
    def test_a_validate_run(self, logs):
        """One validation pass: one lane, one point per curve, no training states entered."""
        run, html = page_of(logs["validate"])
        page = Page(html)
        assert run.report.kind.value == "validate"
        assert [e.attrs["data-points"] for e in page.find("polyline", "series")] == ["1", "1"]
        assert "valid" in {c for e in page.find("rect", "pass") for c in e.classes}
        assert "train" not in {c for e in page.find("rect", "pass") for c in e.classes}
        assert len(page.find("g", "unvisited", "diagram")) == 3  # fit, backward, step
        assert set(drawn_edges(page)) == set(taken(run.report))

    def test_a_predict_run_has_no_metrics(self, logs):
        """MetricsCB notes nothing in a predict run: the page says so."""
        page = Page(page_of(logs["predict"])[1])
        assert "No metrics noted" in page.text
        assert not page.find("polyline", "series")
        assert "predict" in page.text


class TestRunsThatDoNotVerify:
    def test_a_killed_run(self, logs, tmp_path, capsys):
        """Exit 1; red: killed, the problem; its last pass drawn open."""
        cut = killed(logs["completed"], tmp_path / "killed.jsonl")
        code, out, err = report(str(cut), "-o", "k.html", capsys=capsys)
        assert code == 1
        assert "(truncated, DOES NOT VERIFY)" in out
        assert "truncated (a killed run?)" in err
        page = Page(Path("k.html").read_text(encoding="utf-8"))
        banner = page.find("header", "banner")
        assert banner[0].classes == {"banner", "bad"}
        assert "✗ Killed: the log ends inside the run (truncated)" in page.text
        assert "truncated (a killed run?)" in page.text
        assert page.find("rect", "open", "timeline-chart")

    def test_a_tampered_log(self, logs, tmp_path, capsys):
        """Exit 1; the page says it does not verify and why, and calls the run unverified."""
        edited = tampered(logs["completed"], tmp_path / "tampered.jsonl")
        code, _, err = report(str(edited), "-o", "t.html", capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err
        text = Page(Path("t.html").read_text(encoding="utf-8")).text
        assert "✗ Does not verify." in text
        assert "the seal does not match the lines" in text
        assert "unverified" in text
        assert "✓ Verified" not in text


class TestTheVerdictIsTheAudits:
    """The page says what `fsm-learner audit` of the same files says of the run, no more."""

    @pytest.mark.unchecked_records("a resumed_from that is no object, as a forger writes it")
    def test_a_header_the_audit_fails(self, tmp_path, capsys):
        """A resumed_from that is no object: the audit fails the run, and so does the page."""
        data = synthetic_fit("0123456789ab", 1, 2, 1, header={Field.RESUMED_FROM: "bogus"})
        (tmp_path / "log.jsonl").write_bytes(data)
        code, out, err = report("log.jsonl", "-o", "r.html", capsys=capsys)
        assert main(["audit", "log.jsonl"]) == 1
        assert code == 1
        assert "(completed, DOES NOT VERIFY)" in out
        assert "header field 'resumed_from' must be an object, got 'bogus'" in err
        text = Page(Path("r.html").read_text(encoding="utf-8")).text
        assert "✗ Does not verify." in text
        assert "✓ Verified" not in text
        assert "'resumed_from' must be an object" in text

    def test_a_resume_link_the_audit_fails(self, tmp_path, capsys):
        """A run that verifies alone, whose link names no seal of its parent: a directory's
        page fails it, as the audit of the directory does."""
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "a.jsonl").write_bytes(synthetic_fit("aaaaaaaaaaaa", 2, 2, 1))
        link = {
            "run": "aaaaaaaaaaaa",
            "records": 10,
            "head": "ab" * 16,
            "sha256": "cd" * 32,
            "path": "ckpt.pt",
            "at": {"ep": 1, "tr": True, "it": 0},
        }
        child = synthetic_fit("bbbbbbbbbbbb", 2, 2, 1, header={Field.RESUMED_FROM: link})
        (tmp_path / "runs" / "b.jsonl").write_bytes(child)
        code, _, err = report("runs", "--run-id", "bbbbbbbbbbbb", "-o", "r.html", capsys=capsys)
        assert code == 1
        assert "run 'bbbbbbbbbbbb' resumes run 'aaaaaaaaaaaa'" in err
        text = Page(Path("r.html").read_text(encoding="utf-8")).text
        assert "✗ Does not verify." in text
        assert (
            "resumes run aaaaaaaaaaaa at epoch 1, train batch 0 (checkpoint cdcdcdcdcdcd…)" in text
        )

    def test_a_copy_under_the_same_id_is_never_drawn(self, tmp_path, capsys):
        """--run-id draws the first run of the id, none of the copy's records, and says there
        is a copy; the default (the run begun last) draws the copy, which does not verify."""
        run = "0123456789ab"
        first = synthetic_fit(run, 2, 3, 1, header={Field.MODEL: "First"})
        copy = synthetic_fit(run, 3, 2, 1, header={Field.MODEL: "Copy"}, losses=[1234.5])
        (tmp_path / "two.jsonl").write_bytes(first + copy)
        code, _, _ = report("two.jsonl", "--run-id", run, "-o", "a.html", capsys=capsys)
        assert code == 0
        text = Page(Path("a.html").read_text(encoding="utf-8")).text
        assert "model First" in text
        assert "Copy" not in text
        assert "1234.5" not in text
        assert "4 passes (2 train, 2 valid)" in text
        assert (
            f"Another run of two.jsonl has the id {run}: this page shows the run whose header "
            "is on line 1, and none of the other's records; fsm-learner audit fails the copy."
        ) in text
        code, _, _ = report("two.jsonl", "-o", "b.html", capsys=capsys)
        assert code == 1
        text = Page(Path("b.html").read_text(encoding="utf-8")).text
        assert "model Copy" in text
        assert "6 passes (3 train, 3 valid)" in text
        assert "✗ Does not verify." in text
        second = len(first.splitlines()) + 1
        assert f"whose header is on line {second}," in text


class TestKilledAndResumed:
    """A killed run that a later run resumed, and the run that resumed it."""

    def test_the_directory_accounts_for_the_killed_run(self, lineage, capsys, monkeypatch):
        """Its lineage verifies: exit 0, the page says who resumed it, in green."""
        monkeypatch.chdir(lineage.folder)
        code, out, err = report("log", "--run-id", lineage.killed, "-o", "k.html", capsys=capsys)
        assert (code, err) == (0, "")
        said = f"killed, and resumed by run {lineage.resumer}: the lineage verifies"
        assert f"(truncated, {said})" in out
        page = Page(Path("k.html").read_text(encoding="utf-8"))
        assert page.find("header", "banner")[0].classes == {"banner", "ok"}
        assert f"✓ Killed, and resumed by run {lineage.resumer} (the lineage verifies)" in page.text
        assert "does not verify" not in page.text.lower()

    def test_the_killed_log_alone_says_how_to_check_it(self, lineage, capsys, monkeypatch):
        """Given alone, it does not verify; the page names the command that checks the lineage."""
        monkeypatch.chdir(lineage.folder)
        code, _, err = report("log/a.jsonl", "-o", "k.html", capsys=capsys)
        assert code == 1
        assert "truncated (a killed run?)" in err
        text = Page(Path("k.html").read_text(encoding="utf-8")).text
        assert "✗ Killed" in text
        assert (
            "If a later run resumed it from a checkpoint, fsm-learner audit log checks the two "
            f"together (and fsm-learner report log --run-id {lineage.killed} draws it so)"
        ) in text

    def test_the_resumed_run_says_where_it_resumed(self, lineage, capsys, monkeypatch):
        """Where it took over, and which epochs it ran: not a short run, not a raw dict."""
        monkeypatch.chdir(lineage.folder)
        code, _, _ = report("log", "--run-id", lineage.resumer, "-o", "r.html", capsys=capsys)
        assert code == 0
        text = Page(Path("r.html").read_text(encoding="utf-8")).text
        assert f"resumes resumes run {lineage.killed} at epoch 1, train batch 11 (checkpoint " in (
            text
        )
        assert f"epochs epochs 1-{EPOCHS - 1} of {EPOCHS}: resumed at epoch 1" in text
        assert "Completed 2 epochs (resumed at epoch 1)" in text
        assert "{'" not in text


class TestWhyAFitWasCancelled:
    def test_the_note_before_the_cancel_is_shown(self, logs):
        """EarlyStoppingCB's note, with its fields, beside the cancel_fit it raised."""
        text = Page(page_of(logs["early_stopped"])[1]).text
        assert "; just before, the run noted early_stopping (see Cancels and failures below)" in (
            text
        )
        assert "cancel_fit 1 6 valid" in text
        assert "early_stopping: monitor valid_loss, mode max, value " in text
        assert "best_epoch 0, patience 0, min_delta 0" in text

    def test_a_cancel_with_no_note_says_none(self, logs):
        """A callback that cancels without a note: no reason is made up."""
        text = Page(page_of(logs["cancelled"])[1]).text
        assert "just before, the run noted" not in text
        assert "MetricsCB" not in text.split("Cancels and failures")[1].split("Slowest")[0]


@pytest.mark.unchecked_records("a run id, model, callback and metric names written as markup")
class TestHostileLog:
    def test_nothing_from_the_log_becomes_markup(self, tmp_path, capsys):
        """Run id, model, callback, metric, failure: text on the page, never elements."""
        (tmp_path / "evil.jsonl").write_bytes(hostile_run())
        code, _, _ = report("evil.jsonl", "-o", "evil.html", capsys=capsys)
        assert code == 0
        html = Path("evil.html").read_text(encoding="utf-8")
        page = Page(html)
        assert {e.tag for e in page.elements}.isdisjoint({"script", "img", "b", "i"})
        assert not [e for e in page.elements if any(a.startswith("on") for a in e.attrs)]
        assert page.find("title")  # one: the model's </title> did not close it
        assert "alert(" in page.text  # shown, as text
        text = page.text
        assert r"<script>alert('id')</script>\u202e" in text  # the override made visible
        assert "\u202e" not in html
        assert f"{HOSTILE_CALLBACK} (order 0)" in text
        assert "Failed: <i>Evil</i>Error" in text
        assert r"<script>alert(4)</script> \x1b[31mred" in text
        charts = [e.attrs["data-metric"] for e in page.find("svg", "chart")]
        assert charts == ["loss", HOSTILE_METRIC]

    def test_hostile_numbers_are_not_drawn(self, tmp_path):
        """A metric that is a string, a bool, a list or NaN draws no point; a number does."""
        data = synthetic_fit("0123456789ab", 2, 2, 1)
        data = data.replace(
            b'"train_accuracy":', b'"train_accuracy":"NaN","train_x":true,"train_y":[1],"train_z":'
        )
        (tmp_path / "odd.jsonl").write_bytes(data)
        page = Page(render_page(load_run(tmp_path / "odd.jsonl")))  # does not verify: edited
        metrics = [e.attrs["data-metric"] for e in page.find("svg", "chart")]
        assert metrics == ["loss", "z", "accuracy"]


class TestExtremeValues:
    @pytest.mark.parametrize(
        "losses",
        [[1.79e308], [1.7e308, -1.7e308], [1e308, 0.0], [5e-324, 1e-323], [5e-324, 0.0], [0.0]],
        ids=["huge", "both-huge", "huge-and-0", "subnormal", "subnormal-and-0", "all-0"],
    )
    def test_any_finite_values_are_charted(self, losses, tmp_path):
        """Distinct round ticks, every point inside the plot; the larger value drawn higher."""
        (tmp_path / "x.jsonl").write_bytes(synthetic_fit("0123456789ab", 3, 2, 1, losses=losses))
        run, html = page_of(tmp_path / "x.jsonl")
        assert run.verified
        chart = html.split('data-metric="loss"', 1)[1].split("</svg>", 1)[0]
        ticks = re.findall(r'class="tick y">([^<]*)<', chart)
        assert len(ticks) >= 2
        assert len(set(ticks)) == len(ticks)
        assert all(math.isfinite(float(tick)) or abs(float(tick)) > 1e308 for tick in ticks)
        heights = {}
        for line in re.findall(r'<polyline points="([^"]*)" class="series (\w+)"', chart):
            points, series = line
            ys = {float(point.split(",")[1]) for point in points.split()}
            assert all(34 <= y <= 192 for y in ys)  # the plot: top 34, bottom 236 - 44
            heights[series] = ys
        assert set(heights) == {"train", "valid"}
        train, valid = losses[0], losses[-1]  # each pass's loss, by the pass
        if train != valid:
            higher, lower = ("train", "valid") if train > valid else ("valid", "train")
            assert max(heights[higher]) < min(heights[lower])  # y grows downwards


class TestHugeRuns:
    def test_thousands_of_batches_draw_no_element_per_batch(self, tmp_path):
        """5,000 training and 1,000 validation batches: as many elements as 50 and 10 make."""
        (tmp_path / "huge.jsonl").write_bytes(synthetic_fit("0123456789ab", 1, 5000, 1000))
        (tmp_path / "small.jsonl").write_bytes(synthetic_fit("0123456789ab", 1, 50, 10))
        run, html = page_of(tmp_path / "huge.jsonl")
        assert run.verified
        page, small = Page(html), Page(page_of(tmp_path / "small.jsonl")[1])
        assert [e.tag for e in page.elements] == [e.tag for e in small.elements]
        assert len(html) < 40_000
        assert len(page.find("rect", "pass")) == 2
        assert "5,000 training and 1,000 validation batches" in page.text

    def test_hundreds_of_epochs_are_grouped_and_thinned(self, tmp_path):
        """800 epochs: passes grouped into at most 240 bars a lane, curves thinned to 500 points."""
        (tmp_path / "long.jsonl").write_bytes(synthetic_fit("0123456789ab", 800, 2, 1))
        run, html = page_of(tmp_path / "long.jsonl")
        assert run.verified
        page = Page(html)
        bars = page.find("rect", "pass")
        assert 200 <= len(bars) <= 2 * 240
        assert all(int(e.attrs["data-points"]) == 500 for e in page.find("polyline", "series"))
        assert len(html) < 200_000


class TestTimePerCallback:
    def test_hook_times_notes_add_up_per_callback(self, tmp_path):
        """Each pass's hook_times rows, added up: Slow first, its calls and time, its share."""
        (tmp_path / "h.jsonl").write_bytes(synthetic_fit("0123456789ab", 2, 4, 2, hook_times=True))
        run, html = page_of(tmp_path / "h.jsonl")
        assert run.verified, run.problem
        page = Page(html)
        text = page.text
        calls = 2 * (4 + 2)
        assert f"Slow (cbs[1]) {calls} {calls * 300 / 1e6:.3f} ms" in text
        assert f"MetricsCB (cbs[0]) {calls}" in text
        assert text.index("Slow (cbs[1])") < text.index("MetricsCB (cbs[0])")
        assert "after_batch" in text

    def test_rows_of_another_shape_are_passed_over(self, tmp_path):
        """A hook_times note that is not rows of five draws no section."""
        data = synthetic_fit("0123456789ab", 1, 2, 1, hook_times=True)
        data = data.replace(b'["Slow",1,"after_batch",', b'["Slow","1","after_batch",')
        data = data.replace(b'["MetricsCB",0,"after_batch",', b'{"MetricsCB":0,"x":[')
        (tmp_path / "h.jsonl").write_bytes(data)
        page = Page(render_page(load_run(tmp_path / "h.jsonl")))
        assert "Time per callback" not in page.text


# -- choosing the run, and the command's errors ----------------------------------------------


def two_runs(path: Path) -> tuple[str, str]:
    """Two fits of one epoch into one log; return their run ids in order."""
    learn = learner(path)
    first = learn.fit(1).run_id
    return first, learn.fit(1).run_id


class TestChoosingTheRun:
    def test_the_last_run_by_default_and_another_by_id(self, tmp_path, capsys):
        """The run begun last in the file; --run-id picks the other."""
        first, second = two_runs(tmp_path / "two.jsonl")
        code, out, _ = report("two.jsonl", capsys=capsys)
        assert code == 0
        said = "the last of 2 runs in its file; --run-id picks another"
        assert out.endswith(f"(completed, verified); {said}\n")
        text = Page(Path("report.html").read_text()).text
        assert f"run id {second}" in text
        assert f"This is {said}." in text
        code, out, _ = report("two.jsonl", "--run-id", first, "--output", "a.html", capsys=capsys)
        assert code == 0
        assert out.endswith("(completed, verified)\n")
        text = Page(Path("a.html").read_text()).text
        assert f"run id {first}" in text
        assert "runs in its file" not in text

    def test_an_unknown_run_id_names_the_runs(self, tmp_path, capsys):
        """Exit 2, one line: the id asked for, and the runs there are."""
        first, second = two_runs(tmp_path / "two.jsonl")
        code, _, err = report("two.jsonl", "--run-id", "nope", capsys=capsys)
        assert code == 2
        assert (
            err == f"fsm-learner report: two.jsonl has no run 'nope'; its runs: {first}, {second}\n"
        )
        assert not Path("report.html").exists()

    def test_a_directory_gives_its_newest_log(self, tmp_path, capsys):
        """The log modified last; with --run-id, the log that holds it."""
        old, new = tmp_path / "runs" / "old.jsonl", tmp_path / "runs" / "new.jsonl"
        old.parent.mkdir()
        old.write_bytes(synthetic_fit("0123456789aa", 1, 2, 1))
        new.write_bytes(synthetic_fit("0123456789bb", 1, 2, 1))
        os.utime(old, ns=(10**18, 10**18))
        os.utime(new, ns=(2 * 10**18, 2 * 10**18))
        assert report("runs", "-o", "n.html", capsys=capsys)[1].startswith(
            "wrote n.html: run 0123456789bb of runs/new.jsonl"
        )
        code, out, _ = report("runs", "--run-id", "0123456789aa", "-o", "o.html", capsys=capsys)
        assert (code, out.split(" (")[0]) == (0, "wrote o.html: run 0123456789aa of runs/old.jsonl")

    def test_a_keyed_log(self, tmp_path, monkeypatch, capsys):
        """--key-env names the key's variable; without the key the run does not verify."""
        monkeypatch.setenv("MY_KEY", "s3cret")
        monkeypatch.delenv("FSM_LEARNER_AUDIT_KEY", raising=False)
        metrics = MetricsCB()
        learn = Learner(
            mlp(),
            digits_dls(),
            F.cross_entropy,
            0.1,
            [metrics],
            audit_log=tmp_path / "k.jsonl",
            audit_key="s3cret",
        )
        learn.fit(1)
        assert report("k.jsonl", "--key-env", "MY_KEY", capsys=capsys)[0] == 0
        assert "the chain is keyed" in Page(Path("report.html").read_text()).text
        code, _, err = report("k.jsonl", capsys=capsys)
        assert code == 1
        assert "this run's chain is keyed: give the key" in err
        code, _, err = report("k.jsonl", "--key-env", "NO_SUCH_VAR", capsys=capsys)
        assert code == 2
        assert "the environment variable 'NO_SUCH_VAR' is not set" in err

    @pytest.mark.parametrize(
        ("args", "said"),
        [
            (["missing.jsonl"], "missing.jsonl: no such file or directory"),
            ([""], "'': the empty path names no log"),
            (
                ["log.jsonl", "-o", "no/such/dir/r.html"],
                "-o no/such/dir/r.html: no directory no/such/dir",
            ),
            (["log.jsonl", "-o", "."], "-o .: give a file name for the page"),
        ],
    )
    def test_usage_errors(self, args, said, tmp_path, capsys):
        """Exit 2 with one line on stderr, and no page written."""
        (tmp_path / "empty.jsonl").write_bytes(b"")
        (tmp_path / "log.jsonl").write_bytes(synthetic_fit("0123456789ab", 1, 2, 1))
        code, out, err = report(*args, capsys=capsys)
        assert (code, out) == (2, "")
        assert err.startswith("fsm-learner report: ")
        assert said in err
        assert len(err.splitlines()) == 1
        assert not list(tmp_path.glob("*.html"))

    @pytest.mark.parametrize(
        ("content", "said"),
        [
            (b"", "log.jsonl:0: empty file: no run in it"),
            (b"not json\n", "log.jsonl:1: not JSON"),
        ],
    )
    def test_a_log_of_no_run_fails_as_its_audit_does(self, content, said, tmp_path, capsys):
        """A log that was read but holds no run: exit 1, as fsm-learner audit exits; no page."""
        (tmp_path / "log.jsonl").write_bytes(content)
        code, out, err = report("log.jsonl", capsys=capsys)
        assert (code, out) == (1, "")
        assert err.startswith(f"fsm-learner report: {said}")
        assert err.endswith("; no run to report\n")
        assert len(err.splitlines()) == 1
        assert main(["audit", "log.jsonl"]) == 1
        assert not Path("report.html").exists()

    def test_an_unwritable_output(self, tmp_path, capsys):
        """A page that cannot be written: exit 2, the reason."""
        (tmp_path / "log.jsonl").write_bytes(synthetic_fit("0123456789ab", 1, 2, 1))
        (tmp_path / "locked").mkdir()
        (tmp_path / "locked" / "r.html").mkdir()  # a directory where the file should go
        code, _, err = report("log.jsonl", "-o", "locked/r.html/x/y.html", capsys=capsys)
        assert code == 2
        assert "no directory locked/r.html/x" in err

    def test_the_page_to_stdout(self, tmp_path, capsys):
        """-o - writes the page itself to stdout."""
        (tmp_path / "log.jsonl").write_bytes(synthetic_fit("0123456789ab", 1, 2, 1))
        code, out, _ = report("log.jsonl", "-o", "-", capsys=capsys)
        assert code == 0
        assert out.startswith('<!DOCTYPE html>\n<html lang="en">')
        assert out.endswith("</html>\n")


class TestSelfContained:
    def test_the_page_names_no_address_and_runs_no_script(self, logs):
        """No URL, no script, no external stylesheet, font or image; a CSP that forbids them."""
        for name in ("completed", "failed"):
            html = page_of(logs[name])[1]
            assert "http" not in html.replace('http-equiv="Content-Security-Policy"', "")
            assert "<script" not in html
            assert "@import" not in html
            assert "@font-face" not in html
            assert "src=" not in html
            assert "url(" not in html.replace("url(#arrow-", "")
            [policy] = [
                e.attrs["content"]
                for e in Page(html).find("meta")
                if e.attrs.get("http-equiv") == "Content-Security-Policy"
            ]
            assert policy.startswith("default-src 'none';")

    def test_reading_a_log_for_the_page_imports_no_torch(self, tmp_path):
        """In a fresh interpreter: the page is written and torch is never imported."""
        (tmp_path / "log.jsonl").write_bytes(synthetic_fit("0123456789ab", 2, 3, 1))
        command = textwrap.dedent(
            """
            import sys
            from fsm_learner.cli import main
            code = main(["report", "log.jsonl", "-o", "r.html"])
            print(code, "torch" in sys.modules, file=sys.stderr)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", command],
            capture_output=True,
            timeout=60,
            check=True,
            cwd=tmp_path,
        )
        assert done.stderr.decode().split() == ["0", "False"]
        assert (tmp_path / "r.html").stat().st_size > 0


class TestOutputOptions:
    def test_every_command_with_an_output_takes_o(self):
        """Each sub-command that writes files takes -o as the short form of its output option."""
        parser = build_parser()
        [commands] = [a for a in parser._actions if a.dest == "command"]
        writers = {}
        for name, sub in commands.choices.items():
            options = {s for action in sub._actions for s in action.option_strings}
            if options & {"--output", "--out"}:
                writers[name] = "-o" in options
        assert writers == {"diagram": True, "demo": True, "report": True}

    @pytest.mark.parametrize("option", ["-o", "--out", "--output"])
    def test_demo_takes_o_out_and_output(self, option):
        """demo's --out keeps working; -o and --output say the same."""
        args = build_parser().parse_args(["demo", option, "here"])
        assert args.out == Path("here")

    def test_diagram_o_writes_the_file(self, capsys):
        """diagram -o PATH: the Mermaid goes to the file, nothing to stdout."""
        assert main(["diagram", "-o", "table.mmd"]) == 0
        assert capsys.readouterr().out == ""
        assert Path("table.mmd").read_text().startswith("stateDiagram-v2\n")


# -- in a browser --------------------------------------------------------------------------------

BROWSER_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, the system's: never downloaded. Skipped where none is installed."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            "chromium is not on PATH (Debian: apt-get install chromium): the browser checks "
            "open the report in the system browser, and never download one"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright: the dev extra")
    with _bounded(DRIVER_START_S, "Playwright's driver and the browser did not start"):
        playwright = sync_api.sync_playwright().start()
        launched = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox"], timeout=BROWSER_TIMEOUT_MS
        )
    try:
        yield launched
    finally:
        with _bounded(DRIVER_START_S, "the browser and Playwright's driver did not stop"):
            launched.close()
            playwright.stop()


DRIVER_START_S = 90


@contextlib.contextmanager
def _bounded(seconds: int, what: str):
    """Raise TimeoutError in the main thread when the block takes longer than ``seconds``:
    starting Playwright's driver takes no timeout of its own, and CI must never hang."""

    def expired(_signum, _frame):
        msg = f"{what} within {seconds} s"
        raise TimeoutError(msg)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@attrs.define
class Opened:
    """A page opened in the browser, and what it tried: console messages, errors, requests."""

    page: Any
    console: list[tuple[str, str]] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    requests: list[str] = attrs.Factory(list)


def open_in(browser: Any, path: Path) -> Opened:
    """Open ``path``; abort (and record) every request but the page's own."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    opened = Opened(page)
    url = path.resolve().as_uri()
    page.on("console", lambda message: opened.console.append((message.type, message.text)))
    page.on("pageerror", lambda error: opened.errors.append(str(error)))
    page.on("request", lambda request: request.url == url or opened.requests.append(request.url))

    def route(handler: Any) -> None:
        if handler.request.url == url:
            handler.continue_()
        else:
            handler.abort()

    page.route("**/*", route)
    page.goto(url, wait_until="load", timeout=BROWSER_TIMEOUT_MS)
    return opened


def screenshot(opened: Opened, path: Path) -> None:
    """Save the whole page; copy it where $FSM_LEARNER_SCREENSHOTS says, if it says."""
    opened.page.screenshot(path=path, full_page=True, timeout=BROWSER_TIMEOUT_MS)
    copy_to = os.environ.get(SCREENSHOTS_ENV)
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(copy_to) / path.name)


@pytest.fixture(scope="module")
def pages(logs, lineage, tmp_path_factory) -> dict[str, tuple[RunPage, Path]]:
    """The page of each real run, of a killed, a huge and a hostile one, and of a killed run
    and the run that resumed it (their directory read), written to files."""
    folder = tmp_path_factory.mktemp("pages")
    sources: dict[str, Path] = dict(logs)
    sources["killed"] = killed(logs["completed"], folder / "killed.jsonl")
    (folder / "huge.jsonl").write_bytes(
        synthetic_fit("0123456789ab", 2, 3000, 500, hook_times=True)
    )
    sources["huge"] = folder / "huge.jsonl"
    (folder / "hostile.jsonl").write_bytes(hostile_run())
    sources["hostile"] = folder / "hostile.jsonl"
    chosen = {"killed-resumed": lineage.killed, "resumed": lineage.resumer}
    sources |= dict.fromkeys(chosen, lineage.folder / "log")
    found = {}
    for name, log in sources.items():
        run, html = page_of(log, run_id=chosen.get(name))
        (folder / f"report-{name}.html").write_text(html, encoding="utf-8")
        found[name] = (run, folder / f"report-{name}.html")
    return found


class TestInABrowser:
    def test_the_harness_sees_requests_and_console_errors(self, browser, tmp_path):
        """A page that fetches an image and logs an error: both are caught (the checks can fail)."""
        (tmp_path / "bad.html").write_text(
            '<img src="http://192.0.2.1/x.png"><script>console.error("seen")</script>'
        )
        opened = open_in(browser, tmp_path / "bad.html")
        assert opened.requests == ["http://192.0.2.1/x.png"]
        assert ("error", "seen") in opened.console
        opened.page.close()

    @pytest.mark.parametrize(
        "name",
        [
            "completed",
            "cancelled",
            "early_stopped",
            "failed",
            "validate",
            "predict",
            "killed",
            "killed-resumed",
            "resumed",
            "huge",
            "hostile",
        ],
    )
    def test_the_page_draws_without_errors_or_requests(self, browser, pages, name, tmp_path):
        """No console error, no page error, no request; the diagram and the curves drawn."""
        run, path = pages[name]
        opened = open_in(browser, path)
        page = opened.page
        screenshot(opened, tmp_path / f"report-{name}.png")
        assert [m for m in opened.console if m[0] == "error"] == []
        assert opened.errors == []
        assert opened.requests == []
        edges = page.locator("svg#diagram path.edge")
        assert edges.count() == len(taken(run.report))
        for i in range(edges.count()):
            box = edges.nth(i).bounding_box()
            assert box is not None
            assert box["width"] > 1
        for line in page.locator("svg.chart polyline.series").all():
            points = int(line.get_attribute("data-points"))
            assert len(line.get_attribute("points").split()) == points
            if points > 1:
                assert line.is_visible()
                assert line.bounding_box()["width"] > 10
        page.close()

    def test_each_curve_has_a_point_per_pass_on_screen(self, browser, pages, tmp_path):
        """The completed fit: four curves of three visible dots each, inside their charts."""
        opened = open_in(browser, pages["completed"][1])
        dots = opened.page.locator("svg.chart circle.dot")
        assert dots.count() == 4 * EPOCHS
        assert all(dot.is_visible() for dot in dots.all())
        opened.page.close()
