"""Training curves as a PNG, from a run's metrics.jsonl: readable without W&B.

`python -m train.plots --run <run dir>` writes `<run dir>/curves.png`; a run also writes it at its end
(`logging.curves`, on by default).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from train.quality import reported
from train.storage.files import write_atomically

PANELS = (("losses", ("loss/d", "loss/g")), ("discriminator outputs", ("d/real", "d/fake")), *reported.panels())


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The lines of a metrics.jsonl, and how many could not be read (a run killed while writing one)."""
    lines, unreadable = [], 0
    for text in Path(path).read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if isinstance(line, dict) and "step" in line:
            lines.append(line)
        else:
            unreadable += 1
    return lines, unreadable


def plot_curves(metrics_file: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, unreadable = read_metrics(metrics_file)
    if unreadable:
        print(f"{metrics_file}: {unreadable} unreadable line(s) left out of the curves", file=sys.stderr)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for axis, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(line["step"], line[key]) for line in lines if key in line]
            if points:
                axis.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        if axis.lines:
            axis.legend(fontsize="small")
    figure.tight_layout()
    encoded = io.BytesIO()
    figure.savefig(encoded, format="png", dpi=100)
    plt.close(figure)
    write_atomically(out, encoded.getvalue())  # a run's earlier curves are replaced only by complete ones
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    if not (Path(args.run) / "metrics.jsonl").is_file():
        parser.error(f"--run {args.run} holds no metrics.jsonl: point it at the run.dir of a run")
    print(plot_curves(Path(args.run) / "metrics.jsonl", Path(args.run) / "curves.png"))


if __name__ == "__main__":
    main()
