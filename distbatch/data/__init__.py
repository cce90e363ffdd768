"""Data: named datasets and arrays (datasets.py), tf.data and dataset_fn input, which examples each replica reads (indices.py), streaming from files (files.py)."""
from distbatch.data.datasets import ArrayDataset, load_dataset  # noqa: F401
from distbatch.data.files import FileSource, files, tfrecord_source  # noqa: F401
