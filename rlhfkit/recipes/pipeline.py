"""The RLHF loop on the built-in task, end to end — what ``make demo`` runs.

  0. prompts       the built-in task (rlhfkit/tasks): train prompts for learning, held-out eval
                   prompts only for judging
  1. sample        K answers per train prompt from the base model (the rollout backend)
  2. label         a labeler ranks each prompt's K answers (simulated: gold rubric + noise); with
                   rank_revisions also versions of them revised by the edits that keep their
                   words, so the RM sees answers that meet instructions the policy hardly ever
                   meets by itself, and with rank_edit_sets a second ranking of one answer beside
                   edits (all 19 kinds) that each fix one missed instruction
  3. SFT           best-of-K rejection sampling: the labeler's top answer of each prompt becomes
                   a demonstration (with revise_demos, edited by rule where an edit that keeps its
                   words satisfies an instruction it missed: rlhfkit/feedback/revise.py), and the
                   base model is fine-tuned on them
  4. RM            round r: a reward model, initialised from the SFT model, learns from all
                   rankings so far (round 1: the base model's answers, with rank_sft also the SFT
                   model's answers to fresh prompts, as InstructGPT; round r > 1 adds fresh
                   answers of the newest policy, ranked — iterated online RLHF, Bai et al. 2022)
  5. PPO           round r: PPO from the SFT model (also the KL reference) against RM r
                   (or RLOO, GRPO, DPO; or best-of-N: no training, RM r picks the best of N SFT samples)
  6. judge         every version answers the held-out prompts (greedy); the gold rubric judges:
                   mean gold score, instruction-following rate, win-rates with 95% intervals,
                   Elo and Bradley–Terry ratings; a self-contained HTML report with plots

Everything a stage produces stays in the run directory (samples, rankings, demonstrations,
models, metrics) and a finished stage is not redone when the pipeline is run again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhfkit.accel.memory import release_memory
from rlhfkit.config import RL_STAGES, PipelineConfig, PPOConfig, config_from_dict
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.data.records import Prompt, ranking_row
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.errors import UserError
from rlhfkit.feedback import rubric
from rlhfkit.feedback.labelers import GoldLabeler, SimulatedLabeler, SimulatedLabelerConfig
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.recipes.common import latest_checkpoint, read_metrics, report_to_trackers
from rlhfkit.recipes.pipeline_judge import compare, judge, ratings, render_summary, rm_means, run_suites, suite_list
from rlhfkit.rollout import SamplingParams, make_generator
from rlhfkit.tasks import load_task


def sample_answers(
    model_spec: str, prompts: list[Prompt], k: int, cfg: PipelineConfig, temperature: float, say=print
) -> list[dict]:
    """K answers per prompt from ``model_spec`` with ``cfg.rollout_backend``; one row per prompt."""
    loaded = load_causal_lm(model_spec)
    loaded.model.eval()
    generator = make_generator(loaded.model, loaded.tokenizer, cfg.rollout_backend, cfg.precision, say)
    ids = [encode_prompt(loaded.tokenizer, p.messages) for p in prompts]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=cfg.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = generator.generate(ids, params, n=k, progress=True)
    seconds = time.perf_counter() - t0
    del generator, loaded
    release_memory()
    new_tokens = sum(len(c.token_ids) for c in outs)
    say(f"sampled {len(outs)} answers from {model_spec} in {seconds:.0f} s ({new_tokens / seconds:.0f} new tokens/s)")
    rows = []
    for i, p in enumerate(prompts):
        mine = [c for c in outs if c.prompt_index == i]
        rows.append(
            {
                "id": p.meta.get("id", i),
                "prompt": p.text,
                "responses": [c.text.strip() for c in mine],
                "finished": [c.finish_reason == "stop" for c in mine],
            }
        )
    return rows


def candidates(prompts: list[Prompt], samples: list[dict], cfg: PipelineConfig) -> list[dict]:
    """What the labeler ranks: each prompt's K sampled answers, with ``cfg.rank_revisions`` (and a
    simulated or gold labeler) also rule-revised versions of them, up to 9 in all
    (:func:`rlhfkit.feedback.revise.with_revisions`). People rank only what the model wrote."""
    if not cfg.rank_revisions or cfg.labeler not in ("simulated", "gold"):
        return samples
    from rlhfkit.feedback.revise import with_revisions

    rows = []
    for p, row in zip(prompts, samples):
        responses, finished, revised_from = with_revisions(p, row["responses"], row["finished"])
        rows.append({**row, "responses": responses, "finished": finished, "revised_from": revised_from})
    return rows


def edit_set_rankings(prompts: list[Prompt], samples: list[dict], labeler) -> list[dict]:
    """With ``cfg.rank_edit_sets``: for each prompt, one of its sampled answers with rule edits that
    each fix one missed instruction (:func:`rlhfkit.feedback.revise.edit_set`), ranked by the
    labeler — rankings whose answers differ only in the instructions they follow."""
    from rlhfkit.feedback.revise import edit_set

    rows = []
    for p, row in zip(prompts, samples):
        texts = edit_set(p, row["responses"], row["finished"])
        if len(texts) >= 2:
            rk = labeler.rank(p, texts, [True] * len(texts))
            rows.append(ranking_row(p, rk, edit_set=True))
    return rows


def demonstrations(rankings: list[dict], samples: list[dict], prompts: list[Prompt], cfg: PipelineConfig) -> list[dict]:
    """The labeler's best answer of each prompt (best-of-K rejection sampling; with
    ``cfg.rank_revisions`` it may be a revised one); with ``cfg.revise_demos`` edited by rule where
    an edit that keeps the answer's words satisfies a missed instruction
    (:data:`rlhfkit.feedback.revise.SURFACE_EDITS`). Prompts whose best gold score is not above
    ``cfg.min_demo_score`` give none."""
    from rlhfkit.feedback.revise import SURFACE_EDITS, revise

    demos = []
    for p, rk, row in zip(prompts, rankings, samples):
        best = rk["responses"][rk["ranks"].index(0)]
        if not best or max(rk["meta"]["gold"]) <= cfg.min_demo_score:
            continue
        finished = dict(zip(row["responses"], row["finished"])).get(best, True)
        demo = {"prompt": rk["prompt"], "response": best}
        if cfg.revise_demos:
            rv = revise(p, best, finished, kinds=SURFACE_EDITS)
            demo.update(response=rv.text, original=best, edits=rv.edits, gold_before=rv.gold_before, gold=rv.gold_after)
        demos.append(demo)
    return demos


def read_run_config(run: str | Path) -> PipelineConfig:
    """The PipelineConfig a run directory was made with (its pipeline.json)."""
    path = Path(run) / "pipeline.json"
    if not path.exists():
        raise UserError(f"{run}: no pipeline.json (not a pipeline run directory)")
    raw = json.loads(path.read_text())
    if not isinstance(raw.get("sft"), dict):
        raise UserError(
            f"{path}: written by an older rlhfkit, before the stage settings were nested (sft: ..., "
            "ppo: ...); make the run again with this version"
        )
    return config_from_dict(PipelineConfig, raw, f"{path}: ")


def stage_config(cfg: PipelineConfig, stage, **where):
    """A stage's config as the pipeline runs it: the nested settings (``cfg.sft`` / ``.rm`` / ``.ppo``)
    with what the pipeline owns filled in — ``where`` (model, data, out, ...) and its precision and seed."""
    return dataclasses.replace(stage, precision=cfg.precision, **({"seed": cfg.seed} | where))


def ppo_config(
    cfg: PipelineConfig, sft_model: str, reward_model: str, out: str, round_: int, optimizer: str = "ppo"
) -> PPOConfig:
    """Round ``round_``'s config of an RL optimiser (``cfg.ppo``, ``cfg.a2c``, ``cfg.rloo`` or ``cfg.grpo``) from the
    SFT model against that round's reward model, generating with the pipeline's rollout_backend."""
    return stage_config(
        cfg,
        getattr(cfg, optimizer),
        model=sft_model,
        reward_model=reward_model,
        out=out,
        seed=cfg.seed + round_,
        rollout_backend=cfg.rollout_backend,
    )


def run_stage(cfg: PipelineConfig, train, stage_cfg, say=print) -> dict:
    """Run one training stage (``train_sft``, ``train_reward_model`` or ``train_ppo`` on its config)
    in a fresh child process (``cfg.fresh_process``) or in this one; returns the stage's result.

    Why a child: the stages of one process leave its memory fragmented. After SFT and the RM, the
    demo's PPO held GBs more, kept handing memory back and page-faulting it in again, and ran ~1.5x
    slower than in a process of its own (with bit-identical results). A child starts clean and gives
    everything back when it exits. Its output goes to this process's stdout/stderr (``say`` cannot
    cross processes: the child prints).
    """
    # a run killed mid-stage left checkpoints (every cfg.save_every steps): continue from the last
    ckpt = latest_checkpoint(Path(stage_cfg.out))
    stage_cfg = dataclasses.replace(
        stage_cfg, save_every=cfg.save_every, report_to=cfg.report_to, resume=ckpt is not None
    )
    if ckpt is not None:
        say(f"{stage_cfg.out}: resuming from {ckpt.name}")
    if not cfg.fresh_process:
        result = train(stage_cfg, say=say)
        release_memory()  # the stages share this process: each starts from what the last one freed
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            try:
                result = pool.submit(train, stage_cfg).result()
            except BrokenProcessPool:
                raise UserError(
                    f"the process training {stage_cfg.out} died (out of memory?); its last checkpoint and the "
                    "finished stages are kept: run the same command again to continue from them"
                ) from None
    shutil.rmtree(Path(stage_cfg.out) / "checkpoints", ignore_errors=True)  # finished: out/model is what stays
    return result


def die_with_parent(parent: int) -> None:
    """In a stage's child process: die when the pipeline's process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that running the command again never races an orphaned stage."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child finishes its stage on its own
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


