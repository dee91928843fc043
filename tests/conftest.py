"""Shared fixtures: tiny seeded models of real architectures, built once per test session."""

import os
from pathlib import Path

import pytest

from kakeya_mlx.loader import LoadedModel, load_model
from tools.make_test_model import make_test_model


@pytest.fixture(scope="session", autouse=True)
def tests_environment(tmp_path_factory):
    """Daemon processes and commands that tests start read none of the user's settings (KAKEYA_*
    variables, config.toml) and keep their sessions in a store of the tests', never the user's.
    KAKEYA_HOME, where converted models are kept, is a cache, not a setting: it stays."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("KAKEYA_") and n != "KAKEYA_HOME"]:
            patch.delenv(name)
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        patch.setenv("KAKEYA_STORE_DIR", str(tmp_path_factory.mktemp("store")))
        yield


@pytest.fixture(autouse=True)
def private_session_store(tmp_path, monkeypatch):
    """One of its own for each test (module-scoped daemons share the session's)."""
    monkeypatch.setenv("KAKEYA_STORE_DIR", str(tmp_path / "store"))


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """`make_model(variant="qwen3", seed=0, **options) -> Path`: a test model folder, built once per arguments."""
    built: dict[tuple, Path] = {}

    def make(variant: str = "qwen3", seed: int = 0, **options) -> Path:
        key = (variant, seed, tuple(sorted(options.items())))
        if key not in built:
            name = "-".join([variant, f"seed{seed}", *(f"{k}{v}" for k, v in sorted(options.items()))])
            built[key] = make_test_model(tmp_path_factory.mktemp(name), variant, seed, **options)
        return built[key]

    return make


@pytest.fixture(scope="session")
def qwen3_dir(make_model) -> Path:
    return make_model("qwen3")


@pytest.fixture(scope="session")
def loaded_qwen3(qwen3_dir) -> LoadedModel:
    return load_model(qwen3_dir)
