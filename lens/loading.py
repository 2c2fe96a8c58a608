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
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lens import families, io
from lens.config import GPTConfig
from lens.families import gpt2
from lens.model import HookedGPT
from lens.processing import process_weights, set_config

PathLike = Union[str, os.PathLike]
LENS_CONFIG, LENS_WEIGHTS = "lens_config.json", "model.safetensors"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.json",
              "merges.txt", "tokenizer.json"]
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- config
def config_from_hf(hf_config, source: Optional[str] = None) -> GPTConfig:
    """The lens spec of an HF config (a config.json dict or a PretrainedConfig), through its
    family (lens.families): GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX/Pythia, Phi-3. A field
    lens reads at a value of the wrong type or range, a missing field, and an option lens does
    not implement are refused by name; errors start with `source` (the config's file)."""
    source = source or "the HF config"
    d = hf_config if isinstance(hf_config, dict) or not hasattr(hf_config, "to_dict") \
        else hf_config.to_dict()
    if not isinstance(d, dict):
        raise ValueError(f"{source} is a {type(d).__name__}, not a JSON object of config fields "
                         "(an HF config.json or a PretrainedConfig)")
    problems = families.field_problems(d)
    if problems:
        raise ValueError(f"{source}: invalid fields: " + "; ".join(problems))
    try:
        fam = families.family(d)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    missing = [k for k in fam.required if d.get(k) is None]
    if missing:
        raise ValueError(f"{source} (model_type={fam.model_type!r}) lacks the fields {missing} "
                         "(absent or null)")
    try:
        return fam.config(d)
    except KeyError as e:
        raise ValueError(f"{source} (model_type={fam.model_type!r}) lacks the field "
                         f"{e.args[0]!r}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# ---------------------------------------------------------------------- conversion
def _mismatch_error(source: str, cfg: GPTConfig, missing: list, unexpected: list, misshaped: list):
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not fit the config (n_layers={cfg.n_layers}, d_model={cfg.d_model}, "
             f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, d_head={cfg.d_head}, "
             f"d_vocab={cfg.d_vocab}, n_ctx={cfg.n_ctx}, d_mlp={cfg.d_mlp}):"]
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    for what, items in kinds:
        if items:
            lines.append(f"  {what} tensors ({len(items)}): " + "; ".join(items))
    raise ValueError("\n".join(lines))


def _match(shapes: dict[str, tuple], cfg: GPTConfig, plan: families.Plan, source: str) -> dict[str, str]:
    """Map plan names to the checkpoint's keys, or raise one ValueError listing every missing,
    unexpected and mis-shaped tensor."""
    found, unexpected = {}, []
    ignored = re.compile("|".join(f"(?:{p})" for p in plan.ignored)) if plan.ignored else None
    prefix = plan.strip if plan.strip and any(k.startswith(plan.strip) for k in shapes) else ""
    for key, shape in shapes.items():
        short = key.removeprefix(plan.strip) if plan.strip else key
        if ignored is not None and ignored.fullmatch(short):
            continue
        if short not in plan.tensors or short in found:
            unexpected.append(f"{key} {shape}")
        else:
            found[short] = key
    missing = [f"{'' if n.startswith('lm_head') else prefix}{n} {plan.tensors[n][0]}"
               for n in plan.tensors if n not in found]
    misshaped = [f"{key}: expected {plan.tensors[short][0]}, got {shapes[key]}"
                 for short, key in found.items() if shapes[key] != plan.tensors[short][0]]
    _mismatch_error(source, cfg, missing, unexpected, misshaped)
    return found


def convert_state_dict(hf_sd: dict[str, Tensor], cfg: GPTConfig, family: str) -> dict[str, Tensor]:
    """An HF state dict of `family` (a model_type, e.g. "llama") as a lens state dict for a
    model built from `cfg`. The result may share memory with `hf_sd`. Raises one ValueError
    naming every missing, unexpected and mis-shaped tensor."""
    plan = families.FAMILIES[family].plan(cfg)
    found = _match({k: tuple(v.shape) for k, v in hf_sd.items()}, cfg, plan, "state dict")
    out = {}
    for short, key in found.items():
        out.update(plan.tensors[short][1](hf_sd[key]))
    if cfg.unembed_bias:
        out["unembed.b_U"] = torch.zeros(cfg.d_vocab, dtype=out["embed.W_E"].dtype)
    return out


def convert_gpt2_state_dict(hf_sd: dict[str, Tensor], cfg: GPTConfig,
                            tie_word_embeddings: bool = True) -> dict[str, Tensor]:
    """An HF GPT-2 state dict (keys with or without "transformer.") as a lens state dict.

    With tied embeddings lm_head.weight is ignored (W_U is W_Eᵀ); pass a cfg with
    tied_embeddings=False (and lm_head.weight) to keep a separate W_U."""
    if not tie_word_embeddings and cfg.tied_embeddings:
        cfg = dataclasses.replace(cfg, tied_embeddings=False)
    return convert_state_dict(hf_sd, cfg, "gpt2")


# ---------------------------------------------------------------------- reading tensors
def _torch_load(path: Path) -> dict:
    """A .bin state dict, memory-mapped, with torch's weights-only unpickler: a file holding
    anything but tensors (code included) is refused, never run; a damaged one is refused by
    name."""
    io.regular_file(path)
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
    except Exception as e:  # torch's readers raise RuntimeError, EOFError, OSError, ... on damage
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint; it may be truncated or "
                         f"corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                           for k, v in sd.items()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(sd).__name__})")
    return sd


