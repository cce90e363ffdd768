"""The per-epoch shuffle and its split across workers and replicas: distbatch/data/indices.py
(the data package owns it; its array inputs gather by these indices). Importable from here too."""
from distbatch.data.indices import (  # noqa: F401
    epoch_permutation, eval_batch_size, eval_indices, train_dataset, train_indices)
