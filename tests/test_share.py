"""Sharing a generator: the export's model card (made from what the run measured, parsed by huggingface_hub's own
card code), the push to a Hub (a local one: the Hub cannot run here) and the load back by repository id, and the W&B
model artifacts a run logs (read from W&B's own offline files)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from conftest import REPO, TINY, logged_metrics, run_env, run_train, run_with_fault, snapshot_files
from train.models import generate
from train.sharing.export import export_generator, load_generator
from train.sharing.model_card import shareable_config

pytest.importorskip("wandb")
from helpers.local_hub import LocalHub  # noqa: E402
from helpers.wandb_records import records  # noqa: E402

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"
HUB_TOKEN = "hf_local_0123456789abcdefghijklmnop"


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, eval_cache):
    """Six steps, evaluated at 3 and 6 (each a candidate for `best`) with the FD's interval and the copy rate,
    logged to W&B offline."""
    run_dir = tmp_path_factory.mktemp("share") / "run"
    args = TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "eval.num_samples=200", "eval.every=3",
                   f"eval.cache_dir={eval_cache}", "eval.fd_resamples=20", "eval.copy_rate=true"]
    result = run_train(args, env=run_env(WANDB_API_KEY=FAKE_KEY))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def export(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.export", *map(str, args)], cwd=REPO, env=env or run_env(),
                          capture_output=True, text=True, timeout=300)


def artifacts(run_dir: Path) -> list:
    """The W&B artifact records of every offline run (a resumed run writes another) under run_dir, in order."""
    return [record.artifact for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
            for record in records(path) if record.WhichOneof("record_type") == "artifact"]


def md5_base64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_the_card_holds_the_evaluation_of_the_exported_step_as_hub_metadata(evaluated_run, tmp_path):
    best = (evaluated_run / "checkpoints" / "best").resolve()
    out = tmp_path / "export"
    result = export("--checkpoint", evaluated_run / "checkpoints" / "best", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "generator.json", "generator.safetensors",
                                                      "samples.png"]
    step = json.loads((out / "generator.json").read_text())["step"]
    assert best.name == f"step_{step:08d}"
    (measured,) = [line for line in logged_metrics(evaluated_run) if line["step"] == step]
    card = ModelCard.load(out / "README.md")  # huggingface_hub's own parser
    assert card.data.library_name == "pytorch" and card.data.datasets == ["ylecun/mnist"]
    assert {"gan", "dcgan"} <= set(card.data.tags)
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {"fd", "kid", "precision", "recall", "classes_present", "copy_rate"} <= set(results)
    assert 0 <= measured["eval/copy_rate"] <= 1 and measured["eval/fd_low"] <= measured["eval/fd_high"]
    for name, result in results.items():
        assert result.metric_value == measured[f"eval/{name}"], name
        assert (result.dataset_type, result.dataset_split, result.task_type) == (
            "mnist", "test", "unconditional-image-generation")
    assert (f"| FD | {measured['eval/fd']:.4g} (95% interval {measured['eval/fd_low']:.4g} to "
            f"{measured['eval/fd_high']:.4g}) | lower |") in card.text  # the page for people says the same
    assert f"| 0 | {measured['digits/count_0']:.4g} |" in card.text  # and per class
    state = json.loads((best / "state.json").read_text())
    assert yaml.safe_dump(shareable_config(state["config"]), sort_keys=False).strip() in card.text
    assert str(evaluated_run.parent) not in card.text and state["config"]["run"]["dir"] == str(evaluated_run)
    assert state["hardware"]["device"].split(":")[0] in card.text and "processes" in state["hardware"]
    assert Image.open(out / "samples.png").size == (8 * 30 + 2, 8 * 30 + 2)  # 64 samples of 28 px, 2 px apart


def test_names_reach_the_card_escaped_and_quoted_and_no_absolute_path_of_the_trainer(tmp_path):
    """A run folder named as HTML, an --out name holding a quote and a backtick fence: before, pasted raw into the
    card's heading and into the Python snippet a reader copies."""
    import ast
    import re
    run_dir = tmp_path / "<img src=x onerror=alert(1)>"
    assert run_train(TINY + [f"run.dir={run_dir}", "train.steps=2", "logging.every=1"]).returncode == 0
    out = tmp_path / 'gen"); import os; os.system("echo pwned") #```'
    assert export_generator(run_dir, out, name=run_dir.name).folder == out
    card = (out / "README.md").read_text()
    page = ModelCard(card).text  # the markdown below the metadata (there the name is YAML data, read back as is)
    assert ModelCard(card).data.model_name == run_dir.name
    prose = re.sub(r"(`{3,})[a-z]*\n.*?\n\1\n", "", page, flags=re.S)  # in a code block it is shown as text
    assert "<img" not in prose and "# &lt;img src=x onerror=alert\\(1\\)&gt;" in page
    assert str(tmp_path) not in card and str(tmp_path) not in (out / "generator.json").read_text().replace(
        json.loads((out / "generator.json").read_text())["data"]["path"], "")  # data.path: where to re-evaluate
    assert json.loads((out / "generator.json").read_text())["source"] == "checkpoints/step_00000002"
    quoted = tmp_path / "q"
    export_generator(run_dir, quoted, name=out.name)
    snippet = re.search(r"load_generator\((.*)\)  # a folder", (quoted / "README.md").read_text()).group(1)
    assert ast.literal_eval(snippet) == out.name  # the reader's copy names the model, and runs nothing else
    assert "\n```python\n" not in (quoted / "README.md").read_text()  # a fence the name's backticks cannot close


