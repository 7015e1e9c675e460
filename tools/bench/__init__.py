"""Benchmarks for zoo, one mode each.

    python tools/bench.py convert [--size-mb 1000] [--shards 4] [--workdir DIR] [--keep]
    python tools/bench.py train [--steps 5] [--rounds 7] [--vocab 2000,32000] [--devices 1]
    python tools/bench.py decode [--batches 1,8] [--new-tokens 64] [--rounds 5]
    python tools/bench.py lora [--steps 3] [--rank 16] [--model small|medium]
    python tools/bench.py plan [--configs llama3_8b,lora] [--no-peer]
    python tools/bench.py dpo [--steps 2] [--rounds 3] [--vocab 32000] [--batch 4] [--no-peer]

`train` times zoo's jitted train step (AdamW, float32) on a tiny LLaMA against transformers'
LlamaForCausalLM in torch eager with torch.optim.AdamW, each in its own process, alternating,
and reports tokens/s, the ratio and MFU against the machine's measured matmul peak.

`decode` times greedy generation (batch 1 and 8) of zoo's KV-cache Generator against
transformers' generate on the same 58M-parameter float32 LLaMA, and the bound a step's weight
reads set: the bytes of every weight but the input embedding table over the machine's read
bandwidth (the best of numpy's and torch's sum over 1 GiB). At batch 1 it also times llama.cpp
(llama-cpp-python, when installed) on zoo's float32 GGUF export of the same weights.

`lora` runs a LoRA step (all-linear adapters, frozen f32 base), a QLoRA step (NF4 base) and a
full fine-tuning step (AdamW on every weight) of the same 91M-parameter float32 LLaMA, each in
its own process, and reports each one's peak RSS and tokens/s, and the NF4 base's bytes against
bf16.

`plan` runs `zoo plan --json` (the TPU compiler, libtpu) on every shipped config for the
Cloud TPU slice its docstring names, the fine-tuning configs with Llama 3 8B's config.json, and
on MaxText's Llama 3.1 8B v6e recipe shape as the peer: per-chip memory against HBM, whether it
fits, compile time and the estimated step time and the MFU it implies.

`dpo` times zoo's DPO step (full, then LoRA on every linear layer) on the train benchmark's
model shape against TRL's DPOTrainer step (its collator and loss, torch.optim.AdamW) on the same
transformers model in torch eager (a DPO step written in transformers where TRL is missing),
interleaved, and reports each kind's peak RSS, with LoRA-DPO's over full DPO's against LoRA
SFT's over full SFT's on the same model.

Human-readable lines first; the last line of a successful run is one JSON object with the
results, so that scripts can read it with `tail -n 1`. MB means MiB (2**20 bytes) throughout.

Layout: `harness` runs workers in child processes and measures them; `convert`, `train`,
`decode`, `lora` and `plan` are the modes, each with its targets in a table at the top, the function
that runs it in the parent (`run`) and the worker functions it starts; `cli` parses the command
line. A new mode is a module with `HELP`, `add_args(parser)` and `run(args, workdir) -> dict`,
listed in `cli.MODES`.

Every measurement runs in a process of its own, started as `python -m bench.worker`, which
imports a worker function by name and calls it with a JSON spec. The parent stays free of
numpy, torch and zoo: Linux carries a process's peak RSS over into the ru_maxrss of every child
it starts later (fork and exec inherit the high-water mark), so a parent that once held a shard
would inflate every measurement after it. That is why the modules here import those libraries
inside the worker functions, not at the top.
"""
