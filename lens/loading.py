"""Loading GPT-2-family checkpoints (HF directories, single files, the hub cache) into HookedGPT,
converting HF's fused Conv1D weights to per-head weights one tensor at a time, and saving and
loading lens's own format (lens_config.json + model.safetensors)."""

import dataclasses
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import einops
import torch
from safetensors.torch import save_file
from torch import Tensor

from lens.config import GPTConfig
from lens.model import HookedGPT
from lens.processing import process_weights, set_config

PathLike = Union[str, os.PathLike]
LENS_CONFIG, LENS_WEIGHTS = "lens_config.json", "model.safetensors"
_ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers, not weights
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json",
              "merges.txt", "tokenizer.json"]
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- config
def config_from_hf(hf_config) -> GPTConfig:
    """GPTConfig of a GPT-2-family HF config (a config.json dict or a PretrainedConfig):
    gpt2, gpt2-medium/-large/-xl, distilgpt2 and random models built from GPT2Config."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if d.get("model_type") != "gpt2":
        raise ValueError(f"model_type={d.get('model_type')!r} is not supported: lens loads the "
                         "GPT-2 family (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2), whose "
                         "config.json says model_type='gpt2'")
    required = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"GPT-2 config lacks {missing}")
    act = d.get("activation_function", "gelu_new")
    problems = []
    if act not in _ACT_FROM_HF:
        problems.append(f"activation_function={act!r} (supported: {sorted(_ACT_FROM_HF)})")
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                      ("add_cross_attention", True)):
        if d.get(flag, not bad) == bad:
            problems.append(f"{flag}={bad}")
    if d["n_embd"] % d["n_head"]:
        problems.append(f"n_embd={d['n_embd']} is not divisible by n_head={d['n_head']}")
    if problems:
        raise ValueError("this GPT-2 variant is not supported by lens: " + "; ".join(problems))
    return GPTConfig(
        n_layers=d["n_layer"], d_model=d["n_embd"], n_heads=d["n_head"], d_vocab=d["vocab_size"],
        n_ctx=d["n_positions"], d_head=d["n_embd"] // d["n_head"],
        d_mlp=d.get("n_inner") or 4 * d["n_embd"], act_fn=_ACT_FROM_HF[act], normalization="LN",
        eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tokenizer_name="gpt2" if d["vocab_size"] == 50257 else None)


def _infer_gpt2_config(shapes: dict[str, tuple], overrides: dict, source: str) -> GPTConfig:
    """GPTConfig from a GPT-2 state dict's shapes; n_heads (not in any shape) must be given."""
    s = {k.removeprefix("transformer."): v for k, v in shapes.items()}
    layers = [int(m.group(1)) for k in s if (m := re.fullmatch(r"h\.(\d+)\.ln_1\.weight", k))]
    try:
        d_vocab, d_model = s["wte.weight"]
        inferred = dict(n_layers=max(layers) + 1, d_model=d_model, d_vocab=d_vocab,
                        n_ctx=s["wpe.weight"][0], d_mlp=s["h.0.mlp.c_fc.weight"][1])
    except (KeyError, ValueError):
        raise ValueError(f"{source}: cannot infer a GPT-2 config from its tensors (expected "
                         "wte.weight, wpe.weight, h.0.ln_1.weight, h.0.mlp.c_fc.weight); pass "
                         "config= or put the checkpoint's config.json beside it") from None
    if "n_heads" not in overrides:
        raise ValueError(f"{source}: n_heads cannot be inferred from tensor shapes (inferred "
                         f"{inferred}); pass config={{'n_heads': ...}}, a GPTConfig or an HF "
                         "config dict, or put the checkpoint's config.json beside the file")
    return GPTConfig(**{**inferred, "tokenizer_name": "gpt2" if d_vocab == 50257 else None,
                        **overrides})


# ---------------------------------------------------------------------- conversion
Converter = Callable[[Tensor], dict[str, Tensor]]


