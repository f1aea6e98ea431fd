"""Adapter files: native round trip, fingerprint, atomic writes, PEFT export and import, bad directories."""
import copy
import json
import os
import re
import stat

import peft
import pytest
import torch
from helpers import LLAMA_ALL, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

import vera_core.adapters.io as vio
from vera_core import (
    LoraConfig,
    VeraConfig,
    add_adapter,
    count_parameters,
    export_peft,
    load_adapter,
    save_adapter,
)
from vera_core.adapters.layers import AdapterLayer


def trained(build=tiny_llama, config=None, seed=0):
    model = add_adapter(build(), config or VeraConfig(r=16, target_modules=LLAMA_ALL))
    randomize_adapter(model, seed)
    return model


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.iterdir())


def test_native_round_trip_and_size(tmp_path, tokens):
    model = trained()
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".vera-lab", "adapter.safetensors",
                                                                   "vera_lab_adapter.json"]
    meta = json.loads((tmp_path / "a" / "vera_lab_adapter.json").read_text())
    assert meta["config"]["r"] == 16 and meta["projection"]["seed"] == 0 and len(meta["projection"]["fingerprint"]) == 64
    assert meta["torch_version"] == torch.__version__
    keys = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert "vera_A" not in keys and len(keys) == 28
    trainable = count_parameters(model)["trainable"]
    assert dir_bytes(tmp_path / "a") <= 4 * trainable + 64 * 1024
    loaded = load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    assert count_parameters(loaded)["trainable"] == trainable


def test_save_projection_stores_A_and_B(tmp_path, tokens):
    model = trained(config=VeraConfig(r=16, target_modules=LLAMA_ALL, save_projection=True))
    save_adapter(model, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert keys["vera_A"].shape == (16, 72) and keys["vera_B"].shape == (72, 16)
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "a")(tokens).logits, model(tokens).logits)


def test_head_copy_round_trip(tmp_path, tokens):
    model = trained(tiny_bert, LoraConfig(r=4, modules_to_save=["classifier"]))
    save_adapter(model, tmp_path / "a")
    base = tiny_bert()
    torch.nn.init.normal_(base.classifier.weight)  # another head: the trained copy must come from the file
    loaded = load_adapter(base, tmp_path / "a")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=1e-6, rtol=0)


