"""Everything before the model: ingest, sources, decoding, quality filters, augmentation."""
