"""Caching activations: run_with_cache, and ActivationCache, a read-only mapping from hook
names to tensors that knows the model's structure (TransformerLens-style short keys, the
residual stream as a sum of components, LayerNorm applied to stacks, logit attributions)."""

import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens import io, sites
from lens.hooks import check_incl_bwd
from lens.components import RECORDERS
from lens.patterns import LazyPattern

@runtime_checkable
class SliceLike(Protocol):
    """TransformerLens's Slice (and lens.tl.utils.Slice): the index in .slice, its kind in .mode."""
    slice: Any
    mode: str


PosSlice = Union[None, int, slice, Sequence[int], Tensor, SliceLike]


def act_name(name: str, layer: Optional[int] = None, layer_type: Optional[str] = None,
             n_layers: Optional[int] = None) -> str:
    """Full hook name from a short one: act_name("pattern", 0) -> "blocks.0.attn.hook_pattern"
    (lens.sites.name; layer_type picks the module, e.g. "ln2" for a norm)."""
    return sites.name(name, layer, layer_type, n_layers)


def pos_index(pos_slice: object):
    """An index for one axis: int (drops the axis, as TransformerLens), slice, list of ints, or
    a TransformerLens Slice (lens.tl.utils.Slice, or TransformerLens's own)."""
    if isinstance(pos_slice, SliceLike):
        pos_slice = pos_slice.slice
    if pos_slice is None:
        return slice(None)
    if isinstance(pos_slice, bool):
        raise TypeError(f"a position index cannot be a bool ({pos_slice!r})")
    if isinstance(pos_slice, (int, slice)):
        return pos_slice
    if isinstance(pos_slice, Tensor) and pos_slice.dtype == torch.bool:
        raise TypeError("a position index cannot be a boolean mask; give the positions as ints")
    if isinstance(pos_slice, tuple) and len(pos_slice) in (2, 3):
        return slice(*pos_slice)
    if isinstance(pos_slice, (str, bytes, float, complex)):
        raise TypeError(f"a position index must be an int, a slice, a list of ints or a tensor of "
                        f"ints, got {type(pos_slice).__name__} {pos_slice!r:.60}")
    idx = torch.as_tensor(pos_slice)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"positions must be ints, got {pos_slice!r:.60} ({idx.dtype}); a float "
                        "index would be rounded to another position")
    return idx.long()


def _pos_dim(name: str) -> int:
    return sites.pos_axis(name)


def _index_dim(t: Union[Tensor, LazyPattern], dim: int, idx, what: str = "pos_slice", name: str = ""
               ) -> Union[Tensor, LazyPattern]:
    if isinstance(idx, slice) and idx == slice(None):
        return t
    if isinstance(t, LazyPattern) and dim == 0:
        return t.batch_rows(idx)
    try:
        return t[(slice(None),) * dim + (idx.to(t.device) if isinstance(idx, Tensor) else idx,)]
    except IndexError:
        shown = idx.tolist() if isinstance(idx, Tensor) else idx
        raise IndexError(f"{what}={shown!r} is out of range for the {t.shape[dim]} positions of "
                         f"{name or 'the activation'} (valid: -{t.shape[dim]} to {t.shape[dim] - 1})") from None


