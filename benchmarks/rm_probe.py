"""What did the reward model learn of the gold rubric? Its pairwise accuracy, split by what makes
the two answers of a pair differ under the rubric (rlhfkit/feedback/rubric.py):

- ``instructions``  the share of instructions followed differs, the penalties are equal
                    (e.g. both finished, one uses the asked end phrase);
- ``penalties``     the same instructions followed, the penalties differ (unfinished,
                    degenerate, too short, off topic, toxic);
- ``both``          both differ.

Per instruction kind: the pairs whose two answers differ in that kind only (all else equal).
An RM that scores well on ``penalties`` and near 50 % on ``instructions`` has learned to reward
finishing, not following instructions: PPO against it cannot raise the instruction rate.

Usage (after `make demo`):
    python benchmarks/rm_probe.py --rm runs/demo/round1/rm/model --data runs/demo/round1/rm_data.jsonl

Held-out rankings are the RM's own held-out split (the pipeline's eval_fraction 0.15, seed 0);
``--train`` also reports the training rankings (fit against generalisation). ``--probe-set FILE``
also probes a fixed set that no RM variant trains on, the same for all of them: K answers of a
policy (``--policy``, e.g. the SFT model; sampled once at ``--probe-temperature``, PPO's rollout
temperature, and kept in FILE) to the built-in task's held-out eval prompts, gold-ranked. That
is what PPO's reward model has to judge: the policy's own answers to prompts it never saw. Writes
benchmarks/results/<tag>.json and .md. The finished flag of each answer is recovered from the
stored gold score (the rubric with finished=True or False, whichever matches).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from common import write_result

from rlhfkit.data.loaders import load_records
from rlhfkit.data.tokenize import encode_ranking
from rlhfkit.feedback import rubric
from rlhfkit.models.heads import load_reward_model
from rlhfkit.recipes.common import split_eval
from rlhfkit.recipes.reward import score_groups
from rlhfkit.tasks import load_task


def components(prompt, response: str, gold_total: float | None) -> rubric.GoldScore:
    """The rubric's score of one answer, with the finished flag that reproduces the stored total."""
    done = rubric.score(prompt, response, True)
    if gold_total is None or abs(done.total - gold_total) < 1e-9:
        return done
    cut = rubric.score(prompt, response, False)
    return cut if abs(cut.total - gold_total) < 1e-9 else done


def pair_class(a: rubric.GoldScore, b: rubric.GoldScore) -> str | None:
    """How two answers differ under the rubric; None when their totals are equal (no gold order)."""
    if abs(a.total - b.total) < 1e-9:
        return None
    pen_a, pen_b = sum(a.penalties.values()), sum(b.penalties.values())
    inst = abs(a.followed - b.followed) > 1e-9
    pen = abs(pen_a - pen_b) > 1e-9
    return "both" if inst and pen else "instructions" if inst else "penalties"


