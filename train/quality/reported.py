"""Every metric an evaluation computes, declared once: the key it logs (`eval/<key>` in metrics.jsonl and W&B), its
name on the model card, which way is better, the curves' panel that draws it (None: none), whether the card shows
it, and when it is measured. The evaluator's reports, the model card, the curves, the docs' table and the tests read
this; train/quality/metrics.py computes the values. Without torch."""

from __future__ import annotations

from dataclasses import dataclass

FD_PANEL = "Fréchet distance (classifier features)"
MANIFOLD_PANEL = "precision / recall / density / coverage"
# When a metric is measured: in every report; where the feature network classifies (it knows the data's classes);
# for a conditional generator scored by a classifier (its asked labels are known); where the copy rate is asked for
# (eval.copy_rate, train.audit).
ALWAYS, CLASSES, CONDITIONAL, COPY_RATE = "always", "classes", "conditional", "copy_rate"


@dataclass(frozen=True)
class Metric:
    key: str  # eval/<key>
    label: str  # on the model card
    better: str | None  # "lower", "higher", or None for a spread that describes another metric
    panel: str | None = None  # the curves' panel (train/plots.py), or None
    card: bool = True  # shown on the model card
    when: str = ALWAYS

    @property
    def logged(self) -> str:
        return f"eval/{self.key}"


METRICS = (
    Metric("fd", "FD", "lower", FD_PANEL),
    Metric("kid", "KID", "lower"),
    Metric("kid_std", "KID's spread", None, card=False),
    Metric("precision", "precision", "higher", MANIFOLD_PANEL),
    Metric("recall", "recall", "higher", MANIFOLD_PANEL),
    Metric("density", "density", "higher", MANIFOLD_PANEL),
    Metric("coverage", "coverage", "higher", MANIFOLD_PANEL),
    Metric("classes_present", "classes present", "higher", when=CLASSES),
    Metric("class_kl", "class KL to uniform", "lower", card=False, when=CLASSES),
    Metric("inception_score", "inception score (the data's classifier)", "higher", card=False, when=CLASSES),
    Metric("label_agreement", "label agreement", "higher", when=CONDITIONAL),
    Metric("copy_rate", "copy rate", "lower", when=COPY_RATE),
)


def measured(classes: bool = True, conditional: bool = False, copy_rate: bool = False) -> tuple[str, ...]:
    """The keys of the metrics a report holds: by a feature network that classifies or not, for a conditional
    generator or not, with the copy rate or not."""
    wanted = {ALWAYS, *([CLASSES] if classes else []), *([CONDITIONAL] if conditional and classes else []),
              *([COPY_RATE] if copy_rate else [])}
    return tuple(metric.key for metric in METRICS if metric.when in wanted)


def on_card() -> tuple[Metric, ...]:
    return tuple(metric for metric in METRICS if metric.card)


def panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, logged keys) of each metric panel, in the order of METRICS."""
    titles = list(dict.fromkeys(metric.panel for metric in METRICS if metric.panel))
    return tuple((title, tuple(m.logged for m in METRICS if m.panel == title)) for title in titles)
