"""The fast VeRA path (shared input projection, folded update) against the plain formula and against PEFT."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import LLAMA_ALL, copy_vectors_to_peft, peft_vera, randomize_adapter, tiny_gpt2, tiny_llama

from vera_core import VeraConfig, add_adapter, merge_adapter
from vera_core.adapters.fused import fast_vera
from vera_core.adapters.layers import VeraLayer

GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
# (batch, length): 2 x 40 tokens folds every projection of the tiny models, 1 x 3 takes the per-token path
# everywhere, 2 x 9 mixes both (N·(in + out) > in·out decides per layer).
SHAPES = [(2, 40), (1, 3), (2, 9)]


def adapted(build, targets, dropout=0.0):
    model = add_adapter(build(), VeraConfig(r=16, target_modules=targets, d_init=0.3, dropout=dropout))
    randomize_adapter(model)
    return model


def run(model, embeds, seed=0):
    """Logits and the gradients of every trainable vector and of the input embeddings."""
    torch.manual_seed(seed)  # the same dropout masks in every run
    embeds = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), grads, embeds.grad


def assert_same(got, expected, atol=1e-5):
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=1e-4)
    assert got[1].keys() == expected[1].keys()
    for name in got[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(got[2], expected[2], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_ALL), (tiny_gpt2, GPT2_ALL)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("folded_backward", ["keep", "rebuild"])
def test_fast_equals_plain_formula_and_peft(build, targets, shape, folded_backward):
    model = adapted(build, targets)
    embeds = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(3))
    with fast_vera(True, folded_backward):
        fast = run(model, embeds)
    with fast_vera(False):
        plain = run(model, embeds)
    assert all(g.abs().sum() > 0 for g in fast[1].values())
    assert_same(fast, plain)

    theirs = peft_vera(build(), r=16, target_modules=targets, d_initial=0.3)
    copy_vectors_to_peft(model, theirs)
    peft_logits, peft_grads, peft_x = run(theirs, embeds)
    peft_grads = {n.removeprefix("base_model.model."): g for n, g in peft_grads.items()}
    assert_same(fast, (peft_logits, peft_grads, peft_x))


def test_long_inputs_fold_and_short_inputs_do_not():
    model = adapted(tiny_llama, LLAMA_ALL)
    q = model.model.layers[0].self_attn.q_proj
    long, short = torch.randn(2, 40, 32), torch.randn(1, 3, 32)
    assert type(q(long).grad_fn).__name__ == "FoldedVeraBackward"
    assert type(q(short).grad_fn).__name__ != "FoldedVeraBackward"
    with fast_vera(False):
        assert type(q(long).grad_fn).__name__ != "FoldedVeraBackward"


def saved_bytes(model, embeds) -> int:
    """Bytes autograd saves for backward beyond the model's own parameters and buffers (shared storage counted once)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds).logits.sum().backward()
    model.zero_grad()
    return sum(seen.values())


def test_rebuild_keeps_no_folded_weight():
    model = adapted(tiny_llama, LLAMA_ALL)
    embeds = torch.randn(2, 40, 32, requires_grad=True)
    with fast_vera(True, "keep"):
        kept = saved_bytes(model, embeds)
    with fast_vera(True, "rebuild"):
        rebuilt = saved_bytes(model, embeds)
    # tiny_llama adapts 7 layers per block over 2 blocks; their W' are (out, in) fp32 tensors.
    folded = 4 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, VeraLayer))
    assert kept - rebuilt == folded
    with pytest.raises(ValueError, match="folded_backward='save'"):
        with fast_vera(True, "save"):
            pass


def test_the_default_rebuilds_w_prime_and_auto_keeps_it_only_where_rebuilding_costs_a_real_share():
    from vera_core.adapters.fused import KEEP_MIN_SHARE, keep_folded, keep_saving

    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # SmolLM2's projections
    assert not any(keep_folded(n, i, o, r) for n in (145, 512, 2048) for r in (256, 1024) for i, o in shapes)
    with fast_vera(True, "auto"):
        # at 4 x 128 tokens: r=256 rebuilds everywhere (12.9-13.8% of each layer's work), r=1024 keeps (15.3-22.4%)
        assert not any(keep_folded(512, i, o, 256) for i, o in shapes)
        assert all(keep_folded(512, i, o, 1024) for i, o in shapes)
        assert not keep_folded(2048, 576, 576, 1024)  # longer batches: the same product is a smaller share
    saved, step = keep_saving(512, 576, 576, 1024)
    assert saved == 2 * 1024 * 576 * 576
    assert step == 4 * (512 + 1024) * 576 * 576 + 2 * 512 * 1024 * 1152
    share = lambda i, o, r: keep_saving(512, i, o, r)[0] / keep_saving(512, i, o, r)[1]  # noqa: E731
    worst_256, least_1024 = max(share(i, o, 256) for i, o in shapes), min(share(i, o, 1024) for i, o in shapes)
    assert worst_256 == pytest.approx(0.138, abs=1e-3) and least_1024 == pytest.approx(0.153, abs=1e-3)
    assert worst_256 < KEEP_MIN_SHARE <= least_1024
    with fast_vera(True, "rebuild"):
        assert not keep_folded(512, 576, 576, 4096)
    with fast_vera(True, "keep"):
        assert keep_folded(100_000, 576, 576, 1)


