"""Launching processes: horovodrun/mpirun/TF_CONFIG command lines, the supervisor, restarts."""
