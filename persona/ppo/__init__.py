"""Our own PPO (RLHF) for LoRA policies, split by concern like OpenRLHF:
`kl` (estimators, controllers), `advantages` (GAE, whitening), `losses` (clipped objectives),
`rollout` (experience making), `trainer` (the loop, on accelerate)."""
