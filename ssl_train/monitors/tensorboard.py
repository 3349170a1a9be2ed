"""Rank 0's TensorBoard event files: ``RUN_DIR/tensorboard/``.

Every logged step's numbers (each loss and weight, the learning rate, the gradient norm,
images/s, the share of the step spent waiting for data, the health signals), at each progress
line the run's energy so far, and every ``telemetry.images_every`` steps the pictures of
``ssl_train.monitors.pictures`` (MAE's reconstructions also as a PNG in the run directory).
Event files are written on the local disk: into the run directory when it is local, else into a
local folder whose event file is uploaded to ``RUN_DIR/tensorboard/`` at every checkpoint and at
the end, the next steps going to a new file (TensorBoard writing to s3:// itself re-uploads the
whole file at every flush). A resumed run starts a new event file and TensorBoard drops the old
file's steps past the resumed one (``purge_step``). This module must not read the model or the
data.
"""

from __future__ import annotations

import math
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.storage.access import StorageOptions, is_remote, open_filesystem, storage_call

if TYPE_CHECKING:
    import torch

TENSORBOARD_DIR = "tensorboard"

# A record's key -> TensorBoard's section for it (the first prefix that matches).
_SECTIONS = (("loss", "loss"), ("weight", "weight"), ("held_", "health"),
             ("images_per_second", "throughput"), ("data_wait", "throughput"),
             ("step_seconds", "throughput"), ("mfu", "throughput"), ("energy", "energy"))


def tag(key: str) -> str:
    """The TensorBoard tag of a record's key: ``loss/loss_masked``, ``health/held_...``."""
    for prefix, section in _SECTIONS:
        if key.startswith(prefix):
            return f"{section}/{key}"
    return f"train/{key}"


class TensorBoardLog:
    """Rank 0's event files of a run."""

    def __init__(self, run_uri: str, options: StorageOptions | None = None,
                 resume_step: int = 0):
        self.run_uri, self.options = run_uri, options
        self.remote = is_remote(run_uri)
        if self.remote:
            self._tmp = tempfile.TemporaryDirectory(prefix="ssl-tensorboard-")
            self.folder = Path(self._tmp.name)
        else:
            self.folder = Path(run_uri) / TENSORBOARD_DIR
        self.writer = self._writer(purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, step: int, record: dict) -> None:
        """Every finite number of a step's record, and the share of the step spent waiting."""
        values = {key: float(value) for key, value in record.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and key != "step"}
        if values.get("step_seconds"):
            values["data_wait_share"] = values.get("data_wait_seconds", 0.0) / values[
                "step_seconds"]
        for key, value in values.items():
            self.writer.add_scalar(tag(key), value, step)

    def images(self, step: int, pictures: dict[str, "torch.Tensor"]) -> None:
        """Each picture (CHW in [0, 1]) as an image of the step; the reconstructions also as
        ``RUN_DIR/reconstructions_step_<N>.png`` for someone without TensorBoard."""
        import io

        from torchvision.utils import save_image

        for name, grid in pictures.items():
            self.writer.add_image(name, grid, step)
        grid = pictures.get("mae/reconstructions")
        if grid is None:
            return
        png = io.BytesIO()
        save_image(grid, png, format="png")
        name = f"reconstructions_step_{step}.png"
        fs, root = open_filesystem(self.run_uri, self.options)
        storage_call(self.run_uri, self.options, fs.pipe_file, posixpath.join(root, name),
                     png.getvalue())

    def sync(self) -> None:
        """Flush; when the run directory is remote, upload the event file and go on in a new one
        (each part is uploaded once: upload volume grows with the run, not its square)."""
        self.writer.flush()
        if self.remote:
            self._upload()
            self.writer = self._writer()

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self._upload()

    def _writer(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # A part number in the name: two writers in one second would otherwise share it (and
        # the second upload replace the first).
        self.parts = getattr(self, "parts", -1) + 1
        return SummaryWriter(log_dir=str(self.folder), purge_step=purge_step,
                             filename_suffix=f".part{self.parts:06d}")

    def _upload(self) -> None:
        """Copy the local event files into RUN_DIR/tensorboard/ and drop them here."""
        self.writer.close()
        fs, root = open_filesystem(self.run_uri, self.options)
        for path in sorted(self.folder.iterdir()):
            storage_call(self.run_uri, self.options, fs.put_file, str(path),
                         posixpath.join(root, TENSORBOARD_DIR, path.name))
            path.unlink()
