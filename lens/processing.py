"""Weight processing that leaves a model's output unchanged but makes its weights easier to read:
fold LayerNorm into the next layer, centre what writes to the residual stream, centre the
unembedding, fold value biases into the output bias (TransformerLens's steps, in its order)."""

import dataclasses
from typing import Optional, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from lens.config import GPTConfig

STEPS = ("fold_layer_norm", "center_writing_weights", "center_unembed", "fold_value_biases")
_HALF = (torch.float16, torch.bfloat16)


def set_config(model: nn.Module, **changes) -> GPTConfig:
    """Give `model` (and each submodule that shares its config) a copy of its config with
    `changes`; the old config object is left untouched, since other models may share it."""
    old = model.cfg
    new = dataclasses.replace(old, metadata=dict(old.metadata), **changes)
    for module in model.modules():
        if getattr(module, "cfg", None) is old:
            module.cfg = new
    return new


def applied_steps(model: nn.Module) -> list[str]:
    """The processing steps recorded in the model's config (saved with it)."""
    return list(model.cfg.metadata.get("processing", []))


class _Weights:
    """Named weights of a HookedGPT, written back in place (keeping each parameter's memory
    layout and dtype), or of a state dict, whose entries are replaced. Reads come back in
    float32 (float64 stays float64) so that processing half-precision weights loses nothing."""

    def __init__(self, target: Union[nn.Module, dict], cfg: Optional[GPTConfig]):
        self.model = target if isinstance(target, nn.Module) else None
        if self.model is not None:
            if cfg is not None and cfg is not self.model.cfg:
                raise ValueError("cfg= is for state dicts; a model is processed with its own cfg")
            self.cfg = self.model.cfg
            self.store = dict(self.model.named_parameters())
        elif isinstance(target, dict):
            if not isinstance(cfg, GPTConfig):
                raise ValueError("processing a state dict needs its GPTConfig: pass cfg=")
            self.cfg, self.store = cfg, target
        else:
            raise TypeError(f"expected a HookedGPT or a state dict, got {type(target).__name__}")

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.store:
            raise ValueError(f"weight {name!r} is missing; the weights do not match the config "
                             f"(normalization={self.cfg.normalization!r}, "
                             f"attn_only={self.cfg.attn_only})")
        t = self.store[name].detach()
        return t.float() if t.dtype in _HALF else t

    def __setitem__(self, name: str, value: Tensor) -> None:
        old = self.store[name]
        assert value.shape == old.shape, f"{name}: {tuple(value.shape)} != {tuple(old.shape)}"
        if self.model is not None:
            old.copy_(value)
        else:
            self.store[name] = value.to(old.dtype)

    def drop(self, name: str) -> None:
        if self.model is not None:
            module_path, leaf = name.rsplit(".", 1)
            setattr(self.model.get_submodule(module_path), leaf, None)
        del self.store[name]

    def record(self, step: str, **cfg_changes) -> None:
        if self.model is None:
            return
        new = set_config(self.model, **cfg_changes)
        done = [s for s in new.metadata.get("processing", []) if s != step]
        new.metadata["processing"] = done + [step]


def _fold(W: Float[Tensor, "*heads d_model d_out"], b: Float[Tensor, "*heads d_out"],
          ln_w: Float[Tensor, " d_model"], ln_b: Float[Tensor, " d_model"], center: bool
          ) -> tuple[Float[Tensor, "*heads d_model d_out"], Float[Tensor, "*heads d_out"]]:
    """LN(x) @ W + b == LNPre(x) @ W' + b' with W' = diag(ln_w) W and b' = b + ln_b @ W.

    LNPre(x) has zero mean over d_model, so W' may also be centred along d_model (a constant
    added to every row of W' adds nothing to the product)."""
    b = b + einops.einsum(ln_b, W, "d_model, ... d_model d_out -> ... d_out")
    W = W * ln_w[:, None]
    if center:
        W -= W.mean(-2, keepdim=True)  # in place on the new tensor: one temporary, not two
    return W, b


