"""HookedGPT: embed → blocks that read from and write to the residual stream → unembed.

Every read and write is a named hook point (see lens.hooks); the forward pass validates its
input, runs any slice of the blocks (stop_at_layer / start_at_layer), and returns logits,
loss or both. What is built follows the spec (lens.config); caching lives in run_with_cache,
analysis on top in its own modules."""

import re
import weakref
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from lens.cache import ActivationCache, run_with_cache
from lens.components import Block, Rotary, Run, make_norm, padding_mask, per_query_head, softcap, weight
from lens.config import GPTConfig
from lens.generate import KVCache
from lens.hooks import POSITIONS, HookPoint, Hookable

RETURN_TYPES = ("logits", "loss", "both", None)


class HookedGPT(Hookable, nn.Module):
    """A decoder-only transformer whose every residual-stream read and write is a hook point."""

    # What run_with_cache() with no names filter leaves out unless asked (TransformerLens's
    # default cache): the per-head copies of the stream and of each head's write, and mlp_in.
    _use_attn_result = _use_split_qkv_input = _use_attn_in = _use_hook_mlp_in = False
    default_prepend_bos = True
    default_padding_side = "right"

    def __init__(self, cfg: GPTConfig, tokenizer=None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = _Embed(cfg.d_vocab, cfg.d_model, cfg.dtype, cfg.embed_scale)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding:
            self.pos_embed = _PosEmbed(cfg.n_ctx, cfg.d_model, cfg.dtype)
            self.hook_pos_embed = HookPoint()
        self.rotary = Rotary(cfg) if cfg.rotary_dim else None
        self.rotary_local = Rotary(cfg, local=True) if cfg.rotary_dim and cfg.local_rotary_base else None
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layers))
        self.ln_final = make_norm(cfg)
        self.unembed = _Unembed(cfg.d_model, cfg.d_vocab, cfg.dtype, cfg.unembed_bias,
                                tied_to=self.embed if cfg.tied_embeddings else None)
        self.hook_logits = HookPoint()
        self.setup_hooks()
        if init:
            self.init_weights()

    def __setattr__(self, name, value):
        if name == "cfg" and isinstance(value, GPTConfig):
            value._model = weakref.ref(self)  # cfg.device and the other runtime views ask it
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ what the default cache holds
    def set_use_attn_result(self, use: bool) -> None:
        """Let run_with_cache() with no filter cache each head's write (hook_result), as
        TransformerLens's flag does. lens computes hook_result whenever it is hooked or named,
        flag or not; the flag only decides what the unfiltered cache includes."""
        self._use_attn_result = bool(use)

    def set_use_split_qkv_input(self, use: bool) -> None:
        """As set_use_attn_result, for the per-head stream copies hook_q/k/v_input."""
        self._use_split_qkv_input = bool(use)

    def set_use_attn_in(self, use: bool) -> None:
        """As set_use_attn_result, for hook_attn_in (lens's per-head inputs are
        hook_q/k/v_input; hook_attn_in is not built, so this changes nothing)."""
        self._use_attn_in = bool(use)

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """As set_use_attn_result, for hook_mlp_in."""
        self._use_hook_mlp_in = bool(use)

    def default_cache_names(self) -> list[str]:
        """The hook points run_with_cache() caches when given no filter: every one except the
        per-head expansions (hook_result, hook_q/k/v_input) and hook_mlp_in, unless the
        set_use_* flags ask for them, as in TransformerLens. Naming them caches them anyway."""
        from lens.sites import OPTIONAL_CACHE
        flags = (OPTIONAL_CACHE.get(n.rsplit(".", 1)[-1]) for n in self.hook_dict)
        return [n for n, flag in zip(self.hook_dict, flags) if flag is None or getattr(self, "_" + flag)]

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None,
                     scale_writes: bool = True) -> None:
        """GPT-2 initialisation: normal(0, std) matrices, zero biases, unit LayerNorm weights;
        the stream's writers W_O and W_out get std / √(2 n_layers) unless scale_writes=False
        (TransformerLens's "gpt2" init, which draws every matrix with std)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                writes = scale_writes and leaf in ("W_O", "W_out")
                s = std / (2 * self.cfg.n_layers) ** 0.5 if writes else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)
            elif leaf == "w":
                p.fill_(1.0)
            else:
                p.zero_()

    def _stack(self, part: str, name: str) -> Tensor:
        """A weight stacked over layers; a bias the spec leaves out stacks as zeros."""
        ts = [getattr(getattr(b, part), name) for b in self.blocks]
        if ts[0] is None:
            return torch.zeros(len(ts), *self._bias_shape(name), dtype=self.cfg.dtype, device=self.W_E.device)
        return torch.stack(ts)

    def _bias_shape(self, name: str) -> tuple:
        c = self.cfg
        return {"b_Q": (c.n_heads, c.d_head), "b_K": (c.n_kv_heads, c.d_head),
                "b_V": (c.n_kv_heads, c.d_head), "b_O": (c.d_model,), "b_in": (c.d_mlp,), "b_gate": (c.d_mlp,),
                "b_out": (c.d_model,)}[name]

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[n_layers, n_heads, d_model, d_head]")
    # Under grouped-query attention the stacked key/value weights repeat each key/value head for
    # the query heads that read it, [n_layers, n_heads, ...], as TransformerLens's W_K does; the
    # parameters themselves, blocks[l].attn.W_K, hold one per key/value head.
    W_K = property(lambda self: self._per_query_head(self._stack("attn", "W_K")),
                   doc="[n_layers, n_heads, d_model, d_head] (key/value heads repeated under GQA)")
    W_V = property(lambda self: self._per_query_head(self._stack("attn", "W_V")),
                   doc="[n_layers, n_heads, d_model, d_head] (key/value heads repeated under GQA)")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[n_layers, n_heads, d_head, d_model]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[n_layers, n_heads, d_head]")
    b_K = property(lambda self: self._per_query_head(self._stack("attn", "b_K")),
                   doc="[n_layers, n_heads, d_head] (key/value heads repeated under GQA)")
    b_V = property(lambda self: self._per_query_head(self._stack("attn", "b_V")),
                   doc="[n_layers, n_heads, d_head] (key/value heads repeated under GQA)")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[n_layers, d_model]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[n_layers, d_model, d_mlp]")
    W_gate = property(lambda self: self._stack("mlp", "W_gate"), doc="[n_layers, d_model, d_mlp] (gated MLPs)")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[n_layers, d_mlp]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[n_layers, d_mlp, d_model]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[n_layers, d_model]")
    W_E = property(lambda self: self.embed.W_E, doc="[d_vocab, d_model]")
    W_pos = property(lambda self: self.pos_embed.W_pos, doc="[n_ctx, d_model]")
    W_U = property(lambda self: self.unembed.W_U, doc="[d_model, d_vocab]")
    b_U = property(lambda self: self.unembed.b_U if self.unembed.b_U is not None else
                   torch.zeros(self.cfg.d_vocab, dtype=self.W_E.dtype, device=self.W_E.device),
                   doc="[d_vocab] (zeros where the model has no unembedding bias)")

    @property
    def QK(self):
        """The paper's QK circuit W_Q W_Kᵀ per head, factored: [n_layers, n_heads, d_model, d_model]."""
        from lens.factored import FactoredMatrix
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        """The paper's OV circuit W_V W_O per head, factored: [n_layers, n_heads, d_model, d_model]."""
        from lens.factored import FactoredMatrix
        return FactoredMatrix(self.W_V, self.W_O)

    def _per_query_head(self, W: Tensor) -> Tensor:
        """[n_layers, n_kv_heads, ...] weights repeated to one per query head (GQA): query head h
        reads key/value head h // (n_heads // n_kv_heads)."""
        return per_query_head(W, self.cfg.n_heads // self.cfg.n_kv_heads, axis=1)

    def why_absent(self, name: str) -> Optional[str]:
        """Why a hook point that other architectures have is not built in this one."""
        cfg, leaf = self.cfg, name.rsplit(".", 1)[-1]
        m = re.fullmatch(r"blocks\.(\d+)\..*", name)
        if m and int(m.group(1)) >= cfg.n_layers:
            return f"the model has {cfg.n_layers} blocks (layers 0 to {cfg.n_layers - 1})"
        reasons = [
            (leaf == "hook_resid_mid" and cfg.parallel_attn_mlp and cfg.has_mlp,
             "attention and MLP run in parallel on the block's input (parallel_attn_mlp), so "
             "there is no stream between them; the MLP reads hook_resid_pre (hook_mlp_in)"),
            ((".mlp." in name or leaf in ("hook_mlp_in", "hook_mlp_out", "hook_resid_mid")
              or ".ln2." in name) and not cfg.has_mlp, "the model is attention-only"),
            (leaf == "hook_pre_linear" and not cfg.gated_mlp,
             "the MLP is not gated: hook_pre is its only pre-activation"),
            (leaf in ("hook_rot_q", "hook_rot_k") and not cfg.rotary_dim,
             "the model has no rotary positions"),
            (leaf == "hook_pos_embed" and not cfg.positional_embedding,
             "the model has no learned positional embedding"
             + (" (its positions are rotary: see attn.hook_rot_q / hook_rot_k)" if cfg.rotary_dim else "")),
            ((".ln" in name or name.startswith("ln_final")) and cfg.normalization is None,
             "the model has no norms (normalization=None)"),
            (("q_norm" in name or "k_norm" in name) and cfg.qk_norm != "head",
             "the model has no QK-norm per head" + (" (its QK-norm is attn.q_ln / k_ln, over the whole "
                                                   "projection)" if cfg.qk_norm == "proj" else "")),
            (("q_ln" in name or "k_ln" in name) and cfg.qk_norm != "proj",
             "the model has no QK-norm over the whole projection"),
            ((".ln1." in name or ".ln2." in name) and not cfg.pre_norms,
             "no norm precedes the sublayers (pre_norms=False): they read the stream itself"),
            ((leaf in ("hook_attn_out_pre", "hook_mlp_out_pre") or "_post." in name)
             and not cfg.post_norms,
             "no norm follows the sublayers (post_norms=False): hook_attn_out / hook_mlp_out are "
             "their outputs"),
        ]
        return next((why for applies, why in reasons if applies), None)

    def token_ids(self, tokens, what: str = "tokens") -> Int[Tensor, "..."]:
        """Token ids (an int, a string that is one token, a list of them, or an integer tensor)
        as a long tensor on the unembedding's device, checked against d_vocab."""
        if isinstance(tokens, np.ndarray):
            tokens = torch.as_tensor(tokens)
        if isinstance(tokens, Tensor) and (tokens.is_floating_point() or tokens.dtype == torch.bool):
            raise ValueError(f"{what} must be integer token ids, got a {tokens.dtype} tensor")

        def one(t):
            if isinstance(t, str):
                return self.to_single_token(t)
            if isinstance(t, (bool, float, complex)) or (isinstance(t, Tensor) and (
                    t.is_floating_point() or t.dtype == torch.bool)) or not hasattr(t, "__index__"):
                raise ValueError(f"{what} must be token ids (ints) or one-token strings, got "
                                 f"{t!r:.60} ({type(t).__name__})")
            return int(t)

        if isinstance(tokens, (list, tuple)):
            tokens = [one(t) for t in tokens]
        elif not isinstance(tokens, Tensor):
            tokens = one(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.W_E.device)
        if ids.numel() == 0:
            raise ValueError(f"{what} is empty; give one token id per prompt")
        bad = ids[(ids < 0) | (ids >= self.cfg.d_vocab)]
        if bad.numel():
            raise ValueError(f"{what} {bad.tolist()} outside [0, d_vocab={self.cfg.d_vocab})")
        return ids

    def logit_direction(self, tokens, wrong_tokens=None) -> Float[Tensor, "... d_model"]:
        """W_U[:, tokens] − W_U[:, wrong_tokens] (just W_U[:, tokens] without wrong tokens), d_model
        last: the direction of the final normalised stream whose dot product is the logit
        difference, less the b_U difference. Both direct logit attributions (the cache's
        logit_attrs and lens.attribution) read it from here."""
        W_U = self.W_U.detach()
        direction = W_U[:, self.token_ids(tokens)].movedim(0, -1)
        if wrong_tokens is not None:
            direction = direction - W_U[:, self.token_ids(wrong_tokens, "wrong_tokens")].movedim(0, -1)
        return direction

    # ------------------------------------------------------------------ input
    def check_tokens(self, tokens) -> Int[Tensor, "batch pos"]:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be an integer tensor [batch, pos] (or a string when the "
                            f"model has a tokenizer), got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}; "
                            "to feed a residual stream use start_at_layer=")
        if tokens.is_meta:
            raise ValueError("tokens are on the meta device, which holds no values; give token ids "
                             f"on {self.W_E.device} or the CPU")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos] or [pos], got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if n > self.cfg.n_ctx:
            raise ValueError(f"sequence of {n} tokens exceeds n_ctx={self.cfg.n_ctx}")
        if n == 0:
            raise ValueError("tokens has 0 positions; give at least one token")
        if tokens.shape[0] == 0:
            raise ValueError("tokens has a batch of 0 rows; give at least one sequence")
        if tokens.dtype != torch.long:  # uint8, int8, int16, int32 ids: embedding takes long
            tokens = tokens.long()
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, d_vocab={self.cfg.d_vocab})")
        return tokens.to(self.W_E.device)

    def _mask_and_positions(self, batch: int, n: int, attention_mask: Optional[Tensor], device):
        """Absolute positions and, for padded batches, the [batch, 1, q, k] attention mask."""
        if attention_mask is None:
            return torch.arange(n, device=device).expand(batch, n), None
        am = check_mask(attention_mask, device)
        if am.shape != (batch, n):
            raise ValueError(f"attention_mask has shape {tuple(am.shape)}, expected {(batch, n)}")
        return padding_mask(am)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: Union[Tensor, str, list],
        return_type: Optional[str] = "logits",
        *,
        attention_mask: Union[Tensor, np.ndarray, list, None] = None,
        stop_at_layer: Optional[int] = None,
        start_at_layer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
        loss_per_token: bool = False,
        past_kv: Optional[KVCache] = None,
        past_kv_cache: Optional[KVCache] = None,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ):
        """Logits [batch, pos, d_vocab], loss, both, or None; or the residual stream
        [batch, pos, d_model] before block `stop_at_layer` when that is given.

        `start_at_layer=l` takes the residual stream entering block l instead of tokens (pass
        `tokens=` too for a loss). `attention_mask` [batch, pos] marks real tokens in a padded
        batch; positions then count real tokens only.

        `past_kv` (a lens.generate.KVCache; `past_kv_cache` is TransformerLens's name for it)
        holds the keys and values of earlier tokens: only the new tokens run, at the positions
        after the cached ones, and join the cache; `attention_mask` then covers cached and new
        tokens (see KVCache). `prepend_bos` and `padding_side` apply to string input (None:
        model.default_prepend_bos and the tokenizer's padding_side).
        """
        if past_kv_cache is not None:
            if past_kv is not None:
                raise ValueError("give past_kv or past_kv_cache (the same thing), not both")
            past_kv = past_kv_cache
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type={return_type!r}; valid values are {RETURN_TYPES}")
        if attention_mask is not None:
            attention_mask = check_mask(attention_mask, self.W_E.device)
        L = self.cfg.n_layers
        start = _layer_index(start_at_layer, L, "start_at_layer") if start_at_layer is not None else 0
        stop = _layer_index(stop_at_layer, L, "stop_at_layer") if stop_at_layer is not None else L
        if stop < start:
            raise ValueError(f"stop_at_layer={stop_at_layer} comes before start_at_layer="
                             f"{start_at_layer}: no block would run (stop must be >= start)")
        if start == 0 and start_at_layer is None:
            if isinstance(input, (str, list)) and not isinstance(input, Tensor):
                input, mask_of_text = self.to_tokens_with_mask(input, prepend_bos, padding_side)
                if attention_mask is None and input.shape[0] > 1:
                    attention_mask = mask_of_text
            tokens = self.check_tokens(input)
            batch, n = tokens.shape
            if past_kv is not None and not isinstance(past_kv, KVCache):
                raise TypeError(f"past_kv must be a lens KVCache (KVCache({L}) or "
                                f"KVCache.init_cache(model.cfg, ...)), got {type(past_kv).__name__}")
            if past_kv is None:
                positions, mask = self._mask_and_positions(batch, n, attention_mask, tokens.device)
            else:
                if stop != L:
                    raise ValueError(f"past_kv runs every block; stop_at_layer={stop_at_layer} "
                                     f"must then be None or n_layers={L}")
                if len(past_kv.layers) != L:
                    raise ValueError(f"past_kv holds {len(past_kv.layers)} layers; this model has {L} "
                                     f"(make it with KVCache({L}) or KVCache.init_cache(model.cfg, ...))")
                positions, mask = past_kv.prepare(batch, n, attention_mask, self.cfg.n_ctx, tokens.device)
            resid = None
        else:
            if past_kv is not None and not (isinstance(past_kv, KVCache) and past_kv.frozen):
                raise ValueError("with start_at_layer past_kv must be a frozen KVCache (cache.freeze()): "
                                 "the blocks before start_at_layer would not add to it")
            resid = input
            if not isinstance(resid, Tensor) or resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
                got = tuple(resid.shape) if isinstance(resid, Tensor) else type(resid).__name__
                raise ValueError(f"with start_at_layer={start_at_layer} the input is the residual "
                                 f"stream [batch, pos, d_model={self.cfg.d_model}], got {got}")
            if resid.dtype != self.cfg.dtype:
                raise TypeError(f"with start_at_layer={start_at_layer} the residual stream must be "
                                f"{self.cfg.dtype} (the model's dtype), got {resid.dtype}"
                                + ("; token ids go in without start_at_layer" if not
                                   resid.is_floating_point() else "; convert it with .to(model.cfg.dtype)"))
            if resid.shape[0] == 0 or resid.shape[1] == 0:
                raise ValueError(f"the residual stream has shape {tuple(resid.shape)}; give at least "
                                 "one sequence of one position")
            if resid.shape[1] > self.cfg.n_ctx:
                raise ValueError(f"residual stream of {resid.shape[1]} positions exceeds "
                                 f"n_ctx={self.cfg.n_ctx}")
            if resid.is_meta:
                raise ValueError("the residual stream is on the meta device, which holds no values")
            resid = resid.to(self.W_E.device)
            if tokens is not None:
                tokens = self.check_tokens(tokens)
            batch, n = resid.shape[:2]
            if past_kv is None:
                positions, mask = self._mask_and_positions(batch, n, attention_mask, resid.device)
            else:  # a suffix of the sequence: the prefix's keys and values are in past_kv
                if len(past_kv.layers) != L:
                    raise ValueError(f"past_kv holds {len(past_kv.layers)} layers; this model has {L}")
                positions, mask = past_kv.prepare(batch, n, attention_mask, self.cfg.n_ctx, resid.device)
        run = self.make_run(positions, mask)
        token = POSITIONS.set(positions)
        try:
            if resid is None:
                resid = self.embed_stage(tokens, positions)
            if past_kv is None:
                for block in self.blocks[start:stop]:
                    resid = block(resid, run)
            else:
                for block, entry in zip(self.blocks[start:stop], past_kv.layers[start:stop]):
                    resid = block(resid, run, entry)
            if stop_at_layer is not None:
                return resid
            logits = self.unembed_stage(resid)
        finally:
            POSITIONS.reset(token)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise ValueError("a loss needs the tokens: pass tokens= together with start_at_layer")
        loss = lm_loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    # ------------------------------------------------------------------ stages
    def make_run(self, positions: Int[Tensor, "batch pos"], mask: Optional[Tensor] = None) -> Run:
        """The per-call facts every block reads: positions, padding mask, rotary angles."""
        dtype = self.W_E.dtype
        rope = None if self.rotary is None else self.rotary.angles(positions, dtype)
        local = None if self.rotary_local is None else self.rotary_local.angles(positions, dtype)
        return Run(positions, mask, rope, local)

    def embed_stage(self, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, "batch pos"]
                    ) -> Float[Tensor, "batch pos d_model"]:
        """The stream entering block 0: token embedding (plus learned positions)."""
        resid = self.hook_embed.run(self.embed(tokens))
        if self.cfg.positional_embedding:
            resid = resid + self.hook_pos_embed.run(self.pos_embed(positions))
        return resid

    def unembed_stage(self, resid: Float[Tensor, "batch pos d_model"],
                      positions: Optional[Tensor] = None,
                      tokens: Optional[Int[Tensor, "n"]] = None) -> Float[Tensor, "batch pos d_vocab"]:
        """The final norm, the unembedding (and the final soft-cap) and hook_logits on the stream
        after the last block.
        `positions` (when given) are what hook.positions reports during this stage; `tokens`
        (when given) are the vocabulary entries returned, [batch, pos, n]: only those columns
        of W_U are computed, unless a hook on hook_logits needs the whole rows."""
        token = None if positions is None else POSITIONS.set(positions)
        try:
            if self.ln_final is not None:
                resid = self.ln_final(resid)
            part = tokens is not None and not self.hook_logits.active
            logits = self.unembed.columns(resid, tokens) if part else self.unembed(resid)
            if self.cfg.final_softcap is not None:
                logits = softcap(logits, self.cfg.final_softcap)
            if part:
                return logits
            logits = self.hook_logits.run(logits)
            return logits if tokens is None else logits[..., tokens]
        finally:
            if token is not None:
                POSITIONS.reset(token)

    def run_with_cache(self, *args, **kwargs) -> tuple[Optional[Tensor], ActivationCache]:
        """Forward that stores activations; see lens.cache.run_with_cache for the arguments."""
        return run_with_cache(self, *args, **kwargs)

    # ------------------------------------------------------------------ sparse dictionaries (lens.sae)
    def saes(self, saes, use_error_term: bool = False):
        """A `with` block with SAEs / transcoders spliced into the forward pass (lens.sae.saes)."""
        from lens.sae import saes as splice
        return splice(self, saes, use_error_term=use_error_term)

    def run_with_saes(self, *args, saes=(), use_error_term: bool = False, **kwargs):
        """The forward with `saes` spliced for this call (SAELens's name)."""
        from lens.sae import run_with_saes
        return run_with_saes(self, *args, saes=saes, use_error_term=use_error_term, **kwargs)

    def run_with_cache_with_saes(self, *args, saes=(), use_error_term: bool = False, **kwargs):
        """run_with_cache with `saes` spliced; their hook points are cached like any other."""
        from lens.sae import run_with_cache_with_saes
        return run_with_cache_with_saes(self, *args, saes=saes, use_error_term=use_error_term, **kwargs)

    # ------------------------------------------------------------------ generation (lens.generate)
    def generate(self, input, max_new_tokens: int = 10, **kwargs):
        """Continue a string, a list of strings or tokens, with hooks active at every step and a
        KV cache (temperature, top_k, top_p, seed, stop_at_eos, return_cache, fwd_hooks, ...;
        a steering example is in lens.generate.generate's docstring)."""
        from lens.generate import generate
        return generate(self, input, max_new_tokens, **kwargs)

    def generate_stream(self, input, max_new_tokens: int = 10, **kwargs):
        """generate, yielding each step's new tokens; see lens.generate.stream."""
        from lens.generate import stream
        return stream(self, input, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ loading (lens.loading)
    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "HookedGPT":
        """Load a GPT-2-family checkpoint (HF dir or file, hub cache) or a lens checkpoint, with
        TransformerLens's weight processing (fold_ln, center_writing_weights, center_unembed,
        fold_value_biases; each a keyword). See lens.loading.from_pretrained."""
        from lens.loading import from_pretrained
        return from_pretrained(name_or_path, **kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, name_or_path, **kwargs) -> "HookedGPT":
        """from_pretrained with the weights exactly as stored (no folding or centring)."""
        from lens.loading import from_pretrained
        return from_pretrained(name_or_path, process=False, **kwargs)

    def save(self, path, storage_dtype=None):
        """Save as a lens checkpoint directory (lens_config.json + model.safetensors), the
        tensors optionally stored in a smaller dtype (they load back as cfg.dtype)."""
        from lens.loading import save
        return save(self, path, storage_dtype)

    # ------------------------------------------------------------------ tokenizer
    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass tokens as an integer tensor or "
                             "load one with lens.tokenizer.load_tokenizer() and set model.tokenizer")
        return self.tokenizer

    def to_tokens(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                  move_to_device: bool = True, truncate: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokens [batch, pos] of a string or a list of strings (padded on padding_side), the
        first n_ctx of each (truncate=False raises instead), as TransformerLens. None:
        model.default_prepend_bos, and the tokenizer's padding_side."""
        from lens import tokenizer as T
        tokens = T.to_tokens(self._tok(), input, prepend_bos=self._bos(prepend_bos),
                             padding_side=self._side(padding_side), truncate=truncate,
                             n_ctx=self.cfg.n_ctx)
        return tokens.to(self.W_E.device) if move_to_device else tokens

    def to_tokens_with_mask(self, input, prepend_bos: Optional[bool] = None,
                            padding_side: Optional[str] = None
                            ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokens of a string or a batch of strings, padded, with the mask of real tokens."""
        from lens import tokenizer as T
        tokens, mask = T.to_tokens_with_mask(self._tok(), input, prepend_bos=self._bos(prepend_bos),
                                             padding_side=self._side(padding_side), n_ctx=self.cfg.n_ctx)
        return tokens.to(self.W_E.device), mask.to(self.W_E.device)

    def _bos(self, prepend_bos: Optional[bool]) -> bool:
        return self.default_prepend_bos if prepend_bos is None else prepend_bos

    def _side(self, padding_side: Optional[str]) -> Optional[str]:
        """The side to pad on: as asked, else the model's default_padding_side if it was set
        (from_pretrained(default_padding_side=)), else the tokenizer's padding_side."""
        return padding_side if padding_side is not None else vars(self).get("default_padding_side")

    def to_str_tokens(self, input, prepend_bos: Optional[bool] = None):
        from lens import tokenizer as T
        return T.to_str_tokens(self._tok(), input, prepend_bos=self._bos(prepend_bos))

    def to_string(self, tokens):
        from lens import tokenizer as T
        return T.to_string(self._tok(), tokens)

    def to_single_token(self, string: str) -> int:
        from lens import tokenizer as T
        return T.to_single_token(self._tok(), string)

    def get_token_position(self, single_token, input, mode: str = "first",
                           prepend_bos: Optional[bool] = None) -> int:
        from lens import tokenizer as T
        return T.get_token_position(self._tok(), single_token, input, mode=mode,
                                    prepend_bos=self._bos(prepend_bos))

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes an int token id, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    # ------------------------------------------------------------------ TransformerLens's helpers
    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]
                                      ) -> Float[Tensor, "... d_model"]:
        """The unembedding column W_U[:, t] of each token: [d_model] for one token (a str, an
        int, a one-element tensor), [..., d_model] for a tensor of ids. On a model whose final
        norm is not folded this is not the whole map from the stream to the logit."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            ids = self.check_tokens(tokens.long().reshape(1, -1)).reshape(tokens.shape)
            return self.W_U[:, ids].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        elif isinstance(tokens, int) and not isinstance(tokens, bool):
            token = tokens
        else:
            raise TypeError(f"tokens must be a str, an int or a tensor of ids, got {type(tokens).__name__}")
        self.check_tokens(torch.tensor([[token]]))
        return self.W_U[:, token]

    def input_to_embed(self, input, prepend_bos: Optional[bool] = None,
                       padding_side: Optional[str] = None, attention_mask: Optional[Tensor] = None):
        """(resid_pre of block 0, tokens, None, attention_mask), as TransformerLens returns them
        (the third is its shortformer positions, which lens does not have): feed the stream to
        forward(..., start_at_layer=0)."""
        if isinstance(input, (str, list)):
            tokens, mask = self.to_tokens_with_mask(input, prepend_bos, padding_side)
            if attention_mask is None and (isinstance(input, list) and len(input) > 1):
                attention_mask = mask
        else:
            tokens = input[None] if isinstance(input, Tensor) and input.ndim == 1 else input
        tokens = self.check_tokens(tokens)
        positions, _ = self._mask_and_positions(*tokens.shape, attention_mask, tokens.device)
        token = POSITIONS.set(positions)
        try:
            return self.embed_stage(tokens, positions), tokens, None, attention_mask
        finally:
            POSITIONS.reset(token)

    def loss_fn(self, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                attention_mask: Optional[Tensor] = None, per_token: bool = False):
        """Next-token cross-entropy, as forward(return_type="loss") computes it."""
        return lm_loss(logits, tokens, attention_mask, per_token=per_token)

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, fold_value_biases: bool = True,
                         refactor_factored_attn_matrices: bool = False) -> "HookedGPT":
        """TransformerLens's in-place weight processing (see lens.processing.process_weights;
        steps that do not fit the architecture are skipped)."""
        from lens.processing import process_weights, refactor_factored_attn_matrices as refactor
        process_weights(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                        strict=False)
        if refactor_factored_attn_matrices:
            refactor(self)
        return self

    def load_and_process_state_dict(self, state_dict: dict, fold_ln: bool = True,
                                    center_writing_weights: bool = True, center_unembed: bool = True,
                                    fold_value_biases: bool = True,
                                    refactor_factored_attn_matrices: bool = False) -> None:
        """Load a state dict of this architecture, with TransformerLens's processing applied on
        the way in. Into a model with norm weights the dict loads as it is and the model is
        processed in place (its norms become weightless where folded); into a weightless
        ("LNPre" / "RMSPre") model, a dict with norm weights is processed first, as
        TransformerLens's method does for a model built with folding in mind."""
        import dataclasses
        from lens.processing import applied_steps, process_weights, refactor_factored_attn_matrices as refactor
        flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                     center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        weightless = self.cfg.normalization in ("LNPre", "RMSPre")
        if weightless and any(k.endswith(("ln1.w", "ln_final.w")) for k in state_dict):
            sd = {k: v.detach().clone() for k, v in state_dict.items()}
            source = dataclasses.replace(self.cfg, normalization=self.cfg.norm_kind)
            process_weights(sd, source, **flags, strict=False)
            if refactor_factored_attn_matrices:
                refactor(sd, dataclasses.replace(source, normalization=self.cfg.normalization))
            missing = sorted(set(self.state_dict()) - set(sd))
            extra = sorted(set(sd) - set(self.state_dict()))
            if missing or extra:
                raise ValueError(f"the processed state dict does not fit this model: missing "
                                 f"{missing[:6]}, unexpected {extra[:6]}")
            self.load_state_dict(sd)
            return
        self.load_state_dict(state_dict)
        if not applied_steps(self):
            self.process_weights_(**flags, refactor_factored_attn_matrices=refactor_factored_attn_matrices)

    def refactor_factored_attn_matrices(self) -> None:
        """TransformerLens's refactoring of W_Q/W_K and W_V/W_O (lens.processing)."""
        from lens.processing import refactor_factored_attn_matrices
        refactor_factored_attn_matrices(self)