@dataclass
class Run:
    """What the phases of one pipeline run share: its settings, directory, prompts, labeler, clock."""

    cfg: PipelineConfig
    out: Path
    train_all: list[Prompt]
    order: list[int]  # a seeded permutation of the train split: round r takes the next slice of it
    held_out: list[Prompt]
    labeler: GoldLabeler | SimulatedLabeler
    say: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, key: str):
        t = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t

    def prompts_of_round(self, r: int) -> list[Prompt]:
        cfg = self.cfg
        lo = 0 if r == 0 else cfg.train_prompts + (r - 1) * cfg.round_prompts
        hi = cfg.train_prompts if r == 0 else lo + cfg.round_prompts
        return [self.train_all[i % len(self.train_all)] for i in self.order[lo:hi]]


def start_run(cfg: PipelineConfig, say) -> Run:
    """Check the settings, record them in OUT/pipeline.json, pick the prompts, make the labeler."""
    if not 2 <= cfg.k <= 9:
        raise UserError(f"k={cfg.k}: labelers rank K = 2..9 answers per prompt")
    if cfg.best_of_n < 1:
        raise UserError(f"best_of_n={cfg.best_of_n}: expected N >= 1 samples per prompt (1 = plain SFT sampling)")
    suite_list(cfg)
    report_to_trackers(cfg.report_to)  # a tracker that is not installed stops the run now, not after sampling
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(asdict(cfg), indent=2))
    train_all, eval_all = load_task("train"), load_task("eval")
    order = random.Random(cfg.seed).sample(range(len(train_all)), len(train_all))
    held_out = eval_all[: cfg.eval_prompts] if cfg.eval_prompts else eval_all
    labeler = (
        GoldLabeler()
        if cfg.labeler == "gold"
        else SimulatedLabeler(
            SimulatedLabelerConfig(
                temperature=cfg.labeler_temperature,
                length_bias=cfg.labeler_length_bias,
                random_share=cfg.labeler_random_share,
                seed=cfg.seed,
            )
        )
    )
    return Run(cfg, out, train_all, order, held_out, labeler, say)


