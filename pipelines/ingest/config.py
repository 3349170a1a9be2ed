"""What one ingest is: its options, where it reads and writes, and how images are named.

``IngestConfig`` is the user's options (validated like a run config); ``Job`` is what every task
of one ingest needs (source, destination, storage options, config) and where its work prefix
(``DEST/_ingest/``) is. No I/O.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipelines.ingest.workarea import WorkArea
from pipelines.settings import StrictSection
from pipelines.storage.access import StorageOptions
from pipelines.views.quality import QualityConfig

MANIFEST = "manifest.json"
QUALITY_REPORT = "quality_report.json"
WORK = "_ingest"
JOB = "job.json"


class IngestConfig(StrictSection):
    """How raw images become shards."""

    samples_per_shard: Annotated[int, Field(ge=1)] | None = None
    shard_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    reencode: Literal["keep", "jpeg"] = "keep"
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    max_side: Annotated[int, Field(ge=16)] | None = None
    quality: QualityConfig = QualityConfig()
    examples_per_reason: Annotated[int, Field(ge=0)] = 5
    # The order of samples across shards is a function of this seed and the keys.
    seed: int = 0
    # Images per unit of work (a listing part, a record part): what a killed task loses.
    images_per_part: Annotated[int, Field(ge=1)] = 10_000

    @model_validator(mode="after")
    def _max_side_needs_reencoding(self) -> "IngestConfig":
        if self.max_side is not None and self.reencode == "keep":
            raise ValueError("max_side needs reencode: jpeg (kept bytes cannot be resized)")
        return self


def key_for(relative_path: str) -> str:
    """A WebDataset key from a path: no suffix, and no dots (they separate key and extension)."""
    stem = posixpath.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem).strip("/") or "image"


@dataclass(frozen=True)
class Job:
    """What every task of one ingest needs: where, how, and the sizes decided so far."""

    src: str
    dest: str
    options: StorageOptions
    config: IngestConfig
    list_file: str | None = None

    def area(self) -> WorkArea:
        return WorkArea(f"{self.dest.rstrip('/')}/{WORK}", self.options)

    def describe(self) -> dict[str, Any]:
        return {"src": self.src, "list": self.list_file,
                "config": self.config.model_dump(mode="json")}
