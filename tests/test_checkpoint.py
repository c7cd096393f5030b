"""Checkpoints: no pickle, verified on load, bad ones reported by name and never overwritten."""

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (REPO, TINY, all_state, assert_bitwise_equal, logged_metrics, run_env, run_train,
                      snapshot_files)
from train import errors, models
from train.quality import reported
from train.storage import manifest
from train.storage.checkpoint import Progress, Snapshot, restore


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step DCGAN run with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("finished")
    result = run_train(TINY + [f"run.dir={run_dir}", "checkpoint.every=2", "checkpoint.keep_last=0"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def copy_run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "run")


def test_a_checkpoint_is_safetensors_and_json_named_in_its_manifest(finished_run):
    folder = finished_run / "checkpoints" / "step_00000006"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["discriminator.safetensors", "generator.safetensors", "generator_ema.safetensors",
                     "manifest.json", "optimizers.json",
                     "optimizers.safetensors", "rank_0.json", "rank_0.safetensors", "state.json"]
    written = json.loads((folder / "manifest.json").read_text())
    assert sorted(written["sha256"]) == [n for n in names if n != "manifest.json"]
    state = json.loads((folder / "state.json").read_text())
    assert state["progress"] == {"step": 6, "images_seen": 48, "data": {"epoch": 0, "step_in_epoch": 6},
                                 "seed_offset": 0, "wandb_run_id": None, "best_fd": None,
                                 "evaluations_since_best": 0}
    assert state["config"]["model"]["arch"] == "dcgan"
    optimizer_state = load_file(folder / "optimizers.safetensors")
    assert {key.rsplit(".", 1)[1] for key in optimizer_state} == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(load_file(folder / "rank_0.safetensors")) == {"noise", "torch_cpu", "numpy_keys"}
    assert (finished_run / "checkpoints" / "latest").read_text() == "step_00000006\n"


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    result = run_train(TINY + [f"run.dir={tmp_path}", "checkpoint.every=2", "checkpoint.keep_last=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in manifest.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]


def test_keep_last_never_deletes_the_best_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    manifest.mark_best(run_dir, run_dir / "checkpoints" / "step_00000004")
    manifest.mark_best(run_dir, run_dir / "checkpoints" / "step_00000002")  # replaces the link
    manifest.prune(run_dir, keep_last=1)
    assert [p.name for p in manifest.complete_checkpoints(run_dir)] == ["step_00000002", "step_00000006"]
    assert manifest.resolve(run_dir / "checkpoints" / "best") == run_dir / "checkpoints" / "best"
    assert manifest.read_state(run_dir / "checkpoints" / "best")["progress"]["step"] == 2
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_planted_pickle_is_never_loaded(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = run_dir / "checkpoints" / "step_00000006"
    for name in ("optimizer.bin", "pytorch_model.pt", "random_states_0.pkl"):
        (folder / name).write_bytes(pickle.dumps(Bomb()))
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "optimizers.safetensors is damaged: its SHA-256 does not match manifest.json"),
    ("flip", "optimizers.safetensors is damaged: its SHA-256 does not match manifest.json"),
    ("delete", "optimizers.safetensors is missing"),
])
def test_auto_resume_falls_back_to_the_newest_valid_checkpoint(finished_run, tmp_path, damage, message):
    run_dir = copy_run(finished_run, tmp_path)
    target = run_dir / "checkpoints" / "step_00000006" / "optimizers.safetensors"
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        target.write_bytes(raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:])
    else:
        target.unlink()
    damaged = target.read_bytes() if target.exists() else None
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=0"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert f"skipping checkpoint step_00000006: {target.parent / message}" in output
    assert "resuming from step_00000004, the newest valid checkpoint (not step_00000006)" in output
    # The new step 6 is complete; the damaged one is kept aside, unchanged, for a person to look at.
    manifest.verify(run_dir / "checkpoints" / "step_00000006")
    kept = run_dir / "checkpoints" / "damaged_step_00000006" / "optimizers.safetensors"
    assert (kept.read_bytes() if kept.exists() else None) == damaged
    assert "kept the damaged step_00000006 as damaged_step_00000006" in output


