"""`python -m train [--config FILE] [key=value ...]`: one training run (exit codes in the README).

The configuration is read and checked before torch and the training code are imported, so a
mistake in it is reported at once instead of after the seconds they take to load.
"""

import sys

from train.config import RunError, parse_args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        from train.loop import train  # loaded only for a config that can run

        return train(cfg)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
