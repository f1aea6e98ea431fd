"""VeRA and LoRA layers: numerics against an independent formula and against PEFT, merge, multi-adapter, dtypes."""
import copy
import math

import peft
import pytest
import torch
from helpers import LLAMA_ALL, copy_vectors_to_peft, peft_vera, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama

from vera_core import (
    LoraConfig,
    VeraConfig,
    add_adapter,
    count_parameters,
    disabled_adapter,
    generate_projections,
    merge_adapter,
    remove_adapter,
    set_active_adapter,
    unmerge_adapter,
)
from vera_core.adapters.inject import shared_projections
from vera_core.adapters.layers import LoraLayer, VeraLayer, keep_portable_4bit
from vera_core.adapters.projections import VeraProjections


@pytest.mark.parametrize("seed", [0, 1234])
def test_projections_equal_peft(seed):
    model = tiny_llama()
    theirs = peft_vera(model, r=16, target_modules=LLAMA_ALL, projection_prng_key=seed)
    A, B = generate_projections(16, 72, 72, seed)  # max_in = max(32, 72) (down_proj), max_out = 72 (gate/up)
    assert torch.equal(A, theirs.base_model.vera_A["default"])
    assert torch.equal(B, theirs.base_model.vera_B["default"])
    add_adapter(model, VeraConfig(r=16, target_modules=LLAMA_ALL, projection_seed=seed))
    q = model.model.layers[0].self_attn.q_proj
    assert (q.projections.max_in, q.projections.max_out) == (72, 72)
    assert torch.equal(q.projections.A, A) and torch.equal(q.projections.B, B)
    assert A.abs().max() <= math.sqrt(6 / 72) and B.abs().max() <= math.sqrt(6 / 16)


def test_vera_layer_matches_independent_formula(tokens):
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=["k_proj"], d_init=0.1))
    layer = model.model.layers[1].self_attn.k_proj
    assert isinstance(layer, VeraLayer) and layer.out_features == 16  # GQA: 2 kv heads x 8
    randomize_adapter(model)
    x = torch.randn(3, 5, 32)
    A, B = generate_projections(8, 32, 16, 0)
    b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    W0 = layer.base_layer.weight
    expected = x @ W0.T + b * (((x @ A.T) * d) @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)


def test_init_leaves_model_unchanged_and_counts(tokens):
    model = tiny_llama()
    ref = model(tokens).logits
    add_adapter(model, VeraConfig(r=16, target_modules=LLAMA_ALL, d_init=0.25))
    torch.testing.assert_close(model(tokens).logits, ref, atol=0, rtol=0)
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len(layers) == 14
    assert all(torch.all(m.vera_lambda_b["default"] == 0) for m in layers)
    assert all(torch.all(m.vera_lambda_d["default"] == 0.25) for m in layers)
    expected = sum(m.out_features + 16 for m in layers)  # sum of (out + r)
    counts = count_parameters(model)
    assert counts["trainable"] == counts["trainable_adapter"] == expected == 2 * (32 + 16 + 16 + 32 + 72 + 72 + 32 + 7 * 16)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "vera_lambda" in n}
    # One storage for A and B, not one copy per layer.
    assert len({m.projections.A.data_ptr() for m in layers}) == 1


def test_one_shared_pair_is_found_or_made_and_sliced_per_layer():
    model = tiny_llama()
    assert shared_projections(model) is None
    made = shared_projections(model, lambda: VeraProjections(8, 72, 72, 3))  # a pair for a model with none
    assert (made.max_in, made.max_out, made.seed) == (72, 72, 3)
    add_adapter(model, VeraConfig(r=8, target_modules=LLAMA_ALL))
    pair = shared_projections(model, lambda: pytest.fail("a model with a pair must not make another"))
    assert pair is shared_projections(model) is model.model.layers[1].mlp.down_proj.projections
    k = model.model.layers[1].self_attn.k_proj  # in 32, out 16 (GQA)
    A_s, B_s = k.slices
    assert torch.equal(A_s, pair.A[:, :32]) and torch.equal(B_s, pair.B[:16]) and A_s.shape == (8, 32)
    assert A_s.data_ptr() == pair.A.data_ptr() and B_s.data_ptr() == pair.B.data_ptr()  # views, not copies


