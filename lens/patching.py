"""Activation, attribution and path patching: move activations between a clean and a corrupted
run and score each patch with a metric of the logits. Sweeps stack several patches in one forward
pass and start each patched run at the patched layer from the cached residual stream."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens import sites
from lens.cache import act_name
from lens.generate import KVCache
from lens.model import HookedGPT

Metric = Callable[[Tensor], Union[Tensor, float]]
Prompts = Union[str, Sequence, Tensor]  # a string, a list of strings, or token ids (see as_tokens)
Patch = tuple[Optional[int], Optional[int]]  # (position, head); None patches the whole axis

# site short name -> (position axis, head axis) of its activation [batch, ...], from the sites
# table; for patterns the positions are query positions
SITES: dict[str, tuple[int, Optional[int]]] = {
    s: (sites.pos_axis(sites.name(s, 0)), sites.head_axis(sites.name(s, 0)))
    for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "pre", "post",
              "z", "q", "k", "v", "result", "pattern")}
PERS = ("layer", "layer_pos", "head", "head_pos")
DIRECTIONS = ("clean_to_corrupted", "corrupted_to_clean")
_MLP_SITES = ("resid_mid", "mlp_out", "pre", "post")
_STREAM_RECEIVERS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                     "hook_mlp_in", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post")


@dataclass
class PatchResult:
    """A patching sweep. values: [n_layers] (per="layer"), [n_layers, pos] ("layer_pos"),
    [n_layers, n_heads] ("head") or [n_layers, n_heads, pos] ("head_pos"; n_kv_heads for k and v
    under grouped-query attention); labels: axis name ->
    labels, in the order of values' axes. Activation and path patching store the metric of each
    patched run; attribution patching the estimated change of the metric (compare it with
    `values - baseline` of activation patching). clean_metric / corrupted_metric: the metric of
    the unpatched runs; `baseline` is the one of the run patched into."""

    values: Tensor
    labels: dict[str, list]
    site: str
    per: str
    direction: str = "clean_to_corrupted"
    clean_metric: float = math.nan
    corrupted_metric: float = math.nan

    @property
    def baseline(self) -> float:
        return self.corrupted_metric if self.direction == "clean_to_corrupted" else self.clean_metric

    def plot(self, path=None, title: Optional[str] = None):
        """Heat map (lens.plot.heatmap): layer × pos, layer × head, or (layer, head) × pos."""
        from lens.plot import heatmap
        v = self.values.detach().float().cpu()
        lab = {axis: [str(x) for x in labels] for axis, labels in self.labels.items()}
        title = title or f"{self.site} patched per {self.per} ({self.direction.replace('_', ' ')})"
        if self.per == "layer":
            return heatmap(v[None], ["metric"], lab["layer"], title, "layer", "", path)
        if self.per == "feature":  # lens.sae.feature_patch / feature_ablate
            return heatmap(v[None], ["metric"], lab["feature"], title, "feature", "", path)
        if self.per == "feature_pos":
            return heatmap(v, lab["feature"], lab["pos"], title, "position", "feature", path)
        if self.per == "head_pos":
            rows = [f"L{l}H{h}" for l in lab["layer"] for h in lab["head"]]
            return heatmap(v.flatten(0, 1), rows, lab["pos"], title, "position", "layer, head", path)
        cols = "pos" if self.per == "layer_pos" else "head"
        return heatmap(v, lab["layer"], lab[cols], title, "position" if cols == "pos" else cols, "layer", path)


# ---------------------------------------------------------------------- checks and helpers
def as_tokens(model: HookedGPT, prompts: Prompts, what: str = "tokens") -> Int[Tensor, "batch pos"]:
    """Prompts as checked tokens [batch, pos]: a string or a list of strings, tokenized by the
    model (prepend_bos=model.default_prepend_bos), or token ids as an integer tensor or a
    (nested) list of ints, [pos] or [batch, pos]. Strings of different token lengths are
    refused: the analyses that take prompts take no padding mask."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
        tokens, mask = model.to_tokens_with_mask(prompts if isinstance(prompts, str) else list(prompts))
        if not bool(mask.all()):
            raise ValueError(f"{what}: the prompts are {mask.sum(-1).tolist()} tokens long; "
                             "give prompts of one token length (padding would need a mask), or tokens")
        return tokens
    if isinstance(prompts, (list, tuple)):
        try:
            ids = torch.tensor(prompts)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} is a list but neither strings nor token ids [pos] or "
                             f"[batch, pos] of ints ({e})") from None
        if ids.numel() == 0:
            raise ValueError(f"{what} is empty; give at least one token")
        prompts = ids
    try:
        return model.check_tokens(prompts)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


