"""Load a model for the engine: the bundled default, a GGUF file, a local folder, or a Hugging Face repo id.

Every source ends as a Hugging Face layout folder (config.json, *.safetensors,
tokenizer files), so a user's model and the tests' tiny models take the same path:
locate.py finds and checks it before anything heavy is imported, a GGUF file is
converted once into a cache folder (gguf.py), and the folder is read here. The
model is built from mlx-lm's model definitions; the tokenizer is our own
(tokenizer.py), so loading needs no transformers. Checkpoints that need more of
mlx-lm's loader than plain or MLX-quantized safetensors (a custom model file,
another quantization format) are loaded by mlx-lm's own loader.
"""

import glob
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from . import platform
from .cache import kv_bytes_per_token
from .errors import ModelLoadError
from .gguf import DTYPES, FORMAT_VERSION, Progress, convert_gguf
from .locate import (
    DEFAULT_MODEL_NAME,
    HUB_ALLOW_PATTERNS,
    ModelSource,
    check_folder,
    fetch_hint,
    gguf_fingerprint,
    locate,
    not_cached,
)
from .rope import RopeSpec, layer_shifters
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_DTYPE_LABELS = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", None: "q4"}
# mlx-lm's module for each supported model_type (its MODEL_REMAPPING, for these types).
_MODEL_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class LoadedModel:
    """A model ready for the engine, with what the engine needs to know about it."""

    model: nn.Module
    tokenizer: Any  # tokenizer.Tokenizer, or mlx-lm's TokenizerWrapper where the folder has no tokenizer.json
    name: str  # shown to users: the repo id, the folder name, or the default model's name
    path: Path
    config: dict  # config.json as written
    generation_config: dict  # generation_config.json as written ({} when there is none)
    model_type: str
    eos_token_ids: list[int]
    chat_template: str | None
    dtype: str  # "bfloat16", "float16", "float32", or "q4" / "q8" for quantized weights
    kv_dtype: str  # what keys and values are computed in
    shifters: list[RopeSpec]
    max_position_embeddings: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token takes in a session cache over all layers (keys and values)."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, getattr(mx, self.kv_dtype).size)


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: str | None = None,
    progress: Progress = None,
    source: Optional[ModelSource] = None,
) -> LoadedModel:
    """Load a model by name (None or "smollm2": the bundled default), GGUF file, folder path or hub repo id.

    `dtype` ("bfloat16", "float16", "float32") casts floating-point weights; for a
    GGUF model it picks the conversion instead (None: the platform's choice, see
    platform.default_compute_dtype_for_gguf). `progress` receives one line per step
    worth telling a user about (conversion, download, loading). `source`, from
    `locate.locate`, skips finding the model again.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    say = _reporter(progress)
    source = source or locate(name_or_path)
    cast = dtype
    if source.kind in ("default", "gguf"):
        dtype = dtype or platform.default_compute_dtype_for_gguf()
        path, cast = _converted(source, dtype, say), None  # converted in that dtype already
    elif source.path is None:
        path = _download(source.name, say)
    else:
        path = source.path
    name = source.name

    config = check_folder(path)
    model_type = config["model_type"]
    say(f"loading {name} from {path}")
    model = build_model(path, config)
    if cast is not None:
        target = getattr(mx, cast)
        model.update(tree_map(lambda p: p.astype(target) if _is_float(p) else p, model.parameters()))
    mx.eval(held_arrays(model))
    try:
        tokenizer = load_tokenizer(path, _ids(config.get("eos_token_id")))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e

    generation_config = _generation_config(path)
    num_heads = int(config["num_attention_heads"])
    kv_dtype = _activation_dtype(model)
    quantization = config.get("quantization") or {}
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        config=config,
        generation_config=generation_config,
        model_type=model_type,
        eos_token_ids=_eos_token_ids(config, generation_config, tokenizer),
        chat_template=_chat_template(tokenizer),
        dtype=f"q{quantization['bits']}" if "bits" in quantization else kv_dtype,
        kv_dtype=kv_dtype,
        shifters=layer_shifters(model),
        # Configs that omit it (old Llama exports) were trained at 2048 or more.
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        vocab_size=int(config["vocab_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // num_heads),
    )
    say(f"loaded {name}: {model_type}, {loaded.num_layers} layers, {loaded.dtype}, on {platform.backend()}")
    return loaded


def build_model(path: Path, config: dict) -> nn.Module:
    """The model of the folder `path` with its weights, as mlx-lm's `load_model` builds it.

    Plain and MLX-quantized (affine) safetensors are read here; anything else goes
    to mlx-lm's loader, whose import brings in transformers.
    """
    quantization = config.get("quantization")
    other_format = "model_file" in config or ("quantization_config" in config and quantization is None)
    if other_format or (quantization is not None and quantization.get("mode", "affine") != "affine"):
        return _load_with_mlx_lm(path)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{_MODEL_MODULES[config['model_type']]}")
        model = arch.Model(arch.ModelArgs.from_dict(config))
        weights: dict[str, Any] = {}
        for file in sorted(glob.glob(str(path / "model*.safetensors"))):
            weights.update(mx.load(file))
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        if quantization is not None:
            nn.quantize(
                model,
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                class_predicate=lambda p, m: _quantized_as(p, m, quantization, weights),
            )
        model.eval()
        model.load_weights(list(weights.items()), strict=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from e
    return model


def _quantized_as(path: str, module: nn.Module, quantization: dict, weights: dict):
    """How mlx-lm quantizes a module of an MLX-quantized checkpoint: as the config says per layer,
    else with the group size and bits its saved arrays were packed with."""
    if path in quantization:
        return quantization[path]
    if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
        return False
    in_dims = module.weight.shape[-1]
    return {
        "group_size": in_dims // weights[f"{path}.scales"].shape[-1],
        "bits": weights[f"{path}.weight"].shape[-1] * 32 // in_dims,
    }


def _load_with_mlx_lm(path: Path) -> nn.Module:
    log.info("%s needs mlx-lm's own loader (another quantization format or a custom model file)", path)
    from mlx_lm.utils import load_model as mlx_lm_load_model

    try:
        model, _ = mlx_lm_load_model(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from e
    return model


def held_arrays(model: nn.Module) -> list[mx.array]:
    """Every array the module tree holds: parameters and private attributes alike.

    mlx-lm builds some arrays lazily at load and keeps them outside the parameters
    (the Llama-3, YaRN and longrope RoPE frequencies, `_freqs`). A lazy array can only
    be evaluated on a thread that has the stream it was made on, and MLX streams are
    per thread, so everything is evaluated here, on the loading thread, before the
    compute thread uses it.
    """
    found: dict[int, mx.array] = {}

    def visit(value) -> None:
        if isinstance(value, mx.array):
            found[id(value)] = value
        elif isinstance(value, nn.Module):
            pass  # reached through modules()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for module in model.modules():
        for value in (*module.values(), *vars(module).values()):
            visit(value)
    return list(found.values())


def default_model_dir(dtype: str | None) -> Path:
    """Where the default model converted to `dtype` (None: kept 4-bit) is cached."""
    label = f"{DEFAULT_MODEL_NAME}-{_DTYPE_LABELS[dtype]}-v{FORMAT_VERSION}"
    return platform.default_cache_dir() / "models" / label


def gguf_model_dir(gguf: Path, dtype: str | None) -> Path:
    """Where a user's GGUF file converted to `dtype` is cached: named after the file and its fingerprint."""
    label = f"{gguf.stem}-{_DTYPE_LABELS[dtype]}-{gguf_fingerprint(gguf)}-v{FORMAT_VERSION}"
    return platform.default_cache_dir() / "models" / label