def label_round(run: Run, r: int, policy: str) -> tuple[list[dict], list[dict], list[dict]]:
    """1.-2. K answers per prompt from ``policy``, ranked by the labeler; kept in round{r}/.
    Returns (rankings, what was ranked: the samples, with rank_revisions plus revisions,
    and with rank_edit_sets the rankings of edit sets, one per prompt that has one)."""
    cfg, rdir = run.cfg, run.out / f"round{r}"
    rdir.mkdir(exist_ok=True)
    prompts = run.prompts_of_round(r)
    if not (rdir / "samples.jsonl").exists():
        write_jsonl(rdir / "samples.jsonl", sample_answers(policy, prompts, cfg.k, cfg, cfg.temperature, run.say))
    samples = candidates(prompts, read_jsonl(rdir / "samples.jsonl"), cfg)
    if not (rdir / "rankings.jsonl").exists() and cfg.labeler in ("human", "mix"):
        # people rank in `rlhfkit serve --run OUT`; resumable: the tasks and rankings stay in the store
        from rlhfkit.feedback.human import rank_round_by_people
        from rlhfkit.feedback.store import Store

        rows = rank_round_by_people(
            Store.for_run(run.out, cfg.db or None),
            f"round{r}",
            prompts,
            samples,
            cfg.human_rankings or len(samples),
            cfg.human_timeout,
            cfg.human_poll,
            fallback=run.labeler if cfg.labeler == "mix" else None,
            say=run.say,
        )
        write_jsonl(rdir / "rankings.jsonl", rows)
    if not (rdir / "rankings.jsonl").exists():
        rows = []
        for p, row in zip(prompts, samples):
            rk = run.labeler.rank(p, row["responses"], row["finished"])
            extra = {"revised_from": row["revised_from"]} if "revised_from" in row else {}
            rows.append(ranking_row(p, rk, **extra))
        write_jsonl(rdir / "rankings.jsonl", rows)
    edits = rdir / "edit_rankings.jsonl"
    if cfg.rank_edit_sets and cfg.labeler in ("simulated", "gold") and not edits.exists():
        write_jsonl(edits, edit_set_rankings(prompts, read_jsonl(rdir / "samples.jsonl"), run.labeler))
    edit_rows = read_jsonl(edits) if cfg.rank_edit_sets and edits.exists() else []
    return read_jsonl(rdir / "rankings.jsonl"), samples, edit_rows


