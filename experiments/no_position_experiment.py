"""TransformerLens's no-position experiment on lens.

A port of TransformerLens's demos/No_Position_Experiment.ipynb (TransformerLensOrg/TransformerLens,
the version of commit 02d2016c8af2c755bcf93fc2433698846217a549, blob 1bdc79b8: the one with
IN_GITHUB / EPOCHS_SIZE / DO_SLOW_RUNS; later upstream versions drop that switch and call
`.cuda()` unconditionally): its code cells in order, each under a `# %% [cell N]` marker (N is
the notebook's cell index; the markdown cells are left out). The demo builds and trains its own
2-layer model with no positional embeddings, so the model is the notebook's own:

    python experiments/no_position_experiment.py [--out DIR]
    GITHUB_ACTIONS=true python experiments/no_position_experiment.py   # the notebook's CI path

With GITHUB_ACTIONS=true it takes the notebook's short path (EPOCHS_SIZE = 25: 25 training
steps and a 25-sequence analysis batch) and keeps tensors on the CPU; without it, it trains for
4000 steps and, as the notebook, moves tokens to a GPU (`.cuda()`), so it needs one. Needs
plotly, einops and tqdm (as the notebook). Plots are headless: with --out DIR each figure is
written to DIR/fig_NN.html, without it they are dropped.

Every line that differs from the notebook, and why:

- before cell 2: `import argparse`, `from pathlib import Path`, an argument parser for --out,
  and `_show(fig)` (write the figure to --out as HTML, or drop it): plotting made headless; a
  plain script has no notebook to render into (plotly's "colab" renderer needs IPython).
- cell 2: `IN_COLAB = 'google.colab' in str(get_ipython())` -> `IN_COLAB = "google.colab" in
  sys.modules` (plus `import sys` after the cell's `import os`): get_ipython() exists only
  under IPython; in Colab the notebook's kernel has google.colab imported, which is what the
  string test detected, so this is the same test in plain Python (False outside Colab).
- cell 2: the `if IN_COLAB or IN_GITHUB:` block of two `!pip install` lines is dropped
  (notebook-only shell escapes; its second line installs a TransformerLens branch, which lens
  replaces).
- cell 2: `from transformer_lens import HookedTransformer, HookedTransformerConfig` ->
  `from lens.tl import HookedTransformer, HookedTransformerConfig`;
  `from transformer_lens.utils import to_numpy` -> `from lens.tl.utils import to_numpy`.
- cell 4: `fig.show()` -> `_show(fig)` and `px.imshow(tensor, **plot_kwargs).show()` ->
  `_show(px.imshow(tensor, **plot_kwargs))`: headless plotting (see above).
- cells 18, 21, 47: the cell's last bare expression, which the notebook displays, is shown the
  script's way: cell 18 `px.line(losses, ...)` -> `_show(px.line(losses, ...))`; cells 21
  (`model.pos_embed.W_pos.norm()`) and 47 (`cache.cache_dict.keys()`) -> `print(...)`.
  (Cell 25's expression sits inside an `if`, which the notebook does not display: kept as is.)
- cells 30 and 44: `torch.arange(1, model.cfg.n_ctx).cuda()` ->
  `torch.arange(1, model.cfg.n_ctx).cuda() if not IN_GITHUB else torch.arange(1, model.cfg.n_ctx)`
  and `next(big_data_loader).cuda()` -> `next(big_data_loader).cuda() if not IN_GITHUB else
  next(big_data_loader)`: the notebook's own IN_GITHUB guard of cells 18 and 23
  (`tokens.cuda() if not IN_GITHUB else tokens`), which it forgot in these two cells, so its
  GitHub path crashes on a CPU-only machine under TransformerLens too.
- cell 45: `if hook_name != "hook_pos_embed" and "result" not in hook_name:` -> `if hook_name
  in cache and hook_name != "hook_pos_embed" and "result" not in hook_name:`, upstream's own fix
  (TransformerLens commit d2415b4c, "Demo no position fix"): since TransformerLens 2
  `model.hook_dict` also holds hook points that run_with_cache leaves out by default
  (hook_attn_in, hook_q/k/v_input, hook_mlp_in), so the notebook's line raises a KeyError under
  TransformerLens 2.x as under lens.

Everything else is verbatim, including what does not stop it: cell 25 tests `hook_attn`,
TransformerLens 1.x's name of `hook_pattern`, so its `if` is false under TransformerLens 2.x and
under lens; cell 29's `cache["scale", None, "ln_final"]` is ln_final.hook_scale under lens (and
under the TransformerLens the notebook was run with) but a KeyError ('ln_final.ln_final.
hook_scale') under TransformerLens 2.x, where upstream later wrote `cache["scale"]`.

What lens.tl lacks is not worked around here: cell 32 calls
`analysis_model.load_and_process_state_dict(state_dict, fold_ln=True, ...)`, which
lens.tl.HookedTransformer does not have yet, so until it does the script stops there with an
AttributeError (tests/test_tl_no_position_demo.py expects that failure while the method is
missing).
"""

