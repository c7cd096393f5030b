"""GAN losses, one module each: `train/losses/<kind>.py` is `loss.kind: <kind>` and defines `LOSS`, a GANLoss
(train/losses/_base.py). A new loss is a new module here; its name is found by listing this folder (without torch,
so the config is checked before torch is imported), and an unknown kind is refused by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from train.errors import ConfigError

KINDS = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")))


def load(kind: str):
    """The GANLoss of `loss.kind`."""
    if kind not in KINDS:
        raise ConfigError(f"loss.kind={kind!r} is not a loss of this code; the losses are {', '.join(KINDS)} (one "
                          "module each in train/losses/)")
    return importlib.import_module(f"{__name__}.{kind}").LOSS
