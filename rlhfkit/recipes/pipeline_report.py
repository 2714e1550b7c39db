"""The pipeline's self-contained HTML report: tables, plots (base64 PNG) and answers side by side.

Plots: per PPO round, RM score, gold score and KL per iteration (the proxy reward against the
gold judge: with kl_coef = 0 the over-optimisation shows as RM score rising while gold falls);
reward-model accuracy per round; win-rates against SFT and Bradley–Terry ratings per version.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from rlhfkit.data.records import Prompt


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _ppo_plot(name: str, rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, key, title in zip(
        axes,
        ("score", "gold_score", "kl"),
        ("reward-model score", "gold score (held-in prompts)", "KL to SFT (nats / response)"),
    ):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(steps, [y if y is not None else float("nan") for y in ys], marker=".")
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    return _png(fig)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _bars(
    names: list[str], values: list[float], lows: list[float], highs: list[float], title: str, ref: float | None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    ax.bar(names, values, yerr=err, capsize=4, color="#4c78a8")
    if ref is not None:
        ax.axhline(ref, color="grey", lw=1, ls="--")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def write_report(
    path: Path, summary: dict, held_out: list[Prompt], answers: dict[str, list[dict]], n_examples: int = 8
) -> None:
    esc = html.escape
    names = list(summary["versions"])
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{v['gold_mean']:+.3f}</td><td>{v['instruction_rate']:.1%}</td><td>{v['prompt_rate']:.1%}</td>"
        f"<td>{summary['ratings'][n]['bt']:.0f} "
        f"({summary['ratings'][n]['ci95'][0]:.0f}–{summary['ratings'][n]['ci95'][1]:.0f})</td>"
        f"<td>{summary['ratings'][n]['elo']:.0f}</td>"
        f"<td>{'–' if v.get('rm_mean') is None else format(v['rm_mean'], '+.3f')}</td></tr>"
        for n, v in summary["versions"].items()
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit pipeline report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top}table{border-collapse:collapse}pre{white-space:pre-wrap;margin:0;font-size:12px}"
        "</style></head><body>",
        "<h1>rlhfkit pipeline report</h1>",
        f"<p>{summary['prompts']['held_out']} held-out prompts of the built-in task, answered greedily by every "
        "version "
        "and judged by the gold rubric (verifiable instructions minus penalties).</p>",
        "<h2>Versions</h2><table><tr><th>version</th><th>gold score</th><th>instructions followed</th>"
        "<th>answers following all</th><th>Bradley–Terry (95% CI)</th><th>Elo</th><th>newest RM's score</th></tr>",
        rows,
        "</table>",
    ]
    for key, label in (("sft_vs_base", "SFT vs base"), ("final_vs_sft", f"{summary['final']} vs SFT")):
        if key == "final_vs_sft" and summary["final"] == "sft":
            continue  # no optimiser (optimizer=none): SFT against itself says nothing (as render_summary)
        w = summary[key]
        parts.append(
            f"<p><b>{esc(label)}</b>: win-rate {w['win_rate']:.1%} (95% CI {w['ci95'][0]:.1%}–{w['ci95'][1]:.1%}; "
            f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses; ties count half)</p>"
        )
    if summary.get("best_of_n"):
        b = summary["best_of_n"]
        parts.append(
            f"<p>{esc(summary['final'])}: the round's reward model picks the best of N = {b['n']} SFT samples; "
            f"KL({esc(summary['final'])} ‖ SFT) ≤ log N − (N−1)/N = {b['kl_bound']:.3f} nats.</p>"
        )
    elif summary.get("final_kl_to_sft") is not None:
        parts.append(
            f"<p>KL({esc(summary['final'])} ‖ SFT) at the last PPO iteration: {summary['final_kl_to_sft']:.3f} nats "
            "per response.</p>"
        )
    rt = summary["ratings"]
    parts.append("<h2>Ratings</h2>")
    parts.append(
        _bars(
            names,
            [rt[n]["bt"] for n in names],
            [rt[n]["ci95"][0] for n in names],
            [rt[n]["ci95"][1] for n in names],
            "Bradley–Terry rating (SFT = 1000), 95% bootstrap CI",
            1000.0,
        )
    )
    for n, rows_ in summary.get("training", {}).items():
        if rows_ and not n.startswith(("dpo", "ilql")):  # PPO, RLOO, GRPO: score and KL per iteration
            parts.append(f"<h2>{esc(n)}: training</h2>" + _ppo_plot(n, [r for r in rows_ if "score" in r]))
    accs = [a for a in summary.get("rm_accuracy", []) if a.get("after") is not None]
    if accs:
        fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        parts.append(
            "<h2>Reward model per round</h2><p>Held-out rankings: accuracy against the labeler's order, and against "
            "the gold rubric behind it (pairs the rubric scores "
            "differently).</p><table><tr><th>round</th><th>rankings</th>"
            "<th>accuracy before</th><th>after</th><th>gold before</th><th>gold after</th></tr>"
            + "".join(
                f"<tr><td>{a['round']}</td><td>{a['rankings']}</td><td>{fmt(a['before'])}</td><td>{fmt(a['after'])}</td>"
                f"<td>{fmt(a.get('gold_before'))}</td><td>{fmt(a.get('gold_after'))}</td></tr>"
                for a in accs
            )
            + "</table>"
        )
    ev = summary.get("eval_suites")
    if ev:
        head = "".join(f"<th>{esc(n)}</th>" for n in names if n != "base")
        body = "".join(
            f"<tr><td>{esc(r['metric'])}</td><td>{'↑' if r['higher_is_better'] else '↓'}</td>"
            + "".join(f"<td>{_fmt(r['values'].get(n))}</td>" for n in names if n != "base")
            + "</tr>"
            for r in ev["rows"]
        )
        parts.append(
            f"<h2>Eval suites (SFT = baseline)</h2><p>Full report with plots: <a href='{esc(ev['report'])}'>"
            f"{esc(ev['report'])}</a>.</p><table><tr><th>metric</th><th>better</th>{head}</tr>{body}</table>"
        )
    parts.append(
        "<h2>Sample answers (held-out prompts)</h2><table><tr><th>prompt</th>"
        + "".join(f"<th>{esc(n)}</th>" for n in names)
        + "</tr>"
    )
    for i, p in enumerate(held_out[:n_examples]):
        cells = "".join(f"<td><pre>{esc(answers[n][i]['responses'][0])}</pre></td>" for n in names)
        parts.append(f"<tr><td><pre>{esc(p.text)}</pre></td>{cells}</tr>")
    parts.append("</table></body></html>")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