@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_ALL), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_vera_logits_equal_peft(build, targets, tokens):
    base = build()
    theirs = peft_vera(base, r=16, target_modules=targets, projection_prng_key=7, d_initial=0.3)
    ours = add_adapter(copy.deepcopy(base), VeraConfig(r=16, target_modules=targets, projection_seed=7, d_init=0.3))
    randomize_adapter(ours)
    copy_vectors_to_peft(ours, theirs)
    reference = base(tokens).logits
    out = ours(tokens).logits
    assert (out - reference).abs().max() > 1e-2  # the update is really there
    torch.testing.assert_close(out, theirs(tokens).logits, atol=1e-5, rtol=1e-5)


def test_lora_logits_and_init_equal_peft(tokens):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL))
    ours = add_adapter(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=LLAMA_ALL))
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLayer) and layer.scaling["default"] == 2.0
    assert torch.all(layer.lora_B["default"] == 0)
    bound = 1 / math.sqrt(32)  # kaiming_uniform_(a=sqrt(5)) on fan_in 32
    assert 0.5 * bound < layer.lora_A["default"].abs().max() <= bound
    assert count_parameters(ours)["trainable"] == count_parameters(theirs)["trainable"] == sum(
        p.numel() for n, p in theirs.named_parameters() if p.requires_grad)
    randomize_adapter(ours)
    copy_vectors_to_peft(ours, theirs)
    torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=1e-5, rtol=1e-5)


def test_head_is_trained_as_a_copy(tokens):
    model = tiny_bert()
    original = model.classifier.weight.detach().clone()
    add_adapter(model, VeraConfig(r=8, modules_to_save=["classifier"]))  # default targets: query, value
    counts = count_parameters(model)
    assert counts["trainable_head"] == 32 * 3 + 3
    assert counts["trainable_adapter"] == 2 * 2 * (32 + 8)
    loss = model(tokens, labels=torch.tensor([0, 2])).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(model.classifier.original_module.weight, original)
    assert not torch.equal(model.classifier.modules_to_save["default"].weight, original)
    assert model.bert.pooler.dense.weight.grad is None