def run_with_cache(model, *args, names_filter=None, device=None, incl_bwd: bool = False,
                   remove_batch_dim: bool = False, pos_slice: PosSlice = None,
                   stop_at_layer=None, reset_hooks_end: bool = True, clear_contexts: bool = False,
                   return_cache_object: bool = True, lazy_patterns: bool = False, **kwargs):
    """Run the model and return (output, ActivationCache) of the hook points `names_filter`
    selects (a name, a list, a predicate). With none, every hook point but the per-head
    expansions (hook_result, hook_q/k/v_input) and hook_mlp_in, as TransformerLens caches by
    default (model.default_cache_names; model.set_use_attn_result(True) & co. add them).

    pos_slice: the positions kept along each activation's position axis (a bare int keeps a
    size-1 axis, a Slice of one drops it, as in TransformerLens). device: where cached tensors go (GPU → CPU
    copies are non-blocking; one synchronisation at the end). incl_bwd: call backward on the (scalar) output and cache gradients as
    "<name>_grad". stop_at_layer="auto": stop after the last block the filter needs (the
    output is then None unless the final LayerNorm or logits are asked for).
    reset_hooks_end / clear_contexts: as in model.hooks (TransformerLens's keywords);
    return_cache_object=False returns a plain dict of the tensors instead of the cache.
    lazy_patterns=True caches each hook_pattern as a lens.patterns.LazyPattern: the layer's
    queries and keys, O(pos · d_head), from which the rows asked for are computed when read
    (the forward stays on the fused kernel); where hooks changed a pattern it is stored as
    they left it.
    """
    check_incl_bwd(incl_bwd)
    if names_filter is None and hasattr(model, "default_cache_names"):
        names = model.default_cache_names()
    else:
        names = model.hook_names_matching(names_filter)
    L = model.cfg.n_layers
    auto = stop_at_layer == "auto"
    if auto:
        stop_at_layer = _last_block_needed(names, L)
    store: dict[str, Tensor] = {}
    dev = torch.device(device) if device is not None else None
    idx = pos_index(pos_slice)
    if isinstance(pos_slice, int):  # a bare int keeps a size-1 axis, as TransformerLens caches it
        idx = torch.tensor([idx])  # (a Slice of an int drops the axis, there as here)
    async_copy = [False]

    def keep(x: Tensor, name: str) -> Tensor:
        x = _index_dim(x.detach(), _pos_dim(name), idx, "pos_slice", name)
        if remove_batch_dim:
            if x.shape[0] != 1:
                raise ValueError(f"remove_batch_dim=True needs batch size 1, got {x.shape[0]}")
            x = x[0]
        if dev is not None and x.device != dev:
            async_copy[0] |= x.device.type == "cuda"
            x = x.to(dev, non_blocking=True)
        return x

    def save(x: Tensor, hook) -> None:
        store[hook.name] = keep(x, hook.name)

    save.reads_only = True  # the activation needs no copy under autograd

    def save_grad(g: Tensor, hook) -> None:
        store[hook.name + "_grad"] = keep(g, hook.name)

    recorders = {}
    if lazy_patterns:
        lazy = [n for n in names if n.endswith("attn.hook_pattern")]
        names = [n for n in names if n not in lazy]
        recorders = {}
        for n in lazy:
            attn = model.get_submodule(n.rsplit(".", 1)[0])
            recorders[attn] = _pattern_recorder(store, n, attn, keep, idx, remove_batch_dim, dev)
    bwd = [(names, save_grad)] if incl_bwd else []
    outer = RECORDERS.get()
    token = RECORDERS.set({**outer, **recorders} if outer else recorders) if recorders else None
    try:
        out = _cached_forward(model, args, kwargs, names, save, bwd, reset_hooks_end,
                              clear_contexts, auto, stop_at_layer, incl_bwd)
    finally:
        if token is not None:
            RECORDERS.reset(token)
    if async_copy[0]:
        torch.cuda.synchronize()
    if not return_cache_object:
        return out, store
    return out, ActivationCache(store, model, has_batch_dim=not remove_batch_dim,
                                pos_sliced=pos_slice is not None)


def _pattern_recorder(store: dict, name: str, attn, keep, idx, remove_batch_dim: bool, dev):
    """What a lazy cache stores for `name` when its attention layer `attn` runs."""
    def record(q: Tensor, k: Tensor, mask: Optional[Tensor], pattern: Optional[Tensor]) -> None:
        if pattern is not None:  # hooks changed it: keep the pattern as they left it
            store[name] = keep(pattern, name)
            return
        if remove_batch_dim and q.shape[0] != 1:
            raise ValueError(f"remove_batch_dim=True needs batch size 1, got {q.shape[0]}")
        rows = _index_dim(torch.arange(q.shape[1], device=q.device), 0, idx, "pos_slice", name)
        rows = rows.reshape(-1)
        move = (lambda t: t) if dev is None else (lambda t: None if t is None else t.to(dev))
        lazy = LazyPattern(move(q.detach().index_select(1, rows)), move(k.detach()), move(mask),
                           attn.scale, attn.softcap, move(rows), n_call_queries=q.shape[1],
                           has_batch_dim=not remove_batch_dim)
        # an int position (a Slice of one) drops the query axis: that one row, computed now
        store[name] = lazy.tensor().select(-2, 0) if isinstance(idx, int) else lazy
    return record


