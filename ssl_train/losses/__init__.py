"""The self-supervised losses, one file each, usable on their own: they know nothing about
models, optimisers or weighting."""

from ssl_train.losses.nt_xent import nt_xent_loss
from ssl_train.losses.reconstruction import masked_reconstruction_loss, normalize_patches

__all__ = ["masked_reconstruction_loss", "normalize_patches", "nt_xent_loss"]
