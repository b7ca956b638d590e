"""Optimizers and learning-rate schedules as the authors configured them (sami-method.md §5).

AdamW and RMSprop follow torch's definitions (the authors' code): AdamW with decoupled weight decay;
RMSprop with eps outside the square root and no bias correction. Schedules: "constant", or "linear",
which is HF's `get_scheduler("linear", num_warmup_steps=W, num_training_steps=N)`: lr rises from 0
over W steps (so with W = 1 the first update runs at lr 0, as in the paper's runs) and then decays
linearly to 0 at step N.
"""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # "adamw" (mistral-7b runs) or "rmsprop" (mixtral, llama3-70b runs)
    learning_rate: float = 5e-7
    weight_decay: float = 0.01  # torch AdamW default, which the authors kept; RMSprop used none
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.99  # torch RMSprop alpha
    clip_norm: float = 1.0  # global-norm clipping; 0 = off
    schedule: str = "linear"  # "constant" or "linear" (warmup then linear decay to 0)
    warmup_steps: int = 1
    total_steps: int = 15  # the authors' 250 // 16 micro-batches per epoch

    def __post_init__(self):
        if self.name not in ("adamw", "rmsprop"):
            raise ValueError(f"optimizer must be 'adamw' or 'rmsprop', got {self.name!r}")
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule must be 'constant' or 'linear', got {self.schedule!r}")
        if self.schedule == "linear" and not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) < total_steps ({self.total_steps})")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.total_steps - cfg.warmup_steps)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clipping (when on), then AdamW or RMSprop on the schedule; optimizer state in float32."""
    lr = make_schedule(cfg)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optax.rmsprop(lr, decay=cfg.rms_decay, eps=cfg.eps, eps_in_sqrt=False)
        if cfg.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt) if cfg.clip_norm > 0 else opt
