"""Sampling defaults: the request's value, else the model's (generation_config.json), else the documented one.

One rule (kakeya_protocol.params.resolve_sampling) applied by the daemon core for
every front: a seeded generate that leaves sampling out gets the same tokens through
the socket, the OpenAI HTTP front and the CLI as the engine given the resolved
settings explicitly; the Anthropic mapping leaves the same fields to the core.
`hello`, `/info` and `kakeya status` show what is in force.
"""

import asyncio
import json
import shutil
import sys

import aiohttp
import pytest

from kakeya_client import AsyncClient
from kakeya_daemon.anthropic_api import parse_messages_request
from kakeya_daemon.server import running_daemon
from kakeya_mlx.events import TokenEvent
from kakeya_mlx.loader import load_model
from kakeya_mlx.sampling import SamplingParams
from kakeya_protocol import params as rules
from test_daemon import make_config, sock_dir  # noqa: F401  (fixture)
from test_daemon_fronts import KEY, http_config, openai_client, url_of

MODEL_DEFAULTS = {"temperature": 0.6, "top_k": 5, "repetition_penalty": 1.3}
RESOLVED = {**rules.DEFAULT_SAMPLING, **MODEL_DEFAULTS}
SOURCES = {name: "model" if name in MODEL_DEFAULTS else "default" for name in rules.DEFAULT_SAMPLING}
PROMPT = "Once upon a time"
SEED = 11


@pytest.fixture(scope="module")
def tuned_dir(qwen3_dir, tmp_path_factory):
    """The test model with sampling defaults in its generation_config.json, as Llama 3 or Qwen2.5 ship them."""
    path = shutil.copytree(qwen3_dir, tmp_path_factory.mktemp("tuned") / "tuned-qwen3")
    file = path / "generation_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "do_sample": True, **MODEL_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def tuned(tuned_dir):
    return load_model(tuned_dir)


def test_the_rule_request_then_model_then_default():
    defaults = RESOLVED
    assert rules.resolve_sampling({}, defaults) == defaults
    assert rules.resolve_sampling({"top_k": 2, "seed": 3}, defaults) == {**defaults, "top_k": 2, "seed": 3}
    assert rules.resolve_sampling({"temperature": None}, defaults) == defaults  # null is "not given"
    # Greedy when asked: only the request's own fields, none of the defaults' filters or penalty.
    assert rules.resolve_sampling({"temperature": 0}, defaults) == {"temperature": 0}
    assert rules.resolve_sampling({"temperature": 0, "repetition_penalty": 1.2}, defaults) == {
        "temperature": 0, "repetition_penalty": 1.2
    }


def test_what_a_models_generation_config_gives():
    assert rules.model_sampling({"eos_token_id": 2}) == ({}, [])
    assert rules.model_sampling({"do_sample": True, "temperature": 0.6, "top_p": 0.9}) == (
        {"temperature": 0.6, "top_p": 0.9}, []
    )
    # do_sample false: the model's default is greedy; its top-p does not apply, its penalty does.
    assert rules.model_sampling({"do_sample": False, "top_p": 0.5, "repetition_penalty": 1.05}) == (
        {"repetition_penalty": 1.05, "temperature": 0.0}, []
    )
    found, dropped = rules.model_sampling({"temperature": 7.0, "top_k": 20.0, "top_p": "high"})
    assert found == {"top_k": 20} and len(dropped) == 2 and "temperature=7.0: must be in [0, 2]" in dropped[0]
    sources = {n: "model" if n == "top_k" else "default" for n in rules.DEFAULT_SAMPLING}
    assert rules.sampling_defaults({"top_k": 20}) == ({**rules.DEFAULT_SAMPLING, "top_k": 20}, sources)


