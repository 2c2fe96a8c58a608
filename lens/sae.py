"""Sparse dictionaries at hook points: sparse autoencoders (ReLU, JumpReLU, TopK, BatchTopK,
gated) and transcoders (read one hook point, write another), loaded from SAELens's or Gemma
Scope's files or lens's own, and spliced into a model so that each feature is a hook point
(`{hook}.hook_sae_acts_post`, [batch, pos, d_sae]) that caches, hooks and patches like any other.

Semantics are SAELens's (6.x): encode(x) = act((norm(x) - b_dec·apply_b_dec_to_input) W_enc +
b_enc), decode(f) = denorm(f W_dec + b_dec); weights right-multiply, W_enc [d_in, d_sae],
W_dec [d_sae, d_out] (d_out = d_in but for transcoders)."""

import json
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lens import io, sites
from lens.hooks import HookPoint

PathLike = Union[str, Path]
ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk", "gated")
# none: as is. expected_average_only_in and covariance_whitening are folded into the weights
# when SAELens's training ends, so at inference they are the identity, as in SAELens.
NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening",
                  "constant_norm_rescale", "layer_norm")
# SAELens architecture -> (activation, transcoder, skip)
ARCHITECTURES = {
    "standard": ("relu", False, False), "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False), "batchtopk": ("batchtopk", False, False),
    "gated": ("gated", False, False), "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True), "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
         "hook_sae_error", "hook_sae_output")
# Weight processing (lens.processing) and the hook points whose activation each step changes.
# lens's ln*.hook_normalized is the norm's input over its scale, before the norm's weight, so
# folding the norms changes no hook point.
_CHANGED_BY = {
    "fold_layer_norm": (),
    "center_writing_weights": ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid",
                               "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_result",
                               "hook_attn_out_pre", "hook_mlp_out_pre", "hook_mlp_in",
                               "hook_q_input", "hook_k_input", "hook_v_input"),
    "center_unembed": ("hook_logits",),
    "fold_value_biases": ("hook_v", "hook_z", "hook_result"),
    "refactor_factored_attn_matrices": ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result",
                                        "hook_rot_q", "hook_rot_k"),
}
# TransformerLens's from_pretrained keywords and the steps they stand for (all on by default)
_TL_STEPS = {"fold_ln": "fold_layer_norm", "center_writing_weights": "center_writing_weights",
             "center_unembed": "center_unembed", "fold_value_biases": "fold_value_biases"}
_LENS_CONFIG, _LENS_WEIGHTS = "lens_sae.json", "sae.safetensors"
_SAELENS_CONFIG, _SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"


def _observe(hp: HookPoint, x: Tensor, kept: Optional[list]) -> Tensor:
    """hp's hooks on x; kept[0] becomes False when one returns another tensor or edits x in
    place (inference tensors keep no version counter: counted as changed)."""
    if not hp.fwd_hooks or kept is None:
        return hp.run(x)
    version = None if x.is_inference() else x._version
    y = hp.run(x)
    if y is not x or version is None or x._version != version:
        kept[0] = False
    return y