def _gpt2_plan(cfg: GPTConfig) -> dict[str, tuple[tuple, Converter]]:
    """For each HF GPT-2 weight (without "transformer."): its shape and how it becomes lens
    weights. HF's Conv1D computes x @ W, as lens does; c_attn fuses Q, K and V of all heads."""
    D, H, E, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab

    def to(name: str, pattern: Optional[str] = None) -> Converter:
        if pattern is None:
            return lambda t: {name: t}
        return lambda t: {name: einops.rearrange(t, pattern, h=H)}

    def split(pattern: str, *names: str) -> Converter:  # c_attn: Q, K, V of all heads
        return lambda t: dict(zip(names, einops.rearrange(t, pattern, three=3, h=H)))

    plan = {"wte.weight": ((V, D), to("embed.W_E")),
            "wpe.weight": ((cfg.n_ctx, D), to("pos_embed.W_pos")),
            "ln_f.weight": ((D,), to("ln_final.w")), "ln_f.bias": ((D,), to("ln_final.b")),
            "lm_head.weight": ((V, D), lambda t: {"unembed.W_U": t.T})}
    for l in range(cfg.n_layers):
        h, b = f"h.{l}.", f"blocks.{l}."
        plan.update({
            h + "ln_1.weight": ((D,), to(b + "ln1.w")), h + "ln_1.bias": ((D,), to(b + "ln1.b")),
            h + "attn.c_attn.weight": ((D, 3 * H * E), split(
                "m (three h e) -> three h m e", *(b + f"attn.W_{x}" for x in "QKV"))),
            h + "attn.c_attn.bias": ((3 * H * E,), split(
                "(three h e) -> three h e", *(b + f"attn.b_{x}" for x in "QKV"))),
            h + "attn.c_proj.weight": ((H * E, D), to(b + "attn.W_O", "(h e) m -> h e m")),
            h + "attn.c_proj.bias": ((D,), to(b + "attn.b_O")),
            h + "ln_2.weight": ((D,), to(b + "ln2.w")), h + "ln_2.bias": ((D,), to(b + "ln2.b")),
            h + "mlp.c_fc.weight": ((D, cfg.d_mlp), to(b + "mlp.W_in")),
            h + "mlp.c_fc.bias": ((cfg.d_mlp,), to(b + "mlp.b_in")),
            h + "mlp.c_proj.weight": ((cfg.d_mlp, D), to(b + "mlp.W_out")),
            h + "mlp.c_proj.bias": ((D,), to(b + "mlp.b_out")),
        })
    return plan


def _mismatch_error(source: str, cfg: GPTConfig, missing: list, unexpected: list, misshaped: list):
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit the config (n_layers={cfg.n_layers}, d_model={cfg.d_model}, "
             f"n_heads={cfg.n_heads}, d_vocab={cfg.d_vocab}, n_ctx={cfg.n_ctx}, "
             f"d_mlp={cfg.d_mlp}):"]
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    for what, items in kinds:
        if items:
            lines.append(f"  {what} tensors ({len(items)}): " + "; ".join(items))
    raise ValueError("\n".join(lines))


def _match_gpt2(shapes: dict[str, tuple], cfg: GPTConfig, tie: bool, source: str) -> dict[str, str]:
    """Map plan names to the checkpoint's keys, or raise one ValueError listing every missing,
    unexpected and mis-shaped tensor."""
    plan, found, unexpected = _gpt2_plan(cfg), {}, []
    prefix = "transformer." if any(k.startswith("transformer.") for k in shapes) else ""
    for key, shape in shapes.items():
        short = key.removeprefix("transformer.")
        if _BUFFERS.fullmatch(short):
            continue
        if short not in plan or short in found:
            unexpected.append(f"{key} {shape}")
        else:
            found[short] = key
    optional = {"lm_head.weight"} if tie else set()
    missing = [f"{'' if n.startswith('lm_head') else prefix}{n} {plan[n][0]}"
               for n in plan if n not in found and n not in optional]
    misshaped = [f"{key}: expected {plan[short][0]}, got {shapes[key]}"
                 for short, key in found.items() if shapes[key] != plan[short][0]]
    _mismatch_error(source, cfg, missing, unexpected, misshaped)
    return found


