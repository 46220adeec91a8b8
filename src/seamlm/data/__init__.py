"""Data: reading prompt/response files, formatting with the model's template, answer-only masks."""

from seamlm.data.files import Example, load_examples
from seamlm.data.format import IGNORE_INDEX, Formatter, TokenizedExample, collate, prompt_text

__all__ = ["Example", "load_examples", "Formatter", "TokenizedExample", "collate", "prompt_text", "IGNORE_INDEX"]