import argparse
from pathlib import Path

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--out", type=Path, default=None, help="write each figure to OUT/fig_NN.html")
_args = _parser.parse_args()
_n_figs = 0


def _show(fig):
    """The notebook's fig.show(), headless: an HTML file under --out, or nothing."""
    global _n_figs
    _n_figs += 1
    if _args.out is not None:
        _args.out.mkdir(parents=True, exist_ok=True)
        fig.write_html(_args.out / f"fig_{_n_figs:02d}.html")


# %% [cell 2]
import os
import sys

IN_COLAB = "google.colab" in sys.modules
IN_GITHUB = os.getenv("GITHUB_ACTIONS") == "true"
DEBUG_MODE = False
DEVELOPMENT_MODE = False
DO_SLOW_RUNS = not IN_GITHUB
EPOCHS_SIZE = 4000 if not IN_GITHUB else 25

from lens.tl import HookedTransformer, HookedTransformerConfig
import torch
import numpy as np
import plotly.express as px
import plotly.io as pio

pio.renderers.default = "colab"
import tqdm.auto as tqdm
import einops
from lens.tl.utils import to_numpy


# %% [cell 4]
def line(tensor, line_labels=None, yaxis="", xaxis="", **kwargs):
    tensor = to_numpy(tensor)
    labels = {"y": yaxis, "x": xaxis}
    fig = px.line(tensor, labels=labels, **kwargs)
    if line_labels:
        for c, label in enumerate(line_labels):
            fig.data[c].name = label
    _show(fig)


def imshow(tensor, yaxis="", xaxis="", **kwargs):
    tensor = to_numpy(tensor)
    plot_kwargs = {
        "color_continuous_scale": "RdBu",
        "color_continuous_midpoint": 0.0,
        "labels": {"x": xaxis, "y": yaxis},
    }
    plot_kwargs.update(kwargs)
    _show(px.imshow(tensor, **plot_kwargs))


# %% [cell 8]
cfg = HookedTransformerConfig(
    n_layers=2,
    d_model=64,
    d_head=64,
    n_heads=1,
    d_mlp=256,
    d_vocab=300,
    n_ctx=50,
    act_fn="relu",
    normalization_type="LN",
)
model = HookedTransformer(cfg)


# %% [cell 9]
def deactivate_position(model):
    model.pos_embed.W_pos.data[:] = 0.0
    model.pos_embed.W_pos.requires_grad = False


deactivate_position(model)


# %% [cell 10]
print(model)


# %% [cell 12]
def make_data_generator(cfg, batch_size, seed=123, incl_bos_token=True):
    torch.manual_seed(seed)
    while True:
        x = torch.randint(1, cfg.d_vocab, (batch_size, cfg.n_ctx))
        if incl_bos_token:
            x[:, 0] = 0
        yield x


data_generator = make_data_generator(cfg, 2)
print(next(data_generator))


# %% [cell 13]
def loss_fn(logits, tokens, per_token=False):
    # logit shape: [batch, pos, vocab]
    # token shape: [batch, pos]
    logits = logits[:, 1:]
    tokens = tokens[:, :-1]
    log_probs = logits.log_softmax(-1)
    correct_log_probs = log_probs.gather(-1, tokens[..., None])[..., 0]
    if per_token:
        return -correct_log_probs
    else:
        return -correct_log_probs.mean()


# %% [cell 14]
# Test the loss function works
test_tokens = torch.arange(5)[None, :]
test_logits = torch.randn(1, 5, 10)
test_logits[:, 1, 0] = 10.0
test_logits[:, 2, 1] = 10.0
test_logits[:, 3, 2] = 10.0
test_logits[:, 4, 3] = 10.0
print(loss_fn(test_logits, test_tokens, per_token=True))
print(loss_fn(test_logits, test_tokens, per_token=False))


# %% [cell 16]
batch_size = 256
num_epochs = EPOCHS_SIZE
lr = 1e-4
betas = (0.9, 0.95)
max_grad_norm = 1.0
wd = 0.1
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(i / 100, 1.0))

data_loader = make_data_generator(cfg, batch_size)


# %% [cell 18]
losses = []
for epoch in tqdm.tqdm(range(num_epochs)):
    tokens = next(data_loader)
    tokens = tokens.cuda() if not IN_GITHUB else tokens
    logits = model(tokens)
    loss = loss_fn(logits, tokens)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    losses.append(loss.item())
    if epoch % 100 == 0:
        print(f"Epoch {epoch}: {loss.item()}")
