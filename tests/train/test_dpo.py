"""Preference tuning (configs/dpo.py, zoo.train.preference): the losses, rewards and gradients
equal an independent torch/transformers computation (and TRL's DPOTrainer), the LoRA reference
is the base with the adapters off, masking, learning a preference, one-line errors for bad
input, bit-exact resume after SIGKILL and the final exports."""

import json
import os
import signal

import jax
import numpy as np
import pytest

import zoo
from tests.helpers import wait_for_step, zoo_train
from tests.references import hf_model, torch, with_tokenizer
from zoo.cli import main
from zoo.convert.hf import to_zoo, weight_map
from zoo.data.preference import pair_rows
from zoo.train.config import load_config
from zoo.train.optim import param_name
from zoo.train.preference import PairModels, pair_objective, reference_logps, sequence_logps
from zoo.train.setup import build, prepare

F = torch.nn.functional
SEQ, PAIRS = 16, 8


def make_pairs(seed=0, n=PAIRS, vocab=128):
  """Pre-tokenized pairs of varied lengths that fit rows of SEQ tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    p = rng.integers(8, vocab, rng.integers(1, 7)).tolist()
    c = rng.integers(8, vocab, rng.integers(1, 8)).tolist()
    r = rng.integers(8, vocab, rng.integers(1, 8)).tolist()
    out.append((p, c, r))
  return out


def pair_batch(pairs, seq=SEQ):
  rows = [pair_rows(p, c, r, seq) for p, c, r in pairs]
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A tiny random transformers policy and a different reference (saved as HF directories),
  with the torch models themselves."""
  root = tmp_path_factory.mktemp("dpo_models")
  policy, reference = hf_model("llama", seed=0), hf_model("llama", seed=1)
  policy.save_pretrained(root / "policy")
  reference.save_pretrained(root / "reference")
  with_tokenizer(str(root / "policy"))
  return {"policy": str(root / "policy"), "reference": str(root / "reference"),
          "torch_policy": policy, "torch_reference": reference, "root": root}


def dpo_trainer(tmp_path, init_from, arg="", **overrides):
  values = {"data.seq_len": SEQ, "data.batch_size": PAIRS, "remat": "none"}
  values.update(overrides)
  config = load_config(f"configs/dpo.py:init_from={init_from}{arg}", values)
  return build(prepare(config, str(tmp_path), with_data=False))


def models_of(trainer):
  spec = trainer.dpo
  lora = trainer.lora is not None
  own = trainer.reference is not None
  ref_graphdef = None
  if spec.uses_reference:
    from flax import nnx

    from zoo.models.llama import abstract_model
    from zoo.train.setup import model_kwargs
    ref_graphdef = nnx.split(abstract_model(trainer.run.model_config,
                                            **model_kwargs(trainer.run)), nnx.Param)[0]
  return PairModels(trainer.graphdef, ref_graphdef, lora=lora, own_reference=own)


# --- the independent reference: transformers + torch autograd, one sequence at a time --------

def torch_logps(model, prompt, completion):
  ids = torch.tensor([prompt + completion])
  logits = model(ids).logits[0].float()
  lp = F.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
  return lp[len(prompt) - 1:].sum()


