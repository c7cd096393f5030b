"""The metrics a run reports, declared once: the key an evaluation logs (`eval/<key>` in metrics.jsonl and W&B),
its name on the model card, which way is better, and the curves' panel that draws it (None: none). The model card,
the curves and the docs' table read this; train/quality/metrics.py computes the values. Without torch."""

from __future__ import annotations

from dataclasses import dataclass

FD_PANEL = "Fréchet distance (classifier features)"
MANIFOLD_PANEL = "precision / recall / density / coverage"


@dataclass(frozen=True)
class Metric:
    key: str  # eval/<key>
    label: str  # on the model card
    better: str  # "lower" or "higher"
    panel: str | None = None  # the curves' panel (train/plots.py), or None

    @property
    def logged(self) -> str:
        return f"eval/{self.key}"


METRICS = (
    Metric("fd", "FD", "lower", FD_PANEL),
    Metric("kid", "KID", "lower"),
    Metric("precision", "precision", "higher", MANIFOLD_PANEL),
    Metric("recall", "recall", "higher", MANIFOLD_PANEL),
    Metric("density", "density", "higher", MANIFOLD_PANEL),
    Metric("coverage", "coverage", "higher", MANIFOLD_PANEL),
    Metric("classes_present", "classes present", "higher"),
    Metric("label_agreement", "label agreement", "higher"),
    Metric("copy_rate", "copy rate", "lower"),
)


def panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, logged keys) of each metric panel, in the order of METRICS."""
    titles = list(dict.fromkeys(metric.panel for metric in METRICS if metric.panel))
    return tuple((title, tuple(m.logged for m in METRICS if m.panel == title)) for title in titles)