def _runs(model: HookedGPT, clean_tokens: Prompts, corrupted_tokens: Prompts,
          direction: str) -> tuple[Tensor, Tensor]:
    """(base, source) tokens: the run patched into and the run the patches come from."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; valid values are {DIRECTIONS}")
    clean = as_tokens(model, clean_tokens, "clean_tokens")
    corrupted = as_tokens(model, corrupted_tokens, "corrupted_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean_tokens has shape {tuple(clean.shape)} but corrupted_tokens "
                         f"has shape {tuple(corrupted.shape)}; patching maps each (prompt, "
                         "position) to the same one, so the shapes must be equal")
    return (corrupted, clean) if direction == "clean_to_corrupted" else (clean, corrupted)


def _check_site(model: HookedGPT, site: str, per: str) -> None:
    cfg = model.cfg
    valid_sites = [s for s in SITES if (cfg.has_mlp or s not in _MLP_SITES)
                   and (cfg.has_resid_mid or s != "resid_mid")]
    if site not in valid_sites:
        extra = ""
        if site in SITES:
            extra = " (the model is attention-only)" if not cfg.has_mlp else \
                " (attention and MLP run in parallel: there is no resid_mid)"
        raise ValueError(f"unknown site {site!r}{extra}; valid sites are {valid_sites}")
    valid = PERS if SITES[site][1] is not None else PERS[:2]
    if per not in valid:
        raise ValueError(f"per={per!r} is not valid for site {site!r}; valid values are {list(valid)}")


def _score(metric: Metric, logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
    """The metric of one run's logits as a real 0-d tensor: a [batch] metric is averaged."""
    out = metric(logits)
    batch = logits.shape[0]
    valid = f"it must return a real scalar or a real [batch={batch}] tensor (averaged over the batch)"
    try:
        t = out if isinstance(out, Tensor) else torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is not None and t.is_complex():
        got = f"a {t.dtype} tensor" if isinstance(out, Tensor) else f"the complex number {out!r}"
        raise ValueError(f"metric(logits) returned {got}; {valid}")
    if t is not None and not t.is_floating_point():
        t = t.float()  # a count or a 0/1 correctness
    if t is not None and t.ndim == 0:
        return t
    if t is not None and t.shape == (batch,):
        return t.mean()
    got = f"shape {tuple(t.shape)}" if t is not None else type(out).__name__
    raise ValueError(f"metric(logits) returned {got}; {valid}")


def _scores(metric: Metric, logits: Float[Tensor, "stacked pos d_vocab"], copies: int) -> list[Tensor]:
    """Score each copy of the original batch separately, so the metric sees [batch, pos, d_vocab]."""
    return [_score(metric, chunk) for chunk in logits.chunk(copies)]


def _grid(per: str, n_heads: int, n_pos: int) -> list[Patch]:
    """The patches of one layer, in the row-major order of values' trailing axes."""
    heads = range(n_heads) if per.startswith("head") else [None]
    positions = range(n_pos) if per.endswith("pos") else [None]
    return [(p, h) for h in heads for p in positions]


def _grid_shape(per: str, n_heads: int, n_pos: int) -> tuple[int, ...]:
    return (n_heads,) * per.startswith("head") + (n_pos,) * per.endswith("pos")


def _mask(patches: Sequence[Patch], shape: tuple[int, ...], pos_axis: int,
          head_axis: Optional[int], device) -> Tensor:
    """Boolean [k, 1, ...] mask over k stacked copies of an activation of `shape` [batch, ...]:
    copy i is True where patch i replaces the activation."""
    k = len(patches)
    mask = torch.ones([k, 1] + [1] * (len(shape) - 1), dtype=torch.bool)
    for axis, col in ((pos_axis, 0), (head_axis, 1)):
        idx = [p[col] for p in patches]
        if axis is None or idx[0] is None:
            continue
        view = [k] + [1] * len(shape)
        view[axis + 1] = shape[axis]
        mask = mask & (torch.arange(shape[axis]) == torch.tensor(idx)[:, None]).view(view)
    return mask.to(device)


def _patch(act: Tensor, mask: Tensor, source: Tensor) -> Tensor:
    """Copy i of the stacked activation [k*batch, ...] takes `source` [batch, ...] where mask[i]."""
    stacked = act.unflatten(0, (mask.shape[0], -1))
    return torch.where(mask, source, stacked).flatten(0, 1)