@torch.no_grad()
def fold_layer_norm(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None,
                    center_reading_weights: bool = True):
    """Fold every LayerNorm's weight and bias into the weights that read its output.

    ln1 goes into W_Q/W_K/W_V and b_Q/b_K/b_V, ln2 into W_in/b_in, ln_final into W_U/b_U; the
    reading weights are then centred along d_model (`center_reading_weights`). The LayerNorm
    weights are removed and the config becomes normalization="LNPre". A state dict is changed
    in place (pass its cfg; build the model for it with normalization="LNPre").
    """
    W = _Weights(target, cfg)
    norm = W.cfg.normalization
    if norm != "LN":
        why = ("it has no LayerNorm" if norm is None
               else "its LayerNorm weights are folded already")
        raise ValueError(f"fold_layer_norm needs normalization='LN', but the model has "
                         f"normalization={norm!r}: {why}")
    readers = []
    for l in range(W.cfg.n_layers):
        p = f"blocks.{l}."
        readers.append((p + "ln1", [(p + f"attn.W_{x}", p + f"attn.b_{x}") for x in "QKV"]))
        if not W.cfg.attn_only:
            readers.append((p + "ln2", [(p + "mlp.W_in", p + "mlp.b_in")]))
    readers.append(("ln_final", [("unembed.W_U", "unembed.b_U")]))
    for ln, pairs in readers:
        ln_w, ln_b = W[ln + ".w"], W[ln + ".b"]
        for w_name, b_name in pairs:
            W[w_name], W[b_name] = _fold(W[w_name], W[b_name], ln_w, ln_b, center_reading_weights)
        W.drop(ln + ".w")
        W.drop(ln + ".b")
    W.record("fold_layer_norm", normalization="LNPre")
    return target


@torch.no_grad()
def center_writing_weights(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Centre along d_model everything that writes to the residual stream: W_E, W_pos, W_O,
    b_O, W_out, b_out. The stream's mean is then always zero.

    This preserves the output only because every reader of the stream is a LayerNorm, which
    subtracts the mean anyway; a model with normalization=None is refused.
    """
    W = _Weights(target, cfg)
    if W.cfg.normalization is None:
        raise ValueError("center_writing_weights needs every reader of the residual stream to be a "
                         "LayerNorm (normalization 'LN' or 'LNPre'); with normalization=None "
                         "centring would change the model's output")
    names = ["embed.W_E"] + (["pos_embed.W_pos"] if W.cfg.positional_embedding else [])
    for l in range(W.cfg.n_layers):
        names += [f"blocks.{l}.attn.W_O", f"blocks.{l}.attn.b_O"]
        if not W.cfg.attn_only:
            names += [f"blocks.{l}.mlp.W_out", f"blocks.{l}.mlp.b_out"]
    for name in names:
        w = W[name]
        W[name] = w - w.mean(-1, keepdim=True)
    W.record("center_writing_weights")
    return target


@torch.no_grad()
def center_unembed(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Centre W_U and b_U over the vocabulary. Softmax ignores a constant added to every logit,
    so log-probs and probabilities are unchanged; the logits themselves shift."""
    W = _Weights(target, cfg)
    W_U, b_U = W["unembed.W_U"], W["unembed.b_U"]
    W["unembed.W_U"] = W_U - W_U.mean(-1, keepdim=True)
    W["unembed.b_U"] = b_U - b_U.mean()
    W.record("center_unembed")
    return target


@torch.no_grad()
def fold_value_biases(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Move b_V into b_O: b_O += Σ_h b_V[h] @ W_O[h], then b_V = 0.

    Each query's attention pattern sums to one, so the value bias reaches the output as the
    constant b_V[h] @ W_O[h] whatever the pattern."""
    W = _Weights(target, cfg)
    for l in range(W.cfg.n_layers):
        p = f"blocks.{l}.attn."
        b_V, W_O = W[p + "b_V"], W[p + "W_O"]
        through_W_O = einops.einsum(b_V, W_O, "n_heads d_head, n_heads d_head d_model -> d_model")
        W[p + "b_O"] = W[p + "b_O"] + through_W_O
        W[p + "b_V"] = torch.zeros_like(b_V)
    W.record("fold_value_biases")
    return target


_FUNCTIONS = {"fold_layer_norm": fold_layer_norm, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}


def process_weights(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None, *,
                    fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    strict: bool = True):
    """Apply the requested steps in TransformerLens's order: fold_layer_norm,
    center_writing_weights, center_unembed, fold_value_biases.

    A model records the steps applied to it in cfg.metadata["processing"] (saved with it), and
    steps already recorded are not repeated. strict=True raises when a requested step does not
    apply to the architecture; strict=False skips it (fold_ln without LayerNorm weights,
    centring writes without LayerNorm).
    """
    wanted = dict(zip(STEPS, (fold_ln, center_writing_weights, center_unembed, fold_value_biases)))
    done = applied_steps(target) if isinstance(target, nn.Module) else []
    for step, want in wanted.items():
        if not want or step in done:
            continue
        norm = _Weights(target, cfg).cfg.normalization
        applicable = {"fold_layer_norm": norm == "LN", "center_writing_weights": norm is not None}
        if not strict and not applicable.get(step, True):
            continue
        _FUNCTIONS[step](target, cfg)
    return target
