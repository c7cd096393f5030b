"""The model card `python -m train.export` writes beside the weights (README.md): Hugging Face model-card
metadata (library, tags, data set, and the evaluated metrics as a model index) above a page for people.

Everything on it comes from what the run recorded, never typed by hand: the evaluation its run logged
at the exported checkpoint's step (metrics.jsonl beside checkpoints/: FD with its bootstrap interval,
KID, precision/recall, per-class numbers, copy rate), the training config, steps, time and hardware
(state.json). A checkpoint that was never evaluated gets a card without quality numbers that says so.
"""

from __future__ import annotations

import copy
import html
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from train.config import PATHS
from train.data import readers
from train.data.images import MNIST_DATASET, ImageSpec
from train.data.sources import holds_out, recorded_config
from train.plots import read_metrics
from train.quality import reported
from train.storage.layout import CHECKPOINTS, METRICS_FILE

CARD = "README.md"
SAMPLES = "samples.png"
PER_CLASS = (("count", "samples"), ("fd", "FD"), ("recall", "recall"))  # digits/<key>_<class> in metrics.jsonl

OLD_FEATURE_NETWORK = "a classifier trained on the data's own training split"  # lines logged before they named it


def evaluation_at(checkpoint: Path, step: int) -> dict | None:
    """The line its run logged at `step` where that line holds an evaluation (eval/fd), else None (never
    evaluated, or a checkpoint copied away from its run directory)."""
    metrics_file = checkpoint.parent.parent / METRICS_FILE if checkpoint.parent.name == CHECKPOINTS else None
    if metrics_file is None or not metrics_file.is_file():
        return None
    lines = [line for line in read_metrics(metrics_file)[0] if line["step"] == step and "eval/fd" in line]
    return lines[-1] if lines else None


def dataset_identity(data: dict, images: ImageSpec) -> tuple[str, str, str | None]:
    """(name, type, Hub dataset id or None) of the data the generator was trained on: MNIST for MNIST's images,
    whichever source gave them; else as their source names it."""
    if images.dataset == MNIST_DATASET:
        return "MNIST", "mnist", "ylecun/mnist"
    return readers.load(data["source"]).identity(data)


