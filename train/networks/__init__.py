"""Networks, one module each: `train/networks/<arch>.py` is `model.arch: <arch>` and defines
`build_generator(z_dim, num_classes, images, options)` and `build_discriminator(num_classes, images, options)`, both
built for the data's ImageSpec (`options`: the model.* keys a network may read). Generators map z ~ N(0, I) to
images in [0, 1]; discriminators return one logit per image; with num_classes > 0 both take the labels as their
second argument. Nothing here knows about processes, devices or precision. The kinds are found by listing this
folder without torch, so the config is checked before torch is imported; an unknown one is refused by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, fields

from train.errors import ConfigError

KINDS = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")))


@dataclass(frozen=True)
class NetworkOptions:
    """The model.* keys a network may read, each a key of the same name in ModelConfig: `of` reads them from a run's
    config and from what a checkpoint or an export recorded, so the run, its resume and its exported generator build
    the same networks. Each default is what a network was made with before its key existed, so a recorded config
    that lacks the key builds the network it describes. A new one also needs its place in the recorded files'
    schemas (storage/manifest.py; sharing/export.py where G reads it) and, if it changes the weights' shapes, in
    __main__.FIXED_ON_RESUME."""

    upsample: str = "fused"  # model.upsample (seed)
    class_norm: bool = False  # model.class_norm (dcgan)
    d_width: int = 64  # model.d_width (dcgan)
    g_width: int = 64  # model.g_width (dcgan)

    @classmethod
    def of(cls, model) -> NetworkOptions:
        """The options in `model`: a ModelConfig, or a model config as a run recorded it (a dict from config.yaml,
        state.json or generator.json), whose missing keys take the defaults."""
        values = model if isinstance(model, Mapping) else vars(model)
        return cls(**{field.name: values[field.name] for field in fields(cls) if field.name in values})


def load(arch: str):
    """The module of `model.arch`."""
    if arch not in KINDS:
        raise ConfigError(f"model.arch={arch!r} is not a network of this code; the networks are {', '.join(KINDS)} "
                          "(one module each in train/networks/)")
    return importlib.import_module(f"{__name__}.{arch}")
