"""Loss / perplexity (and RL reward) curves from a run's metrics.jsonl, drawn to a PNG with matplotlib's Agg
canvas (no display, no global pyplot state: safe inside the trainer and in tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

REWARD_KEYS = ("reward", "rewards/mean", "objective/scores")
REWARD_STD_KEYS = ("reward_std", "rewards/std")
MARGIN_KEYS = ("rewards/margins",)


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """Records of a metrics.jsonl; unparseable lines (a run killed mid-write) are skipped."""
    records = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None  # "nan"/"inf" strings mark non-finite values
    return float(v) if math.isfinite(v) else None


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series: loss, eval_loss, perplexity, reward, reward_std, margin."""
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in
                                               ("loss", "eval_loss", "perplexity", "reward", "reward_std", "margin")}

    def first(rec, keys):
        for k in keys:
            v = _num(rec.get(k))
            if v is not None:
                return v
        return None

    for rec in records:
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        event = rec.get("event")
        if event == "train":
            for name, keys in (("loss", ("loss",)), ("reward", REWARD_KEYS), ("reward_std", REWARD_STD_KEYS),
                               ("margin", MARGIN_KEYS)):
                v = first(rec, keys)
                if v is not None:
                    out[name].append((step, v))
        elif event == "eval":
            v = _num(rec.get("eval_loss"))
            if v is not None:
                out["eval_loss"].append((step, v))
                ppl = _num(rec.get("perplexity"))
                out["perplexity"].append((step, ppl if ppl is not None else math.exp(min(v, 700))))
    return out


def plot_curves(metrics_jsonl: Path, png: Path, title: str | None = None) -> Path:
    """Draw train/eval loss and eval perplexity vs step (plus RL reward mean ± std or DPO margin when logged)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = curves(read_metrics(metrics_jsonl))
    rl = bool(series["reward"] or series["margin"])
    fig = Figure(figsize=(12 if rl else 9, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if rl else 2)
    ax_loss, ax_ppl = axes[0], axes[1]

    def line(ax, points, label, **kw):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, **kw)

    line(ax_loss, series["loss"], "train loss")
    line(ax_loss, series["eval_loss"], "eval loss", marker="o")
    ax_loss.set_title("loss")
    line(ax_ppl, series["perplexity"], "eval perplexity", marker="o", color="tab:orange")
    ax_ppl.set_title("eval perplexity")
    if series["perplexity"] and max(v for _, v in series["perplexity"]) / max(
            min(v for _, v in series["perplexity"]), 1e-9) > 20:
        ax_ppl.set_yscale("log")  # early perplexities are orders of magnitude above late ones
    if rl:
        ax_rl = axes[2]
        if series["reward"]:
            line(ax_rl, series["reward"], "reward mean", color="tab:green")
            std = dict(series["reward_std"])
            band = [(s, v, std[s]) for s, v in series["reward"] if s in std]
            if band:
                xs, ys, sd = zip(*band)
                ax_rl.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                                   alpha=0.2, color="tab:green", label="± std")
            ax_rl.set_title("RL reward")
        else:
            line(ax_rl, series["margin"], "chosen - rejected", color="tab:green")
            ax_rl.set_title("preference reward margin")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png")
    return png
