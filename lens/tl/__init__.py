"""TransformerLens's import surface over lens: a TransformerLens script runs on lens by changing
its import,

    import lens.tl as transformer_lens
    from lens.tl import HookedTransformer, HookedTransformerConfig, ActivationCache, utils, patching

and gets TransformerLens's numbers from lens's engine. The differences that remain on purpose
are listed in README's porting guide."""

import importlib

from lens.cache import ActivationCache
from lens.factored import FactoredMatrix
from lens.hooks import HookedRootModule, HookPoint, LensHandle
from lens.tl.model import HookedTransformer, HookedTransformerConfig
from lens.tl.past_key_value_caching import (HookedTransformerKeyValueCache,
                                            HookedTransformerKeyValueCacheEntry)

# TransformerLens 4's names for the cache
TransformerLensKeyValueCache = HookedTransformerKeyValueCache
TransformerLensKeyValueCacheEntry = HookedTransformerKeyValueCacheEntry
_SUBMODULES = ("utils", "patching", "head_detector", "hook_points", "past_key_value_caching")
_ALIASES = {"utilities": "utils"}  # TransformerLens 4's name for its utils


def __getattr__(name: str):
    if name in _SUBMODULES or name in _ALIASES:
        return importlib.import_module(f"lens.tl.{_ALIASES.get(name, name)}")
    raise AttributeError(f"module 'lens.tl' has no attribute {name!r}")


__all__ = ["ActivationCache", "FactoredMatrix", "HookPoint", "HookedRootModule", "HookedTransformer",
           "HookedTransformerConfig", "HookedTransformerKeyValueCache",
           "HookedTransformerKeyValueCacheEntry", "LensHandle", "TransformerLensKeyValueCache",
           "TransformerLensKeyValueCacheEntry", *_SUBMODULES]
