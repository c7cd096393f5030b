"""`python -m train.export --checkpoint <checkpoint or run dir> --out <dir>`: the generator alone.

Writes `generator.safetensors` (the EMA generator unless --no-ema) and `generator.json`
(architecture, z_dim, which weights, step, source, SHA-256): everything needed to build and load
the generator without the training state.
"""

import argparse
import sys

from train.checkpoint import export_generator
from train.manifest import EXIT_WRITE_FAILED, CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run directory")
    parser.add_argument("--out", required=True, help="folder to write generator.safetensors and generator.json into")
    parser.add_argument("--no-ema", action="store_true", help="export the trained generator, not its EMA")
    args = parser.parse_args(argv)
    try:
        out = export_generator(args.checkpoint, args.out, use_ema=not args.no_ema)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: exporting into {args.out} failed ({error}); nothing of it is left there: make room and "
              "run the same command again", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"exported the generator to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
