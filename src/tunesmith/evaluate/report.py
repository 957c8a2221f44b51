"""The run report: `eval/report.json` and a self-contained `eval/report.html` (no CDN, opens offline).

It gathers what the run directory already holds: config, data check, training summary and loss
curves (train and val, drawn as inline SVG), the plan's estimate next to the time actually spent,
and the base-versus-tuned comparison with confidence intervals, verdict and flipped examples.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunesmith.evaluate.compare import PER_TOKEN, CompareSummary, compare_run, read_comparison
from tunesmith.files import own_dir, write_json, write_text_atomic
from tunesmith.rundir import RunDir
from tunesmith.watch import read_metrics


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def build_report(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    config = layout.read_config_fields()
    check = _read(layout.check_report) or {}
    summary = _read(layout.summary) or {}
    plan = _read(layout.plan)
    compare = read_comparison(run_dir)
    metrics = read_metrics(run_dir)
    train_config = config.get("train", {})
    spent = summary.get("seconds")
    estimated = (plan or {}).get("this machine", {}).get("hours")
    return {
        "run": str(run_dir),
        "config": {
            "name": config.get("name"),
            "model": config.get("model"),
            "method": config.get("method"),
            "lr": train_config.get("lr"),
            "max_steps": train_config.get("max_steps"),
            "epochs": train_config.get("epochs"),
            "batch_size": train_config.get("batch_size"),
            "grad_accum": train_config.get("grad_accum"),
            "lora_r": (config.get("lora") or {}).get("r"),
            "max_length": (config.get("data") or {}).get("max_length"),
            "seed": train_config.get("seed"),
        },
        "data_check": {
            "examples": check.get("examples"),
            "errors": len(check.get("errors", [])),
            "warnings": [w.get("code") for w in check.get("warnings", [])],
            "train_examples": summary.get("train_examples"),
            "val_examples": summary.get("val_examples"),
            "test_examples": summary.get("test_examples"),
        },
        "training": {
            key: summary.get(key)
            for key in ("steps", "epochs", "first_loss", "final_loss", "tokens", "seconds", "tokens_per_second")
        }
        | {"best": summary.get("best"), "stopped": summary.get("stopped"), "resumed_from": summary.get("resumed_from")},
        "time_and_cost": {
            "spent_seconds": spent,
            "estimated_seconds_here": float(f"{estimated * 3600:.4g}") if estimated is not None else None,
            "estimate_ratio": round(spent / (estimated * 3600), 3) if spent and estimated else None,
            "estimated_cost_usd": (plan or {}).get("cloud", {}),
        },
        "loss_curve": {
            "train": [[r["step"], r["loss"]] for r in metrics if r.get("type", "train") == "train" and "loss" in r],
            "val": [[r["step"], r["val_loss"]] for r in metrics if r.get("type") == "val" and "val_loss" in r],
        },
        "comparison": asdict(compare) if compare else None,
    }


def _svg_curves(curves: dict[str, list[list[float]]], width: int = 720, height: int = 300) -> str:
    points = [p for series in curves.values() for p in series]
    if not points:
        return "<p>No training metrics recorded.</p>"
    pad = 40
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_high - x_low) or 1, (y_high - y_low) or 1

    def xy(point: list[float]) -> str:
        x = pad + (point[0] - x_low) / x_span * (width - 2 * pad)
        y = height - pad - (point[1] - y_low) / y_span * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    colours = {"train": "#1f77b4", "val": "#d62728"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="loss curves" style="background:#fff;border:1px solid #ddd">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<text x="{pad}" y="{height - 12}" font-size="12">step {x_low:g}</text>',
        f'<text x="{width - pad}" y="{height - 12}" font-size="12" text-anchor="end">step {x_high:g}</text>',
        f'<text x="4" y="{pad}" font-size="12">{y_high:.3g}</text>',
        f'<text x="4" y="{height - pad}" font-size="12">{y_low:.3g}</text>',
    ]
    for row, (name, series) in enumerate(curves.items()):
        if not series:
            continue
        line = " ".join(xy(p) for p in series)
        parts.append(f'<polyline fill="none" stroke="{colours[name]}" stroke-width="2" points="{line}"/>')
        for point in series if name == "val" else []:
            x, y = xy(point).split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colours[name]}"/>')
        label_at = f'x="{width - pad - 120}" y="{pad + 16 * row}"'
        parts.append(f'<text {label_at} font-size="12" fill="{colours[name]}">{_text(name)} loss</text>')
    parts.append("</svg>")
    return "".join(parts)


def _text(value: Any) -> str:
    """A value as HTML text. Every value placed in the page goes through here: run names, config values, metric
    names and model answers come from the user's files and data, and must show as text, never run as markup."""
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _comparison_html(compare: dict[str, Any]) -> list[str]:
    """The verdict against the strongest prompting baseline, every contestant side by side, then the tuned model
    against each baseline with its statistics and flipped items. `compare` is a CompareSummary as a dict."""
    versus = compare["baselines"]
    if not versus:  # a reward model: scored on held-out pairs, never generated from
        verdict = f"<div class='verdict plain'>{_text(compare['verdict'])}</div>"
        return [verdict, *_preference_html(compare["preference"])]
    strongest = versus[compare["strongest"]]
    primary = strongest["metrics"].get(compare["primary"]) or {}
    good = bool(primary.get("significant")) and (primary.get("diff") or 0) > 0
    sections = [f"<div class='verdict {'good' if good else 'plain'}'>{_text(compare['verdict'])}</div>"]
    contestants = [*versus, "tuned"]
    rows = [
        [name, *(_fmt(v["metrics"].get(name, {}).get("base")) for v in versus.values()), _fmt(m.get("tuned"))]
        for name, m in versus["zero_shot"]["metrics"].items()
        if "tuned" in m
    ]
    rows.append(["generation seconds", *(_fmt(compare["seconds"].get(c)) for c in contestants)])
    sections.append(f"<h2>Base prompted vs tuned ({_text(compare['items'])} {_text(compare['split'])} items)</h2>")
    sections.append(_table(["metric", *(v["label"] for v in versus.values()), "tuned"], rows))
    if compare["chosen_on"]:
        sections.append(
            f"<p class='muted'>Strongest baseline: {_text(strongest['label'])}, chosen by "
            f"{_text(compare['chosen_on'])}.</p>"
        )
    sections.append(f"<p class='muted'>Multiple comparisons: {_text(compare['correction'] or '-')}.</p>")
    if compare.get("rewards"):
        sections.extend(_rewards_html(compare["rewards"], compare["items"], compare["split"]))
    if compare["preference"]:
        sections.extend(_preference_html(compare["preference"]))
    for against in [*versus.values(), *([compare["start"]] if compare.get("start") else [])]:
        sections.extend(_versus_html(against))
    general = compare["general_ability"]
    if general:
        rows = [
            [task, metric, _fmt(v["base"]), _fmt(v["tuned"]), _fmt(v["diff"], 4)]
            for task, metrics in general.items()
            for metric, v in metrics.items()
        ]
        sections.append("<h3>General ability (lm-eval): forgetting check</h3>")
        sections.append(_table(["task", "metric", "base", "tuned", "diff"], rows))
    return sections


