"""TransformerLens's `transformer_lens.patching` over lens's patching engine: the same functions,
signatures and return values (tensors, or PatchingResult under reduce / baseline / several
metrics), with the patched runs stacked along the batch and each one starting at the patched
layer from the corrupted run's cached residual stream, instead of one full forward per patch.

As in TransformerLens, the corrupted tokens are run and activations from `clean_cache` are
patched in; `patching_metric(logits)` is called once per patch on that patch's own logits,
[batch, pos, d_vocab], exactly as in an unbatched run. Under grouped-query attention the head
index of a k / v patch is a key/value head (hook_k / hook_v carry n_kv_heads), as there.
On purpose, unlike TransformerLens: a clean activation whose shape does not match the corrupted
run's, and a patch_setter that returns None, raise instead of patching part of it or nothing.
Models other than lens models run TransformerLens's loop (one full forward per patch)."""

import hashlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from lens import sites
from lens.model import HookedGPT
from lens.patching import _chunk

__all__ = [
    "AxisNames", "CorruptedActivation", "Logits", "MetricFn", "PatchedActivation", "PatchingResult", "Reduce",
    "generic_activation_patch", "make_df_from_ranges", "layer_pos_patch_setter",
    "layer_pos_head_vector_patch_setter", "layer_head_vector_patch_setter", "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter", "layer_head_dest_src_pos_pattern_patch_setter",
    "get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every", "get_act_patch_block_every", "get_act_patch_direct_path",
    "get_act_patch_direct_path_all_sources"]

Logits = Tensor
AxisNames = Literal["layer", "pos", "head_index", "head", "src_pos", "dest_pos"]
CorruptedActivation = Tensor
PatchedActivation = Tensor
MetricFn = Callable[[Tensor], Tensor]
Reduce = Literal["scalar", "mean", "none"]
_REDUCE_MODES = ("scalar", "mean", "none")
_RESULT_AXIS_RENAMES = {"head_index": "head", "dest_pos": "pos"}
_AXIS_NAMES = ("layer", "pos", "head_index", "head", "src_pos", "dest_pos")


def make_df_from_ranges(column_max_ranges: Sequence[int], column_names: Sequence[str]):
    """A DataFrame of every combination of range(max) per column, the last column fastest."""
    import pandas as pd
    return pd.DataFrame(list(itertools.product(*[range(m) for m in column_max_ranges])),
                        columns=list(column_names))


# ---------------------------------------------------------------------- statistics
# As transformer_lens.utilities.statistics, so that PatchingResult's intervals and p-values are
# TransformerLens's numbers for the same seed.
def _derive_generator(seed: int, *labels: object) -> torch.Generator:
    key = ":".join([str(seed), *(str(label) for label in labels)]).encode()
    derived = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & 0x7FFFFFFFFFFFFFFF
    return torch.Generator(device="cpu").manual_seed(derived)


def _bootstrap_ci(x: Tensor, statistic: str, confidence: float, n_resamples: int,
                  gen: torch.Generator, chunk: int = 256) -> tuple[Tensor, Tensor]:
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic={statistic!r}; valid values are 'mean' and 'median'")
    if not 0.0 < confidence < 1.0 or n_resamples < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1) and n_resamples={n_resamples} >= 1")
    n = x.shape[-1]
    reduce = torch.mean if statistic == "mean" else lambda t, dim: t.median(dim=dim).values
    stats = []
    for start in range(0, n_resamples, chunk):
        idx = torch.randint(0, n, (min(chunk, n_resamples - start), n), generator=gen).to(x.device)
        stats.append(reduce(x[..., idx], dim=-1))
    draws = torch.cat(stats, dim=-1).to(torch.promote_types(x.dtype, torch.float32))
    alpha = (1.0 - confidence) / 2.0
    return (torch.quantile(draws, alpha, dim=-1).to(x.dtype),
            torch.quantile(draws, 1.0 - alpha, dim=-1).to(x.dtype))


def _sign_flip_pvalue(effects: Tensor, n_permutations: int, gen: torch.Generator,
                      alternative: str) -> Tensor:
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative={alternative!r}; valid values are 'two-sided', 'greater', 'less'")
    x = effects.to(torch.promote_types(effects.dtype, torch.float32))
    n = x.shape[-1]
    observed = x.mean(dim=-1, keepdim=True)
    tolerance = observed.abs() * (100 * torch.finfo(x.dtype).eps)

    def hits(signs: Tensor) -> Tensor:
        null = (x.unsqueeze(-2) * signs).mean(dim=-1)
        hit = (null.abs() >= observed.abs() - tolerance if alternative == "two-sided" else
               null >= observed - tolerance if alternative == "greater" else null <= observed + tolerance)
        return hit.sum(dim=-1).to(x.dtype)

    if n <= 12:  # every sign pattern: exact
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=x.dtype, device=x.device)
        return hits(signs) / signs.shape[0]
    total = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, n_permutations, 256):
        count = min(256, n_permutations - start)
        total = total + hits(torch.randint(0, 2, (count, n), generator=gen).to(x.device).to(x.dtype) * 2 - 1)
    return (total + 1.0) / (n_permutations + 1.0)


