"""Weight processing that leaves a model's output unchanged but makes its weights easier to read:
fold the norms' weights into the next layer (LayerNorm and RMSNorm), centre what writes to the
residual stream (only where every reader is a LayerNorm, which centres), centre the unembedding,
fold value biases into the output bias (TransformerLens's steps, in its order).

What each family gets from `from_pretrained` (process=True): GPT-2 and GPT-NeoX/Pythia
(LayerNorm) all four steps; Llama, Mistral, Qwen2/3 and Phi-3 (RMSNorm) fold_layer_norm
(RMSNorm weights into W_Q/W_K/W_V, W_gate/W_in and W_U; Qwen3's per-head QK-norm stays),
and center_unembed; Qwen2's b_V stays, as there is no b_O to take it. Centring the writes is
skipped, since RMSNorm does not centre. `from_pretrained_no_processing` applies none."""

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

    def has(self, name: str) -> bool:
        return self.store.get(name) is not None

    def untie(self) -> None:
        """Give a tied unembedding its own W_U before a step changes W_E or W_U."""
        if self.model is not None and self.model.unembed.tied:
            self.model.unembed.untie()
            self.store = dict(self.model.named_parameters())
            set_config(self.model, tied_embeddings=False)
            self.cfg = self.model.cfg
        elif self.model is None and self.cfg.tied_embeddings and "unembed.W_U" not in self.store:
            raise ValueError("this state dict has tied embeddings (no unembed.W_U); add "
                             "unembed.W_U = embed.W_E.T and use a cfg with tied_embeddings=False")

    def add_unembed_bias(self) -> None:
        """Give the model (or state dict) a zero b_U, for a step that writes one."""
        if self.has("unembed.b_U"):
            return
        if self.model is not None:
            self.model.unembed.add_bias()
            self.store = dict(self.model.named_parameters())
            set_config(self.model, unembed_bias=True)
            self.cfg = self.model.cfg
        else:
            W_U = self.store["unembed.W_U"]
            self.store["unembed.b_U"] = torch.zeros(W_U.shape[-1], dtype=W_U.dtype)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.store:
            raise ValueError(f"weight {name!r} is missing; the weights do not match the config "
                             f"(normalization={self.cfg.normalization!r}, "
                             f"attn_only={self.cfg.attn_only}, attn_bias={self.cfg.attn_bias}, "
                             f"mlp_bias={self.cfg.mlp_bias})")
        t = self.store[name].detach()
        if t.dtype in _HALF:
            return t.float()
        # a model's parameter is rewritten in place; a state dict's tensor may be shared with
        # someone else's model, so steps work on a copy
        return t if self.model is not None else t.clone()

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


def _fold(W: Float[Tensor, "*heads d_model d_out"], b: Optional[Float[Tensor, "*heads d_out"]],
          ln_w: Float[Tensor, " d_model"], ln_b: Optional[Float[Tensor, " d_model"]], center: bool
          ) -> tuple[Float[Tensor, "*heads d_model d_out"], Optional[Float[Tensor, "*heads d_out"]]]:
    """norm(x) @ W + b == normPre(x) @ W' + b' with W' = diag(ln_w) W and b' = b + ln_b @ W
    (RMSNorm has no ln_b).

    LNPre(x) has zero mean over d_model, so W' may also be centred along d_model (a constant
    added to every row of W' adds nothing to the product); RMSPre(x) does not, so `center` is
    only for LayerNorm."""
    if ln_b is not None:
        b = b + einops.einsum(ln_b, W, "d_model, ... d_model d_out -> ... d_out")
    W = W.mul_(ln_w[:, None])  # in place on what _Weights read: no second copy of a big matrix
    if center:
        W -= W.mean(-2, keepdim=True)  # in place on the new tensor: one temporary, not two
    return W, b


