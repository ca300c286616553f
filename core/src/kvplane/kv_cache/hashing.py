"""Content hashes of full KV blocks, chained so that a hash names a whole prefix.

Choice of hash: SHA-256 over a fixed byte encoding (little-endian int64 token ids, the
parent's 32-byte digest, ``repr`` of the extra keys). It is stable across processes and
Python versions (unlike ``hash()`` of a ``str``, which is salted per process) so hashes can
later be shared between workers or a KV connector, and collisions are not a practical
concern even for adversarial prompts (a 64-bit ``hash()`` of a tuple would be).

Collision handling: the block pool still stores each cached block's token ids and checks
them on every hit, so a collision can at worst turn a hit into a miss for that block's own
tokens; the prefix before it is identified by the chained digest alone.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Hashable, Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""SHA-256 digest of (parent block hash, this block's token ids, extra keys)."""

# Stands in for the parent of a sequence's first block; no SHA-256 digest is all zeros.
_ROOT_PARENT = bytes(32)


def hash_block(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Hashable, ...] = (),
) -> BlockHash:
    """Hash one full block given the hash of the block before it.

    ``parent_hash`` is ``None`` for the first block of a sequence. ``extra_keys`` is for
    anything besides the tokens that changes the KV values or must isolate caches (a
    LoRA adapter id, a cache salt); its items must have a deterministic ``repr`` (str,
    int, bytes, None, tuples of those). Pure function.
    """
    digest = hashlib.sha256(parent_hash if parent_hash is not None else _ROOT_PARENT)
    digest.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    if extra_keys:
        digest.update(repr(extra_keys).encode())
    return BlockHash(digest.digest())


def hash_block_tokens(
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    extra_keys: tuple[Hashable, ...] = (),
    prefix_hashes: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Chained hashes of the first ``num_blocks`` full blocks of ``token_ids``.

    ``extra_keys`` go into the first block only (the chain carries them to the rest).
    ``prefix_hashes`` are already known hashes of the leading blocks, extended rather
    than recomputed. Requires ``num_blocks * block_size <= len(token_ids)``.
    """
    if num_blocks * block_size > len(token_ids):
        raise ValueError(
            f"cannot hash {num_blocks} full blocks of {block_size} tokens from "
            f"{len(token_ids)} tokens"
        )
    hashes = list(prefix_hashes[:num_blocks])
    for i in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else None
        block_tokens = token_ids[i * block_size : (i + 1) * block_size]
        hashes.append(hash_block(parent, block_tokens, extra_keys if i == 0 else ()))
    return hashes
