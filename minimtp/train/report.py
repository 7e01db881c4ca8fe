"""The loss curves of a run (train, smoothed; validation; per-step top-1 agreement for assistants) as a PNG."""

from __future__ import annotations

import os

from minimtp.train.loop import RunLog


def plot_report(run_dir: str, path: str | None = None) -> str | None:
    """Draw ``run_dir/log.jsonl`` to ``path`` (default ``run_dir/report.png``); returns the path, None without a log."""
    recs = RunLog(os.path.join(run_dir, "log.jsonl")).read()
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    loss = [r["loss"] for r in recs]
    w = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - w + 1) : i + 1]) / len(loss[max(0, i - w + 1) : i + 1]) for i in range(len(loss))]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    agree = sorted(k for k in recs[-1] if k.startswith("val_top1_"))
    ncols = 2 if agree else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, alpha=0.25, label="train (per step)")
    ax.plot(steps, smooth, label=f"train (mean of {w})")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.normpath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    if agree:
        ax = axes[0][1]
        for key in agree:
            pts = [(r["step"], r[key]) for r in recs if key in r]
            ax.plot(*zip(*pts), "o-", label=f"draft step {key.rsplit('_', 1)[1]}")
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 agreement with the target (validation)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = path or os.path.join(run_dir, "report.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_report(args) -> None:
    """``report``: redraw a run's curves and print the PNG's path."""
    print(plot_report(args.out, args.png))
