"""The paper's ablations as VeraConfig switches (train_vectors, projections, projection_init): validated, counted,
exact through the fold, merge, save / load and mixed batches, refused by a VeRA export to PEFT, and default VeRA
unchanged."""
import json
import math

import peft
import pytest
import torch
from helpers import LLAMA_ALL, randomize_adapter, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from vera_core.adapters import (
    VeraConfig,
    add_adapter,
    config_from_dict,
    count_parameters,
    estimate_parameters,
    export_peft,
    load_adapter,
    load_adapters,
    merge_adapter,
    save_adapter,
    set_active_adapter,
    unmerge_adapter,
)
from vera_core.adapters.fused import fast_vera
from vera_core.adapters.inject import adapter_layers
from vera_core.adapters.projections import generate_projections, layer_seed
from vera_core.lab.calculator import parameter_table

VARIANTS = {
    "default": {},
    "only_d": {"train_vectors": "d"},
    "only_b": {"train_vectors": "b"},
    "unique": {"projections": "unique"},
    "kaiming_normal": {"projection_init": "kaiming_normal"},
    "uniform": {"projection_init": "uniform"},
    "unique_only_d": {"projections": "unique", "train_vectors": "d"},
}
BUILDS = {"llama": (tiny_llama, LLAMA_ALL), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}  # Linear and Conv1D layers


def config(variant: str, targets=LLAMA_ALL, **extra) -> VeraConfig:
    return VeraConfig(r=8, target_modules=targets, **VARIANTS[variant], **extra)


def trained(variant: str, build="llama", seed=0):
    make, targets = BUILDS[build]
    model = add_adapter(make(), config(variant, targets))
    randomize_adapter(model, seed)
    return model


# ------------------------------------------------------------------------------------------------ the config

@pytest.mark.parametrize("field, value", [("train_vectors", "bd"), ("projections", "per-layer"),
                                          ("projection_init", "xavier"), ("train_vectors", None)])
