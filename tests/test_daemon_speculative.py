"""Speculative decoding and the batch scheduler as a client of the daemon sees them."""

import aiohttp
import pytest

from kakeya_client import AsyncClient, InvalidArgument
from kakeya_daemon.server import running_daemon
from kakeya_mlx.loader import load_model
from kakeya_mlx.speculative import ForwardCosts

from test_daemon import config, make_config, sock_dir  # noqa: F401 (fixtures)
from test_daemon_faults import HANG_GUARD_S, free_port, start_process

REPEAT = "one two three four five six seven eight " * 6


@pytest.fixture
def spec_config(qwen3_dir, sock_dir):
    def config(**overrides):
        return make_config(qwen3_dir, sock_dir, draft_model=str(qwen3_dir), **overrides)

    return config


async def _generate(session, **params) -> tuple[list[int], dict]:
    tokens, done = [], None
    async for event in session.generate(**params):
        if hasattr(event, "tokens"):
            tokens += event.tokens
        done = event
    return tokens, done


async def test_each_mode_gives_the_plain_greedy_tokens_and_reports_its_drafts(spec_config, loaded_qwen3):
    async with running_daemon(spec_config(), loaded=loaded_qwen3) as d:
        # Pinned GPU-like pass costs: the draft lengths (and so where lookup is tried) do not vary with load.
        d.engine.spec.costs = ForwardCosts({n: 1.0 for n in (1, 2, 3, 5, 9, 17)})
        async with AsyncClient(d.socket_path) as client:
            assert client.server_info["model"]["draft_model"] == loaded_qwen3.name
            assert client.server_info["model"]["speculative"] == "auto"
            results = {}
            for mode in ("off", "draft", "prompt_lookup"):
                session = await client.create_session()
                await session.append(text=REPEAT)
                results[mode] = await _generate(session, max_tokens=60, temperature=0, speculative=mode)
            stats = await client.stats()
    plain_tokens, plain_done = results["off"]
    assert plain_done.draft_tokens == 0
    for mode in ("draft", "prompt_lookup"):
        tokens, done = results[mode]
        assert tokens == plain_tokens, mode
        assert done.draft_tokens > 0 and 0 <= done.accepted_tokens <= done.draft_tokens
    # The draft model is the model itself here: every draft is accepted.
    assert results["draft"][1].accepted_tokens == results["draft"][1].draft_tokens
    drafted = sum(results[m][1].draft_tokens for m in results)
    assert stats["speculative"]["drafted"] == drafted
    assert stats["speculative"]["accepted"] == sum(results[m][1].accepted_tokens for m in results)
    assert stats["scheduler"]["verify_rows"] > 0 and stats["scheduler"]["decode_passes"] > 0


async def test_a_sessions_default_applies_to_its_generates(spec_config, loaded_qwen3):
    async with running_daemon(spec_config(speculative="off"), loaded=loaded_qwen3) as d:
        async with AsyncClient(d.socket_path) as client:
            drafting = await client.create_session(speculative="draft", num_draft_tokens=3)
            plain = await client.create_session()
            for session in (drafting, plain):
                await session.append(text=REPEAT)
            _, drafted = await _generate(drafting, max_tokens=30, temperature=0)
            _, not_drafted = await _generate(plain, max_tokens=30, temperature=0)
            _, overridden = await _generate(drafting, max_tokens=10, temperature=0, speculative="off")
    assert drafted.draft_tokens > 0
    assert not_drafted.draft_tokens == 0 and overridden.draft_tokens == 0


async def test_bad_speculative_choices_are_invalid_and_change_nothing(config, loaded_qwen3):
    async with running_daemon(config(), loaded=loaded_qwen3) as d:  # no draft model
        async with AsyncClient(d.socket_path) as client:
            session = await client.create_session()
            await session.append(text="hello there")
            for params, named in [
                ({"speculative": "draft"}, "draft model"),
                ({"speculative": "sometimes"}, "speculative"),
                ({"num_draft_tokens": 0}, "num_draft_tokens"),
                ({"num_draft_tokens": 17}, "num_draft_tokens"),
            ]:
                with pytest.raises(InvalidArgument, match=named):
                    await _generate(session, max_tokens=3, **params)
            with pytest.raises(InvalidArgument, match="draft model"):
                await client.create_session(speculative="draft")
            info = await session.info()
            sessions = await client.list_sessions()
    assert info["history_length"] == len(loaded_qwen3.tokenizer.encode("hello there"))
    assert not info["generating"] and len(sessions) == 1


async def test_metrics_show_drafts_and_batches(spec_config, loaded_qwen3):
    port = free_port()
    async with running_daemon(spec_config(http_port=port), loaded=loaded_qwen3) as d:
        async with AsyncClient(d.socket_path) as client:
            session = await client.create_session()
            await session.append(text=REPEAT)
            await _generate(session, max_tokens=20, temperature=0, speculative="draft")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
    assert 'kakeya_speculative_tokens_total{kind="drafted"}' in text
    assert "kakeya_decode_batch_largest" in text and "kakeya_scheduler_steps_total" in text


@pytest.mark.parametrize("why", ["missing", "other tokenizer"])
def test_a_bad_draft_model_stops_the_daemon_with_one_line(qwen3_dir, sock_dir, tmp_path, why):
    draft = str(tmp_path / "no-such-draft") if why == "missing" else "smollm2"
    if why == "other tokenizer":
        load_model("smollm2")  # converted once, before the daemon's clock starts
    log_path = tmp_path / "daemon.log"
    proc = start_process(
        ["--model", str(qwen3_dir), "--draft-model", draft, "--socket", str(sock_dir / "kakeya.sock")], log_path
    )
    assert proc.wait(HANG_GUARD_S) == 1
    log = log_path.read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "draft model" in errors[0], log
    assert ("no-such-draft" in errors[0]) if why == "missing" else ("another tokenizer" in errors[0])
    assert "Traceback" not in log
    assert not (sock_dir / "kakeya.sock").exists()