def test_a_card_of_a_checkpoint_never_evaluated_has_no_numbers_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(TINY + [f"run.dir={run_dir}", "train.steps=2", "logging.every=1"]).returncode == 0
    result = export("--checkpoint", run_dir, "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "its run logged no evaluation at step 2, so README.md has no quality numbers" in result.stdout
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert card.data.eval_results is None and "Not evaluated" in card.text


def test_an_export_folder_holding_other_files_is_refused_and_left_as_it_is(evaluated_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot_files(out)
    result = export("--checkpoint", evaluated_run, "--out", out)
    assert result.returncode == 2 and f"{out} already holds other files (notes.txt)" in result.stderr, result.stderr
    assert snapshot_files(out) == before


@pytest.fixture
def local_hub():
    hub = LocalHub()
    yield hub
    hub.close()


def hub_env(hub: LocalHub, home: Path, **extra) -> dict:
    return run_env(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1", **extra)


def test_push_to_hub_uploads_the_export_and_it_loads_back_by_repository_id(evaluated_run, tmp_path, local_hub):
    out = tmp_path / "export"
    env = hub_env(local_hub, tmp_path / "hf_home", HF_TOKEN=HUB_TOKEN)
    result = export("--checkpoint", evaluated_run, "--out", out, "--push-to-hub", "alice/mnist-gan", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed" in result.stdout and "alice/mnist-gan" in result.stdout
    uploaded = local_hub.repos["alice/mnist-gan"]
    assert uploaded == {path.name: content for path, content in snapshot_files(out).items()}  # every file, as written
    assert all(auth == f"Bearer {HUB_TOKEN}" for _, _, auth in local_hub.requests)
    assert ModelCard(uploaded["README.md"].decode()).data.model_name == "alice/mnist-gan"
    for content in snapshot_files(tmp_path).values():  # the token is in no file: not the export, not the cache
        assert HUB_TOKEN.encode() not in content
    # Loaded back by repository id in a fresh process, it draws what the local folder draws.
    script = ("import sys, torch; from train.sharing.export import load_generator; from train.models import generate; "
              "torch.save(generate(load_generator('alice/mnist-gan'), 16, 0), sys.argv[1])")
    loaded = subprocess.run([sys.executable, "-c", script, str(tmp_path / "drawn.pt")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert ("GET", "/alice/mnist-gan/resolve/") in {(method, path[:len("/alice/mnist-gan/resolve/")])
                                                    for method, path, _ in local_hub.requests}
    assert torch.equal(torch.load(tmp_path / "drawn.pt"), generate(load_generator(out), 16, 0))


@pytest.mark.parametrize("repo_id, token, message", [
    ("alice/mnist-gan", None, "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN"),
    ("mnist-gan", HUB_TOKEN, "--push-to-hub 'mnist-gan' names no owner: give USER/REPO"),
    ("alice/mnist gan!", HUB_TOKEN, "--push-to-hub 'alice/mnist gan!' is not a repository id"),
])
def test_a_push_that_cannot_happen_is_refused_before_any_work(evaluated_run, tmp_path, local_hub, repo_id, token,
                                                             message):
    env = hub_env(local_hub, tmp_path / "hf_home", **({"HF_TOKEN": token} if token else {}))
    result = export("--checkpoint", evaluated_run, "--out", tmp_path / "export", "--push-to-hub", repo_id, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "export").exists() and local_hub.requests == []


@pytest.mark.parametrize("server", ["closed port", "never answers"])
def test_a_push_to_a_hub_that_is_not_there_fails_by_name_within_its_time_limit(evaluated_run, tmp_path, server):
    """Before: an httpx ConnectError traceback (closed port), or a hang past 300 s (a server that never answers)."""
    import socket
    import time
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if server == "never answers":
        listener.listen(8)  # the kernel completes the connections; nobody reads or answers them
    port = listener.getsockname()[1]
    if server == "closed port":
        listener.close()
    env = run_env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0",
                  HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=HUB_TOKEN)
    started = time.monotonic()
    result = export("--checkpoint", evaluated_run, "--out", tmp_path / "export", "--push-to-hub", "alice/mnist-gan",
                    "--hub-timeout", 8, env=env)
    listener.close()
    assert time.monotonic() - started < 120  # the limit, start-up and export included: not the hang it was
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    expected = "did not finish the upload" if server == "never answers" else "could not reach the Hub at"
    assert expected in result.stderr and "pushed" not in result.stdout
    assert f"the export in {tmp_path / 'export'} is complete" in result.stderr
    assert (tmp_path / "export" / "generator.json").is_file()


def test_a_repository_id_that_is_no_folder_and_not_on_the_hub_is_refused_by_name(tool_here):
    result = tool_here("sample", "--checkpoint", "alice/no-such-gan", "--num", 4, "--out", "unused.png")
    assert result.returncode == 2, result.stderr
    assert "alice/no-such-gan is neither a local folder nor a Hub model repository" in result.stderr


def test_each_new_best_generator_is_a_wandb_model_artifact_with_its_evaluation(evaluated_run, tmp_path):
    bests = [line for line in logged_metrics(evaluated_run) if "eval/fd" in line]
    bests = [line for i, line in enumerate(bests) if line["eval/fd"] < min([b["eval/fd"] for b in bests[:i]] + [1e9])]
    logged = artifacts(evaluated_run)
    assert [json.loads(artifact.metadata)["step"] for artifact in logged] == [line["step"] for line in bests]
    run_id = json.loads((evaluated_run / "checkpoints" / "best" / "state.json").read_text())["progress"]["wandb_run_id"]
    for artifact, line in zip(logged, bests):
        assert artifact.type == "model" and artifact.name == f"generator-{run_id}"
        assert {"best", f"step-{line['step']}"} <= set(artifact.aliases)
        metadata = json.loads(artifact.metadata)
        assert {key: value for key, value in metadata.items() if key.startswith("eval/")} == {
            key: value for key, value in line.items() if key.startswith("eval/")}
        # Its files are the export of that checkpoint, byte for byte.
        exported = export_generator(evaluated_run / "checkpoints" / f"step_{line['step']:08d}",
                                    tmp_path / f"step_{line['step']}", name=evaluated_run.name).folder
        assert {entry.path: entry.digest for entry in artifact.manifest.contents} == {
            path.name: md5_base64(path) for path in exported.iterdir()}


def test_a_resumed_run_logs_a_new_artifact_version_and_a_finished_one_none(tmp_path):
    """Without evaluations the final generator is logged; a resumed run's is another version, never a repeat."""
    run_dir = tmp_path / "run"
    env = run_env(WANDB_API_KEY=FAKE_KEY)
    run = TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "checkpoint.every=3"]
    assert run_train(run + ["train.steps=3"], env=env).returncode == 0
    assert run_train(run + ["train.steps=6"], env=env).returncode == 0
    assert run_train(run + ["train.steps=6"], env=env).returncode == 0  # nothing to train: nothing logged
    logged = artifacts(run_dir)
    assert [json.loads(artifact.metadata)["step"] for artifact in logged] == [3, 6]
    assert len({artifact.name for artifact in logged}) == 1 and "best" not in logged[1].aliases
    weights = [{entry.path: entry.digest for entry in artifact.manifest.contents}["generator.safetensors"]
               for artifact in logged]
    assert weights[0] != weights[1]


def history_steps(run_dir: Path) -> list[int]:
    """The history steps of every offline W&B run under run_dir (a resumed run writes another), in order."""
    return [record.history.step.num for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
            for record in records(path) if record.WhichOneof("record_type") == "history"]


def test_a_best_found_just_before_a_preemption_or_a_kill_reaches_wandb(tmp_path, eval_cache):
    """Preempted at the step whose evaluation set a new best: before, that best never became an artifact, and a
    run killed with SIGKILL lost W&B's history of what metrics.jsonl had."""
    env = run_env(WANDB_API_KEY=FAKE_KEY)
    run = TINY + ["logging.wandb=offline", "eval.num_samples=100", "eval.every=3", f"eval.cache_dir={eval_cache}",
                  "train.check_every=1", "logging.every=1"]
    preempted = tmp_path / "preempted"
    result = run_with_fault("signal:TERM", 3, 0, run + [f"run.dir={preempted}"], env=env)
    assert result.returncode == 75, result.stderr[-3000:]
    assert (preempted / "checkpoints" / "best").resolve().name == "step_00000003"
    assert [json.loads(a.metadata)["step"] for a in artifacts(preempted)] == [3]
    resumed = run_train(run + [f"run.dir={preempted}"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(a.metadata)["step"] for a in artifacts(preempted)][0] == 3  # not logged twice
    assert sorted(json.loads(a.metadata)["step"] for a in artifacts(preempted)).count(3) == 1

    killed = tmp_path / "killed"
    result = run_with_fault("die", 5, 0, run + [f"run.dir={killed}", "checkpoint.every=2"], env=env)
    assert result.returncode == -9
    kept = [line["step"] for line in logged_metrics(killed)]
    assert kept == [1, 2, 3, 4]
    resumed = run_train(run + [f"run.dir={killed}", "checkpoint.every=2"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "that the run before this one had not sent (it was killed)" in resumed.stderr
    assert set(history_steps(killed)) == {1, 2, 3, 4, 5, 6}  # the killed run's steps too, from metrics.jsonl
    assert 3 in [json.loads(a.metadata)["step"] for a in artifacts(killed)]  # its best (step 3), killed or not


def test_a_full_temporary_folder_during_the_artifact_export_is_named_and_the_artifact_sent_on_resume(tmp_path,
                                                                                                  eval_cache):
    """Before: exit 74 named the run and W&B folders although TMPDIR was full, and the best never became an
    artifact."""
    from helpers.mounts import tmpfs
    env = run_env(WANDB_API_KEY=FAKE_KEY)
    run_dir = tmp_path / "run"
    run = TINY + [f"run.dir={run_dir}", "logging.wandb=offline", "eval.num_samples=100", "eval.every=3",
                  f"eval.cache_dir={eval_cache}"]
    with tmpfs(tmp_path / "small_tmp", "size=64k") as small:
        full = run_train(run, env=run_env(WANDB_API_KEY=FAKE_KEY, TMPDIR=str(small)))
    assert full.returncode == 74, full.stderr[-3000:]
    assert f"exporting step_00000003's generator for W&B into {small}/generator-" in full.stderr
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
    assert artifacts(run_dir) == []
    resumed = run_train(run, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 3 in [json.loads(a.metadata)["step"] for a in artifacts(run_dir)]