async def _engine_text(engine, sampling: SamplingParams, max_tokens: int) -> str:
    sid = await engine.create_session()
    await engine.append(sid, text=PROMPT)
    stream = engine.generate(sid, max_tokens=max_tokens, sampling=sampling)
    text = "".join([e.text async for e in stream if isinstance(e, TokenEvent)])
    await engine.close_session(sid)
    return text


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kakeya_client", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_every_front_applies_the_models_defaults_and_shows_them(tuned_dir, tuned, sock_dir):
    async with running_daemon(http_config(tuned_dir, sock_dir), loaded=tuned) as d:
        sock = str(d.socket_path)
        expected = {"max_tokens": 256, **RESOLVED, "sources": SOURCES}
        async with AsyncClient(d.socket_path) as client:
            assert client.server_info["generation_defaults"] == expected
            assert client.server_info["http"] == {"enabled": True, "urls": d.http.urls}
            session = await client.create_session()
            await session.append(text=PROMPT)
            socket_text, _ = await session.complete(max_tokens=12, seed=SEED)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.get(url_of(d) + "/info") as response:
                info = await response.json()
        assert response.status == 200 and info["generation_defaults"] == expected
        assert info["model"]["name"] == tuned.name

        reference = await _engine_text(d.engine, SamplingParams(**RESOLVED, seed=SEED), 12)
        # The defaults decide the tokens: greedy, or the documented defaults alone, give others.
        assert reference != await _engine_text(d.engine, SamplingParams(temperature=0.0), 12)
        assert reference != await _engine_text(d.engine, SamplingParams(**rules.DEFAULT_SAMPLING, seed=SEED), 12)
        assert socket_text == reference
        openai = openai_client(d)
        reply = await openai.completions.create(model=tuned.name, prompt=PROMPT, max_tokens=12, seed=SEED)
        await openai.close()
        assert reply.choices[0].text == reference
        code, out, err = await _cli("generate", "--socket", sock, "--max-tokens", "12", "--seed", str(SEED), PROMPT)
        assert code == 0, err
        assert out.rstrip("\n") == reference.rstrip("\n")
        # The Anthropic mapping leaves what the request does not say to the same core rule.
        request = parse_messages_request(
            {"model": tuned.name, "max_tokens": 12, "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert d.core.generation_request(request.params).sampling == SamplingParams(**RESOLVED)

        code, out, err = await _cli("status", "--socket", sock)
        assert code == 0, err
        assert "temperature 0.6 (model), top_p 0.9, top_k 5 (model), min_p 0, repetition_penalty 1.3 (model)" in out
        assert f"http:        {', '.join(d.http.urls)}" in out


async def test_greedy_when_asked_and_a_requests_own_value_wins(tuned_dir, tuned, sock_dir):
    async with running_daemon(make_config(tuned_dir, sock_dir), loaded=tuned) as d:
        greedy = await _engine_text(d.engine, SamplingParams(temperature=0.0), 12)
        async with AsyncClient(d.socket_path) as client:
            session = await client.create_session()
            await session.append(text=PROMPT)
            text, _ = await session.complete(max_tokens=12, temperature=0)
        assert text == greedy  # plain argmax: the model's repetition penalty is not applied
        assert d.core.generation_request({"temperature": 0}).sampling == SamplingParams(temperature=0)
        own = d.core.generation_request({"top_k": 2, "seed": 1}).sampling
        assert own == SamplingParams(**{**RESOLVED, "top_k": 2}, seed=1)
        code, out, _ = await _cli("status", "--socket", str(d.socket_path))
        assert "http:        off" in out


async def test_a_model_without_sampling_defaults_gets_the_documented_ones(qwen3_dir, loaded_qwen3, sock_dir):
    async with running_daemon(make_config(qwen3_dir, sock_dir, max_new_tokens=100), loaded=loaded_qwen3) as d:
        async with AsyncClient(d.socket_path) as client:
            defaults = client.server_info["generation_defaults"]
    assert defaults == {
        "max_tokens": 100, **rules.DEFAULT_SAMPLING, "sources": {n: "default" for n in rules.DEFAULT_SAMPLING}
    }
