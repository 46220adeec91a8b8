"""Defences. SEAM: losses.py (L_ul, L_up), coupling.py (flat vectors, Hessian-free ∇cos), seam.py (trainer)."""

from seamlm.defense.config import DefenseConfig
from seamlm.defense.seam import SEAMTrainer

__all__ = ["DefenseConfig", "SEAMTrainer"]