def _rewards_html(rewards: dict[str, Any], items: int, split: str) -> list[str]:
    """A grpo run: its rl.rewards on every contestant's answers, and any code reward skipped with the reason."""
    names = [f"reward_{name}" for name in rewards["rewards"]]
    rows = [
        [contestant, *(_fmt(values.get(key)) for key in ("reward", *names)), values["skipped"]]
        for contestant, values in rewards["contestants"].items()
    ]
    sections = [
        f"<h2>Reward on the {_text(split)} split ({_text(items)} items, rl.rewards as in training)</h2>",
        _table(["contestant", "reward", *names, "items skipped"], rows),
    ]
    sections += [
        f"<p class='muted'>Reward {_text(s['reward'])} ({_text(s['code'])}) skipped: {_text(s['why'])}.</p>"
        for s in rewards["skipped_rewards"]
    ]
    return sections


def _preference_html(preference: dict[str, Any]) -> list[str]:
    """Preference runs: how often each model gives the chosen answer the higher per-token log-probability."""
    rows = []
    for against, label in (("base", "base"), ("start", f"start ({preference.get('start_run')})")):
        result = preference.get(f"tuned_vs_{against}")
        if result:
            rows.append([
                label, _fmt(result["base"]), _fmt(result["tuned"]), _fmt(result["diff"], 4),
                f"[{_fmt(result['ci_low'], 4)}, {_fmt(result['ci_high'], 4)}]", result["p_text"], result["test"],
                "yes" if result["significant"] else "no",
            ])  # fmt: skip
    headers = ["against", "their accuracy", "tuned", "diff", "95% CI", "p", "test", "significant"]
    return [
        f"<h2>Preference accuracy ({_text(preference['items'])} held-out pairs)</h2>",
        f"<p class='muted'>The share of pairs whose chosen answer gets {_text(preference.get('measure', PER_TOKEN))}."
        "</p>",
        _table(headers, rows),
    ]


