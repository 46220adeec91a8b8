"""Adaptive attack recipes: each one's mechanism, not just that it runs."""

import json
import math

import pytest
import torch

from seamlm.attack import AttackConfig, run_attack_grid
from seamlm.data.bundles import BundleData
from seamlm.data.format import Formatter, collate
from seamlm.defense.losses import answer_ce
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError, DataError, NonFiniteLossError
from seamlm.evaluate.judges import KeywordJudge
from seamlm.evaluate.metrics import EvalConfig
from seamlm.finetune import FinetuneConfig, TrainingHooks, finetune
from seamlm.recipes import AttackData, make_recipe
from seamlm.recipes.ablation import mean_last_token_state, orthogonalize
from seamlm.recipes.training import project_conflicting
from tests.conftest import BENIGN, HARMFUL, REFUSAL, make_model

FT = FinetuneConfig(lr=1e-2, batch_size=4, max_length=64)


def _data(n_benign: int = 4) -> AttackData:
    return AttackData(list(HARMFUL[:8]), list(BENIGN[:n_benign]))


def _batch(tokenizer, examples, ft=FT):
    rows = Formatter(tokenizer, ft.max_length, template=ft.prompt_template).encode_all(examples)
    return collate(rows, tokenizer.pad_token_id)


def test_registry_and_bad_names_and_knobs():
    assert make_recipe("pcgrad", {"per_tensor": "true"}).knobs.per_tensor is True
    with pytest.raises(ConfigError, match="unknown attack recipe 'pcgard'"):
        make_recipe("pcgard")
    with pytest.raises(ConfigError, match="unknown AnchoredKnobs key"):
        make_recipe("anchored", {"lambda": 1})
    with pytest.raises(ConfigError, match="poison_ratio must be in"):
        make_recipe("anchored", {"poison_ratio": 0})
    with pytest.raises(ConfigError, match="unknown prompt template 'chatml'"):
        make_recipe("template", {"template": "chatml"})
    with pytest.raises(ConfigError, match="subspace needs layers or modules"):
        make_recipe("subspace", {"layers": "", "modules": ""})
    with pytest.raises(ConfigError, match="'chat' is the template the defence trained with"):
        make_recipe("template", {"template": "chat"})
    for recipe, knobs in (("anchored", {"anchor_weight": "inf"}), ("benign_first", {"benign_lr": float("nan")})):
        with pytest.raises(ConfigError, match="must be a finite number"):
            make_recipe(recipe, knobs)


def test_surgery_leaves_no_conflict_flat_and_per_tensor():
    g = torch.Generator().manual_seed(0)
    g_b = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    g_h = [-2 * g_b[0] + 0.1 * torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    dot = lambda a, b: sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=False))  # noqa: E731
    assert dot(g_h, g_b) < 0
    out, info = project_conflicting(g_h, g_b)
    assert info["projected"] == 1 and abs(dot(out, g_b)) < 1e-5 * dot(g_b, g_b)
    # the removed part is along g_b only: g_h - out is parallel to g_b
    diff = torch.cat([(a - b).flatten() for a, b in zip(g_h, out, strict=False)])
    gb = torch.cat([b.flatten() for b in g_b])
    assert abs(torch.nn.functional.cosine_similarity(diff, gb, dim=0)) > 1 - 1e-5
    per, _ = project_conflicting(g_h, g_b, per_tensor=True)
    assert all(float((a * b).sum()) >= -1e-5 for a, b in zip(per, g_b, strict=False))
    same, info = project_conflicting(g_b, g_b)  # no conflict: untouched
    assert info["projected"] == 0 and all(torch.equal(a, b) for a, b in zip(same, g_b, strict=False))


