"""transformer_lens.hook_points under lens.tl: the hook point, the handle, and HookedRootModule
for models users build themselves (all lens.hooks)."""

from lens.hooks import HookedRootModule, HookPoint, LensHandle

__all__ = ["HookPoint", "HookedRootModule", "LensHandle"]
