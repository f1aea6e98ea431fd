"""Mixed-adapter batches: each row of one batch with its own adapter equals that row run alone with its adapter
active (VeRA and LoRA, on Llama GQA, GPT-2 Conv1D and a BERT classifier with per-adapter heads), equals PEFT one
adapter at a time, and survives generate's KV cache; loading many adapters shares one (A, B) and one copy of the
vectors."""
import copy

import peft
import pytest
import torch
from helpers import LLAMA_ALL, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama, vera_llama

from vera_core import (
    LoraConfig,
    VeraConfig,
    add_adapter,
    load_adapter,
    load_adapters,
    merge_adapter,
    mixed_adapters,
    remove_adapter,
    save_adapter,
    set_active_adapter,
)
from vera_core.adapters.fused import FoldedVera
from vera_core.adapters.layers import VeraLayer
from vera_core.lab.models import generate

ROWS = ["b", "__base__", "a", "b", "c"]
BUILDS = {
    "llama": (tiny_llama, LLAMA_ALL, ()),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], ()),
    "bert": (tiny_bert, None, ("classifier",)),  # each adapter trains its own classifier copy
}


def adapted(build: str, method: str, names=("a", "b", "c")):
    """A tiny model carrying several random adapters; "c" adapts fewer layers (rows skip the layers it lacks)."""
    make, targets, heads = BUILDS[build]
    model = make()
    for i, name in enumerate(names):
        these = targets[:1] if name == "c" and targets else targets
        config = (VeraConfig(r=8, target_modules=these, modules_to_save=heads) if method == "vera"
                  else LoraConfig(r=4, target_modules=these, modules_to_save=heads))
        add_adapter(model, config, name=name)
        randomize_adapter(model, seed=i + 1)
    return model.eval()


def one_at_a_time(model, tokens, names) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        set_active_adapter(model, None if name == "__base__" else name)
        rows.append(model(tokens[i : i + 1]).logits[0])
    return torch.stack(rows)


def batch(n: int = len(ROWS), length: int = 9) -> torch.Tensor:
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("method", ["vera", "lora"])
def test_each_row_equals_its_adapter_alone(build, method):
    model, tokens = adapted(build, method), batch()
    mixed = model(tokens, adapter_names=ROWS).logits
    torch.testing.assert_close(mixed, one_at_a_time(model, tokens, ROWS), atol=1e-5, rtol=0)
    set_active_adapter(model, "a")
    with mixed_adapters(model, ROWS):  # the context manager, for code that cannot pass the argument
        torch.testing.assert_close(model(tokens).logits, mixed, atol=1e-5, rtol=0)
    # Nothing leaks into the next call: the active adapter again, for every row.
    torch.testing.assert_close(model(tokens).logits, one_at_a_time(model, tokens, ["a"] * len(ROWS)), atol=1e-5,
                               rtol=0)


def test_rows_of_one_adapter_take_the_one_adapter_path_and_its_fold(monkeypatch):
    model, tokens = adapted("llama", "vera"), batch()
    set_active_adapter(model, "a")
    expected = one_at_a_time(model, tokens, ["b"] * len(ROWS))
    folds = []
    monkeypatch.setattr(FoldedVera, "apply", lambda *a, apply=FoldedVera.apply: folds.append(1) or apply(*a))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, adapter_names=["b"] * len(ROWS)).logits, expected, atol=1e-5, rtol=0)
    assert len(folds) == len(LLAMA_ALL) * 2  # every layer folded b (45 tokens: N (in + out) > in x out here)


def test_bert_rows_use_their_own_head():
    model, tokens = adapted("bert", "vera"), batch()
    heads = model.classifier
    logits = model(tokens, adapter_names=ROWS).logits
    set_active_adapter(model, "a")
    pooled_a = model.bert(tokens).pooler_output
    # Row 2 uses adapter a throughout: its logits are a's head applied to a's pooled output.
    torch.testing.assert_close(logits[2], heads.modules_to_save["a"](pooled_a[2]), atol=1e-5, rtol=0)
    assert not torch.allclose(heads.modules_to_save["a"].weight, heads.modules_to_save["b"].weight)


