"""``rlhfkit eval``: run the eval suites, write eval.json + eval.html, print one line per metric.

    rlhfkit eval --model runs/ppo/final --baseline smollm2-135m-instruct \\
                 --suite helpful,truthful,harmless,tax --out runs/eval

Its options are generated from ``EvalConfig`` (rlhfkit/evals/runner.py) like every command's.
"""

from __future__ import annotations

import typer

from rlhfkit.errors import UserError
from rlhfkit.evals.runner import EvalConfig


def run_eval_command(cfg: EvalConfig) -> None:
    from rlhfkit.evals.report import summary_rows, write_report
    from rlhfkit.evals.runner import run_eval

    if not cfg.models:
        raise UserError("--model: name at least one model to evaluate (SPEC or NAME=SPEC)")
    results = run_eval(cfg)
    jp, hp = write_report(results, cfg.out)
    for r in summary_rows(results):
        vals = "  ".join(f"{v}={x:.4g}" for v, x in r["values"].items() if x is not None)
        typer.echo(f"{r['metric']:<36} {vals}")
    typer.echo(f"wrote {jp} and {hp}")