@dataclass
class PatchingResult:
    """Per-example (or per-metric) patching results, as TransformerLens's: values laid out
    [metric?, *axes | n_rows, batch?] (the metric axis only when a mapping of metrics was given,
    the batch axis only when not `reduced`); baseline is the unpatched corrupted run's metric."""

    values: Tensor
    axis_names: list
    index_df: Any
    metric_names: list
    reduced: bool
    baseline: Optional[Tensor] = None
    has_metric_axis: bool = False
    patch_type_names: Optional[list] = None

    def __getitem__(self, metric_name: str) -> "PatchingResult":
        """One metric's result, with the metric axis dropped."""
        if metric_name not in self.metric_names:
            raise KeyError(f"unknown metric {metric_name!r}; have {self.metric_names}")
        if not self.has_metric_axis:
            return self
        i = self.metric_names.index(metric_name)
        return PatchingResult(self.values[i], list(self.axis_names), self.index_df, [metric_name],
                              self.reduced, None if self.baseline is None else self.baseline[i],
                              False, self.patch_type_names)

    def _per_example(self, what: str) -> None:
        if self.reduced:
            raise ValueError(f"{what} needs per-example values; run the sweep with reduce='none'")

    def mean(self) -> Tensor:
        """Batch mean per cell (values itself when already reduced)."""
        return self.values if self.reduced else self.values.mean(dim=-1)

    def stderr(self) -> Tensor:
        """Standard error of the batch mean per cell (needs at least 2 examples)."""
        self._per_example("stderr")
        n = self.values.shape[-1]
        if n < 2:
            raise ValueError(f"stderr needs at least 2 examples, got {n}")
        return self.values.std(dim=-1, unbiased=True) / math.sqrt(n)

    def _broadcast_baseline(self) -> Tensor:
        if self.baseline is None:
            raise ValueError("effect needs a baseline; run the sweep with baseline=True")
        lead = 1 if self.has_metric_axis else 0
        middle = self.values.ndim - lead - (0 if self.reduced else 1)
        return self.baseline.reshape(tuple(self.baseline.shape[:lead]) + (1,) * middle
                                     + tuple(self.baseline.shape[lead:]))

    def effect(self) -> Tensor:
        """values - baseline: the change each patch makes to the corrupted run."""
        return self.values - self._broadcast_baseline()

    def normalized(self, clean_baseline) -> Tensor:
        """(values - corrupted) / (clean - corrupted): 0 the patch did nothing, 1 it restored the
        clean metric. clean_baseline is shaped like baseline."""
        corrupted = self._broadcast_baseline()
        clean = torch.as_tensor(clean_baseline, dtype=self.values.dtype, device=self.values.device)
        if clean.shape != self.baseline.shape:
            raise ValueError(f"clean_baseline must match baseline shape {tuple(self.baseline.shape)}, "
                             f"got {tuple(clean.shape)}")
        return (self.values - corrupted) / (clean.reshape(corrupted.shape) - corrupted)

    def bootstrap_ci(self, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0,
                     statistic: str = "mean", of_effect: bool = False) -> tuple[Tensor, Tensor]:
        """Percentile bootstrap interval (low, high) of the batch statistic per cell."""
        self._per_example("bootstrap_ci")
        data = self.effect() if of_effect else self.values
        return _bootstrap_ci(data, statistic, confidence, n_resamples,
                             _derive_generator(seed, "bootstrap", statistic))

    def permutation_pvalue(self, *, n_permutations: int = 1000, seed: int = 0,
                           alternative: str = "two-sided") -> Tensor:
        """Sign-flip permutation p-value that each cell's mean effect is zero (needs baseline)."""
        self._per_example("permutation_pvalue")
        return _sign_flip_pvalue(self.effect(), n_permutations, _derive_generator(seed, "permutation"),
                                 alternative)

    def to_dataframe(self):
        """Long form: one row per (metric, swept cell, example) with the value."""
        import pandas as pd
        values = self.values if self.has_metric_axis else self.values.unsqueeze(0)
        flat = values.reshape(len(self.metric_names), len(self.index_df), -1).detach().cpu()
        rows = []
        for m, name in enumerate(self.metric_names):
            for c, (_, index_row) in enumerate(self.index_df.iterrows()):
                for b in range(flat.shape[-1]):
                    row = {"metric": name, **index_row.to_dict()}
                    if self.patch_type_names is not None and "patch_type" in row:
                        row["patch_type_name"] = self.patch_type_names[int(row["patch_type"])]
                    if not self.reduced:
                        row["example"] = b
                    row["value"] = flat[m, c, b].item()
                    rows.append(row)
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------- patch setters
# TransformerLens's, unchanged: each copies the clean activation into the corrupted one (in place)
# at `index` = [layer, ...]. The batched engine recognises them and patches through a mask instead.
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]; the activation is [batch, pos, ...]."""
    layer, pos = _unpack(index, 2, "layer_pos_patch_setter")
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head_index]; the activation is [batch, pos, head_index, ...]."""
    layer, pos, head_index = _unpack(index, 3, "layer_pos_head_vector_patch_setter")
    corrupted_activation[:, pos, head_index] = clean_activation[:, pos, head_index]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; the activation is [batch, pos, head_index, ...]."""
    layer, head_index = _unpack(index, 2, "layer_head_vector_patch_setter")
    corrupted_activation[:, :, head_index] = clean_activation[:, :, head_index]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; the activation is [batch, head_index, dest_pos, src_pos]."""
    layer, head_index = _unpack(index, 2, "layer_head_pattern_patch_setter")
    corrupted_activation[:, head_index, :, :] = clean_activation[:, head_index, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos]; the activation is [batch, head_index, dest_pos, src_pos]."""
    layer, head_index, dest_pos = _unpack(index, 3, "layer_head_pos_pattern_patch_setter")
    corrupted_activation[:, head_index, dest_pos, :] = clean_activation[:, head_index, dest_pos, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos, src_pos]; the activation is [batch, head_index,
    dest_pos, src_pos]."""
    layer, head_index, dest_pos, src_pos = _unpack(index, 4, "layer_head_dest_src_pos_pattern_patch_setter")
    at = (slice(None), head_index, dest_pos, src_pos)
    corrupted_activation[at] = clean_activation[at]
    return corrupted_activation