def _readers(cfg: GPTConfig) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each norm with its weight and bias, and the (weight, bias) pairs that read its output."""
    readers = []
    for l in range(cfg.n_layers if cfg.pre_norms else 0):
        p = f"blocks.{l}."
        readers.append((p + "ln1", [(p + f"attn.W_{x}", p + f"attn.b_{x}") for x in "QKV"]))
        if cfg.has_mlp:
            mlp = [(p + "mlp.W_in", p + "mlp.b_in")]
            if cfg.gated_mlp:
                mlp.append((p + "mlp.W_gate", p + "mlp.b_gate"))
            readers.append((p + "ln2", mlp))
    readers.append(("ln_final", [("unembed.W_U", "unembed.b_U")]))
    return readers


@torch.no_grad()
def fold_layer_norm(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None,
                    center_reading_weights: bool = True):
    """Fold every norm's weight (and LayerNorm's bias) into the weights that read its output.

    ln1 goes into W_Q/W_K/W_V and b_Q/b_K/b_V, ln2 into W_in (and W_gate)/b_in, ln_final into
    W_U/b_U (the weight being norm_offset + w, Gemma's 1 + w); under LayerNorm the reading
    weights are then centred along d_model
    (`center_reading_weights`). The norm weights are removed and the config becomes
    normalization="LNPre" (or "RMSPre"). A state dict is changed in place (pass its cfg; build
    the model for it with the Pre normalization).
    """
    W = _Weights(target, cfg)
    norm = W.cfg.normalization
    if norm not in ("LN", "RMS"):
        why = ("it has no norm" if norm is None else "its norm weights are folded already")
        raise ValueError(f"fold_layer_norm needs normalization 'LN' or 'RMS', but the model has "
                         f"normalization={norm!r}: {why}")
    W.untie()
    centres = norm == "LN"
    for ln, pairs in _readers(W.cfg):
        ln_w = W[ln + ".w"] + W.cfg.norm_offset  # Gemma's norms multiply by 1 + w
        ln_b = W[ln + ".b"] if W.has(ln + ".b") else None
        for w_name, b_name in pairs:
            if ln_b is not None and b_name == "unembed.b_U":
                W.add_unembed_bias()
            bias = W[b_name] if W.has(b_name) else None
            if ln_b is not None and bias is None:
                raise ValueError(f"cannot fold {ln}.b: {w_name} has no bias {b_name} to take it "
                                 "(load with fold_ln=False)")
            new_w, new_b = _fold(W[w_name], bias, ln_w, ln_b, centres and center_reading_weights)
            W[w_name] = new_w
            if new_b is not None:
                W[b_name] = new_b
        W.drop(ln + ".w")
        if ln_b is not None:
            W.drop(ln + ".b")
    W.record("fold_layer_norm", normalization=norm + "Pre")
    return target


@torch.no_grad()
def center_writing_weights(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Centre along d_model everything that writes to the residual stream: W_E, W_pos, W_O,
    b_O, W_out, b_out. The stream's mean is then always zero.

    This preserves the output only because every reader of the stream is a LayerNorm, which
    subtracts the mean anyway; a model with normalization=None is refused.
    """
    W = _Weights(target, cfg)
    if W.cfg.norm_kind != "LN":
        raise ValueError("center_writing_weights needs every reader of the residual stream to be a "
                         "LayerNorm (normalization 'LN' or 'LNPre'); with normalization="
                         f"{W.cfg.normalization!r} centring would change the model's output")
    W.untie()
    names = ["embed.W_E"] + (["pos_embed.W_pos"] if W.cfg.positional_embedding else [])
    for l in range(W.cfg.n_layers):
        names += [f"blocks.{l}.attn.W_O", f"blocks.{l}.attn.b_O"]
        if not W.cfg.attn_only:
            names += [f"blocks.{l}.mlp.W_out", f"blocks.{l}.mlp.b_out"]
    for name in [n for n in names if W.has(n)]:
        w = W[name]
        W[name] = w - w.mean(-1, keepdim=True)
    W.record("center_writing_weights")
    return target


@torch.no_grad()
def center_unembed(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Centre W_U and b_U over the vocabulary. Softmax ignores a constant added to every logit,
    so log-probs and probabilities are unchanged; the logits themselves shift."""
    W = _Weights(target, cfg)
    if W.cfg.final_softcap is not None:
        raise ValueError(f"center_unembed would change the output: the logits pass through a "
                         f"soft-cap (final_softcap={W.cfg.final_softcap}), which is not shift-invariant")
    W.untie()
    W_U = W["unembed.W_U"]
    W["unembed.W_U"] = W_U.sub_(W_U.mean(-1, keepdim=True))  # in place: no second W_U
    if W.has("unembed.b_U"):
        b_U = W["unembed.b_U"]
        W["unembed.b_U"] = b_U - b_U.mean()
    W.record("center_unembed")
    return target


@torch.no_grad()
def fold_value_biases(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """Move b_V into b_O: b_O += Σ_h b_V[h] @ W_O[h], then b_V = 0 (under grouped-query
    attention head h reads b_V of its key/value head).

    Each query's attention pattern sums to one, so the value bias reaches the output as the
    constant b_V[h] @ W_O[h] whatever the pattern. A model without b_V is left as it is; one
    with b_V but without b_O is refused."""
    W = _Weights(target, cfg)
    groups = W.cfg.n_heads // W.cfg.n_kv_heads
    for l in range(W.cfg.n_layers):
        p = f"blocks.{l}.attn."
        if not W.has(p + "b_V"):
            continue
        if not W.has(p + "b_O"):
            raise ValueError(f"cannot fold {p}b_V: the model has no b_O (attn_out_bias=False)")
        b_V, W_O = W[p + "b_V"].repeat_interleave(groups, 0), W[p + "W_O"]
        through_W_O = einops.einsum(b_V, W_O, "n_heads d_head, n_heads d_head d_model -> d_model")
        W[p + "b_O"] = W[p + "b_O"] + through_W_O
        W[p + "b_V"] = torch.zeros_like(W[p + "b_V"])
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
    apply to the architecture; strict=False skips it (fold_ln without norm weights, centring
    writes without LayerNorm, value biases without an output bias).
    """
    wanted = dict(zip(STEPS, (fold_ln, center_writing_weights, center_unembed, fold_value_biases)))
    done = applied_steps(target) if isinstance(target, nn.Module) else []
    for step, want in wanted.items():
        if not want or step in done:
            continue
        spec = _Weights(target, cfg).cfg
        applicable = {"fold_layer_norm": spec.normalization in ("LN", "RMS"),
                      "center_writing_weights": spec.norm_kind == "LN",
                      "fold_value_biases": spec.attn_bias and spec.attn_out_bias,
                      "center_unembed": spec.final_softcap is None}
        if not strict and not applicable.get(step, True):
            continue
        _FUNCTIONS[step](target, cfg)
    return target


@torch.no_grad()
def refactor_factored_attn_matrices(target: Union[nn.Module, dict], cfg: Optional[GPTConfig] = None):
    """TransformerLens's refactoring of each head's low-rank factors, which changes no output:
    W_QK = W_Q W_Kᵀ (with the biases as a (d_model + 1)-th input row) becomes the even
    factorisation (U √S, V √S); W_OV = W_V W_O becomes (U S, Vᵀ), so W_O is a rotation, and
    b_V moves into b_O. Singular vectors are defined up to sign, so single weights may differ
    from TransformerLens's by a sign per direction; every product (W_QK, W_OV, the output) is
    the same.

    Refused where the query-key product is not one matrix per head: rotary positions (it then
    depends on the positions), a QK-norm between projection and score, and grouped-query
    attention (a key head is shared by several query heads)."""
    from lens.factored import FactoredMatrix
    W = _Weights(target, cfg)
    c = W.cfg
    problems = [why for bad, why in ((c.rotary_dim > 0, "rotary positions (W_QK depends on the positions)"),
                                     (c.qk_norm is not None, "a QK-norm between projection and scores"),
                                     (c.n_kv_heads != c.n_heads, "grouped-query attention"))
                if bad]
    if problems:
        raise ValueError("refactor_factored_attn_matrices needs one query-key matrix per head; "
                         "this model has " + ", ".join(problems))
    for l in range(c.n_layers):
        p = f"blocks.{l}.attn."
        W_Q, W_K = W[p + "W_Q"], W[p + "W_K"]
        biased = W.has(p + "b_Q")
        if biased:
            W_Q = torch.cat([W_Q, W[p + "b_Q"][:, None, :]], 1)
            W_K = torch.cat([W_K, W[p + "b_K"][:, None, :]], 1)
        Q, K_T = FactoredMatrix(W_Q, W_K.mT).make_even().pair
        K = K_T.mT
        W[p + "W_Q"], W[p + "W_K"] = Q[:, :c.d_model], K[:, :c.d_model]
        if biased:
            W[p + "b_Q"], W[p + "b_K"] = Q[:, -1], K[:, -1]
        if W.has(p + "b_V"):
            if not W.has(p + "b_O"):
                raise ValueError(f"cannot move {p}b_V into b_O: the model has no b_O")
            W[p + "b_O"] = W[p + "b_O"] + einops.einsum(
                W[p + "b_V"], W[p + "W_O"], "head d_head, head d_head d_model -> d_model")
            W[p + "b_V"] = torch.zeros_like(W[p + "b_V"])
        U, S, V = FactoredMatrix(W[p + "W_V"], W[p + "W_O"]).svd()
        W[p + "W_V"], W[p + "W_O"] = U * S[..., None, :], V.mT
    W.record("refactor_factored_attn_matrices")
    return target
