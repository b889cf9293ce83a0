"""The audit writer: sealed blocks, several writers on one file, each run bound to its file."""

from __future__ import annotations

import multiprocessing
import sys
import threading

import pytest
import torch.nn.functional as F
from helpers import batches_dls, mlp

from fsm_learner import Callback, Learner
from fsm_learner.audit.codec import Header, RecordError, Seal, SealChain, decode
from fsm_learner.audit.replay import audit_file
from fsm_learner.audit.writer import AuditWriter, JsonlFile


def records(path) -> list:
    """The file's records; a line cut short by a killed writer is left out."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(decode(line))
        except RecordError:
            continue
    return out


def headers(path) -> list[Header]:
    return [r for r in records(path) if isinstance(r, Header)]


def sealed_blocks(path) -> dict[str, list[list[bytes]]]:
    """Each run's blocks, checked the way the writer makes them: n lines of one run, sealed.

    Each seal chains the run's previous seal, the file's previous seal and the block.
    """
    lines = path.read_bytes().splitlines(keepends=True)
    heads: dict[str, bytes] = {}
    before = b""
    blocks: dict[str, list[list[bytes]]] = {}
    block: list[bytes] = []
    chain = SealChain(None)
    for line in lines:
        record = decode(line)
        if not isinstance(record, Seal):
            block.append(line)
            continue
        assert len(block) == record.count, "a seal counts the lines since the last seal"
        assert {decode(b).run for b in block} == {record.run}, "a block holds one run"
        head = chain.digest(heads.get(record.run, b""), before, b"".join(block))
        assert head == record.digest
        heads[record.run] = before = head
        blocks.setdefault(record.run, []).append(block)
        block = []
    assert block == [], "nothing after the last seal"
    return blocks


def learner(path, cbs=(), n_train=2) -> Learner:
    return Learner(mlp(), batches_dls(n_train, 1), F.cross_entropy, 0.1, list(cbs), audit_log=path)


class BigNote(Callback):
    """A note of about 100 KB at the end of the fit: a last block longer than a small window."""

    def after_fit(self, learn: Learner) -> None:
        learn.note("big", blob="x" * 100_000)


class TestBlocks:
    def test_a_short_fit_is_one_sealed_block(self, tmp_path):
        """Header, transitions and footer of a fit of a few batches go out in one write."""
        path = tmp_path / "runs.jsonl"
        result = learner(path).fit(1)
        [blocks] = sealed_blocks(path).values()
        assert len(blocks) == 1
        assert decode(blocks[0][0]) == headers(path)[0]
        last = records(path)[-1]
        assert isinstance(last, Seal)
        assert last.digest.hex() == result.head

    def test_a_keyed_chain_differs_and_says_so(self, tmp_path):
        """With a key the seals are a MAC: the header says keyed, the unkeyed chain fails."""
        path = tmp_path / "keyed.jsonl"
        Learner(mlp(), batches_dls(1, 1), F.cross_entropy, audit_log=path, audit_key="k").fit(1)
        [header] = headers(path)
        assert header.keyed is True
        with pytest.raises(AssertionError):
            sealed_blocks(path)

    @pytest.mark.parametrize(("run", "kind"), [("validate", "validate"), ("get_preds", "predict")])
    def test_an_inference_run_is_one_sealed_block_with_its_kind(self, run, kind, tmp_path):
        """A validate or predict run: a header saying its kind, no optimizer, one block."""
        path = tmp_path / "runs.jsonl"
        learn = learner(path)
        getattr(learn, run)()
        [blocks] = sealed_blocks(path).values()
        assert len(blocks) == 1
        [header] = headers(path)
        assert (header.fields["kind"], header.fields["opt"], header.fields["n_epochs"]) == (
            kind,
            None,
            0,
        )
        assert records(path)[-1].digest.hex() == learn.audit_head


class TestPrev:
    def test_each_run_binds_to_the_last_seal_before_it(self, tmp_path):
        """First run: "" (a new file); then each header names the previous run's head."""
        path = tmp_path / "runs.jsonl"
        heads = [learner(path).fit(1).head for _ in range(3)]
        assert [h.prev for h in headers(path)] == ["", heads[0], heads[1]]

    def test_runs_of_every_kind_chain_in_one_file(self, tmp_path):
        """A fit, a validate and a predict run appended to one file: bound and verified."""
        path = tmp_path / "runs.jsonl"
        learn = learner(path)
        heads = [learn.fit(1).head]
        for run in (learn.validate, learn.get_preds):
            run()
            heads.append(learn.audit_head)
        assert [h.prev for h in headers(path)] == ["", heads[0], heads[1]]
        reports, problem = audit_file(path)
        assert problem is None
        assert [(r.kind, r.verified, r.head) for r in reports] == [
            ("fit", True, heads[0]),
            ("validate", True, heads[1]),
            ("predict", True, heads[2]),
        ]

    def test_a_directory_gives_each_run_a_new_file(self, tmp_path):
        """In a directory every run starts its own file: prev is empty."""
        learn = learner(tmp_path / "logs")
        learn.fit(1)
        learn.fit(1)
        files = sorted((tmp_path / "logs").iterdir())
        assert [h.prev for p in files for h in headers(p)] == ["", ""]

    def test_after_a_cut_line_it_binds_to_the_last_whole_seal(self, tmp_path):
        """A killed writer's cut line is ended, and skipped: prev is the seal before it."""
        path = tmp_path / "runs.jsonl"
        first = learner(path).fit(1)
        path.write_bytes(path.read_bytes() + b'{"ev":"begin_fit","run":"cut-off')
        learner(path).fit(1)
        assert headers(path)[1].prev == first.head
        assert b'{"ev":"begin_fit","run":"cut-off\n' in path.read_bytes()

    def test_a_seal_whose_newline_was_lost_binds_the_next_run(self, tmp_path):
        """A file cut just before its final newline still ends in a seal: the next run binds to it.

        The writer used to skip the unterminated seal while the audit, once the line was
        ended, counted it: the honest next run then read as bound to the wrong seal.
        """
        path = tmp_path / "runs.jsonl"
        first = learner(path).fit(1)
        path.write_bytes(path.read_bytes()[:-1])
        second = learner(path).fit(1)
        assert headers(path)[1].prev == first.head
        sealed_blocks(path)
        reports, problem = audit_file(path)
        assert problem is None
        assert [(r.run_id, r.verified) for r in reports] == [
            (first.run_id, True),
            (second.run_id, True),
        ]

    def test_an_unsealed_tail_of_any_size_is_looked_past(self, tmp_path):
        """A killed writer's unsealed tail longer than any window: prev is the seal before it."""
        path = tmp_path / "runs.jsonl"
        first = learner(path).fit(1)
        tail = b'{"ev":"note","run":"killed","name":"x","blob":"' + b"y" * 300_000 + b'"}\n'
        path.write_bytes(path.read_bytes() + tail * 12)  # 3.6 MB, no seal
        learner(path).fit(1)
        assert headers(path)[1].prev == first.head

    def test_a_long_last_block_is_found(self, tmp_path):
        """The last seal may lie far further back than the first window the writer reads."""
        path = tmp_path / "runs.jsonl"
        first = learner(path, [BigNote()]).fit(1)
        data = path.read_bytes()
        assert len(data) > 100_000
        path.write_bytes(data + b"x" * 50_000)  # a long cut line after the last seal
        learner(path).fit(1)
        assert headers(path)[1].prev == first.head


