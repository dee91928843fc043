"""The probe of what the running backend keeps bit-identical, and the recompute choice it drives.

MLX's Linux CPU wheel links the reference BLAS, whose matrix products give the same
bits however many rows they run at once. An optimized BLAS preloaded in its place
(OpenBLAS, from the cmeel-openblas dev dependency) does not; in a subprocess with it,
the probe must say so and the engine must turn block recomputation on. That
recomputation keeps the cache canonical is tests/test_determinism.py's to show.
"""

import glob
import json
import logging
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from kakeya_mlx import platform
from kakeya_mlx.engine import Engine, EngineConfig
from kakeya_mlx.loader import load_model
from kakeya_mlx.probe import PIECES, TOKENS, model_fingerprint, probe, probe_cached

REPO = Path(__file__).resolve().parents[1]
OPENBLAS = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "lib" / "libopenblas.so.0"


def test_the_probe_checks_every_layer_and_the_logits(loaded_qwen3):
    found = probe(loaded_qwen3.model, loaded_qwen3.vocab_size)
    assert found.backend == platform.backend()
    assert found.chunk_invariant == found.chunking.invariant == (found.chunking.differed == ())
    assert (found.chunking.max_abs_diff == 0.0) == found.chunk_invariant
    assert all(sum(sizes) == TOKENS for sizes in PIECES) and any(1 in sizes for sizes in PIECES)
    assert found.batch_invariant == found.batching.invariant == (found.batching.differed == ())
    for check, what in ((found.chunking, "in pieces give"), (found.batching, "batched with others give")):
        assert (f"{what} identical bits" in found.describe()) == check.invariant


@pytest.mark.skipif(
    platform.backend() != "cpu" or sys.platform != "linux" or "LD_PRELOAD" in os.environ,
    reason="MLX's Linux CPU wheel, with its own reference BLAS",
)
def test_the_linux_cpu_wheel_is_batch_invariant(loaded_qwen3):
    found = probe(loaded_qwen3.model, loaded_qwen3.vocab_size)
    assert found.batch_invariant and found.batching.max_abs_diff == 0.0


@pytest.mark.skipif(
    platform.backend() != "cpu" or sys.platform != "linux" or "LD_PRELOAD" in os.environ,
    reason="MLX's Linux CPU wheel, with its own reference BLAS",
)
def test_the_linux_cpu_wheel_is_chunk_invariant(loaded_qwen3):
    found = probe(loaded_qwen3.model, loaded_qwen3.vocab_size)
    assert found.chunk_invariant and found.chunking.differed == () and found.chunking.max_abs_diff == 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


def _engine_lines(loaded, **config) -> tuple[Engine, list[str]]:
    records = _Records()
    logger = logging.getLogger("kakeya.engine")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        engine = Engine(loaded, EngineConfig(block=8, **config))
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return engine, [line for _, line in records.lines]


def test_the_engine_recomputes_where_the_probe_finds_a_difference_unless_configured(loaded_qwen3):
    probed, said = _engine_lines(loaded_qwen3)
    forced = [_engine_lines(loaded_qwen3, recompute_blocks=v) for v in (True, False)]
    found = probe(loaded_qwen3.model, loaded_qwen3.vocab_size)
    assert probed.recompute_blocks == (not found.chunk_invariant)
    assert [engine.recompute_blocks for engine, _ in forced] == [True, False]
    assert said == [f"{found.describe()}: recompute_blocks={probed.recompute_blocks}"]
    assert [lines for _, lines in forced] == [
        ["recompute_blocks=True, as configured (not probed)"],
        ["recompute_blocks=False, as configured (not probed)"],
    ]


def test_the_probe_result_is_kept_for_the_next_start_with_the_same_model(loaded_qwen3, qwen3_dir, tmp_path):
    first, said_first = _engine_lines(loaded_qwen3, probe_cache_dir=str(tmp_path))
    again, said_again = _engine_lines(loaded_qwen3, probe_cache_dir=str(tmp_path))
    assert not any("kept from an earlier start" in line for line in said_first)
    assert any("kept from an earlier start" in line for line in said_again)
    assert again.recompute_blocks == first.recompute_blocks
    assert len(list(tmp_path.glob("*.json"))) == 1
    # Every check comes back as it was measured.
    key = model_fingerprint(loaded_qwen3.path, loaded_qwen3.config, loaded_qwen3.dtype)
    kept, reused = probe_cached(loaded_qwen3.model, loaded_qwen3.vocab_size, key, tmp_path)
    assert reused and kept == probe(loaded_qwen3.model, loaded_qwen3.vocab_size)
    # The same folder cast to another dtype is another model: probed anew.
    cast, said_cast = _engine_lines(load_model(qwen3_dir, dtype="bfloat16"), probe_cache_dir=str(tmp_path))
    assert not any("kept from an earlier start" in line for line in said_cast)
    assert len(list(tmp_path.glob("*.json"))) == 2


def _library_dir(tmp_path: Path) -> Path:
    """A folder where OpenBLAS finds libgfortran.so.5: the system's, else the copy MLX's wheel ships."""
    libs = tmp_path / "libs"
    libs.mkdir()
    shipped = glob.glob(str(Path(mx.__file__).parents[1] / "mlx_cpu.libs" / "*"))
    for path in shipped:
        (libs / Path(path).name).symlink_to(path)
        if Path(path).name.startswith("libgfortran"):
            (libs / "libgfortran.so.5").symlink_to(path)
    return libs


@pytest.mark.skipif(not OPENBLAS.is_file(), reason="cmeel-openblas (a Linux x86-64 dev dependency) is not installed")
def test_an_optimized_blas_is_caught_and_turns_recompute_on(make_model, tmp_path):
    """Also where a result for the same model, measured with the reference BLAS, is kept: the key
    holds the libraries the process runs, so the preloaded BLAS is probed anew."""
    probes = tmp_path / "probes"
    reference = Engine(load_model(make_model("qwen3")), EngineConfig(block=8, probe_cache_dir=str(probes)))
    script = textwrap.dedent(
        f"""
        import json
        from kakeya_mlx.engine import Engine, EngineConfig
        from kakeya_mlx.loader import load_model
        from kakeya_mlx.probe import probe

        loaded = load_model({str(make_model("qwen3"))!r})  # float32: its matrix products go to the BLAS
        found = probe(loaded.model, loaded.vocab_size)
        engine = Engine(loaded, EngineConfig(block=8, probe_cache_dir={str(probes)!r}))
        print(json.dumps({{"invariant": found.chunk_invariant, "differed": found.chunking.differed,
                          "max_abs_diff": found.chunking.max_abs_diff, "recompute": engine.recompute_blocks,
                          "batch_invariant": found.batch_invariant}}))
        """
    )
    env = {**os.environ, "LD_PRELOAD": str(OPENBLAS), "LD_LIBRARY_PATH": str(_library_dir(tmp_path))}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # On the tiny model only the vocabulary projection (the widest product) differs.
    assert not out["invariant"] and "logits" in out["differed"] and out["max_abs_diff"] > 0
    assert out["recompute"] is True
    # Rows batched beside another are products over more rows too: the probe sees that as well.
    assert out["batch_invariant"] is False
    assert reference.recompute_blocks is ("LD_PRELOAD" in os.environ)
    assert len(list(probes.glob("*.json"))) == 2