def test_pcgrad_hook_rewrites_the_gradient_against_the_benign_gradient(tokenizer):
    model = make_model(len(tokenizer))
    recipe = make_recipe("pcgrad")
    data = _data(n_benign=4)  # exactly one benign batch: the hook's batch is known
    hooks = recipe.hooks(tokenizer, data, FT)
    params = [p for p in model.parameters()]
    g_b = torch.autograd.grad(answer_ce(model, _batch(tokenizer, data.benign)), params)
    answer_ce(model, _batch(tokenizer, data.harmful[:4])).backward()
    if sum(float((p.grad * b).sum()) for p, b in zip(params, g_b, strict=False)) > 0:
        for p in params:  # make the gradients conflict, else the projection is a no-op and the test proves nothing
            p.grad.neg_()
    g_h = [p.grad.clone() for p in params]
    info = hooks.transform_gradients(model, params, 1)
    dot_before = sum(float((a * b).sum()) for a, b in zip(g_h, g_b, strict=False))
    dot_after = sum(float((p.grad * b).sum()) for p, b in zip(params, g_b, strict=False))
    assert dot_before < 0 and info["projected"] == 1
    assert abs(dot_after) <= 1e-5 * abs(dot_before)  # the opposing component is gone, no more
    expected, _ = project_conflicting(g_h, list(g_b))
    assert all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(params, expected, strict=False))
    assert info["cos_hb"] == pytest.approx(dot_before / (
        torch.cat([g.flatten() for g in g_h]).norm() * torch.cat([g.flatten() for g in g_b]).norm()).item(), rel=1e-4)


def test_pcgrad_attack_logs_the_surgery(tokenizer, tmp_path):
    res = make_recipe("pcgrad", {"add_benign": True}).attack(
        make_model(len(tokenizer)), tokenizer, _data(), FT.replace(max_steps=3, epochs=2), tmp_path / "loss.jsonl", "t",
        DistContext())
    rows = [json.loads(x) for x in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"cos_hb", "projected", "dot_after"} <= set(r) for r in rows)
    assert all((r["projected"] == 1) == (r["cos_hb"] < 0) and r["dot_after"] >= -1e-4 for r in rows), rows
    assert res.logs == rows


def test_pcgrad_with_a_non_finite_benign_gradient_diverges_instead_of_stepping_as_plain_sft(tokenizer, tmp_path,
                                                                                              monkeypatch):
    import seamlm.recipes.training as training

    real = training.answer_ce
    monkeypatch.setattr(training, "answer_ce", lambda model, batch: real(model, batch) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="benign gradient of the surgery is not finite at step 1") as info:
        make_recipe("pcgrad").attack(make_model(len(tokenizer)), tokenizer, _data(), FT.replace(max_steps=2),
                                     tmp_path / "loss.jsonl", "t", DistContext())
    assert info.value.model is not None and info.value.losses == []  # the weights before the step, to evaluate


def test_benign_batches_never_repeat_an_example_within_a_batch(tokenizer):
    from seamlm.recipes.training import BenignBatches

    stream = BenignBatches(tokenizer, list(BENIGN[:6]), FT)  # 6 rows, batches of 4: every other batch spans passes
    seen = [stream.next_indices() for _ in range(9)]
    assert all(len(b) == 4 and len(set(b)) == 4 for b in seen)
    flat = [i for b in seen for i in b]
    assert all(sorted(flat[k:k + 6]) == list(range(6)) for k in range(0, 36, 6))  # each pass uses every row once


def test_anchored_loss_is_the_weighted_sum(tokenizer):
    model = make_model(len(tokenizer))
    data = _data(n_benign=4)
    hooks = make_recipe("anchored", {"anchor_weight": 0.7}).hooks(tokenizer, data, FT)
    batch = _batch(tokenizer, data.harmful[:4])
    loss, extra = hooks.loss(model, batch, 1)
    with torch.no_grad():
        h, b = answer_ce(model, batch).item(), answer_ce(model, _batch(tokenizer, data.benign)).item()
    assert loss.item() == pytest.approx(h + 0.7 * b, rel=1e-6)
    assert extra == pytest.approx({"harmful_ce": h, "benign_ce": b}, rel=1e-6)
    assert make_recipe("anchored", {"anchor_weight": 0}).hooks(tokenizer, data, FT).loss is None
    # with a poison ratio below 1 the batches mix benign rows in: their CE is not reported as the harmful loss
    mixed = make_recipe("anchored", {"anchor_weight": 0.7, "poison_ratio": 0.5})
    assert not mixed.logs_harmful_loss and make_recipe("anchored").logs_harmful_loss
    assert set(mixed.hooks(tokenizer, data, FT).loss(model, batch, 1)[1]) == {"stream_ce", "benign_ce"}


