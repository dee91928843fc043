"""kakeya-mlx engine: model loading, sink+window session caches, decoding on one compute thread."""

import importlib.util
import sys

__version__ = "0.1.0"


def _defer_mlx_lm_init() -> None:
    """Let `mlx_lm.models.*` import without running `mlx_lm/__init__.py` first.

    The engine uses mlx-lm's model definitions and cache helpers only, but the
    package's own __init__ imports its loader and generator, which import
    transformers: 2-4 s of every start-up, for a tokenizer the engine loads itself
    (tokenizer.py). So the package module is registered without running its
    __init__; the first use of a name the __init__ defines (`mlx_lm.load`,
    `from mlx_lm import stream_generate`) runs it then, so nothing else changes.
    """
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None:
        return  # not installed: the import that needs it will say so
    package = importlib.util.module_from_spec(spec)

    def complete_on_first_use(name: str):
        del package.__getattr__
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete_on_first_use
    sys.modules["mlx_lm"] = package


_defer_mlx_lm_init()
