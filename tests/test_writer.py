"""The audit writer: each run's header binds to the line before it in its file."""

from __future__ import annotations

import orjson
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import Callback, Learner
from fsm_learner.audit.schema import PREV_FIELD, unseal


def headers(path) -> list[dict]:
    lines = path.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if b'"ev":"run_start"' in line]


def learner(path, cbs=()) -> Learner:
    return Learner(mlp(), batches_dls(2, 1), F.cross_entropy, 0.1, list(cbs), audit_log=path)


class BigNote(Callback):
    """A note of about 100 KB at the end of the fit: a last line longer than a small window."""

    def after_fit(self, learn: Learner) -> None:
        learn.note("big", blob="x" * 100_000)


class TestPrev:
    def test_each_run_binds_to_the_last_line_before_it(self, tmp_path):
        """First run: "" (a new file); then each header names the previous run's head."""
        path = tmp_path / "runs.jsonl"
        heads = [learner(path).fit(1).head for _ in range(3)]
        assert [h[PREV_FIELD] for h in headers(path)] == ["", heads[0], heads[1]]

    def test_a_directory_gives_each_run_a_new_file(self, tmp_path):
        """In a directory every run starts its own file: prev is empty."""
        learn = learner(tmp_path / "logs")
        learn.fit(1)
        learn.fit(1)
        assert [h[PREV_FIELD] for p in (tmp_path / "logs").iterdir() for h in headers(p)] == [
            "",
            "",
        ]

    def test_after_a_cut_line_it_binds_to_the_last_whole_sealed_line(self, tmp_path):
        """A killed run's cut line is ended, and skipped: prev is the line before it."""
        path = tmp_path / "runs.jsonl"
        learner(path).fit(1)
        data = path.read_bytes()
        kept = data[: data.rindex(b"\n", 0, len(data) - 1) + 1]  # drop the footer...
        path.write_bytes(kept + b'{"run":"cut-off')  # ...and leave half a record
        expected = unseal(kept.splitlines()[-1])
        assert expected is not None
        learner(path).fit(1)
        assert headers(path)[1][PREV_FIELD] == expected[1].hex()
        assert b'{"run":"cut-off\n' in path.read_bytes()

    def test_a_long_last_line_is_found(self, tmp_path):
        """The last line may be far longer than the first window the writer reads."""
        path = tmp_path / "runs.jsonl"
        first = learner(path, [BigNote()])
        first.fit(1)
        lines = path.read_bytes().splitlines()
        assert len(lines[-3]) > 100_000  # the note, before end_fit and the footer
        path.write_bytes(b"\n".join(lines[:-2]) + b"\n")  # those two lost
        expected = unseal(lines[-3])
        assert expected is not None
        learner(path).fit(1)
        assert headers(path)[1][PREV_FIELD] == expected[1].hex()