def lm_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
            attention_mask: Optional[Tensor] = None, per_token: bool = False):
    """Next-token cross-entropy (float32), averaged over the real predictions: those made at
    a real token of a real next token (so a left pad's prediction of the first token is not
    counted, whichever side the padding is on)."""
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match logits {tuple(logits.shape[:2])}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    if per_token:
        return nll
    if attention_mask is None:
        return nll.mean()
    real = attention_mask.to(nll.device, torch.bool)
    keep = real[:, 1:] & real[:, :-1]  # a real prediction of a real token: not from a pad
    return nll[keep].mean()


def check_mask(attention_mask, device) -> Tensor:
    """An attention mask ([batch, pos]: 1 or True at real tokens, 0 or False at pads; a tensor,
    numpy array or nested list) as a bool tensor on `device`, refused when it holds anything
    but 0 and 1."""
    am = attention_mask
    if not isinstance(am, Tensor):
        try:
            am = torch.as_tensor(np.asarray(am))
        except (TypeError, ValueError) as e:
            raise TypeError(f"attention_mask must be a [batch, pos] tensor of 0/1 or bools, got "
                            f"{type(attention_mask).__name__} ({e})") from None
    if am.dtype != torch.bool:
        if am.is_complex():
            raise TypeError(f"attention_mask must hold 0/1 or bools, got dtype {am.dtype}")
        bad = am[(am != 0) & (am != 1)]  # NaN included
        if bad.numel():
            raise ValueError(f"attention_mask must hold only 0 (pad) and 1 (real token); it holds "
                             f"{bad[:5].tolist()}")
    return am.to(device=device, dtype=torch.bool)