def sft_phase(run: Run, rankings: list[dict], samples: list[dict]) -> tuple[list[dict], str]:
    """3. Best-of-K rejection sampling: the labeler's top answer of each round-0 prompt (revised by
    rule with revise_demos) is a demonstration; SFT of the base model on them. Returns (demos, model)."""
    cfg = run.cfg
    demos = demonstrations(rankings, samples, run.prompts_of_round(0), cfg)
    write_jsonl(run.out / "round0" / "demos.jsonl", demos)
    run.say(
        f"{len(demos)} demonstrations (the top-ranked answer, gold > {cfg.min_demo_score}) from {len(rankings)} prompts"
    )
    if cfg.revise_demos and demos:
        before, after = (sum(d[key] for d in demos) / len(demos) for key in ("gold_before", "gold"))
        run.say(
            f"{sum(bool(d['edits']) for d in demos)} of them revised by rule: mean gold {before:+.3f} -> {after:+.3f}"
        )
    sft = run.out / "sft"
    if not (sft / "model" / "config.json").exists():
        from rlhfkit.recipes.sft import train_sft

        demos_file = str(run.out / "round0" / "demos.jsonl")
        run_stage(cfg, train_sft, stage_config(cfg, cfg.sft, model=cfg.model, data=demos_file, out=str(sft)), run.say)
    return demos, str(sft / "model")


def rm_phase(run: Run, r: int, sft_model: str, rankings: list[dict]) -> dict:
    """4. Round r's reward model, from the SFT model, on all rankings so far; returns its held-out
    pairwise accuracy before and after training (against the labeler and the gold rubric)."""
    cfg, rdir = run.cfg, run.out / f"round{r}"
    if not (rdir / "rm" / "model" / "config.json").exists():
        from rlhfkit.recipes.reward import train_reward_model

        write_jsonl(rdir / "rm_data.jsonl", rankings)
        rm_cfg = stage_config(cfg, cfg.rm, model=sft_model, data=str(rdir / "rm_data.jsonl"), out=str(rdir / "rm"))
        run_stage(cfg, train_reward_model, rm_cfg, run.say)
    evals = [m for m in read_metrics(rdir / "rm") if "eval_accuracy" in m]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    return {
        "round": r,
        "rankings": len(rankings),
        "before": first.get("eval_accuracy"),
        "after": last.get("eval_accuracy"),
        "gold_before": first.get("eval_gold_accuracy"),
        "gold_after": last.get("eval_gold_accuracy"),
    }


