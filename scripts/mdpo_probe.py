"""Does mDPO learn its conditional preference under other settings? The align stage's own mDPO
(`persona.mdpo.train_mdpo`) from a run's SFT adapter, outside DVC, with `mdpo.*` values overridden:

    PYTHONPATH=. python scripts/mdpo_probe.py OUT [mdpo.KEY=VALUE ...]   e.g. OUT=/tmp/probe/lr mdpo.lr=0.002

Run it in a checkout whose `dvc repro sft` is done (a profile's worktree, scripts/profile_run.sh): the SFT
adapter and the prepared splits are read from there, and only OUT is written (the policy, checkpoints,
OUT/align.json). It answers one question: does the trained policy rank the held-out valid pairs (one valid reply
under its own vs another persona) right more often than SFT does (`valid_persona_accuracy_gain`, with its CI)?
So it needs neither the pairs nor the reward stage, draws no samples and skips the test-split evaluation. A
setting that passes earns a profile and a full run; a probe's figures are not results of the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

import yaml

from persona import mdpo, trl_align
from persona.config import ConfigError, MDPOConfig, Params, from_dict, load_params
from persona.paths import Paths
from persona.runner import start_logging


def with_overrides(params: Params, overrides: list[str]) -> Params:
    """`params` with each `mdpo.KEY=VALUE` applied, VALUE read as YAML and typed and validated as params.yaml is."""
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not key.startswith("mdpo.") or not sep:
            raise ConfigError(f"mdpo_probe: {item!r} is not mdpo.KEY=VALUE")
        changes[key.removeprefix("mdpo.")] = yaml.safe_load(value)
    section = from_dict(MDPOConfig, {**dataclasses.asdict(params.mdpo), **changes}, "mdpo")
    section.validate("mdpo")
    return dataclasses.replace(params, mdpo=section)


def probe(params: Params, read: Paths, out: Path) -> dict:
    """train_mdpo's metrics, from `read`'s prepared splits and SFT adapter, everything it writes under `out`."""
    # the held-out reward is the align stage's, not the probe's question: no samples, no reward model
    with mock.patch.object(mdpo, "sample_chats", lambda *args, **kwargs: []), \
            mock.patch.object(trl_align, "held_out_rewards", lambda *args, **kwargs: {}):
        return mdpo.train_mdpo(params, Paths.under(out, prepared=read.prepared, base=read.base, sft=read.sft,
                                                   curves=None))


if __name__ == "__main__":
    start_logging()
    out = Path(sys.argv[1])
    try:
        params = with_overrides(load_params(), sys.argv[2:])
    except ConfigError as error:  # one line naming the key, as the stages report params errors
        raise SystemExit(f"error: {error}") from None
    result = {**probe(params, Paths(), out), "probe_overrides": sys.argv[2:]}
    (out / "align.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items()
                      if "persona_accuracy" in key or key in ("train_loss", "eval_loss", "eval_margin")}, indent=2))