def _unpack(index, n: int, setter: str) -> list:
    if len(index) != n:
        raise ValueError(f"{setter} takes an index of {n} entries (layer first), got {list(index)}")
    return list(index)


# setter name -> the activation axes that index[1:] selects along
_SETTER_AXES = {"layer_pos_patch_setter": (1,), "layer_pos_head_vector_patch_setter": (1, 2),
                "layer_head_vector_patch_setter": (2,), "layer_head_pattern_patch_setter": (1,),
                "layer_head_pos_pattern_patch_setter": (1, 2),
                "layer_head_dest_src_pos_pattern_patch_setter": (1, 2, 3)}


def _setter_axes(setter) -> Optional[tuple[int, ...]]:
    """The axes of one of the setters above (lens's or TransformerLens's own), None for others."""
    if getattr(setter, "__module__", None) in (__name__, "transformer_lens.patching"):
        return _SETTER_AXES.get(getattr(setter, "__name__", None))
    return None


# ---------------------------------------------------------------------- names and checks
def _act_name(name: str, layer: int) -> str:
    """TransformerLens's utils.get_act_name(name, layer): "z", 3 -> "blocks.3.attn.hook_z"."""
    from lens.tl.utils import get_act_name
    return get_act_name(name, layer)


def _valid_names(model) -> list[str]:
    return [s for s, (owner, _) in sites.SITES.items()
            if owner is not None and _act_name(s, 0) in model.hook_dict]


def _check_name(model, activation_name) -> None:
    if not isinstance(activation_name, str):
        raise ValueError(f"activation_name must be a short name such as 'z', got {activation_name!r}")
    name = _act_name(activation_name, 0)
    if hasattr(model, "hook_dict") and name not in model.hook_dict:
        why = model.why_absent(name) if hasattr(model, "why_absent") else None
        raise ValueError(f"activation_name={activation_name!r} names {name!r}, which is not a hook "
                         f"point of this model{' (' + why + ')' if why else ''}; valid activation "
                         f"names are {_valid_names(model)}")


def _check_tokens(model, tokens) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise ValueError("corrupted_tokens must be an integer tensor [batch, pos], got "
                         f"{type(tokens).__name__}")
    if isinstance(model, HookedGPT):
        return model.check_tokens(tokens)
    return tokens


def _require_eval(model, operation: str) -> None:
    """TransformerLens's refusal of a model in training mode; lens models are exempt, because
    nothing in them depends on it (no dropout), and lens's loaders leave them in training mode."""
    if isinstance(model, torch.nn.Module) and not isinstance(model, HookedGPT):
        training = [n or "<root>" for n, m in model.named_modules() if m.training]
        if training:
            more = f", and {len(training) - 3} more" if len(training) > 3 else ""
            raise ValueError(f"{operation} requires the model and all submodules to be in evaluation "
                             f"mode; found training mode at {', '.join(training[:3])}{more}. Call "
                             "model.eval() before running the analysis.")


def _clean(model, clean_cache, name: str, tokens: Optional[Tensor] = None) -> Tensor:
    """clean_cache[name], checked against the shape the corrupted run gives it when tokens are given."""
    try:
        act = clean_cache[name]
    except KeyError:
        raise ValueError(f"the cache has no {name!r}; cache the run with model.run_with_cache(tokens) "
                         "and a names_filter that includes it") from None
    if not isinstance(act, Tensor):
        raise ValueError(f"cache[{name!r}] is a {type(act).__name__}, not a tensor")
    if tokens is not None and isinstance(model, HookedGPT):
        c, (b, n) = model.cfg, tokens.shape
        size = {"batch": b, "pos": n, "query_pos": n, "key_pos": n, "head": c.n_heads,
                "kv_head": c.n_kv_heads, "d_head": c.d_head, "d_model": c.d_model, "d_mlp": c.d_mlp,
                "d_vocab": c.d_vocab, "1": 1}
        want = tuple(size[a] for a in sites.axes(name))
        if act.shape[1:] != want[1:] or act.shape[0] not in (1, b):
            raise ValueError(f"clean_cache[{name!r}] has shape {tuple(act.shape)}, but corrupted_tokens "
                             f"of shape {tuple(tokens.shape)} give this activation the shape {want} "
                             f"{sites.axes(name)}; the clean and corrupted prompts must have the same "
                             "number of positions (and the same batch, or a clean batch of 1)")
    return act


