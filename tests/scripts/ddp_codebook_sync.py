"""Run by tests/test_quantizer_distributed.py under `accelerate launch --multi_gpu --num_processes 2`.

Rank 0 sees still pairs (frame t+H == frame t: every latent is 0, so one code takes every hit), rank 1 sees random
pairs: their codebook usage differs, so per-rank replacement decisions (the reference's) would differ. Each rank
writes its codebook bytes, its local decisions and what was replaced to `<output>/rank<r>.json`.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_lapa import LAPAQuantizerConfig, LAPAQuantizerModel

parser = argparse.ArgumentParser()
parser.add_argument("--output", required=True)
parser.add_argument("--steps", type=int, default=8)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
torch.manual_seed(0)  # same initial weights on every rank
config = LAPAQuantizerConfig(
    hidden_size=32, quant_dim=8, codebook_size=8, code_seq_len=4, image_size=32, patch_size=4,
    spatial_depth=1, temporal_depth=1, num_heads=2, head_dim=16, replacement_steps=[2, 4, 6, 8],
)
model = LAPAQuantizerModel(config)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
nsvq = accelerator.unwrap_model(model).quantizer

batch = 4
torch.manual_seed(100 + rank)  # different data (and NSVQ noise) per rank
local_hits = torch.zeros(config.codebook_size)
log = []
for step in range(1, args.steps + 1):
    frames = torch.rand(batch, 1, 3, 32, 32)
    pairs = frames.repeat(1, 2, 1, 1, 1) if rank == 0 else torch.rand(batch, 2, 3, 32, 32)
    out = model(pairs, step=step)
    local_hits += torch.bincount(out.codes.flatten(), minlength=config.codebook_size).float()
    if config.is_replacement_step(step):
        local_unused = (local_hits / batch < config.replacement_threshold).nonzero().flatten().tolist()
        log.append({"step": step, "local_unused": local_unused, "replaced": out.replaced_codes.tolist()})
        local_hits.zero_()
    accelerator.backward(out.loss)
    optimizer.step()
    optimizer.zero_grad()

result = {
    "rank": rank,
    "world_size": accelerator.num_processes,
    "codebook_hex": nsvq.codebook.detach().cpu().numpy().tobytes().hex(),
    "replacements": log,
}
Path(args.output).mkdir(parents=True, exist_ok=True)
(Path(args.output) / f"rank{rank}.json").write_text(json.dumps(result))