def _fit_many(path: str, n: int) -> None:
    for _ in range(n):
        learner(path, n_train=3).fit(2)


class TestSeveralWritersOneFile:
    def test_threads(self, tmp_path):
        """Two learners in two threads on one file: blocks never mix, every run verifies."""
        path = tmp_path / "shared.jsonl"
        threads = [threading.Thread(target=_fit_many, args=(path, 4)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert len(sealed_blocks(path)) == 8
        reports, problem = audit_file(path)
        assert problem is None
        assert [r.verified for r in reports] == [True] * 8

    def test_processes(self, tmp_path):
        """Two processes appending to one file at once: every run of both verifies."""
        path = tmp_path / "shared.jsonl"
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_fit_many, args=(str(path), 3)) for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
            if proc.is_alive():  # pragma: no cover (a hang: fail, never block CI)
                proc.kill()
        assert [p.exitcode for p in procs] == [0, 0]
        assert len(sealed_blocks(path)) == 6
        reports, problem = audit_file(path)
        assert problem is None
        assert [r.verified for r in reports] == [True] * 6

    def test_a_learner_inside_another_fit(self, tmp_path):
        """A fit started from a hook of another fit on the same file: both runs verify.

        One writer per file used to be enforced with AuditLogInUseError; now blocks
        go out whole under a lock, so nested and concurrent fits share a file.
        """
        path = tmp_path / "runs.jsonl"
        inner: list[str] = []

        class SecondFit(Callback):
            def after_epoch(self, learn: Learner) -> None:
                if learn.training:
                    inner.append(learner(path).fit(1).run_id)

        outer = learner(path, [SecondFit()]).fit(1)
        reports, problem = audit_file(path)
        assert problem is None
        assert sorted((r.run_id, r.verified) for r in reports) == sorted(
            [(outer.run_id, True), (inner[0], True)]
        )

    def test_a_rank_writes_its_own_file(self, tmp_path, monkeypatch):
        """Under torch.distributed, rank 1 of a .jsonl target writes <stem>.rank1.jsonl."""
        import fsm_learner.learner as learner_module

        monkeypatch.setattr(learner_module, "_rank", lambda: 1)
        result = learner(tmp_path / "runs.jsonl").fit(1)
        assert result.audit_path == tmp_path / "runs.rank1.jsonl"
        assert [p.name for p in tmp_path.iterdir()] == ["runs.rank1.jsonl"]


class TestInterruptedWrites:
    @pytest.mark.parametrize(
        ("flush_at", "status"),
        [(5, "failed"), (8192, "completed")],
        ids=["mid-fit block", "closing block"],
    )
    def test_a_commit_cut_short_is_found_in_the_file(self, tmp_path, monkeypatch, flush_at, status):
        """Ctrl-C after a block is written, before it commits: it counts once, never twice.

        Mid-fit, the failure path takes the block in and writes the fail record after it;
        on the closing block (the footer written), the run stands completed.
        """
        import fsm_learner.audit.writer as writer_module

        monkeypatch.setattr(writer_module, "FLUSH_AT", flush_at)
        path = tmp_path / "runs.jsonl"
        commit = AuditWriter._commit.__code__
        fired = []

        def tracer(frame, event, _arg):
            if frame.f_code is commit and event == "call" and not fired:
                fired.append(1)
                raise KeyboardInterrupt

        learn = learner(path)
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                learn.fit(1)
        finally:
            sys.settrace(None)
        assert fired
        [report], problem = audit_file(path)
        assert problem is None
        assert (report.status, report.verified) == (status, True)
        sealed_blocks(path)  # each record once, in sealed blocks
        assert learn.state == "idle"

    def test_a_write_cut_short_is_cut_off(self, tmp_path):
        """Half a block at the end of the file (nothing after it) is cut off and written again."""
        path = tmp_path / "runs.jsonl"
        write_all = JsonlFile._write_all
        calls = []

        def half_then_interrupt(self, data):
            if not calls and len(data) > 1:
                calls.append(1)
                write_all(self, data[: len(data) // 2])
                raise KeyboardInterrupt
            write_all(self, data)

        learn = learner(path)
        JsonlFile._write_all = half_then_interrupt
        try:
            with pytest.raises(KeyboardInterrupt):
                learn.fit(1)
        finally:
            JsonlFile._write_all = write_all
        [report], problem = audit_file(path)
        assert problem is None
        assert (report.status, report.verified) == ("failed", True)


class TestNoEmptyLogs:
    def test_a_run_that_never_writes_leaves_no_file(self, tmp_path, monkeypatch):
        """An empty <run_id>.jsonl would fail every later audit: a full disk leaves none."""

        def disk_full(_self, block):
            raise OSError(28, "No space left on device")

        learn = learner(tmp_path / "logs")
        monkeypatch.setattr(JsonlFile, "msg", disk_full)
        with pytest.raises(OSError, match="No space left") as caught:
            learn.fit(1)
        assert learn.state == "idle"
        assert list((tmp_path / "logs").iterdir()) == []
        notes = "\n".join(caught.value.__notes__)
        assert "while closing the audit log" in notes
        monkeypatch.undo()
        assert learn.fit(1).status == "completed"


def _open_fds_under(root) -> list[str]:
    """The files under ``root`` this process holds open (Linux's /proc/self/fd)."""
    import os
    from pathlib import Path

    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(f"{root}{os.sep}"):
            found.append(target)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
class TestInterruptedOpen:
    """Ctrl-C anywhere while the log file is opened leaves no descriptor open."""

    @pytest.mark.filterwarnings("ignore::ResourceWarning")
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    def test_every_event_of_the_open(self, tmp_path):
        """A KeyboardInterrupt at each line, call and return event of the opening code (as the
        fault-injection trials place Ctrl-C), one trial per event: no descriptor is left.

        At a return event the FileIO being returned is dropped, and closed as it goes (the
        warnings it gives then are ignored here): what must never happen is a descriptor
        that nothing owns, as an opener's return left one."""
        import fsm_learner.audit.writer as writer_module

        codes = {
            f.__code__
            for f in vars(writer_module).values()
            if callable(f) and hasattr(f, "__code__") and "open" in f.__name__
        }
        codes |= {writer_module._file_io.__code__}
        trial = 0
        while True:
            path = tmp_path / f"t{trial}" / "log.jsonl"
            path.parent.mkdir()
            seen = [0]

            def tracer(frame, event, _arg, target=trial, seen=seen):
                if frame.f_code in codes:
                    if seen[0] == target:
                        seen[0] += 1
                        raise KeyboardInterrupt
                    seen[0] += 1
                return tracer

            sys.settrace(tracer)
            try:
                JsonlFile(path)._fh.close()
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            finally:
                sys.settrace(None)
            assert _open_fds_under(path.parent) == [], f"interrupt at event {trial}"
            if not interrupted:
                break
            trial += 1
        assert trial > 5  # the opening code was interrupted at each of its events
