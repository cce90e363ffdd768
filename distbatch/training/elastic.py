"""Horovod Elastic with Keras 3, on distbatch's own state.

Horovod's elastic Keras state (horovod/tensorflow/elastic.py TensorFlowKerasState) fails
under Keras 3 (horovod#4290: it calls ``optimizer.variables()``, a list property now), and it
would keep only weights and optimizer anyway. distbatch keeps its whole run state in its
checkpoints already (weights, optimizer slots, step, lr schedule position, AdaScale and
noise-scale state, early stopping, history) and resumes them on another number of workers
with the same global batch (job.train, "resume on another world size"). So here:

* a COMMIT is a complete checkpoint in ``OUT/checkpoints`` (every rank reads the same
  directory), written at the run's checkpoint cadence: every ``elastic_commit_every`` steps,
  else the cadence the run was given, else every :data:`COMMIT_SECONDS` s;
* the job (``job.train``) runs inside Horovod's ``run_fn`` with distbatch's own state
  (:func:`make_state`), a ``horovod.common.elastic.State`` whose save/restore do nothing
  (the state is the last commit, on disk) and whose sync hands rank 0's books
  (world_changes.py) to every rank;
* when a worker is lost, the survivors' next collective fails: the attempt ends with
  HorovodInternalError, Horovod re-forms the world, and the job runs again through the
  normal path (backend, plan, model, optimizer) resuming the last commit at the new world
  size. Steps since that commit are computed again;
* when the discovery script adds or removes hosts, Horovod tells rank 0 (on_hosts_updated).
  The training loop's call-boundary decision (distbatch.training.preemption) then stops
  every rank at the same step AFTER saving a checkpoint, exactly as for SIGTERM, and the
  job restarts from it: no step is lost. The decision is the all-reduce the loop takes
  about once a second anyway, so noticing a change costs no extra collective (Horovod's own
  ``check_host_updates`` is a broadcast per call).

Every change is one line on the chief and an entry of summary.json's "elastic" record.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import time
from typing import Callable, Mapping

from distbatch import interrupts
from distbatch.backends import horovod as hvd_backend
from distbatch.errors import PEER_FAILURE_ERRORS, ParameterError, param_name, require_param
from distbatch.training.checkpoints import newest_intact
from distbatch.training.preemption import Preempted, checkpoint_seconds
from distbatch.training.world_changes import WorldChanges, change_line, host_change

ELASTIC_ENV = "HOROVOD_ELASTIC"          # set to 1 by horovodrun in every elastic worker
# "MIN:MAX" (MAX empty when unbounded): the world sizes `distbatch launch horovod` allows,
# so every one of them is checked against the global batch before training starts.
NP_ENV = "DISTBATCH_ELASTIC_NP"
COMMIT_SECONDS = 60.0                    # the default commit cadence
# The label the training loop waits under for one call (trainer.Trainer._run_call): its end
# is the last step this rank completed.
TRAIN_CALL = re.compile(r"train steps (\d+)-(\d+)")


def launched_elastic(env: Mapping[str, str] | None = None) -> bool:
    """True in a worker that horovodrun started in elastic mode."""
    return (os.environ if env is None else env).get(ELASTIC_ENV) == "1"


def elastic_launch(config, env: Mapping[str, str] | None = None) -> bool:
    """Whether job.train must run `config` through :func:`train_elastic`; a one-line note
    (first rank only) when elastic_commit_every was given to a run that is not elastic."""
    env = os.environ if env is None else env
    if launched_elastic(env):
        return True
    if config.elastic_commit_every is not None and all(
            env.get(k, "0") == "0" for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        print(f"distbatch: note: {param_name('elastic_commit_every')} applies to Horovod Elastic runs "
              f"only; this run checkpoints at its checkpoint cadence", file=sys.stderr, flush=True)
    return False


# -- the configuration of each attempt -----------------------------------------------------

def commit_config(config, env: Mapping[str, str] | None = None):
    """(config with the commit cadence, its description): elastic_commit_every steps when
    given; else the run's own checkpoint cadence; else every COMMIT_SECONDS s."""
    seconds = checkpoint_seconds(config.checkpoint_every_seconds, env)
    if config.elastic_commit_every is not None:
        config = config.replace(checkpoint_every=config.elastic_commit_every)
    elif not config.checkpoint_every and not seconds:
        config = config.replace(checkpoint_every_seconds=COMMIT_SECONDS)
        seconds = COMMIT_SECONDS
    parts = [f"every {config.checkpoint_every} steps"] if config.checkpoint_every else []
    parts += [f"every {seconds:g} s"] if seconds else []
    return config, " and ".join(parts) or "at evaluations"


def attempt_config(config, book: WorldChanges):
    """The config an attempt runs: the user's for the first one; later ones resume this job's
    last commit (or, when no attempt trained yet, start again over this job's own files)."""
    if book.data["attempts"] == 0 or config.resume:
        return config
    if book.trained:
        return config.replace(resume=True, overwrite=False)
    # No attempt reached training: the first one accepted OUT (new, empty or overwritten), so
    # whatever is there now is this job's own start.
    return config.replace(overwrite=True)