def torch_dpo(policy, reference, pairs, loss, beta, ls=0.0, sft=0.0, gamma=0.5):
  """(loss, chosen rewards, rejected rewards) with the gradient in policy's .grad."""
  policy.zero_grad()
  pc = torch.stack([torch_logps(policy, p, c) for p, c, _ in pairs])
  pr = torch.stack([torch_logps(policy, p, r) for p, _, r in pairs])
  nc = torch.tensor([len(c) for _, c, _ in pairs], dtype=torch.float32)
  nr = torch.tensor([len(r) for _, _, r in pairs], dtype=torch.float32)
  if loss == "simpo":
    z = beta * (pc / nc - pr / nr) - gamma
    losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    rc, rr = beta * pc.detach() / nc, beta * pr.detach() / nr
  else:
    with torch.no_grad():
      qc = torch.stack([torch_logps(reference, p, c) for p, c, _ in pairs])
      qr = torch.stack([torch_logps(reference, p, r) for p, _, r in pairs])
    if loss == "ipo":
      d = (pc - qc) / nc - (pr - qr) / nr
      losses = (d - 1 / (2 * beta)) ** 2
    else:
      d = (pc - qc) - (pr - qr)
      losses = (torch.relu(1 - beta * d) if loss == "hinge"
                else -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d))
    rc, rr = beta * (pc - qc).detach(), beta * (pr - qr).detach()
  total = losses.mean() + sft * (-pc.sum() / nc.sum())
  total.backward()
  return float(total), rc.numpy(), rr.numpy(), losses.detach().numpy()


def torch_grads(model, config):
  """The torch model's gradients under zoo's parameter names and layouts."""
  grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  return {e.zoo: to_zoo(e, grads[e.hf]) for e in weight_map(config) if e.hf in grads}


def zoo_grads(grads):
  return {param_name(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]}


CASES = {
  "sigmoid": ("sigmoid", 0.1, 0.0, 0.0),
  "sigmoid_label_smoothing": ("sigmoid", 0.5, 0.2, 0.0),
  "sigmoid_sft_weight": ("sigmoid", 0.3, 0.0, 0.7),
  "ipo": ("ipo", 0.4, 0.0, 0.0),
  "hinge": ("hinge", 0.5, 0.0, 0.0),
  "simpo": ("simpo", 2.0, 0.1, 0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_rewards_and_gradients_equal_torch(case, checkpoints, tmp_path):
  loss, beta, ls, sft = CASES[case]
  arg = f",loss={loss},beta={beta},label_smoothing={ls},sft_weight={sft}"
  if loss == "simpo":
    arg += ",gamma=0.7"
  else:
    arg += f",reference={checkpoints['reference']}"
  trainer = dpo_trainer(tmp_path, checkpoints["policy"], arg)
  pairs = make_pairs()
  want, rc, rr, _ = torch_dpo(checkpoints["torch_policy"], checkpoints["torch_reference"],
                              pairs, loss, beta, ls, sft, gamma=0.7)
  if loss != "simpo":
    assert abs(want - np.log(2)) > 1e-2  # the reference differs from the policy
  state = trainer.initial_state()
  batch = trainer.global_batch(pair_batch(pairs))
  models = models_of(trainer)

  def objective(params):
    return pair_objective(trainer.dpo, models, params, batch, trainer.frozen)

  # jitted, as the step is: op-by-op dispatch over 8 sharded host devices is slow and fragile
  (got, sums), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state["params"])
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)
  ours, theirs = zoo_grads(grads), torch_grads(checkpoints["torch_policy"],
                                               trainer.run.model_config)
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5, err_msg=name)
  # the train step logs the first batch's metrics before its update
  _, metrics = trainer.train_step(state, batch, *trainer.frozen)
  metrics = jax.device_get(metrics)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["rewards_chosen"], rc.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["rewards_rejected"], rr.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["reward_margin"], (rc - rr).mean(), rtol=1e-5, atol=1e-5)
  assert metrics["reward_accuracy"] == pytest.approx(np.mean(rc > rr))