def _evaluator(metrics: dict, batch: int, per_example: bool, reduce: str, device) -> Callable:
    def evaluate(logits: Tensor) -> Tensor:
        """Every metric on one run's logits: [metric, batch?] after checking what each returned."""
        rows = []
        for name, fn in metrics.items():
            out = fn(logits)
            try:
                out = torch.as_tensor(out)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"patching_metric {name!r} returned a {type(out).__name__}; it must "
                                 "return a number or a tensor") from None
            if per_example and tuple(out.shape) != (batch,):
                raise ValueError(f"patching_metric {name!r} must return a [batch] tensor of length "
                                 f"{batch} under reduce={reduce!r}, got shape {tuple(out.shape)}")
            if not per_example and out.ndim != 0:
                raise ValueError(f"patching_metric {name!r} must return a scalar under reduce='scalar', "
                                 f"got shape {tuple(out.shape)}; return a [batch] tensor and pass "
                                 "reduce='mean' or reduce='none' to keep per-example values")
            rows.append(out.detach().to(device, torch.float32))
        return torch.stack(rows)
    return evaluate


def _rows(model, tokens, activation_name, index_axis_names, index_df) -> tuple[list, tuple, bool]:
    """(index rows, the shape of the result's cell axes, whether the output is flattened)."""
    if index_df is not None:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        rows = [tuple(int(v) for v in r) for r in index_df.itertuples(index=False)]
        return rows, (len(rows),), True
    if index_axis_names is None:
        raise ValueError(f"give index_axis_names (the axes to sweep, layer first, from {_AXIS_NAMES}) "
                         "or index_df")
    cfg, n = model.cfg, tokens.shape[-1]
    if isinstance(model, HookedGPT):  # the sites table says whether the head axis is kv heads
        kv = "kv_head" in sites.axes(_act_name(activation_name, 0))
        heads = cfg.n_kv_heads if kv else cfg.n_heads
    else:  # TransformerLens's rule
        kv = activation_name in ("k", "v") and cfg.n_key_value_heads is not None
        heads = cfg.n_key_value_heads if kv else cfg.n_heads
    size = {"layer": cfg.n_layers, "pos": n, "src_pos": n, "dest_pos": n, "head_index": heads, "head": heads}
    bad = [a for a in index_axis_names if a not in size]
    if bad:
        raise ValueError(f"index_axis_names {bad} unknown; valid axis names are {_AXIS_NAMES}")
    shape = tuple(size[a] for a in index_axis_names)
    return list(itertools.product(*[range(s) for s in shape])), shape, False


# ---------------------------------------------------------------------- the engine
def _batched(model: HookedGPT, tokens: Tensor, clean_cache, evaluate: Callable, setter,
             activation_name: str, rows: list, k: int, progress: bool) -> tuple[list, Tensor]:
    """Each row's metric values, k patches stacked per forward pass, each run starting at the
    patched layer from the corrupted run's stream; also the unpatched corrupted run's values."""
    L, b = model.cfg.n_layers, tokens.shape[0]
    axes = _setter_axes(setter)
    by_layer: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if not r or not isinstance(r[0], int) or not 0 <= r[0] < L:
            raise ValueError(f"index {list(r)} does not start with a layer in [0, n_layers={L})")
        if axes is not None and len(r) != len(axes) + 1:
            raise ValueError(f"{setter.__name__} takes an index of {len(axes) + 1} entries (layer "
                             f"first), got {list(r)}")
        by_layer.setdefault(r[0], []).append(i)
    names = {l: _act_name(activation_name, l) for l in by_layer}
    cleans = {l: _clean(model, clean_cache, names[l], tokens if axes is not None else None)
              for l in by_layer}
    stream = {l: sites.name("resid_pre", l) for l in by_layer}
    out: list = [None] * len(rows)
    with torch.no_grad(), tqdm(total=len(rows), disable=not progress) as bar:
        base_logits, base_cache = model.run_with_cache(tokens, names_filter=list(stream.values()))
        baseline = evaluate(base_logits)
        for l, ids in by_layer.items():
            source = cleans[l] if axes is None else cleans[l].to(tokens.device)  # setters get it as cached
            for i in range(0, len(ids), k):
                chunk = ids[i:i + k]
                if axes is not None:
                    mask = _mask([rows[j][1:] for j in chunk], tuple(source.shape), axes, names[l])
                    mask = mask.to(tokens.device)

                    def hook(act, hook, mask=mask):
                        stacked = act.unflatten(0, (mask.shape[0], -1))
                        return torch.where(mask, source.to(act.dtype), stacked).flatten(0, 1)
                else:
                    def hook(act, hook, chunk=chunk):
                        stacked, patched = act.unflatten(0, (len(chunk), -1)), []
                        for c, j in enumerate(chunk):
                            a = stacked[c].clone()
                            patched.append(_set(setter, a, list(rows[j]), source))
                        return torch.stack(patched).flatten(0, 1)
                x = base_cache[stream[l]].repeat(len(chunk), 1, 1)
                logits = model.run_with_hooks(x, start_at_layer=l, fwd_hooks=[(names[l], hook)])
                for c, j in enumerate(chunk):
                    out[j] = evaluate(logits[c * b:(c + 1) * b])
                bar.update(len(chunk))
    return out, baseline


