"""Ablation hooks: replace an activation by zeros, by its mean over reference prompts, or by its
value on other prompts, optionally only for some heads, neurons or positions. Each builder
returns a (hook_name, hook_fn) pair for model.run_with_hooks(fwd_hooks=[...]) or model.hooks()."""

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from lens import sites
from lens.cache import ActivationCache, act_name
from lens.generate import check_seed
from lens.patching import Prompts, as_tokens

Index = Union[None, int, slice, Sequence[int], Tensor]
Hook = tuple[str, Callable]
Means = Union[Tensor, Mapping, ActivationCache]


def hook_name(name: str, layer: Optional[int] = None) -> str:
    """The full hook name of `name`: a full name as is, or a short one ("z", "pre", "resid_pre")
    with its layer: hook_name("z", 1) == "blocks.1.attn.hook_z"."""
    if "." in name or name.startswith("hook_"):
        if layer is not None:
            raise ValueError(f"{name!r} is a full hook name, so layer={layer} is ambiguous; give "
                             "layer= only with a short name such as 'z' or 'resid_pre'")
        return name
    if layer is not None and layer < 0:
        raise ValueError(f"layer={layer}: ablation builders do not know n_layers, so give a "
                         "layer >= 0 (e.g. model.cfg.n_layers - 1 for the last block)")
    return act_name(name, layer)


class _Site:
    """Where the head, neuron and position axes are in one hook point's activation."""

    def __init__(self, name: str):
        self.name = name
        self.head_axis = sites.head_axis(name)
        self.neuron_axis = sites.neuron_axis(name)
        self.pos_axis = sites.pos_axis(name)  # the query position for patterns
        axes = sites.axes(name)
        self.feature_axis = axes.index("d_sae") if "d_sae" in axes else None
        self.scores = name.endswith("hook_attn_scores")

    def check(self, heads: Index, neurons: Index, features: Index = None) -> None:
        if features is not None and self.feature_axis is None:
            raise ValueError(f"features= given for {self.name!r}, which has no d_sae axis; feature "
                             "sites are an SAE's {hook}.hook_sae_acts_pre / hook_sae_acts_post, "
                             "which exist while it is spliced in (model.saes(sae))")
        if heads is not None and self.head_axis is None:
            raise ValueError(f"heads= given for {self.name!r}, which has no n_heads axis; per-head "
                             "sites are attn.hook_q/k/v/rot_q/rot_k/z/result/pattern/"
                             "attn_scores and hook_q/k/v_input")
        if neurons is not None and self.neuron_axis is None:
            raise ValueError(f"neurons= given for {self.name!r}, which has no d_mlp axis; neuron "
                             "sites are blocks.{l}.mlp.hook_pre, hook_pre_linear and hook_post")


def _as_index(idx, what: str) -> Union[slice, Tensor]:
    """A selection along one axis as a slice, a boolean mask or int64 indices; floats, a bare
    bool and anything else that is not an index are refused."""
    if isinstance(idx, slice):
        return idx
    try:
        t = None if isinstance(idx, bool) else idx if isinstance(idx, Tensor) else torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or (t.dtype != torch.bool and (t.is_floating_point() or t.is_complex())):
        raise ValueError(f"{what}s={idx!r}: give an int, a list or 1-D tensor of ints, a slice, "
                         f"or a boolean mask over the {what}s")
    return t if t.dtype == torch.bool else t.long()


def _axis_mask(idx: Index, size: int, what: str, name: str) -> Tensor:
    """A boolean mask of length `size` selecting `idx` (int, list, slice or 1-D tensor)."""
    idx = _as_index(idx, what)
    if isinstance(idx, slice):
        mask = torch.zeros(size, dtype=torch.bool)
        mask[idx] = True
        return mask
    if idx.dtype == torch.bool:
        if idx.shape != (size,):
            raise ValueError(f"boolean {what} mask has shape {tuple(idx.shape)}, but {name!r} has "
                             f"{size} {what}s")
        return idx.cpu()
    ids = idx.cpu().reshape(-1)
    bad = ids[(ids < -size) | (ids >= size)]
    if bad.numel():
        raise ValueError(f"{what} {bad.tolist()} out of range for {name!r}, which has {size} "
                         f"{what}s (valid: 0..{size - 1}, or negative from the end)")
    mask = torch.zeros(size, dtype=torch.bool)
    mask[ids] = True
    return mask