def _check_chunking(batch_size, memory_budget) -> None:
    """batch_size a positive int and memory_budget a positive number of bytes (either None)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (patches per forward)")
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, (int, float))
                                      or not 0 < memory_budget < math.inf):
        raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes "
                         "(e.g. 2**30 for 1 GiB), or None for the default")


def _chunk(model: HookedGPT, tokens: Tensor, batch_size: Optional[int],
           memory_budget: Union[int, float, None], extra_width: int = 0) -> int:
    """Patches per forward pass: batch_size, or as many copies as fit in the memory budget by an
    estimate of the live activations of one copy (stream, MLP, attention scores, logits)."""
    if batch_size is not None:
        return batch_size
    cfg, (b, n) = model.cfg, tokens.shape
    if memory_budget is None:
        dev = tokens.device
        memory_budget = 0.5 * torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 2.0 ** 30
    width = 4 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 3 * cfg.n_heads * n + cfg.d_vocab + extra_width
    return max(1, int(memory_budget // (b * n * width * cfg.dtype.itemsize)))


def _site_heads(model: HookedGPT, site: str) -> int:
    """How many heads a site's head axis has: n_kv_heads for keys and values under GQA."""
    axis = SITES[site][1]
    kind = None if axis is None else sites.axes(act_name(site, 0))[axis]
    return model.cfg.n_kv_heads if kind == "kv_head" else model.cfg.n_heads


