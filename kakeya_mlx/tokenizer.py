"""A model's tokenizer from its tokenizer.json and chat template, without transformers.

Importing transformers takes 2-4 s, most of a start-up, and the engine needs only
what a Hugging Face model folder already holds in portable form: tokenizer.json
(run by the `tokenizers` library, the same Rust code transformers' fast tokenizers
run) and a Jinja chat template (rendered by jinja2 in the sandbox and with the
helpers transformers gives templates). `Tokenizer` reproduces what transformers'
`PreTrainedTokenizerFast` (v5) does with those files: special tokens named in
tokenizer_config.json, tokenizer.json's own post-processor deciding which special
tokens encoding adds (transformers ignores add_bos_token / add_eos_token when
tokenizer.json is there), and the chat template's inputs. tests/test_tokenizer.py
compares the two on every tokenizer the tests use.

A folder without tokenizer.json (a SentencePiece tokenizer.model only, say) is
loaded by mlx-lm's transformers-based loader instead (`load_tokenizer`).
"""

import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

log = logging.getLogger(__name__)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode, decode and render chats for one model, with the attributes the engine reads.

    The surface is the part of transformers' tokenizer (and mlx-lm's wrapper) that
    the engine, chat.py, constrain.py, toolcalls.py and speculative.py use.
    """

    def __init__(self, backend: Backend, config: dict, chat_template: Optional[str], eos_token_ids=()):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens_map = {
            name: _token_text(config[name]) for name in SPECIAL_TOKEN_NAMES if config.get(name) is not None
        }
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)  # v5 also names them
        specials = list(self.special_tokens_map.values()) + [_token_text(t) for t in extra]
        missing = [t for t in specials if backend.token_to_id(t) is None]
        if missing:  # transformers adds named special tokens the vocabulary lacks
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        names = self.special_tokens_map
        self.bos_token, self.eos_token = names.get("bos_token"), names.get("eos_token")
        self.pad_token, self.unk_token = names.get("pad_token"), names.get("unk_token")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            None if t is None else backend.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token)
        )
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces")) and _model_kind(backend) != "BPE"
        self.eos_token_ids = set(int(i) for i in eos_token_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)

    # ---- text <-> ids ----------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, added tokens not counted (as transformers counts it)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    # ---- chat ------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: Optional[list[dict]] = None,
        documents: Optional[list[dict]] = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs,
    ):
        """The conversation as the template renders it: text, or its ids when `tokenize` (no special tokens added)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = _compiled(self.chat_template).render(
            **{**self.special_tokens_map, **kwargs},
            messages=[_plain(m) for m in messages],
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(path: Path, eos_token_ids=()) -> Any:
    """The tokenizer of the model folder `path`: ours where it has tokenizer.json, else mlx-lm's (transformers)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        log.info("%s has no tokenizer.json: loading its tokenizer with transformers", path)
        from mlx_lm.tokenizer_utils import load as load_with_transformers

        return load_with_transformers(path, eos_token_ids=list(eos_token_ids) or None)
    config = _read_json(path / "tokenizer_config.json")
    for name, value in _read_json(path / "special_tokens_map.json").items():
        config.setdefault(name, value)
    return Tokenizer(Backend.from_file(str(file)), config, _chat_template(path, config), eos_token_ids)


def _chat_template(path: Path, config: dict) -> Optional[str]:
    """The default chat template: chat_template.jinja, else tokenizer_config.json's, else chat_template.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: the default one serves chat
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    value = json.loads(file.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken map with its content."""
    return value["content"] if isinstance(value, dict) else str(value)


def _model_kind(backend: Backend) -> str:
    return json.loads(backend.to_str()).get("model", {}).get("type", "")


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: spaces before punctuation and contractions removed."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _plain(value):
    """Template inputs as plain JSON-like data (no objects whose methods the sandbox would expose)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _GenerationTag(Extension):
    """Templates written for training mark replies with {% generation %}...{% endgeneration %}: render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """The template compiled as transformers compiles chat templates (sandboxed, trim_blocks, lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(template)