def test_unknown_values_are_refused_with_the_allowed_ones(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be one of ") as err:
        VeraConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_d_init_rule_for_one_vector():
    # Left out, d_init becomes the d the layers really start with: 0 for "d" (no b), the constant 1 for "b" (no d).
    assert VeraConfig(train_vectors="d").d_init == 0.0 and VeraConfig(train_vectors="d", d_init=0).d_init == 0.0
    assert VeraConfig(train_vectors="b").d_init == 1.0 and VeraConfig(train_vectors="b", d_init=1).d_init == 1.0
    with pytest.raises(ValueError, match=r"d_init=0.5 has no effect with train_vectors='d': it omits b, so d starts "
                                         r"at 0 .* Leave d_init out \(or give 0.0\)"):
        VeraConfig(train_vectors="d", d_init=0.5)
    with pytest.raises(ValueError, match=r"d_init=1e-07 has no effect with train_vectors='b': it omits d"):
        VeraConfig(train_vectors="b", d_init=1e-7)
    with pytest.raises(ValueError, match="d_init must not be 0"):
        VeraConfig(d_init=0)


def test_unique_projections_are_not_saved_in_the_file():
    with pytest.raises(ValueError, match="save_projection=True stores the one shared .* leave save_projection False"):
        VeraConfig(projections="unique", save_projection=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_round_trips_and_default_writes_no_variant_keys(variant):
    cfg = config(variant)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert config_from_dict(data) == cfg
    assert {k for k in ("train_vectors", "projections", "projection_init") if k in data} == set(VARIANTS[variant])
    assert cfg.is_default_variant is (variant == "default")


# ------------------------------------------------------------------------------------------------ projections

def test_projection_inits_draw_the_papers_distributions():
    uniform_kaiming = generate_projections(64, 512, 256, 0)
    assert all(torch.equal(a, b) for a, b in zip(uniform_kaiming, generate_projections(64, 512, 256, 0,
                                                                                        "kaiming_uniform")))
    A, B = generate_projections(64, 512, 256, 0, "kaiming_normal")
    assert abs(A.std().item() - math.sqrt(2 / 512)) < 0.02 * math.sqrt(2 / 512)
    assert abs(B.std().item() - math.sqrt(2 / 64)) < 0.03 * math.sqrt(2 / 64)
    assert abs(A.mean().item()) < 1e-3 and A.abs().max() > math.sqrt(6 / 512)  # normal: past the uniform's bound
    A, B = generate_projections(64, 512, 256, 0, "uniform")
    assert 0 <= A.min() and A.max() <= 0.1 and 0 <= B.min() and B.max() <= 0.1
    assert abs(A.mean().item() - 0.05) < 1e-3


def test_unique_pairs_are_each_layers_own_draw_from_seed_and_path():
    model = add_adapter(tiny_llama(), config("unique", projection_seed=5))
    layers = dict(adapter_layers(model))
    assert len({id(layer.projections) for layer in layers.values()}) == len(layers) == 14
    for path, layer in layers.items():
        A, B = generate_projections(8, layer.in_features, layer.out_features, layer_seed(5, path))
        assert torch.equal(layer.projections.A, A) and torch.equal(layer.projections.B, B)
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0.projections.A, q1.projections.A)  # same shape, different draws


# ------------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_counts_are_the_tensors_that_train(build, variant):
    make, targets = BUILDS[build]
    model = add_adapter(make(), config(variant, targets))
    layers = [layer for _, layer in adapter_layers(model)]
    trains = VARIANTS[variant].get("train_vectors", "both")
    expected = sum(layer.out_features * (trains != "d") + 8 * (trains != "b") for layer in layers)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_parameters(model)["trainable"] == real == expected
    assert estimate_parameters(make(), config(variant, targets))["trainable"] == expected
    names = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"both": {"vera_lambda_b", "vera_lambda_d"}, "d": {"vera_lambda_d"},
                     "b": {"vera_lambda_b"}}[trains]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_starts_unchanged_and_the_trained_vector_gets_a_gradient(variant, tokens):
    base = tiny_llama()
    with torch.no_grad():
        before = base(tokens).logits
    model = add_adapter(base, config(variant))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    grads = {n.rsplit(".", 2)[-2]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # b = 0 blocks d's gradient at step 0 when both train; the one vector of "d" / "b" gets one at once.
    first = {"d": "vera_lambda_d"}.get(VARIANTS[variant].get("train_vectors"), "vera_lambda_b")
    assert grads[first].abs().sum() > 0


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fold_merge_and_save_load_are_exact(tmp_path, build, variant):
    model = trained(variant, build)
    tokens = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))  # long enough to fold
    with torch.no_grad():
        fast = model(tokens).logits
        with fast_vera(False):
            plain = model(tokens).logits
        merge_adapter(model)
        merged = model(tokens).logits
        unmerge_adapter(model)
        after = model(tokens).logits
    with torch.no_grad():
        base = BUILDS[build][0]()(tokens).logits
    assert (plain - base).abs().max() > 1e-2  # the adapter changes the outputs: the comparisons below can fail
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "a")
    trains = VARIANTS[variant].get("train_vectors", "both")
    keys = {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "a" / "adapter.safetensors")}
    assert keys == {"both": {"vera_lambda_b", "vera_lambda_d"}, "d": {"vera_lambda_d"}, "b": {"vera_lambda_b"}}[trains]
    loaded = load_adapter(BUILDS[build][0](), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, fast)
    assert count_parameters(loaded)["trainable"] == count_parameters(model)["trainable"]