def test_auto_resume_with_every_checkpoint_damaged_stops_and_changes_nothing(finished_run, tmp_path):
    """Starting afresh would train over (and keep_last would delete) checkpoints a person may still repair."""
    run_dir = copy_run(finished_run, tmp_path)
    for folder in manifest.complete_checkpoints(run_dir):
        (folder / "generator.safetensors").write_bytes(b"damaged")
    before = snapshot_files(run_dir)
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=8"])
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert all(f"skipping checkpoint step_0000000{step}" in output for step in (2, 4, 6))
    assert f"error: no checkpoint in {run_dir / 'checkpoints'} is valid (see above); nothing was changed" in output
    assert snapshot_files(run_dir) == before


def test_saving_a_step_that_has_a_valid_checkpoint_is_refused_and_keeps_it(finished_run, tmp_path):
    """The guard behind "nothing good is overwritten", for a run that reaches a step twice."""
    from accelerate import Accelerator
    from train.storage.checkpoint import save
    run_dir = copy_run(finished_run, tmp_path)
    generator, discriminator = models.build("dcgan", 100)
    snapshot = Snapshot(networks={"generator": generator, "discriminator": discriminator}, optimizers={},
                        noise=torch.Generator(), progress=Progress(step=6), config={})
    before = snapshot_files(run_dir)
    with pytest.raises(errors.CheckpointError, match="step_00000006 already exists; it is never overwritten"):
        save(Accelerator(cpu=True), run_dir, snapshot)
    assert snapshot_files(run_dir) == before


def bad_checkpoint(kind, finished_run, tmp_path):
    """(a path to resume from, the message expected) for each kind of bad checkpoint."""
    run_dir = copy_run(finished_run, tmp_path)
    folder = run_dir / "checkpoints" / "step_00000006"  # the newest: an older one would give way to it
    if kind == "not a checkpoint":
        return run_dir / "samples", "is not a checkpoint: it has no manifest.json"
    if kind == "manifest mismatch":
        written = json.loads((folder / "manifest.json").read_text())
        written["sha256"]["generator.safetensors"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(written))
        return folder, "generator.safetensors is damaged: its SHA-256 does not match manifest.json"
    if kind == "manifest not json":
        (folder / "manifest.json").write_text('{"format_version": 1, "sha256": {"generator.safe')  # cut short
        return folder, "manifest.json is damaged: not a checkpoint manifest"
    if kind == "file outside the folder":  # a hand-edited manifest must not make the loader read elsewhere
        written = json.loads((folder / "manifest.json").read_text())
        written["sha256"]["../step_00000004/generator.safetensors"] = written["sha256"].pop("generator.safetensors")
        (folder / "manifest.json").write_text(json.dumps(written))
        return folder, "names '../step_00000004/generator.safetensors', which is not a file of the checkpoint"
    if kind == "newer format":
        written = json.loads((folder / "manifest.json").read_text())
        written["format_version"] = manifest.FORMAT_VERSION + 1
        (folder / "manifest.json").write_text(json.dumps(written))
        return folder, f"written with checkpoint format version {manifest.FORMAT_VERSION + 1}; this code reads up to"
    if kind == "manifest without hashes":  # nothing verified: the flipped byte below must not be loaded
        (folder / "manifest.json").write_text('{"format_version": 1, "sha256": {}}')
        flip_a_byte(folder / "generator.safetensors")
        return folder, ("manifest.json does not list state.json, generator.safetensors, discriminator.safetensors, "
                        "generator_ema.safetensors, optimizers.safetensors, optimizers.json: the checkpoint is "
                        "incomplete or its manifest was edited")
    if kind in ("format version as text", "hashes as a list"):
        written = json.loads((folder / "manifest.json").read_text())
        if kind == "format version as text":
            written["format_version"] = "1"
        else:
            written["sha256"] = list(written["sha256"])
        (folder / "manifest.json").write_text(json.dumps(written))
        return folder, "manifest.json is damaged: not a checkpoint manifest"
    # The rest are edits with the manifest's hashes recomputed: the contents themselves must be checked.
    if kind == "huge safetensors header":
        raw = (folder / "generator.safetensors").read_bytes()
        (folder / "generator.safetensors").write_bytes((10 ** 15).to_bytes(8, "little") + raw[8:])
        message = ("generator.safetensors is damaged: not a readable safetensors file (its header claims "
                   "1000000000000000 bytes")
    elif kind == "state not json":
        (folder / "state.json").write_text("{'step': 6}")
        message = "state.json is damaged: not JSON"
    elif kind == "state of the wrong kind":
        state = json.loads((folder / "state.json").read_text())
        state["progress"]["step"] = "six"
        (folder / "state.json").write_text(json.dumps(state))
        message = "state.json is damaged: progress.step is 'six', not a count"
    elif kind == "a best FD that is no number":
        state = json.loads((folder / "state.json").read_text())
        state["progress"]["best_fd"] = "low"
        (folder / "state.json").write_text(json.dumps(state))
        message = "state.json is damaged: progress.best_fd is 'low'"
    elif kind == "rng state of the wrong size":
        tensors = load_file(folder / "rank_0.safetensors")
        size = len(tensors["noise"])
        tensors["noise"] = tensors["noise"][:100].clone()
        save_file(tensors, folder / "rank_0.safetensors")
        message = f"rank_0.safetensors does not fit: noise is (100,), this run's is ({size},)"
    elif kind == "moments of the wrong shape":
        tensors = load_file(folder / "optimizers.safetensors")
        shape = tuple(tensors["discriminator.0.exp_avg"].shape)
        tensors["discriminator.0.exp_avg"] = torch.zeros(3, 3)
        save_file(tensors, folder / "optimizers.safetensors")
        message = (f"optimizers.safetensors does not fit this model: discriminator.0.exp_avg is torch.float32 (3, 3), "
                   f"its parameter needs torch.float32 {shape}")
    elif kind == "weights in another dtype":
        tensors = {key: value.double() if value.is_floating_point() else value
                   for key, value in load_file(folder / "generator.safetensors").items()}
        save_file(tensors, folder / "generator.safetensors")
        message = f"generator.safetensors is damaged: {next(iter(sorted(tensors)))} is torch.float64, the model's"
    else:
        assert kind == "other architecture"
        return folder, "generator.safetensors does not fit this model.arch/model.z_dim"
    rehash(folder)
    return folder, message


