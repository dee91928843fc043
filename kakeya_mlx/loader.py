"""Load a model for the engine: the bundled default, a local folder, or a Hugging Face repo id.

Every source ends as a Hugging Face layout folder (config.json, *.safetensors,
tokenizer files) loaded by `mlx_lm.utils.load`, so a user's model and the tests'
tiny models take the same path. Before any weight is read, config.json must name an
architecture the sink+window cache can serve.
"""

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_lm_load

from . import platform
from .cache import kv_bytes_per_token
from .errors import ModelLoadError, UnsupportedModelError
from .gguf import DTYPES, FORMAT_VERSION, Progress, convert_gguf, find_smollm2_gguf
from .rope import RopeSpec, layer_shifters

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# What a model folder needs from a hub repo; other files (e.g. PyTorch weights) are skipped.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_LABELS = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", None: "q4"}


@dataclass
class LoadedModel:
    """A model ready for the engine, with what the engine needs to know about it."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    name: str  # shown to users: the repo id, the folder name, or the default model's name
    path: Path
    config: dict  # config.json as written
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
    name_or_path: str | Path | None = None, *, dtype: str | None = None, progress: Progress = None
) -> LoadedModel:
    """Load a model by name (None or "smollm2": the bundled default), folder path or hub repo id.

    `dtype` ("bfloat16", "float16", "float32") casts floating-point weights; for the
    default model it picks the conversion instead (None: the platform's choice,
    bfloat16 on the CPU backend, 4-bit on GPUs). `progress` receives one line per
    step worth telling a user about (conversion, download, loading).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    say = _reporter(progress)
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        dtype = dtype or platform.default_compute_dtype_for_gguf()
        path, name = _default_model(dtype, say), DEFAULT_MODEL_NAME
        cast = None  # converted in that dtype already
    else:
        path, name = _resolve(name_or_path, say)
        cast = dtype

    config = read_config(path)
    model_type = check_model_type(config, path)
    if not list(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path} has no model*.safetensors weights; only safetensors checkpoints can be loaded")

    say(f"loading {name} from {path}")
    try:
        model, tokenizer = mlx_lm_load(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from e
    if cast is not None:
        target = getattr(mx, cast)
        model.update(tree_map(lambda p: p.astype(target) if _is_float(p) else p, model.parameters()))
    mx.eval(held_arrays(model))

    num_heads = int(config["num_attention_heads"])
    kv_dtype = _activation_dtype(model)
    quantization = config.get("quantization") or {}
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=path,
        config=config,
        model_type=model_type,
        eos_token_ids=_eos_token_ids(path, config, tokenizer),
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


def read_config(path: Path) -> dict:
    """config.json of the model folder `path`, with a clear error if it is missing or broken."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} has no config.json; a model folder holds config.json, *.safetensors weights and tokenizer files"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{file} does not hold a JSON object")
    return config


def check_model_type(config: dict, path: Path) -> str:
    """The config's model_type, if the sink+window cache can serve it."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} (in {path / 'config.json'}) is not supported: the sink+window "
            "cache re-rotates cached keys, so it needs standard RoPE self-attention; supported model "
            f"types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    return model_type


def default_model_dir(dtype: str | None) -> Path:
    """Where the default model converted to `dtype` (None: kept 4-bit) is cached."""
    label = f"{DEFAULT_MODEL_NAME}-{_DTYPE_LABELS[dtype]}-v{FORMAT_VERSION}"
    return platform.default_cache_dir() / "models" / label


def _default_model(dtype: str | None, say: Callable[[str], None]) -> Path:
    target = default_model_dir(dtype)
    if (target / "config.json").is_file():  # conversions appear complete or not at all
        return target
    gguf = find_smollm2_gguf()
    say(f"preparing the default model {DEFAULT_MODEL_NAME} ({dtype or '4-bit'}) in {target}; this happens once")
    return convert_gguf(gguf, target, dtype=dtype, progress=say)


def _resolve(name_or_path: str | Path, say: Callable[[str], None]) -> tuple[Path, str]:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    if path.exists():
        raise ModelLoadError(f"{path} is a file; give the model's folder (config.json, *.safetensors, tokenizer files)")
    text = str(name_or_path)
    if isinstance(name_or_path, str) and _REPO_ID.match(text):
        return _from_hub(text, say), text
    raise ModelLoadError(f"no model folder at {text}, and it is not a Hugging Face repo id (org/name)")


def _from_hub(repo_id: str, say: Callable[[str], None]) -> Path:
    """The repo's snapshot folder: from the local Hugging Face cache, else downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except (OSError, ValueError):
        pass  # not cached (or cached incompletely): try the Hub
    missing = (
        f"no folder named {repo_id}, and model {repo_id!r} is not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}; set HF_HOME or HF_HUB_CACHE to use another)"
    )
    fetch_hint = f"download it once with `hf download {repo_id}` (huggingface-cli download)"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{missing}; HF_HUB_OFFLINE is set, so it cannot be downloaded now: {fetch_hint}")
    say(f"{repo_id} is not in the local Hugging Face cache; downloading it")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        refused = f"the Hub refused it ({type(e).__name__}): check the id and your token"
        raise ModelLoadError(f"{missing}, and {refused}") from e
    except Exception as e:
        raise ModelLoadError(f"{missing}, and downloading it failed ({type(e).__name__}); {fetch_hint}") from e


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


def _eos_token_ids(path: Path, config: dict, tokenizer: TokenizerWrapper) -> list[int]:
    """Every id that ends a turn: config.json's, generation_config.json's and the tokenizer's."""
    ids = set(_ids(config.get("eos_token_id"))) | set(tokenizer.eos_token_ids)
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            ids |= set(_ids(json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id")))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable %s: %s", generation, e)
    return sorted(ids)


def _chat_template(tokenizer: TokenizerWrapper) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one serves chat
        template = template.get("default")
    return template if isinstance(template, str) and template else None
