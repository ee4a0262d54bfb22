"""Several processes, one run: who writes files, and proof that the processes really train together.

Every training stage can run as N processes under `accelerate launch` (persona/launch.py).
Data-parallel training is only right if each process sees other data and, after every
optimizer step, all hold the same weights. `agreement` checks both after the first step of a
run and fails loudly otherwise: a "2-process" run whose ranks silently train apart (a missing
gradient all-reduce, a wrong sampler) would otherwise look like a normal run with worse numbers.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from transformers import TrainerCallback


def digest(tensors: Iterable[torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


def agreement(trainable: Iterable[torch.Tensor], batch_digest: str) -> dict:
    """Gather (weights digest, first batch digest) from every process; raise if the weights differ.

    Returns `processes`, `ranks_in_sync` and `ranks_distinct_batches` for the stage's metrics
    (the last two are None for a single process: there is nothing to compare).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return not_checked(1)
    mine = (digest(trainable), batch_digest)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    weights, batches = {w for w, _ in everyone}, {b for _, b in everyone}
    if len(weights) > 1:
        raise RuntimeError(f"data-parallel processes hold different weights after one optimizer step "
                           f"({len(weights)} versions over {len(everyone)} processes): gradients are not synced")
    return {"processes": len(everyone), "ranks_in_sync": True, "ranks_distinct_batches": len(batches) == len(everyone)}


def check_world_size(expected: int, actual: int) -> None:
    """The run must have the processes params asked for: an accelerate config can quietly give fewer
    (distributed_type MULTI_CPU on one machine starts one process), and the metrics would then
    describe a run other than the one params record."""
    from persona.config import ConfigError
    if actual != expected:
        raise ConfigError(f"launch.processes: {expected} asked for, but this run has {actual} process(es); "
                          "start training stages with `python -m persona.launch stages.NAME` (dvc repro does), "
                          "and check launch.accelerate_config")


def not_checked(processes: int) -> dict:
    """The metrics of `agreement` when there was nothing to compare (or no step was taken)."""
    return {"processes": processes, "ranks_in_sync": None, "ranks_distinct_batches": None}


class FirstBatch:
    """Wraps a data collator and remembers a digest of the first batch this process trains on."""

    def __init__(self, collator):
        self.collator, self.digest = collator, None

    def __call__(self, features):
        batch = self.collator(features)
        if self.digest is None:
            self.digest = digest([batch["input_ids"]])
        return batch


class RankAgreement(TrainerCallback):
    """Runs `agreement` after the first optimizer step of a (possibly resumed) Trainer run."""

    def __init__(self, first_batch: FirstBatch):
        self.first_batch, self.result = first_batch, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.result is None:
            self.result = agreement((p for p in model.parameters() if p.requires_grad), self.first_batch.digest)

    def metrics(self, processes: int) -> dict:
        """The check's result, or "not checked" when the run had no step left to take (resumed at its end)."""
        return self.result or not_checked(processes)


def watch_ranks(trainer) -> RankAgreement:
    """Attach the first-batch recorder and the agreement check to a Trainer before `train()`."""
    first_batch = FirstBatch(trainer.data_collator)
    trainer.data_collator = first_batch
    callback = RankAgreement(first_batch)
    trainer.add_callback(callback)
    return callback
