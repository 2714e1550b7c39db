"""Check rlhfkit's DPO loss and metrics against TRL 1.16's ``DPOTrainer`` on one batch (fp32, CPU).

The same batch (3 pairs of different lengths, right-padded, [chosen..., rejected...]) goes through
both: TRL's own collator (``DataCollatorForPreference``) must build exactly our ``collate`` tensors;
TRL's ``compute_ref_log_probs`` must give our reference log-probs; then ``DPOTrainer._compute_loss``,
fed *our* reference log-probs (``precompute_ref_log_probs``), must give our ``dpo_loss`` and the
metrics rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected, for ``loss_type`` sigmoid and ipo (TRL 1.16 has no label smoothing in sigmoid:
our conservative DPO is checked by hand in tests/test_dpo.py instead). Tolerance 1e-5 (relative
above 1). The policy is the tiny-random model with noise added to its weights, so the policy and
reference differ and the numbers are not trivial.

Run it with the TRL venv's Python (TRL is never a dependency of rlhfkit)::

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0 transformers==5.23.0 accelerate==1.15.0 datasets trl==1.16.0
    /work/trl-venv/bin/python benchmarks/dpo_trl_check.py          # exit 0: all equal

tests/test_dpo.py runs it when ``TRL_VENV`` names that venv. It prints a table and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
PAIRS = [  # (prompt, chosen, rejected): different lengths, so padding and length-normalisation matter
    ("How do I boil an egg?", "Put it in boiling water for nine minutes, then cool it.", "Eggs are from chickens."),
    ("Name a colour.", "Blue.", "I would rather not name any colour at all today."),
    ("What is 2 + 2?", "4", "5, or maybe 22 if you write the digits next to each other."),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="HF model directory (default: rlhfkit's tiny-random)")
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    sys.path.insert(0, str(ROOT))
    from rlhfkit.algos.dpo import dpo_loss, sequence_logprobs
    from rlhfkit.data.tokenize import Encoded, collate
    from rlhfkit.models.loading import tiny_random_dir

    model_dir = args.model or str(tiny_random_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))

    # the batch: TRL's collator and ours
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c) + [tok.eos_token_id], "rejected_ids": ids(r) + [tok.eos_token_id]}
        for p, c, r in PAIRS
    ]
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    seqs = [
        Encoded(e["prompt_ids"] + e[k], len(e["prompt_ids"])) for k in ("chosen_ids", "rejected_ids") for e in examples
    ]
    ours = collate(seqs, tok.pad_token_id)
    rows = [("batch tensors equal", 0.0)]
    for a, b in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("completion_mask", "loss_mask")):
        assert torch.equal(theirs[a], ours[b]), (a, theirs[a], ours[b])

    def logps(model):
        logits = model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).logits
        return sequence_logprobs(logits, ours["input_ids"], ours["loss_mask"]).chunk(2)

    with torch.no_grad():
        ref_chosen, ref_rejected = logps(ref)
        pol_chosen, pol_rejected = logps(policy)
    lengths = ours["loss_mask"].sum(1).chunk(2)

    failed = []
    for loss_type in ("sigmoid", "ipo"):
        with tempfile.TemporaryDirectory() as tmp:
            config = DPOConfig(
                output_dir=tmp, beta=args.beta, loss_type=[loss_type], report_to=[], use_cpu=True, bf16=False
            )
            dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
            trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset, processing_class=tok)
            batch = {k: v.clone() for k, v in theirs.items()}
            trl_ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_chosen, ref_rejected  # ours
            trainer.precompute_ref_logps = True
            trainer.model.train()
            with torch.no_grad():
                trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False).item()
            m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        d = dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, args.beta, 0.0, loss_type, *lengths)
        pairs = [
            ("ref logps/chosen (TRL's reference pass)", trl_ref[0], ref_chosen),
            ("ref logps/rejected (TRL's reference pass)", trl_ref[1], ref_rejected),
            ("loss", trl_loss, d.loss.mean()),
            ("rewards/chosen", m["rewards/chosen"], d.chosen_rewards.mean()),
            ("rewards/rejected", m["rewards/rejected"], d.rejected_rewards.mean()),
            ("rewards/accuracies", m["rewards/accuracies"], d.accuracy.mean()),
            ("rewards/margins", m["rewards/margins"], d.margin.mean()),
            ("logps/chosen", m["logps/chosen"], pol_chosen.mean()),
            ("logps/rejected", m["logps/rejected"], pol_rejected.mean()),
        ]
        for name, a, b in pairs:
            a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
            diff = ((a - b).abs() / b.abs().clamp(min=1.0)).max().item()
            rows.append((f"{loss_type}: {name} = {b.mean().item():.6f}", diff))
            if diff > TOL:
                failed.append(f"{loss_type}: {name}: TRL {a.tolist()} vs ours {b.tolist()}")

    print(f"rlhfkit DPO vs TRL {trl.__version__} DPOTrainer (beta={args.beta}, fp32, {len(PAIRS)} pairs)\n")
    print("| quantity (ours) | max difference |\n|---|---:|")
    for name, diff in rows:
        print(f"| {name} | {diff:.1e} |")
    print("\nFAILED:\n" + "\n".join(failed) if failed else f"\nall within {TOL:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
