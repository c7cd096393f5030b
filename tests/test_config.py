"""Every config mistake stops the run before any work, naming the key and what is allowed."""

from pathlib import Path

import pytest

from train.config import available_configs, load
from train.errors import ConfigError


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads(name):
    load(name, [])


def test_overrides_take_dotted_keys_and_convert_types():
    cfg = load("configs/smoke.yaml", ["train.steps=7", "data.batch_size=3", "loss.kind=hinge", "optim.amsgrad=false"])
    assert (cfg.train.steps, cfg.data.batch_size, cfg.loss.kind, cfg.optim.amsgrad) == (7, 3, "hinge", False)


@pytest.mark.parametrize("overrides, expected", [
    (["train.stepz=5"], "unknown config key 'train.stepz'; valid keys here: steps, mixed_precision, cpu"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["train.steps=many"], "config key 'train.steps'"),
    (["data.batch_size=0"], "config key 'data.batch_size' is 0; it must be greater than 0"),
    (["optim.g_lr=-0.001"], "config key 'optim.g_lr' is -0.001; it must be greater than 0"),
    (["optim.beta1=1.5"], "config key 'optim.beta1' is 1.5; it must be in [0, 1)"),
    (["model.arch=stylegan"], "config key 'model.arch' is 'stylegan'; allowed values: dcgan, seed"),
    (["loss.kind=wasserstein"], "config key 'loss.kind' is 'wasserstein'; allowed values: bce, hinge"),
    (["loss=hinge"], "config key 'loss' is a section, not a value: set one of its keys (kind, r1_gamma, r1_every), "
                     "e.g. loss.kind=hinge"),
    (["loss.r1_gamma=-1"], "config key 'loss.r1_gamma' is -1.0; it must be 0 or more"),
    (["loss.r1_every=0"], "config key 'loss.r1_every' is 0; it must be greater than 0"),
    (["loss.r1_gamma=1", "train.compile=true"], "loss.r1_gamma > 0 needs train.compile=false"),
    (["model.class_norm=true"], "model.class_norm=true needs model.conditional=true and model.arch=dcgan"),
    (["model.class_norm=true", "model.conditional=true", "model.arch=seed"], "needs model.conditional=true and "
                                                                             "model.arch=dcgan"),
    (["model.d_width=0"], "config key 'model.d_width' is 0; it must be greater than 0"),
    (["model.arch=seed", "model.d_width=48"], "model.d_width=48 needs model.arch=dcgan: the blog's discriminator"),
    (["model.g_width=0"], "config key 'model.g_width' is 0; it must be greater than 0"),
    (["model.arch=seed", "model.g_width=32"], "model.g_width=32 needs model.arch=dcgan: the blog's generator"),
    (["data.holdout=1"], "config key 'data.holdout' is 1.0; it must be in [0, 1)"),
    (["logging.wandb=maybe"], "allowed values: online, offline, disabled"),
    (["train.mixed_precision=fp8"], "allowed values: null, fp32, bf16, fp16"),
    (["train.steps"], "override 'train.steps' is not of the form key=value"),
    (["train.cuda_graph=true", "train.on_nonfinite=skip"], "train.cuda_graph=true needs train.on_nonfinite=stop or"),
    (["model.arch=seed", "model.upsample=native", "train.deterministic=true"],
     "train.deterministic=true needs model.upsample=fused"),
    (["optim.g_lr=inf"], "config key 'optim.g_lr' is inf; it must be a finite number"),
    (["loss.r1_gamma=nan"], "config key 'loss.r1_gamma' is nan; it must be a finite number"),
    (["run.seed=99999999999999999999999"], "config key 'run.seed' is 99999999999999999999999; it must fit in 64 bits"),
    (["train.steps=100000000000000000000000"], "config key 'train.steps' is 100000000000000000000000; it must fit"),
    (["train.timeout_s=99999999999"], "config key 'train.timeout_s' is 99999999999; it must be greater than 0 and "
                                      "at most a year"),
    ([f"run.dir=runs/{'a' * 300}"], "config key 'run.dir' has a path component of 300 bytes (aaaaaaaaaaaaaaaaaaaa...)"
                                    "; file systems allow at most 255"),
    (["run.dir=''"], "config key 'run.dir' is empty; give a path (the default is runs/default)"),
    ([f"run.dir={'/a' * 2100}"], "config key 'run.dir' is a path of 4200 bytes once absolute; Linux allows fewer"),
    (["eval.fd_resamples=5"], "config key 'eval.fd_resamples' is 5; it must be 0 (no interval) or at least 20"),
    (["eval.cache_dir=${nonexistent.key}"],
     "config key 'eval.cache_dir': Interpolation key 'nonexistent.key' not found"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load("configs/smoke.yaml", overrides)
    assert expected in str(error.value)


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 5\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        load(str(path), [])


def test_missing_config_file_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="configs/nope.yaml.*does not exist.*configs/smoke.yaml"):
        load("configs/nope.yaml", [])


@pytest.mark.parametrize("content, expected", [
    (bytes(range(128, 256)), "is not UTF-8 text, so not a YAML config"),
    (b"train:\n  steps: [1\n", "is not plain YAML: while parsing a flow sequence"),
    (b"train: !!python/object/apply:os.system [touch pwned]\n", "is not plain YAML: could not determine a constructor "
                                                                "for the tag 'tag:yaml.org,2002:python/object/apply"),
    (b"- train\n- steps\n", "holds a YAML list, not a mapping of sections"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load(str(path), [])
    assert expected in str(error.value)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_config_folder_is_named_as_a_folder():
    with pytest.raises(ConfigError, match="config file 'configs' is a folder; pick one of .*configs/smoke.yaml"):
        load("configs", [])


@pytest.mark.parametrize("value", ["`backtick", "@home", '"unclosed', "'unclosed"])
def test_an_override_yaml_cannot_read_is_named_with_the_quoting_that_reads_it(value):
    with pytest.raises(ConfigError, match=r"override .*run.dir=.*: YAML cannot read the value .*quote it as a YAML "
                                          "string") as refused:
        load(None, [f"run.dir={value}"])
    import shlex
    suggested = shlex.split(str(refused.value).rsplit("in the shell as ", 1)[1])
    assert load(None, suggested).run.dir.endswith(value)  # the suggestion reads as the value meant


def test_an_unreadable_override_exits_2_from_the_command_line():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "train", "run.dir=`x"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2 and "YAML cannot read the value '`x'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_projects_errors_are_not_value_errors_that_a_librarys_handler_would_swallow():
    """Where a reader turns a library's ValueError into a DataError, a ConfigError raised inside passes through."""
    from train.errors import RunError

    def read():
        try:
            load(None, ["model.arch=nonesuch"])
        except ValueError as error:  # what wrapping a library's call looks like
            raise AssertionError(f"the project's error was caught as a ValueError: {error}") from None

    with pytest.raises(ConfigError, match="model.arch"):
        read()
    assert not issubclass(RunError, ValueError)