class _Source:
    """A checkpoint's tensors, read one at a time: safetensors with plain reads, .bin files
    through a memory map. Shapes are known without reading any tensor."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, object] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        first: dict[str, Path] = {}
        for f in files:
            if f.suffix == ".safetensors":
                handle = io.SafetensorsFile(f)
                found = {k: (handle, handle.shape(k), handle.entries[k][0]) for k in handle.keys()}
            else:
                sd = _torch_load(f)
                found = {k: (sd, tuple(v.shape), v.dtype) for k, v in sd.items()}
            twice = sorted(k for k in found if k in first)
            if twice:
                raise ValueError(f"tensors {twice[:3]} are both in {first[twice[0]]} and in {f}; "
                                 "each tensor of a checkpoint must be in one file")
            for k, (handle, shape, dtype) in found.items():
                self.where[k], self.shapes[k], self.dtypes[k], first[k] = handle, shape, dtype, f

    def get(self, key: str) -> Tensor:
        handle = self.where[key]
        return handle[key] if isinstance(handle, dict) else handle.get(key)


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names: file names in its folder."""
    weight_map = _read_json(index).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{index}: weight_map={io.brief(weight_map)} must be a non-empty object "
                         "mapping tensor names to shard file names")
    names = sorted(set(weight_map.values()))
    bad = [s for s in names if Path(s).name != s or s in (".", "..")]
    if bad:
        raise ValueError(f"{index}: weight_map names shards {bad[:3]}, which are not file names "
                         f"in {index.parent}")
    missing = [s for s in names if not (index.parent / s).exists()]
    if missing:
        raise ValueError(f"{index} names shards that {index.parent} lacks: {missing[:3]}")
    return [index.parent / s for s in names]


def _weight_files(d: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        f = d / name
        if f.exists():  # a directory or FIFO of this name is refused when read, not skipped
            return _shards(f) if name.endswith(".index.json") else [f]
    raise ValueError(f"{d} holds no weights: looked for {', '.join(_HF_WEIGHTS)}")


@dataclasses.dataclass
class _Checkpoint:
    cfg: GPTConfig
    source: _Source
    kind: str  # "hf" or "lens"
    family: str = "gpt2"  # the HF model_type, for "hf"
    folder: Optional[Path] = None


def _stored_dtype(hf_dict: Optional[dict], source: "_Source") -> Optional[torch.dtype]:
    """The dtype an HF checkpoint was saved in: config.json's dtype (torch_dtype before
    transformers 5), else that of its floating-point tensors."""
    name = (hf_dict or {}).get("dtype") or (hf_dict or {}).get("torch_dtype")
    if isinstance(name, str) and hasattr(torch, name.removeprefix("torch.")):
        dtype = getattr(torch, name.removeprefix("torch."))
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return next((d for d in source.dtypes.values() if d.is_floating_point), None)


def _read_json(path: Path) -> dict:
    """A JSON object from a regular file (config.json, lens_config.json, an index)."""
    io.regular_file(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path} nests JSON deeper than can be parsed") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid UTF-8 JSON: {io.brief(str(e), 200)}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {io.json_type(d)} ({io.brief(d)}); it must hold a "
                         "JSON object of fields")
    return d


