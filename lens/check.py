"""Check a loaded HookedGPT against its checkpoint: the largest log-prob difference from
transformers' model of the same files, and the residual-stream identities on the lens model.
`check(model, path)` returns a CheckReport; `lens check PATH` prints it (exit 0 pass, 1 fail)."""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens.loading import _resolve
from lens.model import HookedGPT
from lens.processing import applied_steps

PROMPTS = ("The quick brown fox jumps over the lazy dog.",
           "When Mary and John went to the store, John gave a drink to",
           "The capital of France is Paris, and the capital of Germany is",
           "1, 2, 3, 4, 5, 6,")
N_RANDOM, RANDOM_LEN, RANDOM_SEED = 3, 12, 0
# the largest |log-prob difference| allowed, by the lens model's dtype (HF runs in float32)
LOG_PROB_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}
# the largest identity error allowed, relative to the largest |entry| of the right-hand side
IDENTITY_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

RESID_POST = "resid_post = resid_pre + attn_out + mlp_out"
RESID_POST_ATTN_ONLY = "resid_post = resid_pre + attn_out"
RESID_MID = "resid_mid = resid_pre + attn_out"
HEADS = "Σ_heads hook_result + b_O = attn_out (through a post-norm, its scale frozen)"
DECOMPOSE = "decompose_resid().sum(0) = final resid_post"

Tokens = Union[str, Sequence[int], Tensor]


@dataclass
class CheckReport:
    """What `check` measured. log_prob_diff is max |log p_lens - log p_HF| over every prompt,
    position and vocabulary entry (None when there was no HF model to compare with, hf_note
    says why); identity_errors maps each identity to its largest error relative to the scale
    of its right-hand side, identity_where to the layer and prompt where it was largest."""

    path: str
    model: str
    processing: list[str]
    inputs: str
    log_prob_diff: Optional[float]
    log_prob_tol: float
    identity_errors: dict[str, float]
    identity_tol: float
    identity_where: dict[str, str] = field(default_factory=dict)
    hf_note: Optional[str] = None

    @property
    def log_prob_ok(self) -> Optional[bool]:
        """Whether lens matches HF within log_prob_tol; None when not compared."""
        return None if self.log_prob_diff is None else bool(self.log_prob_diff <= self.log_prob_tol)

    @property
    def identities_ok(self) -> bool:
        return all(e <= self.identity_tol for e in self.identity_errors.values())

    @property
    def ok(self) -> bool:
        """Every figure within its tolerance (a skipped HF comparison does not fail)."""
        return self.log_prob_ok is not False and self.identities_ok

    def __str__(self) -> str:
        lines = [f"lens check {self.path}", f"  model       {self.model}",
                 f"  processing  {', '.join(self.processing) or 'none'}",
                 f"  inputs      {self.inputs}", self._log_prob_line(),
                 f"  identities (max error relative to scale, tol {self.identity_tol:.0e}):"]
        width = max(map(len, self.identity_errors), default=0)
        for name, err in self.identity_errors.items():
            worst = f"  (worst: {self.identity_where[name]})" if (
                err > self.identity_tol and name in self.identity_where) else ""
            verdict = _verdict(err <= self.identity_tol)
            lines.append(f"    {name:<{width}}  {err:.2e}  {verdict}{worst}")
        lines.append(f"  {_verdict(self.ok)}")
        return "\n".join(lines)

    def _log_prob_line(self) -> str:
        if self.log_prob_diff is None:
            return f"  log-probs vs HF: SKIPPED ({self.hf_note})"
        return (f"  log-probs vs HF: max |diff| {self.log_prob_diff:.2e} "
                f"(tol {self.log_prob_tol:.0e})  {_verdict(self.log_prob_ok)}")


def _verdict(passed: Optional[bool]) -> str:
    return "PASS" if passed else "FAIL"