def last_commit(out: str) -> tuple[int, float | None]:
    """(step, time written) of the commit a resumed attempt continues from: the newest intact
    checkpoint (the one the trainer restores), or (0, None) when there is none."""
    prefix = newest_intact(os.path.join(out, "checkpoints"))
    if prefix is None:
        return 0, None
    return int(prefix.rsplit("-", 1)[1]), os.path.getmtime(prefix + ".index")


def world_range(env: Mapping[str, str] | None = None) -> tuple[int, int | None] | None:
    """(fewest, most) workers from $DISTBATCH_ELASTIC_NP ("1:4", "2:"), None when unknown."""
    raw = (os.environ if env is None else env).get(NP_ENV, "")
    low, sep, high = raw.partition(":")
    try:
        return (int(low), int(high) if high else None) if sep else None
    except ValueError:
        return None


def check_elastic_run(config, sizes: tuple[int, int | None] | None) -> None:
    """What a run needs under Horovod Elastic, before anything is built: the horovod backend,
    a resumable batch policy, and a global batch that every allowed world size can split."""
    require_param(config.backend in ("auto", "horovod"),
                  f"{{backend}} {config.backend}: this process was started by Horovod Elastic "
                  "(horovodrun with a host discovery script or min/max processes); use "
                  "{backend} horovod", "backend")
    require_param(config.cpu_replicas is None, f"{{cpu_replicas}} {config.cpu_replicas} only "
                  "applies to {backend} mirrored, not horovod", "cpu_replicas", "backend")
    require_param(config.collective_options().is_default,
                  "{mwms_implementation}, {bytes_per_pack} and {collective_timeout} apply to "
                  "{backend} multiworker, not horovod", "mwms_implementation", "bytes_per_pack",
                  "collective_timeout", "backend")
    require_param(config.global_batch_size != "auto",
                  "{global_batch_size} auto does not combine with Horovod Elastic yet (a change "
                  "of workers resumes the run, which auto does not support); give a fixed "
                  "{global_batch_size}", "global_batch_size")
    gb = config.global_batch_size
    if sizes is None or not isinstance(gb, int):
        return
    low, high = sizes
    high = high or low
    # Each world size n needs gb = per-replica x n x k; accumulation lowers k where n x k no
    # longer divides gb (assembly.resume_accumulation), so n dividing gb is what is needed.
    bad = [n for n in range(low, high + 1) if gb % n]
    if bad:
        lcm = math.lcm(*range(low, high + 1))
        hint = lcm * max(1, round(gb / lcm))
        raise ParameterError(
            f"{{global_batch_size}} {gb} cannot be split across {bad[0]} workers, a world size this "
            f"elastic job allows ({low} to {high} workers): the global batch stays the same when "
            f"workers come and go; give a multiple of {lcm} (e.g. {hint})", "global_batch_size")


