"""Decoding, quality checks, and the views of each image (crops and photometric augmentation)."""
