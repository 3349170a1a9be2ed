"""The objectives a model trains, by name: a registry that config and model both read.

A new objective is one module in this folder: an ``ObjectiveConfig`` subclass with
``name: Literal["<name>"]`` and an ``Objective`` subclass naming it as ``config_class``, decorated
with ``@register``. Every module here is imported with the package, so nothing else is edited;
an objective defined elsewhere registers when its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from ssl_train.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepContext,
    ViewSpec,
    step_seed,
)

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available under its config's ``name``."""
    name = cls.config_class.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.config_class needs a default name")
    _REGISTRY[name] = cls
    return cls


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The registered objective ``name``; KeyError with the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}: known are "
                       f"{', '.join(objective_names())}") from None


def _import_every_objective() -> None:
    """Import every module of this folder: each registers its objective with ``@register``."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_every_objective()

__all__ = ["Objective", "ObjectiveConfig", "ObjectiveOutput", "StepContext", "ViewSpec",
           "objective_class", "objective_names", "register", "step_seed"]
