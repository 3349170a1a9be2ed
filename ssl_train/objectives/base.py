"""The seam every self-supervised objective plugs into.

An objective is a module that owns its heads and its losses and declares what it needs from the
rest of the system:

- the views the data stage cuts for it (``views``: crop, size, whether photometric augmentation
  applies), so a run cuts only the views its objectives use;
- any per-step random inputs drawn for the whole global batch (``step_inputs``, e.g. MAE's
  masking order), so 1 worker and N workers compute the same losses;
- its transformer blocks (``block_containers``), which the parallelism wrapper shards one by one;
- where a step's schedules stand (``start_step``: DINO's teacher temperature) and what happens
  after each optimiser step (``after_step``: EMA teachers);
- its own copies of the encoder, if any (``attach`` makes them from the shared encoder once it is
  built; ``encoders`` lists them, so they are sharded like it), and which encoder is exported and
  evaluated (``export_encoder``: DINO's teacher, for example).

Its ``forward`` gets the shared encoder, this micro-batch's normalised views and its step inputs,
and returns its losses by component name. The model adds the losses up with the loss weighting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pipelines.settings import StrictSection
from pipelines.views.augment import ViewSpec

NonNegativeFloat = Annotated[float, Field(ge=0)]

__all__ = ["Objective", "ObjectiveConfig", "ObjectiveOutput", "StepContext", "ViewSpec",
           "step_seed"]


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A seed for one step's randomness, independent across (seed, step, stream)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


class ObjectiveConfig(StrictSection):
    """What every objective's config has: its registered name and its weight under
    ``weighting: fixed``. Each objective subclasses it with its own hyperparameters."""

    name: str
    weight: NonNegativeFloat = Field(
        1.0,
        description=("The objective's weight in the sum under weighting: fixed (learned weighting"
        " ignores it)."))

    def views(self) -> list[ViewSpec]:
        """The views the objective reads from each batch (the data stage cuts these)."""
        return []

    def flops(self, model) -> dict:
        """Forward FLOPs per image of each part of this objective's step (``Part``s by name, see
        ``ssl_train.models.flops``); an objective that counts nothing leaves MFU low."""
        return {}

    def check(self, config) -> None:
        """Cross-section checks against the whole ``PretrainConfig``; raise ``ValueError``
        naming the keys (``objectives.<name>.<field>``)."""


@dataclass(frozen=True)
class StepContext:
    """Where a step's randomness comes from: the same for the whole global batch on every rank."""

    seed: int
    step: int
    rank: int
    world: int
    global_batch_size: int

    def generator(self, stream: int) -> torch.Generator:
        """A generator for one stream of this step's randomness (stream 1: masking orders)."""
        return torch.Generator().manual_seed(step_seed(self.seed, self.step, stream))

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch."""
        per_rank = self.global_batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


@dataclass
class ObjectiveOutput:
    """One objective's losses by component name, (optionally) embeddings for the monitor, and
    signals worth watching that are not losses (detached scalars, e.g. DINO's teacher entropy;
    logged as ``signal_<name>`` and exported as ``ssl_objective_signal{signal=<name>}``)."""

    losses: dict[str, torch.Tensor]
    embeddings: torch.Tensor | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class of the objectives; see the module docstring for the contract."""

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    # The loss components it returns, in order (the names logged and exported as `component`).
    loss_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ObjectiveConfig, run):
        """``run`` is the whole ``PretrainConfig`` (model shapes, the run's length for schedules,
        the photometric augmentation)."""
        super().__init__()
        self.config = config
        self.model_config = run.model
        self.total_steps = run.train.steps
        self.step = 0  # the step being trained (0-based), set by ``start_step``

    def attach(self, encoder: nn.Module) -> None:
        """Called once with the shared encoder, built: objectives with a teacher copy it here."""

    def encoders(self) -> list[nn.Module]:
        """Encoders of this objective's own (EMA teachers), sharded like the shared one."""
        return []

    @property
    def name(self) -> str:
        return self.config.name

    def views(self) -> list[ViewSpec]:
        """The views this objective reads from each batch."""
        return self.config.views()

    def step_inputs(self, context: StepContext) -> dict[str, torch.Tensor]:
        """Random inputs of this rank's rows at ``context.step`` (chunked with the views)."""
        return {}

    def block_containers(self) -> list[nn.ModuleList]:
        """This objective's repeated transformer blocks (each is sharded as its own group)."""
        return []

    def project(self, features_nd: torch.Tensor) -> torch.Tensor | None:
        """The embedding the collapse monitor watches, if this objective has a projection."""
        return None

    def start_step(self, step: int) -> None:
        """Called before each step's forward with its 0-based index (also on resume)."""
        self.step = step

    def before_update(self) -> None:
        """Called after each step's backward (gradients reduced), before clipping and the
        optimiser step: an objective may drop the gradients of parameters it freezes."""

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (``step`` counts steps done)."""

    def export_encoder(self, encoder: nn.Module) -> nn.Module:
        """The encoder to export and evaluate: the shared one unless an objective keeps its own
        (an EMA teacher, for example)."""
        return encoder

    def forward(self, encoder: nn.Module, views: dict[str, torch.Tensor],
                inputs: dict[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

