"""Defences behind :class:`Defense` and a registry (base.py). SEAM: losses.py (L_ul, L_up), coupling.py (flat
vectors, Hessian-free ∇cos), seam.py (trainer and its registry entry); refusal_sft.py (the aligned baseline)."""

from seamlm.defense.base import DEFENSE_STREAMS, DEFENSES, Defense, defense_class, register_defense
from seamlm.defense.config import DefenseConfig
from seamlm.defense.refusal_sft import RefusalSFT
from seamlm.defense.seam import SEAMDefense, SEAMTrainer

__all__ = ["DEFENSES", "DEFENSE_STREAMS", "Defense", "DefenseConfig", "RefusalSFT", "SEAMDefense", "SEAMTrainer",
           "defense_class", "register_defense"]