def _labels(model: HookedGPT, tokens: Tensor, per: str, site: str = "z") -> dict[str, list]:
    """Axis labels; positions are "str_token_position" of the first prompt with a tokenizer."""
    L, H, n = model.cfg.n_layers, _site_heads(model, site), tokens.shape[1]
    labels: dict[str, list] = {"layer": list(range(L))}
    if per.startswith("head"):
        labels["head"] = list(range(H))
    if per.endswith("pos"):
        labels["pos"] = list(range(n)) if model.tokenizer is None else [
            f"{t}_{i}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    return labels


def _baselines(metric: Metric, base_logits: Tensor, src_logits: Tensor) -> tuple[float, float]:
    """The metric of the unpatched base and source runs (checking what the metric returns)."""
    return float(_score(metric, base_logits)), float(_score(metric, src_logits))


def _result(model, values, base, src, site, per, direction, baselines) -> PatchResult:
    (base_m, src_m), forward = baselines, direction == "clean_to_corrupted"
    clean, corrupted = (src, base) if forward else (base, src)
    clean_m, corrupted_m = (src_m, base_m) if forward else (base_m, src_m)
    return PatchResult(values, _labels(model, clean, per, site), site, per, direction, clean_m, corrupted_m)


# ---------------------------------------------------------------------- activation patching
def activation_patch(model: HookedGPT, clean_tokens: Prompts,
                     corrupted_tokens: Prompts, metric: Metric, site: str = "z",
                     per: str = "head_pos", direction: str = "clean_to_corrupted",
                     batch_size: Optional[int] = None, memory_budget: Union[int, float, None] = None,
                     progress: bool = True, skip_prefix: bool = True,
                     logit_positions: Optional[Sequence[int]] = None,
                     logit_tokens: Optional[Sequence[int]] = None) -> PatchResult:
    """Patch `site` ("z", "resid_pre", "pattern", ...: see SITES) from the source run into the
    base run, one patch per layer × (head) × (position) as `per` says, and score each patched run.

    clean_tokens and corrupted_tokens: tokens [batch, pos] or [pos] (a tensor or lists of ints),
    or strings of one token length (see as_tokens). direction "clean_to_corrupted" patches
    clean activations into the corrupted run (base = corrupted); "corrupted_to_clean" the
    reverse. metric(logits) -> real scalar or [batch] (averaged) is called once per patch on
    that patch's logits, [batch, pos, d_vocab] exactly as in an unbatched run, even though the
    patched runs are stacked along the batch axis: batch_size patches per forward pass
    (default: as many as fit in memory_budget bytes, 1 GiB on CPU and half the free memory on
    a GPU). Each run starts at the patched layer from the base run's cached residual stream (a
    patch of resid_post at layer l starts at layer l + 1). Per position (layer_pos, head_pos),
    a patch at position p changes nothing before p: the run computes the positions from p on,
    attending to the base run's keys and values before p, and its logits before p are the base
    run's. Runs also skip the positions where the prompts agree: before p0, the first position at
    which the base and source tokens differ in any prompt of the batch, every activation of the
    two runs is the same under causal attention, so a patch at a position before p0 scores the
    base run without a forward pass, and a patch of every position (per layer, head) computes
    only the positions from p0 on, over the base run's keys and values before p0 (identical
    prompts: every patch scores the base run). skip_prefix=False computes every position of
    every patch, as a full run does; both are exact.
    logit_positions: the positions the metric reads (e.g. [-1]); the final norm and the
    unembedding then run only there, and the metric's logits hold NaN elsewhere (a metric that
    reads another position is refused). logit_tokens: the vocabulary entries it reads (e.g. the
    two of a logit difference); only those columns of W_U are computed, NaN elsewhere, checked
    the same way (with logit_positions, or at every position).
    """
    base, src = _runs(model, clean_tokens, corrupted_tokens, direction)
    _check_site(model, site, per)
    _check_chunking(batch_size, memory_budget)
    L, H, n = model.cfg.n_layers, _site_heads(model, site), base.shape[1]
    names = [act_name(site, l) for l in range(L)]
    stream = [sites.name("resid_pre", l) for l in range(L)] + [sites.name("resid_post", L - 1)]
    grid = _grid(per, H, n)
    by_pos = skip_prefix and per.endswith("pos")  # a patch at position p changes nothing before p
    p0 = _first_difference(base, src) if skip_prefix else 0  # the two runs agree before p0
    noop, todo = _noops(grid, p0, n)
    k = _chunk(model, base, batch_size, memory_budget, 2 * H * model.cfg.d_model if site == "result" else 0)
    pos_axis, head_axis = SITES[site]
    scores: list[Optional[Tensor]] = [None] * (L * len(grid))
    with torch.no_grad(), tqdm(total=L * len(grid), disable=not progress,
                               desc=f"patching {site} per {per}") as bar:
        src_logits, src_cache = model.run_with_cache(src, names_filter=names)
        base_kv = KVCache(L) if todo and (by_pos or p0) else None
        base_logits, base_cache = model.run_with_cache(base, names_filter=stream, past_kv=base_kv)
        baselines = _baselines(metric, base_logits, src_logits)
        base_score = _score(metric, base_logits)
        read, cols = _logit_reads(metric, base_logits, logit_positions, logit_tokens)
        finals: dict[int, Tensor] = {}  # the final stream where read, by index into scores
        plan = _plan(grid, todo, by_pos, p0, k, n, base.shape[0], base.device)
        for l in range(L):
            for j in range(len(grid)):
                if noop[j]:
                    scores[l * len(grid) + j] = base_score
            bar.update(len(grid) - len(todo))
            start = l + 1 if site == "resid_post" else l
            source = src_cache[names[l]]
            for p, chunk in plan:
                patches = [(None if q is None else q - p, h) for q, h in (grid[j] for j in chunk)]
                src_p = source.narrow(pos_axis, p, n - p)  # the positions the run computes
                mask = _mask(patches, tuple(src_p.shape), pos_axis, head_axis, source.device)
                x = base_cache[stream[start]][:, p:].repeat(len(chunk), 1, 1)
                prefix = _prefix(base_kv, p, len(chunk)) if p else None
                stop = None if read is None else L  # the final stream, unembedded at the end
                if site in ("resid_pre", "resid_post"):  # the patched stream is the input itself
                    out = model(_patch(x, mask, src_p), start_at_layer=start, past_kv=prefix,
                                stop_at_layer=stop)
                else:
                    hook = (names[l], lambda act, hook: _patch(act, mask, src_p))
                    out = model.run_with_hooks(x, start_at_layer=start, past_kv=prefix,
                                               stop_at_layer=stop, fwd_hooks=[hook])
                if read is not None:  # before p the final stream is the base run's
                    full = torch.cat([base_cache[stream[L]][:, :p].repeat(len(chunk), 1, 1), out], 1)
                    for j, rows in zip(chunk, full[:, read.to(full.device)].chunk(len(chunk))):
                        finals[l * len(grid) + j] = rows
                    bar.update(len(chunk))
                    continue
                logits = out if not p else torch.cat([base_logits[:, :p].repeat(len(chunk), 1, 1), out], 1)
                for j, score in zip(chunk, _scores(metric, logits, len(chunk))):
                    scores[l * len(grid) + j] = score
                bar.update(len(chunk))
        if finals:
            at = sorted(finals)
            for i, score in zip(at, _score_read(model, metric, [finals[i] for i in at], read,
                                                base_logits.shape, cols)):
                scores[i] = score
    values = torch.stack(scores).float().cpu().view(L, *_grid_shape(per, H, n))
    return _result(model, values, base, src, site, per, direction, baselines)


def _logit_reads(metric: Metric, logits: Float[Tensor, "batch pos d_vocab"],
                     positions: Optional[Sequence[int]], tokens: Optional[Sequence[int]] = None
                     ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The positions (ascending, non-negative) and vocabulary entries a metric reads (None: all),
    checked: the metric of logits that are NaN everywhere else must equal its metric of the
    whole logits. Given tokens alone, every position is read."""
    if positions is None and tokens is None:
        return None, None
    n, V = logits.shape[1:]

    def ids(values, size: int, what: str, name: str) -> Tensor:
        try:
            t = torch.as_tensor(list(values))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}={values!r} must be a list of int {what}s") from None
        if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name}={values!r} must be a list of int {what}s")
        if not t.numel() or t.ndim != 1 or ((t < -size) | (t >= size)).any():
            raise ValueError(f"{name}={values!r} must be {what}s in [-{size}, {size}) of the {size}")
        return torch.unique(t.long() % size)

    read = torch.arange(n) if positions is None else ids(positions, n, "position", "logit_positions")
    cols = None if tokens is None else ids(tokens, V, "token id", "logit_tokens")
    masked = torch.full_like(logits, math.nan)
    r = read.to(logits.device)
    if cols is None:
        masked[:, r] = logits[:, r]
    else:
        c = cols.to(logits.device)
        masked[:, r[:, None], c] = logits[:, r[:, None], c]
    want, got = _score(metric, logits), _score(metric, masked)
    if not torch.allclose(got, want, equal_nan=True):
        if tokens is None:
            raise ValueError(f"the metric reads logits at positions other than logit_positions="
                             f"{positions!r} (its value changes when the others are NaN); give every "
                             "position it reads, or None")
        said = " and ".join(f"{k}={v!r}" for k, v in (("logit_positions", positions),
                                                        ("logit_tokens", tokens)) if v is not None)
        raise ValueError(f"the metric reads logits other than {said} (its value changes when the "
                         "others are NaN); give every position and token it reads, or None")
    return read, cols


def _score_read(model: HookedGPT, metric: Metric, finals: list[Tensor], read: Tensor,
                shape: tuple[int, int, int], cols: Optional[Tensor] = None) -> list[Tensor]:
    """Each patch's metric of its logits [batch, pos, d_vocab]: the final norm and unembedding of
    its final stream at the positions read (and only the columns `cols` of W_U when given), all
    patches' rows in large batches (one read of W_U
    per batch), NaN elsewhere."""
    b, n, V = shape
    per_chunk = max(1, min(len(finals), 2 ** 27 // (b * n * V * 4)))  # logits of ~128 MiB
    at = read.to(finals[0].device)
    cols = None if cols is None else cols.to(at.device)
    unread = torch.ones(n, V, dtype=torch.bool, device=at.device)
    if cols is None:
        unread[at] = False
    else:
        unread[at[:, None], cols] = False
    buffer = finals[0].new_full((per_chunk * b, n, V), math.nan)  # NaN where not read
    scores: list[Tensor] = []
    for i in range(0, len(finals), per_chunk):
        rows = torch.cat(finals[i:i + per_chunk])  # [c * batch, len(read), d_model]
        logits = buffer[:len(rows)]
        where = at.expand(len(rows), -1)
        if cols is None:
            logits[:, at] = model.unembed_stage(rows, positions=where)
        else:
            logits[:, at[:, None], cols] = model.unembed_stage(rows, positions=where, tokens=cols)
        version = buffer._version
        scores += _scores(metric, logits, len(rows) // b)
        if buffer._version != version and unread.any():  # the metric wrote in place: NaN again
            buffer[:, unread] = math.nan
    return scores


def _plan(grid: list[Patch], todo: list[int], by_pos: bool, p0: int, k: int, n: int, batch: int,
          device) -> list[tuple[int, list[int]]]:
    """The forward passes of one layer's patches `todo` (indices into grid): (first position
    computed, grid indices). Runs compute the positions from p0 on (the prompts agree before it);
    per position, a run needs the positions from its earliest patch on; patches of nearby
    positions share a run where the extra rows cost less than another pass over the weights
    (a dynamic programme over the positions, counting a pass as `weight_rows` rows)."""
    chunks = lambda idx: [idx[i:i + k] for i in range(0, len(idx), k)]  # noqa: E731
    if not by_pos:
        return [(p0, c) for c in chunks(todo)]
    groups: dict[int, list[int]] = {}
    for j in todo:
        groups.setdefault(grid[j][0], []).append(j)
    ps = sorted(groups)
    counts = [0]
    for p in ps:
        counts.append(counts[-1] + len(groups[p]))
    weight_rows = 512 if torch.device(device).type == "cuda" else 32
    best, cut = [0.0] + [math.inf] * len(ps), [0] * (len(ps) + 1)
    for i in range(1, len(ps) + 1):
        for j in range(i):
            count = counts[i] - counts[j]
            cost = best[j] + math.ceil(count / k) * weight_rows + count * batch * (n - ps[j])
            if cost < best[i]:
                best[i], cut[i] = cost, j
    plan, i = [], len(ps)
    while i:
        j = cut[i]
        plan[:0] = [(ps[j], c) for c in chunks([g for p in ps[j:i] for g in groups[p]])]
        i = j
    return plan


def _prefix(base_kv: KVCache, p: int, copies: int) -> KVCache:
    """A frozen cache of the base run's keys and values before position p, for `copies` stacked
    runs of the positions from p on."""
    prefix = KVCache(len(base_kv.layers))
    for entry, base in zip(prefix.layers, base_kv.layers):
        entry.k, entry.v = (t[:, :p].repeat(copies, 1, 1, 1) for t in (base.k, base.v))
    prefix.freeze()
    return prefix


def _noops(grid: Sequence[tuple[Optional[int], object]], p0: int, n: int) -> tuple[list[bool], list[int]]:
    """(whether each patch (position or None for all, ...) lies wholly before p0, the indices
    of the others): a patch before p0 copies the base run's own values and scores the base run."""
    noop = [(n - 1 if q is None else q) < p0 for q, _ in grid]
    return noop, [j for j, skip in enumerate(noop) if not skip]


