"""Where images come from, one module each: `train/data/readers/<kind>.py` is `data.source: <kind>` and defines
`READER`, a Reader (train/data/readers/_base.py) that reads a split, says whether the source holds a test split,
and names the data on a model card. A new source is a new module here; its name is found by listing this folder
(without torch, so the config is checked before torch is imported), and an unknown kind is refused by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from train.errors import ConfigError

KINDS = tuple(module.name for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
              if not module.name.startswith("_"))


def load(kind: str):
    """The Reader of `data.source`."""
    if kind not in KINDS:
        raise ConfigError(f"data.source={kind!r} is not a source of this code; the sources are {', '.join(KINDS)} "
                          "(one module each in train/data/readers/)")
    return importlib.import_module(f"{__name__}.{kind}").READER