def _converted(source: ModelSource, dtype: str | None, say: Callable[[str], None]) -> Path:
    """The folder a GGUF model converts to, converting it first if it is not cached yet."""
    default = source.kind == "default"
    target = default_model_dir(dtype) if default else gguf_model_dir(source.path, dtype)
    if (target / "config.json").is_file():  # conversions appear complete or not at all
        return target
    what = f"the default model {DEFAULT_MODEL_NAME}" if default else source.path.name
    say(f"preparing {what} ({dtype or '4-bit'}) in {target}; this happens once")
    return convert_gguf(source.path, target, dtype=dtype, progress=say)


def _download(repo_id: str, say: Callable[[str], None]) -> Path:
    """Fetch a repo the local Hugging Face cache lacks (locate() found it missing, and not offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    say(f"{repo_id} is not in the local Hugging Face cache; downloading it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        refused = f"the Hub refused it ({type(e).__name__}): check the id and your token"
        raise ModelLoadError(f"{not_cached(repo_id)}, and {refused}") from e
    except Exception as e:
        raise ModelLoadError(
            f"{not_cached(repo_id)}, and downloading it failed ({type(e).__name__}); {fetch_hint(repo_id)}"
        ) from e


def _reporter(progress: Progress) -> Callable[[str], None]:
    def say(message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(message)

    return say


def _activation_dtype(model: nn.Module) -> str:
    """The dtype the model computes in: its embedding's (the scales', when quantized)."""
    embed = model.model.embed_tokens
    dtype = getattr(embed, "scales", embed.weight).dtype
    return str(dtype).removeprefix("mlx.core.")


def _is_float(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _generation_config(path: Path) -> dict:
    """generation_config.json (end tokens, sampling defaults); {} when there is none or it is unreadable."""
    file = path / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", file, e)
        return {}
    return value if isinstance(value, dict) else {}


def _eos_token_ids(config: dict, generation_config: dict, tokenizer) -> list[int]:
    """Every id that ends a turn: config.json's, generation_config.json's and the tokenizer's."""
    ids = set(_ids(config.get("eos_token_id"))) | set(tokenizer.eos_token_ids)
    try:
        ids |= set(_ids(generation_config.get("eos_token_id")))
    except (ValueError, TypeError) as e:
        log.warning("ignoring generation_config.json's eos_token_id: %s", e)
    return sorted(ids)


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one serves chat
        template = template.get("default")
    return template if isinstance(template, str) and template else None
