"""Frozen-encoder evaluation of a checkpoint, and export of its encoder as a timm model."""