def _selection(site: _Site, act: Tensor, heads: Index, neurons: Index,
               positions: Index, features: Index = None) -> Optional[Tensor]:
    """A boolean mask that broadcasts against `act`, True where the ablation applies (None: all)."""
    mask = None

    def along(axis: int, m: Tensor) -> Tensor:
        shape = [1] * act.ndim
        shape[axis] = -1
        return m.view(shape)

    if heads is not None:
        mask = along(site.head_axis, _axis_mask(heads, act.shape[site.head_axis], "head", site.name))
    if neurons is not None:
        m = along(site.neuron_axis, _axis_mask(neurons, act.shape[site.neuron_axis], "neuron", site.name))
        mask = m if mask is None else mask & m
    if features is not None:
        m = along(site.feature_axis, _axis_mask(features, act.shape[site.feature_axis], "feature", site.name))
        mask = m if mask is None else mask & m
    if positions is not None:
        n_pos = act.shape[site.pos_axis]
        if isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.ndim == 2:
            if positions.shape != (act.shape[0], n_pos):
                raise ValueError(f"positions mask has shape {tuple(positions.shape)}; for "
                                 f"{site.name!r} it must be [batch, pos] = {(act.shape[0], n_pos)}")
            shape = [1] * act.ndim
            shape[0], shape[site.pos_axis] = act.shape[0], n_pos
            m = positions.cpu().view(shape)
        else:
            m = along(site.pos_axis, _axis_mask(positions, n_pos, "position", site.name))
        mask = m if mask is None else mask & m
    return None if mask is None else mask.to(act.device)


class _Ablation:
    """A hook function replacing the selected part of an activation by `replacement(act)`."""

    def __init__(self, kind: str, name: str, replacement: Callable, heads, neurons, positions,
                 features=None):
        """heads, neurons, positions, features: Index selections, their types checked here."""
        for idx, what in ((heads, "head"), (neurons, "neuron"), (positions, "position"),
                          (features, "feature")):
            if idx is not None:
                _as_index(idx, what)  # the types now; the ranges when the activation is seen
        self.kind, self.site, self.replacement = kind, _Site(name), replacement
        self.site.check(heads, neurons, features)
        self.heads, self.neurons, self.positions, self.features = heads, neurons, positions, features

    def __call__(self, act: Tensor, hook) -> Tensor:
        new = self.replacement(act, self.site).to(act.dtype)
        mask = _selection(self.site, act, self.heads, self.neurons, self.positions, self.features)
        if self.site.scores:  # masked (future) scores stay -inf so the pattern stays causal
            keep = torch.isneginf(act)
            mask = ~keep if mask is None else mask & ~keep
        if mask is None:
            return new.expand_as(act).clone()
        return torch.where(mask, new, act)

    def __repr__(self) -> str:
        narrow = [f"{k}={v!r}" for k, v in (("heads", self.heads), ("neurons", self.neurons),
                                              ("features", self.features),
                                              ("positions", self.positions)) if v is not None]
        return f"{self.kind}_ablate({', '.join([repr(self.site.name)] + narrow)})"


def zero_ablate(name: str, layer: Optional[int] = None, *, heads: Index = None,
                neurons: Index = None, positions: Index = None, features: Index = None) -> Hook:
    """(hook_name, fn) setting the activation, or the selected heads/neurons/positions, to zero.

    heads index the n_heads axis of per-head sites, neurons the d_mlp axis of mlp.hook_pre/post,
    features the d_sae axis of a spliced SAE's hook_sae_acts_pre/post, positions the pos axis
    (the query position for pattern and attn_scores; a [batch, pos] boolean mask selects per
    prompt). Selections along several axes combine as a product.
    """
    name = hook_name(name, layer)
    fn = _Ablation("zero", name, lambda act, site: act.new_zeros(()), heads, neurons, positions,
                   features)
    return name, fn


