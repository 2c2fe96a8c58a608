"""Dissect one prompt: the whole forward pass of a HookedGPT, walked as a lecture on GPT walks it
(tokens, embedding, each block's attention and MLP, unembed, sampling). `dissect` returns a
Dissection whose attributes hold the numbers and whose str() is the text report."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens import sites

SPACE = "·"


def show_token(s: str) -> str:
    """A token as it is displayed everywhere in the report: spaces as '·', backslashes and
    control characters escaped as repr does (a newline is '\\n', a backslash '\\\\')."""
    return "".join(SPACE if c == " " else c if c.isprintable() and c != "\\" else repr(c)[1:-1]
                   for c in s)


@dataclass
class BlockDissection:
    """One block: residual-stream norms per position, attention patterns, MLP neurons."""

    layer: int
    resid_pre_norm: Float[Tensor, " pos"]
    resid_post_norm: Float[Tensor, " pos"]
    resid_mid_norm: Optional[Float[Tensor, " pos"]]  # None for attention-only blocks
    qkv_shape: tuple[int, ...]  # lecture convention [batch, n_heads, tokens, d_head]
    qkv_hook_shape: tuple[int, ...]  # as lens hooks store it [batch, pos, n_heads, d_head]
    heads: list[int]  # heads whose patterns are kept (all heads unless restricted)
    patterns: Optional[Float[Tensor, "n_shown query_pos key_pos"]]  # of `heads`; None when skipped
    mlp_shape: Optional[tuple[int, ...]] = None  # [batch, tokens, d_mlp]
    top_neurons: list[tuple[int, float]] = field(default_factory=list)  # at the last position


@dataclass
class Dissection:
    """The forward pass of one prompt; str(d) or d.render() is the report."""

    model_name: str
    config: str
    text: str
    tokens: Int[Tensor, " pos"]
    str_tokens: list[str]
    embed_norm: Float[Tensor, " pos"]
    pos_embed_norm: Optional[Float[Tensor, " pos"]]
    x0_norm: Float[Tensor, " pos"]
    embed_shape: tuple[int, ...]
    blocks: list[BlockDissection]
    final_ln: Optional[str]
    logits_shape: tuple[int, ...]
    top_ids: Int[Tensor, "pos k"]
    top_probs: Float[Tensor, "pos k"]
    top_str: list[list[str]]
    continuation_ids: list[int]
    continuation: str
    temperature: float
    seed: int

    def render(self) -> str:
        return "\n".join(_render(self))

    __str__ = render


def dissect(model, text: str, *, layer: Optional[int] = None, head: Optional[int] = None,
            top_k: int = 5, max_new_tokens: int = 20, temperature: float = 1.0, seed: int = 0,
            prepend_bos: bool = True, plot_dir: Union[None, str, Path] = None,
            model_name: Optional[str] = None) -> Dissection:
    """Run `text` through `model` once (one run_with_cache caching only what is reported) and
    walk the forward pass. layer / head restrict the per-head attention tables (and plots);
    top_k is the number of next tokens per position and of top neurons per MLP; plot_dir, when given, receives attention_L{l}.png per layer and resid_norm.png."""
    cfg = model.cfg
    if model.tokenizer is None:
        raise ValueError("dissect needs a model with a tokenizer: set model.tokenizer, e.g. "
                         "lens.tokenizer.Tokenizer.gpt2() for a GPT-2 vocabulary")
    if not isinstance(text, str) or not text:
        raise ValueError(f"text to dissect must be a non-empty string, got {text!r}")
    layers = _pick("layer", layer, cfg.n_layers)
    heads = _pick("head", head, cfg.n_heads)
    if not isinstance(top_k, int) or not 1 <= top_k <= cfg.d_vocab:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, d_vocab={cfg.d_vocab}]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative int")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 samples greedily)")
    tokens = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)
    n = tokens.shape[1]
    if n > cfg.n_ctx:
        raise ValueError(f"the text is {n} tokens{' with BOS' if prepend_bos else ''}, longer "
                         f"than the model's context n_ctx={cfg.n_ctx}; shorten it")

    names = {"hook_embed", "hook_pos_embed"} & set(model.hook_dict)
    for l in range(cfg.n_layers):
        names |= {sites.name("resid_pre", l), sites.name("resid_post", l),
                  sites.name("q", l)}
        if cfg.has_mlp:
            names.add(sites.name("post", l))
        if cfg.has_resid_mid:
            names.add(sites.name("resid_mid", l))
        if l in layers:
            names.add(sites.name("pattern", l))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=sorted(names), device="cpu",
                                             lazy_patterns=True)

    def norm(name: str) -> Tensor:
        return cache[name][0].float().norm(dim=-1)

    blocks = []
    for l in range(cfg.n_layers):
        q = cache[sites.name("q", l)]
        b = BlockDissection(
            layer=l, resid_pre_norm=norm(sites.name("resid_pre", l)),
            resid_post_norm=norm(sites.name("resid_post", l)),
            resid_mid_norm=norm(sites.name("resid_mid", l)) if cfg.has_resid_mid else None,
            qkv_shape=(q.shape[0], q.shape[2], q.shape[1], q.shape[3]), qkv_hook_shape=tuple(q.shape),
            heads=heads if l in layers else [],
            patterns=cache["pattern", l][0, heads].float() if l in layers else None)
        if not cfg.attn_only:
            post = cache[sites.name("post", l)]
            b.mlp_shape = tuple(post.shape)
            vals, ids = post[0, -1].float().topk(min(top_k, post.shape[-1]))
            b.top_neurons = list(zip(ids.tolist(), vals.tolist()))
        blocks.append(b)

    logit = logits[0].float().cpu()
    top_ids = logit.topk(top_k, dim=-1).indices
    top_probs = torch.softmax(logit, dim=-1).gather(-1, top_ids)
    new_ids = sample(model, tokens, max_new_tokens, temperature, seed)
    has_pos = "hook_pos_embed" in cache
    d = Dissection(
        model_name=model_name or cfg.metadata.get("name", "a HookedGPT"),
        config=_describe(cfg), text=text, tokens=tokens[0].cpu(),
        str_tokens=[model.tokenizer.decode_single(t) for t in tokens[0].tolist()],
        embed_norm=norm("hook_embed"), pos_embed_norm=norm("hook_pos_embed") if has_pos else None,
        x0_norm=norm("blocks.0.hook_resid_pre"), embed_shape=tuple(cache["hook_embed"].shape),
        blocks=blocks, final_ln=cfg.normalization, logits_shape=tuple(logits.shape),
        top_ids=top_ids, top_probs=top_probs,
        top_str=[[model.tokenizer.decode_single(i) for i in row] for row in top_ids.tolist()],
        continuation_ids=new_ids, continuation=model.tokenizer.decode(new_ids) if new_ids else "",
        temperature=temperature, seed=seed)
    if plot_dir is not None:
        plot(d, plot_dir)
    return d


def _pick(what: str, value: Optional[int], size: int) -> list[int]:
    """All indices when value is None, else the one (negative counts from the end) checked."""
    if value is None:
        return list(range(size))
    if not isinstance(value, int) or not -size <= value < size:
        raise ValueError(f"{what}={value!r} is out of range: the model has {size} "
                         f"{what}s, so give 0..{size - 1} (or -{size}..-1)")
    return [value % size]


def _describe(cfg) -> str:
    kind = "attention-only" if cfg.attn_only else f"d_mlp {cfg.d_mlp}, {cfg.act_fn}"
    return (f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads × d_head "
            f"{cfg.d_head}, {kind}, norm {cfg.normalization}, d_vocab {cfg.d_vocab}, n_ctx {cfg.n_ctx}")


# ---------------------------------------------------------------------- sampling
def sample(model, tokens: Int[Tensor, "batch pos"], max_new_tokens: int, temperature: float,
           seed: int) -> list[int]:
    """New token ids after `tokens` (at most n_ctx in all; model.generate stops early at EOS):
    softmax(logits / temperature) sampled with `seed`, argmax when temperature is 0."""
    n = tokens.shape[1]
    max_new_tokens = min(max_new_tokens, model.cfg.n_ctx - n)
    if max_new_tokens <= 0:
        return []
    if not callable(getattr(model, "generate", None)):
        return sample_loop(model, tokens, max_new_tokens, temperature, seed)
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens, temperature=temperature, seed=seed)
    return out[0, n:].tolist()


def sample_loop(model, tokens: Int[Tensor, "batch pos"], max_new_tokens: int, temperature: float,
                seed: int) -> list[int]:
    """The plain way to sample, for models without generate: one full forward per new token."""
    g = torch.Generator().manual_seed(seed)
    seq = tokens[0].tolist()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logit = model(torch.tensor([seq], device=tokens.device))[0, -1].float().cpu()
            if temperature == 0:
                seq.append(int(logit.argmax()))
            else:
                probs = torch.softmax(logit / temperature, -1)
                seq.append(int(torch.multinomial(probs, 1, generator=g)))
    return seq[tokens.shape[1]:]


# ---------------------------------------------------------------------- text report
def _table(header: list[str], rows: list[list[str]], right: bool = True) -> list[str]:
    """Columns separated by ' │ ' (not '|', which is in tokens such as <|endoftext|>), the
    first left-aligned, the rest right-aligned unless right=False."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    def line(r):
        cells = [c.ljust(w) if i == 0 or not right else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return ("  " + " │ ".join(cells)).rstrip()
    return [line(header), "  " + "─┼─".join("─" * w for w in widths)] + [line(r) for r in rows]


def _norm_rows(d: Dissection, rows: list[tuple[str, Optional[Tensor]]]) -> list[str]:
    toks = [show_token(s) for s in d.str_tokens]
    body = [[name] + [f"{v:.2f}" for v in norms.tolist()] for name, norms in rows if norms is not None]
    return _table(["‖x‖ at position"] + toks, body)


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _render(d: Dissection):
    n = len(d.str_tokens)
    toks = [show_token(s) for s in d.str_tokens]
    batch, _, d_model = d.embed_shape
    yield f"Dissecting {d.text!r} with {d.model_name} ({d.config})"
    yield (f"Tokens are shown with '{SPACE}' for a space and escapes as in repr (\\n newline, "
           "\\\\ backslash); shapes are [batch, tokens, ...].\n")
    yield f"1. Tokens: the text becomes {n} token ids"
    yield from _table(["pos", "id", "token"], [[str(i), str(t), s] for i, (t, s)
                                                 in enumerate(zip(d.tokens.tolist(), toks))], right=False)
    yield "\n2. Embedding: each token looks up a row of W_E, each position a row of W_pos"
    yield f"  token embedding      W_E[tokens]: {_shape(d.embed_shape)}"
    if d.pos_embed_norm is not None:
        yield f"  positional embedding W_pos[:{n}]:   {_shape(d.embed_shape)}"
        yield f"  x0 = sum:                         {_shape(d.embed_shape)}  (the residual stream)"
    else:
        yield f"  x0 = W_E[tokens] (no positional embedding): {_shape(d.embed_shape)}"
    yield from _norm_rows(d, [("W_E[tokens]", d.embed_norm), (f"W_pos[:{n}]", d.pos_embed_norm),
                              ("x0", d.x0_norm)])
    for b in d.blocks:
        mlp = "" if b.mlp_shape is None else "; x = x + mlp(ln2(x))"
        yield f"\n3.{b.layer} Block {b.layer}: x = x + attn(ln1(x)){mlp}"
        yield from _norm_rows(d, [("resid_pre", b.resid_pre_norm), ("resid_mid", b.resid_mid_norm),
                                  ("resid_post", b.resid_post_norm)])
        h_shape = _shape(b.qkv_hook_shape)
        yield (f"  q, k, v: {_shape(b.qkv_shape)} each, as [batch, n_heads, tokens, d_head] "
               f"(lens hooks store them as [batch, pos, n_heads, d_head] = {h_shape})")
        yield (f"  pattern = softmax(q kᵀ / √d_head, causal): {_shape([batch, b.qkv_shape[1], n, n])}"
               " [batch, n_heads, query, key]")
        for i, h in enumerate(b.heads):
            yield f"  head {b.layer}.{h}: % of each query's attention (rows = query, columns = key)"
            p = (100 * b.patterns[i]).tolist()
            yield from _table([""] + toks, [[toks[q]] + [f"{p[q][k]:.1f}" if k <= q else ""
                                                         for k in range(n)] for q in range(n)])
        if b.mlp_shape is not None:
            yield f"  MLP neurons act(ln2(x) W_in + b_in): {_shape(b.mlp_shape)} [batch, tokens, d_mlp]"
            top = ", ".join(f"#{i} {v:.2f}" for i, v in b.top_neurons)
            yield f"  top neurons at the last position ({toks[-1]}): {top}"
            yield f"  mlp_out = neurons W_out + b_out: {_shape(d.embed_shape)}"
    ln = "ln_final(x) → " if d.final_ln is not None else ""
    yield f"\n4. Unembed: {ln}W_U [{d_model}, {d.logits_shape[-1]}] → logits {_shape(d.logits_shape)}"
    yield f"  top-{d.top_ids.shape[1]} next tokens (probability) after each position"
    cells = [[f"{i} {toks[i]}"] + [f"{100 * p:.3g}% {show_token(s)}" for s, p in zip(row, probs)]
             for i, (row, probs) in enumerate(zip(d.top_str, d.top_probs.tolist()))]
    yield from _table(["pos token"] + [f"#{j + 1}" for j in range(d.top_ids.shape[1])], cells, right=False)
    how = "greedy" if d.temperature == 0 else f"temperature {d.temperature:g}, seed {d.seed}"
    yield f"\n5. Sampling {len(d.continuation_ids)} new tokens ({how})"
    if d.continuation_ids:
        yield f"  {show_token(d.text)} ‖ {show_token(d.continuation)}"
        yield f"  ids {d.continuation_ids}"


# ---------------------------------------------------------------------- figures
def plot(d: Dissection, out_dir: Union[str, Path]) -> list[Path]:
    """attention_L{l}.png (a heat map per head, labelled with the tokens) for each layer with
    patterns, and resid_norm.png (the residual-stream norm at each position through the blocks)."""
    from lens.plot import _plt, heatmap, lines
    plt = _plt()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--plot {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    toks = [show_token(s) for s in d.str_tokens]
    n, written = len(toks), []
    for b in d.blocks:
        if b.patterns is None:
            continue
        side = min(2.5 + 0.45 * n, 12)
        fig, axes = plt.subplots(1, len(b.heads), figsize=(side * len(b.heads), side), squeeze=False)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        for ax, h, pat in zip(axes[0], b.heads, b.patterns):
            heatmap(pat.masked_fill(future, float("nan")), toks, toks, title=f"head {b.layer}.{h}",
                    xlabel="key", ylabel="query", centered=False, annotate=False, ax=ax)
            ax.images[0].set_clim(0, 1)
            plt.setp(ax.get_xticklabels(), rotation=90)
            for q, k in torch.ones(n, n).tril().nonzero().tolist() if n <= 10 else []:
                ax.text(k, q, f"{pat[q, k]:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if pat[q, k] > 0.6 else "w")
        fig.suptitle(f"{d.text!r}: layer {b.layer} attention patterns")
        fig.tight_layout()
        written.append(out / f"attention_L{b.layer}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    labels, stages = ["embed (x0)"], [d.x0_norm]
    for b in d.blocks:
        if b.resid_mid_norm is not None:
            labels.append(f"{b.layer} mid"); stages.append(b.resid_mid_norm)
        labels.append(f"{b.layer} post"); stages.append(b.resid_post_norm)
    norms = torch.stack(stages, dim=1)  # [pos, stage]
    keep = range(n) if n <= 12 else [n - 1]
    series = {f"{i} {toks[i]}": norms[i] for i in keep}
    if n > 12:
        series["mean over positions"] = norms.mean(0)
    written.append(out / "resid_norm.png")
    lines(series, x=labels, title=f"{d.text!r}: residual-stream norm by layer",
          xlabel="residual stream after", ylabel="‖x‖", path=written[-1])
    return written


def load_model(name_or_path: str):
    """from_pretrained, naming the bundled models when the name is unknown."""
    import lens
    try:
        return lens.HookedGPT.from_pretrained(name_or_path)
    except ValueError as e:
        bundled = sorted(p.name for p in (Path(lens.__file__).parent / "models").glob("*") if p.is_dir())
        raise ValueError(f"cannot load model {name_or_path!r}: {e}\nbundled models: {bundled}") from None
