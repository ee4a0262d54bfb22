"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-weight model built on it."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch

from persona.config import Params, load_params
from persona.models import BASE_INFO, bundled_gguf

REPO = Path(__file__).resolve().parents[1]
SHARED_SPC = REPO.parent / "shared" / "data" / "synthetic-persona-chat" / "valid.csv"

# Under `pytest -n N` (make test) each worker gets its share of the cores, for the subprocesses it starts
# too: N workers each running torch's thread pool on every core would fight over them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    folder, filename = bundled_gguf("smollm2-135m-instruct")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoTokenizer.from_pretrained(folder, gguf_file=filename)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with random weights and the real tokenizer, saved like the `base` stage does."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / BASE_INFO).write_text('{"name": "tiny-random-llama"}')
    return folder


@pytest.fixture(scope="session")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero B, so the SFT policy really differs from the base."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from persona.models import lora_config
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(params_with().lora))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)
    folder = tmp_path_factory.mktemp("sft-adapter")
    model.save_pretrained(folder)
    return folder


def params_with(**sections) -> Params:
    """The repo's params with some fields replaced: params_with(sft={"max_steps": 2})."""
    params = load_params(REPO / "params.yaml")
    changes = {}
    for name, value in sections.items():
        current = getattr(params, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(params, **changes)


def pytest_collection_modifyitems(items):
    """The end-to-end `dvc repro` file first: by far the longest, it must not start last on a worker (`-n`)."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")
