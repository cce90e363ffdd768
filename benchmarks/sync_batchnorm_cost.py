"""What sync_batchnorm costs per step: the same BatchNorm MLP trained with and without it on
one backend, interleaved and repeated; median ms per step of each and their ratio.

    python benchmarks/sync_batchnorm_cost.py --backend mirrored --repeats 5
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/sync_batchnorm_cost.py --backend horovod

Training time excludes the compile call (distbatch's own samples_per_sec).
"""
from __future__ import annotations

import argparse
import statistics


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="mirrored")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--global-batch-size", type=int, default=256)
    a = p.parse_args(argv)
    import distbatch
    backend = (distbatch.create_backend("mirrored", cpu_replicas=2)[0] if a.backend == "mirrored"
               else distbatch.create_backend(a.backend)[0])
    import keras
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8192, 64)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    L = keras.layers

    def model_fn():
        layers = [keras.Input((64,))]
        for _ in range(4):
            layers += [L.Dense(256), L.BatchNormalization(), L.ReLU()]
        return keras.Sequential(layers + [L.Dense(2)])

    ms = {False: [], True: []}
    for _ in range(a.repeats):
        for sync in (False, True):
            r = distbatch.fit(model_fn=model_fn, optimizer_fn=lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                              data=(x, y), global_batch_size=a.global_batch_size, steps=a.steps,
                              backend=backend, sync_batchnorm=sync, verbose=False,
                              steps_per_execution=1)
            ms[sync].append(1000 * a.global_batch_size / r.metrics["samples_per_sec"])
    if backend.is_chief:
        local, synced = statistics.median(ms[False]), statistics.median(ms[True])
        print(f"| {a.backend} ({backend.num_replicas} replicas) | {local:.2f} | {synced:.2f} | "
              f"{synced / local:.2f}x | {', '.join(f'{v:.2f}' for v in ms[False])} / "
              f"{', '.join(f'{v:.2f}' for v in ms[True])} |")


if __name__ == "__main__":
    main()
