"""Seeds derived from named parts: identical across processes, ranks and Python runs (unlike `hash()`).

Two derivations, both kept because changing either would change what every existing run drew: `stable_seed` (any
printable parts: data order, augmentations) and `step_seed` (integers: a method's per-micro-batch randomness).
"""
import hashlib

import numpy as np
import torch


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers such as (seed, step, rank, micro_batch) via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def step_generator(*parts: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `step_seed(*parts)`."""
    return torch.Generator(device="cpu").manual_seed(step_seed(*parts))
