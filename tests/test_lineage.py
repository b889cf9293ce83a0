"""Lineages of resumed fits: `fsm-learner audit` checks each link and the batches as a whole.

The logs are real: written by the audit writer as the learner writes them (transitions
queued on ``writer.pending``, notes, seals at each flush), a resumed run's header naming
the seal (record count and chain head) its checkpoint was taken at.
"""

from __future__ import annotations

import time

import orjson
import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp

from callbacks import CheckpointCB
from fsm_learner import Learner
from fsm_learner.audit import lineage
from fsm_learner.audit.codec import Encoder, Field, RunStatus
from fsm_learner.audit.writer import AuditWriter
from fsm_learner.cli import main
from fsm_learner.machine import table_digest

TRAIN_BATCH = [
    ("begin_batch", "epoch", "batch"),
    ("predict", "batch", "predict"),
    ("compute_loss", "predict", "loss"),
    ("backward", "loss", "backward"),
    ("step", "backward", "step"),
    ("end_batch", "step", "epoch"),
]
VALID_BATCH = [*TRAIN_BATCH[:3], ("end_batch", "loss", "epoch")]
SIZES = {True: 10, False: 4}
"""Batches per pass: training, validation."""
SHA = "a" * 64


class FitLog:
    """A fit's log as the learner writes it; ``play`` runs passes up to a position, or the end."""

    def __init__(self, path, run_id, *, n_epochs=2, resumed_from=None):
        header = {
            Field.TABLE: table_digest(),
            Field.RANK: 0,
            Field.KIND: "fit",
            Field.N_EPOCHS: n_epochs,
        }
        if resumed_from is not None:
            header[Field.RESUMED_FROM] = resumed_from
        self.path, self.run_id, self.n_epochs = path, run_id, n_epochs
        self.writer = AuditWriter(path, run_id=run_id, key=None, header=header)
        self.writer.start()
        self.records = 1  # the header
        self.epoch, self.training, self.it = 0, True, 0
        self.open = False
        self.next_it = 0
        self.fire("begin_fit", "idle", "fit")
        if resumed_from is not None:
            self.reenter(resumed_from["at"])

    def fire(self, trigger, source, dest):
        key = (trigger, source, dest, self.training)
        self.writer.pending.append((time.monotonic_ns(), key, self.epoch, self.it))
        self.records += 1

    def reenter(self, at):
        """Re-enter the fit where a checkpoint was taken, as a resumed fit does."""
        self.epoch, self.training = at["ep"], at["tr"]
        if at["it"]:
            self.it = self.next_it = at["it"]
            self.fire("begin_epoch", "fit", "epoch")
            self.open = True

    def batch(self):
        self.it = self.next_it
        for trigger, source, dest in TRAIN_BATCH if self.training else VALID_BATCH:
            self.fire(trigger, source, dest)
        self.next_it += 1

    def play(self, until=None):
        """Run on until ``until`` (ep, tr, k): k batches of that pass begun (0: before it)."""
        while True:
            if not self.open:
                if (self.epoch, self.training) == (self.n_epochs, True):
                    self.fire("end_fit", "fit", "idle")
                    self.writer.finish(RunStatus.COMPLETED, hook_ns={})
                    return
                if until == (self.epoch, self.training, 0):
                    return
                self.it = self.next_it = 0
                self.fire("begin_epoch", "fit", "epoch")
                self.open = True
            while self.next_it < SIZES[self.training]:
                if until == (self.epoch, self.training, self.next_it):
                    return
                self.batch()
            self.fire("end_epoch", "epoch", "fit")
            self.open = False
            self.it = 0
            self.epoch, self.training = (
                (self.epoch, False) if self.training else (self.epoch + 1, True)
            )

    @property
    def at(self):
        return {"ep": self.epoch, "tr": self.training, "it": self.next_it if self.open else 0}

    def checkpoint(self, *, sha=SHA, note=True, also=()):
        """Seal the log, take a checkpoint there (and one per sha of ``also``), note each one.

        Return what a resume of the first names.
        """
        self.writer.flush()
        assert self.writer.records == self.records
        point = {"records": self.records, "head": self.writer.head, "sha256": sha, "at": self.at}
        for other in (sha, *also) if note else ():
            self.writer.note(
                "resume_point",
                {"path": "ckpt.pt", **point, "sha256": other},
                epoch=self.epoch,
                it=self.it,
                tr=self.training,
            )
            self.records += 1
        self.writer.flush()
        return {"run": self.run_id, "path": "ckpt.pt", **point}

    def cancel_pass(self):
        """Cancel the open pass (``cancel_epoch`` between two batches): the next one follows."""
        self.fire("cancel_epoch", "epoch", "fit")
        self.open = False
        self.it = 0
        self.epoch, self.training = (self.epoch, False) if self.training else (self.epoch + 1, True)

    def kill(self, unsealed=0):
        """Die as SIGKILL leaves a log: what was sealed, then ``unsealed`` lines never sealed."""
        self.writer.flush()
        self.writer.close()
        line = Encoder(self.run_id).transition(
            ("begin_batch", "epoch", "batch", self.training), self.epoch, self.next_it, 1 << 50
        )
        with self.path.open("ab") as fh:
            fh.write(line * unsealed)

    def preempt(self):
        self.fire("preempt", "epoch" if self.open else "fit", "idle")
        self.writer.finish(RunStatus.PREEMPTED, hook_ns={})


