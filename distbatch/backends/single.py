"""One device, no strategy."""
from __future__ import annotations

from distbatch.backends.base import Backend


class SingleBackend(Backend):
    name = "single"

    def __init__(self) -> None:
        self.num_replicas = 1

    def distribute(self, make_dataset):
        return make_dataset(0, 1)

    def run(self, fn, args=()):
        return fn(*args)

    def all_reduce_sum(self, values, name=None):
        return list(values)
