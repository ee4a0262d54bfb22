"""Merge a LoRA adapter into its base model and save a plain transformers checkpoint.

The result (weights, tokenizer, chat template, generation config) loads with
`AutoModelForCausalLM.from_pretrained(DIR)` and no project code, for serving elsewhere or for a
GGUF conversion with llama.cpp's `convert_hf_to_gguf.py` when that converter is at hand.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from persona.chat import load_chat_models

log = logging.getLogger(__name__)
GGUF_CONVERTER = "convert_hf_to_gguf.py"


def export_merged(base: Path, adapter: Path, out_dir: Path) -> dict:
    """Merge `adapter` into `base` and save to `out_dir`; returns what was written."""
    model, tokenizer = load_chat_models(base, {"policy": adapter})
    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"base": str(base), "adapter": str(adapter), "parameters": sum(p.numel() for p in merged.parameters())}
    (out_dir / "persona_export.json").write_text(json.dumps(info, indent=2))
    converter = shutil.which(GGUF_CONVERTER)
    info["gguf"] = (f"python {converter} {out_dir} --outfile {out_dir / 'model.gguf'}" if converter else
                    f"no {GGUF_CONVERTER} on PATH: install llama.cpp and run it on {out_dir} for a GGUF file")
    log.info("merged %s into %s -> %s; GGUF: %s", adapter, base, out_dir, info["gguf"])
    return info
