"""Our own PPO (RLHF) for LoRA policies, split by concern like OpenRLHF: `kl` (estimators, controllers),
`advantages` (GAE, whitening), `losses` (clipped objectives, the k2 penalty), `rollout` (sampling, packing,
log-probs), `policy` (policy + value head, the reference), `experience` (a scored rollout batch), `update`
(the minibatch loop), `checkpoint` (save, resume), `trainer` (the loop, on accelerate)."""
