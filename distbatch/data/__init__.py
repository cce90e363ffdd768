"""Data: named datasets and arrays (datasets.py), tf.data and dataset_fn input, streaming from files."""
from distbatch.data.datasets import ArrayDataset, load_dataset  # noqa: F401
