"""A rank's exit status, written where the launcher reads it: the worker side
(record_exit_code, called by the CLI and by a rank that ends a stalled job) and the launcher
side (distbatch/launch/supervisor.py) share these names without importing each other."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

EXIT_DIR_ENV = "DISTBATCH_EXIT_DIR"
RANK_ENVS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def record_exit_code(code: int, env: Mapping[str, str] | None = None) -> None:
    """Write ``{"rank", "code", "time"}`` to $DISTBATCH_EXIT_DIR/rank<r>.json when both are set."""
    env = os.environ if env is None else env
    directory = env.get(EXIT_DIR_ENV)
    rank = next((env[k] for k in RANK_ENVS if env.get(k, "").isdigit()), None)
    if not directory or rank is None or not os.path.isdir(directory):
        return
    try:
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": int(rank), "code": int(code), "time": time.time()}, f)
    except OSError:
        pass  # only a better exit status is lost
