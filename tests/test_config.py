"""Loading and validating params.yaml through `persona.config.load_params`."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from persona.config import ConfigError, Params, load_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def write_params(tmp_path: Path, **changes) -> Path:
    """Copy the real params.yaml into tmp_path with `changes` (dotted keys, e.g. `sft.lr`) applied."""
    raw = yaml.safe_load(PARAMS.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def assert_rejected(path: Path, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert key in str(info.value), f"message does not name {key!r}: {info.value}"
    return info.value


def test_repo_params_load():
    """The committed params.yaml is valid and its values arrive typed."""
    params = load_params(PARAMS)
    raw = yaml.safe_load(PARAMS.read_text())
    assert isinstance(params, Params)
    assert params.seed == raw["seed"]
    assert params.data.source == raw["data"]["source"]
    assert params.model.name == raw["model"]["name"]
    assert params.model.max_length == raw["model"]["max_length"]
    assert params.lora.r == raw["lora"]["r"]
    assert params.sft.layout == raw["sft"]["layout"]
    assert isinstance(params.sft.lr, float) and params.sft.lr == pytest.approx(float(raw["sft"]["lr"]))
    assert isinstance(params.sft.epochs, float)


def test_copy_in_tmp_path_loads(tmp_path):
    """An unmodified copy loads identically from another folder (no hidden cwd dependence)."""
    copy = write_params(tmp_path)
    assert load_params(copy) == load_params(PARAMS)


def test_missing_file(tmp_path):
    """A missing params file is a ConfigError naming the path."""
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_params(tmp_path / "nothere.yaml")


def test_unknown_top_level_key(tmp_path):
    """A typo at the top level is rejected by name."""
    assert_rejected(write_params(tmp_path, sed=1), "'sed'")


def test_unknown_nested_key(tmp_path):
    """A typo inside a section is rejected with its dotted key."""
    assert_rejected(write_params(tmp_path, **{"sft.lrr": 1e-3}), "sft.lrr")


def test_negative_lr(tmp_path):
    assert_rejected(write_params(tmp_path, **{"sft.lr": -1e-4}), "sft.lr")


def test_zero_lora_rank(tmp_path):
    assert_rejected(write_params(tmp_path, **{"lora.r": 0}), "lora.r")


def test_data_source_missing_path(tmp_path):
    """A data.source that is neither a keyword nor an existing path is rejected."""
    error = assert_rejected(write_params(tmp_path, **{"data.source": "no_such_data/spc.csv"}), "data.source")
    assert "no_such_data" in str(error)


def test_data_source_relative_to_params_file(tmp_path, monkeypatch):
    """A relative data.source resolves against the params file's folder, not the cwd."""
    (tmp_path / "spc").mkdir()
    shutil.copy(REPO / "data" / "sample" / "conversations.csv", tmp_path / "spc" / "conversations.csv")
    path = write_params(tmp_path, **{"data.source": "spc"})
    monkeypatch.chdir(REPO)  # "spc" does not exist under the repo
    assert load_params(path).data.source == "spc"


def test_data_source_keywords_need_no_path(tmp_path):
    """`sample` and `hub` are keywords, accepted although no such folder exists in tmp_path."""
    for source in ("sample", "hub"):
        assert not (tmp_path / source).exists()
        assert load_params(write_params(tmp_path, **{"data.source": source})).data.source == source


def test_model_missing_local_dir(tmp_path):
    assert_rejected(write_params(tmp_path, **{"model.name": "./no/such/dir"}), "model.name")


def test_model_invalid_hub_id(tmp_path):
    assert_rejected(write_params(tmp_path, **{"model.name": "not a valid id!"}), "model.name")


def test_model_hub_id_and_local_dir_accepted(tmp_path):
    """A well-formed hub id and an existing local directory are both accepted."""
    assert load_params(write_params(tmp_path, **{"model.name": "openai-community/gpt2"})).model.name \
        == "openai-community/gpt2"
    (tmp_path / "my_model").mkdir()
    assert load_params(write_params(tmp_path, **{"model.name": "./my_model"})).model.name == "./my_model"


def test_wrong_type(tmp_path):
    assert_rejected(write_params(tmp_path, **{"sft.batch_size": "four"}), "sft.batch_size")


