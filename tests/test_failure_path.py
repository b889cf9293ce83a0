"""The failure path keeps the user's exception and a complete log, whatever fights back.

Logging setups that break emission, exceptions that refuse notes or cannot be printed,
and interrupts that land inside the library's own bookkeeping (between a state change
and its record, in the middle of a flush, during the failure handling itself).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import sys
from pathlib import Path

import attrs
import orjson
import pytest
import structlog
import torch.nn.functional as F
from helpers import Boom, Raiser, batches_dls, mlp

from fsm_learner import Hook, Learner, RunStatus, State
from fsm_learner._compat import add_note
from fsm_learner.cli import main
from fsm_learner.learner import Learner as LearnerClass

H = Hook
TAMPER_WORDS = ("chain", "sequence number", "illegal transition", "replayed", "counts")


def learner(plan=None, *, log: Path, cbs=(), **kwargs) -> Learner:
    return Learner(
        mlp(),
        batches_dls(3, 2),
        F.cross_entropy,
        0.1,
        [Raiser(plan or {}), *cbs],
        audit_log=log,
        **kwargs,
    )


def audit_json(path: Path, capsys) -> dict:
    capsys.readouterr()
    main(["audit", "--json", str(path)])
    return orjson.loads(capsys.readouterr().out)


def only_run(path: Path, capsys) -> dict:
    payload = audit_json(path, capsys)
    assert len(payload["runs"]) == 1, payload
    return payload["runs"][0]


def open_fds_to(path: Path) -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if target == path.resolve():
            found.append(fd.name)
    return found


def assert_failed_and_reusable(learn: Learner, path: Path, capsys, *, message: str) -> None:
    """The learner is idle and fits again; the failed run verifies and says why."""
    assert learn.state == State.IDLE
    run = only_run(path, capsys)
    assert (run["status"], run["verified"]) == ("failed", True), run["problem"]
    assert run["failure"]["message"] == message
    assert open_fds_to(path) == []
    learn.cbs = [cb for cb in learn.cbs if not isinstance(cb, Raiser)]
    assert learn.fit(1).status is RunStatus.COMPLETED


@pytest.fixture
def root_at_info():
    """An application that logs at INFO on the root logger (what basicConfig does)."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


class TestLoggingSetups:
    @pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING])
    def test_stdlib_logging_at_any_level_keeps_the_exception(
        self, level, root_at_info, tmp_path, capsys
    ):
        """With the root logger at INFO, a failed fit used to raise KeyError ('message')."""
        logging.getLogger().setLevel(level)
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.AFTER_LOSS, 2): lambda: ValueError("bad batch")}, log=log)
        with pytest.raises(ValueError, match="bad batch") as info:
            learn.fit(1)
        assert info.value.__notes__[0] == (
            "fsm_learner: ValueError in state 'loss', in hook after_loss of Raiser"
        )
        if level <= logging.INFO:
            assert "INFO fsm_learner run_failed {'run_id'" in root_at_info.getvalue()
        assert_failed_and_reusable(learn, log, capsys, message="bad batch")

    def test_the_failure_fields_reach_stdlib_handlers(self, tmp_path, caplog):
        """Fields a LogRecord already has are prefixed: the message is fsm_message."""
        learn = learner({(H.AFTER_LOSS, 1): lambda: ValueError("why")}, log=tmp_path / "r.jsonl")
        with caplog.at_level(logging.INFO, logger="fsm_learner"), pytest.raises(ValueError):
            learn.fit(1)
        failed = next(r for r in caplog.records if r.getMessage().startswith("run_failed"))
        assert (failed.fsm_message, failed.type, failed.hook) == ("why", "ValueError", "after_loss")
        assert failed.run_id == learn.run_id

    def test_structlog_bridged_to_stdlib(self, tmp_path, caplog):
        """structlog's render_to_log_kwargs bridge: the failure's message used to clash."""
        structlog.configure(
            processors=[structlog.stdlib.render_to_log_kwargs],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
        )
        try:
            learn = learner({(H.AFTER_LOSS, 1): lambda: ValueError("why")}, log=tmp_path / "r")
            with caplog.at_level(logging.INFO, logger="fsm_learner"), pytest.raises(ValueError):
                learn.fit(1)
        finally:
            structlog.reset_defaults()
        failed = next(r for r in caplog.records if r.getMessage() == "run_failed")
        assert (failed.fsm_message, failed.type, failed.run_id) == (
            "why",
            "ValueError",
            learn.run_id,
        )

    def test_a_logging_filter_that_raises(self, tmp_path, capsys):
        """A filter's error propagates out of logger.info: it must not replace the failure."""
        logger = logging.getLogger("fsm_learner")

        def broken(record):
            raise RuntimeError("filter is broken")

        logger.addFilter(broken)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            log = tmp_path / "runs.jsonl"
            learn = learner({(H.BEFORE_BATCH, 2): lambda: Boom("boom")}, log=log)
            with pytest.raises(Boom):
                learn.fit(1)
            err = capsys.readouterr().err
        finally:
            logger.removeFilter(broken)
            logger.setLevel(level)
        assert "could not emit the run_failed event" in err
        assert "filter is broken" in err
        assert_failed_and_reusable(learn, log, capsys, message="boom")

    def test_structlog_configured_with_a_failing_processor(self, tmp_path, capsys):
        """An application's structlog chain that raises loses neither exception nor log."""

        def broken(logger, method, event_dict):
            raise RuntimeError("processor is broken")

        structlog.configure(processors=[broken], logger_factory=structlog.PrintLoggerFactory())
        try:
            log = tmp_path / "runs.jsonl"
            learn = learner({(H.AFTER_STEP, 1): lambda: Boom("boom")}, log=log)
            with pytest.raises(Boom):
                learn.fit(1)
        finally:
            structlog.reset_defaults()
        assert "processor is broken" in capsys.readouterr().err
        assert_failed_and_reusable(learn, log, capsys, message="boom")


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """A frozen dataclass exception: add_note cannot set __notes__ on it."""

    code: int


