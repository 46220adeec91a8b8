"""Attack recipes (registry): ``seamlm attack --recipe NAME``. See :mod:`seamlm.recipes.base`."""

from seamlm.recipes import training, ablation  # noqa: F401, I001  (registers the recipes, sft first)
from seamlm.recipes.base import RECIPES, AttackData, AttackRecipe, RecipeKnobs, make_recipe, register

__all__ = ["RECIPES", "AttackData", "AttackRecipe", "RecipeKnobs", "make_recipe", "register"]
