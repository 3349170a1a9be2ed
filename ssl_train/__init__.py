"""The hybrid SSL model, its losses and training, configs and the ssl-pretrain CLI."""