def _open(path: Path, config) -> _Checkpoint:
    """The config and tensors of a lens or HF directory, or of a single weights file."""
    if config is not None and not isinstance(config, (GPTConfig, dict)):
        config = config.to_dict()  # a transformers PretrainedConfig
    if isinstance(config, dict) and "model_type" not in config:
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(GPTConfig)})
        if unknown:
            raise ValueError(f"config={io.brief(config)} has fields {unknown} that GPTConfig lacks; "
                             "give GPTConfig fields (n_heads, d_model, ...) or an HF config dict "
                             "with its model_type")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        kind = "lens" if (path / LENS_CONFIG).exists() else "hf"
        files = [path / LENS_WEIGHTS] if kind == "lens" else _weight_files(path)
        if kind == "lens" and not files[0].exists():
            raise ValueError(f"{path} holds {LENS_CONFIG} but not its weights, {LENS_WEIGHTS}")
    else:
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"{path}: expected a checkpoint directory or a .safetensors/.bin file")
        files = [path]
    source = _Source(files)
    if not path.is_dir():
        kind = "lens" if "embed.W_E" in source.shapes else "hf"
    name = LENS_CONFIG if kind == "lens" else "config.json"
    hf_dict = _read_json(folder / name) if (folder / name).exists() else None
    if isinstance(config, GPTConfig):
        cfg = config
    elif isinstance(config, dict) and "model_type" in config:
        cfg, hf_dict = config_from_hf(config, "the config= dict"), config
    elif hf_dict is not None and kind == "lens":
        try:
            cfg = GPTConfig.from_dict(hf_dict)
        except ValueError as e:
            raise ValueError(f"{folder / name}: {e}") from None
    elif hf_dict is not None:
        cfg = config_from_hf(hf_dict, str(folder / name))
    elif kind == "hf":
        cfg = gpt2.infer_config(source.shapes, dict(config or {}), str(path))
    else:
        raise ValueError(f"{path}: lens weights need {LENS_CONFIG} beside them or "
                         "config=GPTConfig(...)")
    if kind == "hf" and not isinstance(config, GPTConfig):
        stored = _stored_dtype(hf_dict, source)
        cfg = dataclasses.replace(cfg, dtype=stored or cfg.dtype)
    if isinstance(config, dict) and "model_type" not in config and hf_dict is not None:
        cfg = dataclasses.replace(cfg, **config)
    family = (hf_dict or {}).get("model_type", "gpt2") if kind == "hf" else "lens"
    return _Checkpoint(cfg, source, kind, family, folder)


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
        plan = families.FAMILIES[ckpt.family].plan(ckpt.cfg)
        found = _match(src.shapes, ckpt.cfg, plan, f"checkpoint {ckpt.folder}")
        jobs = ((key, plan.tensors[short][1]) for short, key in found.items())
        if "unembed.b_U" in params:  # a spec asking for a bias the checkpoint lacks
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
    if storage_dtype is not None and (not isinstance(storage_dtype, torch.dtype)
                                      or not storage_dtype.is_floating_point):
        raise ValueError(f"storage_dtype={storage_dtype!r} would truncate the weights; give a "
                         "floating dtype (torch.float16, torch.bfloat16, torch.float32)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", storage_dtype or v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    io.write(tensors, path / LENS_WEIGHTS, metadata={"format": "pt"})
    (path / LENS_CONFIG).write_text(model.cfg.to_json() + "\n", encoding="utf-8")
    return path