def test_unique_fingerprint_covers_every_layer(tmp_path):
    model = trained("unique")
    save_adapter(model, tmp_path / "a")
    meta_file = tmp_path / "a" / "vera_lab_adapter.json"
    meta = json.loads(meta_file.read_text())
    assert meta["projection"]["projections"] == "unique" and meta["config"]["projections"] == "unique"
    meta["config"]["projection_seed"] = 1  # another seed: other pairs in every layer
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="seed 1 in vera_lab_adapter.json does not match the fingerprint"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_mixed_rows_of_different_variants_equal_each_adapter_alone(tmp_path):
    names = {"both": "default", "d": "only_d", "b": "only_b"}
    for i, (name, variant) in enumerate(names.items()):
        save_adapter(trained(variant, seed=i), tmp_path / name)
    _check_mixed(load_adapters(tiny_llama(), {n: tmp_path / n for n in names}).eval(), list(names))


def test_mixed_rows_of_unique_adapters_equal_each_adapter_alone(tmp_path):
    for i, name in enumerate("xy"):
        save_adapter(trained("unique", seed=i), tmp_path / name)
    model = load_adapters(tiny_llama(), {n: tmp_path / n for n in "xy"}).eval()
    assert all(layer.projections is not None for _, layer in adapter_layers(model))
    _check_mixed(model, ["x", "y"])


def _check_mixed(model, names):
    rows = names + ["__base__"] + names[::-1]
    tokens = torch.randint(0, 100, (len(rows), 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mixed = model(tokens, adapter_names=rows).logits
        alone = {}
        for name in names:
            set_active_adapter(model, name)
            alone[name] = model(tokens).logits
        set_active_adapter(model, None)
        alone["__base__"] = model(tokens).logits
    assert (alone[names[0]] - alone[names[1]]).abs().max() > 1e-2
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first, second, field", [("default", "unique", "projections"),
                                                  ("unique", "default", "projections"),
                                                  ("default", "kaiming_normal", "projection_init")])
def test_adapters_that_need_another_pair_are_refused(tmp_path, first, second, field):
    model = trained(first)
    save_adapter(trained(second), tmp_path / "b")
    for attempt in (lambda: add_adapter(model, config(second), "b"), lambda: load_adapter(model, tmp_path / "b", "b")):
        with pytest.raises(ValueError, match=f"differs from 'default' first in {field}"):
            attempt()


# ------------------------------------------------------------------------------------------------ PEFT, calculator

@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
def test_peft_vera_export_refuses_variants_and_as_lora_is_exact(tmp_path, variant, tokens):
    model = trained(variant)
    with pytest.raises(ValueError, match=r"^PEFT's VeRA has both vectors.*Export it with as_lora=True \(exact\)\.$"):
        export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    export_peft(model, tmp_path / "l", as_lora=True)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "l")
    torch.testing.assert_close(theirs(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_calculator_counts_one_vector_per_layer():
    both, only_d, only_b = (parameter_table(tiny_llama(), LLAMA_ALL, vera_ranks=(8,), lora_ranks=(),
                                            train_vectors=t)[0]["trainable"] for t in ("both", "d", "b"))
    assert only_d == 14 * 8 and only_b == both - 14 * 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_memory_is_exact_for_every_variant(tmp_path, variant):
    from vera_core.lab.many import adapter_memory

    cfg = config(variant)
    shapes = [(layer.in_features, layer.out_features) for _, layer in adapter_layers(trained(variant))]
    vectors = sum(out + cfg.r for _, out in shapes) * 4  # b and d per layer, fp32; an omitted one is held as 1s
    if cfg.projections == "unique":  # every layer its own (r, in) and (out, r)
        pairs, frozen = len(shapes), sum(cfg.r * (i + o) for i, o in shapes) * 4
    else:  # one pair at the largest shapes, once for all
        pairs, frozen = 1, cfg.r * (max(i for i, _ in shapes) + max(o for _, o in shapes)) * 4
    for i, name in enumerate("xy"):
        save_adapter(trained(variant, seed=i), tmp_path / name)
    model = load_adapters(tiny_llama(), {n: tmp_path / n for n in "xy"})
    assert adapter_memory(model) == {"per_adapter": {"x": vectors, "y": vectors}, "adapters_total": 2 * vectors,
                                     "shared": frozen, "pairs": pairs}