def ppo_phase(run: Run, r: int, sft_model: str, optimizer: str = "ppo") -> str:
    """5. Round r's PPO (or with optimizer=a2c A2C, with optimizer=rloo/grpo the critic-free RLOO or
    GRPO) from the SFT model (also the KL reference) against round r's reward model; the gold
    rubric's mean score of each iteration's rollouts is logged beside the RM's (gold_score)."""
    rdir = run.out / f"round{r}"
    if not (rdir / optimizer / "model" / "config.json").exists():
        from rlhfkit.recipes.a2c import train_a2c
        from rlhfkit.recipes.critic_free import train_grpo, train_rloo
        from rlhfkit.recipes.ppo import train_ppo

        train = {"ppo": train_ppo, "a2c": train_a2c, "rloo": train_rloo, "grpo": train_grpo}[optimizer]
        stage_cfg = ppo_config(run.cfg, sft_model, str(rdir / "rm" / "model"), str(rdir / optimizer), r, optimizer)
        run_stage(run.cfg, functools.partial(train, rollout_metrics=rubric.gold_metrics), stage_cfg, run.say)
    return str(rdir / optimizer / "model")


def dpo_phase(run: Run, r: int, sft_model: str) -> str:
    """5'. (optimizer=dpo) Round r's DPO from the SFT model (also its reference) on the rankings the
    round's reward model learned from (round{r}/rm_data.jsonl): the same preferences, without the RM."""
    rdir = run.out / f"round{r}"
    if not (rdir / "dpo" / "model" / "config.json").exists():
        from rlhfkit.recipes.dpo import train_dpo

        data = str(rdir / "rm_data.jsonl")
        run_stage(
            run.cfg,
            train_dpo,
            stage_config(run.cfg, run.cfg.dpo, model=sft_model, data=data, out=str(rdir / "dpo")),
            run.say,
        )
    return str(rdir / "dpo" / "model")


BEST_OF_N = "bon"  # the name of best-of-N versions: bon1, bon2, ... (round r's reward model picks)


def is_best_of_n(name: str) -> bool:
    """A best-of-N version (``bon{r}``): the SFT model with a reward model, not a trained model."""
    return name.startswith(BEST_OF_N) and name[len(BEST_OF_N) :].isdigit()


def best_of_n_answers(
    cfg: PipelineConfig, sft_model: str, rm_dir: str, prompts: list[Prompt], n: int, say=print
) -> tuple[list[dict], dict]:
    """One answer per prompt: reward model ``rm_dir``'s best of ``n`` samples of ``sft_model`` (at the
    pipeline's ``temperature``, that of the answers the RM learned from: its candidates are the kind
    it was trained to rank), as ``rlhfkit eval --best-of`` answers. Rows as :func:`sample_answers`'s,
    with the picked answer's RM score and those of all n samples; and the RM's mean score of all
    samples against the picked ones."""
    from rlhfkit.algos.best_of_n import best_index
    from rlhfkit.evals.helpful import hf_reward_fn

    rows = sample_answers(sft_model, prompts, n, cfg, cfg.temperature, say)
    reward = hf_reward_fn(rm_dir)
    asked = [p.messages for p, row in zip(prompts, rows) for _ in row["responses"]]
    all_scores = reward(asked, [text for row in rows for text in row["responses"]])  # (B * n,), prompt-major
    picked, at = [], 0
    for row in rows:
        scores, at = all_scores[at : at + len(row["responses"])], at + len(row["responses"])
        j = best_index(scores)
        picked.append(
            {**row, "responses": [row["responses"][j]], "finished": [row["finished"][j]], "rm_score": scores[j]}
            | {"rm_scores": scores}  # of all n samples
        )
    del reward
    release_memory()
    stats = {
        "rm_mean_samples": sum(all_scores) / len(all_scores),
        "rm_mean_picked": sum(r["rm_score"] for r in picked) / len(picked),
    }
    return picked, stats