# ---------------------------------------------------------------------- entry point
def check(model: HookedGPT, path: Union[str, os.PathLike],
          prompts: Optional[Sequence[Tokens]] = None, *, log_prob_tol: Optional[float] = None,
          identity_tol: Optional[float] = None,
          hf_model: Optional[torch.nn.Module] = None) -> CheckReport:
    """Compare the lens `model` with the checkpoint at `path` and check its residual identities.

    prompts: strings (needs model.tokenizer), token id lists or 1-d tensors; default the built-in
    English prompts through the model's tokenizer, or fixed random ids when it has none. The HF
    model is loaded with transformers.AutoModelForCausalLM.from_pretrained(path) in float32
    (pass hf_model= to reuse one); without transformers, or for a checkpoint transformers cannot
    read (lens format, a lone weights file), only the identities are checked. Tolerances default
    by the lens model's dtype (LOG_PROB_TOL, IDENTITY_TOL).
    """
    folder = _resolve(path)  # a bad path raises the loader's ValueError here
    seqs, inputs = _sequences(model, prompts)
    dtype = model.cfg.dtype
    hf, note = (hf_model, None) if hf_model is not None else _load_hf(folder, model.W_E.device)
    diff = None if hf is None else max(_log_prob_diff(model, hf, s) for s in seqs)
    errors, where = _identities(model, seqs)
    return CheckReport(
        path=str(path), model=_describe(model, folder), processing=applied_steps(model),
        inputs=inputs, log_prob_diff=diff,
        log_prob_tol=LOG_PROB_TOL.get(dtype, 1e-4) if log_prob_tol is None else log_prob_tol,
        identity_errors=errors, identity_where=where,
        identity_tol=IDENTITY_TOL.get(dtype, 1e-5) if identity_tol is None else identity_tol,
        hf_note=note)


# ---------------------------------------------------------------------- inputs
def _sequences(model: HookedGPT, prompts: Optional[Sequence[Tokens]]) -> tuple[list[Tensor], str]:
    """The token sequences to run (each [1, pos] on the model's device) and how they were made."""
    device = model.W_E.device
    if prompts is not None:
        if isinstance(prompts, (str, Tensor)) or len(prompts) == 0:
            raise ValueError(f"prompts is a non-empty list of strings or token sequences, got "
                             f"{prompts!r}")
        seqs = [_tokens_of(model, p) for p in prompts]
        return [s.to(device) for s in seqs], f"{len(seqs)} given prompts, {_count(seqs)} tokens"
    if model.tokenizer is not None:
        seqs = [model.to_tokens(p, truncate=True) for p in PROMPTS]
        if all(int(s.max()) < model.cfg.d_vocab for s in seqs):
            return seqs, (f"{len(seqs)} built-in prompts through the model's tokenizer, "
                          f"{_count(seqs)} tokens")
    g = torch.Generator().manual_seed(RANDOM_SEED)
    n = min(RANDOM_LEN, model.cfg.n_ctx)
    seqs = [torch.randint(0, model.cfg.d_vocab, (1, n), generator=g).to(device)
            for _ in range(N_RANDOM)]
    why = "no tokenizer" if model.tokenizer is None else "tokenizer ids exceed d_vocab"
    return seqs, f"{N_RANDOM} random id sequences of {n} tokens (seed {RANDOM_SEED}; {why})"


def _tokens_of(model: HookedGPT, prompt: Tokens) -> Int[Tensor, "1 pos"]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError(f"prompt {prompt!r} is text, but the model has no tokenizer; pass "
                             "token ids instead")
        return model.to_tokens(prompt, truncate=True)
    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token ids must be a non-empty sequence in [0, d_vocab="
                         f"{model.cfg.d_vocab}), got {ids.tolist()[0]}")
    if ids.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens exceeds n_ctx={model.cfg.n_ctx}")
    return ids


def _count(seqs: list[Tensor]) -> int:
    return sum(s.shape[1] for s in seqs)


def _describe(model: HookedGPT, folder: Path) -> str:
    cfg = model.cfg
    family = _model_type(folder) or "lens checkpoint"
    kv = f" ({cfg.n_kv_heads} kv)" if cfg.n_kv_heads != cfg.n_heads else ""
    block = "attention-only" if cfg.attn_only else (
        f"{'gated ' if cfg.gated_mlp else ''}d_mlp {cfg.d_mlp} {cfg.act_fn}"
        + (", parallel attn+mlp" if cfg.parallel_attn_mlp else ""))
    pos = (f"rotary {cfg.rotary_dim}" if cfg.rotary_dim else
           "learned pos" if cfg.positional_embedding else "no pos")
    if cfg.rotary_dim and cfg.local_rotary_base:
        pos += f" (base {cfg.rotary_base:g}, {cfg.local_rotary_base:g} on windowed layers)"
    layers = f"{cfg.n_layers} layer{'' if cfg.n_layers == 1 else 's'}"
    extras = [f"window {cfg.window}" + ("" if cfg.windowed_layers is None else
                                        f" on {len(cfg.windowed_layers)} layers")] if cfg.window else []
    extras += [text for on, text in ((cfg.post_norms, "post-norms"), (cfg.qk_norm, f"qk-norm {cfg.qk_norm}"),
                                     (cfg.attn_softcap, f"score cap {cfg.attn_softcap}"),
                                     (cfg.final_softcap, f"logit cap {cfg.final_softcap}")) if on]
    return (f"{family}: {layers}, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads{kv} × d_head {cfg.d_head}, "
            f"{block}, {pos}, norm {cfg.normalization}, d_vocab {cfg.d_vocab}, {cfg.dtype_name}"
            + "".join(f", {e}" for e in extras))


