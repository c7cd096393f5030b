"""`python -m train.export --checkpoint <checkpoint or run dir> --out <dir>`: the generator alone, ready to share.

Writes the export (train/sharing/export.py: weights, generator.json, the model card and its samples);
`--push-to-hub USER/REPO` then uploads the folder to the Hugging Face Hub (train/sharing/hub.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, CheckpointError
from train.sharing import hub, model_card
from train.sharing.export import export_generator
from train.storage.manifest import write_failure_fix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run directory")
    parser.add_argument("--out", required=True, help="a new or empty folder to write the export into")
    parser.add_argument("--no-ema", action="store_true", help="export the trained generator, not its EMA")
    parser.add_argument("--push-to-hub", metavar="USER/REPO",
                        help="then upload the folder to this Hugging Face Hub model repository (made if missing; "
                        "the token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--hub-timeout", type=float, default=hub.PUSH_TIMEOUT_S, metavar="SECONDS",
                        help="give up a push that has not finished in this time (default %(default)s)")
    args = parser.parse_args(argv)
    if args.hub_timeout <= 0:
        parser.error(f"--hub-timeout {args.hub_timeout:g}: give a time in seconds above 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; give the folder to write the generator into")
    try:
        if args.push_to_hub:  # before any work: a push that cannot happen leaves no export behind either
            hub.check_repo_id(args.push_to_hub)
            access_token = hub.token()
        out, step, evaluation = export_generator(args.checkpoint, args.out, use_ema=not args.no_ema,
                                                 name=args.push_to_hub)
        print(f"exported the generator to {out}")
        if evaluation is None:
            print(f"note: its run logged no evaluation at step {step}, so {model_card.CARD} has no quality numbers; "
                  f"`python -m train.evaluate --checkpoint {out}` measures them")
        if args.push_to_hub:
            url = hub.push(out, args.push_to_hub, access_token, f"Generator at step {step}, exported by train.export",
                           timeout_s=args.hub_timeout)
            print(f"pushed {out} to {args.push_to_hub}: {url}")
    except CheckpointError as error:  # HubError too
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        print(f"error: exporting into {args.out} failed ({error}); nothing of it is left there: "
              f"{write_failure_fix(error)} and run the same command again", file=sys.stderr)
        return EXIT_WRITE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
