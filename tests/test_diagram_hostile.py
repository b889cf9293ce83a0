"""Diagrams from untrusted text: a class name or a forged log cannot add lines to a diagram."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from audit_logs import runs_file, tiny_run

from fsm_learner import Callback
from fsm_learner import diagram as dg
from fsm_learner.cli import main

INJECTED = "A\nidle --> PWNED : injected"


def before_fit(self, learn):
    """A hook that does nothing."""


def hooked(name: str) -> Callback:
    """A callback whose class is called ``name``, running on before_fit."""
    cls = type(name, (Callback,), {"before_fit": before_fit})
    return cls()


def diagram_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


class TestLearnerView:
    def test_a_newline_in_a_class_name_adds_no_mermaid_line(self):
        """The name is one label: its newline shown as a backslash and n, ``:`` as ``#58;``."""
        text = dg.render_text(dg.callbacks_view([hooked(INJECTED)]), "mermaid")
        drawn = diagram_lines(text)
        assert not any(line.startswith("idle --> PWNED") for line in drawn)
        assert (
            r"idle --> fit : begin_fit [fitting] / A\nidle --#62; PWNED #58; injected(order=0)"
            in drawn
        )

    @pytest.mark.parametrize(
        ("name", "label"),
        [
            ("B;C", "B#59;C"),
            ("%%{init}%%", "#37;#37;#123;init#125;#37;#37;"),
            ('<b>"#x"</b>|', "#60;b#62;#34;#35;x#34;#60;/b#62;#124;"),
            ("Set direction LR", "Set direction#32;LR"),
            ("Esc\x1b[31m\u202e", r"Esc\x1b[31m\u202e"),
        ],
    )
    def test_characters_the_mermaid_lexer_acts_on(self, name, label):
        """Statement ends, comments, directives, markup, direction statements, controls."""
        text = dg.render_text(dg.callbacks_view([hooked(name)]), "mermaid")
        assert f"    idle --> fit : begin_fit [fitting] / {label}(order=0)\n" in text

    def test_dot_keeps_the_name_in_its_quoted_label(self):
        """DOT: the newline is an escaped backslash and n, not a line break or a new edge."""
        text = dg.render_text(dg.callbacks_view([hooked(INJECTED + "\x1b")]), "dot")
        assert (
            r'idle -> fit [label="begin_fit [fitting]\n/ before_fit: A\\nidle --> PWNED : '
            r'injected\\x1b(order=0)"'
        ) in text
        assert "\x1b" not in text


class TestRunView:
    def test_a_forged_run_id_and_failure_add_no_line(self, tmp_path, capsys):
        """A log's run id and failure text are one title line and one label."""
        failure = {
            "type": "E\n%%{init: {}}%%\nidle --> PWNED",
            "message": "m",
            "state": "fit",
            "hook": "after_fit",
            "callback": "Cb;x",
        }
        data, _ = tiny_run("r\nidle --> PWNED : x", failure=failure)
        log = tmp_path / "x.jsonl"
        log.write_bytes(data)
        assert main(["diagram", "--from-log", str(log)]) == 0
        drawn = diagram_lines(capsys.readouterr().out)
        assert drawn[1] == r"%% fsm_learner: fit run r\nidle --> PWNED : x (failed)"
        assert not any(line.startswith("idle --> PWNED") for line in drawn)
        [fit_idle] = [line for line in drawn if line.startswith("fit --> idle")]
        assert fit_idle.endswith(
            r"| fail ×1 (failed here, E\n#37;#37;#123;init#58; #123;#125;#125;#37;#37;\n"  # noqa: RUF001
            "idle --#62; PWNED in after_fit of Cb#59;x)"
        )
        assert main(["diagram", "--from-log", str(log), "--format", "dot"]) == 0
        dot = capsys.readouterr().out
        assert r'label="fsm_learner: fit run r\\nidle --> PWNED : x (failed)"' in dot

    def test_an_unknown_run_id_names_a_few_runs(self, tmp_path, capsys):
        """--run-id not in a file of many runs: the message lists eight and counts the rest."""
        ids = [f"{i:012x}" for i in range(20)]
        runs_file(tmp_path / "x.jsonl", ids)
        code = main(["diagram", "--from-log", str(tmp_path / "x.jsonl"), "--run-id", "n\x1bo"])
        assert code == 1
        assert capsys.readouterr().err == (
            f"fsm-learner diagram: {tmp_path}/x.jsonl has no run 'n\\x1bo'; its runs: "
            f"{', '.join(ids[:8])} and 12 more\n"
        )

    def test_a_forged_run_id_cannot_be_a_mermaid_directive(self, tmp_path, capsys):
        """Mermaid reads %%{...}%% even in a comment: the title encodes %, { and }."""
        data, _ = tiny_run('%%{init: {"theme": "dark"}}%%')
        log = tmp_path / "x.jsonl"
        log.write_bytes(data)
        assert main(["diagram", "--from-log", str(log)]) == 0
        drawn = diagram_lines(capsys.readouterr().out)
        assert drawn[1] == (
            '%% fsm_learner: fit run #37;#37;#123;init: #123;"theme": "dark"#125;#125;#37;#37; '
            "(completed)"
        )
        assert not any("%%{" in line for line in drawn)

    def test_a_terminal_that_cannot_encode_the_diagram(self, tmp_path):
        """An ASCII stdout used to get a UnicodeEncodeError traceback (the counts' x sign)."""
        data, _ = tiny_run("0123456789ab")
        log = tmp_path / "x.jsonl"
        log.write_bytes(data)
        done = subprocess.run(
            [sys.executable, "-m", "fsm_learner.cli", "diagram", "--from-log", str(log)],
            capture_output=True,
            env={**os.environ, "PYTHONIOENCODING": "ascii"},
            timeout=120,
            check=False,
        )
        assert (done.returncode, done.stderr) == (0, b"")
        assert b"idle --> fit : begin_fit [fitting] \\xd71" in done.stdout


class TestLearnerFactory:
    def test_a_factory_raising_an_unprintable_exception(self, tmp_path, capsys, monkeypatch):
        """Its str() raising used to print a traceback; now one line, exit 1."""
        (tmp_path / "facs.py").write_text(
            "class Unprintable(Exception):\n"
            "    def __str__(self):\n"
            "        raise RuntimeError('no')\n"
            "def bad():\n"
            "    raise Unprintable\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        assert main(["diagram", "--learner", "facs:bad"]) == 1
        assert capsys.readouterr().err == (
            "fsm-learner diagram: facs:bad raised Unprintable: "
            "<Unprintable whose str() raised RuntimeError>\n"
        )