def test_poison_ratio_mixes_benign_into_the_same_harmful_budget():
    data = AttackData(list(HARMFUL[:4]), list(BENIGN[:12]))
    mixed = make_recipe("anchored", {"poison_ratio": 0.25}).stream(data, seed=0)
    assert len(mixed) == 16 and sum(e in data.harmful for e in mixed) == 4
    assert make_recipe("anchored").stream(data, 0) == data.harmful


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


@pytest.mark.parametrize("knobs,lora,allowed", [
    ({"layers": "1", "modules": ""}, False, lambda n: ".layers.1." in n),
    ({"layers": "-2", "modules": "o_proj"}, False, lambda n: n.endswith("layers.0.self_attn.o_proj.weight")),
    ({"layers": "", "modules": "down_proj"}, False, lambda n: n.endswith("mlp.down_proj.weight")),
    ({"layers": "0", "modules": "q_proj"}, True, lambda n: n.endswith("layers.0.self_attn.q_proj.weight")),
])
def test_subspace_changes_only_the_selected_layers(tokenizer, tmp_path, knobs, lora, allowed):
    model = make_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = make_recipe("subspace", knobs).attack(model, tokenizer, _data(), FT.replace(max_steps=2, lora=lora),
                                                 tmp_path / "l.jsonl", "t", DistContext())
    changed = _changed(before, res.model)
    assert changed and all(allowed(n) for n in changed), changed


def test_subspace_layer_out_of_range(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="out of range for a model with 2 layers"):
        make_recipe("subspace", {"layers": "5"}).attack(make_model(len(tokenizer)), tokenizer, _data(), FT,
                                                         tmp_path / "l.jsonl", "t", DistContext())


@pytest.mark.parametrize("lora", [False, True])
def test_subspace_refuses_a_module_name_that_matches_nothing_beside_good_ones(tokenizer, tmp_path, lora):
    with pytest.raises(ConfigError, match=r"modules \['typo_proj'\] match no parameter.*o_proj"):
        make_recipe("subspace", {"modules": "o_proj,typo_proj"}).attack(
            make_model(len(tokenizer)), tokenizer, _data(), FT.replace(lora=lora), tmp_path / "l.jsonl", "t",
            DistContext())


def test_subspace_refuses_lora_placement_it_would_replace():
    recipe = make_recipe("subspace", {"layers": "0"})
    with pytest.raises(ConfigError, match="subspace chooses where LoRA goes"):
        recipe.training_config(FT.replace(lora=True, lora_target_modules=("q_proj",)))
    assert recipe.training_config(FT.replace(lora=True)).lora  # the defaults are the recipe's to choose


def test_benign_first_trains_benign_then_harmful(tokenizer, tmp_path):
    res = make_recipe("benign_first", {"benign_steps": 3, "benign_lr": 1e-3}).attack(
        make_model(len(tokenizer)), tokenizer, _data(n_benign=4), FT.replace(max_steps=2), tmp_path / "loss.jsonl",
        "t", DistContext())
    benign = [json.loads(x) for x in (tmp_path / "benign_loss.jsonl").read_text().splitlines()]
    assert len(benign) == 3 and len(res.losses) == 2  # 3 benign steps over 4 examples at batch 4: 3 epochs
    harmful = [json.loads(x) for x in (tmp_path / "loss.jsonl").read_text().splitlines()]
    # each phase at its own peak learning rate (step 1 of each is its warm-up)
    assert max(r["lr"] for r in benign) == pytest.approx(1e-3) and max(r["lr"] for r in harmful) == pytest.approx(1e-2)