def flip_a_byte(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:])


def rehash(folder: Path) -> None:
    """Seal an edited checkpoint again, as someone who edits one on purpose would."""
    (folder / "manifest.json").unlink()
    manifest.write_manifest(folder)


@pytest.mark.parametrize("kind", ["not a checkpoint", "manifest mismatch", "manifest not json",
                                  "file outside the folder", "newer format", "other architecture",
                                  "moments of the wrong shape"])
def test_a_bad_checkpoint_is_named_and_nothing_is_overwritten(finished_run, tmp_path, kind):
    path, message = bad_checkpoint(kind, finished_run, tmp_path)
    run_dir = tmp_path / "run"
    before = snapshot_files(run_dir)
    arch = ["model.arch=seed"] if kind == "other architecture" else []
    result = run_train(TINY + [f"run.dir={run_dir}", f"resume={path}", "train.steps=10", *arch])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot_files(run_dir) == before


@pytest.mark.parametrize("kind", ["manifest without hashes", "format version as text", "hashes as a list",
                                  "huge safetensors header", "state not json", "state of the wrong kind",
                                  "a best FD that is no number"])
def test_a_malformed_checkpoint_is_refused_by_verify(finished_run, tmp_path, kind):
    """The run's own refusal of any CheckpointError (exit 2, nothing written) is the test above; here the cases
    that verify, before torch, must catch (each a traceback, or a damaged file loaded, before)."""
    path, message = bad_checkpoint(kind, finished_run, tmp_path)
    with pytest.raises(errors.CheckpointError) as error:
        manifest.verify(path)
    assert message in str(error.value)


