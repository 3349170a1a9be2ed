"""The streaming data stage on Ray Data: sources, the stage, its cursor and its counters."""
