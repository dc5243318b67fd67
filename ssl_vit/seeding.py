"""Seeds derived from named parts: identical across processes, ranks and Python runs (unlike `hash()`)."""
import hashlib


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
