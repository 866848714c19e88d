"""Loss curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_losses(curves: dict[str, list[float]], path: str | Path, title: str = "training loss",
                points: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Loss per step for each curve; `points` adds (step, value) series such as a periodic
    held-out loss, drawn with markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, losses in curves.items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name, linewidth=1.2)
    for name, pts in (points or {}).items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o--", label=name, linewidth=1.0, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
