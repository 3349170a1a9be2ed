"""The hybrid SSL model, its losses and training, configs and the ssl-pretrain CLI."""

from pathlib import Path

PACKAGED_CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_config_names() -> list[str]:
    """Names accepted by ``--config NAME`` (here, not in ``ssl_train.config``, so that the CLI
    lists them without importing the model)."""
    return sorted(p.stem for p in PACKAGED_CONFIG_DIR.glob("*.yaml"))
