"""Results -> ``eval.json`` + a self-contained ``eval.html`` (tables, plots as base64 PNG).

Plots: per-suite bars across versions; win-rate vs the baseline with its 95% CI; the
distribution of per-prompt max toxicity per version. The HTML has no external references.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path

# (suite, label, getter, higher_is_better) -- what the summary table and bars show
METRICS = [
    ("truthful", "TruthfulQA MC1", lambda r: r["truthful"]["mc"]["mc1"], True),
    ("truthful", "TruthfulQA MC2", lambda r: r["truthful"]["mc"]["mc2"], True),
    ("truthful", "TruthfulQA gen ROUGE-L acc", lambda r: r["truthful"]["gen"]["rouge_l_acc"], True),
    ("truthful", "TruthfulQA gen BLEU acc", lambda r: r["truthful"]["gen"]["bleu_acc"], True),
    ("harmless", "RTP toxic: exp. max toxicity", lambda r: r["harmless"]["rtp_toxic"]["expected_max_toxicity"], False),
    ("harmless", "RTP toxic: toxicity prob.", lambda r: r["harmless"]["rtp_toxic"]["toxicity_probability"], False),
    (
        "harmless",
        "RTP non-toxic: exp. max toxicity",
        lambda r: r["harmless"]["rtp_nontoxic"]["expected_max_toxicity"],
        False,
    ),
    (
        "harmless",
        "RTP non-toxic: toxicity prob.",
        lambda r: r["harmless"]["rtp_nontoxic"]["toxicity_probability"],
        False,
    ),
    ("harmless", "CrowS-Pairs % stereotype", lambda r: r["harmless"]["crows_pairs"]["pct_stereotype"], False),
    ("tax", "Perplexity (held-out)", lambda r: r["tax"]["perplexity"], False),
]


def _get(fn, r):
    try:
        return float(fn(r))
    except (KeyError, TypeError):
        return None


def summary_rows(results: dict) -> list[dict]:
    """One row per metric: {metric, suite, higher_is_better, values: {version: value}}."""
    rows = []
    for suite, label, fn, hib in METRICS:
        vals = {v: _get(fn, results["models"][v]) for v in results["versions"]}
        if any(x is not None for x in vals.values()):
            rows.append({"suite": suite, "metric": label, "higher_is_better": hib, "values": vals})
    for name, h in (results.get("helpful") or {}).items():
        rows.append(
            {
                "suite": "helpful",
                "metric": f"win-rate vs {results['baseline']}",
                "higher_is_better": True,
                "values": {v: (h["win_rate"] if v == name else None) for v in results["versions"]},
            }
        )
    return rows


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(results: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict[str, str] = {}
    versions = results["versions"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = [r for r in summary_rows(results) if r["suite"] != "helpful"]
    if rows:
        ncol = min(4, len(rows))
        nrow = math.ceil(len(rows) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
        for ax, r in zip(axes.flat, rows):
            vals = [r["values"][v] if r["values"][v] is not None else np.nan for v in versions]
            ax.bar(range(len(versions)), vals, color=[colors[i % len(colors)] for i in range(len(versions))])
            ax.set_xticks(range(len(versions)), versions, rotation=20, fontsize=8)
            ax.set_title(r["metric"] + (" (↑)" if r["higher_is_better"] else " (↓)"), fontsize=9)
            finite = [v for v in vals if not np.isnan(v)]
            if finite and min(finite) >= 0:
                ax.set_ylim(0, max(finite) * 1.18 if max(finite) > 0 else 1)
            for i, v in enumerate(vals):
                if not np.isnan(v):
                    ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        for ax in list(axes.flat)[len(rows) :]:
            ax.axis("off")
        fig.tight_layout()
        out["suites"] = _png(fig)
    helpful = results.get("helpful") or {}
    if helpful:
        names = list(helpful)
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(names)))
        wr = [helpful[n]["win_rate"] for n in names]
        lo = [helpful[n]["win_rate"] - helpful[n]["ci95"][0] for n in names]
        hi = [helpful[n]["ci95"][1] - helpful[n]["win_rate"] for n in names]
        ax.barh(range(len(names)), wr, xerr=[lo, hi], capsize=4, color=colors[1])
        ax.scatter(
            [helpful[n]["lc_win_rate"] for n in names],
            range(len(names)),
            marker="D",
            color="k",
            zorder=3,
            label="length-controlled",
        )
        ax.axvline(0.5, color="gray", ls="--", lw=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"win-rate vs {results['baseline']} (95% bootstrap CI)")
        ax.legend(fontsize=8, loc="lower right")
        out["win_rate"] = _png(fig)
    tox = [
        (v, s) for s in ("rtp_toxic", "rtp_nontoxic") for v in versions if s in results["models"][v].get("harmless", {})
    ]
    if tox:
        fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), squeeze=False)
        for j, s in enumerate(("rtp_toxic", "rtp_nontoxic")):
            ax = axes[0, j]
            data = [(v, results["models"][v]["harmless"][s]["max_scores"]) for v in versions if (v, s) in tox]
            bins = np.linspace(0, 1, 11)
            for i, (v, xs) in enumerate(data):
                ax.hist(xs, bins=bins, alpha=0.55, label=v, color=colors[i % len(colors)])
            ax.axvline(0.5, color="gray", ls="--", lw=1)
            ax.set_title(
                f"{'challenging' if s == 'rtp_toxic' else 'non-toxic'} prompts: max toxicity per prompt", fontsize=9
            )
            ax.set_xlabel("toxicity score")
            ax.legend(fontsize=8)
        fig.tight_layout()
        out["toxicity"] = _png(fig)
    return out


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def html_report(results: dict, title: str = "rlhfkit evaluation") -> str:
    versions = results["versions"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0 1.4em}"
        "td,th{border:1px solid #ccc;padding:3px 9px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Versions: {', '.join(html.escape(v) for v in versions)}"
        + (f"; baseline <b>{html.escape(results['baseline'])}</b>" if results.get("baseline") else "")
        + f". Suites: {', '.join(results['config']['suites'])}. Wall time {results.get('wall_seconds')} s.</p>",
    ]
    if results.get("note"):
        parts.append(f"<p><i>{html.escape(str(results['note']))}</i></p>")
    srows = summary_rows(results)
    parts.append("<h2>Summary</h2>")
    parts.append(
        _table(
            ["metric", "better"] + versions,
            [[r["metric"], "↑" if r["higher_is_better"] else "↓"] + [r["values"][v] for v in versions] for r in srows],
        )
    )
    imgs = plots(results)
    if "suites" in imgs:
        parts.append(f"<h2>Per-suite results across versions</h2><img src='data:image/png;base64,{imgs['suites']}'>")
    if results.get("helpful"):
        parts.append("<h2>Helpfulness: win-rate vs the baseline</h2>")
        hr = [
            [
                n,
                h["judge"],
                h["n"],
                h["win_rate"],
                f"[{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}]",
                h["lc_win_rate"],
                f"{h['wins']}/{h['ties']}/{h['losses']}",
                h["length_diff_words"],
            ]
            for n, h in results["helpful"].items()
        ]
        parts.append(
            _table(
                [
                    "model",
                    "judge",
                    "prompts",
                    "win-rate",
                    "95% CI",
                    "length-controlled",
                    "W/T/L",
                    "length diff (words, M-B)",
                ],
                hr,
            )
        )
        if "win_rate" in imgs:
            parts.append(f"<img src='data:image/png;base64,{imgs['win_rate']}'>")
        bo = results.get("best_of")
        if bo:
            parts.append(
                f"<p>Best-of-N: each evaluated model answered with the reward model's best of N = {bo['n']} "
                f"samples (temperature {bo['temperature']}; {html.escape(str(bo['reward_model']))}); "
                f"KL bound log N − (N−1)/N = {bo['kl_bound']:.3f} nats.</p>"
            )
        gold = [(n, h) for n, h in results["helpful"].items() if "gold_score_model" in h]
        if gold:
            parts.append(
                _table(
                    ["model", "gold score", "baseline gold score", "instr. following", "baseline instr. following"]
                    + (["best-of N", "KL bound"] if bo else []),
                    [
                        [n, h["gold_score_model"], h["gold_score_baseline"]]
                        + [h["instruction_following_model"], h["instruction_following_baseline"]]
                        + ([bo["n"], bo["kl_bound"]] if bo else [])
                        for n, h in gold
                    ],
                )
            )
        for n, h in results["helpful"].items():
            for ex in h.get("examples", [])[:2]:
                parts.append(
                    f"<details><summary>{html.escape(n)} example (outcome {ex['outcome']})</summary>"
                    f"<pre>PROMPT: {html.escape(ex['prompt'])}\n\nMODEL: {html.escape(ex['model'])}\n\n"
                    f"BASELINE: {html.escape(ex['baseline'])}</pre></details>"
                )
    if "toxicity" in imgs:
        scorer = next(
            (
                results["models"][v]["harmless"]["toxicity_scorer"]
                for v in versions
                if "harmless" in results["models"][v]
            ),
            "",
        )
        parts.append(f"<h2>Toxicity distributions</h2><p>Scorer: {html.escape(scorer)}.</p>")
        parts.append(f"<img src='data:image/png;base64,{imgs['toxicity']}'>")
    crows = [
        (v, results["models"][v]["harmless"]["crows_pairs"]["by_bias_type"])
        for v in versions
        if "crows_pairs" in results["models"][v].get("harmless", {})
    ]
    if crows:
        types = sorted(crows[0][1])
        parts.append("<h2>CrowS-Pairs by bias type (% stereotype; 0.5 = unbiased)</h2>")
        parts.append(
            _table(
                ["bias type", "pairs"] + [v for v, _ in crows],
                [[t, crows[0][1][t]["n"]] + [c[t]["pct_stereotype"] for _, c in crows] for t in types],
            )
        )
    if results.get("alignment_tax"):
        parts.append("<h2>Alignment tax (perplexity on held-out text)</h2>")
        parts.append(
            _table(
                ["model", "perplexity", "baseline perplexity", "tax (ppl ratio - 1)"],
                [[n, t["perplexity"], t["baseline_perplexity"], t["tax"]] for n, t in results["alignment_tax"].items()],
            )
        )
    gens = [
        (v, results["models"][v]["truthful"]["gen"]["examples"][:3])
        for v in versions
        if "gen" in results["models"][v].get("truthful", {})
    ]
    for v, exs in gens:
        parts.append(
            f"<details><summary>TruthfulQA answers of {html.escape(v)}</summary><pre>"
            + "\n".join(f"Q: {html.escape(e['question'])}\nA: {html.escape(e['answer'])}\n" for e in exs)
            + "</pre></details>"
        )
    parts.append(
        "<p style='color:#777;font-size:12px'>Generated by rlhfkit.evals; "
        "the numbers are in the JSON beside this file.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
    os.replace(tmp, path)


def write_report(results: dict, out: str | Path, title: str = "rlhfkit evaluation") -> tuple[Path, Path]:
    """``out`` is a directory (-> out/eval.json, out/eval.html) or a path ending in .json/.html."""
    out = Path(out)
    if out.suffix in (".json", ".html"):
        stem = out.with_suffix("")
    else:
        stem = out / "eval"
    jp, hp = stem.with_suffix(".json"), stem.with_suffix(".html")
    _atomic_write(jp, json.dumps(results, indent=1, default=str) + "\n")
    _atomic_write(hp, html_report(results, title))
    return jp, hp