@pytest.mark.parametrize("case", ["sigmoid", "sigmoid_sft_weight", "ipo", "hinge"])
def test_loss_and_gradients_equal_trl(case, checkpoints, tmp_path):
  """TRL's DPOTrainer on the same pairs (its collator, its loss; sft_weight as its "sft" loss
  term): the loss, rewards and the policy's gradient."""
  trl = pytest.importorskip("trl")
  datasets = pytest.importorskip("datasets")
  import transformers
  loss, beta, _, sft = CASES[case]
  arg = f",loss={loss},beta={beta},sft_weight={sft},reference={checkpoints['reference']}"
  trainer = dpo_trainer(tmp_path, checkpoints["policy"], arg)
  pairs = make_pairs(seed=3)
  state = trainer.initial_state()
  batch = trainer.global_batch(pair_batch(pairs))
  (got, _), grads = jax.jit(jax.value_and_grad(
      lambda p: pair_objective(trainer.dpo, models_of(trainer), p, batch, trainer.frozen),
      has_aux=True))(state["params"])
  _, metrics = trainer.train_step(state, batch, *trainer.frozen)

  policy = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["policy"],
                                                             dtype=torch.float32)
  reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["reference"],
                                                                dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(checkpoints["policy"])
  types, weights = ([loss, "sft"], [1.0, sft]) if sft else ([loss], [1.0])
  args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=types,
                       loss_weights=weights, report_to=[], use_cpu=True, max_length=None,
                       per_device_train_batch_size=PAIRS, disable_dropout=True,
                       bf16=False)
  data = datasets.Dataset.from_list([{"prompt": "w1", "chosen": " w2", "rejected": " w3"}])
  dpo = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                       processing_class=tok)
  examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
  inputs = dpo.data_collator(examples)
  policy.train()
  policy.zero_grad()
  theirs = dpo.compute_loss(policy, inputs)
  theirs.backward()
  np.testing.assert_allclose(float(got), float(theirs), rtol=1e-5, atol=1e-5)
  logged = {k: v[-1] for k, v in dpo._metrics["train"].items()}
  m = jax.device_get(metrics)
  np.testing.assert_allclose(m["rewards_chosen"], logged["rewards/chosen"], atol=1e-5)
  np.testing.assert_allclose(m["rewards_rejected"], logged["rewards/rejected"], atol=1e-5)
  np.testing.assert_allclose(m["reward_margin"], logged["rewards/margins"], atol=1e-5)
  np.testing.assert_allclose(m["reward_accuracy"], logged["rewards/accuracies"], atol=1e-6)
  np.testing.assert_allclose(m["logps_chosen"], logged["logps/chosen"], rtol=1e-5, atol=1e-5)
  ours, want = zoo_grads(grads), torch_grads(policy, trainer.run.model_config)
  for name in want:
    np.testing.assert_allclose(ours[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_lora_reference_is_the_base_with_adapters_off(checkpoints, tmp_path):
  trainer = dpo_trainer(tmp_path, checkpoints["policy"], ",rank=4,loss=sigmoid",
                        **{"optimizer.lr": 0.05, "optimizer.warmup_steps": 0})
  assert trainer.reference is None and len(trainer.frozen) == 1  # no second copy
  pairs = make_pairs(seed=1)
  batch = trainer.global_batch(pair_batch(pairs))
  models = models_of(trainer)
  base_before = jax.tree.map(np.asarray, trainer.lora.base)
  base_model = checkpoints["torch_policy"]
  with torch.no_grad():
    want = np.array([[float(torch_logps(base_model, p, c)), float(torch_logps(base_model, p, r))]
                     for p, c, r in pairs])
  state = trainer.initial_state()
  for _ in range(3):
    state, metrics = trainer.train_step(state, batch, *trainer.frozen)
  assert float(metrics["reward_margin"]) > 0  # the adapters moved the policy
  ref = np.asarray(jax.jit(lambda f, b: reference_logps(models, f, b))(trainer.frozen, batch))
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
  policy = np.asarray(jax.jit(lambda p, f, b: sequence_logps(
      models.graphdef, models.policy_trees(p, f), b))(state["params"], trainer.frozen, batch))
  assert np.abs(policy - want).max() > 1e-3
  # the base tree is an input only: never updated
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(trainer.lora.base)):
    assert np.array_equal(a, np.asarray(b))


def test_prompt_targets_do_not_count_and_equal_completions_have_zero_margin(checkpoints,
                                                                            tmp_path):
  arg = f",reference={checkpoints['reference']}"
  trainer = dpo_trainer(tmp_path, checkpoints["policy"], arg)
  pairs = make_pairs(seed=2)
  p, c, _ = pairs[0]
  pairs[0] = (p, c, list(c))  # chosen == rejected
  host = pair_batch(pairs)
  state = trainer.initial_state()
  models = models_of(trainer)

  objective = jax.jit(lambda p, b, f: pair_objective(trainer.dpo, models, p, b, f))

  def loss_of(b):
    out, sums = objective(state["params"], trainer.global_batch(b), trainer.frozen)
    return float(out), sums

  base, _ = loss_of(host)
  changed = {k: v.copy() for k, v in host.items()}
  prompt = (changed["weights"] == 0) & (changed["segment_ids"] > 0)
  assert prompt.sum() > 0
  changed["targets"][prompt] = (changed["targets"][prompt] + 7) % 128
  assert loss_of(changed)[0] == base
  one = pair_batch([pairs[0]] * PAIRS)
  _, metrics = trainer.train_step(state, trainer.global_batch(one), *trainer.frozen)
  assert abs(float(metrics["reward_margin"])) < 1e-6
  assert float(metrics["dpo_loss"]) == pytest.approx(np.log(2), abs=1e-6)


def test_grad_accum_and_loss_chunk_give_the_same_step(checkpoints, tmp_path):
  """Microbatches divide by the whole batch's counts, and chunked logits sum the same."""
  arg = f",reference={checkpoints['reference']},sft_weight=0.5"
  pairs = pair_batch(make_pairs(seed=4, n=2 * PAIRS))  # 2 a batch shard: 2 microbatches
  out = {}
  for name, extra in (("plain", {}), ("accum_chunk", {"train.grad_accum": 2,
                                                      "train.loss_chunk": 8})):
    trainer = dpo_trainer(tmp_path / name, checkpoints["policy"], arg,
                          **{"data.batch_size": 2 * PAIRS, **extra})
    state, metrics = trainer.train_step(trainer.initial_state(), trainer.global_batch(pairs),
                                        *trainer.frozen)
    out[name] = jax.device_get((state["params"], metrics))
  (p1, m1), (p2, m2) = out["plain"], out["accum_chunk"]
  for key in ("loss", "dpo_loss", "reward_margin", "grad_norm", "logps_chosen"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# --- zoo train: learning, errors, resume, exports -----------------------------------------------

def write_pairs(path, n=96, seed=0, vocab=128):
  """A learnable preference: the chosen completion always ends in token 5, the rejected in 6."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      p = [1] + rng.integers(10, vocab, rng.integers(2, 7)).tolist()
      body = rng.integers(10, vocab, rng.integers(1, 5)).tolist()
      f.write(json.dumps({"prompt_ids": p, "chosen_ids": body + [5],
                          "rejected_ids": body + [6]}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def zoo_base(tmp_path_factory):
  """A tiny random zoo checkpoint without a tokenizer, and pre-tokenized pairs."""
  root = tmp_path_factory.mktemp("dpo_base")
  assert main(["init", "tiny_llama", str(root / "base"), "--set", "num_layers=2", "--set",
               "vocab_size=128", "--set", "hidden_size=64", "--set", "intermediate_size=96",
               "--set", "num_heads=4", "--set", "num_kv_heads=2"]) == 0
  return {"base": str(root / "base"), "pairs": write_pairs(root / "pairs.jsonl"),
          "root": root}


def dpo_flags(data_dir, **overrides):
  values = {"data.seq_len": 16, "data.batch_size": 8, "data.eval_fraction": 0.2,
            "data.data_dir": data_dir, "train.steps": 8, "train.log_every": 1,
            "train.eval_every": 4, "train.eval_batches": 2, "train.checkpoint_every": 2,
            "train.keep_checkpoints": 10, "optimizer.lr": 2e-3, "optimizer.warmup_steps": 1,
            "remat": "none"}
  values.update(overrides)
  return [f"--config.{k}={v}" for k, v in values.items()]


def dpo_train(workdir, zoo_base, arg="", wait=True, **overrides):
  config = f"configs/dpo.py:init_from={zoo_base['base']},files={zoo_base['pairs']}{arg}"
  return zoo_train(workdir, *dpo_flags(str(zoo_base["root"] / "data"), **overrides),
                   wait=wait, config=config)


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  timing = ("tokens_per_sec", "mfu", "first_step_seconds", "compile_seconds", "eval_seconds",
            "checkpoint_seconds")
  out = {}
  for r in rows:  # a checkpoint's time is a record of its own, after its step's
    out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in timing})
  return out


@pytest.mark.slow
def test_a_learnable_preference_is_learned(zoo_base, tmp_path):
  code, out, err = dpo_train(tmp_path, zoo_base, **{"train.steps": 40, "train.eval_every": 10})
  assert code == 0, err
  assert "prompts cut from the left" in err  # the truncation counts are reported
  rows = records(tmp_path)
  first, last = rows[1], rows[40]
  assert first["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
  for key in ("loss", "dpo_loss", "rewards_chosen", "rewards_rejected", "reward_margin",
              "reward_accuracy", "logps_chosen", "logps_rejected", "lr", "grad_norm"):
    assert key in first and key in last, key
  assert last["reward_accuracy"] == 1.0
  evals = [rows[s] for s in (10, 20, 30, 40)]
  assert evals[-1]["eval_reward_accuracy"] == 1.0
  assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0
  assert evals[-1]["eval_dpo_loss"] < evals[0]["eval_dpo_loss"]
  # the full model is exported, changed from the base
  x = np.array([[1, 20, 30, 40]])
  assert np.abs(zoo.load(str(tmp_path / "model")).logits(x)
                - zoo.load(zoo_base["base"]).logits(x)).max() > 1e-4


@pytest.fixture(scope="module")
def resume_references(zoo_base, tmp_path_factory):
  out = {}
  for kind, arg in (("full", ""), ("lora", ",rank=4,dropout=0.1")):
    workdir = tmp_path_factory.mktemp(f"dpo_{kind}")
    code, _, err = dpo_train(workdir, zoo_base, arg)
    assert code == 0, err
    out[kind] = (workdir, arg, records(workdir))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dpo_sigkill_then_resume_is_bit_exact(kind, resume_references, zoo_base, tmp_path):
  workdir, arg, reference = resume_references[kind]
  proc = dpo_train(tmp_path, zoo_base, arg, wait=False)
  wait_for_step(proc, tmp_path, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  code, out, err = dpo_train(tmp_path, zoo_base, arg)
  assert code == 0, err
  assert "resuming from the checkpoint" in out
  assert records(tmp_path) == reference  # every metric of every step, bit for bit
  if kind == "lora":  # adapters in zoo's and peft's formats; the checkpoints hold no base
    for name in ("adapter/adapter.safetensors", "adapter_peft/adapter_model.safetensors"):
      assert os.path.isfile(tmp_path / name)
    x = np.array([[1, 20, 30, 40]])
    plain = zoo.load(zoo_base["base"]).logits(x)
    adapted = zoo.load(zoo_base["base"], adapter=str(tmp_path / "adapter")).logits(x)
    assert np.abs(adapted - plain).max() > 1e-5
    np.testing.assert_allclose(
        zoo.load(zoo_base["base"], adapter=str(tmp_path / "adapter_peft")).logits(x), adapted,
        atol=1e-5, rtol=1e-5)
  else:
    assert os.path.isfile(tmp_path / "model" / "zoo.json")
  with open(tmp_path / "checkpoints" / "8" / "state" / "_METADATA") as f:
    keys = list(json.load(f)["tree_metadata"])
  assert not any("reference" in k for k in keys)


@pytest.mark.slow
def test_qlora_dpo_runs(zoo_base, tmp_path):
  code, _, err = dpo_train(tmp_path, zoo_base, ",rank=4,quantize=nf4",
                           **{"train.steps": 2, "train.eval_every": 2})
  assert code == 0, err
  assert os.path.isfile(tmp_path / "adapter_peft" / "adapter_model.safetensors")


def bad_jsonl(path, *records_):
  with open(path, "w") as f:
    for r in records_:
      f.write(json.dumps(r) + "\n")
  return str(path)


GOOD = {"prompt_ids": [1, 20], "chosen_ids": [5], "rejected_ids": [6]}


@pytest.mark.parametrize("case", ["missing_rejected", "empty_completion", "empty_text_completion",
                                  "does_not_fit", "unknown_loss", "reference_vocabulary",
                                  "reference_architecture", "label_smoothing_with_ipo"])
def test_bad_input_is_a_one_line_error_before_compiling(case, zoo_base, tmp_path, capsys):
  pairs, arg, extra = zoo_base["pairs"], "", []
  words = {"missing_rejected": "'rejected'", "empty_completion": "'chosen_ids' is empty",
           "empty_text_completion": "'chosen' is empty", "does_not_fit": "no room",
           "unknown_loss": "unknown dpo.loss", "reference_vocabulary": "vocabulary",
           "reference_architecture": "num_layers",
           "label_smoothing_with_ipo": "label_smoothing"}[case]
  if case == "missing_rejected":
    pairs = bad_jsonl(tmp_path / "p.jsonl", GOOD, {"prompt": "a", "chosen": "b"})
  elif case == "empty_completion":
    pairs = bad_jsonl(tmp_path / "p.jsonl", GOOD, dict(GOOD, chosen_ids=[]))
  elif case == "empty_text_completion":
    pairs = bad_jsonl(tmp_path / "p.jsonl", {"prompt": "a", "chosen": "", "rejected": "b"})
  elif case == "does_not_fit":
    extra = ["--config.data.max_prompt_len=40"]
  elif case == "unknown_loss":
    arg = ",loss=kto"
  elif case == "label_smoothing_with_ipo":
    arg = ",loss=ipo,label_smoothing=0.1"
  else:
    sets = ["--set", "vocab_size=256"] if case == "reference_vocabulary" else \
           ["--set", "num_layers=3", "--set", "vocab_size=128"]
    ref = str(tmp_path / "ref")
    assert main(["init", "tiny_llama", ref, "--set", "hidden_size=64", "--set",
                 "intermediate_size=96", "--set", "num_heads=4", "--set", "num_kv_heads=2",
                 *([] if "num_layers=3" in sets else ["--set", "num_layers=2"]), *sets]) == 0
    arg = f",reference={ref}"
  capsys.readouterr()
  config = f"configs/dpo.py:init_from={zoo_base['base']},files={pairs}{arg}"
  code = main(["train", "--config", config, "--workdir", str(tmp_path / "run"),
               *dpo_flags(str(tmp_path / "data")), *extra])
  err = [line for line in capsys.readouterr().err.strip().splitlines()
         if line.startswith("zoo") or "rror" in line]
  assert code == 2, err
  assert len(err) == 1 and words in err[0], err
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_simpo_with_a_reference_is_a_note(zoo_base, tmp_path, capsys):
  config = load_config(f"configs/dpo.py:init_from={zoo_base['base']},files={zoo_base['pairs']},"
                       f"loss=simpo,reference={zoo_base['base']}",
                       {"data.seq_len": 16, "data.batch_size": 8,
                        "data.data_dir": str(tmp_path / "data")})
  run = prepare(config, str(tmp_path / "run"))
  assert "note: dpo.loss simpo uses no reference" in capsys.readouterr().err
  trainer = build(run)
  assert trainer.reference is None and trainer.frozen == ()
