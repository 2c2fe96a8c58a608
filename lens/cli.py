"""The `lens` command line: `lens dissect TEXT` walks one prompt through a model's forward pass
(see lens.dissect), `lens harvest` writes activations over a dataset to disk (see
lens.harvest), `lens check PATH` compares a checkpoint loaded by lens with transformers' model of
it and checks the residual-stream identities (see lens.check), `lens feature SAE N` prints (and
plots) one SAE feature's card (see lens.sae.feature_card), `lens demo` lists a small random
model's hook points with their shapes."""

import argparse
import sys
from typing import Optional

import torch

# What lens raises about the user's input: a bad value or an unknown name (ValueError, KeyError)
# and what the file system refuses (OSError: a missing, unreadable or unwritable path, a full
# disk, a folder another harvest holds). A command turns these into one line on stderr and exit
# code 2. On the command line every argument arrives as a string that lens parses and checks, so
# anything else (TypeError, RuntimeError, ...) is a bug in lens or a failure inside torch, and
# keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError)


def run_command(prog: str, fn, *args) -> int:
    """fn(*args) -> exit code (None for 0), with lens's errors about the input as
    `prog: error: message` on stderr and exit code 2."""
    try:
        code = fn(*args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {_message(e)}", file=sys.stderr)
        return 2
    return 0 if code is None else code


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])  # str(KeyError) is the repr of its message
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def checked_device(arg: Optional[str]) -> Optional[str]:
    """A --device value, checked against this machine (None stays None)."""
    if arg is None:
        return None
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] \
        + (["mps"] if torch.backends.mps.is_available() else [])
    try:
        d = torch.device(arg)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {arg!r} is not a device; valid: cpu, cuda, cuda:N, mps "
                         f"(this machine has {', '.join(here)})")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {arg!r}: CUDA is not available on this machine "
                         f"(valid here: {', '.join(here)})")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {arg!r}: this machine has {torch.cuda.device_count()} CUDA "
                         f"devices (valid here: {', '.join(here)})")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {arg!r}: MPS is not available on this machine "
                         f"(valid here: {', '.join(here)})")
    return arg


def demo(args) -> None:
    import lens

    torch.manual_seed(args.seed)
    cfg = lens.GPTConfig(n_layers=2, d_model=8, n_heads=2, d_vocab=50257, n_ctx=16)
    model = lens.HookedGPT(cfg).eval()
    try:
        from lens.tokenizer import Tokenizer
        model.tokenizer = Tokenizer.gpt2()
        tokens = model.to_tokens(args.text)
        print(f"text {args.text!r} -> tokens {tokens.tolist()[0]} {model.to_str_tokens(args.text)}")
    except Exception as e:  # the demo still runs on ids when no tokenizer is available
        print(f"(no tokenizer: {e}; using ids)")
        tokens = torch.tensor([[50256, 15496, 2159]])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    print(f"random model: {cfg.n_layers} layers, d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
          f"d_head={cfg.d_head}, d_vocab={cfg.d_vocab}\n")
    width = max(map(len, cache))
    for name, act in cache.items():
        print(f"  {name:<{width}}  {list(act.shape)}")
    print(f"\nlogits {list(logits.shape)}; {len(cache)} hook points cached, {cache.nbytes} bytes")
    pattern = cache["pattern", 0][0, 0]
    print("\nlayer 0 head 0 attention pattern (rows = query, columns = key):")
    for row in pattern.tolist():
        print("  " + " ".join(f"{p:.2f}" for p in row))


def dissect(args) -> None:
    from lens.dissect import dissect as run, load_model

    model = load_model(args.model)
    result = run(model, args.text, layer=args.layer, head=args.head, top_k=args.top_k,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 seed=args.seed, plot_dir=args.plot, model_name=args.model)
    print(result)
    if args.plot is not None:
        print(f"\nfigures written to {args.plot}")


def check(args) -> int:
    import lens
    from lens.check import check as run

    load = (lens.HookedGPT.from_pretrained_no_processing if args.no_processing
            else lens.HookedGPT.from_pretrained)
    model = load(args.path, dtype=args.dtype, device=checked_device(args.device))
    report = run(model, args.path, prompts=args.prompts, log_prob_tol=args.log_prob_tol)
    print(report)
    return 0 if report.ok else 1


