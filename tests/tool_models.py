"""Tiny test models wearing the chat templates of real tool-calling model families.

A family folder is a copy of a tiny test model whose tokenizer gains the family's
special tokens (appended, with seeded embedding rows so the model can read and
write them) and whose tokenizer_config.json carries the family's published chat
template, transcribed into tests/chat_templates/.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

TEMPLATES = Path(__file__).parent / "chat_templates"

# name: template file, added tokens (text, special?), BOS, end-of-turn tokens (the first is the tokenizer's EOS)
FAMILIES = {
    "qwen2.5": {
        "template": "qwen2.5-instruct.jinja",
        "added": [("<tool_call>", False), ("</tool_call>", False)],
        "bos": None,
        "eos": ["<|im_end|>", "<|endoftext|>"],
    },
    "llama3.1": {
        "template": "llama-3.1-instruct.jinja",
        "added": [
            (t, True)
            for t in (
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            )
        ],
        "bos": "<|begin_of_text|>",
        "eos": ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
    },
    "mistral-v0.3": {
        "template": "mistral-7b-instruct-v0.3.jinja",
        "added": [
            (t, True)
            for t in (
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            )
        ],
        "bos": "<s>",
        "eos": ["</s>"],
    },
}


def make_family_model(base: Path, out: Path, family: str, seed: int = 0) -> Path:
    """Copy the tiny model in `base` to `out`, dressed as `family`; returns `out`."""
    spec = FAMILIES[family]
    shutil.copytree(base, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tokenizer["model"]["vocab"])
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    first_new = max(vocab.values()) + 1
    for i, (text, special) in enumerate(spec["added"]):
        vocab[text] = first_new + i
        tokenizer["added_tokens"].append(
            {
                "id": first_new + i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
        )
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1), encoding="utf-8")

    config = json.loads((out / "config.json").read_text())
    extra = len(spec["added"])
    weights = mx.load(str(out / "model.safetensors"))
    rng = np.random.RandomState(seed + 1000)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            rows = 0.3 * rng.standard_normal((extra, weights[name].shape[1])).astype(np.float32)
            weights[name] = mx.concatenate([weights[name], mx.array(rows).astype(weights[name].dtype)])
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    eos_ids = [vocab[t] for t in spec["eos"]]
    config.update(vocab_size=config["vocab_size"] + extra, eos_token_id=eos_ids[0])
    if spec["bos"]:
        config["bos_token_id"] = vocab[spec["bos"]]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos_ids, "bos_token_id": config.get("bos_token_id")})
    )

    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        chat_template=(TEMPLATES / spec["template"]).read_text(encoding="utf-8"),
        bos_token=spec["bos"],
        eos_token=spec["eos"][0],
    )
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return out
