"""lens: a GPT in the residual-stream framing, every read and write of the stream a hook point."""

from lens.cache import ActivationCache, act_name
from lens.config import GPTConfig
from lens.hooks import HookPoint
from lens.model import HookedGPT

__all__ = ["ActivationCache", "GPTConfig", "HookPoint", "HookedGPT", "act_name"]