def _nonzero(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, feature ids, values) of the nonzero entries of [rows, d_sae], by row then feature."""
    rows, feats = acts.nonzero(as_tuple=True)
    return rows, feats, acts[rows, feats]


def _choice(value, valid, what: str):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; lens supports {', '.join(map(repr, valid))}")
    return value


class SAE(nn.Module):
    """A sparse dictionary reading `hook_name` (and, for a transcoder, writing `hook_name_out`).

    activation: relu | jumprelu (relu(pre)·[pre > threshold]) | topk (the k largest
    pre-activations, relu'd) | batchtopk (the k·rows largest over the whole batch) | gated.
    A transcoder (hook_name_out set) decodes to d_out at its output hook; skip=True adds
    x W_skip (W_skip [d_in, d_out]). hook_head_index: read one head of a per-head hook point.
    reshape_activations="hook_z": flatten [..., n_heads, d_head] into d_in. `processing`: the
    lens.processing steps the model had when the SAE's training activations were recorded
    (none by default); splicing checks it against the model's.
    """

    def __init__(self, d_in: int, d_sae: int, hook_name: str, *, activation: str = "relu",
                 d_out: Optional[int] = None, hook_name_out: Optional[str] = None, skip: bool = False,
                 k: Optional[int] = None, apply_b_dec_to_input: bool = True,
                 normalize_activations: str = "none", hook_head_index: Optional[int] = None,
                 reshape_activations: str = "none", rescale_acts_by_decoder_norm: bool = False,
                 processing: Iterable[str] = (), metadata: Optional[dict] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.activation = _choice(activation, ACTIVATIONS, "SAE activation")
        self.normalize_activations = _choice(normalize_activations or "none", NORMALIZATIONS,
                                             "normalize_activations")
        self.reshape_activations = _choice(reshape_activations or "none", ("none", "hook_z"),
                                           "reshape_activations")
        bad_steps = [s for s in processing if s not in _CHANGED_BY]
        if bad_steps:
            raise ValueError(f"unknown processing steps {bad_steps}; valid: {list(_CHANGED_BY)}")
        self.transcoder = hook_name_out is not None and hook_name_out != hook_name
        d_out = d_in if d_out is None else int(d_out)
        if d_out != d_in and not self.transcoder:
            raise ValueError(f"an SAE writes where it reads ({hook_name!r}), so d_out={d_out} must "
                             f"equal d_in={d_in}; give hook_name_out for a transcoder")
        if self.transcoder and apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input=True needs the decoder bias in the input's space; "
                             "a transcoder writes elsewhere: use apply_b_dec_to_input=False")
        if skip and not self.transcoder:
            raise ValueError("skip=True (a skip-transcoder) needs hook_name_out")
        if activation in ("topk", "batchtopk") and (k is None or not 0 < k <= d_sae):
            raise ValueError(f"activation={activation!r} needs k in [1, d_sae={d_sae}], got k={k}")
        self.d_in, self.d_sae, self.d_out, self.k = int(d_in), int(d_sae), d_out, k
        self.hook_name, self.hook_name_out = hook_name, hook_name_out if self.transcoder else hook_name
        self.skip, self.apply_b_dec_to_input = bool(skip), bool(apply_b_dec_to_input)
        self.hook_head_index = hook_head_index
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.processing = list(processing)
        self.metadata = dict(metadata or {})
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        if activation == "gated":
            self.b_gate = nn.Parameter(torch.zeros(d_sae, **kw))
            self.r_mag = nn.Parameter(torch.zeros(d_sae, **kw))
            self.b_mag = nn.Parameter(torch.zeros(d_sae, **kw))
        else:
            self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, **kw))
        for name in HOOKS:
            setattr(self, name, HookPoint())

    # ------------------------------------------------------------------ describing
    def hook_point_name(self, leaf: str) -> str:
        """The model-wide name of one of the SAE's hook points (HOOKS) while it is spliced in."""
        return f"{self.hook_name}.{leaf}"

    @property
    def features_name(self) -> str:
        """The hook point of its feature activations: "{hook_name}.hook_sae_acts_post"."""
        return self.hook_point_name("hook_sae_acts_post")

    @property
    def architecture(self) -> str:
        """SAELens's name for this kind of dictionary."""
        if self.transcoder:
            prefix = "" if self.activation == "relu" else self.activation + "_"
            return prefix + ("skip_transcoder" if self.skip else "transcoder")
        return "standard" if self.activation == "relu" else self.activation

    def config(self) -> dict:
        return dict(d_in=self.d_in, d_sae=self.d_sae, d_out=self.d_out, hook_name=self.hook_name,
                    hook_name_out=self.hook_name_out if self.transcoder else None,
                    activation=self.activation, skip=self.skip, k=self.k,
                    apply_b_dec_to_input=self.apply_b_dec_to_input,
                    normalize_activations=self.normalize_activations,
                    hook_head_index=self.hook_head_index,
                    reshape_activations=self.reshape_activations,
                    rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
                    processing=self.processing, metadata=self.metadata)

    def extra_repr(self) -> str:
        where = self.hook_name + (f" -> {self.hook_name_out}" if self.transcoder else "")
        return f"{self.architecture}, {where}, d_in={self.d_in}, d_sae={self.d_sae}" + (
            f", k={self.k}" if self.k else "")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ------------------------------------------------------------------ the maths
    def _flat(self, x: Tensor) -> Tensor:
        if self.reshape_activations == "hook_z" and x.shape[-1] != self.d_in and x.ndim >= 2:
            return x.flatten(-2)
        return x

    def _normalize(self, x: Tensor):
        kind = self.normalize_activations
        if kind == "constant_norm_rescale":
            coeff = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, coeff
        if kind == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            std = x.std(-1, keepdim=True)
            return x / (std + 1e-5), (mu, std)
        return x, None

    def _denormalize(self, x: Tensor, norm) -> Tensor:
        kind = self.normalize_activations
        if self.transcoder or kind not in ("constant_norm_rescale", "layer_norm"):
            return x
        if norm is None:
            raise ValueError(f"decode under normalize_activations={kind!r} needs the input's "
                             "statistics: use forward(x), or encode(x, return_norm=True) and "
                             "decode(acts, norm)")
        if kind == "constant_norm_rescale":
            return x / norm
        mu, std = norm
        return x * std + mu

    def _encode(self, x: Tensor, hooked: bool = True, kept: Optional[list] = None,
                sparse: bool = False):
        """(feature activations, normalisation state) of flat input x [..., d_in]; the hooks
        run when `hooked`, and `kept[0]` turns False if one of them changed a value. With
        `sparse` (no hooks, x [rows, d_in]): ((rows, feature ids, values) of the nonzero
        activations, ordered by row then feature, normalisation state)."""
        run = (lambda hp, t: _observe(hp, t, kept)) if hooked else (lambda hp, t: t)
        x = run(self.hook_sae_input, x.to(self.W_enc.dtype))
        x, norm = self._normalize(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.activation == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            pre = run(self.hook_sae_acts_pre, x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            acts = pre.relu() * gate.to(pre.dtype)
            return (_nonzero(acts) if sparse else run(self.hook_sae_acts_post, acts)), norm
        pre = run(self.hook_sae_acts_pre, x @ self.W_enc + self.b_enc)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if self.activation == "relu":
            acts = pre.relu()
        elif self.activation == "jumprelu":
            acts = pre.relu() * (pre > self.threshold).to(pre.dtype)
        elif self.activation == "topk" and sparse:  # the k per row, without a dense tensor
            top = pre.topk(self.k, dim=-1, sorted=False)
            feats, order = top.indices.sort(-1)
            values = top.values.gather(-1, order).relu()
            rows = torch.arange(len(pre), device=pre.device)[:, None].expand_as(feats)
            live = values.flatten() != 0
            return (rows.flatten()[live], feats.flatten()[live], values.flatten()[live]), norm
        elif self.activation == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:  # batchtopk: the k·rows largest over every row of the batch together
            flat = pre.relu().flatten()
            top = flat.topk(self.k * pre.shape[:-1].numel(), sorted=False)
            acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(pre.shape)
        return (_nonzero(acts) if sparse else run(self.hook_sae_acts_post, acts)), norm

    def _decode(self, acts: Tensor, norm, x: Optional[Tensor], hooked: bool = True,
                kept: Optional[list] = None) -> Tensor:
        if self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        out = acts @ self.W_dec + self.b_dec
        out = _observe(self.hook_sae_recons, out, kept) if hooked else out
        out = self._denormalize(out, norm)
        if self.skip:
            if x is None:
                raise ValueError("a skip-transcoder's output needs its input: use forward(x)")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def encode(self, x: Float[Tensor, "... d_in"], return_norm: bool = False):
        """Feature activations [..., d_sae] (hook_sae_input/acts_pre/acts_post run); with
        return_norm=True also the input's normalisation statistics, for decode."""
        acts, norm = self._encode(self._check_in(self._flat(x)))
        return (acts, norm) if return_norm else acts

    def decode(self, acts: Float[Tensor, "... d_sae"], norm=None) -> Float[Tensor, "... d_out"]:
        """The reconstruction [..., d_out] (flat for hook_z SAEs; no skip term)."""
        if acts.shape[-1] != self.d_sae:
            raise ValueError(f"decode takes [..., d_sae={self.d_sae}] feature activations, got "
                             f"shape {tuple(acts.shape)}")
        if self.skip:
            raise ValueError("a skip-transcoder's output needs its input: use forward(x)")
        return self._decode(acts.to(self.W_dec.dtype), norm, None)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """decode(encode(x)) (plus the skip term), in x's shape for an SAE."""
        flat = self._check_in(self._flat(x))
        acts, norm = self._encode(flat)
        out = self._decode(acts, norm, flat)
        return out.reshape(x.shape) if not self.transcoder and out.shape != x.shape else out

    def _check_in(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"the SAE at {self.hook_name!r} takes [..., d_in={self.d_in}], got "
                             f"shape {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------ checks and transforms
    def check_weights(self) -> "SAE":
        """Refuse weights that are not finite, naming them."""
        bad = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ValueError(f"the SAE at {self.hook_name!r} has NaN or infinite weights in {bad}")
        return self

    @torch.no_grad()
    def centred_output(self) -> "SAE":
        """A copy whose output is centred over d_out (what center_writing_weights does to the
        stream's writers): its features are the same, its output is P·out, P = I - 11ᵀ/d."""
        new = SAE(**{k: v for k, v in self.config().items() if k not in ("processing",)},
                  processing=self.processing + ["center_writing_weights"],
                  dtype=self.dtype, device=self.W_enc.device)
        new.load_state_dict(self.state_dict())
        for name in ("W_dec", "b_dec") + (("W_skip",) if self.skip else ()):
            p = getattr(new, name)
            p.sub_(p.mean(-1, keepdim=True))
        return new

    # ------------------------------------------------------------------ saving
    def save(self, path: PathLike, format: str = "lens") -> Path:
        """Save to directory `path`: lens's format (lens_sae.json + sae.safetensors) or
        SAELens's (cfg.json + sae_weights.safetensors, format="saelens")."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in self.named_parameters()}
        if _choice(format, ("lens", "saelens"), "SAE format") == "lens":
            io.write(tensors, path / _LENS_WEIGHTS, {"format": "lens-sae"})
            (path / _LENS_CONFIG).write_text(json.dumps(self.config(), indent=1))
            return path
        if "W_skip" in tensors:
            tensors["W_skip"] = tensors["W_skip"].T.contiguous()
        io.write(tensors, path / _SAELENS_WEIGHTS, {"format": "pt"})
        meta = dict(self.metadata)
        meta.update(hook_name=self.hook_name, hook_head_index=self.hook_head_index,
                    sae_lens_version=meta.get("sae_lens_version", "6.0.0"))
        if self.transcoder:
            meta["hook_name_out"] = self.hook_name_out
        steps = set(self.processing) | (
            {"fold_layer_norm"} if self.hook_name.endswith("hook_normalized") else set())
        kwargs = {kw: True for kw, step in _TL_STEPS.items() if step in steps}
        if kwargs:  # lens's hook_normalized is TransformerLens's with the norms folded
            meta["model_from_pretrained_kwargs"] = kwargs
        cfg = dict(architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae,
                   dtype=str(self.dtype).removeprefix("torch."), device="cpu",
                   apply_b_dec_to_input=self.apply_b_dec_to_input,
                   normalize_activations=self.normalize_activations,
                   reshape_activations=self.reshape_activations, metadata=meta)
        if self.activation == "batchtopk":
            cfg["k"] = self.k
        if self.activation == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        if self.transcoder:
            cfg["d_out"] = self.d_out
        (path / _SAELENS_CONFIG).write_text(json.dumps(cfg, indent=1))
        return path

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: PathLike, subfolder: Optional[str] = None, *,
             hook_name: Optional[str] = None, dtype: Optional[torch.dtype] = None, device=None,
             processing: Optional[Iterable[str]] = None) -> "SAE":
        """An SAE from a directory (or a params.npz / safetensors file): lens's format,
        SAELens's (cfg.json + sae_weights.safetensors; 6.x layout or older) or Gemma Scope's
        (params.npz or a safetensors of W_enc, W_dec, b_enc, b_dec, threshold; give hook_name
        unless the path names it, as google/gemma-scope-*-res/layer_N/... does). A name that is
        not a local path is a bundled SAE (lens/models/<name>) or a hub repo id (`subfolder`
        inside it), read from the hub cache first. No pickles are read."""
        path = _resolve(name_or_path, subfolder)
        if path.is_dir() and (path / _LENS_CONFIG).exists():
            sae = _from_lens(path, dtype)
        elif path.is_dir() and (path / _SAELENS_CONFIG).exists():
            sae = _from_saelens(path, dtype)
        else:
            sae = _from_params(path, hook_name, dtype, str(name_or_path) + "/" + (subfolder or ""))
        if hook_name is not None and hook_name != sae.hook_name and not sae.transcoder:
            sae.hook_name = sae.hook_name_out = hook_name
        if processing is not None:
            sae.processing = list(processing)
        return sae.to(device) if device is not None else sae


def _from_state(cfg: dict, tensors: dict[str, Tensor], source: str, dtype) -> SAE:
    stored = next(iter(tensors.values())).dtype if tensors else torch.float32
    sae = SAE(**cfg, dtype=dtype or stored)
    want = {n: p.shape for n, p in sae.named_parameters()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    misshaped = [f"{n} {tuple(tensors[n].shape)} (expected {tuple(want[n])})"
                 for n in want if n in tensors and tensors[n].shape != want[n]]
    if missing or extra or misshaped:
        raise ValueError(f"{source}: the weights do not fit a {sae.architecture} SAE with "
                         f"d_in={sae.d_in}, d_sae={sae.d_sae}, d_out={sae.d_out}: missing {missing}, "
                         f"unexpected {extra}, misshaped {misshaped}")
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(tensors[n])
    return sae.check_weights()


def _from_lens(path: Path, dtype) -> SAE:
    cfg = json.loads((path / _LENS_CONFIG).read_text())
    return _from_state(cfg, io.SafetensorsFile(path / _LENS_WEIGHTS).read_all(), str(path), dtype)


def _from_saelens(path: Path, dtype) -> SAE:
    """SAELens's cfg.json: the 6.x layout (hook facts under "metadata") or the older flat one
    (hook_point / activation_fn_str / activation_fn_kwargs / a bool normalize_activations)."""
    raw = json.loads((path / _SAELENS_CONFIG).read_text())
    flat = {**raw, **raw.get("metadata", {})}
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                     ("activation_fn_str", "activation_fn")):
        flat.setdefault(new, flat.get(old))
    arch = flat.get("architecture") or "standard"
    if flat.get("activation_fn") not in (None, "relu", "topk") and arch == "standard":
        raise ValueError(f"{path}: unknown activation_fn {flat['activation_fn']!r}; lens supports "
                         "'relu' and 'topk' (and the architectures " + ", ".join(ARCHITECTURES) + ")")
    if flat.get("activation_fn") == "topk" and arch == "standard":
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown SAE architecture {arch!r}; lens supports "
                         f"{', '.join(ARCHITECTURES)}")
    activation, transcoder, skip = ARCHITECTURES[arch]
    norm = flat.get("normalize_activations")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm) \
        if not isinstance(norm, str) else norm
    _choice(norm, NORMALIZATIONS, f"normalize_activations in {path}/cfg.json:")
    if not flat.get("hook_name"):
        raise ValueError(f"{path}/cfg.json names no hook point (hook_name / hook_point)")
    k = flat.get("k", (flat.get("activation_fn_kwargs") or {}).get("k"))
    # SAELens: "load the model with from_pretrained_no_processing(**model_from_pretrained_kwargs)"
    kwargs = flat.get("model_from_pretrained_kwargs") or {}
    processing = [step for kw, step in _TL_STEPS.items() if kwargs.get(kw) is True]
    hook = flat["hook_name"]
    if hook.endswith("hook_normalized") and "fold_layer_norm" not in processing:
        raise ValueError(f"{path}: the SAE reads {hook!r} of an unfolded TransformerLens model, "
                         "where hook_normalized is the norm's output after its weight and bias; "
                         "lens's hook_normalized is before them (TransformerLens's folded "
                         "convention), and lens has no hook point for the former")
    out = flat.get("hook_name_out")
    layer = re.match(r"blocks\.(\d+)\.", hook)
    if transcoder and not out:
        if not layer:
            raise ValueError(f"{path}/cfg.json: a transcoder needs metadata.hook_name_out")
        out = f"blocks.{layer.group(1)}.hook_mlp_out"  # a transcoder stands in for the MLP
    cfg = dict(d_in=flat["d_in"], d_sae=flat["d_sae"], hook_name=hook,
               activation=activation, d_out=flat.get("d_out") if transcoder else None,
               hook_name_out=out if transcoder else None,
               skip=skip, k=k if activation in ("topk", "batchtopk") else None,
               apply_b_dec_to_input=flat.get("apply_b_dec_to_input", not transcoder),
               normalize_activations=norm, hook_head_index=flat.get("hook_head_index"),
               reshape_activations=flat.get("reshape_activations") or (
                   "hook_z" if flat["hook_name"].endswith("hook_z") else "none"),
               rescale_acts_by_decoder_norm=flat.get("rescale_acts_by_decoder_norm", False),
               processing=processing,
               metadata={k: v for k, v in flat.items() if k in ("model_name", "sae_lens_version",
                                                                 "model_from_pretrained_kwargs",
                                                                 "neuronpedia_id", "prepend_bos",
                                                                 "context_size", "dataset_path")})
    tensors = io.SafetensorsFile(path / _SAELENS_WEIGHTS).read_all()
    if dtype is None and isinstance(flat.get("dtype"), str):  # SAELens casts to its cfg's dtype
        dtype = getattr(torch, flat["dtype"].removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{path}/cfg.json: unknown dtype {flat['dtype']!r}")
    scale = tensors.pop("scaling_factor", tensors.pop("finetuning_scaling_factor", None))
    if scale is not None and not torch.all(scale == 1):
        raise ValueError(f"{path}: a finetuning scaling_factor (not all ones) is not supported")
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T  # SAELens stores [d_out, d_in]
    return _from_state(cfg, tensors, str(path), dtype)


_GEMMA_SCOPE_HOOK = {"res": "blocks.{l}.hook_resid_post", "mlp": "blocks.{l}.hook_mlp_out",
                     "att": "blocks.{l}.attn.hook_z"}


def _from_params(path: Path, hook_name: Optional[str], dtype, where: str) -> SAE:
    """Gemma Scope's parameters: params.npz (numpy, allow_pickle=False) or a safetensors file."""
    if path.is_dir():
        found = [p for p in (path / "params.npz", *sorted(path.glob("*.safetensors"))) if p.exists()]
        if not found:
            raise ValueError(f"{path}: no {_LENS_CONFIG}, {_SAELENS_CONFIG}, params.npz or "
                             "safetensors file to read an SAE from")
        path = found[0]
    if path.suffix == ".npz":
        import numpy as np
        with np.load(path, allow_pickle=False) as data:
            tensors = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    else:
        tensors = io.SafetensorsFile(path).read_all()
    tensors = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in tensors.items()}
    if hook_name is None:
        m = re.search(r"-(res|mlp|att)\b.*layer_(\d+)", where + "/" + str(path))
        if not m:
            raise ValueError(f"{path}: Gemma Scope parameters do not say which hook point they "
                             "read; pass hook_name= (e.g. 'blocks.12.hook_resid_post')")
        hook_name = _GEMMA_SCOPE_HOOK[m.group(1)].format(l=m.group(2))
    if "W_enc" not in tensors:
        raise ValueError(f"{path}: no W_enc among {sorted(tensors)}")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = dict(d_in=d_in, d_sae=d_sae, hook_name=hook_name,
               activation="jumprelu" if "threshold" in tensors else "relu",
               apply_b_dec_to_input=False,
               reshape_activations="hook_z" if hook_name.endswith("hook_z") else "none")
    return _from_state(cfg, tensors, str(path), dtype)


def _resolve(name_or_path: PathLike, subfolder: Optional[str]) -> Path:
    """A local path, a bundled SAE, or a hub repo's folder (the cache first, then a download
    unless HF_HUB_OFFLINE is set)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path / subfolder if subfolder else path
    bundled = Path(__file__).parent / "models" / str(name_or_path)
    if bundled.is_dir():
        return bundled
    name = str(name_or_path)
    if path.is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise ValueError(f"{name!r}: no such SAE file or directory (nor a bundled SAE or a hub "
                         "repo id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{name!r} is not a local path, and reading the HF hub cache needs "
                         "huggingface_hub (pip install huggingface-hub)") from None
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception as e:
        if offline:
            raise ValueError(f"{name!r}{'/' + subfolder if subfolder else ''} is not in the HF hub "
                             f"cache and HF_HUB_OFFLINE is set ({type(e).__name__})") from None
        folder = Path(snapshot_download(name, allow_patterns=patterns))
    folder = folder / subfolder if subfolder else folder
    if not folder.exists():
        raise ValueError(f"{name!r} has no folder {subfolder!r}")
    return folder


# ---------------------------------------------------------------------- splicing
def _host_width(model, sae: SAE, name: str) -> tuple[Optional[int], str]:
    """(the d_in the host hook point gives the SAE, how it is read: "last" axis, "flat" heads,
    or one "head"), None when the sites table does not know the hook point."""
    try:
        axes = sites.axes(name)
    except KeyError:
        return None, "last"
    cfg = model.cfg
    size = {"d_model": cfg.d_model, "d_head": cfg.d_head, "d_mlp": getattr(cfg, "d_mlp", None),
            "d_vocab": cfg.d_vocab, "head": cfg.n_heads, "kv_head": cfg.n_kv_heads, "1": 1}
    trailing = [size.get(a) for a in axes if a not in ("batch", "pos")]
    if None in trailing or not trailing:
        return None, "last"
    if len(trailing) == 2:
        if sae.hook_head_index is not None:
            if not 0 <= sae.hook_head_index < trailing[0]:
                raise ValueError(f"the SAE's hook_head_index={sae.hook_head_index} is out of range: "
                                 f"{name!r} has {trailing[0]} heads")
            return trailing[1], "head"
        if sae.d_in == trailing[0] * trailing[1] or sae.reshape_activations == "hook_z":
            return trailing[0] * trailing[1], "flat"
    return trailing[-1], "last"


def _check_processing(model, sae: SAE) -> SAE:
    """The SAE as the model's processing needs it: itself, a transformed copy, or an error."""
    from lens.processing import applied_steps
    done, trained = set(applied_steps(model)), set(sae.processing)
    leaves = {sae.hook_name.rsplit(".", 1)[-1]: "reads"}
    if sae.transcoder:
        leaves.setdefault(sae.hook_name_out.rsplit(".", 1)[-1], "writes")
    problems = []
    for step in sorted(done ^ trained, key=list(_CHANGED_BY).index):
        hit = [(leaf, how) for leaf, how in leaves.items() if leaf in _CHANGED_BY[step]]
        if not hit:
            continue
        if (step == "center_writing_weights" and step in done and sae.transcoder
                and [how for _, how in hit] == ["writes"]):
            sae = sae.centred_output()  # its features are unchanged; its output is centred
            continue
        where = " and ".join(f"{how} {sae.hook_name if how == 'reads' else sae.hook_name_out!r}"
                             for _, how in hit)
        if step in done:
            problems.append(f"the model was loaded with {step}, which changes the activation the "
                            f"SAE {where}, and the SAE was trained without it: load the model with "
                            "HookedGPT.from_pretrained_no_processing(...) (or without that step)")
        else:
            problems.append(f"the SAE was trained on a model processed with {step}, which changes "
                            f"the activation it {where}, and this model was loaded without it: load "
                            "it with HookedGPT.from_pretrained(...) with that step")
    if problems:
        raise ValueError("; ".join(problems))
    return sae


class _Splice:
    """The hook functions that put one SAE in the forward pass."""

    def __init__(self, model, sae: SAE, use_error_term: bool):
        self.sae, self.use_error_term = sae, use_error_term
        for name in (sae.hook_name, sae.hook_name_out):
            try:
                model._hook_point(name)
            except KeyError as e:
                raise KeyError(f"the {sae.architecture} SAE reads/writes {name!r}, which is not a "
                               f"hook point of this model: {e.args[0]}") from None
        width, self.how = _host_width(model, sae, sae.hook_name)
        if width is not None and width != sae.d_in:
            raise ValueError(f"the {sae.architecture} SAE at {sae.hook_name!r} has d_in={sae.d_in}, "
                             f"but that hook point gives {width} per position")
        if sae.transcoder:
            out_width, self.how_out = _host_width(model, sae, sae.hook_name_out)
            if out_width is not None and out_width != sae.d_out:
                raise ValueError(f"the transcoder writing {sae.hook_name_out!r} has d_out="
                                 f"{sae.d_out}, but that hook point holds {out_width} per position")
        self.pending: list = []

    def _read(self, x: Tensor, how: str) -> Tensor:
        if how == "head":
            return x[..., self.sae.hook_head_index, :]
        return x.flatten(-2) if how == "flat" else x

    def _write(self, x: Tensor, out: Tensor, how: str) -> Tensor:
        out = out.to(x.dtype)
        if how == "head":
            full = x.clone()
            full[..., self.sae.hook_head_index, :] = out
            return full
        return out.reshape(x.shape)

    def _output(self, target: Tensor, recons: Tensor, flat: Tensor, kept: bool) -> Tensor:
        """recons, plus the error term (target - the clean reconstruction, without gradient)
        when asked; the clean reconstruction is recomputed without hooks only if a hook
        changed a value. Written target + (recons - clean): target's own bits when nothing
        changed, otherwise recons + error up to rounding."""
        sae = self.sae
        out = recons
        if self.use_error_term:
            with torch.no_grad():
                clean = recons.detach() if kept else sae._decode(
                    *sae._encode(flat, hooked=False), flat, hooked=False)
                error = target.to(recons.dtype) - clean if sae.hook_sae_error.fwd_hooks else None
                same = [True]
                seen = _observe(sae.hook_sae_error, error, same) if error is not None else None
            if not same[0]:  # a hook changed the error term
                out = recons + seen
            elif not kept or recons.requires_grad:
                out = target.detach().to(recons.dtype) + (recons - clean)
            else:
                out = target.to(recons.dtype)
        return sae.hook_sae_output.run(out)

    def at_input(self, x: Tensor, hook) -> Optional[Tensor]:
        sae = self.sae
        flat = self._read(x, self.how)
        kept = [True]
        acts, norm = sae._encode(flat, kept=kept)
        if not sae.transcoder:
            recons = sae._decode(acts, norm, flat, kept=kept)
            return self._write(x, self._output(flat, recons, flat, kept[0]), self.how)
        self.pending.append((flat, acts, norm, kept))
        return None

    def at_output(self, y: Tensor, hook) -> Tensor:
        sae = self.sae
        if not self.pending:
            raise ValueError(f"the transcoder writing {hook.name!r} found no input: its input hook "
                             f"{sae.hook_name!r} did not run first in this forward pass")
        flat, acts, norm, kept = self.pending.pop(0)
        recons = sae._decode(acts, norm, flat, kept=kept)
        target = self._read(y, self.how_out)
        return self._write(y, self._output(target, recons, flat, kept[0]), self.how_out)

    def hooks(self) -> list:
        sae = self.sae
        if sae.transcoder:
            return [(sae.hook_name, self.at_input), (sae.hook_name_out, self.at_output)]
        return [(sae.hook_name, self.at_input)]


@contextmanager
def saes(model, saes: Union[SAE, Iterable[SAE]], use_error_term: bool = False):
    """Splice SAEs into `model` for the `with` block: the activation at each SAE's hook point
    (a transcoder's output hook) is replaced by its reconstruction, plus the error term
    (what the SAE misses, computed without hooks or gradient, as SAELens does) when
    use_error_term=True, so that the model's output is unchanged.

    New hook points `{hook_name}.hook_sae_input`, `.hook_sae_acts_pre`, `.hook_sae_acts_post`
    ([batch, pos, d_sae]: the features), `.hook_sae_recons`, `.hook_sae_error`,
    `.hook_sae_output` join model.hook_dict; they are cached, hooked and removed on exit (also
    on errors) like every other. Hooks added on the host hook point inside the block see the
    spliced value. The SAE's own hook points are flat ([..., d_in]) also for hook_z SAEs.
    The model's weight processing is checked against the SAE's (SAE.processing): a step that
    changes the activation the SAE reads is refused, with what to load instead.
    """
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    if not saes:
        raise ValueError("saes() needs at least one SAE")
    problems, splices, unknown = [], [], 0
    for sae in saes:
        if not isinstance(sae, SAE):
            raise TypeError(f"saes() takes lens.sae.SAE objects, got {type(sae).__name__}")
        try:
            splices.append(_Splice(model, _check_processing(model, sae.check_weights()), use_error_term))
        except (KeyError, ValueError) as e:
            problems.append(e.args[0])
            unknown += isinstance(e, KeyError)
    hosts = [s.sae.hook_name for s in splices]
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        problems.append(f"more than one SAE reads {dupes}; splice one per hook point")
    taken = [n for s in splices for n in map(s.sae.hook_point_name, HOOKS) if n in model.hook_dict]
    if taken:
        problems.append(f"an SAE is already spliced at {sorted({t.rsplit('.', 1)[0] for t in taken})}")
    if problems:  # unknown hook names only: a KeyError, as for any unknown hook name
        raise (KeyError if unknown == len(problems) else ValueError)("cannot splice: " + "; ".join(problems))
    added = {}
    try:
        for s in splices:
            for leaf in HOOKS:
                hp = getattr(s.sae, leaf)
                hp.name = s.sae.hook_point_name(leaf)
                added[hp.name] = hp
        model.hook_dict.update(added)
        with model.hooks(fwd_hooks=[h for s in splices for h in s.hooks()]):
            yield model
    finally:
        for name, hp in added.items():
            if model.hook_dict.get(name) is hp:
                del model.hook_dict[name]
            hp.remove_hooks("both", including_permanent=True)
        for s in splices:
            s.pending.clear()


_splice = saes  # the context, under a name the keyword `saes` below does not hide


def run_with_saes(model, *args, saes: Union[SAE, Iterable[SAE]] = (), use_error_term: bool = False,
                  **kwargs):
    """model(*args, **kwargs) with `saes` spliced for this call (SAELens's run_with_saes)."""
    with _splice(model, saes, use_error_term=use_error_term):
        return model(*args, **kwargs)


def run_with_cache_with_saes(model, *args, saes: Union[SAE, Iterable[SAE]] = (),
                             use_error_term: bool = False, **kwargs):
    """model.run_with_cache(*args, **kwargs) with `saes` spliced; the cache holds the SAEs'
    hook points too (names_filter selects them as any other)."""
    with _splice(model, saes, use_error_term=use_error_term):
        return model.run_with_cache(*args, **kwargs)


# ---------------------------------------------------------------------- features and logits
_STREAM_WRITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _stream_write(sae: SAE) -> str:
    """The hook point where the SAE's decoder writes into the residual stream (refused when it
    does not write there directly: an SAE on hook_z or an MLP neuron)."""
    out = sae.hook_name_out
    if out.rsplit(".", 1)[-1] not in _STREAM_WRITES:
        raise ValueError(f"the SAE at {out!r} does not write into the residual stream directly; "
                         f"direct feature attribution and logit effects need one at {list(_STREAM_WRITES)}")
    return out


def feature_attribution(model, sae: SAE, cache, answer, wrong=None, pos: int = -1
                        ) -> Float[Tensor, "batch d_sae"]:
    """Direct feature attribution: each feature's contribution to the logit of `answer` (minus
    `wrong`) at position `pos`, its activation times its decoder direction read through the
    final norm with the cached scale frozen, as the cache's logit_attrs does for heads
    (before the final soft-cap, where there is one). `cache` is from a run with the SAE spliced
    (model.run_with_cache_with_saes), holding the features and ln_final.hook_scale. With the
    error term on, the features, b_dec and the error sum with the other writes to the stream
    to the logit difference."""
    _stream_write(sae)
    acts = cache[sae.features_name]
    if acts.ndim != 3:
        raise ValueError(f"the cached features have shape {tuple(acts.shape)}; cache with a batch axis")
    n = acts.shape[1]
    if isinstance(pos, bool) or not isinstance(pos, int) or not -n <= pos < n:
        raise ValueError(f"pos={pos!r} must be an int position in [-{n}, {n})")
    direction = model.logit_direction(answer, wrong)  # [d_model] or [batch, d_model]
    direction = direction.expand(acts.shape[0], -1) if direction.ndim == 1 else direction
    if model.ln_final is not None:
        scale = cache["ln_final.hook_scale"][:, pos]  # [batch, 1]
        direction = model.ln_final.read_through(direction, scale)
    W_dec = sae.W_dec.detach().to(acts.device)
    return acts[:, pos] * (direction.to(W_dec) @ W_dec.T).to(acts.dtype)


@torch.no_grad()
def feature_logit_effects(model, sae: SAE, feature: int, k: int = 10) -> dict:
    """The logit effect of one feature's decoder direction (through the final norm's weight and
    centring, without its scale, which only rescales): {"promoted": [(token, value), ...],
    "suppressed": [...]}, the k largest and smallest, and "values" [d_vocab]."""
    _stream_write(sae)
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < sae.d_sae:
        raise ValueError(f"feature={feature!r} must be an int in [0, d_sae={sae.d_sae})")
    d = sae.W_dec.detach()[feature].to(model.W_U.device, model.W_U.dtype)
    if model.ln_final is not None:
        d = model.ln_final.frozen(d, torch.ones((), dtype=d.dtype, device=d.device))
    values = d @ model.W_U.detach()
    k = min(k, values.numel())
    name = (lambda t: model.to_single_str_token(t)) if model.tokenizer is not None else (lambda t: t)
    top, bottom = values.topk(k), values.topk(k, largest=False)
    return {"values": values,
            "promoted": [(name(int(t)), float(v)) for v, t in zip(*top)],
            "suppressed": [(name(int(t)), float(v)) for v, t in zip(*bottom)]}


# ---------------------------------------------------------------------- patching features
FEATURE_PERS = ("feature", "feature_pos")


def _features(sae: SAE, features) -> list[int]:
    if features is None:
        return list(range(sae.d_sae))
    feats = [features] if isinstance(features, int) and not isinstance(features, bool) else list(features)
    bad = [f for f in feats if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < sae.d_sae]
    if bad or not feats:
        raise ValueError(f"features must be ints in [0, d_sae={sae.d_sae}) (None: all), got {bad or feats}")
    return feats


def feature_patch(model, sae: SAE, clean_tokens, corrupted_tokens, metric, per: str = "feature",
                  features=None, direction: str = "clean_to_corrupted", use_error_term: bool = True,
                  batch_size: Optional[int] = None, progress: bool = True, skip_prefix: bool = True):
    """Activation patching over an SAE's features: with the SAE spliced in, copy feature f (at
    every position, per="feature"; at one position, per="feature_pos") from the source run into
    the base run and score each patched run with `metric` (as lens.patching.activation_patch,
    whose batched engine this is: several patches per forward pass, each starting at the SAE's
    layer from the base run's cached stream, computing only the positions from the patch on,
    and from the first position where the prompts differ, over the base run's keys and values
    before it; skip_prefix=False computes every position). With use_error_term the error term
    of the base run stays, so an unpatched run is the model's own. A BatchTopK SAE's features
    depend on every row of the batch, so for it each patch runs alone, at every position, as a
    naive loop does. Returns a PatchResult with values [n_features] or [n_features, pos] and
    labels {"feature": ..., ("pos": ...)}."""
    from lens import patching as P
    if per not in FEATURE_PERS:
        raise ValueError(f"per={per!r}; valid values are {FEATURE_PERS}")
    base, src = P._runs(model, clean_tokens, corrupted_tokens, direction)
    P._check_chunking(batch_size, None)
    skip = skip_prefix and sae.activation != "batchtopk"
    p0 = P._first_difference(base, src) if skip else 0
    name = sae.features_name
    with torch.no_grad(), _splice(model, sae, use_error_term=use_error_term):
        src_logits, src_cache = model.run_with_cache(src, names_filter=[name])
        src_m = float(P._score(metric, src_logits))
        values, base_m = _feature_sweep(model, sae, base, src_cache[name], metric, per, features,
                                             p0, skip, batch_size, progress,
                                             f"patching features of {sae.hook_name}")
    forward = direction == "clean_to_corrupted"
    return P.PatchResult(values, _feature_labels(sae, features, base, per), name, per, direction,
                         src_m if forward else base_m, base_m if forward else src_m)


def feature_ablate(model, sae: SAE, tokens, metric, per: str = "feature", features=None,
                   means: Optional[Tensor] = None, use_error_term: bool = True,
                   batch_size: Optional[int] = None, progress: bool = True):
    """Ablation over an SAE's features with feature_patch's batched engine: with the SAE spliced
    in, set feature f (at every position, per="feature"; at one, per="feature_pos") to zero, or
    to `means` [d_sae] (or [pos, d_sae]) when given, and score each run with `metric`.
    Returns a PatchResult with direction "zero_ablation" / "mean_ablation", whose baseline
    (clean_metric) is the metric of the unablated run."""
    from lens import patching as P
    if per not in FEATURE_PERS:
        raise ValueError(f"per={per!r}; valid values are {FEATURE_PERS}")
    base = P.as_tokens(model, tokens)
    P._check_chunking(batch_size, None)
    name = sae.features_name
    with torch.no_grad(), _splice(model, sae, use_error_term=use_error_term):
        _, cache = model.run_with_cache(base, names_filter=[name])
        acts = cache[name]
        if means is None:
            source = torch.zeros_like(acts)
        else:
            means = torch.as_tensor(means, dtype=acts.dtype, device=acts.device)
            if means.shape not in (acts.shape[-1:], acts.shape[-2:]):
                raise ValueError(f"means of shape {tuple(means.shape)}; give [d_sae] = "
                                 f"[{sae.d_sae}] or [pos, d_sae] = {list(acts.shape[-2:])}")
            source = means.expand_as(acts)
        values, base_m = _feature_sweep(model, sae, base, source, metric, per, features, 0,
                                             sae.activation != "batchtopk", batch_size, progress,
                                             f"ablating features of {sae.hook_name}")
    how = "zero_ablation" if means is None else "mean_ablation"
    return P.PatchResult(values, _feature_labels(sae, features, base, per), name, per, how, base_m)


def _feature_labels(sae: SAE, features, base: Tensor, per: str) -> dict:
    return {"feature": _features(sae, features),
            **({"pos": list(range(base.shape[1]))} if per == "feature_pos" else {})}


def _feature_sweep(model, sae: SAE, base: Tensor, source: Tensor, metric, per: str, features,
                   p0: int, skip: bool, batch_size: Optional[int], progress: bool, desc: str):
    """The engine of feature_patch and feature_ablate, inside the splice: each (feature,
    position) patch puts `source` [batch, pos, d_sae] into the base run's features; the
    patches before p0 (where the source is the base run's) score the base run. Returns (values
    [n_features(, pos)], the base run's metric)."""
    from tqdm.auto import tqdm
    from lens import patching as P
    from lens.generate import KVCache
    feats, n, L = _features(sae, features), base.shape[1], model.cfg.n_layers
    name, start = sae.features_name, model.hook_dict[sae.hook_name].layer() or 0
    stream = sites.name("resid_pre", start)
    per_pos = per == "feature_pos"
    grid = [(p, f) for f in feats for p in (range(n) if per_pos else [None])]
    noop, todo = P._noops(grid, p0, n)
    k = 1 if sae.activation == "batchtopk" else batch_size or max(1, min(len(grid), 2 ** 30 // max(
        1, base.numel() * (4 * model.cfg.d_model + sae.d_sae + model.cfg.d_vocab) * 4)))
    scores: list[Optional[Tensor]] = [None] * len(grid)
    with tqdm(total=len(grid), disable=not progress, desc=desc) as bar:
        base_kv = KVCache(L) if todo and skip and (per_pos or p0) else None
        base_logits, base_cache = model.run_with_cache(base, names_filter=[stream], past_kv=base_kv)
        base_score = P._score(metric, base_logits)
        for j in range(len(grid)):
            if noop[j]:
                scores[j] = base_score
        bar.update(len(grid) - len(todo))
        for p, chunk in P._plan(grid, todo, per_pos and skip, p0, k, n, base.shape[0], base.device):
            src_p = source[:, p:]
            mask = torch.zeros(len(chunk), 1, n - p, sae.d_sae, dtype=torch.bool, device=source.device)
            for i, j in enumerate(chunk):
                q, f = grid[j]
                mask[i, 0, slice(None) if q is None else q - p, f] = True
            x = base_cache[stream][:, p:].repeat(len(chunk), 1, 1)
            prefix = P._prefix(base_kv, p, len(chunk)) if p else None
            hook = (name, lambda a, hook: P._patch(a, mask, src_p))
            out = model.run_with_hooks(x, start_at_layer=start, past_kv=prefix, fwd_hooks=[hook])
            logits = out if not p else torch.cat([base_logits[:, :p].repeat(len(chunk), 1, 1), out], 1)
            for j, score in zip(chunk, P._scores(metric, logits, len(chunk))):
                scores[j] = score
            bar.update(len(chunk))
    values = torch.stack(scores).float().cpu().view(len(feats), *((n,) if per_pos else ()))
    return values, float(base_score)


def feature_attribution_patch(model, sae: SAE, clean_tokens, corrupted_tokens, metric,
                              per: str = "feature_pos", use_error_term: bool = True,
                              direction: str = "clean_to_corrupted"):
    """Attribution patching over every feature at every position in one backward pass: the
    gradient of the metric at the base run's features times (source - base) features, summed
    over the batch (per="feature" also over positions). It estimates feature_patch's
    `values - baseline`, exactly where the model is linear in the feature."""
    from lens import patching as P
    if per not in FEATURE_PERS:
        raise ValueError(f"per={per!r}; valid values are {FEATURE_PERS}")
    base, src = P._runs(model, clean_tokens, corrupted_tokens, direction)
    acts_name = sae.features_name
    held: dict[str, Tensor] = {}

    def leaf(a: Tensor, hook) -> Tensor:
        held["acts"] = a.detach().requires_grad_(True)
        return held["acts"]

    with _splice(model, sae, use_error_term=use_error_term):
        with torch.no_grad():
            src_logits, src_cache = model.run_with_cache(src, names_filter=[acts_name])
        with torch.enable_grad():
            base_logits = model.run_with_hooks(base, fwd_hooks=[(acts_name, leaf)])
            score = P._score(metric, base_logits)
            score.backward()
    acts = held["acts"]
    attr = (acts.grad * (src_cache[acts_name] - acts.detach())).sum(0)  # [pos, d_sae]
    values = (attr.mT if per == "feature_pos" else attr.sum(0)).float().cpu()  # [d_sae(, pos)]
    n = base.shape[1]
    labels = {"feature": list(range(sae.d_sae)), **({"pos": list(range(n))} if per == "feature_pos" else {})}
    base_m, src_m = float(score.detach()), float(P._score(metric, src_logits))
    forward = direction == "clean_to_corrupted"
    return P.PatchResult(values, labels, acts_name, per, direction,
                         src_m if forward else base_m, base_m if forward else src_m)


# ---------------------------------------------------------------------- feature cards
@dataclass
class FeatureCard:
    """One feature on a set of tokens: its top activating contexts (the activating token
    marked), how often and how strongly it fires, and the tokens its decoder direction
    promotes and suppresses. `str(card)` is a text card; `card.plot(path)` a PNG."""

    feature: int
    hook_name: str
    contexts: list  # [(str tokens of the window, index of the activating token in it, activation)]
    activations: Tensor  # every position's activation [n_positions]
    promoted: list
    suppressed: list

    @property
    def frequency(self) -> float:
        return float((self.activations > 0).float().mean())

    def __str__(self) -> str:
        lines = [f"feature #{self.feature} of the SAE at {self.hook_name}: active at "
                 f"{100 * self.frequency:.2f}% of {len(self.activations)} positions, max "
                 f"{float(self.activations.max()):.3f}", "top contexts:"]
        for toks, at, v in self.contexts:
            text = "".join(f"[[{t}]]" if i == at else t for i, t in enumerate(toks))
            lines.append(f"  {v:7.3f}  {text!r}")
        lines.append("promotes:  " + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.promoted))
        lines.append("suppresses: " + ", ".join(f"{t!r} {v:+.2f}" for t, v in self.suppressed))
        return "\n".join(lines)

    def plot(self, path=None):
        """Top contexts (activating token in bold), the histogram of nonzero activations and
        the top logit effects; saved to `path` when given. Returns the matplotlib Figure."""
        from lens.plot import _plt
        plt = _plt()
        fig = plt.figure(figsize=(11, 2.2 + 0.35 * len(self.contexts)))
        grid = fig.add_gridspec(2, 2, height_ratios=[max(1, len(self.contexts)), 4])
        ax = fig.add_subplot(grid[0, :])
        ax.axis("off")
        ax.set_title(f"feature #{self.feature} at {self.hook_name} (active at {100 * self.frequency:.2f}% "
                     "of positions)", loc="left", fontsize=10)
        for row, (toks, at, v) in enumerate(self.contexts):
            y = 1 - (row + 0.5) / max(1, len(self.contexts))
            shown = lambda t: t.replace("\n", "⏎")  # noqa: E731
            before, after = shown("".join(toks[:at]))[-60:], shown("".join(toks[at + 1:]))[:50]
            token = shown(toks[at]).replace(" ", "␣")
            char = 0.0064  # a monospace character at 8 pt, in axes widths
            ax.text(0.0, y, f"{v:6.2f}", family="monospace", fontsize=8, va="center")
            ax.text(0.45, y, before, family="monospace", fontsize=8, va="center", ha="right")
            ax.text(0.451, y, token, family="monospace", fontsize=8, va="center", weight="bold",
                    color="darkred")
            ax.text(0.452 + char * len(token), y, after, family="monospace", fontsize=8, va="center")
        hist = fig.add_subplot(grid[1, 0])
        live = self.activations[self.activations > 0].float().cpu()
        hist.hist(live.numpy() if len(live) else [0.0], bins=30, color="tab:blue")
        hist.set_title("nonzero activations", fontsize=9)
        bars = fig.add_subplot(grid[1, 1])
        effects = self.promoted[::-1] + self.suppressed
        bars.barh(range(len(effects)), [v for _, v in effects],
                  color=["tab:green" if v > 0 else "tab:red" for _, v in effects])
        bars.set_yticks(range(len(effects)), [repr(t) for t, _ in effects], fontsize=7)
        bars.set_title("logit effect of the decoder direction", fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


@torch.no_grad()
def feature_card(model, sae: SAE, feature: int, tokens, k: int = 8, context: int = 8,
                 batch_size: int = 8, use_error_term: bool = True) -> FeatureCard:
    """The card of one feature over `tokens` [batch, pos] (or text), or over a lens.harvest
    Harvest that holds this SAE's features: its k top activating contexts (`context` tokens
    either side of the activating one, inside its sequence), every position's activation and
    its top logit effects. From a harvest nothing is run but the logit effects: the contexts
    are its kept top tokens (at most its top_k), the activations every harvested token's."""
    from lens.harvest import Harvest
    from lens.patching import as_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int")
    effects = feature_logit_effects(model, sae, feature, k=min(k, 10))  # checks the feature
    show = lambda window: (model.to_str_tokens(window) if model.tokenizer is not None  # noqa: E731
                           else [str(t) for t in window.tolist()])
    name = sae.features_name
    if isinstance(tokens, Harvest):
        feats = _harvested(model, sae, tokens)
        values, where = feats.top(feature, k)
        ids = tokens.tokens()
        contexts = []
        for v, t in zip(values.tolist(), where.tolist()):
            _, pos, window = feats.context(t, context, context)
            contexts.append((show(ids[window.start:window.stop].long()), t - window.start, v))
        return FeatureCard(feature, sae.hook_name, contexts, feats.feature(feature),
                           effects["promoted"], effects["suppressed"])
    tokens = as_tokens(model, tokens)
    acts = []
    with _splice(model, sae, use_error_term=use_error_term):
        for chunk in tokens.split(batch_size):
            _, cache = model.run_with_cache(chunk, names_filter=[name])
            acts.append(cache[name][..., feature].float().cpu())
    acts = torch.cat(acts)  # [batch, pos]
    flat = acts.flatten()
    top = flat.topk(min(k, int((flat > 0).sum()) or 1))
    n = tokens.shape[1]
    contexts = []
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        if v <= 0:
            break
        b, p = divmod(i, n)
        lo, hi = max(0, p - context), min(n, p + context + 1)
        contexts.append((show(tokens[b, lo:hi]), p - lo, v))
    return FeatureCard(feature, sae.hook_name, contexts, flat, effects["promoted"], effects["suppressed"])


def _harvested(model, sae: SAE, harvest):
    """The SparseFeatures of `sae` in `harvest`, refused unless the harvest was made by this
    model and this SAE."""
    from lens.harvest import model_hash, sae_hash
    name = sae.features_name
    info = (harvest.manifest.get("features") or {}).get(name)
    if info is None or info["sae_hash"] not in (sae_hash(sae), sae_hash(_check_processing(model, sae))):
        raise ValueError(f"the harvest in {harvest.out_dir} holds no features of this SAE (it holds "
                         f"{harvest.feature_names}, from SAEs with other weights or at other hooks); "
                         "harvest them with lens.harvest.harvest(..., saes=sae)")
    if harvest.manifest["model_hash"] != model_hash(model):
        raise ValueError(f"the harvest in {harvest.out_dir} was made with another model (model hash "
                         f"{harvest.manifest['model_hash'][:12]}…); give the model it was made with")
    return harvest.features(name)


# ---------------------------------------------------------------------- figures
@torch.no_grad()
def evaluate(model, sae: SAE, tokens: Tensor, batch_size: int = 4) -> dict:
    """The SAE's figures on `tokens` [batch, pos]: L0 (mean active features per position),
    the fraction of the target's variance explained (1 - Σ|x - x̂|² / Σ|x - mean x|²), and the
    CE loss recovered, (CE with the target zeroed - CE spliced) / (CE zeroed - CE clean)."""
    l0 = sse = 0.0
    sums = sq = 0.0  # per-dimension sums of the target and of its square
    count = 0
    ce = {"clean": 0.0, "spliced": 0.0, "zero_ablated": 0.0}
    zero = lambda x, hook: torch.zeros_like(x)
    names = list(dict.fromkeys([sae.hook_name, sae.hook_name_out]))
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i:i + batch_size]
        w = batch.shape[0] / tokens.shape[0]
        loss, cache = model.run_with_cache(batch, names_filter=names, return_type="loss")
        x, target = cache[sae.hook_name], cache[sae.hook_name_out]
        if sae.hook_head_index is not None:
            x = target = x[..., sae.hook_head_index, :]
        acts = sae.encode(x)
        recons = sae(x).reshape(target.shape)
        l0 += (acts > 0).float().sum(-1).mean().item() * w
        t = target.reshape(-1, sae.d_out).double()
        sse += (t - recons.reshape(-1, sae.d_out).double()).pow(2).sum().item()
        sums, sq = sums + t.sum(0), sq + t.pow(2).sum(0)
        count += t.shape[0]
        ce["clean"] += loss.item() * w
        ce["spliced"] += run_with_saes(model, batch, saes=sae, return_type="loss").item() * w
        ce["zero_ablated"] += model.run_with_hooks(
            batch, return_type="loss", fwd_hooks=[(sae.hook_name_out, zero)]).item() * w
    sst = (sq - sums.pow(2) / count).sum().item()
    recovered = (ce["zero_ablated"] - ce["spliced"]) / (ce["zero_ablated"] - ce["clean"])
    return dict(l0=l0, variance_explained=1 - sse / sst, ce_loss_recovered=recovered,
                **{f"ce_{k}": v for k, v in ce.items()})
