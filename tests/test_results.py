"""README's results tables are generated from the committed metrics (`python -m persona results`), and match them."""
from __future__ import annotations

import json
import shutil

import pytest

from persona import results
from tests.conftest import REPO


def test_readme_results_match_the_committed_metrics():
    assert results.write(REPO / "README.md", check=True), "README.md: run python -m persona results"


def test_a_results_folder_gets_its_own_table_and_marks(tmp_path):
    shutil.copytree(REPO / "metrics", tmp_path / "metrics")
    spc = tmp_path / "results" / "cpu-spc"
    spc.mkdir(parents=True)
    for name in ("eval.json", "reward.json", "align.json"):
        shutil.copy(REPO / "metrics" / name, spc / name)
    evaluation = json.loads((spc / "eval.json").read_text())
    evaluation["paired"]["ppo_vs_sft"]["f1"] = {"diff": 0.5, "ci_low": 0.25, "ci_high": 0.75, "mdd": 0.1, "n": 99}
    (spc / "eval.json").write_text(json.dumps(evaluation))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nstale\n{results.END}\nrest\n")
    assert not results.write(readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{results.END}\nrest\n") and "stale" not in text
    assert "**default run** (`metrics/`)" in text and "**cpu-spc** (`results/cpu-spc/`)" in text
    assert "| F1 | +0.500 [+0.250, +0.750] * (n=99) |" in text
    align = json.loads((spc / "align.json").read_text())  # the valid split's figure, beside the test split's
    assert f"| cpu-spc | ppo | model | {align['reward_gain']:+.3f} [{align['reward_gain_ci_low']:+.3f}, " in text
    reward = json.loads((spc / "reward.json").read_text())  # the default run's pairs hold contradiction pairs
    assert f"contradiction pairs {reward['accuracy_contradiction']:.3f} [" in text
    assert f"(n={reward['n_contradiction']}); length-matched" in text
    assert "ranked right" not in text  # only mdpo reports its held-out pairs
    assert results.write(readme, check=True)
    (spc / "align.json").write_text(json.dumps({**align, "valid_persona_accuracy_sft": 0.6,
                                                "valid_persona_accuracy": 0.7, "valid_persona_accuracy_gain": 0.1,
                                                "valid_persona_accuracy_gain_ci_low": 0.05,
                                                "valid_persona_accuracy_gain_ci_high": 0.15, "valid_pairs": 200}))
    results.write(readme)
    assert ("Held-out pairs (one valid reply, its own vs another persona) ranked right: SFT 0.600 -> ppo 0.700, "
            "paired gain +0.100 [+0.050, +0.150] (n=200).") in readme.read_text()


def test_missing_markers_are_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no results markers"):
        results.write(readme)


def test_issue_15_criteria_read_the_paired_cis_and_the_gold_bounds():
    paired = {"persona_hits1": {"diff": 0.1, "ci_low": 0.02, "ci_high": 0.2, "n": 300},
              "persona_gain": {"diff": 0.1, "ci_low": -0.01, "ci_high": 0.2, "n": 300}}
    evaluation = {"paired": {"ppo_vs_sft": paired},
                  "sft": {"gold_perplexity": 10.0},
                  "gold": {"fact_copy_rate": 0.12, "repeated_sentence_rate": 0.0},
                  "ppo": {"fact_copy_rate": 0.17, "gold_perplexity": 10.6, "reward_length_correlation": -0.31,
                          "repeated_sentence_rate": 0.02}}
    assert list(results.criteria(evaluation, "ppo").values()) == [True, False, True, False, False, True]