def test_mixed_vera_equals_peft_one_adapter_at_a_time():
    ours, tokens = adapted("llama", "vera", names=("x", "y")), batch(4)  # PEFT warns on names inside "vera_lambda_"
    rows = ["y", "x", "__base__", "x"]
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=LLAMA_ALL), adapter_name="x")
    theirs.add_adapter("y", peft.VeraConfig(r=8, target_modules=LLAMA_ALL))
    with torch.no_grad():
        params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if ".vera_lambda_" in name:
                params["base_model.model." + name].copy_(p)
    theirs.eval()
    expected = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with theirs.disable_adapter():
                expected.append(theirs(tokens[i : i + 1]).logits[0])
        else:
            theirs.set_adapter(name)
            expected.append(theirs(tokens[i : i + 1]).logits[0])
    torch.testing.assert_close(ours(tokens, adapter_names=rows).logits, torch.stack(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vera", "lora"])
def test_generate_keeps_each_rows_adapter_through_the_kv_cache(method):
    model, prompts = adapted("llama", method), batch(len(ROWS), 6)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    mixed = model.generate(prompts, adapter_names=ROWS, **settings)
    alone = []
    for i, name in enumerate(ROWS):
        set_active_adapter(model, None if name == "__base__" else name)
        alone.append(model.generate(prompts[i : i + 1], **settings)[0])
    assert torch.equal(mixed, torch.stack(alone))
    assert len({tuple(row[6:].tolist()) for row in mixed}) > 2  # the adapters really differ


def test_models_generate_takes_adapter_names(tokenizer):
    model = vera_llama(tokenizer, r=8)  # adapter "default"
    randomize_adapter(model, seed=1)
    add_adapter(model, VeraConfig(r=8, target_modules=LLAMA_ALL), name="other")
    randomize_adapter(model, seed=2)
    prompts = [f"what colour is item {i}?" for i in range(3)]  # one token length: no padding between rows
    names = ["other", "__base__", "default"]
    mixed = generate(model, tokenizer, prompts, max_new_tokens=5, adapter_names=names)
    alone = []
    for prompt, name in zip(prompts, names):
        set_active_adapter(model, None if name == "__base__" else name)
        alone += generate(model, tokenizer, [prompt], max_new_tokens=5)
    assert mixed == alone
    with pytest.raises(ValueError, match="one adapter name per prompt"):
        generate(model, tokenizer, prompts, adapter_names=names[:2])


def test_refusals_name_the_problem():
    model, tokens = adapted("llama", "vera", names=("a", "b")), batch(2)
    before = model(tokens).logits
    with pytest.raises(ValueError, match=r"unknown adapter names \['zz'\]; the model has \['a', 'b'\]"):
        model(tokens, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="gives 1 names but the batch has 2 rows"):
        model(tokens, adapter_names=["a"])
    model.train()
    with pytest.raises(ValueError, match="mixed-adapter batches are for inference"):
        model(tokens, adapter_names=["a", "b"])
    model.eval()
    torch.testing.assert_close(model(tokens).logits, before, atol=0, rtol=0)  # failed calls left nothing behind
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged into the weights"):
        model(tokens, adapter_names=["a", "b"])


def test_a_copy_routes_its_own_layers_and_remove_takes_the_argument_away():
    model, tokens = adapted("gpt2", "vera"), batch()
    twin = copy.deepcopy(model)
    expected = model(tokens, adapter_names=ROWS).logits
    remove_adapter(model)
    assert "generate" not in vars(model) and not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(twin(tokens, adapter_names=ROWS).logits, expected, atol=0, rtol=0)


def _saved(tmp_path, name, **config):
    model = add_adapter(tiny_llama(), VeraConfig(**{"r": 8, "target_modules": LLAMA_ALL, **config}))
    randomize_adapter(model, seed=len(name))
    return save_adapter(model, tmp_path / name)


def test_load_adapters_share_one_pair_and_one_copy_of_the_vectors(tmp_path):
    dirs = {name: _saved(tmp_path, name) for name in ("a", "bb", "ccc")}
    model, tokens = load_adapters(tiny_llama(), dirs), batch(3)
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len({id(m.projections) for m in layers}) == 1
    for layer in layers:  # every adapter's vectors are rows of the stacked bank, not copies of it
        b_bank, d_bank = layer.bank.b, layer.bank.d
        assert [layer.vera_lambda_b[n].data_ptr() for n in dirs] == [b_bank[i].data_ptr() for i in range(3)]
        assert [layer.vera_lambda_d[n].data_ptr() for n in dirs] == [d_bank[i].data_ptr() for i in range(3)]
        assert not b_bank[3].any()  # the row for "no adapter here"
    single = {n: load_adapter(tiny_llama(), d)(tokens).logits for n, d in dirs.items()}
    mixed = model(tokens, adapter_names=list(dirs)).logits
    for i, name in enumerate(dirs):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-5, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad][0].endswith(".ccc")  # the last is active


def test_loading_in_several_calls_keeps_one_exact_stack_per_layer(tmp_path):
    """Each load copies its vectors into rows kept free for the rest; layers an adapter skips (gate/down only) and a
    second load_adapters call end with exactly one row per adapter plus the zero row, and serve the same rows."""
    narrow = ["gate_proj", "down_proj"]  # the same largest in / out as all seven, so the same (A, B)
    dirs = {"a": _saved(tmp_path, "a"), "n": _saved(tmp_path, "n", target_modules=narrow), "b": _saved(tmp_path, "b")}
    model = load_adapters(load_adapters(tiny_llama(), dirs), {"c": _saved(tmp_path, "c")})
    for path, layer in ((p, m) for p, m in model.named_modules() if isinstance(m, VeraLayer)):
        b_bank, d_bank = layer.bank.b, layer.bank.d
        assert layer.adapter_names == (["a", "n", "b", "c"] if path.endswith(tuple(narrow)) else ["a", "b", "c"])
        assert len(b_bank) == len(d_bank) == len(layer.adapter_names) + 1
        for i, name in enumerate(layer.adapter_names):
            assert layer.vera_lambda_b[name].data_ptr() == b_bank[i].data_ptr()
            assert layer.vera_lambda_d[name].data_ptr() == d_bank[i].data_ptr()
        assert not b_bank[-1].any() and not d_bank[-1].any()
    tokens, names = batch(4), ["a", "n", "b", "c"]
    mixed = model(tokens, adapter_names=names).logits
    for i, name in enumerate(names):
        alone = load_adapter(tiny_llama(), tmp_path / name)(tokens[i : i + 1]).logits[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


def test_training_one_adapter_after_a_mixed_batch_updates_the_stack(tmp_path):
    model, tokens = adapted("llama", "vera", names=("a", "b")), batch(2)
    model(tokens, adapter_names=["a", "b"])  # builds the stacked vectors
    set_active_adapter(model, "b")
    model.train()
    model(tokens, labels=tokens).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    trained_b = model(tokens).logits
    # Two names, so the rows go through the stacked vectors (one name would take the one-adapter path).
    torch.testing.assert_close(model(tokens, adapter_names=["b", "a"]).logits[0], trained_b[0], atol=1e-5, rtol=0)
    reloaded = load_adapter(tiny_llama(), save_adapter(model, tmp_path / "b", name="b"))
    torch.testing.assert_close(reloaded(tokens).logits, trained_b, atol=1e-5, rtol=0)


def test_mismatched_adapters_are_refused_naming_the_first_difference(tmp_path):
    model = load_adapter(tiny_llama(), _saved(tmp_path, "a"), name="a")
    for name, config, first in [("r16", {"r": 16}, "r: 16 vs 8"),
                                ("seed", {"projection_seed": 3}, "projection_seed: 3 vs 0"),
                                ("narrow", {"target_modules": ["q_proj"]}, "max_in: 32 vs 72")]:
        with pytest.raises(ValueError, match=f"share one \\(A, B\\) pair, and '{name}' differs from 'a' first in {first}"):
            load_adapter(model, _saved(tmp_path, name, **config), name=name)
    assert not [n for n, _ in model.named_parameters() if n.endswith((".r16", ".seed", ".narrow"))]
