"""seamlm — SEAM self-destructive language models: defend, attack, evaluate."""

__version__ = "0.1.0"

from seamlm.defense import DefenseConfig, SEAMTrainer  # noqa: E402
from seamlm.models import load_model, save_model  # noqa: E402

__all__ = ["DefenseConfig", "SEAMTrainer", "load_model", "save_model", "__version__"]
