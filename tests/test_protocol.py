"""The wire codec: golden vectors, framing edge cases, strict request validation, socket paths."""

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import kakeya_protocol
from kakeya_protocol import (
    ERROR_CODES,
    MAX_FRAME_BYTES,
    METHODS,
    ErrorReply,
    EventMessage,
    FrameDecoder,
    ProtocolError,
    Reply,
    RequestError,
    default_socket_path,
    encode_frame,
    make_error,
    make_event,
    make_result,
    parse_request,
    parse_server_message,
)

VECTORS = Path(kakeya_protocol.__file__).parent / "vectors"
SPEC = Path(__file__).resolve().parents[1] / "protocol" / "SPEC.md"
SID = "3f9a6c0e5b1d4e2a"


def vectors(name: str) -> list[dict]:
    return json.loads((VECTORS / f"{name}.json").read_text())


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_one(raw: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> dict:
    messages = FrameDecoder(max_frame_bytes).feed(raw)
    assert len(messages) == 1
    return messages[0]


# ---- golden vectors ----------------------------------------------------------------------


def test_vector_files_cover_every_method_and_error_code():
    requests = vectors("requests")
    valid_methods = {v["message"]["method"] for v in requests if v["valid"]}
    assert valid_methods == set(METHODS)
    invalid_methods = {v["message"]["method"] for v in requests if not v["valid"] and v["message"] and "method" in v["message"]}
    assert {"append", "generate", "cancel", "hello", "tokenize", "detokenize", "session_info", "close_session"} <= invalid_methods
    reply_codes = {v["message"]["error"]["code"] for v in vectors("errors") if v["valid"]}
    assert set(ERROR_CODES) <= reply_codes
    event_reasons = {v["message"]["data"]["stop_reason"] for v in vectors("events") if v["valid"] and v["message"]["event"] == "done"}
    assert event_reasons == set(kakeya_protocol.STOP_REASONS)


def _ids(vs):
    return [v["description"] for v in vs]


@pytest.mark.parametrize("vector", vectors("requests"), ids=_ids(vectors("requests")))
def test_request_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    message = decode_one(raw)
    if vector["message"] is not None:
        assert message == vector["message"]
        assert encode_frame(vector["message"]) == raw
    if vector["valid"]:
        request = parse_request(message)
        assert request.id == message["id"] and request.method == message["method"]
        assert request.params == message.get("params", {})
        return
    with pytest.raises(RequestError) as caught:
        parse_request(message)
    assert caught.value.code == vector["error_code"]
    assert caught.value.id == vector["error_id"]
    assert vector["error_mentions"] in caught.value.message


SERVER_VECTORS = vectors("replies") + vectors("errors") + vectors("events")


@pytest.mark.parametrize("vector", SERVER_VECTORS, ids=_ids(SERVER_VECTORS))
def test_server_message_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    message = decode_one(raw)
    assert message == vector["message"]
    assert encode_frame(vector["message"]) == raw
    if not vector["valid"]:
        with pytest.raises(ProtocolError) as caught:
            parse_server_message(message)
        assert vector.get("error_mentions", "") in str(caught.value)
        return
    parsed = parse_server_message(message)
    kind = {Reply: "result", ErrorReply: "error", EventMessage: "event"}[type(parsed)]
    assert kind == vector["kind"]
    assert parsed.id == message["id"]
    if kind == "result":
        assert parsed.result == message["result"]
    elif kind == "error":
        assert (parsed.code, parsed.message) == (message["error"]["code"], message["error"]["message"])
    else:
        assert (parsed.event, parsed.data) == (message["event"], message["data"])


@pytest.mark.parametrize("vector", vectors("malformed"), ids=_ids(vectors("malformed")))
def test_malformed_frame_vectors(vector):
    raw = bytes.fromhex(vector["hex"])
    decoder = FrameDecoder(vector.get("max_frame_bytes", MAX_FRAME_BYTES))
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(raw)
    assert caught.value.code == vector["error_code"] == "protocol_error"
    assert vector["error_mentions"] in str(caught.value)


def test_valid_vectors_survive_byte_by_byte_feeding():
    """Every valid frame, all in one stream, fed one byte at a time, comes out whole and in order."""
    valid = [v for name in ("requests", "replies", "errors", "events") for v in vectors(name) if v["valid"]]
    stream = b"".join(bytes.fromhex(v["hex"]) for v in valid)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert out == [v["message"] for v in valid]
    assert decoder.buffered == 0


def test_spec_worked_example_bytes_match_the_codec():
    """Each frame in SPEC.md's worked example: the JSON line encodes to exactly the hex below it."""
    lines = SPEC.read_text().split("## 12. Worked example", 1)[1].split("```")[1].splitlines()
    frames, current = [], None
    for line in lines:
        if line.startswith(("→ ", "← ")):
            current = [json.loads(line[2:]), ""]
            frames.append(current)
        elif line.strip() and current is not None:
            current[1] += line.strip().replace(" ", "")
    assert len(frames) >= 10
    for message, hexstr in frames:
        assert encode_frame(message).hex() == hexstr, message
        assert decode_one(bytes.fromhex(hexstr)) == message
        if "method" in message:
            parse_request(message)
        else:
            parse_server_message(message)


# ---- framing -------------------------------------------------------------------------------


def test_multiple_frames_in_one_feed_and_split_across_feeds():
    messages = [{"id": i, "method": "stats"} for i in range(1, 6)]
    stream = b"".join(encode_frame(m) for m in messages)
    assert FrameDecoder().feed(stream) == messages
    # Split at every possible point into two feeds.
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == messages


def test_partial_frame_is_held_until_complete():
    raw = encode_frame({"id": 1, "method": "tokenize", "params": {"text": "x" * 300}})
    decoder = FrameDecoder()
    assert decoder.feed(raw[:2]) == [] and decoder.buffered == 2
    assert decoder.feed(raw[2:10]) == [] and decoder.buffered == 10
    assert decoder.feed(raw[10:-1]) == [] and decoder.buffered == len(raw) - 1
    assert decoder.feed(raw[-1:]) == [{"id": 1, "method": "tokenize", "params": {"text": "x" * 300}}]
    assert decoder.buffered == 0
    assert decoder.feed(b"") == []


def test_oversize_length_is_refused_from_the_header_before_the_body_arrives():
    decoder = FrameDecoder(max_frame_bytes=4096)
    assert decoder.feed(struct.pack(">I", 4097)[:3]) == []
    with pytest.raises(ProtocolError, match="4097 bytes exceeds max_frame_bytes=4096"):
        decoder.feed(struct.pack(">I", 4097)[3:])
    # Nothing of the announced body was needed, and nothing is kept.
    assert decoder.buffered == 0


def test_frame_of_exactly_max_frame_bytes_is_accepted():
    message = {"id": 1, "method": "tokenize", "params": {"text": ""}}
    base = len(msgpack.packb(message))
    # str8 header is 2 bytes for lengths 32..255: pick a text that makes the body exactly 200 bytes.
    message["params"]["text"] = "y" * (200 - base - 1)
    raw = encode_frame(message, max_frame_bytes=200)
    assert len(raw) == 4 + 200
    assert FrameDecoder(200).feed(raw) == [message]
    with pytest.raises(ProtocolError, match="max_frame_bytes=199"):
        FrameDecoder(199).feed(raw)
    with pytest.raises(ProtocolError, match="201 bytes exceeds max_frame_bytes=200"):
        encode_frame({**message, "params": {"text": message["params"]["text"] + "y"}}, max_frame_bytes=200)


def test_zero_length_frame():
    with pytest.raises(ProtocolError, match="length is 0"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


@pytest.mark.parametrize(
    "body, named",
    [
        (msgpack.packb([1, 2]), "array"),
        (msgpack.packb("hello"), "str"),
        (msgpack.packb(1.5), "float"),
        (msgpack.packb(True), "bool"),
        (msgpack.packb(b"raw", use_bin_type=True), "bin"),
        (msgpack.packb(msgpack.ExtType(5, b"x")), "ext"),
    ],
)
def test_body_must_be_a_map(body, named):
    with pytest.raises(ProtocolError, match=f"must be a msgpack map, got {named}"):
        FrameDecoder().feed(frame_of(body))


@pytest.mark.parametrize(
    "obj, named",
    [({1: "a"}, "int"), ({None: "a"}, "nil"), ({b"id": 1}, "bin"), ({"params": {7: 1}}, "int"), ({1.5: 0}, "float")],
)
def test_map_keys_must_be_strings(obj, named):
    with pytest.raises(ProtocolError, match=f"map keys must be msgpack str, not {named}"):
        FrameDecoder().feed(frame_of(msgpack.packb(obj, use_bin_type=True)))


def test_trailing_bytes_and_truncated_bodies_are_framing_errors():
    with pytest.raises(ProtocolError, match="1 bytes after"):
        FrameDecoder().feed(frame_of(msgpack.packb({"id": 1}) + b"\xc0"))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        FrameDecoder().feed(frame_of(msgpack.packb({"id": 1, "method": "stats"})[:-2]))


def test_decoder_stays_broken_after_a_framing_error():
    decoder = FrameDecoder()
    good = encode_frame({"id": 1, "method": "stats"})
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x00\x00\x00" + good)
    with pytest.raises(ProtocolError, match="length is 0"):
        decoder.feed(good)


def test_encode_frame_refuses_non_maps():
    with pytest.raises(TypeError):
        encode_frame([1, 2])  # type: ignore[arg-type]


# ---- request validation, method by method --------------------------------------------------


def request(method: str, **params) -> dict:
    return {"id": 7, "method": method, "params": params}


def rejected(message: dict) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request(message)
    return caught.value


GOOD = {
    "hello": [{"protocol": 1}, {"protocol": 1, "client": "x"}, {"protocol": 2}],
    "create_session": [{}],
    "append": [
        {"session_id": SID, "tokens": [0, 1, 2**40]},
        {"session_id": SID, "text": " "},
        {"session_id": SID, "messages": [{"role": r, "content": ""} for r in ("system", "user", "assistant", "tool")]},
        {"session_id": SID, "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False},
    ],
    "generate": [
        {"session_id": SID},
        {"session_id": SID, "max_tokens": 1, "temperature": 0.0, "top_p": 1e-9, "top_k": 0, "min_p": 1, "repetition_penalty": 0.01},
        {"session_id": SID, "seed": 0, "stop": ["a"] * 16},
        {"session_id": SID, "stop": []},
    ],
    "cancel": [{"request_id": 1}, {"request_id": 2**53}, {"session_id": SID}],
    "session_info": [{"session_id": SID}],
    "close_session": [{"session_id": SID}],
    "list_sessions": [{}],
    "tokenize": [{"text": ""}, {"text": "héllo"}],
    "detokenize": [{"tokens": []}, {"tokens": [5]}],
    "stats": [{}],
    "shutdown": [{}],
}


@pytest.mark.parametrize("method, params", [(m, p) for m, ps in GOOD.items() for p in ps])
def test_good_params_pass_unchanged(method, params):
    parsed = parse_request(request(method, **params))
    assert (parsed.id, parsed.method, parsed.params) == (7, method, params)


def test_every_method_has_good_params_listed():
    assert set(GOOD) == set(METHODS)


BAD = [
    # (method, params, the field the message must name)
    ("hello", {}, "protocol"),
    ("hello", {"protocol": 0}, "protocol"),
    ("hello", {"protocol": True}, "protocol"),
    ("hello", {"protocol": 1.0}, "protocol"),
    ("hello", {"protocol": 1, "client": None}, "client"),
    ("hello", {"protocol": 1, "name": "x"}, "name"),
    ("create_session", {"session_id": SID}, "session_id"),
    ("append", {"tokens": [1]}, "session_id"),
    ("append", {"session_id": "", "tokens": [1]}, "session_id"),
    ("append", {"session_id": ["a"], "tokens": [1]}, "session_id"),
    ("append", {"session_id": SID}, "exactly one of tokens, text or messages"),
    ("append", {"session_id": SID, "tokens": [1], "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
    ("append", {"session_id": SID, "tokens": None}, "tokens"),
    ("append", {"session_id": SID, "tokens": {"0": 1}}, "tokens"),
    ("append", {"session_id": SID, "tokens": []}, "tokens"),
    ("append", {"session_id": SID, "tokens": [1, 2, -3]}, "tokens[2]=-3"),
    ("append", {"session_id": SID, "tokens": [1, "2"]}, "tokens[1]"),
    ("append", {"session_id": SID, "tokens": [False]}, "tokens[0]"),
    ("append", {"session_id": SID, "tokens": [1.0]}, "tokens[0]"),
    ("append", {"session_id": SID, "text": ""}, "text"),
    ("append", {"session_id": SID, "text": ["a"]}, "text"),
    ("append", {"session_id": SID, "messages": []}, "messages"),
    ("append", {"session_id": SID, "messages": {"role": "user", "content": "x"}}, "messages"),
    ("append", {"session_id": SID, "messages": [None]}, "messages[0]"),
    ("append", {"session_id": SID, "messages": [{"role": "user", "content": "a"}, {"role": "User", "content": "b"}]}, "messages[1].role"),
    ("append", {"session_id": SID, "messages": [{"role": "developer", "content": "b"}]}, "messages[0].role"),
    ("append", {"session_id": SID, "messages": [{"content": "b"}]}, "messages[0]"),
    ("append", {"session_id": SID, "messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content"),
    ("append", {"session_id": SID, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "tool_calls"),
    ("append", {"session_id": SID, "tokens": [1], "add_generation_prompt": False}, "add_generation_prompt"),
    ("append", {"session_id": SID, "messages": [{"role": "user", "content": "x"}], "add_generation_prompt": "yes"}, "add_generation_prompt"),
    ("append", {"session_id": SID, "text": "x", "colour": "red"}, "colour"),
    ("generate", {}, "session_id"),
    ("generate", {"session_id": SID, "max_tokens": 0}, "max_tokens"),
    ("generate", {"session_id": SID, "max_tokens": -5}, "max_tokens"),
    ("generate", {"session_id": SID, "max_tokens": "10"}, "max_tokens"),
    ("generate", {"session_id": SID, "max_tokens": False}, "max_tokens"),
    ("generate", {"session_id": SID, "temperature": -1e-9}, "temperature"),
    ("generate", {"session_id": SID, "temperature": math.inf}, "temperature"),
    ("generate", {"session_id": SID, "temperature": True}, "temperature"),
    ("generate", {"session_id": SID, "temperature": None}, "temperature"),
    ("generate", {"session_id": SID, "top_p": 0.0}, "top_p"),
    ("generate", {"session_id": SID, "top_p": 1.0000001}, "top_p"),
    ("generate", {"session_id": SID, "top_p": math.nan}, "top_p"),
    ("generate", {"session_id": SID, "top_k": -1}, "top_k"),
    ("generate", {"session_id": SID, "top_k": 1.0}, "top_k"),
    ("generate", {"session_id": SID, "min_p": -0.1}, "min_p"),
    ("generate", {"session_id": SID, "min_p": 1.1}, "min_p"),
    ("generate", {"session_id": SID, "repetition_penalty": 0.0}, "repetition_penalty"),
    ("generate", {"session_id": SID, "repetition_penalty": -1}, "repetition_penalty"),
    ("generate", {"session_id": SID, "seed": -1}, "seed"),
    ("generate", {"session_id": SID, "seed": 2**63}, "seed"),
    ("generate", {"session_id": SID, "seed": 1.5}, "seed"),
    ("generate", {"session_id": SID, "stop": "x"}, "stop"),
    ("generate", {"session_id": SID, "stop": [""]}, "stop[0]"),
    ("generate", {"session_id": SID, "stop": ["a", None]}, "stop[1]"),
    ("generate", {"session_id": SID, "stop": ["a"] * 17}, "at most 16"),
    ("generate", {"session_id": SID, "temp": 0.5}, "temp"),
    ("generate", {"session_id": SID, "stream": True}, "stream"),
    ("cancel", {}, "exactly one of request_id or session_id"),
    ("cancel", {"request_id": 1, "session_id": SID}, "exactly one"),
    ("cancel", {"request_id": 0}, "request_id"),
    ("cancel", {"request_id": 2**53 + 1}, "request_id"),
    ("cancel", {"request_id": "1"}, "request_id"),
    ("cancel", {"session_id": ""}, "session_id"),
    ("session_info", {}, "session_id"),
    ("session_info", {"session_id": 1}, "session_id"),
    ("close_session", {}, "session_id"),
    ("close_session", {"session_id": SID, "force": True}, "force"),
    ("list_sessions", {"all": True}, "all"),
    ("tokenize", {}, "text"),
    ("tokenize", {"text": None}, "text"),
    ("tokenize", {"text": "x", "add_special_tokens": False}, "add_special_tokens"),
    ("detokenize", {}, "tokens"),
    ("detokenize", {"tokens": "abc"}, "tokens"),
    ("detokenize", {"tokens": [1, -1]}, "tokens[1]"),
    ("stats", {"reset": True}, "reset"),
    ("shutdown", {"now": True}, "now"),
]


@pytest.mark.parametrize("method, params, named", BAD)
def test_bad_params_are_invalid_argument_naming_the_field(method, params, named):
    error = rejected(request(method, **params))
    assert error.code == "invalid_argument"
    assert error.id == 7
    assert error.message.startswith(f"{method}: ")
    assert named in error.message


def test_every_method_has_bad_params_listed():
    assert {m for m, _, _ in BAD} == set(METHODS)


def test_unknown_parameter_suggests_the_close_name():
    error = rejected(request("generate", session_id=SID, temprature=0.5))
    assert "'temprature'" in error.message and "did you mean 'temperature'" in error.message


def test_unknown_method_lists_the_methods():
    error = rejected({"id": 9, "method": "generat"})
    assert (error.code, error.id) == ("invalid_argument", 9)
    assert "'generat'" in error.message and "did you mean 'generate'" in error.message and "shutdown" in error.message


@pytest.mark.parametrize(
    "obj, named",
    [
        ({"id": 9, "method": "stats", "params": {b"x": 1}}, "bin"),
        ({"id": 9, "method": "append", "params": {"messages": [{b"role": "user"}]}}, "bin"),
    ],
)
def test_a_bin_key_at_any_depth_is_a_framing_error(obj, named):
    with pytest.raises(ProtocolError, match=named):
        decode_one(frame_of(msgpack.packb(obj, use_bin_type=True)))


def test_a_duplicate_map_key_at_any_depth_is_a_framing_error():
    # {"id": 1, "method": "stats", "id": 2}: most decoders would silently keep one of the two.
    top = b"\x83\xa2id\x01\xa6method\xa5stats\xa2id\x02"
    with pytest.raises(ProtocolError, match="'id' appears twice"):
        decode_one(frame_of(top))
    nested = b"\x83\xa2id\x01\xa6method\xa8tokenize\xa6params\x82\xa4text\xa1a\xa4text\xa1b"
    with pytest.raises(ProtocolError, match="'text' appears twice"):
        decode_one(frame_of(nested))


@pytest.mark.parametrize(
    "value",
    [msgpack.ExtType(5, b"xy"), msgpack.Timestamp(1, 0)],
    ids=["ext", "timestamp"],
)
def test_an_ext_value_is_a_wrong_type_wherever_it_stands(value):
    raw = frame_of(msgpack.packb({"id": 4, "method": "generate", "params": {"session_id": SID, "temperature": value}}))
    error = rejected(decode_one(raw))
    assert (error.code, error.id) == ("invalid_argument", 4) and "temperature" in error.message and "ext" in error.message
    raw = frame_of(msgpack.packb({"id": value, "method": "stats"}))
    error = rejected(decode_one(raw))
    assert (error.code, error.id) == ("protocol_error", None) and "ext" in error.message


def test_requests_before_hello_are_protocol_errors_whatever_their_params():
    for message in ({"id": 5, "method": "stats"}, {"id": 5, "method": "generate", "params": {"nonsense": 1}},
                    {"id": 5, "method": "no_such_method"}):
        error = rejected_before_hello(message)
        assert (error.code, error.id) == ("protocol_error", 5) and "'hello'" in error.message
    assert parse_request({"id": 5, "method": "hello", "params": {"protocol": 1}}, hello_done=False).method == "hello"


def rejected_before_hello(message: dict) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request(message, hello_done=False)
    return caught.value


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "message, code",
    [
        ({"id": nested(1000), "method": "stats"}, "protocol_error"),
        ({"id": 3, "method": "append", "params": {"session_id": SID, "tokens": [1, nested(1000)]}}, "invalid_argument"),
        ({"id": 3, "method": "generate", "params": {"session_id": SID, "stop": [nested(1000)]}}, "invalid_argument"),
        ({"id": 3, "method": "append", "params": {"session_id": SID, "messages": [{"role": nested(1000)}]}}, "invalid_argument"),
        ({"id": 3, "method": "x" * (16 << 20)}, "invalid_argument"),
        ({"id": 3, "method": "stats", "params": {"y" * (16 << 20): 1}}, "invalid_argument"),
        ({"id": 3, "method": "generate", "params": {"session_id": SID, "temperature": "z" * (16 << 20)}}, "invalid_argument"),
    ],
    ids=["nested id", "nested token", "nested stop", "nested role", "huge method", "huge key", "huge value"],
)
def test_error_messages_quote_client_values_only_up_to_a_bounded_length(message, code):
    error = rejected(message)
    assert error.code == code
    assert len(error.message) < 400


@pytest.mark.parametrize(
    "name, value, named",
    [
        ("temperature", 3, "[0, 2]"),
        ("temperature", 2**64 - 1, "[0, 2]"),
        ("repetition_penalty", 2**63, "[0.01, 100]"),
        ("repetition_penalty", 1e-38, "[0.01, 100]"),
        ("top_k", 2**64 - 1, "2**31 - 1"),
        ("seed", 2**63, "2**63 - 1"),
    ],
)
def test_absurd_numbers_are_refused_naming_the_field_and_its_range(name, value, named):
    error = rejected(request("generate", session_id=SID, **{name: value}))
    assert error.code == "invalid_argument" and name in error.message and named in error.message


@pytest.mark.parametrize(
    "message, code, rid",
    [
        ({"method": "stats"}, "protocol_error", None),
        ({"id": None, "method": "stats"}, "protocol_error", None),
        ({"id": -1, "method": "stats"}, "protocol_error", None),
        ({"id": [1], "method": "stats"}, "protocol_error", None),
        ({"id": 3}, "protocol_error", 3),
        ({"id": 3, "method": None}, "protocol_error", 3),
        ({"id": 3, "method": "stats", "params": "x"}, "protocol_error", 3),
        ({"id": 3, "method": "stats", "result": {}}, "protocol_error", 3),
    ],
)
def test_request_shape_errors(message, code, rid):
    error = rejected(message)
    assert (error.code, error.id) == (code, rid)


def test_params_may_be_left_out_and_defaults_are_not_filled_in():
    assert parse_request({"id": 1, "method": "list_sessions"}).params == {}
    # The daemon applies its own defaults (they depend on its settings), so parsing adds none.
    assert parse_request(request("generate", session_id=SID)).params == {"session_id": SID}


# ---- what the server sends ------------------------------------------------------------------


def test_make_reply_event_and_error():
    assert make_result(4, {"ok": True}) == {"id": 4, "result": {"ok": True}}
    assert make_error(None, "protocol_error", "bad") == {"id": None, "error": {"code": "protocol_error", "message": "bad"}}
    assert make_event(4, "truncated", {"evicted": 8, "total_evicted": 8}) == {
        "id": 4,
        "event": "truncated",
        "data": {"evicted": 8, "total_evicted": 8},
    }
    for code in ERROR_CODES:
        assert isinstance(parse_server_message(make_error(1, code, "m")), ErrorReply)
    with pytest.raises(ValueError, match="unknown error code"):
        make_error(1, "oops", "m")
    with pytest.raises(ValueError, match="unknown event"):
        make_event(1, "token", {})


def test_server_messages_round_trip_through_frames():
    messages = [
        make_result(1, {"session_id": SID}),
        make_event(2, "tokens", {"tokens": [1, 2], "text": "ab"}),
        make_event(2, "done", {"stop_reason": "eos", "prompt_tokens": 1, "generated_tokens": 2, "cached_tokens": 0, "timings": {}}),
        make_error(3, "busy", "session is generating"),
    ]
    decoded = FrameDecoder().feed(b"".join(encode_frame(m) for m in messages))
    parsed = [parse_server_message(m) for m in decoded]
    assert [type(p) for p in parsed] == [Reply, EventMessage, EventMessage, ErrorReply]
    assert parsed[1].data == {"tokens": [1, 2], "text": "ab"}


# ---- socket path and imports ----------------------------------------------------------------


def test_default_socket_path(monkeypatch, tmp_path):
    monkeypatch.setenv("KAKEYA_SOCKET", str(tmp_path / "x.sock"))
    assert default_socket_path() == tmp_path / "x.sock"
    monkeypatch.setenv("KAKEYA_SOCKET", "~/k.sock")
    assert default_socket_path() == Path.home() / "k.sock"
    monkeypatch.delenv("KAKEYA_SOCKET")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "kakeya" / "kakeya.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == Path.home() / ".cache" / "kakeya" / "kakeya.sock"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert default_socket_path() == Path.home() / "Library" / "Application Support" / "kakeya" / "kakeya.sock"


def test_protocol_package_needs_only_msgpack():
    code = "import kakeya_protocol, sys; bad = [m for m in ('mlx', 'numpy', 'kakeya_mlx') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_lists_every_method_and_error_code():
    text = SPEC.read_text()
    for method in METHODS:
        assert re.search(rf"^### {method}$", text, re.MULTILINE), method
    for code in ERROR_CODES:
        assert f"| `{code}` |" in text, code
