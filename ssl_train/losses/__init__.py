"""The self-supervised losses, one file per family, usable on their own: they know nothing about
models, optimisers or weighting."""

from ssl_train.losses.dino import dino_loss
from ssl_train.losses.moco_v3 import moco_v3_loss
from ssl_train.losses.nt_xent import nt_xent_loss
from ssl_train.losses.predictive import byol_loss, simsiam_loss
from ssl_train.losses.reconstruction import masked_reconstruction_loss, normalize_patches

__all__ = ["byol_loss", "dino_loss", "masked_reconstruction_loss", "moco_v3_loss",
           "normalize_patches", "nt_xent_loss", "simsiam_loss"]
