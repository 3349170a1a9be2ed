"""The model: the shared timm encoder, heads, the MAE decoder, masking, the loss weighting
and SSLModel, which runs the objectives on the encoder."""