def feature(args) -> None:
    import lens
    from lens import io
    from lens.sae import _resolve, feature_card

    sae = lens.SAE.load(args.sae)
    name = args.model or sae.metadata.get("model")
    if name is None:
        raise ValueError(f"the SAE {args.sae!r} does not name its model: give --model")
    model = lens.HookedGPT.from_pretrained_no_processing(name)
    if args.harvest:
        from lens.harvest import Harvest
        tokens = Harvest.open(args.harvest)
    elif args.text:
        tokens = [model.to_tokens(t)[0] for t in args.text]
        n = min(len(t) for t in tokens)  # one length: each prompt's first n tokens
        tokens = torch.stack([t[:n] for t in tokens])
    else:
        saved = _resolve(args.sae, None) / "heldout.safetensors"
        if not saved.is_file():
            raise ValueError(f"no tokens are saved with the SAE {args.sae!r}: give --text")
        tokens = io.SafetensorsFile(saved).get("tokens")
    card = feature_card(model, sae, args.feature, tokens, k=args.k)
    print(card)
    if args.plot:
        card.plot(args.plot)
        print(f"\ncard written to {args.plot}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harvest"]:  # its own parser, so that `lens harvest -h` shows its options
        from lens.harvest import cli_main
        return cli_main(argv[1:])
    parser = argparse.ArgumentParser(prog="lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("harvest", help="write hook activations over a token dataset to sharded safetensors")
    p = sub.add_parser("demo", help="run a small random model and print every hook point's shape")
    p.add_argument("text", nargs="?", default="Hello World")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=demo)
    p = sub.add_parser("dissect", help="walk one prompt through the forward pass: tokens, "
                       "embedding, attention and MLP per block, unembed, sampling")
    p.add_argument("text")
    p.add_argument("--model", default="lens-tiny-attn2l", help="bundled name or checkpoint path")
    p.add_argument("--layer", type=int, help="show attention tables of this layer only")
    p.add_argument("--head", type=int, help="show attention tables of this head only")
    p.add_argument("--top-k", type=int, default=5, help="next tokens shown per position")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--temperature", type=float, default=1.0, help="0 samples greedily")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="DIR", help="write attention heat maps and a norm chart here")
    p.set_defaults(fn=dissect)
    p = sub.add_parser("check", help="compare a checkpoint loaded by lens with transformers' model "
                       "of it (log-probs) and check the residual-stream identities")
    p.add_argument("path", help="checkpoint directory or weights file")
    p.add_argument("--no-processing", action="store_true",
                   help="load the weights as stored (from_pretrained_no_processing)")
    p.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                   help="the lens model's dtype (default the checkpoint's); HF runs in float32")
    p.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    p.add_argument("--prompts", nargs="+", metavar="TEXT",
                   help="prompts to compare on (default a few built-in ones)")
    p.add_argument("--log-prob-tol", type=float, default=None,
                   help="largest |log-prob difference| that passes (default by dtype, "
                   "1e-4 for float32)")
    p.set_defaults(fn=check)
    p = sub.add_parser("feature", help="one SAE feature's card: top activating contexts, how often "
                       "it fires, its logit effects")
    p.add_argument("sae", help="bundled SAE name, SAELens / Gemma Scope / lens SAE path")
    p.add_argument("feature", type=int)
    p.add_argument("--model", default=None, help="the model it reads (default the one its metadata names)")
    p.add_argument("--text", nargs="+", metavar="TEXT",
                   help="prompts to scan (default the tokens saved with the SAE)")
    p.add_argument("--harvest", metavar="DIR", help="a harvest of this SAE's features (lens harvest "
                   "--sae) to read the top contexts from")
    p.add_argument("--k", type=int, default=8, help="top contexts shown")
    p.add_argument("--plot", metavar="PNG", help="write the card as a PNG here")
    p.set_defaults(fn=feature)
    args = parser.parse_args(argv)
    return run_command(f"lens {args.command}", args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
