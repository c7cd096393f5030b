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
from dataclasses import dataclass, field, fields

from train.errors import ConfigError

KINDS = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_")))


def _option(default, network: str, *, shapes_weights: bool):
    """A NetworkOptions field: the network that reads it, and whether it changes that network's weights' shapes
    (then a checkpoint made with another value cannot resume)."""
    return field(default=default, metadata={"network": network, "shapes_weights": shapes_weights})


@dataclass(frozen=True)
class NetworkOptions:
    """The model.* keys a network may read, each a key of the same name in ModelConfig: `of` reads them from a run's
    config and from what a checkpoint or an export recorded, so the run, its resume and its exported generator build
    the same networks. Each default is what a network was made with before its key existed, so a recorded config
    that lacks the key builds the network it describes. A new option is a field here and a ModelConfig key: the
    recorded files' schemas (`schema`), the export's description and the resume checks (`fixed_on_resume`) are
    derived from these fields."""

    upsample: str = _option("fused", "generator", shapes_weights=False)  # model.upsample (seed)
    class_norm: bool = _option(False, "generator", shapes_weights=True)  # model.class_norm (dcgan)
    d_width: int = _option(64, "discriminator", shapes_weights=True)  # model.d_width (dcgan)
    g_width: int = _option(64, "generator", shapes_weights=True)  # model.g_width (dcgan)

    @classmethod
    def of(cls, model) -> NetworkOptions:
        """The options in `model`: a ModelConfig, or a model config as a run recorded it (a dict from config.yaml,
        state.json or generator.json), whose missing keys take the defaults."""
        values = model if isinstance(model, Mapping) else vars(model)
        return cls(**{field.name: values[field.name] for field in fields(cls) if field.name in values})

    @classmethod
    def _read_by(cls, network: str | None) -> list:
        """The fields of the options `network` ("generator", "discriminator") reads; all of them without one."""
        return [field for field in fields(cls) if network in (None, field.metadata["network"])]

    @classmethod
    def names(cls, network: str | None = None) -> tuple[str, ...]:
        """The options `network` reads; all of them without one."""
        return tuple(field.name for field in cls._read_by(network))

    @classmethod
    def schema(cls, network: str | None = None) -> dict[str, type]:
        """The options `network` reads as a recorded file's schema (storage/manifest.py's): each may be absent."""
        return {f"{field.name}?": type(field.default) for field in cls._read_by(network)}

    @classmethod
    def fixed_on_resume(cls) -> dict[str, str]:
        """{"model.<option>": why} for the options that change a network's weights' shapes."""
        return {f"model.{field.name}": f"the checkpoint's {field.metadata['network']} was made with"
                for field in fields(cls) if field.metadata["shapes_weights"]}


def load(arch: str):
    """The module of `model.arch`."""
    if arch not in KINDS:
        raise ConfigError(f"model.arch={arch!r} is not a network of this code; the networks are {', '.join(KINDS)} "
                          "(one module each in train/networks/)")
    return importlib.import_module(f"{__name__}.{arch}")
