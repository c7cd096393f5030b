"""The argument types the command-line tools share (train.sample, train.evaluate, train.audit): each refuses a
bad value through argparse (exit 2) before the tool does any work."""

import argparse

import torch

from train.config import CHOICES, EvalConfig, inception_weights
from train.data.memory import available_memory
from train.errors import ConfigError


def available_device(name: str) -> str:
    """`--device`'s type: the CPU or an accelerator this machine has, refused by argparse before any work."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cpu":
        return name
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if accelerator is None or device.type != accelerator.type or (device.index or 0) >= count:
        seen = f"{count} {accelerator.type} device(s)" if accelerator is not None else "no accelerator"
        raise argparse.ArgumentTypeError(f"{name} is not a device this machine can generate on: it has the CPU and "
                                         f"{seen}; use --device cpu")
    return name


def seed(text: str) -> int:
    """`--seed`'s type: a whole number that a random generator takes (0 to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 2**63 - 1")
    return value


def check_fits_in_memory(parser: argparse.ArgumentParser, count: int, bytes_each: int) -> None:
    """Refuse `--num count` (through argparse: exit 2) where its `bytes_each` per sample exceed the memory this
    machine has available now, before any of it is allocated."""
    available = available_memory()
    if count * bytes_each > available:
        parser.error(f"--num {count} needs about {count * bytes_each / 2 ** 30:.3g} GiB of memory, and this machine "
                     f"has {available / 2 ** 30:.3g} GiB available: ask for at most {available // bytes_each}")


def add_feature_network(parser: argparse.ArgumentParser) -> None:
    """`--features` and `--inception-weights`: the feature network a tool scores with (eval.features and
    eval.inception_weights); `check_feature_network` checks them once the run's choice is known."""
    parser.add_argument("--features", choices=CHOICES["eval.features"],
                        help="the feature network (eval.features); default: the one the run was scored with, as its "
                        f"checkpoint or export records it ({EvalConfig.features} where it does not)")
    parser.add_argument("--inception-weights", metavar="FILE", help="for inception: the Inception-v3 weights file "
                        "(eval.inception_weights; default: torch hub's checkpoints folder)")


def check_feature_network(parser: argparse.ArgumentParser, features: str, weights: str | None) -> None:
    """Refuse the feature network `features` (through argparse: exit 2) where it is Inception-v3 and its `weights`
    file is not there."""
    if features == "inception":
        try:
            inception_weights(weights, key="--inception-weights")
        except ConfigError as error:
            parser.error(str(error))