def _check_reference(ref: Tensor, act: Tensor, site: _Site, what: str) -> Tensor:
    per_position = tuple(act.shape[1:])
    averaged = tuple(act.shape[2:]) if site.pos_axis == 1 else None
    if tuple(ref.shape) not in (per_position, averaged):
        valid = f"{per_position} (per position)" + (f" or {averaged} (averaged over positions)"
                                                    if averaged is not None else "")
        raise ValueError(f"{what} for {site.name!r} has shape {tuple(ref.shape)}, but the "
                         f"activation is {tuple(act.shape)}: expected {valid}")
    return ref.to(act.device)


def _means_for(means: Means, name: str) -> Tensor:
    if isinstance(means, Tensor):
        return means.detach()
    if isinstance(means, ActivationCache):
        if name not in means:
            raise ValueError(f"the cache given as means= has no {name!r}; cache it with "
                             "run_with_cache(names_filter=...)")
        return means[name].detach().mean(0)
    if isinstance(means, Mapping):
        if name not in means:
            raise ValueError(f"means= has no entry for {name!r}; it has {sorted(means)[:6]}. "
                             "Compute it with mean_activations(model, tokens, names)")
        return means[name].detach()
    raise TypeError(f"means= must be a tensor, a dict from mean_activations or an "
                    f"ActivationCache, got {type(means).__name__}")


def mean_ablate(name: str, layer: Optional[int] = None, *, means: Means, heads: Index = None,
                neurons: Index = None, positions: Index = None, features: Index = None) -> Hook:
    """(hook_name, fn) replacing the selected part of the activation by its mean.

    means: a tensor for this hook point, of shape activation[1:] (per position) or, for sites
    with pos on axis 1, activation[2:] (averaged over positions); a dict name -> such tensor
    (mean_activations); or an ActivationCache of reference prompts (averaged over its batch)."""
    name = hook_name(name, layer)
    ref = _means_for(means, name)
    fn = _Ablation("mean", name, lambda act, site: _check_reference(ref, act, site, "means"),
                   heads, neurons, positions, features)
    return name, fn