def audit(*paths, capsys, json=False):
    code = main(["audit", *(["--json"] if json else []), *map(str, paths)])
    out, err = capsys.readouterr()
    return code, out, err


def audit_json(*paths, capsys):
    code, out, _ = audit(*paths, capsys=capsys, json=True)
    return code, orjson.loads(out)


def killed_at(tmp_path, until, *, then=None, unsealed=0, note=True):
    """Run "a" to ``until``, checkpoint, go on to ``then`` (or not), die; return the link."""
    original = FitLog(tmp_path / "a.jsonl", "a")
    original.play(until)
    link = original.checkpoint(note=note)
    if then is not None:
        original.play(then)
    original.kill(unsealed)
    return link


def resumed(tmp_path, link, run_id="b", *, until=None, nudge=0):
    """Resume ``link`` as run ``run_id`` and run to the end (or ``until``, preempted)."""
    log = FitLog(tmp_path / f"{run_id}.jsonl", run_id, resumed_from=link)
    log.next_it += nudge
    log.play(until)
    if until is not None:
        log.preempt()
    return log


class TestCompleteLineages:
    @pytest.mark.parametrize(
        ("until", "then", "redone"),
        [
            ((1, True, 5), (1, True, 9), "epoch 1 train batches 5-8"),
            ((0, False, 2), (1, True, 3), "epoch 0 valid batches 2-3, epoch 1 train batches 0-2"),
            ((1, True, 0), (1, True, 2), "epoch 1 train batches 0-1"),
        ],
        ids=["mid-training-pass", "mid-validation-pass", "pass-boundary"],
    )
    def test_killed_and_resumed(self, tmp_path, capsys, until, then, redone):
        """Killed after a checkpoint, resumed from it: every batch once, the redone ones named."""
        link = killed_at(tmp_path, until, then=then)
        resumed(tmp_path, link)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert (code, err) == (0, "")  # run a's death is accounted for by the lineage
        assert "run a  truncated  DOES NOT VERIFY" in out  # on its own, it does not
        assert "  run a truncated (killed), resumed by run b: lineage verified\n" in out
        assert f"redone by run b: {redone}\n" in out
        assert "lineage of 2 run(s): run a (" in out
        assert "checkpoint confirmed" in out
        expected = (
            "complete lineage: every batch of every pass exactly once (28 batches over 4 passes)"
        )
        assert expected in out
        assert out.endswith(
            "1 lineage(s): 1 verified, 0 do not verify\n2 run(s): 1 verified, 1 killed and "
            "resumed (lineage verified), 0 do not verify\n"
        )

    def test_json_lineage(self, tmp_path, capsys):
        """--json: the lineage's runs, its link with the batches redone, and the coverage."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 9))
        resumed(tmp_path, link)
        code, document = audit_json(tmp_path, capsys=capsys)
        assert (code, document["verified"], document["problems"]) == (0, True, [])
        assert [r["verified"] for r in document["runs"]] == [False, True]  # a, on its own
        [lineage] = document["lineages"]
        assert [
            (r["run_id"], r["status"], r["rank"], r["continued_by"]) for r in lineage["runs"]
        ] == [("a", "truncated", 0, "b"), ("b", "completed", 0, None)]
        [found] = lineage["links"]
        assert found["redone"] == [{"epoch": 1, "pass": "train", "first": 5, "last": 8}]
        assert (found["records"], found["head"], found["at"]) == (
            link["records"],
            link["head"],
            {"ep": 1, "tr": True, "it": 5},
        )
        assert found["checkpoint"] == "confirmed"
        assert (lineage["complete"], lineage["batches"], lineage["passes"]) == (True, 28, 4)
        assert lineage["verified"] is True

    def test_unconfirmed_checkpoint(self, tmp_path, capsys):
        """Killed between the checkpoint file and its note: said, not a failure."""
        link = killed_at(tmp_path, (1, True, 5), note=False)
        resumed(tmp_path, link)
        _code, out, _ = audit(tmp_path, capsys=capsys)
        assert "unconfirmed checkpoint file (run 'a' died before noting it)" in out
        assert "1 lineage(s): 1 verified" in out
        assert "redone by run b: no batch\n" in out

    def test_unsealed_tail_counted(self, tmp_path, capsys):
        """Lines the killed run never sealed are not read: the summary counts them."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 7), unsealed=3)
        resumed(tmp_path, link)
        _, out, _ = audit(tmp_path, capsys=capsys)
        assert "redone by run b: epoch 1 train batches 5-6 (then 3 lines never sealed)\n" in out

    def test_three_runs(self, tmp_path, capsys):
        """Killed, resumed and preempted, resumed again: one lineage of three runs."""
        first = killed_at(tmp_path, (0, True, 4), then=(0, True, 6))
        middle = FitLog(tmp_path / "b.jsonl", "b", resumed_from=first)
        middle.play((1, False, 1))
        second = middle.checkpoint()
        middle.preempt()
        resumed(tmp_path, second, "c")
        _code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert [r["run_id"] for r in lineage["runs"]] == ["a", "b", "c"]
        assert [link["redone"] for link in lineage["links"]] == [
            [{"epoch": 0, "pass": "train", "first": 4, "last": 5}],
            [],
        ]
        assert (lineage["verified"], lineage["complete"], lineage["batches"]) == (True, True, 28)
        assert [run["status"] for run in lineage["runs"]] == ["truncated", "preempted", "completed"]

    def test_tree(self, tmp_path, capsys):
        """A run resumed twice: one lineage per branch, each checked on its own."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 8))
        resumed(tmp_path, link, "b")
        resumed(tmp_path, link, "c")
        _code, document = audit_json(tmp_path, capsys=capsys)
        lineages = document["lineages"]
        assert [[r["run_id"] for r in lineage["runs"]] for lineage in lineages] == [
            ["a", "b"],
            ["a", "c"],
        ]
        assert all(lineage["verified"] and lineage["complete"] for lineage in lineages)

    def test_not_complete_yet(self, tmp_path, capsys):
        """A lineage whose last run was preempted: no gap so far, not complete."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link, until=(1, False, 2))
        _code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert lineage["coverage"] == (
            "lineage not complete (run 'b' preempted): every batch so far exactly once "
            "(26 batches over 4 passes)"
        )
        assert (lineage["verified"], lineage["complete"]) == (True, False)

    def test_cancelled_pass(self, tmp_path, capsys):
        """A pass cancelled after its third batch: named, its begun batches checked once each."""
        original = FitLog(tmp_path / "a.jsonl", "a")
        original.play((0, True, 3))
        original.cancel_pass()
        original.play((1, True, 5))
        link = original.checkpoint()
        original.kill()
        resumed(tmp_path, link)
        code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert (code, lineage["verified"], lineage["complete"]) == (0, True, True)
        assert lineage["coverage"] == (
            "complete lineage: every pass in order, every batch begun exactly once; 1 pass was "
            "cancelled (epoch 0 train pass after batch 2): its later batches never ran "
            "(21 batches over 4 passes)"
        )
        assert (lineage["cancelled"], lineage["cancelled_passes"]) == (
            [{"ep": 0, "tr": True, "it": 3}],
            1,
        )

    def test_one_of_several_checkpoints(self, tmp_path, capsys):
        """Two checkpoint files noted at one seal: a resume from either is confirmed."""
        original = FitLog(tmp_path / "a.jsonl", "a")
        original.play((1, True, 5))
        link = original.checkpoint(also=["c" * 64])
        original.kill()
        resumed(tmp_path, {**link, "sha256": "c" * 64})
        code, document = audit_json(tmp_path, capsys=capsys)
        assert (code, document["lineages"][0]["links"][0]["checkpoint"]) == (0, "confirmed")

    def test_original_not_given(self, tmp_path, capsys):
        """The resumed run alone: not a failure, the summary says which log to pass."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link)
        code, out, err = audit(tmp_path / "b.jsonl", capsys=capsys)
        assert (code, err) == (0, "")
        assert (
            "note: run 'b' resumes run 'a', whose log was not given (pass it to verify the "
            "lineage)" in out
        )
        assert "lineage complete from epoch 1 train pass after batch 4 on: every batch" in out


class TestKilledRuns:
    """A killed run fails the audit unless a lineage that verifies resumes it."""

    def test_killed_and_not_resumed(self, tmp_path, capsys):
        """Nobody resumes it: its truncation fails the audit, in text and in JSON."""
        killed_at(tmp_path, (1, True, 5))
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert err.startswith(f"fsm-learner audit: {tmp_path}/a.jsonl:")
        assert "truncated (a killed run?)" in err
        assert out.endswith("1 run(s): 0 verified, 1 do not verify\n")
        code, document = audit_json(tmp_path, capsys=capsys)
        assert (code, document["verified"]) == (1, False)
        [problem] = document["problems"]
        assert "truncated (a killed run?)" in problem

    def test_the_last_run_killed_too(self, tmp_path, capsys):
        """Killed, resumed, killed again: the first death is accounted for, the second is not."""
        link = killed_at(tmp_path, (1, True, 5))
        log = FitLog(tmp_path / "b.jsonl", "b", resumed_from=link)
        log.play((1, False, 2))
        log.kill()
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert err.startswith(f"fsm-learner audit: {tmp_path}/b.jsonl:")
        assert "run a truncated (killed), resumed by run b: lineage verified" in out
        assert "run b truncated (killed)" not in out
        assert out.endswith(
            "2 run(s): 0 verified, 1 killed and resumed (lineage verified), 1 do not verify\n"
        )
        code, document = audit_json(tmp_path, capsys=capsys)
        assert code == 1
        [problem] = document["problems"]
        assert problem.startswith(f"{tmp_path}/b.jsonl:")

    def test_killed_with_a_tampered_block_and_resumed(self, tmp_path, capsys):
        """A sealed block edited after the checkpoint: the run fails, and so does its lineage."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 9))
        resumed(tmp_path, link)
        log = tmp_path / "a.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        assert b'"it":8' in lines[-2]
        lines[-2] = lines[-2].replace(b'"it":8', b'"it":3')
        log.write_bytes(b"".join(lines))
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err
        assert "problem: " + f"{tmp_path}/a.jsonl:1: run 'a' does not verify" in out
        assert "1 lineage(s): 0 verified, 1 do not verify" in out
        assert "resumed by run" not in out
        assert out.endswith("2 run(s): 1 verified, 1 do not verify\n")
        code, document = audit_json(tmp_path, capsys=capsys)
        assert code == 1
        assert [r["continued_by"] for r in document["lineages"][0]["runs"]] == [None, None]

    def test_killed_and_resumed_in_a_lineage_that_does_not_verify(self, tmp_path, capsys):
        """A gap after the resume: the lineage fails, and the killed run's death is unaccounted."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link, nudge=1)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "truncated (a killed run?)" not in err  # the lineage says why it is unaccounted
        assert "epoch 1 train batch 5 is missing" in err
        assert "resumed by run" not in out
        assert out.endswith("2 run(s): 1 verified, 1 do not verify\n")

    def test_killed_run_given_twice(self, tmp_path, capsys):
        """The killed run's log copied beside it: neither copy is accounted for."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link)
        (tmp_path / "a2.jsonl").write_bytes((tmp_path / "a.jsonl").read_bytes())
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "resumed by run" not in out
        assert out.endswith("3 run(s): 1 verified, 2 do not verify\n")

    def test_accounted_death_before_another_failure(self, tmp_path, capsys):
        """Stderr names the first problem no lineage accounts for, not the accounted one."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link)
        (tmp_path / "c.jsonl").write_text("not a log\n")
        code, _out, err = audit(tmp_path / "a.jsonl", tmp_path / "b.jsonl", capsys=capsys)
        assert (code, err) == (0, "")
        other = FitLog(tmp_path / "c.jsonl", "c")
        other.play((0, True, 2))
        other.kill()
        code, _out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert err.startswith(f"fsm-learner audit: {tmp_path}/c.jsonl:")

    def test_no_second_reading_without_a_resumed_run(self, tmp_path, capsys, monkeypatch):
        """With no run resuming another, the files are audited once."""
        killed_at(tmp_path, (1, True, 5))
        FitLog(tmp_path / "c.jsonl", "c").play()

        def audited_again(*_args, **_kwargs):
            pytest.fail("the files were audited again")

        monkeypatch.setattr(lineage, "FileAudit", audited_again)
        code, _out, _err = audit(tmp_path, capsys=capsys)
        assert code == 1


class TestBrokenLineages:
    def test_head_no_seal(self, tmp_path, capsys):
        """A link naming a head that is no seal of the run: the audit fails, naming both."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 7))
        resumed(tmp_path, {**link, "head": "0" * 32})
        code, out, _err = audit(tmp_path, capsys=capsys)
        reason = (
            f"run 'b' resumes run 'a': resumed_from names head {'0' * 32} at record "
            f"{link['records']}, which is no seal of run 'a' (its seal after {link['records']} "
            f"records is {link['head']})"
        )
        assert code == 1
        assert f"b.jsonl:1: {reason}" in out
        assert "1 lineage(s): 0 verified, 1 do not verify" in out

    def test_wrong_record_count(self, tmp_path, capsys):
        """The right head at another record count: no seal either."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, {**link, "records": link["records"] - 1})
        code, document = audit_json(tmp_path, capsys=capsys)
        [problem] = document["lineages"][0]["problems"]
        assert problem.endswith(
            f"at record {link['records'] - 1}, which is no seal of run 'a' (that head is its "
            f"seal after {link['records']} records)"
        )
        assert problem in document["problems"]
        assert code == 1

    def test_other_checkpoint_file(self, tmp_path, capsys):
        """A resumed run that loaded another file than the one the run noted."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, {**link, "sha256": "b" * 64})
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            "the checkpoint the resumed run loaded is not one run 'a' wrote there: sha256 "
            f"{'b' * 64} != '{SHA}'" in out
        )

    def test_seal_with_no_checkpoint(self, tmp_path, capsys):
        """A seal the run went on from without noting a checkpoint: no checkpoint was taken."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 8), note=False)
        resumed(tmp_path, link)
        code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert code == 1
        assert lineage["links"][0]["checkpoint"] == "missing"
        assert lineage["problems"] == [
            (
                f"{tmp_path}/b.jsonl:1: run 'b' resumes run 'a': run 'a' noted no checkpoint "
                f"at the seal after {link['records']} records: no checkpoint was taken there"
            )
        ]
        assert lineage["runs"][0]["continued_by"] is None

    def test_seal_after_the_notes(self, tmp_path, capsys):
        """The seal that follows a checkpoint's note, the run's last: no checkpoint either."""
        original = FitLog(tmp_path / "a.jsonl", "a")
        original.play((1, True, 5))
        link = original.checkpoint()
        later = {**link, "records": original.records, "head": original.writer.head}
        original.kill()
        resumed(tmp_path, later)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "unconfirmed" not in out
        assert err == (
            f"fsm-learner audit: {tmp_path}/b.jsonl:1: run 'b' resumes run 'a': the seal of run "
            f"'a' after {later['records']} records follows its notes of a checkpoint: no "
            "checkpoint was taken there\n"
        )

    def test_resumed_run_that_does_not_verify(self, tmp_path, capsys):
        """A resumed run with a block edited: the lineage fails and accounts for no death."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 8))
        resumed(tmp_path, link)
        log = tmp_path / "b.jsonl"
        lines = log.read_bytes().splitlines(keepends=True)
        lines[-3] = lines[-3].replace(b'"t":', b'"t":1', 1)
        log.write_bytes(b"".join(lines))
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "the seal does not match the lines" in err
        assert f"{tmp_path}/b.jsonl:1: run 'b' does not verify: no lineage may rest on it" in out
        assert "1 lineage(s): 0 verified, 1 do not verify" in out
        assert out.endswith("2 run(s): 0 verified, 2 do not verify\n")

    def test_resumed_run_whose_header_does_not_verify(self, tmp_path, capsys):
        """A resumed run's header edited: its resumed_from is not trusted."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 8))
        resumed(tmp_path, link)
        log = tmp_path / "b.jsonl"
        log.write_bytes(log.read_bytes().replace(b'"path":"ckpt.pt"', b'"path":"ckpt2.pt"', 1))
        code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert (code, lineage["verified"]) == (1, False)
        assert (
            f"{tmp_path}/b.jsonl:1: run 'b' resumes run 'a': its header is in no block that "
            "verifies: its resumed_from is not its own"
        ) in lineage["problems"]
        assert [run["continued_by"] for run in lineage["runs"]] == [None, None]

    def test_wrong_position(self, tmp_path, capsys):
        """A resumed run claiming to re-enter a batch further than the checkpoint was."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, {**link, "at": {"ep": 1, "tr": True, "it": 6}})
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            "resumed_from says it re-enters at epoch 1 train pass after batch 5, but after "
            f"{link['records']} records run 'a' was at epoch 1 train pass after batch 4" in out
        )

    def test_gap(self, tmp_path, capsys):
        """A resumed run that skips the batch it should begin: the missing batch named."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link, nudge=1)
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            "lineage: epoch 1 train batch 5 is missing: after batch 4 (run 'a') comes batch 6 "
            "(run 'b')" in out
        )

    def test_duplicate(self, tmp_path, capsys):
        """A resumed run that begins again a batch its parent began before the checkpoint."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, link, nudge=-1)
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            "lineage: epoch 1 train batch 4 is begun twice: by run 'a' and again by run 'b'" in out
        )

    def test_completed_too_early(self, tmp_path, capsys):
        """A leaf that says it completed a fit of 3 epochs after the passes of 2."""
        link = killed_at(tmp_path, (1, True, 5))
        log = FitLog(tmp_path / "b.jsonl", "b", n_epochs=3, resumed_from=link)
        log.n_epochs = 2
        log.play()
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert (
            "lineage: run 'b' completed, but its passes end with epoch 1 valid pass, and a fit "
            "of 3 epochs ends with epoch 2 valid pass" in out
        )

    def test_links_in_a_circle(self, tmp_path, capsys):
        """Two runs naming each other (no seal can): reported once, never followed forever."""
        point = {"records": 3, "head": "1" * 32, "sha256": SHA, "path": "ckpt.pt"}
        at = {"ep": 0, "tr": True, "it": 0}
        FitLog(tmp_path / "a.jsonl", "a", resumed_from={**point, "run": "b", "at": at}).play()
        FitLog(tmp_path / "b.jsonl", "b", resumed_from={**point, "run": "a", "at": at}).play()
        code, document = audit_json(tmp_path, capsys=capsys)
        [lineage] = document["lineages"]
        assert code == 1
        assert any("resumed_from links go round: run " in p for p in lineage["problems"])

    @pytest.mark.unchecked_records("a resumed_from whose record count is a string")
    def test_malformed_link(self, tmp_path, capsys):
        """A resumed_from that is no link at all fails the lineage."""
        link = killed_at(tmp_path, (1, True, 5))
        resumed(tmp_path, {**link, "records": "5", "at": link["at"]})
        code, out, _ = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "header field 'resumed_from' has no valid 'records' (got '5')" in out

    def test_stderr_names_the_lineage_problem(self, tmp_path, capsys):
        """With every run verifying, the one line on stderr is the lineage's problem."""
        original = FitLog(tmp_path / "a.jsonl", "a")
        original.play((1, True, 5))
        link = original.checkpoint()
        original.preempt()
        resumed(tmp_path, link, nudge=1)
        code, out, err = audit(tmp_path, capsys=capsys)
        assert code == 1
        assert "2 run(s): 2 verified, 0 do not verify" in out
        assert err.startswith("fsm-learner audit: ")
        assert "epoch 1 train batch 5 is missing" in err