def lost_worker(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because a peer went away (Horovod shuts down
    on every rank when one of them fails: "Horovod has been shut down ...")."""
    if isinstance(exc, _horovod()[2].HorovodInternalError):
        return True
    if not (type(exc).__module__ or "").startswith("tensorflow"):
        return False
    text = str(getattr(exc, "message", None) or exc).lower()
    # Seen here: "Horovod has been shut down ..." (any collective after a peer's failure) and
    # Gloo's "[.../gloo/transport/tcp/pair.cc:589] Read error ...: Connection reset by peer".
    return type(exc).__name__ in PEER_FAILURE_ERRORS or any(
        word in text for word in ("horovod", "gloo", "connection reset", "connection closed"))


# -- Horovod's side ------------------------------------------------------------------------

def make_state(hvd):
    """This process's elastic state: a horovod.common.elastic.State subclass, defined here
    because Horovod is an optional dependency."""
    class ElasticState(_horovod()[1].State):
        """distbatch's elastic state: the run state is the last commit on disk, so save and
        restore do nothing; sync gives every rank (new ones too) rank 0's books; a host
        update asks the training loop to stop at its next call boundary after a commit."""

        def __init__(self) -> None:
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
            self.book = WorldChanges()
            self.hosts_changed = threading.Event()
            self.change = "hosts changed"

        def save(self) -> None:
            """Nothing: a commit is the trainer's checkpoint."""

        def restore(self) -> None:
            """Nothing: the next attempt reads the last commit."""

        def sync(self) -> None:
            self.book.data = hvd.broadcast_object(self.book.data, root_rank=0,
                                                  name="distbatch_elastic_book")

        def on_hosts_updated(self, timestamp, update_res) -> None:
            super().on_hosts_updated(timestamp, update_res)
            self.change = host_change(update_res)
            self.hosts_changed.set()

        def take_change(self) -> str | None:
            """The pending host change (rank 0 only hears of it), consumed."""
            if not self.hosts_changed.is_set():
                return None
            self.hosts_changed.clear()
            return self.change

    return ElasticState()


class ElasticHorovodBackend(hvd_backend.HorovodBackend):
    """HorovodBackend that also reports each completed training call (the step it reached),
    and lets go of its status exchange without shutting Horovod down (Horovod's reset does)."""

    def __init__(self, *, stall_timeout: float | None = None,
                 on_call: Callable[[int], None] | None = None) -> None:
        super().__init__(stall_timeout=stall_timeout)
        self.on_call = on_call

    @contextlib.contextmanager
    def waiting(self, label: str):
        with super().waiting(label):
            yield
        found = TRAIN_CALL.fullmatch(label)
        if found and self.on_call is not None:
            self.on_call(int(found.group(2)))

    def release(self) -> None:
        """Stop this world's status exchange; the next attempt's backend starts its own."""
        self.arrivals.stop()
        hvd_backend._ARRIVALS.clear()


@contextlib.contextmanager
def boundary_requests(extra: Callable[[], bool]):
    """While the elastic job runs, the training loop's "stop after a checkpoint" question
    (distbatch.interrupts.preemption_requested, asked at call boundaries and agreed by all
    ranks) is also true when `extra()` is: a host update. Yields the original question, which
    stays "did THIS process get SIGTERM"."""
    original = interrupts.preemption_requested
    interrupts.preemption_requested = lambda: original() or extra()
    try:
        yield original
    finally:
        interrupts.preemption_requested = original


class Attempts:
    """The function Horovod's run_fn calls again after every change: one attempt of the job."""

    def __init__(self, config, train_fn: Callable, *, data, record, commit_every: str,
                 sigterm: Callable[[], bool]) -> None:
        self.config, self.train_fn, self.data, self.record = config, train_fn, data, record
        self.commit_every, self.sigterm = commit_every, sigterm
        self.book: WorldChanges | None = None
        self.backend = None

    def __call__(self, state):
        hvd, _, exceptions = _horovod()
        self.book = book = state.book
        config = attempt_config(self.config, book)
        step, written = last_commit(config.out) if config.resume else (0, None)
        book.begin_attempt(workers=hvd.size(), now=time.time(), from_step=step, commit_time=written)
        backend = ElasticHorovodBackend(stall_timeout=config.stall_timeout, on_call=self._on_call)
        self.backend = backend
        try:
            return self.train_fn(config, backend=backend, data=self.data, record=self.record,
                                 elastic=self)
        except Preempted:
            if self.sigterm():  # SIGTERM to this process: it leaves with its checkpoint (exit 75)
                raise
            # Hosts added or removed (rank 0 heard of it), or another rank got SIGTERM: every
            # rank saved at the same step; Horovod forms the new world and the job resumes.
            book.interrupted(state.take_change() or "worker stopped (SIGTERM)", now=time.time())
            raise exceptions.HostsUpdatedInterrupt(False) from None
        except Exception as e:
            if not lost_worker(e):
                raise
            book.interrupted("worker lost", now=time.time())
            if book.give_up():
                raise
            raise exceptions.HorovodInternalError(e) from e
        finally:
            backend.release()

    def _on_call(self, step: int) -> None:
        """After each training call, on every rank: the step reached; the first call of an
        attempt means training runs again (the chief says what the change cost)."""
        book = self.book
        book.step_done(step)
        if book.attempt.get("back") is not None:
            return
        first = not book.data["worlds"]
        event = book.back(now=time.time())
        if not self.backend.is_chief:
            return
        if first:
            print(f"distbatch: elastic: training on {book.attempt['workers']} worker(s) (Horovod "
                  f"Elastic); a commit {self.commit_every}", file=sys.stderr, flush=True)
        if event is not None:
            print(change_line(event), file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """summary.json's "elastic" entry (job.train adds it)."""
        if self.book.data["pending"] is not None:  # restarted after its last training call
            self.book.back(now=time.time())
        return self.book.summary(self.commit_every)


def _horovod():
    """(horovod.tensorflow, horovod.common.elastic, horovod.common.exceptions), imported when an
    elastic job runs: Horovod is an optional dependency."""
    import horovod.common.elastic, horovod.common.exceptions, horovod.tensorflow  # noqa: E401
    return horovod.tensorflow, horovod.common.elastic, horovod.common.exceptions


def _reset() -> None:
    hvd = _horovod()[0]
    hvd.shutdown()
    hvd.init()


def train_elastic(config, train_fn: Callable, load_fn: Callable, *, data=None,
                  record: dict | None = None):
    """Run `train_fn` (job.train) under Horovod Elastic: again from the last commit, at the new
    world size, whenever the workers change. `load_fn(config)` loads the data (once per
    process, reused by every attempt) unless `data` is given. Returns what the last attempt
    returned."""
    hvd, horovod_elastic, _ = _horovod()
    hvd.init()
    sizes = world_range()  # an unbounded maximum: at least the sizes up to this world's
    check_elastic_run(config, sizes and (sizes[0], sizes[1] or max(sizes[0], hvd.size())))
    config, commit_every = commit_config(config)
    if data is None:
        data = load_fn(config)
    state = make_state(hvd)
    with boundary_requests(state.hosts_changed.is_set) as sigterm:
        attempts = Attempts(config, train_fn, data=data, record=record, commit_every=commit_every,
                            sigterm=sigterm)
        return horovod_elastic.run_fn(attempts, _reset)(state)