def _cached_forward(model, args, kwargs, names, save, bwd, reset_hooks_end, clear_contexts,
                    auto, stop_at_layer, incl_bwd):
    with model.hooks(fwd_hooks=[(names, save)] if names else [], bwd_hooks=bwd,
                     reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
        if auto and stop_at_layer is not None:
            model(*args, stop_at_layer=stop_at_layer, **kwargs)
            out = None
        else:
            out = model(*args, stop_at_layer=stop_at_layer, **kwargs)
        if incl_bwd:
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ValueError("incl_bwd=True calls backward on the output, which must be a "
                                 "scalar: use return_type='loss' or cache gradients of a metric "
                                 "with bwd_hooks")
            out.backward()
    return out


def _last_block_needed(names: list[str], n_layers: int) -> Optional[int]:
    """The stop_at_layer that still reaches every name, or None when the whole model is needed."""
    last = 0
    for n in names:
        m = re.match(r"blocks\.(\d+)\.", n)
        if m:
            last = max(last, int(m.group(1)) + 1)
        elif n not in ("hook_embed", "hook_pos_embed"):
            return None
    return last


class ActivationCache(Mapping):
    """Cached activations keyed by hook name; also cache["pattern", 0], cache["resid_post", -1],
    cache["z", 2, "attn"], cache["scale"] (the final LayerNorm)."""

    def __init__(self, cache_dict: dict[str, Union[Tensor, LazyPattern]], model, has_batch_dim: bool = True,
                 pos_sliced: bool = False):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.pos_sliced = pos_sliced  # run_with_cache(pos_slice=...) kept only some positions

    # ------------------------------------------------------------------ mapping
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            return act_name(*key, n_layers=self.model.cfg.n_layers)
        return act_name(key)

    def __getitem__(self, key) -> Union[Tensor, LazyPattern]:
        name = self._key(key)
        try:
            return self.cache_dict[name]
        except KeyError:
            import difflib
            near = difflib.get_close_matches(name, self.cache_dict, n=3, cutoff=0.5)
            leaf = name.rsplit(".", 1)[-1]
            flag = sites.OPTIONAL_CACHE.get(leaf)
            why = (f"; run_with_cache() with no filter leaves {leaf} out, as TransformerLens does: "
                   f"name it in names_filter, or call model.set_{flag}(True) first") if flag else ""
            raise KeyError(f"{name!r} is not in the cache (it holds {len(self.cache_dict)} "
                           f"activations{'; nearest: ' + str(near) if near else ''}); "
                           f"include it in run_with_cache's names_filter{why}") from None

    def pattern(self, layer: int, head=None, query=None, batch=None) -> Tensor:
        """Layer `layer`'s attention pattern at the given batch rows, heads and query positions
        (each None for all, an int, which drops the axis as indexing does, a slice or ints):
        ``cache.pattern(3, head=5, query=-1) == cache["pattern", 3][:, 5, -1]``. From a lazy
        cache (run_with_cache(lazy_patterns=True)) only these rows are computed."""
        index = tuple(slice(None) if i is None else i
                      for i in ((batch,) if self.has_batch_dim else ()) + (head, query))
        return self["pattern", layer][index]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except KeyError:
            return False

    def __iter__(self):
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self.cache_dict)[:4]}...)"

    def to(self, device) -> "ActivationCache":
        moved = {k: v.to(device) for k, v in self.cache_dict.items()}
        return ActivationCache(moved, self.model, self.has_batch_dim, self.pos_sliced)

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-1 cache, in place (as TransformerLens); returns self."""
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"cannot remove the batch dim: {k} has batch size {v.shape[0]}")
        for k in list(self.cache_dict):
            self.cache_dict[k] = _index_dim(self.cache_dict[k], 0, 0)
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache of the rows `batch_slice` selects (an int drops the batch axis)."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch axis to slice (remove_batch_dim was applied)")
        idx = pos_index(batch_slice)
        sliced = {k: _index_dim(v, 0, idx) for k, v in self.cache_dict.items()}
        return ActivationCache(sliced, self.model, has_batch_dim=not isinstance(idx, int),
                               pos_sliced=self.pos_sliced)

    @staticmethod
    def toggle_autodiff(mode: bool = False) -> None:
        """Switch autograd on or off globally (torch.set_grad_enabled), as TransformerLens's
        method of this name does; prefer `with torch.no_grad():`."""
        import warnings
        warnings.warn(f"toggle_autodiff changes torch's global state: grad enabled = {mode}",
                      stacklevel=2)
        torch.set_grad_enabled(mode)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors (each storage counted once)."""
        seen, total = set(), 0
        tensors = [t for v in self.cache_dict.values()
                   for t in ((v.q, v.k) if isinstance(v, LazyPattern) else (v,))]
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return total

    def save(self, path) -> None:
        """Save as safetensors; the metadata records whether a batch dim is present and the
        shape of the model (n_layers, d_model, n_heads, ...), which `load` checks."""
        tensors = {k: v.tensor() if isinstance(v, LazyPattern) else v for k, v in self.cache_dict.items()}
        io.write(tensors, path, metadata={"has_batch_dim": str(self.has_batch_dim),
                                          "pos_sliced": str(self.pos_sliced),
                                          **(io.model_metadata(self.model.cfg)
                                             if self.model is not None else {})})

    @classmethod
    def load(cls, path, model) -> "ActivationCache":
        """A saved cache, for `model`: refused (never unpickled) unless it is a valid
        safetensors file of hook points of a model of this one's shape."""
        f = io.SafetensorsFile(path)
        flags = f.flag("has_batch_dim", True), f.flag("pos_sliced", False)
        unknown = [k for k in f.keys() if k.removesuffix("_grad") not in model.hook_dict]
        if unknown:
            raise ValueError(f"{path} holds activations {unknown[:5]} that are not hook points of "
                             "this model; load it with the model it was cached from")
        f.check_model(model.cfg)  # the same hook points, on a model of another width
        return cls(f.read_all(), model, *flags)

    # ------------------------------------------------------------------ structure
    def _layer(self, layer: Optional[int]) -> int:
        """A place in the stream, 0..n_layers (n_layers: the final stream, after every block).
        None and -1 mean the final stream, as in TransformerLens; -k counts back from it."""
        L = self.model.cfg.n_layers
        if layer is None:
            return L
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(L + 1) <= layer <= L:
            raise ValueError(f"layer={layer!r} must be an int in [-{L + 1}, {L}] (None, -1 and "
                             f"{L} are the final stream, after every block)")
        return layer + L + 1 if layer < 0 else layer

    def _resid_at(self, layer: int, mlp_input: bool = False) -> Tensor:
        if layer == self.model.cfg.n_layers:
            return self[sites.name("resid_post", layer - 1)]
        mid = mlp_input and self.model.cfg.has_resid_mid
        return self[sites.name("resid_mid" if mid else "resid_pre", layer)]

    def _pos(self, t: Tensor, pos_slice: PosSlice, dim: int) -> Tensor:
        return _index_dim(t, dim, pos_index(pos_slice))

    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False,
                          apply_ln: bool = False, pos_slice: PosSlice = None,
                          mlp_input: bool = False, return_labels: bool = False):
        """The stream as it accumulates: resid_pre of blocks 0..layer (and the final stream when
        layer is None, -1 or n_layers), stacked as [component, batch, pos, d_model].
        apply_ln=True at the final stream puts each through ln_final with its own statistics
        (the logit lens, as TransformerLens 4); before a block, through that block's norm
        with the cached scale (frozen)."""
        layer = self._layer(layer)
        L = self.model.cfg.n_layers
        parts, labels = [], []
        for l in range(min(layer + 1, L)):
            parts.append(self[sites.name("resid_pre", l)]); labels.append(f"{l}_pre")
            if incl_mid and self.model.cfg.has_resid_mid and (l < layer or mlp_input):
                parts.append(self[sites.name("resid_mid", l)]); labels.append(f"{l}_mid")
        if layer == L:
            parts.append(self[sites.name("resid_post", L - 1)]); labels.append("final_post")
        stack = self._pos(torch.stack(parts), pos_slice, 2 if self.has_batch_dim else 1)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == L)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False,
                        mode: str = "all", apply_ln: bool = False, pos_slice: PosSlice = None,
                        incl_embeds: bool = True, return_labels: bool = False):
        """The stream entering `layer` (the final stream when None) as the sum of what wrote to
        it: embed, pos_embed, then each block's attn_out and mlp_out. mode: all | attn | mlp."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode={mode!r}; valid modes are 'all', 'attn', 'mlp'")
        layer = self._layer(layer)
        cfg = self.model.cfg
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"]); labels.append("embed")
            if cfg.positional_embedding:
                parts.append(self["hook_pos_embed"]); labels.append("pos_embed")
        for l in range(layer + (1 if mlp_input and layer < cfg.n_layers and cfg.has_resid_mid else 0)):
            if mode != "mlp":
                parts.append(self[sites.name("attn_out", l)]); labels.append(f"{l}_attn_out")
            if mode != "attn" and not cfg.attn_only and l < layer:
                parts.append(self[sites.name("mlp_out", l)]); labels.append(f"{l}_mlp_out")
        stack = self._pos(torch.stack(parts), pos_slice, 2 if self.has_batch_dim else 1)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> Float[Tensor, "batch pos n_heads d_model"]:
        """Each head's write to the stream at `layer`: hook_result, or z @ W_O when only z is cached.
        Where a post-norm follows attention (post_norms) each write goes through it with its scale
        frozen from the cache (ln1_post.hook_scale), so the heads add up to hook_attn_out (less
        the post-normed b_O)."""
        name = sites.name("result", layer)
        if name in self.cache_dict:
            result = self.cache_dict[name]
        else:
            z = self[sites.name("z", layer)]
            W_O = self.model.blocks[layer].attn.W_O.to(z.device, z.dtype)
            result = torch.einsum("...hd,hdm->...hm", z, W_O)
        return self.through_post_norm(result, layer, "ln1_post", head_axis=True)

    def through_post_norm(self, writes: Tensor, layer: int, norm: str, head_axis: bool = False) -> Tensor:
        """Writes [..., batch, pos, (heads,) d_model] through block `layer`'s post-norm ("ln1_post"
        after attention, "ln2_post" after the MLP) with its cached scale frozen; unchanged where
        the block has no post-norms."""
        block = self.model.blocks[layer]
        if not block.post_norms:
            return writes
        scale = self[sites.name("scale", layer, norm)]
        return getattr(block, norm).frozen(writes, scale[..., None, :] if head_axis else scale)

    def stack_head_results(self, layer: Optional[int] = None, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: PosSlice = None,
                           apply_ln: bool = False):
        """Every head's write before `layer` (all layers when None): [layer*head, batch, pos, d_model],
        labels "L{l}H{h}". incl_remainder adds what the heads do not explain (embeddings, MLPs, biases)."""
        layer = self._layer(layer)
        pdim = 2 if self.has_batch_dim else 1
        parts, labels = [], []
        for l in range(layer):
            r = self.head_results(l)
            parts.append(r.movedim(-2, 0))
            labels += [f"L{l}H{h}" for h in range(r.shape[-2])]
        stack = torch.cat(parts) if parts else torch.zeros(0, *self._resid_at(layer).shape)
        if incl_remainder:
            stack = torch.cat([stack, (self._resid_at(layer) - stack.sum(0))[None]])
            labels.append("remainder")
        stack = self._pos(stack, pos_slice, pdim)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(self, layer: Optional[int] = None, pos_slice: PosSlice = None,
                             neuron_slice: Union[None, slice, Sequence[int]] = None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False):
        """Every neuron's write (post · W_out row) before `layer`: [layer*neuron, batch, pos, d_model]."""
        if self.model.cfg.attn_only:
            raise ValueError("this model is attention-only: it has no neurons")
        layer = self._layer(layer)
        pdim = 2 if self.has_batch_dim else 1
        nidx = pos_index(neuron_slice)
        parts, labels = [], []
        for l in range(layer):
            post = self._pos(self[sites.name("post", l)], pos_slice, pdim - 1)
            W_out = self.model.blocks[l].mlp.W_out.to(post.device, post.dtype)
            ids = torch.arange(W_out.shape[0])[nidx]
            post, W_out = post[..., ids], W_out[ids]
            writes = torch.einsum("...n,nd->n...d", post, W_out)
            if self.model.blocks[l].post_norms:
                scale = self._pos(self[sites.name("scale", l, "ln2_post")], pos_slice, pdim - 1)
                writes = self.model.blocks[l].ln2_post.frozen(writes, scale)
            parts.append(writes)
            labels += [f"L{l}N{int(n)}" for n in ids]
        if parts:
            stack = torch.cat(parts)
        else:  # layer 0: no neuron has written yet
            like = self._pos(self._resid_at(0), pos_slice, pdim - 1)
            stack = like.new_zeros(0, *like.shape)
        if incl_remainder:
            stream = self._pos(self._resid_at(layer), pos_slice, pdim - 1)
            stack = torch.cat([stack, (stream - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: Optional[int] = -1,
                         sublayer_type: Optional[str] = None) -> Tensor:
        """One activation of every block before `layer` (all of them for None, -1 or n_layers),
        stacked as [layer, ...]."""
        layer = self._layer(layer)
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)])

    def compute_head_results(self) -> None:
        """Fill in each block's hook_result (z @ W_O per head, before any post-norm) from the
        cached hook_z, for caches made without it, as TransformerLens's method does."""
        for l in range(self.model.cfg.n_layers):
            name = sites.name("result", l)
            if name not in self.cache_dict:
                z = self[sites.name("z", l)]
                W_O = self.model.blocks[l].attn.W_O.to(z.device, z.dtype)
                self.cache_dict[name] = torch.einsum("...hd,hdm->...hm", z, W_O).detach()

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice: PosSlice = None,
                           project_output_onto: Optional[Tensor] = None) -> Tensor:
        """Each neuron's write post · W_out[n] at `layer`, [batch, pos, d_mlp, d_model] (before
        any post-norm, as TransformerLens), or its projection onto project_output_onto
        ([d_model] → [batch, pos, d_mlp]; [d_model, k] → [..., d_mlp, k])."""
        pdim = 1 if self.has_batch_dim else 0
        post = self._pos(self[sites.name("post", layer)], pos_slice, pdim)
        W_out = self.model.blocks[layer].mlp.W_out.to(post.device, post.dtype)
        nidx = pos_index(neuron_slice)
        if not (isinstance(nidx, slice) and nidx == slice(None)):
            ids = torch.arange(W_out.shape[0])[nidx].reshape(-1)
            post, W_out = post[..., ids], W_out[ids]
        if project_output_onto is None:
            return post[..., None] * W_out
        projected = W_out @ project_output_onto.to(W_out.device, W_out.dtype)
        return post * projected if project_output_onto.ndim == 1 else post[..., None] * projected

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: PosSlice = None, return_labels: bool = False,
                                     project_output_onto: Optional[Tensor] = None):
        """The stream entering `layer` (the final stream for None / -1) as every head's write,
        every neuron's (or each MLP's, expand_neurons=False), embed, pos_embed and the summed
        biases ("bias"), as TransformerLens orders and labels them; the rows add up to the
        stream (under post-norms, with the norms' cached scales frozen)."""
        layer = self._layer(layer)
        cfg = self.model.cfg
        if mlp_input and layer == cfg.n_layers:
            raise ValueError("mlp_input=True needs a block's MLP: layer must be < n_layers")
        pdim = 2 if self.has_batch_dim else 1
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        parts = [heads]
        if not cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, names = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, names = self.decompose_resid(layer, pos_slice=pos_slice, incl_embeds=False,
                                                      mode="mlp", return_labels=True)
            parts.append(neurons)
            labels = labels + names
        parts.append(self._pos(self["hook_embed"], pos_slice, pdim - 1)[None])
        labels.append("embed")
        if cfg.positional_embedding:
            parts.append(self._pos(self["hook_pos_embed"], pos_slice, pdim - 1)[None])
            labels.append("pos_embed")
        like = parts[-1][0]
        bias = like.new_zeros(like.shape)
        for l in range(layer + (1 if mlp_input else 0)):
            block = self.model.blocks[l]
            if block.attn.b_O is not None:
                bias = bias + self._bias_write(block.attn.b_O, l, "ln1_post", like, pos_slice)
            if expand_neurons and l < layer and not cfg.attn_only and block.mlp.b_out is not None:
                bias = bias + self._bias_write(block.mlp.b_out, l, "ln2_post", like, pos_slice)
        parts.append(bias[None])
        labels.append("bias")
        stack = torch.cat(parts)
        if project_output_onto is not None:
            stack = stack @ project_output_onto.to(stack.device, stack.dtype)
        if apply_ln:
            if project_output_onto is not None:
                raise ValueError("apply_ln with project_output_onto: apply the norm before projecting "
                                 "(project the result of apply_ln=True yourself)")
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _bias_write(self, b: Tensor, layer: int, norm: str, like: Tensor, pos_slice: PosSlice) -> Tensor:
        """A bias's write to the stream at every (batch, pos) of `like`: itself, or through the
        block's post-norm with the cached scale frozen."""
        b = b.to(like.device, like.dtype).expand_as(like)
        block = self.model.blocks[layer]
        if not block.post_norms:
            return b
        scale = self._pos(self[sites.name("scale", layer, norm)], pos_slice, 1 if self.has_batch_dim else 0)
        return getattr(block, norm).frozen(b, scale)

    def ln_scale(self, layer: Optional[int] = None, mlp_input: bool = False) -> Tensor:
        layer = self._layer(layer)
        if layer == self.model.cfg.n_layers:
            return self["ln_final.hook_scale"]
        return self[sites.name("scale", layer, "ln2" if mlp_input else "ln1")]

    def apply_ln_to_stack(self, residual_stack: Float[Tensor, "... d_model"], layer: Optional[int] = None,
                          mlp_input: bool = False, pos_slice: PosSlice = None,
                          batch_slice: PosSlice = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Float[Tensor, "... d_model"]:
        """Apply the norm that reads the stream at `layer` (the final one when None) to each
        component, with the scale frozen from the cache: centre (LayerNorm only), divide by the
        cached scale, and multiply by the norm's weight. The bias is left out (it belongs to no
        component), so the components sum to norm(stream) − b.

        recompute_ln=True at the final stream instead runs each component through ln_final
        itself, with statistics of its own (weight and bias included: the logit lens), as in
        TransformerLens 4."""
        layer = self._layer(layer)
        cfg = self.model.cfg
        if cfg.normalization is None:
            return residual_stack
        if recompute_ln and layer == cfg.n_layers:
            if has_batch_dim and self.has_batch_dim and batch_slice is not None:
                residual_stack = _index_dim(residual_stack, 1, pos_index(batch_slice))
            return self.model.ln_final(residual_stack)
        ln = self.model.ln_final if layer == cfg.n_layers else (
            self.model.blocks[layer].ln2 if mlp_input else self.model.blocks[layer].ln1)
        if ln is None:  # nothing normalises the stream where this block reads it (OLMo-2)
            return residual_stack
        scale = self.ln_scale(layer, mlp_input)
        if self.has_batch_dim:
            scale = _index_dim(scale, 0, pos_index(batch_slice))
        pdim = (1 if self.has_batch_dim and (batch_slice is None or not isinstance(batch_slice, int)) else 0)
        scale = _index_dim(scale, pdim, pos_index(pos_slice))
        if not has_batch_dim and self.has_batch_dim and scale.shape[0] == 1:
            scale = scale[0]
        return ln.frozen(residual_stack, scale)

    def logit_attrs(self, residual_stack: Float[Tensor, "... d_model"],
                    tokens: Union[int, str, Tensor], incorrect_tokens=None,
                    pos_slice: PosSlice = None, batch_slice: PosSlice = None,
                    has_batch_dim: bool = True) -> Tensor:
        """Each component's contribution to the logit of `tokens` (minus `incorrect_tokens`):
        residual_stack · model.logit_direction(tokens, incorrect_tokens). Apply the final norm first
        (apply_ln=True) for DLA; lens.attribution.direct_logit_attribution does it all at once."""
        direction = self.model.logit_direction(tokens, incorrect_tokens)  # [..., d_model]
        return (residual_stack * direction.to(residual_stack.device, residual_stack.dtype)).sum(-1)