class TestManyLinkedRuns:
    def test_second_reading_looks_lines_up_by_run(self, tmp_path, capsys, monkeypatch):
        """Hundreds of linked runs in one file: each line is read again once, by its run id.

        Reading each line against every linked run's id made the audit quadratic (6,000 runs
        in a file: 576 s, against 19 s without links); a line's run id is now looked up.
        """
        pairs = 300
        path = tmp_path / "runs.jsonl"
        for i in range(pairs):
            original = FitLog(path, f"a{i}", n_epochs=1)
            original.play((0, True, 1))
            link = original.checkpoint()
            original.preempt()
            FitLog(path, f"b{i}", n_epochs=1, resumed_from=link).play()
        looked_up: list[bytes] = []
        runs_of = lineage._runs_of
        monkeypatch.setattr(
            lineage, "_runs_of", lambda text: looked_up.append(text) or runs_of(text)
        )
        code, out, _ = audit(path, capsys=capsys)
        assert code == 0
        assert f"{pairs} lineage(s): {pairs} verified" in out
        lines = path.read_bytes().count(b"\n")
        assert len(looked_up) <= lines  # every line once at most, however many runs are linked


class TestRealFits:
    def test_resumed_from_a_mid_fit_checkpoint(self, tmp_path, capsys):
        """A fit checkpointed every 3 batches, and a fresh learner resumed from the second."""
        logs, first, second = tmp_path / "logs", tmp_path / "first", tmp_path / "second"
        learn = Learner(
            mlp(),
            batches_dls(5, 2),
            F.cross_entropy,
            0.1,
            [CheckpointCB(first, every_n_batches=3, keep=None)],
            audit_log=logs,
        )
        original = learn.fit(2)
        checkpoint = sorted(first.iterdir())[1]  # after batch 0 of epoch 0's validation
        again = Learner(
            mlp(1),
            batches_dls(5, 2),
            F.cross_entropy,
            0.1,
            [CheckpointCB(second, every_n_batches=3, keep=None)],
            audit_log=logs,
        )
        resumed = again.fit(2, resume_from=checkpoint)
        code, document = audit_json(logs, capsys=capsys)
        assert code == 0
        [lineage] = document["lineages"]
        assert [r["run_id"] for r in lineage["runs"]] == [original.run_id, resumed.run_id]
        [link] = lineage["links"]
        assert (link["at"], link["checkpoint"]) == ({"ep": 0, "tr": False, "it": 1}, "confirmed")
        assert link["redone"] == [
            {"epoch": 0, "pass": "valid", "first": 1, "last": 1},
            {"epoch": 1, "pass": "train", "first": 0, "last": 4},
            {"epoch": 1, "pass": "valid", "first": 0, "last": 1},
        ]
        assert (lineage["complete"], lineage["batches"], lineage["passes"]) == (True, 14, 4)

    def test_resumed_from_a_fit_without_a_log(self, tmp_path, capsys):
        """The checkpointed fit wrote no log: the resumed run's link is said to be uncheckable."""
        logs, first = tmp_path / "logs", tmp_path / "first"
        learn = Learner(
            mlp(),
            batches_dls(5, 2),
            F.cross_entropy,
            0.1,
            [CheckpointCB(first, every_n_batches=3, keep=None)],
            audit_log=None,
        )
        learn.fit(2)
        again = Learner(
            mlp(1),
            batches_dls(5, 2),
            F.cross_entropy,
            0.1,
            [CheckpointCB(tmp_path / "second", every_n_batches=3, keep=None)],
            audit_log=logs,
        )
        resumed = again.fit(2, resume_from=sorted(first.iterdir())[1])
        assert again.resumed_from["records"] is None
        code, document = audit_json(logs, capsys=capsys)
        assert code == 0
        [lineage] = document["lineages"]
        assert lineage["notes"] == [
            (
                f"run {resumed.run_id!r} resumes run {learn.run_id!r}, which wrote no audit log "
                "(audit_log=None): the link cannot be checked"
            )
        ]
        assert (lineage["verified"], lineage["missing_parent"]) == (True, learn.run_id)