def _layer_index(layer: int, n_layers: int, what: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer <= n_layers:
        raise ValueError(f"{what}={layer!r} must be an int in [-{n_layers}, {n_layers}]")
    return layer % n_layers if layer < 0 else layer


class _Embed(nn.Module):
    """W_E[tokens], times embed_scale (in the weights' dtype, as HF's Gemma) when it is not 1."""

    def __init__(self, d_vocab: int, d_model: int, dtype, scale: float = 1.0):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model, dtype=dtype))
        self.scale = float(scale)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        out = F.embedding(tokens, self.W_E)
        return out if self.scale == 1.0 else out * torch.tensor(self.scale, dtype=out.dtype)


class _PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int, dtype):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model, dtype=dtype))

    def forward(self, positions: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(positions, self.W_pos)


class _Unembed(nn.Module):
    """x @ W_U (+ b_U). Tied to the embedding (`tied_to`), W_U is W_Eᵀ: one tensor, not a copy."""

    def __init__(self, d_model: int, d_vocab: int, dtype, bias: bool = True,
                 tied_to: Optional[_Embed] = None):
        super().__init__()
        self._tied = [tied_to] if tied_to is not None else None  # a list: not a submodule
        if tied_to is None:
            self.W_U = weight((d_model, d_vocab), (1, 0), dtype)
        self.b_U = nn.Parameter(torch.zeros(d_vocab, dtype=dtype)) if bias else None

    def add_bias(self) -> None:
        """Give the unembedding a (zero) bias, e.g. before processing folds a norm's bias into it."""
        if self.b_U is None:
            W_E = self._tied[0].W_E if self._tied is not None else self.W_U
            self.b_U = nn.Parameter(torch.zeros(W_E.shape[0] if self._tied is not None else W_E.shape[1],
                                                dtype=W_E.dtype, device=W_E.device))

    @property
    def tied(self) -> bool:
        return self._tied is not None

    def __getattr__(self, name: str):
        if name == "W_U" and self.__dict__.get("_tied") is not None:
            return self._tied[0].W_E.T
        return super().__getattr__(name)

    def untie(self) -> None:
        """Give W_U its own memory (a copy of W_Eᵀ), e.g. before processing changes it."""
        if self._tied is None:
            return
        W_E = self._tied[0].W_E.detach()
        self._tied = None
        W_U = weight((W_E.shape[1], W_E.shape[0]), (1, 0), W_E.dtype).to(W_E.device)
        with torch.no_grad():
            W_U.copy_(W_E.T)
        self.W_U = W_U

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        if self._tied is not None:
            return F.linear(x, self._tied[0].W_E, self.b_U)
        return F.linear(x, self.W_U.T, self.b_U)

    def columns(self, x: Float[Tensor, "batch pos d_model"],
                tokens: Int[Tensor, "n"]) -> Float[Tensor, "batch pos n"]:
        """The logits of `tokens` only: x @ W_U[:, tokens] (+ b_U[tokens])."""
        W = self._tied[0].W_E[tokens] if self._tied is not None else self.W_U[:, tokens].T
        return F.linear(x, W, None if self.b_U is None else self.b_U[tokens])
