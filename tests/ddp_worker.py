"""Run by test_train.py under torchrun with 2 CPU processes: 3 VeRA steps on a tiny Llama, then every rank dumps its
trainable tensors (and rank 0 the initial ones and the losses) into the folder given as argv[1]."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# helpers.py beside this file, and the vera_core of this checkout (not whichever one the virtualenv installed)
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from helpers import causal_data, load_tokenizer, trainable, vera_llama  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vera_core.lab.train import TrainConfig, train  # noqa: E402

folder = Path(sys.argv[1])
rank = int(os.environ["RANK"])
tokenizer = load_tokenizer()
model = vera_llama(tokenizer)
if rank == 0:
    save_file({n: t.contiguous() for n, t in trainable(model).items()}, folder / "init.safetensors")
config = TrainConfig(steps=3, batch_size=2, checkpoint_every=2)
result = train(model, tokenizer, causal_data(), config, out_dir=folder / "out")
save_file({n: t.contiguous() for n, t in trainable(model).items()}, folder / f"rank{rank}.safetensors")
losses = [e["loss"] for e in result.history if e["type"] == "step"]
(folder / f"losses{rank}.json").write_text(json.dumps(losses))
assert torch.distributed.get_world_size() == 2