class TestVerdictOfOneRun:
    """audit.verdict: what `fsm-learner audit` says of one run, for the report and the diff."""

    def _verdicts(self, tmp_path):
        from fsm_learner.audit.files import log_files
        from fsm_learner.audit.verdict import audit_files

        files, _ = log_files([tmp_path])
        audited = audit_files(files)
        return {report.run_id: audited.verdict(report) for _, report in audited.runs}

    def test_a_killed_run_a_verified_lineage_continues_is_accounted_for(self, tmp_path):
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 7))
        resumed(tmp_path, link)
        verdicts = self._verdicts(tmp_path)
        assert verdicts["a"].verified
        assert verdicts["a"].continued_by == "b"
        assert verdicts["b"].verified

    def test_a_killed_run_nobody_resumes_does_not_verify(self, tmp_path):
        killed_at(tmp_path, (1, True, 5))
        [verdict] = self._verdicts(tmp_path).values()
        assert not verdict.verified
        assert verdict.continued_by is None
        assert "truncated (a killed run?)" in verdict.problems[0].reason

    def test_a_broken_link_fails_the_run_that_verifies_on_its_own(self, tmp_path):
        """Run b verifies alone; the lineage's problem (a head that is no seal) is its too."""
        link = killed_at(tmp_path, (1, True, 5), then=(1, True, 7))
        resumed(tmp_path, {**link, "head": "0" * 32})
        verdicts = self._verdicts(tmp_path)
        assert not verdicts["b"].verified
        assert any("which is no seal of run 'a'" in p.reason for p in verdicts["b"].problems)
        assert not verdicts["a"].verified
