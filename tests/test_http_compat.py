"""What real clients trip over: the model id they send, browsers (CORS), and a conversation that did not fit."""

import json

import aiohttp
import pytest

from test_openai_http import KEY, QUESTION, running_front

from kakeya_mlx.loader import load_model

LONG = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def loaded(qwen3_dir):
    return load_model(qwen3_dir)


async def test_any_model_id_names_the_served_model(loaded, qwen3_dir):
    async with running_front(loaded, model=str(qwen3_dir)) as front:
        client = front.client()
        for asked in (front.model, str(qwen3_dir), qwen3_dir.name, "gpt-4o-mini"):
            reply = await client.chat.completions.create(model=asked, messages=QUESTION, max_tokens=2)
            assert reply.model == front.model  # the real id comes back
            assert (await client.models.retrieve(asked)).id == front.model


async def _request(front, method: str, path: str, headers: dict, body=None) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, front.url + path, headers=headers, json=body) as r:
            return r.status, dict(r.headers), await r.text()


async def test_browsers_are_refused_unless_their_origin_is_allowed(loaded):
    body = {"messages": QUESTION, "max_tokens": 2}
    async with running_front(loaded) as front:  # CORS off: no page may drive the local API
        status, headers, text = await _request(
            front, "POST", "/v1/chat/completions", {**AUTH, "Origin": "http://a.example"}, body
        )
        assert status == 403 and "http_cors_origins" in json.loads(text)["error"]["message"]
        assert "Access-Control-Allow-Origin" not in headers
        status, _, _ = await _request(front, "POST", "/v1/chat/completions", AUTH, body)  # no Origin: not a browser
        assert status == 200

    async with running_front(loaded, http_cors_origins="http://localhost:3000, http://b.example") as front:
        preflight = {
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        status, headers, _ = await _request(front, "OPTIONS", "/v1/chat/completions", preflight)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        for stream in (False, True):
            status, headers, _ = await _request(
                front,
                "POST",
                "/v1/chat/completions",
                {**AUTH, "Origin": "http://b.example"},
                {**body, "stream": stream},
            )
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://b.example"
            assert "X-Kakeya-Evicted-Tokens" in headers["Access-Control-Expose-Headers"]
        status, _, _ = await _request(
            front, "POST", "/v1/chat/completions", {**AUTH, "Origin": "http://c.example"}, body
        )
        assert status == 403
        status, _, text = await _request(
            front,
            "POST",
            "/v1/messages",
            {"x-api-key": KEY, "Origin": "http://c.example"},
            {"model": "m", "max_tokens": 2, "messages": QUESTION},
        )
        assert status == 403 and json.loads(text)["error"]["type"] == "permission_error"  # Anthropic's shape there

    async with running_front(loaded, http_cors_origins="*") as front:
        status, headers, _ = await _request(front, "GET", "/v1/models", {**AUTH, "Origin": "http://anywhere.example"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://anywhere.example"


async def test_a_conversation_that_did_not_fit_says_so(loaded):
    async with running_front(loaded) as front:  # sink 4 + window 24: the long prompt cannot fit
        client = front.client()
        short = await client.chat.completions.with_raw_response.create(
            model=front.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert "X-Kakeya-Evicted-Tokens" not in short.headers
        assert short.parse().usage.model_extra["evicted_tokens"] == 0

        whole = await client.chat.completions.with_raw_response.create(model=front.model, messages=LONG, max_tokens=4)
        evicted = whole.parse().usage.model_extra["evicted_tokens"]
        assert evicted > 0 and int(whole.headers["X-Kakeya-Evicted-Tokens"]) == evicted
        (session,) = [s for s in front.sessions() if s["evicted_tokens"]]
        assert session["evicted_tokens"] == evicted

        stream = await client.chat.completions.with_raw_response.create(
            model=front.model,
            messages=LONG + [{"role": "user", "content": "More."}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
        before_tokens = int(stream.headers["X-Kakeya-Evicted-Tokens"])  # what the prompt alone pushed out
        chunks = [c async for c in stream.parse()]
        assert chunks[-1].usage.model_extra["evicted_tokens"] >= before_tokens > 0

        status, headers, text = await _request(
            front, "POST", "/v1/messages", {"x-api-key": KEY}, {"model": "m", "max_tokens": 3, "messages": LONG}
        )
        usage = json.loads(text)["usage"]
        assert status == 200 and usage["evicted_tokens"] > 0
        assert int(headers["X-Kakeya-Evicted-Tokens"]) == usage["evicted_tokens"]