@torch.no_grad()
def mean_activations(model, tokens: Prompts, names,
                     batch_size: int = 32, over_positions: bool = False) -> dict[str, Tensor]:
    """Mean of each selected activation over the batch of `tokens` (and over positions when
    over_positions), run `batch_size` prompts at a time: a dict hook name -> mean, as
    mean_ablate(means=...) takes it. `names` is what run_with_cache's names_filter takes;
    `tokens` what lens.patching.as_tokens takes (tokens, lists of ids, strings)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    names = model.hook_names_matching(names)
    if over_positions:
        bad = [n for n in names if "key_pos" in sites.axes(n)]
        if bad:
            raise ValueError(f"over_positions=True would average {bad[:3]} over query positions, "
                             "which mixes rows of different lengths; use per-position means")
    sums: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    tokens = as_tokens(model, tokens)
    for chunk in tokens.split(batch_size):
        _, cache = model.run_with_cache(chunk, names_filter=names, stop_at_layer="auto")
        for n in names:
            act = cache[n]
            dtypes[n] = act.dtype
            acc = act.double() if act.is_floating_point() else act.float()
            s = acc.sum(dim=(0, _Site(n).pos_axis) if over_positions else 0)
            sums[n] = s if n not in sums else sums[n] + s
    count = tokens.shape[0] * (tokens.shape[1] if over_positions else 1)
    return {n: (s / count).to(dtypes[n]) for n, s in sums.items()}


def resample_indices(n: int, n_source: int, seed: int = 0) -> Int[Tensor, "n"]:
    """Which source prompt each of `n` prompts takes its activation from: a random cyclic
    shuffle of the sources (so prompt i never takes source i when n_source > 1), repeated
    when n > n_source. Deterministic in `seed`."""
    if n_source < 1:
        raise ValueError("resampling needs at least one source prompt")
    g = torch.Generator().manual_seed(check_seed(seed, optional=False))
    perm = torch.randperm(n_source, generator=g)
    nxt = torch.empty_like(perm)
    nxt[perm] = perm.roll(-1)
    return nxt[torch.arange(n) % n_source]


def resample_ablate(name: str, layer: Optional[int] = None, *, source: Union[Tensor, Mapping],
                    model=None, seed: int = 0, heads: Index = None, neurons: Index = None,
                    positions: Index = None, features: Index = None) -> Hook:
    """(hook_name, fn) replacing the selected part of each prompt's activation by its value on
    another prompt (resample_indices(batch, n_source, seed) says which).

    source: an ActivationCache (or dict) holding this hook point, the source activations
    [n_source, ...] themselves, or source tokens [n_source, pos] together with model= (run
    once, now, caching only this hook point)."""
    name = hook_name(name, layer)
    check_seed(seed, optional=False)
    if isinstance(source, Tensor) and not source.is_floating_point():
        if model is None:
            raise ValueError("source= is a token tensor: pass model= too, or pass an "
                             "ActivationCache of the source prompts")
        with torch.no_grad():
            _, cache = model.run_with_cache(source, names_filter=name, stop_at_layer="auto")
        src = cache[name]
    elif isinstance(source, Tensor):
        src = source.detach()
    elif isinstance(source, Mapping):
        if name not in source:
            raise ValueError(f"source= has no {name!r}; cache it with run_with_cache(names_filter=...)")
        src = source[name].detach()
    else:
        raise TypeError(f"source= must be a cache, activations or tokens, got {type(source).__name__}")

    def replacement(act: Tensor, site: _Site) -> Tensor:
        if tuple(src.shape[1:]) != tuple(act.shape[1:]):
            raise ValueError(f"source activations for {site.name!r} have shape {tuple(src.shape)}"
                             f", but the activation is {tuple(act.shape)}: they must agree "
                             "after the batch axis (same sequence length)")
        return src.to(act.device)[resample_indices(act.shape[0], src.shape[0], seed).to(act.device)]

    return name, _Ablation("resample", name, replacement, heads, neurons, positions, features)


def _layer_head(pair) -> tuple[int, int]:
    """A (layer, head) pair of ints (a tuple, a list or a 1-D integer tensor of two)."""
    try:
        l, h = pair
        if any(isinstance(i, bool) or (isinstance(i, Tensor) and i.dtype == torch.bool) for i in (l, h)):
            raise TypeError
        return operator.index(l), operator.index(h)
    except (TypeError, ValueError):
        raise ValueError(f"layer_heads entry {pair!r} is not a (layer, head) pair of ints; "
                         "layer_heads is a list of them, e.g. [(0, 1), (1, 0)]") from None


def ablate_heads(layer_heads: Iterable[tuple[int, int]], how: str = "zero", *,
                 site: str = "z", means: Optional[Means] = None, source=None, model=None,
                 seed: int = 0, positions: Index = None) -> list[Hook]:
    """Hooks knocking out several heads given as (layer, head) pairs, one hook per layer, on
    `site` (z by default): how = "zero" | "mean" (with means=) | "resample" (with source=)."""
    if positions is not None:
        _as_index(positions, "position")
    by_layer: dict[int, list[int]] = {}
    for pair in layer_heads:
        l, h = _layer_head(pair)
        by_layer.setdefault(l, []).append(h)
    if how == "resample" and isinstance(source, Tensor) and not source.is_floating_point():
        if model is None:
            raise ValueError("source= is a token tensor: pass model= too")
        with torch.no_grad():  # one run for every layer's source activations
            names = [hook_name(site, l) for l in by_layer]
            _, source = model.run_with_cache(source, names_filter=names, stop_at_layer="auto")
    hooks = []
    for l, hs in sorted(by_layer.items()):
        if how == "zero":
            hooks.append(zero_ablate(site, l, heads=hs, positions=positions))
        elif how == "mean":
            if means is None:
                raise ValueError("how='mean' needs means= (see mean_activations)")
            hooks.append(mean_ablate(site, l, means=means, heads=hs, positions=positions))
        elif how == "resample":
            if source is None:
                raise ValueError("how='resample' needs source= (a cache or tokens with model=)")
            hooks.append(resample_ablate(site, l, source=source, model=model, seed=seed,
                                         heads=hs, positions=positions))
        else:
            raise ValueError(f"how={how!r}; valid values are 'zero', 'mean', 'resample'")
    return hooks
