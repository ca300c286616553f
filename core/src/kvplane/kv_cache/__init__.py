"""KV cache bookkeeping: blocks, content hashes, the block pool and per-request tables.

Pure Python; the KV tensors themselves belong to the model runner.
"""

from kvplane.kv_cache.block import KVBlock
from kvplane.kv_cache.block_manager import BlockManager
from kvplane.kv_cache.block_pool import BlockPool
from kvplane.kv_cache.hashing import BlockHash, hash_block, hash_block_tokens

__all__ = ["BlockHash", "BlockManager", "BlockPool", "KVBlock", "hash_block", "hash_block_tokens"]
