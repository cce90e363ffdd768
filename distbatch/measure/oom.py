"""Out of device memory: distbatch/training/oom.py (a training step's failure); importable
from here too."""
from distbatch.training.oom import OutOfMemory, is_out_of_memory, oom_message  # noqa: F401
