"""PPO on several processes: ``torchrun --nproc_per_node 2`` (gloo on CPU) takes the step one process takes.

What is compared: the per-iteration metrics (losses, KL, scores, β, gradient norm, PPO-ptx loss)
and the final policy and critic weights of a 1-process and a 2-process run with the same global
batch and seed, within 1e-5 (fp32; relative for metrics above 1, such as an explained variance of -88).

Sampling is the real engine's: each prompt has its own seed (run seed, iteration, its index in
the data set) and each of its samples its own stream (``SamplingParams.seed``,
``rollout.sampling.stream_key``), so the 2 processes, each sampling its half of the prompts, sample
the tokens the 1 process samples for all of them. Everything else — scoring with a ``reward_fn``,
the no-grad forwards, the global advantage whitening, minibatches, gradient sums, the KL
controller, metrics, checkpoints and the final save — is the real code too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhfkit.recipes.common import read_metrics

WORKER = r"""
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import rlhfkit.recipes.ppo as ppo
from rlhfkit.config import PPOConfig

out, model, expect, corpus, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
make = ppo.make_accelerator


def checked(cfg):  # inside each worker: there really are `expect` processes, and this is one of them
    acc = make(cfg)
    assert acc.num_processes == expect == int(os.environ.get("WORLD_SIZE", "1")), acc.num_processes
    Path(f"{out}.rank{acc.process_index}").write_text(str(acc.num_processes))
    return acc


log_and_checkpoint = ppo.log_and_checkpoint


def crash_after_first(*args, **kwargs):  # mode 'crash': die right after iteration 1's checkpoint
    last = log_and_checkpoint(*args, **kwargs)
    raise SystemExit(3)


ppo.make_accelerator = checked
if mode == "crash":
    ppo.log_and_checkpoint = crash_after_first
cfg = PPOConfig(
    model=model, critic_model=model, out=out, batch_size=4, samples_per_prompt=2, max_new_tokens=6,
    temperature=1.0, lr=3e-4, kl_coef=0.1, precision="fp32", limit=16, max_steps=2, missing_eos_penalty=-1.0,
    num_minibatches=2, ppo_epochs=2, grad_accum=2, warmup_steps=0, save_every=1,
    ptx_data=corpus, ptx_coef=0.5, ptx_batch_size=2, ptx_length=16, resume=mode == "resume",
)
ppo.train_ppo(cfg, reward_fn=lambda p, r, f: [len(x) / 10 for x in r], say=lambda *a: None)
"""


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {
        **load_file(str(path / "model" / "model.safetensors")),
        **{f"critic.{k}": v for k, v in load_file(str(path / "critic" / "model.safetensors")).items()},
    }


def test_ppo_two_processes_equal_one_process(tiny_path, tmp_path):
    """2 processes x half the prompts == 1 process x all of them: the same metrics and weights; and
    a 2-process run killed after iteration 1 and resumed ends as the uninterrupted one."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "worker.py").write_text(WORKER)
    root = str(Path(__file__).resolve().parents[1])  # the worker script lives in tmp_path: import this checkout
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    worker = [str(tmp_path / "worker.py")]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]

    def run(launcher: list[str], name: str, n: int, mode: str = "full") -> subprocess.CompletedProcess:
        args = [*launcher, *worker, str(tmp_path / name), tiny_path, str(n), str(corpus), mode]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    one = run([sys.executable], "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(torchrun, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("two.rank*")) == ["two.rank0", "two.rank1"]
    rows = [read_metrics(tmp_path / r) for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 2
    keys = ["score", "score_raw", "kl", "kl_k3", "entropy", "reward", "beta", "explained_variance"]
    keys += ["value_mean", "return_mean", "response_length", "no_eos_fraction", "lr"]
    keys += ["policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio_mean", "grad_norm", "ptx_loss"]
    for key in keys:
        a, b = [r[key] for r in rows[0]], [r[key] for r in rows[1]]
        assert max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)) < 1e-5, (key, a, b)  # relative above 1
    assert rows[0][0]["policy_loss"] != rows[0][1]["policy_loss"]  # the runs did something
    assert len({r["score_raw"] for r in rows[0]}) == 2  # real samples: their lengths differ between iterations
    w_one, w_two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w_one.keys() == w_two.keys()
    assert max((w_one[k] - w_two[k]).abs().max().item() for k in w_one) < 1e-5
    assert (tmp_path / "two" / "checkpoints").exists()

    crashed = run(torchrun, "resumed", 2, "crash")
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "model").exists(), crashed.stderr[-3000:]
    assert len(read_metrics(tmp_path / "resumed")) == 1
    resumed = run(torchrun, "resumed", 2, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_metrics(tmp_path / "resumed")
    for key in keys:
        a, b = [r[key] for r in rows[1]], [r[key] for r in again]
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
    w_resumed = _weights(tmp_path / "resumed")
    assert max((w_two[k] - w_resumed[k]).abs().max().item() for k in w_two) < 1e-6
