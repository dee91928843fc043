"""A plain decode loop for testing constraints: model forward, mask, pick, as mlx-lm's generate loop does.

It drives a real model through `kakeya_mlx.constrain.TokenMatcher`; it is a harness for
the constraint module, not the engine's decode loop.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from kakeya_mlx.constrain import TokenMatcher


@dataclass
class Decoded:
    tokens: list[int]
    text: str
    finished: bool  # the constraint completed (or an end token was picked where it was allowed)


def constrained_decode(
    loaded, matcher: TokenMatcher, prompt: list[int], max_tokens: int, temperature: float = 0.0, seed: int = 0
) -> Decoded:
    """Greedy (temperature 0) or seeded sampling under `matcher`, until it finishes or max_tokens."""
    cache = make_prompt_cache(loaded.model)
    logits = loaded.model(mx.array([prompt]), cache=cache)[:, -1, :]
    key = mx.random.key(seed)
    eos = set(loaded.eos_token_ids)
    tokens: list[int] = []
    finished = False
    for _ in range(max_tokens):
        masked = mx.where(matcher.allowed_mask(), logits.astype(mx.float32), -mx.inf)
        if temperature == 0:
            token = int(mx.argmax(masked, axis=-1).item())
        else:
            key, draw = mx.random.split(key)
            token = int(mx.random.categorical(masked / temperature, key=draw).item())
        matcher.accept(token)
        if token in eos:
            finished = True
            break
        tokens.append(token)
        if matcher.is_finished():
            finished = True
            break
        logits = loaded.model(mx.array([[token]]), cache=cache)[:, -1, :]
    return Decoded(tokens, loaded.tokenizer.decode(tokens), finished)
