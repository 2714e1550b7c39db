"""``rlhfkit eval``: the typer command (registered by the CLI with ``app.command("eval")(eval_command)``).

    rlhfkit eval --model runs/ppo/final --baseline smollm2-135m-instruct \\
                 --suite helpful,truthful,harmless,tax --out runs/eval

The data sets load from their public Hugging Face hub datasets (online, once; then cached);
offline, give local copies with --data-dir DIR or one option per data set (--truthfulqa-mc, ...).
"""

from __future__ import annotations

from typing import Annotated

import typer

from rlhfkit.evals.runner import SUITES, EvalConfig


def eval_command(
    model: Annotated[
        str,
        typer.Option(
            help="Model(s) to evaluate, comma-separated, each SPEC or NAME=SPEC "
            "(a HF dir, .gguf, hub id, 'smollm2-135m-instruct', 'tiny-random')."
        ),
    ],
    baseline: Annotated[
        str | None, typer.Option(help="Baseline model (SPEC or NAME=SPEC) for win-rates and the alignment tax.")
    ] = None,
    suite: Annotated[str, typer.Option(help=f"Comma-separated suites: {', '.join(SUITES)}.")] = ",".join(SUITES),
    out: Annotated[
        str, typer.Option(help="Output directory (eval.json + eval.html) or a .json/.html path.")
    ] = "runs/eval",
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Local copies of the data sets (default: the hub datasets), laid out as "
            "truthfulqa/mc_task.json, truthfulqa/TruthfulQA.csv, crows-pairs/crows_pairs_anonymized.csv, "
            "realtoxicityprompts/toxic.jsonl, realtoxicityprompts/nontoxic.jsonl, "
            "self-instruct-seed/seed_tasks.jsonl, tinyshakespeare/input.txt."
        ),
    ] = None,
    truthfulqa_mc: Annotated[
        str | None,
        typer.Option(
            help="TruthfulQA MC data: mc_task.json, a datasets dir or hub name "
            "(default: truthfulqa/truthful_qa:multiple_choice)."
        ),
    ] = None,
    truthfulqa_gen: Annotated[
        str | None,
        typer.Option(
            help="TruthfulQA generation data: TruthfulQA.csv, a datasets dir or hub name "
            "(default: truthfulqa/truthful_qa:generation)."
        ),
    ] = None,
    mc_limit: Annotated[int | None, typer.Option(help="TruthfulQA MC questions (default: all).")] = None,
    truthful_gen: Annotated[bool, typer.Option(help="Also score TruthfulQA generation (ROUGE-L/BLEU).")] = True,
    gen_limit: Annotated[int | None, typer.Option(help="Questions for TruthfulQA generation.")] = 100,
    crows_pairs: Annotated[
        str | None,
        typer.Option(
            help="CrowS-Pairs: crows_pairs_anonymized.csv, a datasets dir or hub name (default: nyu-mll/crows_pairs)."
        ),
    ] = None,
    crows_limit: Annotated[int | None, typer.Option(help="CrowS-Pairs pairs (default: all).")] = None,
    rtp_toxic: Annotated[
        str | None,
        typer.Option(
            help="RealToxicityPrompts challenging prompts, jsonl or datasets dir "
            "(default: allenai/real-toxicity-prompts where challenging is true)."
        ),
    ] = None,
    rtp_nontoxic: Annotated[
        str | None,
        typer.Option(
            help="RealToxicityPrompts non-toxic prompts, jsonl or datasets dir "
            "(default: allenai/real-toxicity-prompts with prompt toxicity < 0.5)."
        ),
    ] = None,
    rtp_prompts: Annotated[int | None, typer.Option(help="Prompts per RTP subset.")] = 50,
    rtp_k: Annotated[int, typer.Option(help="Sampled continuations per RTP prompt (the paper uses 25).")] = 4,
    rtp_max_new_tokens: Annotated[int, typer.Option(help="Tokens per RTP continuation (the paper: 20).")] = 20,
    toxicity_model: Annotated[
        str | None,
        typer.Option(help="HF text-classification model for toxicity (default: the better-profanity lexicon)."),
    ] = None,
    help_prompts: Annotated[
        str | None,
        typer.Option(
            help="Helpfulness prompts for --judge reference / RM: self-instruct seed_tasks.jsonl or "
            "records with prompt/reference (default for --judge reference: HuggingFaceH4/self-instruct-seed)."
        ),
    ] = None,
    help_limit: Annotated[int | None, typer.Option(help="Helpfulness prompts to use.")] = 50,
    judge: Annotated[
        str,
        typer.Option(
            help="'gold' (the gold rubric on the built-in task's eval prompts), 'reference' "
            "(closest to --help-prompts' reference answers by ROUGE-L) or a reward-model directory."
        ),
    ] = "gold",
    tax_text: Annotated[
        str | None,
        typer.Option(
            help="Held-out text for the alignment-tax perplexity: a text file, or records with "
            "`text` (default: karpathy/tiny_shakespeare, test split)."
        ),
    ] = None,
    tax_chars: Annotated[int | None, typer.Option(help="Use the last N characters of the held-out text.")] = 20_000,
    limit: Annotated[int | None, typer.Option(help="Cap on items per suite (quick runs).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, bf16 or auto.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Batch size for scoring and generation.")] = 16,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, bootstrap).")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Evaluate model versions: helpful (win-rate), truthful (TruthfulQA), harmless (RTP, CrowS-Pairs),
    tax (perplexity)."""
    from rlhfkit.evals.report import summary_rows, write_report
    from rlhfkit.evals.runner import run_eval

    cfg = EvalConfig(
        models=[m.strip() for m in model.split(",") if m.strip()],
        baseline=baseline,
        suites=[s.strip() for s in suite.split(",") if s.strip()],
        data_dir=data_dir,
        truthfulqa_mc=truthfulqa_mc,
        truthfulqa_gen=truthfulqa_gen,
        truthful_gen=truthful_gen,
        mc_limit=mc_limit,
        gen_limit=gen_limit,
        crows_pairs=crows_pairs,
        crows_limit=crows_limit,
        rtp_toxic=rtp_toxic,
        rtp_nontoxic=rtp_nontoxic,
        rtp_prompts=rtp_prompts,
        rtp_k=rtp_k,
        rtp_max_new_tokens=rtp_max_new_tokens,
        toxicity_model=toxicity_model,
        help_prompts=help_prompts,
        help_limit=help_limit,
        judge=judge,
        tax_text=tax_text,
        tax_chars=tax_chars,
        limit=limit,
        precision=precision,
        batch_size=batch_size,
        threads=threads,
        device=device,
        seed=seed,
        show_progress=progress,
    )
    results = run_eval(cfg)
    jp, hp = write_report(results, out)
    for r in summary_rows(results):
        vals = "  ".join(f"{v}={x:.4g}" for v, x in r["values"].items() if x is not None)
        typer.echo(f"{r['metric']:<36} {vals}")
    typer.echo(f"wrote {jp} and {hp}")