def probe(rm, tok, records, prompts_by_id, max_length: int, batch_prompts: int = 8) -> dict:
    """Pairwise accuracy by class and kind, and the best-of-K picks: the instruction rate (share of
    all instructions followed) of the answer the RM scores highest, against the average answer
    (a random pick) and the rubric's best — how much of the policy's own spread the RM can reach,
    which bounds what PPO against it can gain at this KL."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # class -> [correct, pairs]
    picks = {"rm_pick": 0.0, "random_pick": 0.0, "gold_pick": 0.0, "instructions": 0}
    for i in range(0, len(records), batch_prompts):
        chunk = records[i : i + batch_prompts]
        groups = [(encode_ranking(tok, r, max_length), list(r.ranks)) for r in chunk]
        with torch.no_grad():
            scores, _, group = score_groups(rm, groups, tok.pad_token_id, torch.device("cpu"))
        for gi, rec in enumerate(chunk):
            prompt = prompts_by_id.get(rec.meta.get("prompt_id"))
            gold = rec.meta.get("gold")
            if prompt is None or not isinstance(gold, list):
                continue
            s = scores[group == gi].tolist()
            comp = [components(prompt, r, g) for r, g in zip(rec.responses, gold)]
            n_inst = len(comp[0].instructions)
            if n_inst:
                followed = [sum(c.passed) for c in comp]
                picks["rm_pick"] += followed[max(range(len(s)), key=s.__getitem__)]
                picks["random_pick"] += sum(followed) / len(followed)
                picks["gold_pick"] += followed[max(range(len(comp)), key=lambda j: comp[j].total)]
                picks["instructions"] += n_inst
            for x in range(len(comp)):
                for y in range(x + 1, len(comp)):
                    cls = pair_class(comp[x], comp[y])
                    if cls is None:
                        continue
                    better, worse = (x, y) if comp[x].total > comp[y].total else (y, x)
                    right = int(s[better] > s[worse])
                    for key in ("all", cls):
                        counts[key][0] += right
                        counts[key][1] += 1
                    if cls == "instructions":
                        differ = [
                            a.kind for a, b in zip(comp[x].instructions, comp[y].instructions) if a.passed != b.passed
                        ]
                        if len(differ) == 1:
                            counts[f"kind:{differ[0]}"][0] += right
                            counts[f"kind:{differ[0]}"][1] += 1
                    if cls == "penalties":
                        kinds = sorted(set(comp[x].penalties) ^ set(comp[y].penalties))
                        if len(kinds) == 1:
                            counts[f"penalty:{kinds[0]}"][0] += right
                            counts[f"penalty:{kinds[0]}"][1] += 1
    out = {k: {"accuracy": c / n if n else float("nan"), "pairs": n} for k, (c, n) in sorted(counts.items())}
    n = max(1, picks["instructions"])
    out["best_of_k"] = {k: picks[k] / n for k in ("rm_pick", "random_pick", "gold_pick")} | {
        "instructions": picks["instructions"]
    }
    return out


def make_probe_set(path: Path, policy: str, k: int, temperature: float) -> None:
    """K answers of ``policy`` to every held-out eval prompt, ranked by the gold rubric (no noise;
    prompts whose answers all score the same are left out)."""
    from rlhfkit.config import PipelineConfig
    from rlhfkit.data.records import ranking_row
    from rlhfkit.feedback.labelers import GoldLabeler
    from rlhfkit.recipes.pipeline import sample_answers, write_jsonl

    if not policy:
        raise SystemExit(f"--probe-set {path} does not exist: give --policy MODEL to sample it")
    prompts = load_task("eval")
    rows = sample_answers(policy, prompts, k, PipelineConfig(), temperature)
    out = []
    for p, row in zip(prompts, rows):
        rk = GoldLabeler().rank(p, row["responses"], row["finished"])
        if len(set(rk.ranks)) < 2:
            continue  # all K answers score the same: no pair to probe
        out.append(ranking_row(p, rk))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, out)


def markdown(result: dict) -> str:
    splits = [s for s in ("held_out", "train", "probe_set") if s in result]
    lines = [
        "# Reward model probe: what it learned of the gold rubric",
        "",
        f"Produced by `python benchmarks/rm_probe.py {result['args']}`. "
        f"RM `{result['rm']}`, rankings `{result['data']}` ({result['rankings']['held_out']} held-out, "
        f"{result['rankings']['train']} training"
        + (
            f"; probe set `{result['probe_set_file']}`, {result['rankings']['probe_set']} rankings"
            if "probe_set" in result
            else ""
        )
        + "). Accuracy = share of pairs with different gold scores that the RM "
        "orders like the rubric (50 % = chance).",
        "",
        "pairs differing in | " + " | ".join(f"{s.replace('_', '-')} accuracy (pairs)" for s in splits),
        "--- | " + " | ".join("---" for _ in splits),
    ]
    keys = sorted({k for s in splits for k in result[s] if k != "best_of_k"}, key=lambda k: (k.count(":"), k))
    for k in keys:
        cells = []
        for s in splits:
            v = result[s].get(k)
            cells.append(f"{v['accuracy']:.1%} ({v['pairs']})" if v else "–")
        lines.append(f"{k} | " + " | ".join(cells))
    lines += [
        "",
        "Best of K: the instruction rate (share of all instructions followed) of one answer per prompt, "
        "picked by the RM (its top score), at random (the mean over the K) or by the rubric (its best total).",
        "",
        "split | RM pick | random pick | rubric pick | instructions",
        "--- | --- | --- | --- | ---",
    ]
    for s in splits:
        b = result[s].get("best_of_k")
        if b:
            lines.append(
                f"{s.replace('_', '-')} | {b['rm_pick']:.1%} | {b['random_pick']:.1%} | {b['gold_pick']:.1%} "
                f"| {b['instructions']}"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", required=True, help="reward model directory (rlhfkit rm / the pipeline's roundN/rm/model)")
    ap.add_argument(
        "--data", required=True, help="the rankings it was trained on (the pipeline's roundN/rm_data.jsonl)"
    )
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-length",
        type=int,
        default=384,
        help="truncation of prompt + answer, as the RM was trained (the pipeline's max_length)",
    )
    ap.add_argument("--train", action="store_true", help="also probe the training rankings")
    ap.add_argument(
        "--probe-set", default="", help="rankings file of the fixed probe set (made with --policy when missing)"
    )
    ap.add_argument(
        "--policy", default="", help="with --probe-set: the model whose answers to the held-out eval prompts form it"
    )
    ap.add_argument("--probe-k", type=int, default=4)
    ap.add_argument("--probe-temperature", type=float, default=0.7)
    ap.add_argument("--tag", default="rm_probe")
    args = ap.parse_args()
    if args.probe_set and not Path(args.probe_set).exists():
        make_probe_set(Path(args.probe_set), args.policy, args.probe_k, args.probe_temperature)

    records = load_records(args.data, "ranking").records
    tr, ev = split_eval(len(records), args.eval_fraction, args.seed)
    prompts = {p.meta["id"]: p for split in ("train", "eval") for p in load_task(split)}
    rm, tok = load_reward_model(args.rm)
    rm.eval()
    result = {
        "rm": args.rm,
        "data": args.data,
        "args": " ".join(
            f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k}"
            for k, v in vars(args).items()
            if v is not False
        ),
        "rankings": {"held_out": len(ev), "train": len(tr)},
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result["held_out"] = probe(rm, tok, [records[i] for i in ev], prompts, args.max_length)
        if args.train:
            result["train"] = probe(rm, tok, [records[i] for i in tr], prompts, args.max_length)
        if args.probe_set:
            fixed = load_records(args.probe_set, "ranking").records
            result["probe_set"] = probe(rm, tok, fixed, prompts, args.max_length)
            result["rankings"]["probe_set"] = len(fixed)
            result["probe_set_file"] = args.probe_set
    write_result(args.tag, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
