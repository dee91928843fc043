"""The test-model maker: deterministic files, real architectures, non-degenerate greedy text."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import rope_utils
from mlx_lm.utils import load

from tools.make_test_model import CHAT_FORMATS, VARIANTS, make_test_model

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy dog."
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = mx.array(tokenizer.encode(prompt))
    return [int(t) for t, _ in generate_step(ids, model, max_tokens=n)]


def test_same_seed_gives_byte_identical_files_across_processes(make_model, tmp_path):
    ours = make_model("llama3", seed=0)
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "tools.make_test_model", str(out), "--variant", "llama3", "--seed", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == out
    assert sorted(p.name for p in out.iterdir()) == FILES
    for name in FILES:
        assert (ours / name).read_bytes() == (out / name).read_bytes(), name


def test_a_different_seed_changes_the_weights_only(make_model):
    a, b = make_model("qwen3", seed=0), make_model("qwen3", seed=1)
    for name in FILES:
        same = (a / name).read_bytes() == (b / name).read_bytes()
        assert same == (name != "model.safetensors"), name
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(not mx.array_equal(wa[k], wb[k]).item() for k in wa if not k.endswith("norm.weight"))


def test_options_reach_the_config_and_weights(make_model, tmp_path):
    path = make_test_model(tmp_path, "llama", max_position_embeddings=64, dtype="bfloat16")
    config = json.loads((path / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    assert {w.dtype for w in mx.load(str(path / "model.safetensors")).values()} == {mx.bfloat16}
    with pytest.raises(ValueError, match="unknown variant 'mamba'"):
        make_test_model(tmp_path / "x", "mamba")


def _rope_kind(rope) -> str:
    if isinstance(rope, rope_utils.Llama3RoPE):
        return "llama3"
    if isinstance(rope, rope_utils.YarnRoPE):
        return f"yarn mscale={rope.mscale:.3f}"
    if isinstance(rope, rope_utils.SuScaledRoPE):
        return f"longrope scale={rope._scale:.3f}"
    if isinstance(rope, rope_utils.DynamicNTKScalingRoPE):
        return f"dynamic factor={rope.factor}"
    return f"plain traditional={rope.traditional}"


EXPECTED_ROPE = {
    "qwen3": "plain traditional=False",
    "qwen2": "plain traditional=False",
    "llama": "plain traditional=False",
    "llama3": "llama3",
    "llama-yarn": "yarn mscale=1.139",  # 0.1 * ln(4) + 1: the input scaling is exercised
    "llama-traditional": "plain traditional=True",
    "llama-longrope": "longrope scale=1.155",  # sqrt(1 + ln(256 / 64) / ln 64)
    "llama-dynamic": "dynamic factor=2.0",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_loads_with_mlx_lm_and_generates_varied_text(make_model, variant):
    model, tokenizer = load(str(make_model(variant)))
    attn = model.layers[0].self_attn
    assert _rope_kind(attn.rope) == EXPECTED_ROPE[variant]
    assert (attn.n_heads, attn.n_kv_heads) == (4, 2)  # grouped-query attention
    assert hasattr(attn, "q_norm") == (variant == "qwen3")

    # Logits vary along the prompt, and greedy decoding does not settle on one token.
    logits = model(mx.array(tokenizer.encode(PROMPT))[None])[0]
    assert len(set(mx.argmax(logits, axis=-1).tolist())) > logits.shape[0] // 2
    for prompt in (PROMPT, "Hello, how are you today?"):
        out = _greedy(model, tokenizer, prompt, 24)
        longest_run = max(len(list(run)) for _, run in itertools.groupby(out))
        assert len(set(out)) >= 12 and longest_run <= 4, (variant, out)


def test_tokenizer_is_byte_level_bpe_with_chatml_specials(loaded_qwen3):
    tokenizer = loaded_qwen3.tokenizer
    for text in [PROMPT, "Paris, 2024 — naïve café 😀\n\ttabs  and  spaces", ""]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("The weather today will be cloudy")) <= 8  # trained merges, not bytes
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert [tokenizer.encode(s) for s in specials] == [[0], [1], [2]]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.encode("hi")[0] != 0  # no BOS is prepended
    generation = json.loads((loaded_qwen3.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def test_chat_template_renders_chatml(loaded_qwen3):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text = loaded_qwen3.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = loaded_qwen3.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(1) == 3 and ids.count(2) == 2


def test_help_describes_the_command(capsys):
    from tools.make_test_model import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--variant" in out and "--seed" in out and "llama-yarn" in out


@pytest.mark.parametrize("chat_format", sorted(CHAT_FORMATS))
def test_chars_tokenizer_encodes_any_generated_text_back_to_its_tokens(make_model, chat_format):
    """One token per ASCII character and no merges: whatever character tokens a model
    generates are the tokenizer's own encoding of their text. Special tokens (all three
    chat formats') get quiet output rows, so greedy text rarely holds one."""
    model, tokenizer = load(str(make_model("llama", tokenizer="chars", chat_format=chat_format)))
    config = CHAT_FORMATS[chat_format]
    specials = [t for f in CHAT_FORMATS.values() for t in f["specials"]]
    assert tokenizer.encode("".join(specials)) == list(range(len(specials)))
    assert len(tokenizer.encode(PROMPT)) == len(PROMPT)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (config["bos"], config["eos"][0])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.index("Hi") < rendered.index("Hello") and config["eos"][0] in rendered

    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    out = _greedy(model, tokenizer, prompt, 64)
    assert not any(t < len(specials) for t in out)
    assert tokenizer.encode(tokenizer.decode(out)) == out
    assert len(set(out)) >= 16
