"""transformer_lens.past_key_value_caching under lens.tl: the KV cache generation uses
(lens.generate.KVCache), under TransformerLens's names."""

from lens.generate import CacheEntry as HookedTransformerKeyValueCacheEntry
from lens.generate import KVCache as HookedTransformerKeyValueCache

__all__ = ["HookedTransformerKeyValueCache", "HookedTransformerKeyValueCacheEntry"]