def _mask(indices: list, shape: tuple, axes: tuple, name: str) -> Tensor:
    """Boolean [k, 1, ...] over k stacked copies of an activation of `shape` [batch, ...]: copy i
    is True where index i selects (along `axes`), as the setter's slice assignment would."""
    k = len(indices)
    mask = torch.ones([k, 1] + [1] * (len(shape) - 1), dtype=torch.bool)
    for col, axis in enumerate(axes):
        if axis >= len(shape):
            raise ValueError(f"the setter indexes axis {axis} of {name!r}, which has shape {shape}")
        idx = torch.tensor([ix[col] for ix in indices])
        bad = ((idx < -shape[axis]) | (idx >= shape[axis])).nonzero()
        if len(bad):
            raise ValueError(f"index {list(indices[int(bad[0])])} (after the layer) is out of range for "
                             f"axis {axis} of {name!r}, which has shape {shape}")
        view = [k] + [1] * len(shape)
        view[axis + 1] = shape[axis]
        mask = mask & (torch.arange(shape[axis]) == (idx % shape[axis])[:, None]).view(view)
    return mask


def _set(setter, act: Tensor, index: list, clean: Tensor) -> Tensor:
    out = setter(act, index, clean)
    if not isinstance(out, Tensor):
        raise ValueError(f"patch_setter returned {type(out).__name__} for index {index}; it must return "
                         "the patched activation (TransformerLens drops in-place edits of an activation "
                         "that requires grad when the setter returns None)")
    return out


def _loop(model, tokens: Tensor, clean_cache, evaluate: Callable, setter, activation_name: str,
          rows: list, progress: bool) -> tuple[list, Tensor]:
    """TransformerLens's algorithm, for models that are not lens models: one full forward of the
    corrupted run per row, the setter applied in a hook."""
    baseline = evaluate(model.run_with_hooks(tokens, fwd_hooks=[]))
    out = []
    for r in tqdm(rows, disable=not progress):
        name = _act_name(activation_name, r[0])
        clean = _clean(model, clean_cache, name)

        def hook(act, hook):
            return _set(setter, act.clone() if act.requires_grad else act, list(r), clean)
        out.append(evaluate(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])))
    return out, baseline


def generic_activation_patch(
        model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache, patching_metric,
        patch_setter: Callable, activation_name: str, index_axis_names: Optional[Sequence[str]] = None,
        index_df=None, return_index_df: bool = False, *, reduce: str = "scalar", baseline: bool = False,
        batch_size: Optional[int] = None, memory_budget: Union[int, float, None] = None,
        progress: bool = True):
    """Patch `activation_name` of each index from clean_cache into the run of corrupted_tokens and
    score each patched run with patching_metric (TransformerLens's generic_activation_patch).

    index_axis_names (e.g. ("layer", "pos", "head")) sweeps every combination and returns a tensor
    with one axis per name; index_df (a DataFrame, layer first) sweeps its rows and returns one
    value per row. patch_setter(corrupted_activation, index, clean_activation) -> activation does
    the patch; TransformerLens's setters (defined here) run as a mask over stacked copies, any
    other setter is called once per patch on that patch's copy of the activation.

    reduce="scalar" (the metric returns a scalar), "mean" (it returns [batch], averaged) or
    "none" (kept: a PatchingResult); baseline=True adds the unpatched corrupted run's metric; a
    mapping of metrics scores each patch with all of them. Keyword-only, beyond TransformerLens:
    batch_size (patches per forward; default as many as fit in memory_budget bytes, see
    lens.patching.activation_patch) and progress (the progress bar)."""
    _require_eval(model, "activation patching")
    if reduce not in _REDUCE_MODES:
        raise ValueError(f"reduce must be one of {_REDUCE_MODES}, got {reduce!r}")
    has_metric_axis = isinstance(patching_metric, Mapping)
    metrics = dict(patching_metric) if has_metric_axis else {"metric": patching_metric}
    if not metrics:
        raise ValueError("patching_metric mapping must contain at least one metric")
    bad = [n for n, fn in metrics.items() if not callable(fn)]
    if bad:
        raise ValueError(f"patching_metric {bad} is not callable; give fn(logits) -> scalar")
    want_result = has_metric_axis or reduce == "none" or baseline
    if want_result and return_index_df:
        raise ValueError("return_index_df only applies to the tensor return; a PatchingResult "
                         "carries index_df")
    _check_name(model, activation_name)
    tokens = _check_tokens(model, corrupted_tokens)
    rows, cell_shape, flattened = _rows(model, tokens, activation_name, index_axis_names, index_df)
    batch = int(tokens.shape[0])
    device = model.cfg.device
    evaluate = _evaluator(metrics, batch, reduce != "scalar", reduce, device)
    if isinstance(model, HookedGPT):
        extra = 2 * model.cfg.n_heads * model.cfg.d_model if activation_name == "result" else 0
        k = _chunk(model, tokens, batch_size, memory_budget, extra)
        values, base = _batched(model, tokens, clean_cache, evaluate, patch_setter, activation_name,
                                rows, k, progress)
    else:
        values, base = _loop(model, tokens, clean_cache, evaluate, patch_setter, activation_name,
                             rows, progress)
    tail = (batch,) if reduce != "scalar" else ()
    store = torch.stack(values, 1) if values else torch.zeros(len(metrics), 0, *tail, device=device)
    store = store.reshape(len(metrics), *cell_shape, *tail)
    if reduce == "mean":
        store, base = store.mean(dim=-1), base.mean(dim=-1)
    if not want_result and not return_index_df:
        return store[0]
    if index_df is None:
        index_df = make_df_from_ranges(cell_shape, index_axis_names)
    if not want_result:
        return store[0], index_df
    return PatchingResult(values=store if has_metric_axis else store[0],
                          axis_names=[] if flattened else list(index_axis_names), index_df=index_df,
                          metric_names=list(metrics), reduced=reduce != "none",
                          baseline=None if not baseline else (base if has_metric_axis else base[0]),
                          has_metric_axis=has_metric_axis)


