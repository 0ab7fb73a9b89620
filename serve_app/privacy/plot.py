"""The sweep's plot: tokens recovered against next-token agreement, one point per sigma."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from serve_app.privacy.audit import AuditResult


def plot_sweep(results: Sequence[AuditResult], path: Path, title: str) -> None:
    """Recovery (nearest row by L2, within the 5 nearest, and by the suite's worst attack)
    against next-token agreement, each point labelled with its sigma, written to `path`
    (png, svg or pdf by its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    agreement = [r.utility.next_token_agreement for r in results]
    l2 = [r.token_recovery.l2 for r in results]
    axes.plot(agreement, l2, marker="o", label="nearest row (L2)")
    axes.plot(agreement, [r.token_recovery.top5 for r in results], marker="s",
              label="among the 5 nearest rows")
    worst = [r.token_recovery.worst for r in results if r.token_recovery.worst is not None]
    if len(worst) == len(results):
        axes.plot(agreement, worst, marker="^", label="the attack suite's worst")
    for result, x, y in zip(results, agreement, l2, strict=True):
        sigma = result.transform.get("sigma")
        if sigma is not None:  # left of the point near the right edge, else right of it
            axes.annotate(f"σ={sigma:g}", (x, y), textcoords="offset points",
                          xytext=(-6 if x > 0.9 else 6, -12), fontsize=8,
                          ha="right" if x > 0.9 else "left")
    axes.set_xlabel("next-token agreement with clean embeddings")
    axes.set_ylabel("tokens recovered by an upstream with the weights")
    axes.set_xlim(-0.02, 1.05)
    axes.set_ylim(-0.02, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title, fontsize=10)
    figure.savefig(path, dpi=120)