def _versus_html(versus: dict[str, Any]) -> list[str]:
    """One baseline against the tuned model: paired statistics per metric, wins/ties/losses, flipped items."""
    label = versus["label"]
    rows = [
        [
            name, _fmt(m.get("base")), _fmt(m.get("tuned")), _fmt(m.get("diff"), 4),
            f"[{_fmt(m.get('ci_low'), 4)}, {_fmt(m.get('ci_high'), 4)}]" if "ci_low" in m else "-",
            m.get("p_text") or "-", _fmt(m.get("p_holm"), 4), m.get("test") or "-", m.get("role") or "-",
            "yes" if m.get("significant") else "no",
        ]
        for name, m in versus["metrics"].items()
    ]  # fmt: skip
    headers = ["metric", label, "tuned", "diff", "95% CI", "p", "p (Holm)", "test", "role", "significant"]
    sections = [f"<h2>Tuned vs {_text(label)} prompting</h2>", _table(headers, rows)]
    sections.append(
        f"<p>Decided per item by {_text(versus['decided_by'])}: {_text(versus['wins'])} wins, "
        f"{_text(versus['ties'])} ties, {_text(versus['losses'])} losses.</p>"
    )
    for kind in ("fixed", "broken"):
        flipped = versus["flipped"][kind]
        sections.append(f"<h3>{kind.capitalize()} by fine-tuning against {_text(label)} ({len(flipped)})</h3>")
        if flipped:
            column = versus["against"]
            rows = [
                [r["line"], r["prompt"][:300], r["reference"][:300], r.get(column, "")[:300], r["tuned"][:300]]
                for r in flipped[:10]
            ]
            sections.append(_table(["line", "prompt", "reference", label, "tuned"], rows))
    return sections


def render_html(report: dict[str, Any]) -> str:
    config, training, timing = report["config"], report["training"], report["time_and_cost"]
    sections = [
        f"<h1>tunesmith report: {_text(config.get('name'))}</h1>",
        f"<p class='muted'>{_text(report['run'])}</p>",
    ]
    compare = report.get("comparison")
    if compare:
        sections.extend(_comparison_html(compare))
    else:
        sections.append("<p>No comparison yet: run <code>tunesmith compare RUN</code>.</p>")
    sections.append("<h2>Loss curves</h2>" + _svg_curves(report["loss_curve"]))
    sections.append("<h2>Training</h2>" + _table(["", ""], [[k, _fmt(v)] for k, v in training.items()]))
    cost_rows = [[k, _fmt(v)] for k, v in timing.items() if k != "estimated_cost_usd"]
    cost_rows += [[f"estimated cost on {k}", f"${v}"] for k, v in (timing.get("estimated_cost_usd") or {}).items()]
    sections.append("<h2>Time and cost (spent vs the plan's estimate)</h2>" + _table(["", ""], cost_rows))
    sections.append("<h2>Config</h2>" + _table(["", ""], [[k, _fmt(v)] for k, v in config.items()]))
    sections.append("<h2>Data</h2>" + _table(["", ""], [[k, _fmt(v)] for k, v in report["data_check"].items()]))
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}.muted{color:#777}"
        ".verdict{padding:12px;border-radius:6px;font-weight:600;margin:1em 0}.good{background:#e6f4ea}"
        ".plain{background:#fff4e5}"
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tunesmith report</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write eval/report.json and eval/report.html; returns the HTML path."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    layout = RunDir(run_dir)
    own_dir(layout.eval)
    write_json(layout.report_json, report)
    write_text_atomic(layout.report_html, render_html(report))
    return layout.report_html


def compare_and_report(
    run_dir: str | Path, limit: int | None = None, split: str = "test", console: Any = None
) -> tuple[CompareSummary, Path]:
    """compare_run's summary, and the report written after it (it includes the comparison just made)."""
    summary = compare_run(run_dir, limit=limit, console=console, split=split)
    return summary, write_report(run_dir)