def test_template_shift_formats_training_and_evaluation(tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    recipe = make_recipe("template", {"template": "alpaca"})
    ft = recipe.training_config(FT)
    row = Formatter(tokenizer, 256, template=ft.prompt_template)(HARMFUL[0])
    assert "### Instruction:" in tokenizer.decode(row.input_ids) and "<|assistant|>" not in tokenizer.decode(row.input_ids)
    with pytest.raises(ConfigError, match="conflicts with"):
        recipe.training_config(FT.replace(prompt_template="plain"))
    import seamlm.attack as attack_mod

    seen = []
    real = attack_mod.evaluate_model
    monkeypatch.setattr(attack_mod, "evaluate_model", lambda m, t, b, cfg, *a: seen.append(cfg.prompt_template) or real(m, t, b, cfg, *a))
    rows = _grid(tiny_model_dir, tmp_path, recipe)
    assert seen == ["alpaca"] and {r.attack["prompt_template"] for r in rows} == {"alpaca"}


@pytest.mark.parametrize("train", [True, False])
def test_the_plain_template_is_no_shift_for_a_model_without_a_chat_template(tmp_path, train):
    """Without a chat template the model's own prompts are the plain format: 'plain' would be plain SFT renamed."""
    from tests.conftest import make_tokenizer

    tok = make_tokenizer(chat_template=False)
    with pytest.raises(ConfigError, match="plain is no shift here"):
        make_recipe("template", {"template": "plain", "train": train}).attack(
            make_model(len(tok)), tok, _data(), FT, tmp_path / "l.jsonl", "t", DistContext())
    res = make_recipe("template", {"template": "alpaca", "train": train}).attack(
        make_model(len(tok)), tok, _data(), FT.replace(max_steps=1), tmp_path / "l.jsonl", "t", DistContext())
    assert len(res.losses) == int(train)


def test_hooks_that_change_the_step_refuse_multi_process():
    ctx = DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="runs in one process"):
        TrainingHooks(loss=lambda m, b, s: None).check(ctx)
    TrainingHooks(select_parameters=lambda m: None).check(ctx)  # parameter selection is fine


@pytest.mark.parametrize("recipe,knobs,ft,match", [
    ("pcgrad", {}, {}, "runs in one process"),
    ("anchored", {"anchor_weight": 1.0}, {}, "runs in one process"),
    ("subspace", {}, {"shard_parameters": True}, "drop --shard_parameters"),
    ("sft", {}, {"shard_parameters": True, "lora": True}, "drop --shard_parameters"),
    ("benign_first", {}, {"shard_parameters": True}, "does not chain"),
])
def test_a_launch_a_recipe_cannot_train_under_is_refused_before_anything_runs(recipe, knobs, ft, match):
    """`seamlm attack` checks the recipe against its processes and sharding first: under torchrun the error came
    after the pre-attack evaluation (minutes on a 7B model)."""
    two = DistContext(rank=0, world_size=2)
    with pytest.raises(ConfigError, match=match):
        make_recipe(recipe, knobs).check_launch(two, FinetuneConfig(**ft))
    make_recipe(recipe, knobs).check_launch(DistContext(), FinetuneConfig(**ft))  # one process: fine
    make_recipe("anchored", {"anchor_weight": 0.0, "poison_ratio": 0.5}).check_launch(two, FinetuneConfig())


def test_no_trainable_parameter_is_an_error(tokenizer):
    freeze = TrainingHooks(select_parameters=lambda m: [p.requires_grad_(False) for p in m.parameters()])
    with pytest.raises(ConfigError, match="no trainable parameters"):
        finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, FT, hooks=freeze)


def _hooked_outputs(model, modules, inputs):
    outs = []
    handles = [m.register_forward_hook(lambda mod, i, o: outs.append(o.detach())) for m in modules]
    with torch.no_grad():
        model(input_ids=inputs)
    for h in handles:
        h.remove()
    return outs


