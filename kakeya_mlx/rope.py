"""Re-rotation of cached keys after eviction (llama.cpp's "K-shift").

Keys sit in the cache already rotated to their cache-relative position. When e
tokens are evicted from the front of the window, every surviving window key must
move e positions down: RoPE is a rotation, so rotating by -e does exactly that.
Each RoPE kind that mlx-lm builds is read back into a `RopeSpec` (the same
frequencies the model's own module uses, without any input scaling such as YaRN's
mscale, which was applied once when the key was made and must not be applied again).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import rope_utils

from .errors import UnsupportedModelError

# Every kind `rope_spec` reads back; each may also be "traditional" (interleaved).
KINDS = ("plain", "llama3", "yarn", "longrope", "dynamic")


@dataclass(frozen=True)
class RopeSpec:
    """What `mx.fast.rope` needs to rotate keys the way one attention layer does."""

    dims: int
    traditional: bool
    base: Optional[float]
    scale: float
    freqs: Optional[mx.array]
    kind: str

    def shift(self, keys: mx.array, delta: int) -> mx.array:
        """Rotate every key of `keys` (B, H, L, D) by the same `delta` positions.

        `mx.fast.rope` rotates row i of the second-to-last axis at offset + i, so the
        tokens are folded into a batch axis first to give them all the same offset.
        The rotation runs in float32 and the result is cast back once.
        """
        B, H, L, D = keys.shape
        folded = keys.astype(mx.float32).reshape(B, H * L, 1, D)
        turned = mx.fast.rope(
            folded,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=delta,
            freqs=self.freqs,
        )
        return turned.reshape(B, H, L, D).astype(keys.dtype)


def rope_spec(rope: nn.Module, max_positions: int) -> RopeSpec:
    """Read a RoPE module of mlx-lm back into a `RopeSpec`.

    `max_positions` is the largest cache-relative position the cache will use;
    kinds whose frequencies depend on the sequence length are only accepted
    where that length keeps them constant.
    """
    if isinstance(rope, nn.RoPE):
        return RopeSpec(rope.dims, rope.traditional, rope.base, rope.scale, None, "plain")
    if isinstance(rope, rope_utils.Llama3RoPE):
        return RopeSpec(rope.dims, rope.traditional, None, 1.0, rope._freqs, "llama3")
    if isinstance(rope, rope_utils.YarnRoPE):
        return RopeSpec(rope.dims, rope.traditional, None, 1.0, rope._freqs, "yarn")
    if isinstance(rope, rope_utils.SuScaledRoPE):
        return RopeSpec(rope.dim, False, None, 1.0, rope._freqs, "longrope")
    if isinstance(rope, rope_utils.DynamicNTKScalingRoPE):
        # The base only changes once a sequence outgrows the trained length;
        # cache-relative positions never do when the bound fits inside it.
        if max_positions > rope.max_position_embeddings:
            raise UnsupportedModelError(
                f"dynamic NTK RoPE changes its base past {rope.max_position_embeddings} "
                f"positions; choose sink + window + block <= {rope.max_position_embeddings}"
            )
        return RopeSpec(rope.dims, rope.traditional, rope.base, 1.0, None, "dynamic")
    raise UnsupportedModelError(
        f"RoPE module {type(rope).__name__} cannot be re-rotated exactly, so the "
        "sink+window cache cannot serve this model"
    )


def make_batchable(model: nn.Module, max_positions: int) -> None:
    """Swap RoPE modules that cannot take one offset per row for exact equivalents.

    A batched forward pass gives every row its own RoPE offset (an array).
    Dynamic-NTK RoPE picks its base from the sequence length in Python, which an
    array cannot answer; below its trained length (where `rope_spec` keeps the
    cache) that base is the original one, so a plain RoPE with it computes the
    very same rotation.
    """
    for layer in getattr(model, "layers", []):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if isinstance(rope, rope_utils.DynamicNTKScalingRoPE) and max_positions <= rope.max_position_embeddings:
            attn.rope = nn.RoPE(rope.dims, traditional=rope.traditional, base=rope.base, scale=1.0)


def layer_shifters(model: nn.Module, max_positions: Optional[int] = None) -> list[RopeSpec]:
    """One `RopeSpec` per transformer layer, read from each layer's attention."""
    layers = getattr(model, "layers", None)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__module__} exposes no transformer layers; the sink+window "
            "cache needs standard self-attention layers"
        )
    limit = max_positions or 0
    specs = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        rope = getattr(attn, "rope", None)
        if rope is None:
            raise UnsupportedModelError(
                f"layer {i} has no rotary position embedding (self_attn.rope); the "
                "sink+window cache re-rotates keys and needs RoPE on every layer"
            )
        specs.append(rope_spec(rope, limit))
    return specs
