"""Chained block hashes."""

from __future__ import annotations

import pytest

from kvplane.kv_cache import hash_block, hash_block_tokens


def test_hash_is_stable_across_processes() -> None:
    # Pinned digest: hashes must not depend on the process (no salted hash()) or on the
    # sequence type.
    digest = hash_block(None, [1, 2, 3, 4])
    assert digest == hash_block(None, (1, 2, 3, 4))
    assert digest.hex() == "f45ae930310c74ad5e1e4338a12048048fd20fb584c5733766b7126cc80da15a"


def test_hash_depends_on_parent_tokens_and_extra_keys() -> None:
    root = hash_block(None, [1, 2])
    assert hash_block(root, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(root, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [1, 2]) != hash_block(None, [1, 2], ("salt",))
    assert hash_block(None, [1, 2], ("a",)) != hash_block(None, [1, 2], ("b",))
    assert hash_block(None, [1, 2], (("lora", 3),)) == hash_block(None, [1, 2], (("lora", 3),))
    # Fixed-width tokens plus a count: no two token lists share an encoding.
    assert hash_block(None, [1 << 32]) != hash_block(None, [0, 1])
    assert hash_block(None, []) != hash_block(None, [0])


def test_hash_block_tokens_chains_and_extends() -> None:
    tokens = list(range(10))
    hashes = hash_block_tokens(tokens, block_size=4, num_blocks=2, extra_keys=("s",))
    assert hashes[0] == hash_block(None, tokens[0:4], ("s",))
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert hash_block_tokens(tokens, 4, 2, ("s",), prefix_hashes=hashes[:1]) == hashes
    assert hash_block_tokens(tokens, 4, 1, ("s",), prefix_hashes=hashes) == hashes[:1]
    assert hash_block_tokens(tokens, 4, 0) == []
    with pytest.raises(ValueError, match="cannot hash 3 full blocks"):
        hash_block_tokens(tokens, 4, 3)
