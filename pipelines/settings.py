"""The base of every typed config section: unknown keys are errors, assignments are validated.

Shared by the data stage's sections (quality, augmentation, sources) and the training config, so
that a typo such as ``mask_ratoi`` never silently falls back to a default anywhere.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration a user wrote cannot be used; the message says which key and why."""


class StrictSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