def test_fingerprint_mismatch_is_refused(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    meta_file = tmp_path / "a" / "vera_lab_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["projection"]["fingerprint"] = "0" * 64  # as if torch's generator had changed
    meta["torch_version"] = "1.0.0"  # ... between an older torch and this one
    meta_file.write_text(json.dumps(meta))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"save_projection=True"):
        load_adapter(base, tmp_path / "a")
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_missing_and_corrupt_files(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    base = tiny_llama()
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(base, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an adapter directory"):
        load_adapter(base, tmp_path / "empty")
    weights = tmp_path / "a" / "adapter.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_adapter(base, tmp_path / "a")
    weights.unlink()
    with pytest.raises(ValueError, match="no adapter.safetensors"):
        load_adapter(base, tmp_path / "a")
    weights.write_bytes(good)
    (tmp_path / "a" / "vera_lab_adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(base, tmp_path / "a")
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_adapter_for_another_base_names_the_module(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"different base model: .*model\.layers\.0\.self_attn\.q_proj.*\(48,\)"):
        load_adapter(tiny_llama(hidden=48), tmp_path / "a")
    with pytest.raises(ValueError, match=r"different base model: it adapts module 'model\.layers\.0"):
        load_adapter(tiny_gpt2(), tmp_path / "a")


def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch, tokens):
    first = trained(seed=1)
    save_adapter(first, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(trained(seed=2), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left behind


@pytest.mark.parametrize("build,targets,extra", [
    (tiny_llama, LLAMA_ALL, {}),
    (tiny_gpt2, ["c_attn", "c_fc"], {}),
    (tiny_bert, None, {"modules_to_save": ["classifier"]}),
])
@pytest.mark.parametrize("save_projection", [False, True])
def test_export_peft_vera_loads_in_peft(tmp_path, tokens, build, targets, extra, save_projection):
    model = trained(build, VeraConfig(r=16, target_modules=targets, save_projection=save_projection, **extra))
    export_peft(model, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "p")
    torch.testing.assert_close(theirs(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [VeraConfig(r=16, target_modules=LLAMA_ALL), LoraConfig(r=4, target_modules=LLAMA_ALL)])
def test_export_as_lora_loads_in_peft(tmp_path, tokens, config):
    model = trained(config=config)
    export_peft(model, tmp_path / "p", as_lora=True)
    exported = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")
    assert isinstance(theirs.base_model, peft.LoraModel)
    torch.testing.assert_close(theirs(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("peft_config", [
    peft.VeraConfig(r=16, target_modules=LLAMA_ALL, projection_prng_key=3, save_projection=False),
    peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], save_projection=True),
    peft.LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_ALL),
])
def test_load_peft_directory(tmp_path, tokens, peft_config):
    theirs = peft.get_peft_model(tiny_llama(), peft_config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    theirs.save_pretrained(tmp_path / "p")
    ours = load_adapter(tiny_llama(), tmp_path / "p")
    out = ours(tokens).logits
    assert (out - tiny_llama()(tokens).logits).abs().max() > 1e-2
    torch.testing.assert_close(out, theirs(tokens).logits, atol=1e-5, rtol=1e-5)


def test_save_a_named_adapter(tmp_path, tokens):
    model = trained(config=VeraConfig(r=8, target_modules=["q_proj"]))
    expected = model(tokens).logits
    add_adapter(model, VeraConfig(r=8, target_modules=["q_proj"]), name="second")
    save_adapter(model, tmp_path / "a", name="default")
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "a")(tokens).logits, expected)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        save_adapter(model, tmp_path / "b", name="nope")
    with pytest.raises(ValueError, match="has no adapter"):
        save_adapter(copy.deepcopy(tiny_llama()), tmp_path / "c")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("write", [save_adapter, export_peft])
def test_a_directory_vera_lab_did_not_write_is_kept(tmp_path, write):
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "thesis.txt").write_text("three years of work")
    with pytest.raises(ValueError, match=r"holds files VeRA Lab did not write \(sub, thesis.txt\).*overwrite=True"):
        write(trained(), target)
    assert (target / "thesis.txt").read_text() == "three years of work" and (target / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write(trained(), target, overwrite=True)  # asked for: the foreign content goes
    assert not (target / "thesis.txt").exists() and (target / ".vera-lab").is_file()
    assert leftovers(tmp_path) == []


def test_an_existing_file_is_never_replaced(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a directory")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="it is an existing file, not a directory; choose another directory"):
            save_adapter(trained(), target, overwrite=overwrite)
    assert target.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_own_and_empty_directories_are_replaced(tmp_path, tokens):
    (tmp_path / "a").mkdir()
    save_adapter(trained(seed=1), tmp_path / "a")  # empty: fine
    export_peft(trained(seed=2), tmp_path / "a")  # ours (the marker), even in another format: replaced whole
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".vera-lab", "adapter_config.json",
                                                                   "adapter_model.safetensors"]
    model = trained(seed=3)
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(load_adapter(tiny_llama(), tmp_path / "a")(tokens).logits, model(tokens).logits)
    assert leftovers(tmp_path) == []


def test_failed_rename_puts_the_old_adapter_back(tmp_path, monkeypatch):
    save_adapter(trained(seed=1), tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    real = os.replace

    def fail_on_new(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_new)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(trained(seed=2), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_unwritable_places_give_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^cannot write '.*/file/adapter': part of the path is a file; choose another directory"):
        save_adapter(trained(), tmp_path / "file" / "adapter")
    if not os.path.isdir("/sys"):
        pytest.skip("no /sys here: no other place refuses root (who runs these tests) a new directory")
    # sysfs refuses mkdir even to root (a chmod 0o555 parent would not stop root, which runs these tests).
    with pytest.raises(ValueError, match=r"^cannot write '/sys/vera-lab-test/adapter': operation not permitted"):
        save_adapter(trained(), "/sys/vera-lab-test/adapter")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the /sys case covers root")
def test_read_only_parent_is_permission_denied(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ValueError, match=r"cannot write '.*/ro/a': permission denied; choose another directory"):
        save_adapter(trained(), tmp_path / "ro" / "a")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_files_get_the_usual_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_adapter(trained(), tmp_path / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()} == dict.fromkeys(
        [".vera-lab", "adapter.safetensors", "vera_lab_adapter.json"], 0o666 & ~umask)


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 5] ^= 0x01  # inside the tensor data, after the JSON header
    weights.write_bytes(bytes(data))
    assert load_file(str(weights))  # still a readable safetensors file: only the hash can tell
    with pytest.raises(ValueError, match=r"adapter\.safetensors is corrupt or was changed after saving"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_an_adapter_without_a_hash_loads_with_a_warning(tmp_path, tokens):
    model = trained()
    save_adapter(model, tmp_path / "a")
    meta_file = tmp_path / "a" / "vera_lab_adapter.json"
    meta = json.loads(meta_file.read_text())
    assert list(meta["sha256"]) == ["adapter.safetensors"] and len(meta["sha256"]["adapter.safetensors"]) == 64
    del meta["sha256"]  # as saved before hashes were stored
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="stores no SHA-256 of adapter.safetensors"):
        loaded = load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_in_a_peft_file_are_refused(tmp_path, bad):
    export_peft(trained(), tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.1.mlp.up_proj.vera_lambda_d"
    tensors[key][3] = bad
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: tensor '{re.escape(key)}' holds NaN or inf"):
        load_adapter(tiny_llama(), tmp_path / "p")


def test_edited_seed_and_r_are_named(tmp_path):
    save_adapter(trained(), tmp_path / "a")
    meta_file = tmp_path / "a" / "vera_lab_adapter.json"
    good = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**good, "config": {**good["config"], "projection_seed": 5}}))
    with pytest.raises(ValueError, match=r"seed 5 in vera_lab_adapter\.json does not match the fingerprint saved "
                                         r"with it \(the adapter was trained with another seed, or the file was edited"):
        load_adapter(tiny_llama(), tmp_path / "a")
    meta_file.write_text(json.dumps({**good, "config": {**good["config"], "r": 8}}))
    with pytest.raises(ValueError, match=r"r 8 in its config but the tensors have r 16"):
        load_adapter(tiny_llama(), tmp_path / "a")
    save_adapter(trained(config=LoraConfig(r=4, target_modules=LLAMA_ALL)), tmp_path / "l")
    meta_file = tmp_path / "l" / "vera_lab_adapter.json"
    good = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**good, "config": {**good["config"], "r": 6}}))
    with pytest.raises(ValueError, match=r"r 6 in its config but the tensors have r 4"):
        load_adapter(tiny_llama(), tmp_path / "l")