def best_of_n_phase(run: Run, r: int, sft_model: str) -> str:
    """5''. (optimizer=best_of_n) No training: version bon{r} answers each held-out prompt with round
    r's reward model's best of ``cfg.best_of_n`` samples of the SFT model (eval/bon{r}.jsonl, judged
    with the other versions; round{r}/bon/bon.json says what it is). KL(bon || SFT) <= log N − (N−1)/N
    (Stiennon et al. 2020): the same gold-score-vs-KL axis as PPO's, at no training cost. Returns the
    SFT model (the policy that samples; a later round samples from it too)."""
    from rlhfkit.algos.best_of_n import kl_bound

    cfg, rdir = run.cfg, run.out / f"round{r}"
    meta, answers = rdir / "bon" / "bon.json", run.out / "eval" / f"{BEST_OF_N}{r}.jsonl"
    if not (meta.exists() and answers.exists()):
        rm = str(rdir / "rm" / "model")
        rows, stats = best_of_n_answers(cfg, sft_model, rm, run.held_out, cfg.best_of_n, run.say)
        answers.parent.mkdir(exist_ok=True)
        write_jsonl(answers, rows)
        meta.parent.mkdir(exist_ok=True)
        info = {"policy": sft_model, "reward_model": rm, "n": cfg.best_of_n, "temperature": cfg.temperature}
        meta.write_text(json.dumps(info | {"kl_bound": kl_bound(cfg.best_of_n)} | stats, indent=2))
    return sft_model


def ilql_phase(run: Run, r: int, sft_model: str) -> str:
    """5''. (optimizer=ilql) Round r's ILQL from the SFT model on the same rankings as DPO (rank -> reward):
    offline, no reward model and no sampling; the saved model generates with its heads when judged."""
    rdir = run.out / f"round{r}"
    if not (rdir / "ilql" / "model" / "config.json").exists():
        from rlhfkit.recipes.ilql import train_ilql

        data = str(rdir / "rm_data.jsonl")
        stage_cfg = stage_config(run.cfg, run.cfg.ilql, model=sft_model, data=data, out=str(rdir / "ilql"))
        run_stage(run.cfg, train_ilql, stage_cfg, run.say)
    return str(rdir / "ilql" / "model")