def _first_difference(base: Int[Tensor, "batch pos"], src: Int[Tensor, "batch pos"]) -> int:
    """The first position at which the base and source tokens differ in any prompt of the batch,
    pos when they are equal (_runs gives both one shape). Under causal attention every activation
    before it is the same in the two runs, so a patch there copies the base run's own value."""
    differ = (base != src).any(0).nonzero()
    return int(differ[0, 0]) if len(differ) else base.shape[1]


# ---------------------------------------------------------------------- attribution patching
def attribution_patch(model: HookedGPT, clean_tokens: Prompts,
                      corrupted_tokens: Prompts, metric: Metric, site: str = "z",
                      per: str = "head_pos", direction: str = "clean_to_corrupted",
                      batch_size: Optional[int] = None, memory_budget: Union[int, float, None] = None,
                      progress: bool = True) -> PatchResult:
    """The first-order estimate of activation patching's effect on the metric:
    (source_act - base_act) · d metric / d act at the base run, summed over the axes that `per`
    does not keep (and over the batch). One forward + backward on the base run and one forward
    on the source run, whatever the grid. values estimate `activation_patch(...).values -
    baseline`; they are exact where the metric is linear in the patched activation.
    batch_size, memory_budget and progress are accepted for a drop-in swap and not needed."""
    base, src = _runs(model, clean_tokens, corrupted_tokens, direction)
    _check_site(model, site, per)
    _check_chunking(batch_size, memory_budget)
    names = [act_name(site, l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(src, names_filter=names)
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> Tensor:
        if not x.requires_grad:  # frozen weights: start the graph at the first site
            x = x.detach().requires_grad_()
        acts[hook.name] = x
        return x

    with torch.enable_grad():
        base_logits = model.run_with_hooks(base, fwd_hooks=[(names, keep)])
        m = _score(metric, base_logits)
        if not m.requires_grad:
            raise ValueError("attribution patching differentiates the metric: metric(logits) must "
                             "return a tensor computed from the logits, not a number or a detached tensor")
        grads = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    pos_axis, head_axis = SITES[site]
    kept = [a for a, on in ((pos_axis, per.endswith("pos")), (head_axis, per.startswith("head"))) if on]
    rows = []
    for name, grad in zip(names, grads):
        delta = src_cache[name] - acts[name].detach()
        prod = delta * grad if grad is not None else torch.zeros_like(delta)
        prod = prod.sum(dim=[a for a in range(prod.ndim) if a not in kept])
        rows.append(prod.T if len(kept) == 2 and pos_axis < head_axis else prod)  # head before pos
    values = torch.stack(rows).float().cpu()
    baselines = _baselines(metric, base_logits.detach(), src_logits)
    return _result(model, values, base, src, site, per, direction, baselines)


# ---------------------------------------------------------------------- path patching
Receiver = Union[str, tuple]


def _parse_receivers(model: HookedGPT, receivers: Sequence[Receiver]) -> list[tuple[str, int, Optional[int]]]:
    """(hook name, layer, head or None) per receiver."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    usage = (f"a receiver is (layer, head, 'q'|'k'|'v') or a stream hook name such as "
             f"'blocks.{L - 1}.hook_resid_post' or ('resid_post', -1); stream hooks end in "
             f"{list(_STREAM_RECEIVERS)}")
    out = []
    for r in receivers:
        if isinstance(r, tuple) and len(r) == 3:
            l, h, c = r
            n = model.cfg.n_kv_heads if c in ("k", "v") else H  # keys and values: kv heads
            if not (isinstance(l, int) and -L <= l < L and isinstance(h, int) and 0 <= h < n
                    and c in ("q", "k", "v")):
                raise ValueError(f"receiver {r!r} is not valid for n_layers={L}, n_heads={H}, "
                                 f"n_kv_heads={model.cfg.n_kv_heads} (a 'k' or 'v' receiver is a "
                                 f"key/value head); {usage}")
            out.append((sites.name(f"{c}_input", l % L), l % L, h))
            continue
        try:
            name = act_name(*r, n_layers=L) if isinstance(r, tuple) else r
        except (KeyError, TypeError):
            name = None
        if not isinstance(name, str) or name not in model.hook_dict or not name.endswith(_STREAM_RECEIVERS):
            raise ValueError(f"receiver {r!r} is not valid; {usage}")
        out.append((name, model.hook_dict[name].layer(), None))
    if not out:
        raise ValueError(f"receivers is empty; {usage}")
    return out


def _parse_senders(model: HookedGPT, senders: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = []
    for s in senders:
        if not (isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(i, int) for i in s)
                and -L <= s[0] < L and 0 <= s[1] < H):
            raise ValueError(f"sender {s!r} is not a (layer, head) of a model with n_layers={L}, "
                             f"n_heads={H}")
        out.append((s[0] % L, s[1]))
    if not out:
        raise ValueError("senders is empty; give at least one (layer, head)")
    return out


def _check_paths(model: HookedGPT, senders: list[tuple[int, int]],
                 recv: list[tuple[str, int, Optional[int]]]) -> None:
    """Refuse a sender that reaches no receiver and a receiver that no sender reaches: that
    path does not exist, and patching along it would silently score the base run. A head in
    layer l writes at hook_attn_out of layer l; heads' q/k/v inputs and hook_resid_pre of layer
    l read before it, and so do layer l's MLP hook points when attention and MLP run in parallel."""
    after_attn = ["hook_attn_out", "hook_resid_mid", "hook_resid_post"]
    if not model.cfg.parallel_attn_mlp:
        after_attn += ["hook_mlp_in", "hook_mlp_out", "mlp.hook_pre", "mlp.hook_post"]
    # the last layer whose heads reach each receiver
    last = [l if name.endswith(tuple(after_attn)) else l - 1 for name, l, _ in recv]
    shown = [name if h is None else (l, h, name.split("hook_")[-1][0]) for name, l, h in recv]

    def rule(l: int) -> str:
        return (f"a head in layer {l} reaches the q/k/v inputs of heads in later layers and the "
                f"stream from blocks.{l}.hook_attn_out on, so receivers must be in a later layer "
                "than the senders (a path that does not exist would score the unpatched baseline)")

    for s in senders:
        if all(s[0] > lr for lr in last):
            raise ValueError(f"sender {s} reaches none of the receivers {shown}: {rule(s[0])}")
    for r, lr in zip(shown, last):
        if all(s[0] > lr for s in senders):
            raise ValueError(f"receiver {r!r} reads the stream before any sender {senders} writes "
                             f"to it: {rule(min(s[0] for s in senders))}")


def _path_runs(model: HookedGPT, base: Tensor, src: Tensor, metric: Metric,
               sender_sets: list[list[tuple[int, int]]], recv: list[tuple[str, int, Optional[int]]],
               k: int, progress: bool) -> tuple[list[Tensor], tuple[float, float]]:
    """Path-patch each sender set to the receivers, k sets per forward pass. The patched runs
    compute the positions from p0 on (the prompts agree before it, and so do both runs), over
    the base run's keys and values before p0; their logits before p0 are the base run's."""
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, base.shape[1]
    z_names = [act_name("z", l) for l in range(L)]
    stream = [sites.name("resid_pre", l) for l in range(L)]
    recv_names = list(dict.fromkeys(m for m, _, _ in recv))
    r_lo, r_hi = min(l for _, l, _ in recv), max(l for _, l, _ in recv) + 1
    p0 = _first_difference(base, src)
    scores: list[Tensor] = []
    with torch.no_grad(), tqdm(total=len(sender_sets), disable=not progress, desc="path patching") as bar:
        # 1. the base and source runs
        src_logits, src_cache = model.run_with_cache(src, names_filter=z_names)
        base_kv = KVCache(L) if 0 < p0 < n else None
        base_logits, base_cache = model.run_with_cache(base, names_filter=z_names + stream, past_kv=base_kv)
        baselines = _baselines(metric, base_logits, src_logits)
        if p0 == n:  # the same prompts: every sender's source value is its base value
            bar.update(len(sender_sets))
            return [_score(metric, base_logits)] * len(sender_sets), baselines
        src_z, base_z = ({m: cache[m][:, p0:] for m in z_names} for cache in (src_cache, base_cache))
        for i in range(0, len(sender_sets), k):
            sets = sender_sets[i:i + k]
            senders = torch.zeros(L, len(sets), H, dtype=torch.bool)
            for j, s in enumerate(sets):
                for l, h in s:
                    senders[l, j, h] = True
            senders = senders.to(base.device)[..., None, None, :, None]  # [L, k, 1, 1, H, 1]
            prefix = _prefix(base_kv, p0, len(sets)) if p0 else None  # frozen: both runs read it

            # 2. senders from the source run, every other head frozen at the base run; MLPs and
            #    LayerNorms recompute. Capture what the receivers read.
            def freeze(z: Tensor, hook) -> Tensor:
                m = hook.name
                return torch.where(senders[hook.layer()], src_z[m], base_z[m]).flatten(0, 1)

            captured: dict[tuple[str, Optional[int]], Tensor] = {}

            def grab(x: Tensor, hook) -> None:
                for m, _, h in recv:
                    if m == hook.name:
                        captured[m, h] = (x if h is None else x[:, :, h]).clone()

            start = min(r_lo, min(l for s in sets for l, _ in s))
            x = base_cache[stream[start]][:, p0:].repeat(len(sets), 1, 1)
            model.run_with_hooks(x, start_at_layer=start, stop_at_layer=r_hi, past_kv=prefix,
                                 fwd_hooks=[(z_names[start:r_hi], freeze), (recv_names, grab)])

            # 3. a run where only the receivers' inputs are patched
            def put(x: Tensor, hook) -> Tensor:
                x = x.clone()
                for m, _, h in recv:
                    if m == hook.name and h is None:
                        x = captured[m, h]
                    elif m == hook.name:
                        x[:, :, h] = captured[m, h]
                return x

            x = base_cache[stream[r_lo]][:, p0:].repeat(len(sets), 1, 1)
            out = model.run_with_hooks(x, start_at_layer=r_lo, past_kv=prefix, fwd_hooks=[(recv_names, put)])
            logits = out if not p0 else torch.cat([base_logits[:, :p0].repeat(len(sets), 1, 1), out], 1)
            scores += _scores(metric, logits, len(sets))
            bar.update(len(sets))
    return scores, baselines


def path_patch(model: HookedGPT, clean_tokens: Prompts,
               corrupted_tokens: Prompts, metric: Metric,
               senders: Sequence[Sequence[int]], receivers: Sequence[Receiver],
               direction: str = "clean_to_corrupted") -> float:
    """The metric when the senders' change (source run instead of base run) reaches the
    receivers only directly, as in the IOI paper (Wang et al., 2022): (1) cache both runs;
    (2) run the base input with the senders' z from the source run and every other head's z
    frozen at the base run (MLPs recompute), and record the receivers' inputs; (3) run the base
    input with only those inputs patched in and score it.

    senders: (layer, head) pairs. receivers: (layer, head, "q"|"k"|"v") for a head's query, key
    or value input (hook_q_input etc.), or a stream hook name ("blocks.3.hook_resid_post", or
    ("resid_post", -1) for the last layer). Each sender must reach a receiver and each
    receiver be reached by a sender: a head's q/k/v input in a later layer, or the stream from
    the sender's hook_attn_out on. The IOI paper's setup, with the senders carrying the
    corrupted (ABC) run into the clean one, is direction="corrupted_to_clean". Steps (2) and (3)
    compute only the positions from the first one where the prompts differ (in any prompt of
    the batch), over the base run's keys and values before it: there both runs agree."""
    base, src = _runs(model, clean_tokens, corrupted_tokens, direction)
    sets, recv = [_parse_senders(model, senders)], _parse_receivers(model, receivers)
    _check_paths(model, sets[0], recv)
    return float(_path_runs(model, base, src, metric, sets, recv, 1, False)[0][0])


def path_patch_senders(model: HookedGPT, clean_tokens: Prompts,
                       corrupted_tokens: Prompts, metric: Metric,
                       receivers: Sequence[Receiver], direction: str = "clean_to_corrupted",
                       batch_size: Optional[int] = None, memory_budget: Union[int, float, None] = None,
                       progress: bool = True) -> PatchResult:
    """path_patch from each head alone to `receivers`: values [n_layers, n_heads] (site "z",
    per "head"), several sender heads per forward pass as in activation_patch. A head with no
    path to the receivers (in their layer or later) scores the baseline."""
    base, src = _runs(model, clean_tokens, corrupted_tokens, direction)
    recv = _parse_receivers(model, receivers)
    _check_chunking(batch_size, memory_budget)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sets = [[(l, h)] for l in range(L) for h in range(H)]
    k = _chunk(model, base, batch_size, memory_budget, 2 * H * model.cfg.d_model)
    scores, baselines = _path_runs(model, base, src, metric, sets, recv, k, progress)
    values = torch.stack(scores).float().cpu().view(L, H)
    return _result(model, values, base, src, "z", "head", direction, baselines)