def test_bool_is_not_an_int(tmp_path):
    """YAML `true` must not sneak in as the integer 1."""
    assert_rejected(write_params(tmp_path, **{"sft.batch_size": True}), "sft.batch_size")


def test_invalid_literal(tmp_path):
    error = assert_rejected(write_params(tmp_path, **{"sft.layout": "chunks"}), "sft.layout")
    assert "chunks" in str(error)


def test_fraction_above_one(tmp_path):
    assert_rejected(write_params(tmp_path, **{"data.fraction": 1.5}), "data.fraction")


def test_lr_without_dot_is_a_float(tmp_path):
    """`lr: 2e-4` (YAML 1.1 reads it as a string) loads as the float 0.0002."""
    path = write_params(tmp_path)
    text = path.read_text()
    sft_lr = next(line for line in text[text.index("\nsft:"):].splitlines() if line.strip().startswith("lr:"))
    path.write_text(text.replace(sft_lr, "  lr: 2e-4", 1))
    assert yaml.safe_load(path.read_text())["sft"]["lr"] == "2e-4"  # the premise: YAML gives a string
    lr = load_params(path).sft.lr
    assert isinstance(lr, float) and lr == pytest.approx(0.0002)


def test_non_numeric_string_for_float(tmp_path):
    assert_rejected(write_params(tmp_path, **{"sft.lr": "fast"}), "sft.lr")


def test_a_zero_kl_coefficient_cannot_adapt(tmp_path):
    """The adaptive controller multiplies kl_coef: from 0 it would stay 0 whatever the KL. A fixed 0 is fine."""
    assert_rejected(write_params(tmp_path, **{"ppo.kl_coef": 0.0, "ppo.kl_target": 2.0}), "ppo.kl_coef")
    assert load_params(write_params(tmp_path, **{"ppo.kl_coef": 0.0, "ppo.kl_target": 0.0})).ppo.kl_coef == 0


def test_an_adaptive_horizon_too_short_to_keep_the_coefficient_positive(tmp_path):
    """Each step multiplies kl_coef by up to 1 -+ 0.2 / (kl_horizon_fraction x max_steps)."""
    short = {"ppo.kl_horizon_fraction": 0.1, "ppo.max_steps": 2}
    assert_rejected(write_params(tmp_path, **short), "ppo.kl_horizon_fraction")
    assert load_params(write_params(tmp_path, **short, **{"ppo.kl_target": 0.0})).ppo.max_steps == 2


@pytest.mark.parametrize("key, value, reason", [
    ("ppo.top_p", 0.9, "full softmax"),
    ("ppo.kl_horizon", 10000, "ppo.kl_horizon_fraction"),
    ("ppo.kl_estimator", "k3", "biased"),
])
def test_a_retired_param_fails_with_its_reason(tmp_path, key, value, reason):
    """An old params.yaml fails in one line that names the key and says why, not with a generic error."""
    error = str(assert_rejected(write_params(tmp_path, **{key: value}), key))
    assert reason in error and "\n" not in error, error


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_numpy_range(tmp_path, seed):
    """numpy's seeding (under transformers' set_seed) refuses these, once a stage has already done work."""
    assert_rejected(write_params(tmp_path, seed=seed), "seed")


def test_negative_seed_stops_a_stage_before_any_work(tmp_path):
    """The stage script prints one line naming `seed`, exits 2, and writes nothing (no checkpoint to lose)."""
    import os
    import subprocess
    import sys

    write_params(tmp_path, seed=-1)
    done = subprocess.run([sys.executable, "-m", "stages.align"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: seed: -1 is outside 0 .. 2**32-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_aligned_names_whatever_align_trains(tmp_path):
    params = load_params(write_params(tmp_path, **{"align.algorithm": "dpo"}))
    assert params.evaluate.policies == ["base", "sft", "aligned"] and params.evaluated_policies() == ["base", "sft",
                                                                                                     "dpo"]
    assert_rejected(write_params(tmp_path, **{"evaluate.policies": ["sft", "aligned", "ppo"]}), "evaluate.policies")
    assert_rejected(write_params(tmp_path, **{"evaluate.policies": ["sft", "grpo"]}), "evaluate.policies")
