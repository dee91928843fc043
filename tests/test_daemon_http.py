"""The HTTP front served by the daemon itself: same engine, same admission, same stats."""

import socket

import aiohttp
import openai
import pytest

from kakeya_client import AsyncClient
from kakeya_daemon.lifecycle import StartError
from kakeya_daemon.server import running_daemon
from test_daemon import endless, make_config, sock_dir  # noqa: F401  (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_daemon_serves_openai_clients_beside_the_socket(qwen3_dir, sock_dir, loaded_qwen3):
    port = free_port()
    config = make_config(qwen3_dir, sock_dir, http_port=port, http_api_keys="k1, k2")
    async with running_daemon(config, loaded=loaded_qwen3) as daemon:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2")
        messages = [{"role": "user", "content": "Hello there"}]
        first = await client.chat.completions.create(model=loaded_qwen3.name, messages=messages, max_tokens=6, temperature=0)
        assert first.usage.completion_tokens >= 1 and first.choices[0].finish_reason in ("stop", "length")
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And again"}]
        second = await client.chat.completions.create(model=loaded_qwen3.name, messages=messages, max_tokens=4, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens > 0

        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()

        # The socket side sees the same engine and counters.
        async with await AsyncClient.connect(config.socket_path()) as socket_client:
            stats = await socket_client.stats()
        assert stats["sessions"]["active"] >= 1
        assert stats["tokens"]["out"] >= first.usage.completion_tokens + second.usage.completion_tokens

        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k1"}) as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
        assert resp.status == 200
        assert "kakeya_sessions_active" in metrics and "kakeya_http_requests_total" in metrics
        await client.close()
    # Stopping the daemon stopped the front too.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_http_generations_take_the_daemons_generation_slots(qwen3_dir, sock_dir, endless):
    port = free_port()
    config = make_config(qwen3_dir, sock_dir, http_port=port, max_concurrent_generations=1, queue_policy="reject")
    async with running_daemon(config, loaded=endless) as daemon:
        async with await AsyncClient.connect(config.socket_path()) as socket_client:
            session = await socket_client.create_session()
            await session.append(text="Hold the only slot")
            stream = session.generate(max_tokens=5000)
            await stream.__anext__()
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="max_concurrent_generations") as refused:
                await client.completions.create(model=endless.name, prompt="hi", max_tokens=2)
            assert refused.value.response.headers["Retry-After"] == "1"
            await stream.cancel()
            await client.close()
        assert daemon.core.stats()["rejections"]["max_concurrent_generations"] >= 1


async def test_http_port_in_use_is_a_clear_start_error(qwen3_dir, sock_dir, loaded_qwen3):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(qwen3_dir, sock_dir, http_port=port)
        with pytest.raises(StartError, match=f"HTTP front on 127.0.0.1:{port}"):
            async with running_daemon(config, loaded=loaded_qwen3):
                pass
    assert not config.socket_path().exists()
