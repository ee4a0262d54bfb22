"""persona-rlhf: train chatbots that keep a persona, as a reproducible DVC pipeline."""
import logging

__version__ = "0.1.0"

# On a CPU with AVX512-BF16, importing bitsandbytes (peft does, in every stage) logs a warning that it could not fetch
# an optional nf4 kernel from the hub (the `kernels` package, not a requirement, and the network). bitsandbytes then
# runs its own CPU kernel, as every measured nf4 run did. The warning asks for nothing this project uses, and it
# would add a line to every stage's one-line error about bad params.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
