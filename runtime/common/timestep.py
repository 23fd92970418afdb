"""The sinusoidal timestep features both transformers feed their timestep MLPs (cos half first, max period 10000)."""

from __future__ import annotations

import math

from imgpack.runtime.backend import mx


def timestep_features(t: mx.array, channels: int) -> mx.array:
    """(batch,) times -> (batch, channels) float32 ``[cos(t f), sin(t f)]`` with ``f_i = 10000^(-i / half)``;
    an odd ``channels`` gets a zero last column, as diffusers pads it."""
    half = channels // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    features = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
    if channels % 2:
        features = mx.concatenate([features, mx.zeros_like(features[:, :1])], axis=-1)
    return features
