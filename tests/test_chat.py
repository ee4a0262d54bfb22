"""Terminal chat and export on the tiny model: persona parsing, sessions, commands, clear errors, merged export."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from persona.__main__ import add_decoding, decoding_from
from persona.__main__ import main as cli
from persona.chat import ChatSession, load_chat_models, parse_persona, run_terminal
from persona.config import ConfigError
from persona.export import export_merged
from persona.generation import Decoding, generate
from persona.models import lora_config
from tests.conftest import params_with

GREEDY = Decoding(max_new_tokens=8, temperature=0, batch_size=1)


def test_chat_and_web_sample_with_the_top_k_asked_for():
    """--top-k reaches the sampler; 50 (what they always sampled with) unless told otherwise."""
    parser = argparse.ArgumentParser()
    add_decoding(parser)
    assert decoding_from(parser.parse_args([])).top_k == 50
    assert decoding_from(parser.parse_args(["--top-k", "0"])).top_k == 0


def test_persona_from_pipes_or_a_file(tmp_path):
    assert parse_persona(" I love hiking |I have two dogs | ") == ["I love hiking", "I have two dogs"]
    path = tmp_path / "persona.txt"
    path.write_text("I am a nurse.\n\nI live in Lisbon.\n")
    assert parse_persona(path=path) == ["I am a nurse.", "I live in Lisbon."]


def test_bad_personas_are_named(tmp_path, caplog):
    with pytest.raises(ConfigError, match="--persona: the persona is empty"):
        parse_persona(" | ")
    with pytest.raises(ConfigError, match="--persona-file: .* does not exist"):
        parse_persona(path=tmp_path / "missing.txt")
    with caplog.at_level(logging.WARNING):
        facts = parse_persona(" | ".join(f"fact {i} " + "x" * 300 for i in range(12)))
    assert len(facts) == 8 and all(len(f) == 200 for f in facts)
    assert "keeping the first 8" in caplog.text and "truncated" in caplog.text


def test_session_keeps_history_and_streams_the_reply(tiny_model_dir, sft_adapter):
    model, tokenizer = load_chat_models(tiny_model_dir, {"policy": sft_adapter})
    session = ChatSession(model, tokenizer, ["I have two dogs."], GREEDY)
    pieces = []
    first = session.reply("hi there", on_text=pieces.append)
    assert first and "".join(pieces).strip() == first
    session.reply("what do you do?")
    assert [who for who, _ in session.turns] == [1, 0, 1, 0]
    assert session.messages()[0]["role"] == "system" and "two dogs" in session.messages()[0]["content"]
    session.reset()
    assert session.turns == []


def test_terminal_commands(tiny_model_dir):
    model, tokenizer = load_chat_models(tiny_model_dir, {})
    session = ChatSession(model, tokenizer, ["I have two dogs."], GREEDY)
    lines = iter(["hello", "/persona I like tea | I am a pilot", "/persona  ", "/oops", "hi", "/reset", "/quit"])
    written = []
    run_terminal(session, read=lambda prompt: next(lines), write=written.append)
    text = "".join(written)
    assert "new persona: I like tea | I am a pilot" in text and "persona is empty" in text
    assert "unknown command /oops" in text and "(conversation cleared)" in text
    assert session.facts == ["I like tea", "I am a pilot"] and session.turns == []


def test_missing_or_foreign_adapters_fail_clearly(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="--adapter: no LoRA adapter in"):
        load_chat_models(tiny_model_dir, {"policy": tmp_path / "nowhere"})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    other = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(params_with().lora))
    other.save_pretrained(tmp_path / "foreign")
    with pytest.raises(ConfigError, match="does not fit the base model"):
        load_chat_models(tiny_model_dir, {"policy": tmp_path / "foreign"})


def test_cli_reports_a_bad_persona_in_one_line(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["chat", "--adapter", "", "--persona", "", "--base", str(tiny_model_dir)])
    assert exit_info.value.code == 2 and "error: --persona: the persona is empty" in capsys.readouterr().err


def test_export_gives_the_adapters_greedy_reply_with_plain_transformers(tiny_model_dir, sft_adapter, tmp_path):
    info = export_merged(tiny_model_dir, sft_adapter, tmp_path / "merged")
    assert "GGUF" in info["gguf"] or "convert_hf_to_gguf" in info["gguf"]
    model, tokenizer = load_chat_models(tiny_model_dir, {"policy": sft_adapter})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    from transformers import AutoTokenizer
    plain_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    chat = [{"role": "system", "content": "I have two dogs."}, {"role": "user", "content": "hi, any pets?"}]
    decoding = Decoding(max_new_tokens=12, temperature=0, batch_size=1)
    assert generate(plain, plain_tokenizer, [chat], decoding)[0].token_ids == \
        generate(model, tokenizer, [chat], decoding)[0].token_ids
    assert plain_tokenizer.chat_template == tokenizer.chat_template
