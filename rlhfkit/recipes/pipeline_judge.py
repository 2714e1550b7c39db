"""Step 6 of the pipeline, the judging: the gold rubric's summary of a version's answers
(``judge``), win-rates with 95% intervals (``compare``), Elo and Bradley–Terry ratings (``ratings``),
a reward model's mean score (``rm_means``), the evaluation suites on every version (``suite_list``,
``run_suites``) and the summary's markdown (``render_summary``). ``recipes/pipeline.py`` runs them;
the benchmarks that judge answers (ppo_ceiling, rs_ceiling, optimizers, overoptimisation) use them too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhfkit.accel.memory import release_memory
from rlhfkit.config import PipelineConfig
from rlhfkit.data.records import Prompt
from rlhfkit.errors import UserError
from rlhfkit.feedback import rubric


def judge(prompts: list[Prompt], rows: list[dict]) -> dict:
    """Gold-rubric summary of one answer per prompt."""
    scores = [rubric.score(p, r["responses"][0], r["finished"][0]) for p, r in zip(prompts, rows)]
    return {
        "gold_mean": sum(s.total for s in scores) / len(scores),
        "instruction_rate": rubric.instruction_following_rate(scores, "instruction"),
        "prompt_rate": rubric.instruction_following_rate(scores, "prompt"),
        "scores": [s.total for s in scores],
    }


def rm_means(rm_dir: str, prompts: list[Prompt], answers: dict[str, list[dict]]) -> dict[str, float]:
    """A reward model's mean score on each version's answers (one answer per prompt)."""
    from rlhfkit.evals.helpful import hf_reward_fn

    reward = hf_reward_fn(rm_dir)
    means = {}
    for name, rows in answers.items():
        scores = reward([p.messages for p in prompts], [r["responses"][0] for r in rows])
        means[name] = sum(scores) / len(scores)
    del reward
    release_memory()
    return means


def compare(a: list[float], b: list[float]) -> dict:
    """Win-rate of version a over version b on the same prompts (ties count half), with a 95% CI."""
    from rlhfkit.algos.ratings import win_rate

    outcomes = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    wr = win_rate(outcomes, seed=0)
    return {"win_rate": wr.rate, "ci95": [wr.lower, wr.upper], "wins": wr.wins, "ties": wr.ties, "losses": wr.losses}


def suite_list(cfg: PipelineConfig) -> list[str]:
    """The eval suites asked for, checked before any training starts."""
    from rlhfkit.evals.runner import SUITES

    suites = [s.strip() for s in cfg.eval_suites.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise UserError(f"eval_suites: unknown {', '.join(bad)} (choose from {', '.join(SUITES)})")
    if suites and cfg.eval_data_dir and not Path(cfg.eval_data_dir).is_dir():
        raise UserError(
            f"eval_data_dir={cfg.eval_data_dir}: no such directory (leave it empty to load the "
            "eval data sets from the Hugging Face hub)"
        )
    if suites:  # the data is read now (from the hub once, then its cache), not found missing after training
        from rlhfkit.evals.runner import EvalConfig, load_eval_data

        load_eval_data(
            EvalConfig(
                models=[],
                suites=suites,
                data_dir=cfg.eval_data_dir or None,
                limit=cfg.eval_limit or None,
                show_progress=False,
            )
        )
    return suites


def run_suites(cfg: PipelineConfig, versions: dict[str, str], where: Path) -> dict:
    """``rlhfkit eval`` on every version with SFT as the baseline; kept in eval/suites.{json,html}
    (a finished evaluation is not redone)."""
    from rlhfkit.evals.report import write_report
    from rlhfkit.evals.runner import EvalConfig, run_eval

    suites = suite_list(cfg)
    path = where / "suites.json"
    if path.exists():
        return json.loads(path.read_text())
    limit = cfg.eval_limit or None
    results = run_eval(
        EvalConfig(
            models=[f"{n}={spec}" for n, spec in versions.items() if n != "sft"],
            baseline=f"sft={versions['sft']}",
            suites=suites,
            data_dir=cfg.eval_data_dir,
            limit=limit,
            mc_limit=limit,
            crows_limit=limit,
            gen_limit=min(limit or 100, 100),
            rtp_prompts=min(limit or 50, 50),
            precision=cfg.precision,
            rollout_backend=cfg.rollout_backend,
            seed=cfg.seed,
        )
    )
    write_report(results, where / "suites.json", title="rlhfkit pipeline: eval suites per version")
    return json.loads(path.read_text())


def ratings(judged: dict[str, dict]) -> dict:
    """Elo and Bradley–Terry (with bootstrap 95% intervals) from gold-judged comparisons: every
    pair of versions meets on every held-out prompt; the higher gold score wins, equal is a tie."""
    from rlhfkit.algos.ratings import bradley_terry_bootstrap, elo_ratings

    names = list(judged)
    games = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for x, y in zip(judged[a]["scores"], judged[b]["scores"]):
                games.append((a, b, 1.0 if x > y else 0.5 if x == y else 0.0))
    random.Random(0).shuffle(games)  # online Elo depends on the order: a fixed shuffle, not version order
    bt = bradley_terry_bootstrap(games, anchor="sft", n_boot=300, seed=0)
    elo = elo_ratings(games)
    return {n: {"bt": bt[n].rating, "ci95": [bt[n].lower, bt[n].upper], "elo": elo[n]} for n in names}


def render_summary(s: dict) -> str:
    rm = next((v["rm_round"] for v in s["versions"].values() if v.get("rm_mean") is not None), None)
    lines = [
        "",
        "version | gold score | instructions followed | answers following all | Bradley-Terry (95% CI)"
        + (f" | round {rm} RM score" if rm else ""),
        "--- | --- | --- | --- | ---" + (" | ---" if rm else ""),
    ]
    for name, v in s["versions"].items():
        rt = s["ratings"][name]
        lines.append(
            f"{name} | {v['gold_mean']:+.3f} | {v['instruction_rate']:.1%} | {v['prompt_rate']:.1%} | "
            f"{rt['bt']:.0f} ({rt['ci95'][0]:.0f}–{rt['ci95'][1]:.0f})"
            + (f" | {v['rm_mean']:+.3f}" if rm and v.get("rm_mean") is not None else " | –" if rm else "")
        )
    for key, label in (("sft_vs_base", "SFT vs base"), ("final_vs_sft", f"{s['final']} vs SFT")):
        if key == "final_vs_sft" and s["final"] == "sft":
            continue  # no optimiser (optimizer=none): SFT against itself says nothing
        w = s[key]
        lines.append(
            f"{label} on {s['prompts']['held_out']} held-out prompts: win-rate {w['win_rate']:.1%} "
            f"(95% CI {w['ci95'][0]:.1%}–{w['ci95'][1]:.1%}; {w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"
        )
    if s.get("best_of_n"):
        b = s["best_of_n"]
        lines.append(
            f"{s['final']}: the round's RM picks the best of N = {b['n']} SFT samples (T = {b['temperature']}); "
            f"KL({s['final']} || SFT) <= log N - (N-1)/N = {b['kl_bound']:.3f} nats; RM score of the picked answers "
            f"{b['rm_mean_picked']:+.3f} vs {b['rm_mean_samples']:+.3f} over all samples"
        )
    elif s.get("final_kl_to_sft") is not None:
        lines.append(f"KL({s['final']} || SFT) per response at the last PPO iteration: {s['final_kl_to_sft']:.3f} nats")
    for rm in s["rm_accuracy"]:
        if rm["after"] is not None:
            gold = (
                f" (against the gold rubric {rm['gold_before']:.3f} -> {rm['gold_after']:.3f})"
                if rm.get("gold_before") is not None and rm.get("gold_after") is not None
                else ""
            )
            lines.append(
                f"round {rm['round']} reward model ({rm['rankings']} rankings): held-out pairwise accuracy "
                f"{rm['before']:.3f} -> {rm['after']:.3f}{gold}"
            )
    lines.append(f"time (s): {s['seconds']}")
    return "\n".join(lines)