@attrs.frozen(auto_exc=True)
class AttrsError(Exception):
    """An attrs exception, frozen."""

    code: int


class Unprintable(Exception):
    """An exception whose __str__ raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class WeirdText(str):
    """A str whose len() and slicing raise."""

    __slots__ = ()

    def __len__(self) -> int:
        raise RuntimeError("no len")

    def __getitem__(self, item):
        raise RuntimeError("no slicing")


class OddText(Exception):
    """An exception whose str() is a str subclass that fights back."""

    def __str__(self) -> str:
        return WeirdText("odd message")


class ExitOnSetattr(Exception):
    """An exception whose __setattr__ (and so add_note) raises SystemExit."""

    def __setattr__(self, name, value):
        raise SystemExit("cannot set " + name)


class TestExceptionsThatFightBack:
    def test_a_str_subclass_that_fights_back(self, tmp_path, capsys):
        """Its len() used to raise in the description: the records and footer were lost."""
        raised = OddText()
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.BEFORE_BATCH, 2): lambda: raised}, log=log)
        with pytest.raises(OddText) as info:
            learn.fit(1)
        assert info.value is raised
        assert_failed_and_reusable(learn, log, capsys, message="odd message")

    def test_add_note_raising_a_base_exception(self, tmp_path, capsys):
        """SystemExit from __setattr__ used to replace the user's exception."""
        raised = ExitOnSetattr("mine")
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.AFTER_LOSS, 1): lambda: raised}, log=log)
        with pytest.raises(ExitOnSetattr) as info:
            learn.fit(1)
        assert info.value is raised
        assert_failed_and_reusable(learn, log, capsys, message="mine")

    @pytest.mark.parametrize("kind", [FrozenError, AttrsError])
    def test_exception_refusing_notes(self, kind, tmp_path, capsys):
        """The same object is re-raised without its note; the learner is idle, the log whole."""
        raised = kind(7)
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.AFTER_PREDICT, 2): lambda: raised}, log=log)
        with pytest.raises(kind) as info:
            learn.fit(1)
        assert info.value is raised
        assert learn.failure is not None
        assert learn.failure.state == State.PREDICT
        message = str(raised)
        assert_failed_and_reusable(learn, log, capsys, message=message)

    def test_exception_whose_str_raises(self, tmp_path, capsys):
        """It is described by its type; the footer is written and the file closed."""
        raised = Unprintable()
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.AFTER_LOSS, 1): lambda: raised}, log=log)
        with pytest.raises(Unprintable) as info:
            learn.fit(1)
        assert info.value is raised
        assert info.value.__notes__[-1] == f"fsm_learner: audit log {log}"
        message = "<Unprintable whose str() raised RuntimeError>"
        assert_failed_and_reusable(learn, log, capsys, message=message)

    def test_after_fail_raising_an_unprintable_error(self, tmp_path, capsys):
        """The after_fail error is noted by its type; the first failure still wins."""
        log = tmp_path / "runs.jsonl"
        plan = {(H.AFTER_LOSS, 1): lambda: Boom("first"), (H.AFTER_FAIL, 1): Unprintable}
        learn = learner(plan, log=log)
        with pytest.raises(Boom) as info:
            learn.fit(1)
        assert info.value.__notes__[1] == (
            "fsm_learner: then after_fail of Raiser raised "
            "Unprintable: <Unprintable whose str() raised RuntimeError> (ignored)"
        )
        assert_failed_and_reusable(learn, log, capsys, message="first")

    def test_ctrl_c_while_the_failure_is_handled(self, tmp_path, capsys):
        """A KeyboardInterrupt in after_fail and in the failure's log event: still idle, whole."""

        class CtrlCOnFailedEvent(logging.Filter):
            def filter(self, record):
                if record.getMessage().startswith("run_failed"):
                    raise KeyboardInterrupt
                return True

        logger = logging.getLogger("fsm_learner")
        level, flt = logger.level, CtrlCOnFailedEvent()
        logger.setLevel(logging.INFO)
        logger.addFilter(flt)
        log = tmp_path / "runs.jsonl"
        plan = {(H.AFTER_STEP, 2): lambda: Boom("first"), (H.AFTER_FAIL, 1): KeyboardInterrupt}
        learn = learner(plan, log=log)
        try:
            with pytest.raises(Boom) as info:
                learn.fit(1)
        finally:
            logger.removeFilter(flt)
            logger.setLevel(level)
        notes = info.value.__notes__
        assert "fsm_learner: then after_fail of Raiser raised KeyboardInterrupt (ignored)" in notes
        assert (
            "fsm_learner: then KeyboardInterrupt while closing the audit log "
            "(ignored: the first failure wins)"
        ) in notes
        assert_failed_and_reusable(learn, log, capsys, message="first")