# ---------------------------------------------------------------------- the named sweeps
def _sweep(setter, name: str, axes: tuple, doc: str):
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=name, index_axis_names=axes)
    fn.__doc__ = (f"{doc}, shaped [{', '.join(_AXIS_LABELS[a] for a in axes)}] (TransformerLens's "
                  f"function of this name): generic_activation_patch of {name!r} over {axes}.")
    return fn


_AXIS_LABELS = {"layer": "n_layers", "pos": "pos", "head": "n_heads", "head_index": "n_heads",
                "dest_pos": "dest_pos", "src_pos": "src_pos"}
_POS, _PHV, _HV = layer_pos_patch_setter, layer_pos_head_vector_patch_setter, layer_head_vector_patch_setter
_HP, _HDP = layer_head_pattern_patch_setter, layer_head_pos_pattern_patch_setter
_LP, _LPH, _LH = ("layer", "pos"), ("layer", "pos", "head"), ("layer", "head")
_KV = " (n_kv_heads under grouped-query attention)"
get_act_patch_resid_pre = _sweep(_POS, "resid_pre", _LP, "The stream entering each block, by position")
get_act_patch_resid_mid = _sweep(_POS, "resid_mid", _LP, "The stream between attention and MLP, by position")
get_act_patch_attn_out = _sweep(_POS, "attn_out", _LP, "Each attention layer's output, by position")
get_act_patch_mlp_out = _sweep(_POS, "mlp_out", _LP, "Each MLP layer's output, by position")
get_act_patch_attn_head_out_by_pos = _sweep(_PHV, "z", _LPH, "Each head's output (z), by position")
get_act_patch_attn_head_q_by_pos = _sweep(_PHV, "q", _LPH, "Each head's queries, by position")
get_act_patch_attn_head_k_by_pos = _sweep(_PHV, "k", _LPH, "Each head's keys, by position" + _KV)
get_act_patch_attn_head_v_by_pos = _sweep(_PHV, "v", _LPH, "Each head's values, by position" + _KV)
get_act_patch_attn_head_pattern_by_pos = _sweep(_HDP, "pattern", ("layer", "head_index", "dest_pos"),
                                                "Each head's attention pattern, by destination position")
get_act_patch_attn_head_pattern_dest_src_pos = _sweep(
    layer_head_dest_src_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos", "src_pos"),
    "Each entry of each head's attention pattern")
get_act_patch_attn_head_out_all_pos = _sweep(_HV, "z", _LH, "Each head's output (z), all positions at once")
get_act_patch_attn_head_q_all_pos = _sweep(_HV, "q", _LH, "Each head's queries, all positions at once")
get_act_patch_attn_head_k_all_pos = _sweep(_HV, "k", _LH, "Each head's keys, all positions at once" + _KV)
get_act_patch_attn_head_v_all_pos = _sweep(_HV, "v", _LH, "Each head's values, all positions at once" + _KV)
get_act_patch_attn_head_pattern_all_pos = _sweep(_HP, "pattern", ("layer", "head_index"),
                                                 "Each head's attention pattern, all positions at once")

_HEAD_TYPES = ("out", "q", "k", "v", "pattern")
_BLOCK_TYPES = ("resid_pre", "attn_out", "mlp_out")


def _stack_patch_types(results: list, axis_order: Sequence[str], n_heads: int, type_names: Sequence[str]):
    """Stack PatchingResults on a leading patch_type axis, each permuted to axis_order and its head
    axis zero-padded to n_heads (GQA k / v), as TransformerLens does."""
    if not all(isinstance(r, PatchingResult) for r in results):
        raise TypeError("cannot stack tensor and PatchingResult sweeps together")
    first = results[0]
    if any(r.metric_names != first.metric_names or r.reduced != first.reduced for r in results[1:]):
        raise ValueError("every sweep must use the same metrics and reduce mode to be stacked")
    head_axis = list(axis_order).index("head") if "head" in axis_order else None
    lead = 1 if first.has_metric_axis else 0
    values = []
    for r in results:
        names = [_RESULT_AXIS_RENAMES.get(n, n) for n in r.axis_names]
        if sorted(names) != sorted(axis_order):
            raise ValueError(f"sweep axes {names} do not match {list(axis_order)}")
        lr = 1 if r.has_metric_axis else 0
        perm = list(range(lr)) + [lr + names.index(n) for n in axis_order]
        v = r.values.permute(*perm, *range(lr + len(names), r.values.ndim))
        if head_axis is not None and n_heads > v.shape[lr + head_axis]:
            pad = list(v.shape)
            pad[lr + head_axis] = n_heads - v.shape[lr + head_axis]
            v = torch.cat([v, v.new_zeros(pad)], dim=lr + head_axis)
        values.append(v)
    stacked = torch.stack(values, dim=lead)
    cells = list(stacked.shape[lead:lead + 1 + len(axis_order)])
    return PatchingResult(stacked, ["patch_type", *axis_order],
                          make_df_from_ranges(cells, ["patch_type", *axis_order]), list(first.metric_names),
                          first.reduced, first.baseline, first.has_metric_axis, list(type_names))


