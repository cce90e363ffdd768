"""The books of a Horovod Elastic run: its world sizes over time and what each change cost.

distbatch/training/elastic.py runs the job again whenever its workers change; this module
only keeps the record, as plain JSON-ready data that rank 0 hands to every rank (new ones
too) at each restart, and that ends up in summary.json under "elastic":

    world_sizes   [{"workers": 2, "from_step": 0, "started": t0}, {"workers": 1, ...}, ...]
    events        one per change: what happened ("worker lost", "hosts added", ...), the
                  last step the old world completed, the commit the new world resumed from,
                  the workers before and after, and
                      steps_lost   = at_step - resumed_from_step       (steps computed twice)
                      seconds_lost = back - commit_time                (wall clock)
                  where commit_time is when that commit was written and back is when the new
                  world's first training call ended (restart, rebuild, restore and compile
                  included). A change at a commit (hosts added or removed: distbatch saves
                  first) loses no steps, only the seconds of the restart.
    steps_lost, seconds_lost   the sums over all events

Pure Python (no TensorFlow, no Horovod): unit-tested as data.
"""
from __future__ import annotations

import copy

# Consecutive restarts that did not get back to training before the next failure. Past
# this many the error is not a lost worker but the job itself (every attempt fails the same
# way) and the run ends with it instead of restarting forever.
MAX_RESTARTS_WITHOUT_PROGRESS = 3

HOST_CHANGES = {1: "hosts removed", 2: "hosts added", 3: "hosts changed"}  # HostUpdateResult


def host_change(update: int) -> str:
    """The event's name for Horovod's HostUpdateResult flags (removed 1, added 2, both 3)."""
    return HOST_CHANGES.get(int(update), "hosts changed")


class WorldChanges:
    """The record (``data``, a dict of JSON types) and the four moments that change it:
    :meth:`begin_attempt`, :meth:`interrupted`, :meth:`back` (training runs again) and
    :meth:`summary` at the end. Every rank keeps its own copy; rank 0's wins at each
    restart (elastic.ElasticState.sync)."""

    def __init__(self, data: dict | None = None) -> None:
        self.data = copy.deepcopy(data) if data else {
            "started": None,        # when the job's first attempt began (seconds since the epoch)
            "attempts": 0,          # attempts begun in this job (the first is 1)
            "trained": False,       # an attempt trained: the run directory is this job's
            "worlds": [],           # world_sizes
            "events": [],
            "pending": None,        # the change the current attempt recovers from
            "without_progress": 0,  # restarts in a row that failed before training again
        }
        self.attempt: dict = {}     # this process's view of the current attempt (not shared)

    # -- the four moments ----------------------------------------------------------------
    def begin_attempt(self, *, workers: int, now: float, from_step: int,
                      commit_time: float | None) -> None:
        """An attempt starts on `workers` workers from the commit of `from_step` (0 without one),
        written at `commit_time` (None: no commit, the job's start counts)."""
        d = self.data
        d["attempts"] += 1
        if d["started"] is None:
            d["started"] = now
        self.attempt = {"workers": workers, "from_step": from_step,
                        "commit_time": d["started"] if commit_time is None else commit_time,
                        "last_step": None}

    def step_done(self, step: int) -> None:
        """A training call of this attempt completed up to `step` (every rank, every call)."""
        self.attempt["last_step"] = step

    def interrupted(self, event: str, *, now: float) -> None:
        """The attempt ends early: a worker was lost, or the hosts changed. The first
        interruption before training resumes is the one recorded (a restart that fails again
        before training does not add a second event, only more lost seconds)."""
        d, a = self.data, self.attempt
        if a.get("last_step") is None:
            d["without_progress"] += 1
        else:
            d["without_progress"] = 0
        if d["pending"] is not None and a.get("last_step") is None:
            return
        at = a["last_step"] if a.get("last_step") is not None else a.get("from_step", 0)
        d["pending"] = {"event": event, "at_step": at, "time": now,
                        "workers_before": a.get("workers")}

    def back(self, *, now: float) -> dict | None:
        """The attempt's first training call ended: a new world size starts (the first one
        too); returns the completed change event, if this attempt recovered from one."""
        d, a = self.data, self.attempt
        if a.get("back") is not None:
            return None
        a["back"] = now
        d["trained"] = True
        d["without_progress"] = 0
        d["worlds"].append({"workers": a["workers"], "from_step": a["from_step"],
                            "started": round(now, 3)})
        pending, d["pending"] = d["pending"], None
        if pending is None:
            return None
        event = {**pending, "resumed_from_step": a["from_step"], "workers_after": a["workers"],
                 "steps_lost": max(0, pending["at_step"] - a["from_step"]),
                 "seconds_lost": round(max(0.0, now - a["commit_time"]), 3),
                 "downtime_s": round(max(0.0, now - pending["time"]), 3),
                 "time": round(pending["time"], 3)}
        d["events"].append(event)
        return event

    def summary(self, commit_every: str) -> dict:
        """summary.json's "elastic" entry."""
        d = self.data
        events = d["events"]
        return {"commit_every": commit_every, "world_sizes": list(d["worlds"]), "events": list(events),
                "changes": len(events), "steps_lost": sum(e["steps_lost"] for e in events),
                "seconds_lost": round(sum(e["seconds_lost"] for e in events), 3)}

    # -- questions the attempt asks --------------------------------------------------------
    @property
    def first_attempt(self) -> bool:
        return self.data["attempts"] <= 1

    @property
    def trained(self) -> bool:
        return bool(self.data["trained"])

    def give_up(self) -> bool:
        """True when restarts keep failing before training (see MAX_RESTARTS_WITHOUT_PROGRESS)."""
        return self.data["without_progress"] >= MAX_RESTARTS_WITHOUT_PROGRESS


def change_line(event: dict) -> str:
    """The one line the chief prints for a change, when training runs again."""
    return (f"distbatch: elastic: {event['event']} at step {event['at_step']} "
            f"({event['workers_before']} -> {event['workers_after']} workers); resumed from the "
            f"commit at step {event['resumed_from_step']}: {event['steps_lost']} step(s) and "
            f"{event['seconds_lost']:.1f} s lost")
