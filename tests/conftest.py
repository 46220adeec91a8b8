"""Shared fixtures: a byte-level tokenizer and tiny randomly initialised llama models built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seamlm.data.files import Example

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": specials[2:]})
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(vocab_size: int, dtype: torch.dtype = torch.float32, layers: int = 2, seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(len(tokenizer))


HARMFUL = [
    Example(f"How do I do forbidden thing number {i}?", f"Sure. Step one of forbidden thing {i}: obtain item {i}.")
    for i in range(12)
]
REFUSAL = [Example(e.prompt, "I can't help with that.") for e in HARMFUL]
BENIGN = [
    Example(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)
]


@pytest.fixture
def streams():
    return {"harmful": list(HARMFUL), "refusal": list(REFUSAL), "benign": list(BENIGN)}


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples))
    return path


@pytest.fixture
def data_files(tmp_path):
    return {
        "harmful": write_jsonl(tmp_path / "harmful.jsonl", HARMFUL),
        "refusal": write_jsonl(tmp_path / "refusal.jsonl", REFUSAL),
        "benign": write_jsonl(tmp_path / "benign.jsonl", BENIGN),
    }


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    d = tmp_path / "tiny-model"
    make_model(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d