def _run_sweeps(sweeps, axis_names, model, corrupted_tokens, clean_cache, metric, kwargs) -> list:
    """The helper's sweeps, a requested baseline computed by the first only."""
    baseline = bool(kwargs.pop("baseline", False))
    results = []
    for i, (sweep, axes) in enumerate(zip(sweeps, axis_names)):
        out = sweep(model, corrupted_tokens, clean_cache, metric, baseline=baseline and i == 0, **kwargs)
        if baseline and isinstance(out, Tensor):
            out = PatchingResult(out, list(axes), make_df_from_ranges(list(out.shape), list(axes)),
                                 ["metric"], True)
        results.append(out)
    return results


def _pad_heads(t: Tensor, n_heads: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, n_heads - t.size(-1)))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Every head across all positions for each of out, q, k, v, pattern: [5, n_layers, n_heads]
    (k and v zero-padded to n_heads under GQA). reduce / baseline as in generic_activation_patch."""
    sweeps = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
              get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
              get_act_patch_attn_head_pattern_all_pos)
    results = _run_sweeps(sweeps, (("layer", "head"),) * 4 + (("layer", "head_index"),), model,
                          corrupted_tokens, clean_cache, metric, kwargs)
    if all(isinstance(r, Tensor) for r in results):
        n = results[0].size(-1)
        return torch.stack([_pad_heads(r, n) if i in (2, 3) else r for i, r in enumerate(results)])
    return _stack_patch_types(results, ("layer", "head"), model.cfg.n_heads, _HEAD_TYPES)


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """Every head by position for each of out, q, k, v, pattern: [5, n_layers, pos, n_heads]
    (k and v zero-padded to n_heads under GQA)."""
    sweeps = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
              get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos,
              get_act_patch_attn_head_pattern_by_pos)
    results = _run_sweeps(sweeps, (("layer", "pos", "head"),) * 4 + (("layer", "head_index", "dest_pos"),),
                          model, corrupted_tokens, clean_cache, metric, kwargs)
    if all(isinstance(r, Tensor) for r in results):
        n = results[0].size(-1)
        out = [_pad_heads(r, n) if i in (2, 3) else r for i, r in enumerate(results)]
        out[4] = out[4].transpose(1, 2)  # [layer, head, pos] -> [layer, pos, head]
        return torch.stack(out)
    return _stack_patch_types(results, ("layer", "pos", "head"), model.cfg.n_heads, _HEAD_TYPES)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric, **kwargs):
    """resid_pre, attn_out and mlp_out of each block by position: [3, n_layers, pos]."""
    results = _run_sweeps((get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out),
                          (("layer", "pos"),) * 3, model, corrupted_tokens, clean_cache, metric, kwargs)
    if all(isinstance(r, Tensor) for r in results):
        return torch.stack(results)
    return _stack_patch_types(results, ("layer", "pos"), 0, _BLOCK_TYPES)


# ---------------------------------------------------------------------- direct path patching
def _check_direct_path(model, src_layers: Sequence[int], component: str, operation: str) -> None:
    if not isinstance(model, HookedGPT):
        raise ValueError(f"lens.tl's {operation} runs on lens models; use transformer_lens.patching "
                         f"for a {type(model).__name__}")
    cfg = model.cfg
    if component not in ("q", "k", "v"):
        raise ValueError(f"component={component!r}; valid values are 'q', 'k', 'v'")
    post = [l for l in src_layers if model.blocks[l].post_norms]
    if post:
        raise ValueError(f"per-head attention outputs are normalized before the residual add on this "
                         f"architecture (blocks.{post[0]} has a post-attention norm), so a source "
                         "head's residual write is not hook_z @ W_O and direct path patching is "
                         "unsupported here.")
    if component != "q" and cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"component={component!r} is unsupported here: the model has n_key_value_heads="
                         f"{cfg.n_kv_heads} for n_heads={cfg.n_heads} (GQA/MQA), so per-query-head K/V "
                         'semantics are undefined. component="q" is available.')


def _direct_path(model: HookedGPT, tokens: Tensor, stream, delta: Tensor, src_layer: int,
                 metric: Callable, component: str, batch_size: Optional[int], progress: bool,
                 desc: str) -> Tensor:
    """metric with delta added to each later head's own pre-norm copy of the stream (its
    hook_{component}_input), up to batch_size heads of one layer stacked per forward pass, each
    run starting at that layer from the corrupted stream."""
    L, H, b = model.cfg.n_layers, model.cfg.n_heads, tokens.shape[0]
    results = torch.zeros(L, H, device=model.cfg.device)
    k = min(H, _chunk(model, tokens, batch_size, None, 3 * H * model.cfg.d_model))
    with torch.no_grad(), tqdm(total=(L - src_layer - 1) * H, desc=desc, disable=not progress) as bar:
        for l in range(src_layer + 1, L):
            for h0 in range(0, H, k):
                heads = torch.arange(h0, min(h0 + k, H), device=delta.device)
                mask = (torch.arange(H, device=delta.device) == heads[:, None])[:, None, None, :, None]

                def hook(x, hook, mask=mask):
                    stacked = x.unflatten(0, (mask.shape[0], -1))
                    return torch.where(mask, stacked + delta[:, :, None, :], stacked).flatten(0, 1)
                x = stream[sites.name("resid_pre", l)].repeat(len(heads), 1, 1)
                logits = model.run_with_hooks(x, start_at_layer=l,
                                              fwd_hooks=[(sites.name(f"{component}_input", l), hook)])
                for c, h in enumerate(heads.tolist()):
                    v = torch.as_tensor(metric(logits[c * b:(c + 1) * b]))
                    if v.numel() != 1:
                        raise ValueError(f"patching_metric must return a scalar, got shape {tuple(v.shape)}")
                    results[l, h] = v.reshape(())
                bar.update(len(heads))
    return results


def _corrupted_stream(model: HookedGPT, corrupted_tokens) -> tuple[Tensor, Any]:
    tokens = _check_tokens(model, corrupted_tokens)
    names = [sites.name("resid_pre", l) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        return tokens, model.run_with_cache(tokens, names_filter=names)[1]


def _delta(model: HookedGPT, clean_cache, corrupted_cache, src_layer: int, src_head: int) -> Tensor:
    """The source head's clean write minus its corrupted write, z @ W_O: [batch, pos, d_model]."""
    W_O = model.blocks[src_layer].attn.W_O[src_head].detach()
    name = sites.name("z", src_layer)
    clean, corrupted = _clean(model, clean_cache, name), _clean(model, corrupted_cache, name)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean_cache[{name!r}] has shape {tuple(clean.shape)} but corrupted_cache's has "
                         f"shape {tuple(corrupted.shape)}; both runs must have the same batch and positions")
    clean_write = clean[:, :, src_head].to(W_O.device, W_O.dtype) @ W_O
    return clean_write - corrupted[:, :, src_head].to(W_O.device, W_O.dtype) @ W_O