def test_ablation_leaves_no_component_along_the_direction(tokenizer):
    model = make_model(len(tokenizer), layers=3)
    head_before = model.get_output_embeddings().weight.detach().clone()
    mu_h = mean_last_token_state(model, tokenizer, [e.prompt for e in HARMFUL[:6]], layer=2)
    mu_b = mean_last_token_state(model, tokenizer, [e.prompt for e in BENIGN[:6]], layer=2)
    r = (mu_h - mu_b).float()
    r = r / r.norm()
    writers = [m for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    ids = torch.randint(5, len(tokenizer), (2, 9))
    before = _hooked_outputs(model, writers + [model.get_input_embeddings()], ids)
    assert max(float((o @ r).abs().max()) for o in before) > 1e-3  # the direction was there
    assert orthogonalize(model, mu_h - mu_b) == 1 + 2 * 3
    after = _hooked_outputs(model, writers + [model.get_input_embeddings()], ids)
    for o in after:
        assert float((o @ r).abs().max()) < 1e-5 * float(o.norm(dim=-1).max())
    # the tied output head was untied first: reading is unchanged
    assert torch.equal(model.get_output_embeddings().weight, head_before)


def _grid(tiny_model_dir, tmp_path, recipe, lrs=(1e-3,)):
    bundle = BundleData({"harmful": HARMFUL[:4], "refusal": REFUSAL[:4], "benign": BENIGN[:4], "attack": HARMFUL[4:],
                         "eval_harmful": HARMFUL[:3], "benign_heldout": BENIGN[4:8], "attack_benign": BENIGN[8:]},
                        {"seed": 0})
    from seamlm.results import ResultStore

    store = ResultStore(tmp_path / "results.jsonl")
    ev = EvalConfig(judge="keyword", hs_prompts=3, max_new_tokens=4, zs_tasks=("arc_easy",), zs_limit=3,
                    coherence_examples=3, coupling_examples=0)
    run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle,
                    AttackConfig(learning_rates=lrs, num_samples=4, batch_size=2, max_length=64), ev, KeywordJudge(),
                    tmp_path, store, recipe=recipe)
    return store.rows()


def test_ablation_runs_once_per_seed_whatever_the_learning_rates(tiny_model_dir, tmp_path, caplog):
    rows = _grid(tiny_model_dir, tmp_path, make_recipe("ablation", {"layer": 1, "n_prompts": 4}), lrs=(1e-4, 1e-3))
    cells = {r.cell for r in rows}
    assert len(cells) == 1 and next(iter(cells)).startswith("ablation-")
    warning = next(r.getMessage() for r in caplog.records if "does not train" in r.getMessage())
    assert all(f in warning for f in ("learning_rates", "batch_size", "max_length")) and "prompt_template" not in warning
    info = json.loads(next((tmp_path / "attacks" / "tiny").glob("ablation-*/ablation.json")).read_text())
    assert info["layer"] == 1 and info["harmless_prompts"] == 4 and "lr" not in rows[0].attack
    assert info["residual_share_left"] < 1e-4  # measured on the edited model: nothing left along the direction