_show(px.line(losses, labels={"x": "Epoch", "y": "Loss"}))


# %% [cell 19]
# torch.save(model.state_dict(), "no_pos_experiment_state_dict_v0.pth")


# %% [cell 21]
print(model.pos_embed.W_pos.norm())


# %% [cell 23]
big_data_loader = make_data_generator(cfg, EPOCHS_SIZE)
big_tokens = next(big_data_loader)
big_tokens = big_tokens.cuda() if not IN_GITHUB else big_tokens
logits, cache = model.run_with_cache(big_tokens)
print("Loss:", loss_fn(logits, big_tokens).item())


# %% [cell 24]
print(cache)


# %% [cell 25]
if "blocks.0.attn.hook_attn" in cache:
    cache["blocks.0.attn.hook_attn"].shape


# %% [cell 26]
batch_index = 0
tokens = big_tokens[batch_index]
imshow(
    to_numpy(cache["attn", 0].mean([0, 1])),
    title="Layer 0 Attention Pattern",
    height=500,
    width=500,
)
imshow(
    to_numpy(cache["attn", 1].mean([0, 1])),
    title="Layer 1 Attention Pattern",
    height=500,
    width=500,
)


# %% [cell 28]
resid_components = [
    cache["embed"],
    cache["attn_out", 0],
    cache["mlp_out", 0],
    cache["attn_out", 1],
    cache["mlp_out", 1],
]
labels = ["embed", "A0", "M0", "A1", "M2"]
resid_stack = torch.stack(resid_components, 0)
resid_stack = resid_stack - resid_stack.mean(-1, keepdim=True)
print(resid_stack.shape)


# %% [cell 29]
fold_W_U = model.ln_final.w[:, None] * model.unembed.W_U
logit_components = (
    resid_stack[:, batch_index]
    @ fold_W_U
    / cache["scale", None, "ln_final"][batch_index]
)
print(logit_components.shape)


# %% [cell 30]
logit_components = logit_components - logit_components.mean(-1, keepdim=True)
line(
    logit_components[:, torch.arange(1, model.cfg.n_ctx).cuda() if not IN_GITHUB else torch.arange(1, model.cfg.n_ctx), tokens[:-1]].T,
    line_labels=labels,
)


# %% [cell 32]
analysis_cfg = HookedTransformerConfig(
    n_layers=2,
    d_model=64,
    d_head=64,
    n_heads=1,
    d_mlp=256,
    d_vocab=300,
    n_ctx=50,
    act_fn="relu",
    normalization_type="LNPre",
    init_weights=False,
)
analysis_model = HookedTransformer(analysis_cfg)
state_dict = model.state_dict()
analysis_model.load_and_process_state_dict(
    state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True
)
deactivate_position(analysis_model)


# %% [cell 33]
# analysis_model()


# %% [cell 35]
QK = model.W_E @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_E.T
imshow(QK, yaxis="Query", xaxis="Key")


# %% [cell 36]
OV = model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_in[0]
imshow(OV, yaxis="Input Vocab", xaxis="Neuron")


# %% [cell 37]
line(OV[:, torch.randint(0, 256, (5,))])


# %% [cell 39]
imshow(cache["post", 0][batch_index], yaxis="Pos", xaxis="Neuron")
imshow(cache["post", 0].mean(0), yaxis="Pos", xaxis="Neuron")
imshow((cache["post", 0] > 0).float()[batch_index], yaxis="Pos", xaxis="Neuron")
imshow((cache["post", 0] > 0).float().mean(0), yaxis="Pos", xaxis="Neuron")


# %% [cell 42]


# %% [cell 44]
new_token_batch = next(big_data_loader).cuda() if not IN_GITHUB else next(big_data_loader)
baseline_loss = loss_fn(model(new_token_batch), new_token_batch).item()
print("Baseline loss:", baseline_loss)


# %% [cell 45]
hook_list = list(model.hook_dict.keys())
losses = []
loss_labels = []
for hook_name in hook_list:
    if hook_name in cache and hook_name != "hook_pos_embed" and "result" not in hook_name:
        average_act = cache[hook_name].mean(0)

        def replacing_with_average_act(activation, hook):
            activation[:] = einops.repeat(
                average_act, "... -> batch ...", batch=new_token_batch.size(0)
            )
            return activation

        logits = model.run_with_hooks(
            new_token_batch, fwd_hooks=[(hook_name, replacing_with_average_act)]
        )
        loss = loss_fn(logits, new_token_batch)
        print(hook_name, loss.item())
        losses.append(loss.item())
        loss_labels.append(hook_name)


# %% [cell 46]
line(losses, hover_name=loss_labels)


# %% [cell 47]
print(cache.cache_dict.keys())


# %% [cell 48]
