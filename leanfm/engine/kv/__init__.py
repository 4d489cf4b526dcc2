"""The paged KV cache's bookkeeping, torch-free: block pools, per-request block tables, prefix caching.

The tensors live in the runner (leanfm.engine.runner); this package only hands out block ids.
"""

from leanfm.engine.kv.block_pool import NULL_BLOCK, BlockKey, BlockPool
from leanfm.engine.kv.groups import KVGroupSpec, plan_kv_groups
from leanfm.engine.kv.manager import CachedPrefix, KVCacheManager

__all__ = ["NULL_BLOCK", "BlockKey", "BlockPool", "CachedPrefix", "KVCacheManager", "KVGroupSpec",
           "plan_kv_groups"]
