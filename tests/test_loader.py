"""Loading models from a folder or a Hugging Face repo id, and the errors a user sees when that fails."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from kakeya_mlx.errors import ModelLoadError, UnsupportedModelError
from kakeya_mlx.loader import held_arrays, load_model
from kakeya_mlx.locate import SUPPORTED_MODEL_TYPES

REPO = Path(__file__).resolve().parents[1]


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_changes)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_local_folder_loads_with_what_the_engine_needs(loaded_qwen3, qwen3_dir):
    m = loaded_qwen3
    assert m.path == qwen3_dir.resolve() and m.name == qwen3_dir.name
    assert (m.model_type, m.dtype, m.kv_dtype) == ("qwen3", "float32", "float32")
    assert (m.vocab_size, m.num_layers, m.num_kv_heads, m.head_dim) == (640, 2, 2, 16)
    assert m.max_position_embeddings == 256
    assert m.kv_bytes_per_token == 2 * 2 * 16 * 2 * 4
    assert len(m.shifters) == 2 and m.shifters[0].kind == "plain"
    assert m.config["model_type"] == "qwen3"
    assert m.chat_template.startswith("{% for message in messages %}")
    # <|im_end|> from config.json and the tokenizer, <|endoftext|> from generation_config.json.
    assert m.eos_token_ids == [0, 2]
    ids = m.tokenizer.encode("Hello there")
    assert m.model(mx.array(ids)[None]).shape == (1, len(ids), 640)


def test_eos_ids_are_the_union_of_every_source(qwen3_dir, tmp_path):
    path = _copy(qwen3_dir, tmp_path / "m", eos_token_id=[5, 6])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_model(path).eos_token_ids == [2, 5, 6, 7]  # 2: the tokenizer's <|im_end|>


def test_dtype_casts_the_weights(qwen3_dir):
    m = load_model(str(qwen3_dir), dtype="bfloat16")
    assert (m.dtype, m.kv_dtype) == ("bfloat16", "bfloat16")
    assert {p.dtype for _, p in tree_flatten(m.model.parameters())} == {mx.bfloat16}
    # float32 keys (see cache.LayerKV) and bfloat16 values
    assert m.kv_bytes_per_token == 2 * 2 * 16 * (4 + 2)
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_model(qwen3_dir, dtype="int3")


def test_unsupported_model_type_is_refused_before_reading_weights(qwen3_dir, tmp_path):
    path = _copy(qwen3_dir, tmp_path / "m", model_type="mamba")
    (path / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    message = str(err.value)
    assert "'mamba'" in message and "RoPE" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)
    assert err.value.code == "invalid_argument"


@pytest.mark.parametrize("damage", ["missing", "not json", "not an object"])
def test_missing_or_broken_config_names_the_folder(qwen3_dir, tmp_path, damage):
    path = _copy(qwen3_dir, tmp_path / "m")
    if damage == "missing":
        (path / "config.json").unlink()
    else:
        (path / "config.json").write_text("{model_type: qwen3" if damage == "not json" else "[1, 2]")
    with pytest.raises(ModelLoadError, match=str(path)) as err:
        load_model(path)
    assert not isinstance(err.value, UnsupportedModelError)
    if damage == "missing":
        assert "no config.json" in str(err.value)


def test_folder_without_weights_is_explained(qwen3_dir, tmp_path):
    path = _copy(qwen3_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.*safetensors"):
        load_model(path)


def test_a_path_that_is_neither_folder_nor_repo_id(tmp_path, qwen3_dir):
    with pytest.raises(ModelLoadError, match="not a Hugging Face repo id"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(qwen3_dir / "config.json")


def test_repo_id_resolves_from_the_hugging_face_cache_offline(qwen3_dir, tmp_path):
    """A model in the local Hugging Face cache loads by repo id with the hub unreachable
    (HF_HUB_OFFLINE=1); a repo id that is not cached fails with a message naming it."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--kakeya-test--tiny-qwen3"
    shutil.copytree(qwen3_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    script = textwrap.dedent(
        """
        import json
        from kakeya_mlx.errors import ModelLoadError
        from kakeya_mlx.loader import load_model

        m = load_model("kakeya-test/tiny-qwen3")
        out = {"name": m.name, "path": str(m.path), "model_type": m.model_type}
        try:
            load_model("kakeya-test/not-downloaded")
        except ModelLoadError as e:
            out["error"] = str(e)
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["name"] == "kakeya-test/tiny-qwen3" and out["model_type"] == "qwen3"
    assert Path(out["path"]) == repo / "snapshots" / commit
    error = out["error"]
    assert "'kakeya-test/not-downloaded'" in error and "not in the local Hugging Face cache" in error
    assert "HF_HOME" in error and "hf download kakeya-test/not-downloaded" in error


@pytest.mark.parametrize("variant", ["llama3", "llama-yarn", "llama-longrope"])
def test_arrays_made_lazily_at_load_are_evaluated_for_any_thread(make_model, variant):
    """mlx-lm keeps some RoPE frequencies as lazy private attributes (`_freqs`), not
    parameters. MLX streams are per thread, so one left lazy on the loading thread
    fails on the compute thread; the loader evaluates every array the tree holds."""
    loaded = load_model(make_model(variant))
    held = {id(a) for a in held_arrays(loaded.model)}
    ropes = [layer.self_attn.rope for layer in loaded.model.layers]
    assert all(id(rope._freqs) in held for rope in ropes)
    assert all(id(p) in held for _, p in tree_flatten(loaded.model.parameters()))

    errors = []

    def other_thread():
        try:
            mx.eval(held_arrays(loaded.model))
            mx.eval(loaded.model(mx.array([[5, 6, 7]])))
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert errors == []