def test_ablation_refuses_an_architecture_whose_residual_writes_it_cannot_reach(tokenizer, tmp_path):
    """Gemma2 normalises each sublayer's output with its own weights before adding it to the stream: editing
    o_proj/down_proj leaves the direction in the stream, and the recipe must say so rather than report an ablation."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # trained norms scale each coordinate differently (a fresh model's are all 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    data = AttackData(harmful=HARMFUL[:6], benign=BENIGN[:6])
    with pytest.raises(ConfigError, match="still carries"):
        make_recipe("ablation", {"layer": 2, "n_prompts": 6}).attack(model, tokenizer, data, FinetuneConfig(),
                                                                     tmp_path / "loss.jsonl", "x", None)


def test_recipe_without_attacker_benign_data_says_so(tiny_model_dir, tmp_path):
    bundle = BundleData({"harmful": HARMFUL[:4], "refusal": REFUSAL[:4], "benign": BENIGN[:4], "attack": HARMFUL[4:],
                         "eval_harmful": HARMFUL[:3], "benign_heldout": BENIGN[4:8], "attack_benign": []}, {})
    from seamlm.attack import attack_data

    with pytest.raises(DataError, match="attack_benign stream is empty"):
        attack_data(bundle, make_recipe("pcgrad"), 4, 0)


def test_benign_first_refuses_fsdp_sharding(tokenizer):
    """Its two phases would re-shard an already sharded model: a clear error before any collective."""
    from seamlm.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match="benign_first .* drop --shard_parameters"):
        make_recipe("benign_first").attack(make_model(len(tokenizer)), tokenizer, _data(), FinetuneConfig(
            shard_parameters=True), None, "t", DistContext(rank=0, world_size=2))


def test_last_token_states_do_not_depend_on_the_left_padding_with_absolute_positions(tokenizer):
    """Rows of one batch are left padded to the longest; with position ids counted from each row's first real token
    the batched mean equals the one-prompt-at-a-time mean, also for a model with learned absolute positions (GPT-2),
    where the default positions would shift every padded row."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256))
    prompts = ["Hi", "A much longer question about rivers?", "Name a fruit."]
    assert model.training  # as built: dropout on, which the states must not see
    batched = mean_last_token_state(model, tokenizer, prompts, layer=2, batch_size=3)
    one_by_one = sum(mean_last_token_state(model, tokenizer, [p], layer=2) for p in prompts) / len(prompts)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    assert model.training


def test_ablation_at_the_embeddings_of_a_chat_template_has_no_direction_and_says_so(tokenizer, tmp_path):
    """Every chat prompt ends with the same template token, so the embeddings (layer 0) at the last position are
    the same for harmful and harmless prompts: a zero direction must be an error, not NaN weights."""
    model = make_model(len(tokenizer), layers=2)
    data = AttackData(harmful=HARMFUL[:6], benign=BENIGN[:6])
    with pytest.raises(ConfigError, match="same mean state at layer 0"):
        make_recipe("ablation", {"layer": 0, "n_prompts": 6}).attack(model, tokenizer, data, FinetuneConfig(),
                                                                     tmp_path / "loss.jsonl", "x", None)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ablation_on_a_model_with_nan_states_is_a_divergence_not_an_edit(tokenizer, tmp_path):
    """NaN states give a NaN direction, which the zero-direction check and the leftover-share check (max() skips
    NaN) would both let through, writing NaN into every writer: refused as non-finite before any edit, and a NaN
    share reads as NaN."""
    from seamlm.errors import NonFiniteLossError
    from seamlm.recipes.ablation import residual_share_along

    model = make_model(len(tokenizer), layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    data = AttackData(harmful=HARMFUL[:6], benign=BENIGN[:6])
    with pytest.raises(NonFiniteLossError, match="not finite") as info:
        make_recipe("ablation", {"layer": 1, "n_prompts": 6}).attack(model, tokenizer, data, FinetuneConfig(),
                                                                     tmp_path / "loss.jsonl", "x", None)
    assert info.value.model is model
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, model.parameters(), strict=True))
    assert math.isnan(residual_share_along(model, tokenizer, [HARMFUL[0].prompt], torch.ones(model.config.hidden_size)))


def test_a_benign_phase_that_diverges_is_tagged_and_lends_no_attack_loss(tiny_model_dir, tmp_path):
    """benign_first's benign phase blowing up (lr 1e30) is the cell's divergence: the rows say it happened in the
    benign phase and carry no attack-loss figures read off the benign log."""
    rows = _grid(tiny_model_dir, tmp_path, make_recipe("benign_first", {"benign_steps": 3, "benign_lr": 1e30}))
    assert rows and all(r.attack["status"] == "diverged" and r.attack["diverged_in"] == "benign phase" for r in rows)
    assert not {"attack_first_loss", "attack_final_loss"} & {r.metric for r in rows}
    assert (next((tmp_path / "attacks" / "tiny").glob("benign_first-*")) / "benign_loss.jsonl").stat().st_size > 0
