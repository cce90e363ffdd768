"""What `distbatch launch horovod` shows of horovodrun's own output: every rank line, and
horovodrun's lines without its redundant tracebacks and TensorFlow's start-up notices."""
from __future__ import annotations

import os
import re


VERBOSE_ENV = "DISTBATCH_VERBOSE"  # set by `distbatch --verbose`: show TensorFlow's own lines


class LauncherTracebackFilter:
    """Drops horovodrun's own Python traceback after a failed or stopped job, keeps every other line.

    After any rank fails, or after distbatch stops the job on SIGTERM, horovodrun raises
    ``RuntimeError: Horovod detected that one or more processes exited with non-zero status
    ...`` (Gloo; with --mpi ``RuntimeError: mpirun failed with exit code N``): a 15-line
    traceback under distbatch's own line that says the same. The traceback and that line go;
    the message's own ``Process name: R`` / ``Exit code: C`` lines stay (horovodrun's word on
    which rank ended first). Rank lines carry horovodrun's prefix (``[0]<stderr>:``,
    ``[1,0]<stdout>:``) and never start a traceback here, so a rank's own traceback is kept.
    A traceback is held until its exception line shows which one it is: any other (an ssh
    failure, a bug in horovodrun) is passed on whole.

    A second one comes from horovodrun's teardown itself: when the job is being stopped, the
    helper process that runs each rank kills the rank's shell from a thread, and that thread can
    lose a race with the shell's own exit and print ``Exception in thread Thread-1 (fn):`` and a
    traceback through ``terminate_executor_shell_and_children`` (safe_shell_exec.py). That block,
    chained exceptions included, goes too; a thread traceback anywhere else is passed on whole.
    Rank lines that arrive while a traceback is held are shown at once.
    """

    REDUNDANT = (re.compile(r"RuntimeError: Horovod detected that one or more processes exited with "
                            r"non-zero status"),
                 re.compile(r"RuntimeError: mpirun failed with exit code -?\d+$"))
    TAIL = re.compile(r"Process name: \S+|Exit code: -?\d+")  # the message's last lines, then a blank
    # TensorFlow's start-up notices, printed before it reads TF_CPP_MIN_LOG_LEVEL, by horovodrun's
    # own process (it imports TensorFlow) and by ranks running the user's script; `distbatch
    # train` alone silences them (cli.quiet_tensorflow), `--verbose` shows them.
    START_UP = re.compile(
        r"(\[\d+(,\d+)?\]<std(out|err)>:)?("
        r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
        r"|I0000 00:00:\S+\s+\d+ (port|cpu_feature_guard)\.cc:\d+\] .*"
        r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate "
        r"compiler flags\.)")

    RANK_LINE = re.compile(r"\[\d+(,\d+)?\]<std(out|err)>:")
    THREAD_START = re.compile(r"Exception in thread .*:")
    TEARDOWN_FRAME = re.compile(r"\s+File \".*safe_shell_exec\.py\", line \d+, in "
                                r"terminate_executor_shell_and_children")
    CHAIN = ("Traceback (most recent call last):",
             "During handling of the above exception, another exception occurred:",
             "The above exception was the direct cause of the following exception:")

    def __init__(self, quiet: bool | None = None) -> None:
        self.held: list[str] = []
        self.tail = False
        self.thread: list[str] = []  # a thread's traceback, held until it is whole
        self.thread_ended = False    # its exception line came; a chained one may follow
        self.quiet = os.environ.get(VERBOSE_ENV) != "1" if quiet is None else quiet

    def feed(self, line: str) -> list[str]:
        """The lines to show now for one input line (ending in a newline)."""
        text = line.rstrip("\n")
        if self.quiet and self.START_UP.fullmatch(text):
            return []
        if (self.held or self.thread) and self.RANK_LINE.match(text):
            return [line]
        if self.thread:
            if self.thread_ended and text != "" and text not in self.CHAIN[1:]:
                return self._end_thread() + self.feed(line)  # not a chained exception
            self.thread.append(line)
            if self.thread_ended:
                self.thread_ended = text == ""
            elif text[:1] not in (" ", "\t") and text not in self.CHAIN and text != "":
                self.thread_ended = True  # the exception line
            return []
        if self.THREAD_START.fullmatch(text):
            self.thread, self.thread_ended = [line], False
            return []
        if self.tail:
            self.tail = bool(self.TAIL.fullmatch(text))
            if self.tail:
                return [line]
            if text == "":  # the blank line that ends the message
                return []
        if self.held:
            if text[:1] in (" ", "\t"):  # a frame or its source line
                self.held.append(line)
                return []
            if any(p.match(text) for p in self.REDUNDANT):
                self.held, self.tail = [], True
                return []
            shown, self.held = self.held + [line], []
            return shown
        if text == "Traceback (most recent call last):":
            self.held = [line]
            return []
        return [line]

    def _end_thread(self) -> list[str]:
        """A whole thread traceback: nothing if it is horovodrun's teardown race, else all of it."""
        block, self.thread, self.thread_ended = self.thread, [], False
        if any(self.TEARDOWN_FRAME.match(ln) for ln in block):
            return []
        return block

    def flush(self) -> list[str]:
        """Lines still held at the end of the stream: a thread traceback as _end_thread decides,
        a traceback cut short as it is."""
        shown, self.held = self.held, []
        return (self._end_thread() if self.thread else []) + shown
