"""lens: a GPT in the residual-stream framing, every read and write of the stream a hook point."""

from lens import ablation, attribution, circuits, patching, sae
from lens.cache import ActivationCache, act_name
from lens.check import CheckReport, check
from lens.config import GPTConfig
from lens.dissect import dissect
from lens.factored import FactoredMatrix
from lens.harvest import Harvest, HarvestDataset, harvest
from lens.hooks import HookPoint
from lens.model import HookedGPT
from lens.sae import SAE

__all__ = ["ActivationCache", "CheckReport", "FactoredMatrix", "GPTConfig", "Harvest", "HarvestDataset",
           "HookPoint", "HookedGPT", "SAE", "ablation", "act_name", "attribution", "check", "circuits",
           "dissect", "harvest", "patching", "sae"]