def _convert_one(plan: dict, found: dict, short: str, t: Tensor) -> dict[str, Tensor]:
    pieces = plan[short][1](t)
    if short == "wte.weight" and "lm_head.weight" not in found:
        pieces["unembed.W_U"] = t.T  # tied embeddings
    return pieces


def convert_gpt2_state_dict(hf_sd: dict[str, Tensor], cfg: GPTConfig,
                            tie_word_embeddings: bool = True) -> dict[str, Tensor]:
    """An HF GPT-2 state dict (keys with or without "transformer.") as a lens state dict.

    lm_head.weight, when absent, is tied to wte. The result may share memory with `hf_sd`.
    Raises one ValueError naming every missing, unexpected and mis-shaped tensor."""
    shapes = {k: tuple(v.shape) for k, v in hf_sd.items()}
    found = _match_gpt2(shapes, cfg, tie_word_embeddings, "state dict")
    plan, out = _gpt2_plan(cfg), {}
    for short, key in found.items():
        out.update(_convert_one(plan, found, short, hf_sd[key]))
    out["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=out["embed.W_E"].dtype)
    return out


# ---------------------------------------------------------------------- reading tensors
def _torch_load(path: Path) -> dict:
    """A .bin state dict, memory-mapped, with torch's weights-only unpickler: a file holding
    anything but tensors (code included) is refused, never run."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files not in torch's zip format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x for x in str(e).splitlines() if "GLOBAL" in x or "Unsupported" in x]
        raise ValueError(f"refusing to load {path}: it holds Python objects other than tensors, "
                         "which could run arbitrary code when unpickled"
                         f"{' (' + lines[0].strip() + ')' if lines else ''}; use a safetensors "
                         "checkpoint, or convert this one where you trust its origin") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(sd).__name__})")
    return sd


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsFile:
    """Tensors of a .safetensors file read with plain file reads, one at a time, into fresh
    memory: nothing is memory-mapped, so the file's pages never count toward the process."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: malformed safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple] = {}
        for k, e in header.items():
            start, stop = e["data_offsets"]
            dtype = _ST_DTYPES.get(e["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {k} has unsupported dtype {e['dtype']}")
            count = math.prod(e["shape"])
            if stop - start != count * dtype.itemsize or 8 + n + stop > size:
                raise ValueError(f"{path}: tensor {k} has inconsistent offsets {e['data_offsets']}")
            self.entries[k] = (dtype, tuple(e["shape"]), 8 + n + start, count)

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple:
        return self.entries[key][1]

    def get(self, key: str) -> Tensor:
        dtype, shape, offset, count = self.entries[key]
        out = torch.empty(count, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            f.readinto(out.view(torch.uint8).numpy() if count else bytearray())
        return out.view(shape)


class _Source:
    """A checkpoint's tensors, read one at a time: safetensors with plain reads, .bin files
    through a memory map. Shapes are known without reading any tensor."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, object] = {}
        self.shapes: dict[str, tuple] = {}
        for f in files:
            if f.suffix == ".safetensors":
                handle = _SafetensorsFile(f)
                for k in handle.keys():
                    self.where[k], self.shapes[k] = handle, handle.shape(k)
            else:
                sd = _torch_load(f)
                for k, v in sd.items():
                    self.where[k], self.shapes[k] = sd, tuple(v.shape)

    def get(self, key: str) -> Tensor:
        handle = self.where[key]
        return handle[key] if isinstance(handle, dict) else handle.get(key)


def _weight_files(d: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        f = d / name
        if f.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
                return [d / s for s in shards]
            return [f]
    raise ValueError(f"{d} holds no weights: looked for {', '.join(_HF_WEIGHTS)}")


@dataclasses.dataclass
class _Checkpoint:
    cfg: GPTConfig
    source: _Source
    kind: str  # "hf" or "lens"
    tie: bool = True
    folder: Optional[Path] = None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _open(path: Path, config) -> _Checkpoint:
    """The config and tensors of a lens or HF directory, or of a single weights file."""
    if config is not None and not isinstance(config, (GPTConfig, dict)):
        config = config.to_dict()  # a transformers PretrainedConfig
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        kind = "lens" if (path / LENS_CONFIG).is_file() else "hf"
        files = [path / LENS_WEIGHTS] if kind == "lens" else _weight_files(path)
    else:
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"{path}: expected a checkpoint directory or a .safetensors/.bin file")
        files = [path]
    source = _Source(files)
    if not path.is_dir():
        kind = "lens" if "embed.W_E" in source.shapes else "hf"
    name = LENS_CONFIG if kind == "lens" else "config.json"
    hf_dict = _read_json(folder / name) if (folder / name).is_file() else None
    if isinstance(config, GPTConfig):
        cfg = config
    elif isinstance(config, dict) and "model_type" in config:
        cfg, hf_dict = config_from_hf(config), config
    elif hf_dict is not None:
        cfg = GPTConfig.from_dict(hf_dict) if kind == "lens" else config_from_hf(hf_dict)
        cfg = dataclasses.replace(cfg, **(config or {}))
    elif kind == "hf":
        cfg = _infer_gpt2_config(source.shapes, dict(config or {}), str(path))
    else:
        raise ValueError(f"{path}: lens weights need {LENS_CONFIG} beside them or "
                         "config=GPTConfig(...)")
    tie = bool((hf_dict or {}).get("tie_word_embeddings", True)) if kind == "hf" else True
    return _Checkpoint(cfg, source, kind, tie, folder)


def _from_hub(name: str) -> Path:
    """The local snapshot of a hub model: the cache first, then a download unless offline."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise ValueError(f"{name!r} is not a local path, and looking it up in the HF hub cache "
                         "needs huggingface_hub (pip install huggingface-hub)") from None
    env = os.environ.get("HF_HUB_OFFLINE", "0").upper()
    offline = constants.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE")
    how = (f"Download it where there is network (`hf download {name}`) or pass the path of a "
           "local directory holding config.json and model.safetensors")
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # not cached, or not a valid repo id
        cache_error = e
        if type(e).__name__ == "HFValidationError":
            raise ValueError(f"{name!r} is neither a local path nor a valid hub repo id "
                             f"({e})") from None
    if offline:
        raise ValueError(f"{name!r} is not a local path, and its weights are not in the HF hub "
                         f"cache ({constants.HF_HUB_CACHE}; HF_HUB_OFFLINE is set): "
                         f"{type(cache_error).__name__}. {how}") from None
    try:
        folder = Path(snapshot_download(name, allow_patterns=_HUB_FILES))
        if not list(folder.glob("*.safetensors")):
            bin_files = _HUB_FILES + ["pytorch_model.bin*"]
            folder = Path(snapshot_download(name, allow_patterns=bin_files))
        return folder
    except Exception as e:
        raise ValueError(f"{name!r} is not a local path, its weights are not in the HF hub cache "
                         f"({constants.HF_HUB_CACHE}), and downloading failed "
                         f"({type(e).__name__}: {e}). {how}") from None


def _resolve(name_or_path: PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    bundled = Path(__file__).parent / "models" / str(name_or_path)
    if bundled.is_dir():
        return bundled
    name = str(name_or_path)
    if path.suffix in (".safetensors", ".bin") or path.is_absolute() or name.startswith("."):
        raise ValueError(f"{name!r}: no such file or directory")
    return _from_hub(str(name_or_path))


# ---------------------------------------------------------------------- load and save
@torch.no_grad()
def _fill(model: HookedGPT, ckpt: _Checkpoint) -> None:
    """Copy the checkpoint into the model's preallocated parameters, one tensor at a time
    (copy_ keeps each parameter's dtype, device and memory layout)."""
    params = dict(model.named_parameters())
    src, filled = ckpt.source, set()
    if ckpt.kind == "lens":
        expected = {k: tuple(v.shape) for k, v in params.items()}
        _mismatch_error(
            "lens checkpoint", ckpt.cfg,
            [f"{k} {s}" for k, s in expected.items() if k not in src.shapes],
            [f"{k} {s}" for k, s in src.shapes.items() if k not in expected],
            [f"{k}: expected {s}, got {src.shapes[k]}" for k, s in expected.items()
             if k in src.shapes and src.shapes[k] != s])
        jobs = ((k, lambda t, k=k: {k: t}) for k in expected)
    else:
        found = _match_gpt2(src.shapes, ckpt.cfg, ckpt.tie, f"checkpoint {ckpt.folder}")
        plan = _gpt2_plan(ckpt.cfg)
        jobs = ((key, lambda t, s=short: _convert_one(plan, found, s, t))
                for short, key in found.items())
        params["unembed.b_U"].zero_()
        filled.add("unembed.b_U")
    for key, convert in jobs:
        tensor = src.get(key)
        for name, piece in convert(tensor).items():
            params[name].copy_(piece)
            filled.add(name)
        del tensor
    assert filled == set(params), f"parameters left unset: {sorted(set(params) - filled)}"


def _tokenizer(cfg: GPTConfig, folder: Optional[Path]):
    """The checkpoint's own tokenizer files if present, else GPT-2's for a GPT-2 vocabulary."""
    try:
        from lens.tokenizer import Tokenizer, load_tokenizer
    except ImportError:
        return None
    try:
        has = (lambda name: folder is not None and (folder / name).is_file())
        if has("vocab.json") and has("merges.txt") or has("tokenizer.json"):
            return Tokenizer.from_hf_dir(folder)
        if cfg.tokenizer_name == "gpt2":
            return Tokenizer.gpt2()
        return load_tokenizer(cfg.tokenizer_name) if cfg.tokenizer_name else None
    except Exception as e:
        warnings.warn(f"the model loaded without a tokenizer ({type(e).__name__}: {e})")
        return None


def from_pretrained(name_or_path: PathLike, device=None, dtype=None, fold_ln: bool = True,
                    center_writing_weights: bool = True, center_unembed: bool = True,
                    fold_value_biases: bool = True, process: bool = True,
                    config: Union[GPTConfig, dict, None] = None) -> HookedGPT:
    """A HookedGPT from a GPT-2-family checkpoint or a lens checkpoint.

    name_or_path: an HF directory (config.json + model.safetensors, sharded safetensors or
    pytorch_model.bin), a single .safetensors/.bin file, a lens directory (see `save`), or a
    hub name found in the HF hub cache (downloaded only when online). config: a GPTConfig, an
    HF config dict, or a dict of GPTConfig fields overriding the file's (a lone GPT-2 weights
    file needs at least {"n_heads": ...}). dtype: default the checkpoint config's (float32 for
    HF). process: apply lens.processing.process_weights with the four flags; steps recorded
    in a lens checkpoint are not repeated, and steps that do not fit the architecture are
    skipped. Half-precision models are processed in float32, then cast.

    Tensors are read lazily and copied one at a time into a preallocated model, so loading
    needs the model's memory plus its largest tensor.
    """
    ckpt = _open(_resolve(name_or_path), config)
    target = ckpt.cfg.dtype if dtype is None else dataclasses.replace(ckpt.cfg, dtype=dtype).dtype
    work = torch.float32 if process and target in _HALF else target
    with torch.device(device if device is not None else "cpu"):
        model = HookedGPT(dataclasses.replace(ckpt.cfg, dtype=work), init=False)
    _fill(model, ckpt)
    if process:
        process_weights(model, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                        center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                        strict=False)
    if work != target:
        model.to(target)
        set_config(model, dtype=target)
    model.tokenizer = _tokenizer(model.cfg, ckpt.folder)
    return model


def save(model: HookedGPT, path: PathLike, storage_dtype: Optional[torch.dtype] = None) -> Path:
    """Save in lens format: a directory with lens_config.json and model.safetensors (the
    state dict, made contiguous). Processed models (normalization "LNPre") round-trip exactly.
    storage_dtype (e.g. torch.float16) shrinks the file; loading still gives cfg.dtype."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", storage_dtype or v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path / LENS_WEIGHTS), metadata={"format": "pt"})
    (path / LENS_CONFIG).write_text(model.cfg.to_json() + "\n", encoding="utf-8")
    return path