@pytest.mark.parametrize("kind", ["rng state of the wrong size", "weights in another dtype"])
def test_tensors_that_do_not_fit_are_refused_before_anything_is_restored(finished_run, tmp_path, kind):
    """As "moments of the wrong shape" above, in this process: restore checks every tensor first."""
    path, message = bad_checkpoint(kind, finished_run, tmp_path)
    manifest.verify(path)  # well-formed: only the model can tell
    generator, discriminator = models.build("dcgan", 100)
    networks = {"generator": generator, "discriminator": discriminator,
                "generator_ema": models.build_generator("dcgan", 100)}
    before = {name: {k: v.clone() for k, v in network.state_dict().items()} for name, network in networks.items()}
    snapshot = Snapshot(networks=networks, optimizers={
        name: torch.optim.Adam(networks[name].parameters(), amsgrad=True) for name in ("generator", "discriminator")},
        noise=torch.Generator(), progress=Progress(), config={})
    with pytest.raises(errors.CheckpointError) as error:
        restore(path, snapshot, rank=0, world_size=1)
    assert message in str(error.value)
    assert_bitwise_equal({f"{name}/{k}": v for name, state in before.items() for k, v in state.items()},
                         {f"{name}/{k}": v for name, network in networks.items()
                          for k, v in network.state_dict().items()})


