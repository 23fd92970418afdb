"""Flow-matching Euler sampler, configured from a diffusers ``scheduler_config.json``.

The schedule is computed in numpy float32, exactly as diffusers' FlowMatchEulerDiscreteScheduler does for the
sigmas a pipeline passes, so the steps match the reference bit for bit. Pipelines differ only in that ramp and in
the dynamic-shift ``mu``: Z-Image passes torch's float32 ``linspace(1, 1/N, N)`` and lets the config's
resolution line pick ``mu``; FLUX.2 [klein] passes numpy's float64 ``linspace`` and its own empirical ``mu``
(``compute_empirical_mu``), which depends on the step count too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgpack.schemas.errors import ImgpackError

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


@dataclass
class FlowMatchConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "scheduler/scheduler_config.json") -> FlowMatchConfig:
        for key in _UNSUPPORTED:
            if config.get(key):
                raise ImgpackError(f"{where}: {key}=true is not supported by the MLX runtime")
        if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ImgpackError(f"{where}: time_shift_type {config['time_shift_type']!r} is not exponential/linear")
        fields = cls.__dataclass_fields__
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        return cls(**values)


def z_image_mu(image_seq_len: int, config: FlowMatchConfig) -> float:
    """Resolution-dependent shift (used only with dynamic shifting): linear in the number of image tokens."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return image_seq_len * slope + config.base_shift - slope * config.base_image_seq_len


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's dynamic shift: two lines fitted in image tokens (at 10 and 200 steps), interpolated in the step
    count; above 4300 tokens the 200-step line alone. Python-float math, as diffusers' function of the same name."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


class FlowMatchEulerScheduler:
    """Holds one generation's sigmas; ``step`` moves the latents from sigma[i] to sigma[i+1].

    ``ramp`` is the unshifted sigmas the pipeline passes (default: Z-Image's float32 ``linspace(1, 1/N, N)``);
    ``mu`` overrides the config's resolution-dependent shift when dynamic shifting is on.
    """

    def __init__(
        self,
        config: FlowMatchConfig,
        num_steps: int,
        image_seq_len: int,
        *,
        ramp: np.ndarray | None = None,
        mu: float | None = None,
    ) -> None:
        if num_steps < 1:
            raise ImgpackError(f"steps must be at least 1, got {num_steps}")
        self.config = config
        if ramp is None:
            ramp = _linspace_f32(1.0, 1.0 / num_steps, num_steps)
        if len(ramp) != num_steps:
            raise ImgpackError(f"{len(ramp)} sigmas given for {num_steps} steps")
        sigmas = np.asarray(ramp).astype(np.float32)
        if config.use_dynamic_shifting:
            mu = z_image_mu(image_seq_len, config) if mu is None else mu
            if config.time_shift_type == "exponential":
                sigmas = (math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))).astype(np.float32)
            else:
                sigmas = (mu / (mu + (1 / sigmas - 1))).astype(np.float32)
        else:
            shift = np.float32(config.shift)
            sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
        if config.shift_terminal:
            one_minus = 1 - sigmas
            scale = one_minus[-1] / (1 - config.shift_terminal)
            sigmas = (1 - one_minus / scale).astype(np.float32)
        if config.invert_sigmas:
            sigmas = (1.0 - sigmas).astype(np.float32)
            self.timesteps = (sigmas * config.num_train_timesteps).astype(np.float32)
            self.sigmas = np.concatenate([sigmas, np.ones(1, np.float32)])
        else:
            self.timesteps = (sigmas * config.num_train_timesteps).astype(np.float32)
            self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_time(self, i: int) -> float:
        """The transformer's time input for step i: 0 at pure noise, 1 at the clean image."""
        t = np.float32(self.timesteps[i])
        return float((np.float32(1000.0) - t) / np.float32(1000.0))

    def step_size(self, i: int) -> float:
        return float(self.sigmas[i + 1] - self.sigmas[i])


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32: the first half counts up from start, the second half down from end."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    idx = np.arange(steps)
    half = steps // 2
    out = np.where(
        idx < half,
        np.float32(start) + step * idx.astype(np.float32),
        np.float32(end) - step * (steps - 1 - idx).astype(np.float32),
    )
    return out.astype(np.float32)
