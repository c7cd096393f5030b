"""The command-line tools (sample, evaluate, export) given absurd arguments or a hand-edited generator: each is
refused by name with exit 2 before any work or allocation, never a traceback."""

import json
import shutil

import pytest

from conftest import TINY, run_train, snapshot_files
from train import errors
from train.storage import manifest


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tools") / "run"
    result = run_train(TINY + [f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    from train.sharing.export import export_generator
    return export_generator(finished_run, tmp_path_factory.mktemp("exported") / "generator").folder


def refused(result, message):
    assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("name, args, message", [
    ("sample", ["--num", 10 ** 12], "error: --num 1000000000000 needs about"),
    ("evaluate", ["--num", 10 ** 9], "error: --num 1000000000 needs about"),
    ("sample", ["--seed", 2 ** 70], f"error: argument --seed: {2 ** 70} is outside 0 to 2**63 - 1"),
    ("evaluate", ["--seed", -1], "error: argument --seed: -1 is outside 0 to 2**63 - 1"),
    ("evaluate", ["--bootstrap", -5], "error: --bootstrap needs at least 20 resamples"),
])
def test_absurd_counts_and_seeds_are_refused_before_any_work(finished_run, tmp_path, tool_here, name, args, message):
    """Before: allocation tracebacks, an overflow, and an IndexError after a minute of work."""
    out = tmp_path / "out"
    extra = {"sample": ["--out", out / "x.npy"], "evaluate": ["--cache-dir", out]}[name]
    result = tool_here(name, "--checkpoint", finished_run, "--device", "cpu", *extra, *args)
    refused(result, message)
    if "needs about" in message:
        assert "GiB of memory, and this machine has" in result.stderr and "available: ask for at most" in result.stderr
    assert not out.exists()


def test_an_out_of_the_wrong_kind_is_refused(finished_run, tmp_path, tool_here):
    """Before: exit 74, "make room"."""
    folder, file = tmp_path / "grid.png", tmp_path / "export"
    folder.mkdir()
    file.write_text("mine\n")
    refused(tool_here("sample", "--checkpoint", finished_run, "--out", folder, "--device", "cpu"),
            f"error: --out {folder} is a folder; give the file to write")
    refused(tool_here("export", "--checkpoint", finished_run, "--out", file),
            f"error: --out {file} is a file; give the folder to write the generator into")
    assert file.read_text() == "mine\n" and list(folder.iterdir()) == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("z_dim") and None, "generator.json is damaged: z_dim is missing"),
    (lambda d: d.update(z_dim="100"), "generator.json is damaged: z_dim is '100', not a count"),
    (lambda d: d.update(conditional="no"), "generator.json is damaged: conditional is 'no'"),
    (lambda d: d.update(arch="resnet"), "generator.json names the architecture 'resnet'; this code builds dcgan, seed"),
    (lambda d: d.update(z_dim=10 ** 9), "does not fit the generator "),
    (lambda d: "{not json", "generator.json is damaged: not JSON"),
    (lambda d: [d], "generator.json is damaged: not a JSON object"),
    (lambda d: d.update(z_dim=10 ** 15), "generator.json is damaged: z_dim 1000000000000000 with 1x28x28 images"),
    (lambda d: d["images"].update(height=2 ** 40, width=2 ** 40), "generator.json records ImageSpec(channels=1, "
                                                                  "height=1099511627776"),
    (lambda d: "[" * 100_000 + "]" * 100_000, "generator.json is damaged: JSON nested too deeply"),
])
def test_a_hand_edited_generator_description_is_refused_by_name(exported, tmp_path, tool_here, edit, message):
    """Before: nine different tracebacks, one of them a 25 TB allocation (z_dim 10^9), one a storage overflow (z_dim
    10^15), one a RecursionError."""
    folder = shutil.copytree(exported, tmp_path / "edited")
    description = json.loads((folder / "generator.json").read_text())
    edited = edit(description)
    edited = description if edited is None else edited
    (folder / "generator.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    result = tool_here("sample", "--checkpoint", folder, "--out", tmp_path / "x.npy", "--device", "cpu")
    refused(result, message)
    if "does not fit" in message:
        assert "(arch dcgan, z_dim 1000000000, conditional false): net.0.weight: file (100, 128, 7, 7), network " \
               "(1000000000, 128, 7, 7)" in result.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("model, message", [
    ({"arch": "resnet"}, "state.json names the architecture 'resnet'"),
    ({"z_dim": 10 ** 12}, "z_dim 1000000000000, conditional false): net.0.weight: file (100, 128, 7, 7)"),
])
def test_a_checkpoint_whose_rehashed_state_names_another_generator_is_refused(finished_run, tmp_path, tool_here,
                                                                              model, message):
    """state.json edited and its manifest re-hashed, so the checkpoint verifies. Before: a traceback, or a 25 PB
    allocation."""
    folder = shutil.copytree(finished_run / "checkpoints" / "step_00000006", tmp_path / "step_00000006")
    state = json.loads((folder / "state.json").read_text())
    state["config"]["model"].update(model)
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "manifest.json").unlink()
    manifest.write_manifest(folder)
    manifest.verify(folder)
    before = snapshot_files(folder)
    refused(tool_here("evaluate", "--checkpoint", folder, "--cache-dir", tmp_path / "cache", "--device", "cpu"),
            message)
    assert snapshot_files(folder) == before and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["export", "sample"])
def test_a_write_that_fails_for_another_cause_than_room_is_named_by_its_cause(finished_run, tmp_path, tool_here, name):
    """An --out below a file: before, both tools said "make room"."""
    (tmp_path / "a-file").write_text("mine\n")
    out = tmp_path / "a-file" / ("generator" if name == "export" else "x.png")
    result = tool_here(name, "--checkpoint", finished_run, "--out", out, *(["--device", "cpu"] * (name == "sample")))
    assert result.returncode == errors.EXIT_WRITE_FAILED, result.stderr[-2000:]
    assert ("a file stands where" in result.stderr or "something stands where" in result.stderr)
    assert "make room" not in result.stderr
    assert (tmp_path / "a-file").read_text() == "mine\n"
