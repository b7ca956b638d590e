"""sami_jax: SAMI (Self-Supervised Alignment with Mutual Information, arXiv 2404.14313) in JAX.

    model = sami_jax.load_model("path/to/hf-folder-or.gguf", dtype=None, mesh=None)
    logits = model.logits(token_ids)              # int [batch, seq] -> float32 [batch, seq, vocab]
    sami_jax.save_model(model, "out/", format="hf")
"""

from sami_jax.api import Model, load_model, save_model
from sami_jax.checkpoints import CheckpointError
from sami_jax.models.config import PRESETS, ConfigError, ModelConfig
from sami_jax.models.params import init_params, num_params
from sami_jax.models.transformer import forward
from sami_jax.sharding import Sharder, make_mesh

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "Model", "ModelConfig", "Sharder", "forward", "init_params",
    "load_model", "make_mesh", "num_params", "save_model",
]
__version__ = "0.1.0"
