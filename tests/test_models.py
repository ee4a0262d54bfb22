"""Base-model resolution: local directories, template-less models, and hub ids without a hub."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona.chat_format import PROJECT_TEMPLATE
from persona.models import BASE_INFO, materialize_base
from tests.conftest import REPO


def test_local_directory_is_saved_as_an_equivalent_checkpoint(tiny_model_dir, tmp_path):
    info = materialize_base(str(tiny_model_dir), tmp_path / "base")
    assert info["architecture"] == "llama" and not info["project_chat_template"]
    assert json.loads((tmp_path / "base" / BASE_INFO).read_text())["name"] == str(tiny_model_dir)
    ids = torch.tensor([[1, 20, 300, 4000]])
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
    torch.testing.assert_close(before, after)


def test_base_output_is_the_same_bytes_wherever_it_is_written(tiny_model_dir, tmp_path):
    """No version stamps, paths or times in models/base: a fresh clone's `base` hashes as the committed dvc.lock."""
    outputs = []
    for out in (tmp_path / "one" / "base", tmp_path / "two" / "deeper" / "base"):
        materialize_base(str(tiny_model_dir), out)
        outputs.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert not any(b"transformers_version" in content for content in outputs[0].values())
    assert not any(str(tmp_path).encode() in content for content in outputs[0].values())


def test_template_less_model_gets_the_project_template_and_a_pad_token(tiny_model_dir, tokenizer, tmp_path):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template, plain.pad_token = None, None
    source = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(source)
    plain.save_pretrained(source)
    info = materialize_base(str(source), tmp_path / "base")
    saved = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert info["project_chat_template"] and saved.chat_template == PROJECT_TEMPLATE
    assert saved.pad_token == saved.eos_token


def test_hub_id_offline_fails_naming_the_param_and_the_offline_choices(tmp_path):
    code = ("from pathlib import Path; from persona.models import materialize_base; "
            f"materialize_base('gpt2-medium', Path({str(tmp_path / 'out')!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode != 0
    assert "ConfigError: model.name: cannot load 'gpt2-medium'" in done.stderr
    assert "smollm2-135m-instruct or a local model directory" in done.stderr