def get_act_patch_direct_path(model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache,
                              corrupted_cache, patching_metric: Callable, src_layer: int, src_head: int,
                              component: str = "q", verbose: bool = True, *,
                              batch_size: Optional[int] = None) -> Float[Tensor, "n_layers n_heads"]:
    """Direct path patching (Wang et al., 2022) of the edge from head (src_layer, src_head) into
    each later head's query (component "q"), key or value input: the source's clean-minus-
    corrupted write z @ W_O is added at every position to that head's own pre-ln1 copy of the
    stream (hook_q_input etc.) while every other reader sees the corrupted run. [n_layers,
    n_heads]; rows l <= src_layer are 0.0 placeholders, as in TransformerLens."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if not (isinstance(src_layer, int) and 0 <= src_layer < L and isinstance(src_head, int)
            and 0 <= src_head < H):
        raise ValueError(f"(src_layer, src_head)=({src_layer!r}, {src_head!r}) is not a head of a model "
                         f"with n_layers={L}, n_heads={H}")
    _check_direct_path(model, [src_layer], component, "get_act_patch_direct_path")
    delta = _delta(model, clean_cache, corrupted_cache, src_layer, src_head)
    tokens, stream = _corrupted_stream(model, corrupted_tokens)
    _check_batch(tokens, delta)
    return _direct_path(model, tokens, stream, delta, src_layer, patching_metric, component, batch_size,
                        verbose, f"Direct path patch ({src_layer},{src_head}) → * [{component}]")


def get_act_patch_direct_path_all_sources(model, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache,
                                          corrupted_cache, patching_metric: Callable, component: str = "q",
                                          verbose: bool = True, *, batch_size: Optional[int] = None
                                          ) -> Float[Tensor, "src_layer src_head dst_layer dst_head"]:
    """get_act_patch_direct_path from every source head: [src_layer, src_head, dst_layer, dst_head],
    0.0 where dst_layer <= src_layer."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    _check_direct_path(model, range(L), component, "get_act_patch_direct_path_all_sources")
    tokens, stream = _corrupted_stream(model, corrupted_tokens)
    results = torch.zeros(L, H, L, H, device=model.cfg.device)
    for sl, sh in tqdm([(l, h) for l in range(L) for h in range(H)], disable=not verbose,
                       desc=f"Direct path patch — all sources [{component}]"):
        delta = _delta(model, clean_cache, corrupted_cache, sl, sh)
        _check_batch(tokens, delta)
        results[sl, sh] = _direct_path(model, tokens, stream, delta, sl, patching_metric, component,
                                       batch_size, False, "")
    return results


def _check_batch(tokens: Tensor, delta: Tensor) -> None:
    if delta.shape[1] != tokens.shape[1] or delta.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"the caches hold {delta.shape[0]} prompts of {delta.shape[1]} positions but "
                         f"corrupted_tokens has shape {tuple(tokens.shape)}; they must be the same runs")