def judge_phase(run: Run, versions: dict[str, str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """6. Every version answers the held-out prompts (greedy, kept in eval/NAME.jsonl); the gold rubric
    judges them, and the newest reward model scores them too — a policy that climbs the RM while the
    gold score stalls is over-optimising it. Returns (answers, judged) per version."""
    cfg = run.cfg
    (run.out / "eval").mkdir(exist_ok=True)
    answers, judged = {}, {}
    for name, spec in versions.items():
        path = run.out / "eval" / f"{name}.jsonl"
        if not path.exists():
            write_jsonl(path, sample_answers(spec, run.held_out, 1, cfg, 0.0, run.say))
        answers[name] = read_jsonl(path)
        judged[name] = judge(run.held_out, answers[name])
    rms = [r for r in range(1, cfg.rounds + 1) if (run.out / f"round{r}" / "rm" / "model" / "config.json").exists()]
    if rms:
        for name, mean in rm_means(str(run.out / f"round{rms[-1]}" / "rm" / "model"), run.held_out, answers).items():
            judged[name] |= {"rm_mean": mean, "rm_round": rms[-1]}
    return answers, judged


def summarize(
    run: Run,
    versions: dict[str, str],
    judged: dict[str, dict],
    demos: list[dict],
    rm_accuracy: list[dict],
    suites: dict | None,
    t_start: float,
) -> dict:
    """The run's summary.json: every version's gold results, win-rates, ratings, RM accuracy, PPO curves."""
    cfg, final = run.cfg, list(versions)[-1]
    best_of_ns = [n for n in versions if is_best_of_n(n)]
    summary = {
        "prompts": {
            "train_round0": cfg.train_prompts,
            "per_later_round": cfg.round_prompts,
            "held_out": len(run.held_out),
            "k": cfg.k,
        },
        "demonstrations": len(demos),
        "versions": {n: {k: v for k, v in j.items() if k != "scores"} for n, j in judged.items()},
        "final": final,
        "final_vs_sft": compare(judged[final]["scores"], judged["sft"]["scores"]),
        "sft_vs_base": compare(judged["sft"]["scores"], judged["base"]["scores"]),
        "ratings": ratings(judged),
        "rm_accuracy": rm_accuracy,
        "training": {  # best-of-N trains nothing
            n: read_metrics(Path(p).parent) for n, p in versions.items() if n not in ("base", "sft", *best_of_ns)
        },
        "seconds": {
            **{k: round(v, 1) for k, v in run.timings.items()},
            "total": round(time.perf_counter() - t_start, 1),
        },
    }
    if suites is not None:
        from rlhfkit.evals.report import summary_rows

        summary["eval_suites"] = {"rows": summary_rows(suites), "report": "eval/suites.html"}
    if is_best_of_n(final):  # no training: the analytic bound, and what the RM saw
        info = json.loads((run.out / f"round{final[len(BEST_OF_N) :]}" / "bon" / "bon.json").read_text())
        summary["best_of_n"] = info
        summary["final_kl_to_sft"] = info["kl_bound"]
    elif final != "sft":
        last = summary["training"][final][-1] if summary["training"][final] else {}
        summary["final_kl_to_sft"] = last.get("kl")  # PPO's KL per response; DPO logs none
    return summary


def run_pipeline(cfg: PipelineConfig, say=print) -> dict:
    """The main job, phase by phase (the module docstring numbers them); returns the summary."""
    t_start = time.perf_counter()
    run = start_run(cfg, say)
    say(
        f"built-in task: {cfg.train_prompts} train prompts (+{cfg.round_prompts} per later round), "
        f"{len(run.held_out)} held-out prompts"
    )
    with run.timed("sample_and_label"):
        rankings0, samples0, edit_rankings0 = label_round(run, 0, cfg.model)
    with run.timed("sft"):
        demos, sft_model = sft_phase(run, rankings0, samples0)
    versions = {"base": cfg.model, "sft": sft_model}

    # rounds of iterated online RLHF: rank answers of the newest policy, RM on all rankings, PPO (or DPO) from SFT
    all_rankings, policy, rm_accuracy = rankings0 + edit_rankings0, sft_model, []
    for r in range(1, cfg.rounds + 1):
        (run.out / f"round{r}").mkdir(exist_ok=True)
        with run.timed(f"round{r}_sample_and_label"):
            if cfg.round_prompts > 0 and (r > 1 or cfg.rank_sft):  # fresh answers of the newest policy
                rankings, _, edit_rankings = label_round(run, r, policy)
                all_rankings += rankings + edit_rankings
        with run.timed(f"round{r}_rm"):
            rm_accuracy.append(rm_phase(run, r, sft_model, all_rankings))
        if cfg.optimizer in RL_STAGES:
            with run.timed(f"round{r}_{cfg.optimizer}"):
                policy = versions[f"{cfg.optimizer}{r}"] = ppo_phase(run, r, sft_model, cfg.optimizer)
        elif cfg.optimizer == "dpo":
            with run.timed(f"round{r}_dpo"):
                policy = versions[f"dpo{r}"] = dpo_phase(run, r, sft_model)
        elif cfg.optimizer == "best_of_n":
            with run.timed(f"round{r}_best_of_n"):
                versions[f"{BEST_OF_N}{r}"] = best_of_n_phase(run, r, sft_model)
        elif cfg.optimizer == "ilql":
            with run.timed(f"round{r}_ilql"):
                policy = versions[f"ilql{r}"] = ilql_phase(run, r, sft_model)

    with run.timed("judge"):
        answers, judged = judge_phase(run, versions)
    suites = None
    if cfg.eval_suites:  # 7. optional: the eval suites (TruthfulQA, toxicity, CrowS-Pairs, perplexity)
        with run.timed("eval_suites"):
            suites = run_suites(cfg, {n: s for n, s in versions.items() if not is_best_of_n(n)}, run.out / "eval")
    summary = summarize(run, versions, judged, demos, rm_accuracy, suites, t_start)
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    from rlhfkit.recipes.pipeline_report import write_report

    write_report(run.out / "report.html", summary, run.held_out, answers)
    say(render_summary(summary))
    say(f"report: {run.out / 'report.html'}")
    return summary
