"""Make a tiny model of a real mlx-lm architecture, with seeded random weights.

    python -m tools.make_test_model OUT_DIR [--variant qwen3] [--seed 0]
                                    [--max-position-embeddings 256] [--dtype float32]
                                    [--tokenizer bpe] [--chat-format chatml]

The folder is in Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) and loads with `mlx_lm.utils.load`
unchanged. The same variant, seed and options give byte-identical files.

Tokenizers: "bpe" (default), a real byte-level BPE trained on a fixed English text,
with ChatML's special tokens; "chars", byte-level with one token per ASCII character
and no merges, plus the special tokens of the ChatML, Llama-3 and Mistral chat
formats. With "chars" every sequence of character tokens is the tokenizer's own
encoding of its text, so tests can compare generated token ids with the tokenization
of a rendered conversation exactly; its special tokens get small output rows, so
greedy text rarely contains one (as with a trained model).

Variants cover every RoPE kind the sink+window cache claims to re-rotate exactly
(kakeya_mlx/rope.py): plain (Qwen3 with q/k norms, Llama, Qwen2), Llama-3 scaled,
YaRN with mscale, longrope, dynamic NTK, and "traditional" (interleaved).
"""

import argparse
import functools
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
TOKENIZER_VOCAB_SIZE = 640

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Chat formats: the template (as the model families publish them), the special tokens
# it uses, BOS, and the end-of-sequence tokens (the tokenizer's first).
CHAT_FORMATS: dict[str, dict] = {
    "chatml": {
        "template": CHAT_TEMPLATE,
        "specials": SPECIAL_TOKENS,
        "bos": BOS_TOKEN,
        "eos": [EOS_TOKEN, BOS_TOKEN],
    },
    "llama3": {
        "template": (
            "{% set loop_messages = messages %}{% for message in loop_messages %}"
            "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
            "+ message['content'] | trim + '<|eot_id|>' %}"
            "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        ),
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": ["<|eot_id|>", "<|end_of_text|>"],
    },
    # Mistral-Instruct v0.1: no generation prompt, and a reply is closed by EOS itself.
    "mistral": {
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
        ),
        "specials": ["<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>",
        "eos": ["</s>"],
    },
}
TOKENIZERS = ("bpe", "chars")
CHARS = "\t\n" + "".join(chr(c) for c in range(0x20, 0x7F))
SPECIAL_OUTPUT_SCALE = 0.1

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog does not mind; it has seen the fox
before, and it knows the fox will be back tomorrow, and the day after that.

Once upon a time, there was a little town by the sea. Every morning the fishermen left the
harbour before the sun was up, and every evening they came home with their nets full of
silver fish. The children ran down to the water to meet them, and the old women sold bread
and soup at the market. Nobody in the town was rich, but nobody was hungry either.

A library is a quiet place where people come to read, to think and to learn. The books
stand on long wooden shelves, sorted by subject and by the name of the author. Some people
come to find a single fact; others stay all afternoon and forget the time.

The weather today will be cloudy in the morning, with some rain in the afternoon. In the
evening the wind will turn to the north and the temperature will fall to about ten degrees.
Tomorrow should be sunny and warm, a good day for a walk in the park or a trip to the hills.

To make a simple cup of tea, boil fresh water and pour it over the leaves. Wait three or
four minutes, then take the leaves out. Add milk or lemon if you like, and a little honey.
Drink it slowly while it is still hot, and enjoy the moment.

Computers follow instructions one step at a time. A program is a list of those steps,
written so that a machine can read them. Good programs are short, clear and easy to change;
they say what they do, and they do what they say. When something goes wrong, a clear error
message saves hours of work.

Questions and answers: What is the capital of France? Paris is the capital of France.
How many days are in a week? There are seven days in a week. What colour is the sky on a
clear day? The sky is blue. Where do fish live? Fish live in rivers, lakes and the sea.
Thank you for asking! You are welcome. Hello, how are you today? I am well, thank you.
"""

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

_BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

VARIANTS: dict[str, dict] = {
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama3": {
        "model_type": "llama",
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama-yarn": {
        "model_type": "llama",
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
        },
    },
    "llama-traditional": {"model_type": "llama", "tie_word_embeddings": True, "rope_traditional": True},
    # Phi-3's "longrope" on a Llama body: per-frequency factors and an input scale
    # (sqrt(1 + ln 4 / ln 64) at the default 256 positions).
    "llama-longrope": {
        "model_type": "llama",
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "longrope",
            "original_max_position_embeddings": 64,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 4.0],
        },
    },
    # Dynamic NTK changes its base only past the trained length, which
    # cache-relative positions never reach.
    "llama-dynamic": {
        "model_type": "llama",
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    },
}

# Projections are drawn at 2.5 / sqrt(fan_in): with a smaller gain, random tiny models
# fall into greedy loops that repeat one token. Embeddings stay small next to what the
# layers add (so tied embeddings do not make the model echo its last token) yet large
# enough to give tied logits a useful spread.
PROJECTION_GAIN = 2.5
EMBEDDING_STD = 0.3


@functools.lru_cache(maxsize=1)
def chars_tokenizer_json() -> str:
    """Byte-level, one token per ASCII character, no merges; every chat format's special tokens first."""
    specials = [t for f in CHAT_FORMATS.values() for t in f["specials"]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = [byte_level.pre_tokenize_str(c)[0][0] for c in CHARS]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, ensure_ascii=False, indent=1)


@functools.lru_cache(maxsize=1)
def trained_tokenizer_json() -> str:
    """The byte-level BPE trained on CORPUS, as tokenizer.json text (trained once per process)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    return json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, ensure_ascii=False, indent=1)


def model_config(
    variant: str, vocab: dict[str, int], max_position_embeddings: int, dtype: str, chat_format: str = "chatml"
) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    chat = CHAT_FORMATS[chat_format]
    config = {**_BASE, **VARIANTS[variant]}
    config.update(
        vocab_size=len(vocab),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab[chat["bos"]],
        eos_token_id=vocab[chat["eos"][0]],
        torch_dtype=dtype,
        architectures=[ARCHITECTURES[config["model_type"]]],
    )
    return config


def seeded_weights(config: dict, seed: int, dtype: str, quiet_rows: list[int] = ()) -> dict[str, mx.array]:
    """Random weights for every parameter the mlx-lm model declares, in name order.

    The output rows `quiet_rows` (lm_head's, or the tied embedding's) are scaled down.
    """
    model_class, args_class = _get_classes(config)
    shapes = dict(tree_flatten(model_class(args_class.from_dict(config)).parameters()))
    rng = np.random.RandomState(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name].shape
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            value = EMBEDDING_STD * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = PROJECTION_GAIN * rng.standard_normal(shape) / math.sqrt(shape[-1])
        output = "lm_head" if not config["tie_word_embeddings"] else "embed_tokens"
        if output in name and quiet_rows:
            value[list(quiet_rows)] *= SPECIAL_OUTPUT_SCALE
        weights[name] = mx.array(value.astype(np.float32)).astype(getattr(mx, dtype))
    return weights


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_test_model(
    out_dir: str | Path,
    variant: str = "qwen3",
    seed: int = 0,
    max_position_embeddings: int = 256,
    dtype: str = "float32",
    tokenizer: str = "bpe",
    chat_format: str = "chatml",
) -> Path:
    """Write a tiny `variant` model with weights drawn from `seed` into `out_dir`; returns the folder."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {tokenizer!r}")
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, not {chat_format!r}")
    if tokenizer == "bpe" and chat_format != "chatml":
        raise ValueError("the bpe tokenizer has ChatML's special tokens only; use tokenizer='chars'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = trained_tokenizer_json() if tokenizer == "bpe" else chars_tokenizer_json()
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    config = model_config(variant, vocab, max_position_embeddings, dtype, chat_format)
    quiet = [] if tokenizer == "bpe" else [t["id"] for t in json.loads(tokenizer_json)["added_tokens"]]
    weights = seeded_weights(config, seed, dtype, quiet)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out / "config.json", config)
    (out / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    chat = CHAT_FORMATS[chat_format]
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": chat["bos"],
            "eos_token": chat["eos"][0],
            "pad_token": chat["bos"],
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_position_embeddings,
            "chat_template": chat["template"],
        },
    )
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": vocab[chat["bos"]], "eos_token_id": [vocab[t] for t in chat["eos"]]},
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.make_test_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model into (created if missing)")
    parser.add_argument("--variant", default="qwen3", choices=sorted(VARIANTS), help="architecture and RoPE kind")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--max-position-embeddings", type=int, default=256, help="the model's trained context length")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    parser.add_argument("--tokenizer", default="bpe", choices=TOKENIZERS, help="trained BPE, or one token per character")
    parser.add_argument("--chat-format", default="chatml", choices=sorted(CHAT_FORMATS), help="chat template and specials")
    args = parser.parse_args(argv)
    path = make_test_model(
        args.out_dir, args.variant, args.seed, args.max_position_embeddings, args.dtype, args.tokenizer, args.chat_format
    )
    print(path)


if __name__ == "__main__":
    main()