@pytest.mark.parametrize("shape", [(2, 40), (1, 3)])
def test_q_k_v_and_gate_up_share_one_projection(shape, monkeypatch):
    """Count the products against A: one per distinct input (qkv, o, gate+up, down), not one per layer."""
    model = adapted(tiny_llama, LLAMA_ALL)
    A = model.model.layers[0].self_attn.q_proj.projections.A
    calls = []
    linear = F.linear

    def counting(x, weight, *args):
        if weight.untyped_storage().data_ptr() == A.untyped_storage().data_ptr():
            calls.append(tuple(weight.shape))
        return linear(x, weight, *args)

    monkeypatch.setattr(F, "linear", counting)
    embeds = torch.randn(*shape, 32)
    run(model, embeds)
    assert len(calls) == 4 * 2  # 2 decoder layers
    calls.clear()
    with fast_vera(False):
        run(model, embeds)
    assert len(calls) == 7 * 2  # the plain path projects once per layer


def test_dropout_disables_sharing_and_stays_exact():
    model = adapted(tiny_llama, LLAMA_ALL, dropout=0.3).train()
    embeds = torch.randn(2, 40, 32)
    fast = run(model, embeds, seed=5)
    with fast_vera(False):
        plain = run(model, embeds, seed=5)
    assert_same(fast, plain)
    with fast_vera(False):
        other_masks = run(model, embeds, seed=6)
    assert not torch.allclose(fast[0], other_masks[0])  # dropout really acts on the adapter input


def test_cache_is_not_reused_for_another_input_or_after_in_place_change():
    model = adapted(tiny_llama, LLAMA_ALL)
    proj = model.model.layers[0].self_attn.q_proj.projections
    A_s = proj.A[:, :32]
    x, y = torch.randn(4, 32), torch.randn(4, 32)
    u = proj.project_input(x, 32, torch.float32)
    assert proj.project_input(x, 32, torch.float32) is u  # same tensor, same version: reused
    torch.testing.assert_close(proj.project_input(y, 32, torch.float32), y @ A_s.T)
    u = proj.project_input(x, 32, torch.float32)
    x.mul_(2)
    torch.testing.assert_close(proj.project_input(x, 32, torch.float32), x @ A_s.T)
    # The slot dies with its input: nothing (N, r)-sized outlives the forward pass.
    del x
    assert proj.input_cache._u is None


def test_cache_under_inference_mode_reuses_only_an_unchanged_input():
    """Inference tensors have no version counter: the slot compares x with a copy instead."""
    model = adapted(tiny_llama, LLAMA_ALL)
    proj = model.model.layers[0].self_attn.q_proj.projections
    with torch.inference_mode():
        x = torch.randn(4, 32)
        u = proj.project_input(x, 32, torch.float32)
        assert proj.project_input(x, 32, torch.float32) is u
        x.mul_(2)
        torch.testing.assert_close(proj.project_input(x, 32, torch.float32), x @ proj.A[:, :32].T)
        del x
    assert proj.input_cache._u is None and proj.input_cache._copy is None


def test_cache_respects_grad_mode():
    model = adapted(tiny_llama, LLAMA_ALL)
    proj = model.model.layers[0].self_attn.q_proj.projections
    x = torch.randn(4, 32, requires_grad=True)
    with torch.no_grad():
        u = proj.project_input(x, 32, torch.float32)
    assert proj.project_input(x, 32, torch.float32).requires_grad and not u.requires_grad


def test_bf16_and_inference_mode():
    model = adapted(tiny_llama, LLAMA_ALL)
    embeds = torch.randn(2, 40, 32)
    with torch.inference_mode():
        fast = model(inputs_embeds=embeds).logits
        with fast_vera(False):
            plain = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)

    half = copy.deepcopy(model).to(torch.bfloat16)
    fast = run(half, embeds.bfloat16())
    with fast_vera(False):
        plain = run(half, embeds.bfloat16())
    assert_same(fast, plain, atol=1e-2)


def test_merged_model_uses_the_base_product():
    model = adapted(tiny_llama, LLAMA_ALL)
    embeds = torch.randn(2, 40, 32)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits
        merge_adapter(model)
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, VeraLayer) and q.merged_adapter == "default"
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_takes_the_per_token_path_and_trains():
    """The trainer's CUDA path runs under bf16 autocast; the same autocast on CPU must not fold (a bf16 W' would
    round the update into W0) and must give the plain formula's outputs and fp32 gradients."""
    model = adapted(tiny_llama, LLAMA_ALL)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(q(x).grad_fn).__name__ != "FoldedVeraBackward"

    def autocast_run():
        embeds = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs_embeds=embeds).logits
        logits.float().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return logits.float(), grads

    fast, grads = autocast_run()
    with fast_vera(False):
        plain, plain_grads = autocast_run()
    torch.testing.assert_close(fast, plain)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0
        torch.testing.assert_close(grad, plain_grads[name], atol=0.05 * plain_grads[name].abs().max().item(), rtol=0)
