"""HookedTransformer and HookedTransformerConfig as TransformerLens names them, built on
HookedGPT and GPTConfig."""

from typing import Optional

from lens.config import GPTConfig
from lens.model import HookedGPT


def HookedTransformerConfig(**fields) -> GPTConfig:  # noqa: N802 (TransformerLens's name)
    """A GPTConfig from TransformerLens's HookedTransformerConfig field names."""
    raise NotImplementedError


class HookedTransformer(HookedGPT):
    """HookedGPT under TransformerLens's name, loading with TransformerLens's keywords."""

    @classmethod
    def from_pretrained(cls, model_name, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True,
                        device=None, dtype=None, **kwargs) -> "HookedTransformer":
        from lens.loading import from_pretrained
        model = from_pretrained(model_name, device=device, dtype=dtype, fold_ln=fold_ln,
                                center_writing_weights=center_writing_weights,
                                center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                **kwargs)
        model.__class__ = cls
        return model

    @classmethod
    def from_pretrained_no_processing(cls, model_name, **kwargs) -> "HookedTransformer":
        return cls.from_pretrained(model_name, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, **kwargs)