def test_a_folder_planted_where_the_best_link_goes_is_refused_and_left_alone(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    planted = run_dir / "checkpoints" / "best"
    (planted / "mine").mkdir(parents=True)
    with pytest.raises(errors.RunError, match="is not the link a run keeps to its best checkpoint; move it away"):
        manifest.mark_best(run_dir, run_dir / "checkpoints" / "step_00000006")
    assert planted.is_dir() and not planted.is_symlink() and (planted / "mine").is_dir()


def test_a_checkpoint_without_a_best_fd_is_valid_and_resumes(finished_run, tmp_path):
    """progress.best_fd may be absent from state.json: such a checkpoint verifies and restores, with no best yet."""
    folder = copy_run(finished_run, tmp_path) / "checkpoints" / "step_00000006"
    state = json.loads((folder / "state.json").read_text())
    del state["progress"]["best_fd"]
    (folder / "state.json").write_text(json.dumps(state))
    rehash(folder)
    manifest.verify(folder)
    generator, discriminator = models.build("dcgan", 100)
    networks = {"generator": generator, "discriminator": discriminator,
                "generator_ema": models.build_generator("dcgan", 100)}
    progress = Progress()
    restore(folder, Snapshot(networks=networks, optimizers={
        name: torch.optim.Adam(networks[name].parameters(), amsgrad=True) for name in ("generator", "discriminator")},
        noise=torch.Generator(), progress=progress, config={}), rank=0, world_size=1)
    assert progress.step == 6 and progress.best_fd is None


def test_a_malformed_manifest_is_skipped_like_a_damaged_one(finished_run, tmp_path):
    """Before: a `sha256` list ended in a traceback that also stopped the fallback to the older checkpoints."""
    run_dir = copy_run(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000006"
    written = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps(written | {"sha256": list(written["sha256"])}))
    reports = []
    assert manifest.newest_valid(run_dir, reports.append) == run_dir / "checkpoints" / "step_00000004"
    assert reports == [f"skipping checkpoint step_00000006: {newest / 'manifest.json'} is damaged: not a checkpoint "
                       "manifest"]


def test_keep_last_never_counts_nor_deletes_what_does_not_verify(finished_run, tmp_path):
    """Before: with the newest checkpoint damaged (or a stray step_junk folder), keep_last deleted every valid one,
    the one just written included, and left `latest` naming a deleted folder."""
    run_dir = copy_run(finished_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    flip_a_byte(checkpoints / "step_00000006" / "discriminator.safetensors")
    (checkpoints / "step_junk").mkdir()
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=5", "checkpoint.every=1", "checkpoint.keep_last=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step_00000004, the newest valid checkpoint (not step_00000006)" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000005", "step_00000006", "step_junk"]
    assert (checkpoints / "latest").read_text() == "step_00000005\n"
    assert manifest.newest_valid(run_dir, print) == checkpoints / "step_00000005"


def test_a_resumed_run_uses_its_own_settings_and_says_which_changed(finished_run, tmp_path):
    """Before: optim.g_lr=0.5 on resume trained with the checkpoint's 0.001 while config.yaml said 0.5."""
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot_files(run_dir)
    refused = run_train(TINY + [f"run.dir={run_dir}", "train.steps=7", "optim.amsgrad=false"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert ("error: optim.amsgrad is false, the checkpoint's Adam state was made with true: set optim.amsgrad=true to "
            "resume, or start a new run.dir") in refused.stderr
    refused = run_train(TINY + [f"run.dir={run_dir}", "train.steps=7", "model.conditional=true"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert ("error: model.conditional is true, the checkpoint's networks were made with false: set "
            "model.conditional=false to resume, or start a new run.dir") in refused.stderr
    refused = run_train(TINY + [f"run.dir={run_dir}", "train.steps=7", "model.d_width=32"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert ("error: model.d_width is 32, the checkpoint's discriminator was made with 64: set model.d_width=64 to "
            "resume, or start a new run.dir") in refused.stderr
    assert snapshot_files(run_dir) == before
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=7", "checkpoint.every=7", "optim.g_lr=0.5"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("resuming with changed settings (the new values apply): optim.g_lr 0.001 -> 0.5, train.steps 6 -> 7, "
            "checkpoint.every 2 -> 7, checkpoint.keep_last 0 -> 3\n") in result.stdout
    saved = json.loads((run_dir / "checkpoints" / "step_00000007" / "optimizers.json").read_text())
    assert [group["lr"] for group in saved["generator"]["param_groups"]] == [0.5]
    assert [group["lr"] for group in saved["discriminator"]["param_groups"]] == [0.001]
    assert "  g_lr: 0.5\n" in (run_dir / "config.yaml").read_text()


def test_resume_none_refuses_a_used_run_dir(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot_files(run_dir)
    result = run_train(TINY + [f"run.dir={run_dir}", "resume=none"])
    assert result.returncode == 2 and "is not empty and resume=none" in result.stderr
    assert snapshot_files(run_dir) == before


def test_a_channels_last_run_resumes_exactly_with_fused_adam(tmp_path):
    """Checkpoints hold contiguous tensors; fused Adam pairs a channels_last weight's elements with its
    moments' by storage order, so restored moments must take the weight's layout (else: a silently
    different run, 0.03 apart in Adam's first moment after 3 more steps)."""
    run = TINY + ["model.arch=seed", "train.channels_last=true", "optim.fused=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(run + [f"run.dir={straight}"]).returncode == 0
    for steps in (3, 6):
        result = run_train(run + [f"run.dir={resumed}", f"train.steps={steps}"])
        assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout + result.stderr
    assert_bitwise_equal(all_state(resumed), all_state(straight))


def test_a_log_line_left_half_written_is_drawn_around_and_dropped_on_resume(finished_run, tmp_path):
    """A run killed in the middle of a metrics line (or on a full disk) must not make every resume fail."""
    run_dir = copy_run(finished_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 7, "loss/d": 0.4')
    drawn = subprocess.run([sys.executable, "-m", "train.plots", "--run", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True)
    assert drawn.returncode == 0 and "1 unreadable line(s) left out of the curves" in drawn.stderr, drawn.stderr
    assert (run_dir / "curves.png").stat().st_size > 10_000
    result = run_train(TINY + [f"run.dir={run_dir}", "train.steps=8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"dropped 1 unreadable line(s) of {run_dir / 'metrics.jsonl'}" in result.stdout + result.stderr
    logged = [line["step"] for line in logged_metrics(run_dir)]
    assert logged == [3, 6, 8]


def test_resume_from_a_path_continues_that_checkpoint_exactly(finished_run, tmp_path):
    resumed = tmp_path / "resumed"
    source = finished_run / "checkpoints" / "step_00000004"
    result = run_train(TINY + [f"run.dir={resumed}", f"resume={source}", "train.steps=6"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {source} at step 4" in result.stdout + result.stderr
    logged = [line["step"] for line in logged_metrics(resumed)]
    assert logged == [6]  # steps 5 and 6 only (logging.every=3): not trained again from step 0
    assert_bitwise_equal(all_state(resumed), all_state(finished_run))  # what that run reached at step 6


def test_resume_from_a_path_behind_its_run_dir_continues_the_run_dir_as_a_requeued_job_must(finished_run, tmp_path):
    """A Slurm job with resume=PATH in GAN_ARGS is requeued with the same arguments: it must continue from
    the checkpoint it wrote, not train steps 3-6 again over step_00000006 (and cut their metric lines)."""
    requeued, auto = copy_run(finished_run, tmp_path), shutil.copytree(finished_run, tmp_path / "auto")
    older = requeued / "checkpoints" / "step_00000002"
    logged = (requeued / "metrics.jsonl").read_text()
    run = TINY + ["checkpoint.every=2", "checkpoint.keep_last=0", "train.steps=8"]
    result = run_train(run + [f"run.dir={requeued}", f"resume={older}"])
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert (f"already holds step_00000006 (step 6), further along than resume={older} (step 2): continuing from it"
            in output and f"resumed from {requeued / 'checkpoints' / 'step_00000006'} at step 6" in output)
    assert (requeued / "metrics.jsonl").read_text().startswith(logged)  # steps 1-6 as they were
    assert run_train(run + [f"run.dir={auto}"]).returncode == 0
    assert_bitwise_equal(all_state(requeued), all_state(auto))
    # The way back to step 2 the message offers: a new run directory, which retrains exactly.
    branch = Path(re.search(r"\(e\.g\. run\.dir=(\S+)\)", output)[1])
    assert run_train(TINY + [f"run.dir={branch}", f"resume={older}", "checkpoint.every=2"]).returncode == 0
    assert_bitwise_equal(all_state(branch), all_state(finished_run))


def tool(name: str, *args) -> subprocess.CompletedProcess:
    """`python -m train.NAME ARGS`: export, sample, evaluate or plots, as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"train.{name}", *map(str, args)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True)


def test_export_and_sample_give_the_same_images_from_every_form(finished_run, tmp_path, tool_here):
    exported = tmp_path / "exported"
    result = tool("export", "--checkpoint", finished_run, "--out", exported)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "generator.json", "generator.safetensors",
                                                           "samples.png"]  # the card: tests/test_share.py
    description = json.loads((exported / "generator.json").read_text())
    assert (description["arch"], description["z_dim"], description["step"]) == ("dcgan", 100, 6)
    # Built from the exported folder alone, without the training code's state.
    generator = models.build(description["arch"], description["z_dim"])[0]
    generator.load_state_dict(load_file(exported / "generator.safetensors"))

    arrays = []
    for source, run in ((exported, tool), (finished_run, tool_here),
                        (finished_run / "checkpoints" / "step_00000006", tool_here)):
        out = tmp_path / f"{len(arrays)}.npy"
        result = run("sample", "--checkpoint", source, "--num", 12, "--seed", 3, "--out", out, "--device", "cpu")
        assert result.returncode == 0, result.stderr
        arrays.append(np.load(out))
    assert arrays[0].shape == (12, 28, 28) and arrays[0].dtype == np.uint8
    assert all(np.array_equal(arrays[0], other) for other in arrays[1:])
    with torch.no_grad():
        direct = generator.eval()(torch.randn(12, 100, generator=torch.Generator().manual_seed(3)))
    assert np.array_equal(arrays[0], direct.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).squeeze(1).numpy())
    png = tmp_path / "grid.png"
    result = tool_here("sample", "--checkpoint", exported, "--num", 16, "--out", png)
    assert result.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_refuses_a_label_for_an_unconditional_generator(finished_run, tmp_path, tool_here):
    out = tmp_path / "seven.png"
    result = tool_here("sample", "--checkpoint", finished_run, "--label", 7, "--out", out)
    assert result.returncode == errors.EXIT_BAD_INPUT
    assert (f"error: --label 7: the generator of {finished_run} is not conditional (trained without "
            "model.conditional=true)") in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("name", ["sample", "evaluate", "export"])
def test_each_tool_names_a_path_that_is_no_checkpoint_before_any_work(tmp_path, name, tool_here):
    wrong, out = tmp_path / "wrong", tmp_path / "out"
    wrong.mkdir()
    extra = {"sample": ["--out", out / "x.png"], "evaluate": ["--cache-dir", out, "--device", "cpu"],
             "export": ["--out", out]}[name]
    result = tool_here(name, "--checkpoint", wrong, *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {wrong} is neither a checkpoint folder (with manifest.json) nor a run directory" in result.stderr
    assert not out.exists()  # no samples, no test-set features extracted, no export folder


@pytest.mark.parametrize("name, device, message", [  # both tools share --device's check
    ("sample", "cuda:99", "cuda:99 is not a device this machine can generate on: it has the CPU and"),
    ("evaluate", "gpu", "'gpu' is not a device name (cpu, cuda, cuda:1, ...)"),
    ("sample", "mps", "mps is not a device this machine can generate on"),  # before: a traceback
    ("evaluate", "meta", "meta is not a device this machine can generate on")])  # before: "damaged" checkpoint
def test_each_tool_refuses_a_device_this_machine_lacks_before_any_work(finished_run, tmp_path, name, device, message,
                                                                      tool_here):
    out = tmp_path / "out"
    extra = {"sample": ["--out", out / "x.png"], "evaluate": ["--cache-dir", out]}[name]
    result = tool_here(name, "--checkpoint", finished_run, "--device", device, *extra)
    assert result.returncode == 2 and f"error: argument --device: {message}" in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_plots_names_a_run_dir_without_metrics(tmp_path, tool_here):
    result = tool_here("plots", "--run", tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: --run {tmp_path} holds no metrics.jsonl: point it at the run.dir of a run" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_too_few_samples_before_any_work(finished_run, tmp_path, tool_here):
    result = tool_here("evaluate", "--checkpoint", finished_run, "--num", 5, "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2 and "error: --num must be at least 100" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


def test_an_export_is_never_overwritten(finished_run, tmp_path, tool_here):
    """Its checkpoint may be gone since (checkpoint.keep_last); a second export goes elsewhere."""
    exported = tmp_path / "exported"
    older = finished_run / "checkpoints" / "step_00000004"
    assert tool_here("export", "--checkpoint", older, "--out", exported).returncode == 0
    before = snapshot_files(exported)
    result = tool_here("export", "--checkpoint", finished_run, "--out", exported)
    assert result.returncode == 2 and f"error: {exported} already holds an exported generator" in result.stderr
    assert snapshot_files(exported) == before and json.loads((exported / "generator.json").read_text())["step"] == 4


def test_evaluate_prints_the_metrics_of_a_checkpoint_as_json(finished_run, eval_cache):
    result = tool("evaluate", "--checkpoint", finished_run, "--num", 200, "--floor", "--bootstrap", 20,
                  "--cache-dir", eval_cache, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_samples"] == 200
    names = set(reported.measured())  # an unconditional generator's, without the copy rate
    assert set(report["metrics"]) == set(report["training_set_floor"]) == names
    assert set(report["degraded_training_images"]) == {"noise_0.05", "noise_0.1", "shifted_1px", "blurred_3x3"}
    assert report["metrics"]["fd"] > report["training_set_floor"]["fd"] > 0
    interval = report["fd_interval"]
    assert interval["fd"] == report["metrics"]["fd"] and interval["low"] <= interval["fd"] <= interval["high"]
    assert report["metrics"]["kid"] > report["training_set_floor"]["kid"]
    assert set(report["per_digit"]) == {str(digit) for digit in range(10)}
    assert sum(digit["count"] for digit in report["per_digit"].values()) == 200
    floor = report["training_set_floor_fd_interval"]
    assert floor["fd"] == report["training_set_floor"]["fd"] and floor["low"] <= floor["fd"] <= floor["high"]
    assert 0 <= report["metrics"]["precision"] <= 1


@pytest.mark.parametrize("use_ema", [True, False])
def test_the_evaluation_logged_in_training_is_what_evaluate_gives_for_the_checkpoint(tmp_path, eval_cache, use_ema):
    """Anyone can reproduce a logged number from the checkpoint it came from, for either generator."""
    run_dir = tmp_path / "run"
    result = run_train(TINY + [f"run.dir={run_dir}", "eval.num_samples=150", "eval.seed=7",
                               f"eval.use_ema={str(use_ema).lower()}", f"eval.cache_dir={eval_cache}"])
    assert result.returncode == 0, result.stderr[-2000:]
    logged = logged_metrics(run_dir)[-1]
    result = tool("evaluate", "--checkpoint", run_dir, "--num", 150, "--seed", 7, "--cache-dir", eval_cache,
                  "--device", "cpu", *([] if use_ema else ["--no-ema"]))
    assert result.returncode == 0, result.stderr[-2000:]
    offline = json.loads(result.stdout)["metrics"]
    assert {f"eval/{key}": value for key, value in offline.items()} == \
        {key: value for key, value in logged.items() if key.startswith("eval/") and key != "eval/seconds"}

