"""Training mechanics that know nothing about Ray: the loop and its one step, the optimiser
and schedule, checkpoints, and the FLOP count behind MFU."""