def test_several_vera_adapters_share_one_pair(tokens):
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), name="task_a")
    randomize_adapter(model, seed=1)
    out_a = model(tokens).logits
    add_adapter(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"], d_init=0.5), name="task_b")
    randomize_adapter(model, seed=2)
    out_b = model(tokens).logits
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len({id(m.projections) for m in layers}) == 1
    # Only the active adapter trains.
    assert all(".task_b" in n for n, p in model.named_parameters() if p.requires_grad)
    set_active_adapter(model, "task_a")
    torch.testing.assert_close(model(tokens).logits, out_a)
    assert all(".task_a" in n for n, p in model.named_parameters() if p.requires_grad)
    set_active_adapter(model, "task_b")
    torch.testing.assert_close(model(tokens).logits, out_b)
    assert not torch.allclose(out_a, out_b)
    with disabled_adapter(model):
        base_out = model(tokens).logits
    torch.testing.assert_close(base_out, tiny_llama()(tokens).logits)
    torch.testing.assert_close(model(tokens).logits, out_b)


@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_ALL), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_unmerge_remove(build, targets, tokens):
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, VeraConfig(r=16, target_modules=targets))
    randomize_adapter(model)
    adapted = model(tokens).logits
    merge_adapter(model)
    torch.testing.assert_close(model(tokens).logits, adapted, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    torch.testing.assert_close(model(tokens).logits, adapted, atol=1e-5, rtol=0)
    restored = remove_adapter(model)
    state = restored.state_dict()
    assert set(state) == set(original)
    for k, v in original.items():
        torch.testing.assert_close(state[k], v, atol=1e-5, rtol=0)
    assert not any(isinstance(m, VeraLayer) for m in restored.modules())
    assert all(p.requires_grad for p in restored.parameters())


def test_remove_with_merge_bakes_in_adapter_and_head(tokens):
    model = tiny_bert()
    add_adapter(model, LoraConfig(r=4, modules_to_save=["classifier"]))
    randomize_adapter(model)
    adapted = model(tokens).logits
    plain = remove_adapter(model, merge=True)
    assert type(plain.classifier) is torch.nn.Linear
    torch.testing.assert_close(plain(tokens).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, tokens):
    model = tiny_llama().to(dtype)
    add_adapter(model, VeraConfig(r=16, target_modules=LLAMA_ALL))
    randomize_adapter(model)
    x = torch.randn(2, 4, 32, dtype=dtype)
    layer = model.model.layers[0].self_attn.q_proj
    out = layer(x)
    assert out.dtype == dtype
    expected = layer.base_layer(x).float() + layer.adapter_output(x, "default")
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    assert model(tokens).logits.dtype == dtype


def test_all_linear_and_regex_targets():
    model = add_adapter(tiny_llama(), VeraConfig(r=4, target_modules="all-linear"))
    adapted = {n for n, m in model.named_modules() if isinstance(m, VeraLayer)}
    assert len(adapted) == 14 and "lm_head" not in adapted
    model = add_adapter(tiny_llama(), LoraConfig(r=2, target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    # Suffixes match on a dot boundary: "proj" is not a suffix of "q_proj".
    with pytest.raises(ValueError, match="no module matches"):
        add_adapter(tiny_llama(), VeraConfig(target_modules=["proj"]))


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -3}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"d_init": float("nan")}, "d_init must be a finite number"),
    ({"d_init": float("inf")}, "d_init must be a finite number"),
    ({"d_init": 0}, r"d_init must not be 0: b starts at 0 too, so neither b nor d would ever get a gradient"),
    ({"d_init": -0.0}, "d_init must not be 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"dropout": float("nan")}, "dropout must be a finite number"),
    ({"target_modules": []}, "target_modules must be"),
    ({"projection_seed": -1}, "projection_seed"),
])
def test_bad_vera_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VeraConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"alpha": 0}, "alpha must be positive"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
])
def test_bad_lora_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_bad_targets_leave_model_unchanged():
    model = tiny_llama()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"no module matches.*q_proj"):
        add_adapter(model, VeraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="Embedding"):
        add_adapter(model, VeraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="no such module"):
        add_adapter(model, VeraConfig(modules_to_save=["classifier"]))
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_second_adapter_must_share_seed_and_r():
    model = add_adapter(tiny_llama(), VeraConfig(r=8, target_modules=["q_proj"]))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="share one"):
        add_adapter(model, VeraConfig(r=8, target_modules=["q_proj"], projection_seed=1), name="other")
    with pytest.raises(ValueError, match="share one"):
        add_adapter(model, VeraConfig(r=16, target_modules=["q_proj"]), name="other")
    with pytest.raises(ValueError, match="one method"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), name="other")
    with pytest.raises(ValueError, match="already has an adapter named"):
        add_adapter(model, VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="projections of at least"):
        add_adapter(model, VeraConfig(r=8, target_modules=["gate_proj"]), name="wide")
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_base(bits, tmp_path, tokens):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
             if bits == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    model = keep_portable_4bit(LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[bits]
    reference = model(tokens).logits
    add_adapter(model, VeraConfig(r=16, target_modules=LLAMA_ALL))
    torch.testing.assert_close(model(tokens).logits, reference, atol=0, rtol=0)
    assert count_parameters(model)["trainable"] == 2 * (32 + 16 + 16 + 32 + 72 + 72 + 32 + 7 * 16)
    model(tokens, labels=tokens).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.vera_lambda_b["default"].grad.abs().sum() > 0
    adapted = model(tokens).logits
    with pytest.raises(NotImplementedError, match="4-bit / 8-bit base is refused"):
        merge_adapter(model)
    torch.testing.assert_close(model(tokens).logits, adapted, atol=0, rtol=0)  # a refused merge changes nothing
