"""Everything that talks across ranks: the collectives the losses and monitors use, and FSDP2
(sharding, precision, resharding)."""