def _model_type(folder: Path) -> Optional[str]:
    config = (folder if folder.is_dir() else folder.parent) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------- HF comparison
def _load_hf(folder: Path, device: torch.device) -> tuple[Optional[torch.nn.Module], Optional[str]]:
    """transformers' model of the checkpoint in float32 on `device`, or (None, why not)."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed (pip install transformers)"
    if folder.is_dir() and (folder / "lens_config.json").is_file():
        return None, "a lens-format checkpoint, which transformers cannot read"
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return None, f"{folder} is not an HF checkpoint directory (no config.json)"
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return hf.to(device).eval(), None


@torch.no_grad()
def _log_prob_diff(model: HookedGPT, hf: torch.nn.Module, tokens: Int[Tensor, "1 pos"]) -> float:
    """max |log p_lens - log p_HF| over positions and the vocabulary, for one sequence."""
    hf_device = next(hf.parameters()).device
    ours = _log_probs(model(tokens))
    theirs = _log_probs(hf(tokens.to(hf_device)).logits)
    if ours.shape != theirs.shape:
        raise ValueError(f"the lens model gives logits of shape {tuple(ours.shape)}, the HF "
                         f"checkpoint {tuple(theirs.shape)}: they are not the same model")
    return float((ours - theirs).abs().max())


def _log_probs(logits: Float[Tensor, "1 pos vocab"]) -> Float[Tensor, "1 pos vocab"]:
    return logits.detach().float().cpu().log_softmax(-1)


# ---------------------------------------------------------------------- identities
def _wanted(name: str) -> bool:
    return name in ("hook_embed", "hook_pos_embed") or name.endswith(
        ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
         "attn.hook_result", "ln1_post.hook_scale"))


@torch.no_grad()
def _identities(model: HookedGPT, seqs: list[Tensor]) -> tuple[dict[str, float], dict[str, str]]:
    """Each identity's largest relative error over layers and sequences, and where it was."""
    errors: dict[str, float] = {}
    where: dict[str, str] = {}
    for i, tokens in enumerate(seqs):
        _, cache = model.run_with_cache(tokens, names_filter=_wanted)
        for name, err, layer in _sequence_errors(model, cache):
            if name not in errors or err > errors[name] or err != err:  # NaN sticks
                errors[name], where[name] = err, f"{layer}, prompt {i}"
    return errors, where


def _sequence_errors(model: HookedGPT, cache) -> list[tuple[str, float, str]]:
    """(identity, relative error, where) for every layer's identities and the decomposition."""
    out = [(name, err, f"layer {l}") for l in range(model.cfg.n_layers)
           for name, err in _block_errors(model, cache, l)]
    final = cache["resid_post", model.cfg.n_layers - 1]
    out.append((DECOMPOSE, _rel(final, cache.decompose_resid(layer=None).sum(0)), "final stream"))
    return out


def _block_errors(model: HookedGPT, cache, l: int) -> list[tuple[str, float]]:
    """Block l's identities: the stream's updates, and the heads summing to attn_out."""
    pre, attn, post = (cache[h, l] for h in ("resid_pre", "attn_out", "resid_post"))
    if model.cfg.has_mlp:
        out = [(RESID_POST, _rel(post, pre + attn + cache["mlp_out", l]))]
    else:
        out = [(RESID_POST_ATTN_ONLY, _rel(post, pre + attn))]
    if model.cfg.has_resid_mid:
        out.append((RESID_MID, _rel(cache["resid_mid", l], pre + attn)))
    # the heads' writes (through a post-norm with its scale frozen, where one follows attention)
    b_O = cache.through_post_norm(model.b_O[l].detach().to(attn.device, attn.dtype), l, "ln1_post")
    out.append((HEADS, _rel(attn, cache.head_results(l).sum(-2) + b_O)))
    return out


def _rel(actual: Float[Tensor, "*shape"], expected: Float[Tensor, "*shape"]) -> float:
    """max |actual - expected| / max |expected|, in float32 (float64 stays float64)."""
    wide = torch.float64 if actual.dtype == torch.float64 else torch.float32
    a, e = actual.to(wide), expected.to(wide)
    scale = e.abs().max().clamp_min(torch.finfo(wide).tiny)
    return float((a - e).abs().max() / scale)
