"""The Ray glue: the launcher (checks before any cluster work, the data stage and Ray Train)
and the loop each Ray Train worker runs."""
