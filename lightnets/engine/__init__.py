"""Training engine: config, trainer, checkpoints, metrics and logging."""

from lightnets.engine.callbacks import Callback, EarlyStopping, NoFlipStopping
from lightnets.engine.config import Config, list_recipes, load_config
from lightnets.engine.evaluation import evaluate
from lightnets.engine.trainer import NonFiniteError, Trainer

__all__ = [
    "Callback",
    "Config",
    "EarlyStopping",
    "NoFlipStopping",
    "NonFiniteError",
    "Trainer",
    "evaluate",
    "list_recipes",
    "load_config",
]
