"""Meta's reference model (llama_models.llama3.model, fairscale model-parallel layers) as a
separate process per model-parallel rank, talking over gloo.

    python -m tests.convert.meta_reference make DIR --rank R --world N --init FILE [--seed S]
    python -m tests.convert.meta_reference forward DIR --rank R --world N --init FILE \
        --tokens T.npy --out LOGITS.npy

`make` writes DIR/consolidated.R.pth for the params.json in DIR: random weights drawn once at
full size and cut by fairscale's own layers (so the shards are exactly what the reference holds
at world size N); `forward` loads DIR/consolidated.R.pth into rank R and writes the logits.
`--parallel-embedding` swaps in fairscale's ParallelEmbedding (split along dim, as in LLaMA 1/2's
reference) for VocabParallelEmbedding. Each run is its own process: fairscale and
torch.distributed keep global state that one pytest process could not reset.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers

import llama_models.llama3.model as ref
from llama_models.llama3.args import ModelArgs

STD = 0.1


def build(directory: str, args) -> ref.Transformer:
  with open(os.path.join(directory, "params.json")) as f:
    params = json.load(f)
  if args.parallel_embedding:
    ref.VocabParallelEmbedding = fs_layers.ParallelEmbedding
  model_args = ModelArgs(max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                         **params)
  return ref.Transformer(model_args)


def make(directory: str, args):
  # Every full-size (master) weight is filled from one generator in construction order, which
  # is the same on every rank and at every world size; fairscale then keeps this rank's block.
  g = torch.Generator().manual_seed(args.seed)
  original = fs_layers._initialize_affine_weight

  def seeded(weight, out_features, in_features, per_partition, partition_dim, init_method,
             *rest, **kwargs):
    def fill(master):
      with torch.no_grad():
        return master.copy_(torch.randn(master.shape, generator=g) * STD)
    return original(weight, out_features, in_features, per_partition, partition_dim, fill,
                    *rest, **kwargs)

  fs_layers._initialize_affine_weight = seeded
  model = build(directory, args)
  fs_layers._initialize_affine_weight = original
  norms = torch.Generator().manual_seed(args.seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # replicated: the same draw on every rank
        p.copy_(1 + STD * torch.randn(p.shape, generator=norms))
  state = model.state_dict()
  if args.rope_freqs:  # as LLaMA 1/2 shards carry it
    state["rope.freqs"] = torch.rand(model.params.dim // model.params.n_heads // 2)
  torch.save(state, os.path.join(directory, f"consolidated.{args.rank:02d}.pth"))


def forward(directory: str, args):
  model = build(directory, args)
  state = torch.load(os.path.join(directory, f"consolidated.{args.rank:02d}.pth"),
                     map_location="cpu", weights_only=True, mmap=True)
  state.pop("rope.freqs", None)  # LLaMA 1/2's reference loaded with strict=False for it
  model.load_state_dict(state, strict=True)
  model.eval()
  tokens = torch.as_tensor(np.load(args.tokens), dtype=torch.long)
  logits = model(tokens, 0).float().numpy()
  if args.rank == 0:
    np.save(args.out, logits)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=["make", "forward"])
  p.add_argument("directory")
  p.add_argument("--rank", type=int, default=0)
  p.add_argument("--world", type=int, default=1)
  p.add_argument("--init", required=True, help="file:// rendezvous path (must not exist)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokens")
  p.add_argument("--out")
  p.add_argument("--max-seq-len", type=int, default=64)
  p.add_argument("--max-batch-size", type=int, default=4)
  p.add_argument("--parallel-embedding", action="store_true")
  p.add_argument("--rope-freqs", action="store_true")
  args = p.parse_args()
  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank,
                          world_size=args.world)
  fs_init.initialize_model_parallel(args.world)
  try:
    (make if args.mode == "make" else forward)(args.directory, args)
  finally:
    dist.destroy_process_group()


if __name__ == "__main__":
  main()