def _line_of(func, text: str) -> int:
    source, first = inspect.getsourcelines(func)
    return first + next(i for i, line in enumerate(source) if line.strip() == text)


class InterruptAt:
    """A tracer that raises KeyboardInterrupt at the n-th time a given line is reached."""

    def __init__(self, code, line: int, nth: int) -> None:
        self.code, self.line, self.nth, self.seen = code, line, nth, 0

    def __call__(self, frame, event, arg):
        if frame.f_code is not self.code:
            return None
        return self.local

    def local(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.line:
            self.seen += 1
            if self.seen == self.nth:
                raise KeyboardInterrupt
        return self.local

    def __enter__(self):
        sys.settrace(self)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


class TestInterruptsInsideTheLibrary:
    def test_ctrl_c_in_a_handler_does_not_change_what_fit_raises(self, tmp_path, capsys):
        """Ctrl-C as add_note gives up on a frozen exception: fit still raises that exception.

        A KeyboardInterrupt from a trace function on the line after an except clause leaves
        CPython 3.11 thinking the clause's exception is still being handled: a bare
        ``raise`` further up re-raised the FrozenInstanceError add_note had caught.
        """
        line = _line_of(add_note, "return False")
        raised = FrozenError(7)
        log = tmp_path / "runs.jsonl"
        learn = learner({(H.AFTER_LOSS, 1): lambda: raised}, log=log)
        with pytest.raises(FrozenError) as info, InterruptAt(add_note.__code__, line, 1):
            learn.fit(1)
        assert info.value is raised
        assert_failed_and_reusable(learn, log, capsys, message=str(raised))

    @pytest.mark.parametrize("nth", [1, 2, 3, 9, 20, 31])
    def test_between_a_state_change_and_what_follows_it(self, nth, tmp_path, capsys):
        """Ctrl-C right after the state changes in _fire: the log still replays, as failed."""
        fire = LearnerClass._fire
        line = _line_of(fire, "self._counts[route.count_key] += 1")
        log = tmp_path / "runs.jsonl"
        learn = learner(log=log)
        with pytest.raises(KeyboardInterrupt), InterruptAt(fire.__code__, line, nth):
            learn.fit(1)
        assert learn.state == State.IDLE
        run = only_run(log, capsys)
        assert (run["status"], run["verified"]) == ("failed", True), run["problem"]
        assert learn.fit(1).status is RunStatus.COMPLETED

    @pytest.mark.parametrize("module", ["writer", "run"])
    def test_every_line_of_the_writer(self, tmp_path, capsys, monkeypatch, module):
        """Ctrl-C at each line the log writer (or the run object) runs, a flush every 4 records.

        The log then verifies as failed, or (where the interrupt cut the footer's own
        write) reports a truncated run; it never reads as tampered, and nothing is lost.
        """
        import fsm_learner.audit.writer as writer_module
        import fsm_learner.run as run_module

        monkeypatch.setattr(writer_module, "FLUSH_AT", 4)
        writer_file = (writer_module if module == "writer" else run_module).__file__
        outcomes: dict[str, int] = {}
        for k in range(1, 1500, 6):
            log = tmp_path / f"run{k}.jsonl"
            learn = learner(log=log)
            counter = _CountLines(writer_file, k)
            sys.settrace(counter)
            try:
                learn.fit(1)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            if not counter.fired:
                break
            assert learn.state == State.IDLE, k
            payload = audit_json(log, capsys) if log.exists() else {"runs": []}
            for run in payload["runs"]:
                reason = (run["problem"] or {}).get("reason", "")
                assert not any(word in reason for word in TAMPER_WORDS), (k, reason)
                if not run["verified"]:
                    assert "truncated" in reason, (k, reason)
                outcomes[run["status"]] = outcomes.get(run["status"], 0) + 1
        assert counter.fired is False, "raise the range: the writer ran more lines"
        assert outcomes.get("failed", 0) > (20 if module == "writer" else 10), outcomes


class _CountLines:
    """Raise KeyboardInterrupt at the k-th line event in one source file."""

    def __init__(self, filename: str, k: int) -> None:
        self.filename, self.k, self.seen, self.fired = filename, k, 0, False

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != self.filename:
            return None
        return self.local

    def local(self, frame, event, arg):
        if event == "line" and not self.fired:
            self.seen += 1
            if self.seen == self.k:
                self.fired = True
                raise KeyboardInterrupt
        return self.local