def text(value) -> str:
    """`value` as literal text on a markdown page: HTML and markdown's own characters escaped, so a name cannot
    become a tag, a link or a heading."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~])", r"\\\1", html.escape(str(value)))


def shareable(path: str) -> str:
    """A path as a shared file shows it: relative ones as given, absolute ones by their last component (never the
    trainer's home)."""
    return f".../{Path(path).name}" if Path(path).is_absolute() else path


def shareable_config(config: dict) -> dict:
    """The training config with its paths (`config.PATHS`) as `shareable` shows them."""
    config = copy.deepcopy(config)
    for key in PATHS:
        section, name = key.split(".")
        if isinstance(config.get(section, {}).get(name), str):
            config[section][name] = shareable(config[section][name])
    return config


def fenced(body: str, language: str) -> list[str]:
    """A markdown code block that `body` cannot close: its fence is longer than any run of backticks in it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", body)), default=0))
    return [fence + language, body, fence]


def make_card(description: dict, state: dict, evaluation: dict | None, name: str) -> ModelCard:
    """The card of the generator `description` (generator.json's contents), exported from the checkpoint whose
    state.json is `state`, evaluated as `evaluation` (a metrics.jsonl line, or None); `name`: the model's name."""
    images, config = ImageSpec(**description["images"]), state["config"]
    conditional = description["conditional"]
    task = "class-conditional-image-generation" if conditional else "unconditional-image-generation"
    data_name, data_type, hub_dataset = dataset_identity(description["data"], images)
    data_cfg = recorded_config(description["data"])
    held_out = holds_out(data_cfg, images)
    split = "held-out part of train" if held_out else "test"
    against = (f"{data_cfg.holdout:.0%} of {text(data_name)}'s training images held out of training "
               "(data.holdout)" if held_out else f"{text(data_name)}'s test split")
    results = [] if evaluation is None else [
        EvalResult(task_type=task, dataset_type=data_type, dataset_name=data_name, dataset_split=split,
                   metric_type=metric.key, metric_name=metric.label, metric_value=evaluation[metric.logged])
        for metric in reported.on_card() if metric.logged in evaluation]
    data = ModelCardData(
        model_name=name, library_name="pytorch", datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=None if conditional else "unconditional-image-generation", eval_results=results or None,
        tags=["gan", description["arch"], "image-generation", "safetensors", "accelerate"]
        + (["conditional-gan"] if conditional else []))
    page = [f"# {text(name)}", "",
            f"A {'class-conditional ' if conditional else ''}{description['arch'].upper()} generator of "
            f"{text(images.describe())}, trained on {text(data_name)} for {state['progress']['step']:,} steps "
            f"({state['progress']['images_seen']:,} images); the weights are {description['weights']} of checkpoint "
            f"{text(Path(description['source']).name)}.", "", f"![64 samples (seed 0)]({SAMPLES})", ""]
    page += _quality(evaluation, images, against) + _training(state, evaluation, config) + _use(description, name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(page) + "\n")


def _quality(evaluation: dict | None, images: ImageSpec, against: str) -> list[str]:
    if evaluation is None:
        return ["## Quality", "", "Not evaluated: the checkpoint's run logged no evaluation at its step "
                "(`eval.num_samples=0`, or a checkpoint moved out of its run directory). "
                "`python -m train.evaluate --checkpoint THIS_FOLDER` measures it.", ""]
    lines = ["## Quality", "",
             f"Measured by the training run at step {evaluation['step']:,} on generated samples against {against}, "
             "in the features of "
             f"{text(evaluation.get('feature_network', OLD_FEATURE_NETWORK))} "
             "(not Inception: the numbers compare runs on this data, not with published FIDs).", "",
             "| metric | value | better |", "|---|---|---|"]
    for metric in reported.on_card():
        if metric.logged in evaluation:
            interval = (f" (95% interval {evaluation['eval/fd_low']:.4g} to {evaluation['eval/fd_high']:.4g})"
                        if metric.key == "fd" and "eval/fd_low" in evaluation else "")
            lines.append(f"| {metric.label} | {evaluation[metric.logged]:.4g}{interval} | {metric.better} |")
    if "eval/fd_low" not in evaluation:
        lines.append("| FD's 95% interval | not measured (eval.fd_resamples=0) | |")
    if "eval/copy_rate" not in evaluation:
        lines.append("| copy rate | not measured (eval.copy_rate=false; `python -m train.audit --checkpoint "
                     "THIS_FOLDER` measures it) | lower |")
    classes = [c for c in range(images.num_classes) if f"digits/count_{c}" in evaluation]
    if classes:
        lines += ["", "Per class (the samples the feature network assigns to each class):", "",
                  "| class | " + " | ".join(label for _, label in PER_CLASS) + " |",
                  "|---" * (len(PER_CLASS) + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(f"{evaluation[f'digits/{key}_{c}']:.4g}" if f"digits/{key}_{c}" in evaluation
                                          else "-" for key, _ in PER_CLASS) + " |" for c in classes]
    return lines + [""]


def _training(state: dict, evaluation: dict | None, config: dict) -> list[str]:
    hardware = state.get("hardware")
    lines = ["## Training", "",
             f"- steps: {state['progress']['step']:,}, global batch {state['global_batch']}, "
             f"{state['progress']['images_seen']:,} images",
             "- hardware: " + (f"{text(hardware['device'])}, {hardware['processes']} process(es), mixed precision "
                               f"{hardware['mixed_precision']}" if hardware else "not recorded")]
    if evaluation is not None and "train_seconds" in evaluation:
        lines.append(f"- training time to this step: {evaluation['train_seconds']:.0f} s (evaluations excluded)")
    return lines + ["", "The training config (absolute paths by their last component):", "",
                    *fenced(yaml.safe_dump(shareable_config(config), sort_keys=False).strip(), "yaml"), ""]


def _use(description: dict, name: str) -> list[str]:
    labels = ", labels=torch.arange(16) % generator.num_classes" if description["conditional"] else ""
    snippet = ("import torch\nfrom train.sharing.export import load_generator\nfrom train.models import generate\n\n"
               f"generator = load_generator({name!r})  # a folder, or a Hub repository id: a Python literal\n"
               f"images = generate(generator, 16, seed=0{labels})  # [16, C, H, W] in [0, 1]")
    return ["## Use", "",
            "With this project installed (`pip install -e .` in its checkout), from this folder or its Hub "
            "repository:", "", *fenced(snippet, "python"), ""]
