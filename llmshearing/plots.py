"""PNG figures of a run from its ``metrics.jsonl`` (and, for pruning runs, its saved masks).

    python -m llmshearing.plots --run runs/quickstart/prune --output runs/quickstart/plots/prune

| figure | from |
| --- | --- |
| ``domain_losses.png`` | per-domain eval loss over steps (from the evaluation before training), each domain's reference loss as its own dashed line labelled at the right edge; beside it the overall loss of the evaluated model and, while pruning, of the exported (top-k) model |
| ``domain_weights.png`` | dynamic-loading domain weights over steps |
| ``sparsity.png`` | expected vs target size of each pruned structure over steps |
| ``kept_units.png`` | final per-layer kept heads and FFN channels; pruned layers have no bars (marked x) |

A figure whose metrics the run did not log is skipped (and said so).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from llmshearing.callbacks.metrics_file import read_metrics

__all__ = ["plot_run"]

EVAL = re.compile(r"^metrics/eval/LanguageCrossEntropy_(.+)$")


def _series(metrics: dict[str, dict[int, float]], key: str) -> tuple[list[int], list[float]]:
    points = sorted(metrics.get(key, {}).items())
    return [s for s, _ in points], [v for _, v in points]


def _latest_masks(run: Path) -> Optional[Path]:
    files = sorted((run / "checkpoints" / "masks").glob("ba*.pt"), key=lambda p: int(p.stem[2:]))
    return files[-1] if files else None


def plot_run(run: str | Path, out: str | Path, metrics_file: Optional[str | Path] = None) -> list[Path]:
    """Write the figures of ``run`` (a run directory holding ``metrics.jsonl``) to ``out``; returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run, out = Path(run), Path(out)
    path = Path(metrics_file) if metrics_file else run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path}; runs write <run_dir>/metrics.jsonl (config key metrics_file)")
    metrics = read_metrics(path)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    domains = sorted({m.group(1) for k in metrics if (m := EVAL.match(k))})
    if domains:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
        refs: list[tuple[float, str, str]] = []
        for i, d in enumerate(domains):
            steps, losses = _series(metrics, f"metrics/eval/LanguageCrossEntropy_{d}")
            (line,) = ax.plot(steps, losses, marker="o", ms=3, label=f"{d}")
            evals = metrics[f"metrics/eval/LanguageCrossEntropy_{d}"]
            s2, excess = _series(metrics, f"dynamic_loading/excess_loss_{d}")
            ref = [evals[s] - e for s, e in zip(s2, excess) if s in evals]
            if ref:
                dashes = [(0, (6, 2)), (0, (3, 2)), (0, (1, 2)), (0, (6, 2, 1, 2))][i % 4]
                ax.axhline(ref[-1], color=line.get_color(), ls=dashes, lw=1.2, alpha=0.8,
                           label=f"{d}: reference loss")
                refs.append((ref[-1], d, line.get_color()))
        # reference labels at the right edge, spread apart where two domains' references (nearly) coincide
        lo, hi = ax.get_ylim()
        gap, placed = (hi - lo) * 0.045, []
        for value, d, color in sorted(refs):
            y = max([value, *(p + gap for p in placed)]) if placed and value - placed[-1] < gap else value
            placed.append(y)
            ax.annotate(f"ref {d}", xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(4, (y - value)
                        / max(hi - lo, 1e-9) * ax.bbox.height), textcoords="offset points", color=color, fontsize=7,
                        va="center", annotation_clip=False)
        ax.set(xlabel="step", ylabel="eval loss (nats/token)", title="validation loss per domain")
        ax.legend(fontsize=7, ncol=2)
        for key, label, style in (("metrics/eval/LanguageCrossEntropy", "evaluated model (expected masks while "
                                   "pruning)", "-"),
                                  ("metrics/eval_target/LanguageCrossEntropy", "exported model (top-k masks)", "--")):
            steps, losses = _series(metrics, key)
            if steps:
                ax2.plot(steps, losses, ls=style, marker="o", ms=3, label=label)
        ax2.set(xlabel="step", ylabel="eval loss (nats/token)", title="all domains")
        ax2.legend(fontsize=7)
        save(fig, "domain_losses.png")
    else:
        print("no per-domain eval losses logged: domain_losses.png skipped")

    kd = sorted(k.split("metrics/train/KD_", 1)[1] for k in metrics if k.startswith("metrics/train/KD_"))
    if kd:  # a distillation run: KL to the teacher and cross-entropy, per domain (training batches)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for d in kd:
            (line,) = axes[0].plot(*_series(metrics, f"metrics/train/KD_{d}"), lw=1, label=d)
            axes[1].plot(*_series(metrics, f"metrics/train/LanguageCrossEntropy_{d}"), lw=1, color=line.get_color())
        axes[0].set(xlabel="step", ylabel="KL(teacher || student)", title="distillation: KD per domain")
        axes[1].set(xlabel="step", ylabel="cross-entropy", title="training cross-entropy per domain")
        axes[0].legend(fontsize=8)
        save(fig, "distillation.png")

    weights = sorted(k for k in metrics if k.startswith("dynamic_loading/weight_"))
    if weights:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in weights:
            steps, w = _series(metrics, k)
            ax.step(steps, w, where="post", label=k.rsplit("weight_", 1)[1])
        ax.set(xlabel="step", ylabel="proportion", title="domain weights (dynamic batch loading)", ylim=(0, 1))
        ax.legend(fontsize=8)
        save(fig, "domain_weights.png")
    else:
        print(f"{run}: no dynamic-loading weights logged (dynamic_loading not configured): domain_weights.png skipped")

    structures = sorted(k.split("pruning/target_", 1)[1] for k in metrics if k.startswith("pruning/target_"))
    if structures:
        fig, axes = plt.subplots(1, len(structures), figsize=(3.2 * len(structures), 3.4), squeeze=False)
        for ax, name in zip(axes[0], structures):
            ax.plot(*_series(metrics, f"pruning/expected_{name}"), label="expected")
            ax.plot(*_series(metrics, f"pruning/target_{name}"), ls="--", label="target")
            ax.set(title=name, xlabel="step")
        axes[0][0].set_ylabel("kept units (per layer)")
        axes[0][0].legend(fontsize=8)
        save(fig, "sparsity.png")
    else:
        print(f"{run}: no pruning metrics (a run without masks, e.g. continued pre-training: expected): "
              "sparsity.png skipped")

    masks_file = _latest_masks(run)
    if masks_file is not None:
        import torch

        det = torch.load(masks_file, map_location="cpu", weights_only=False)["deterministic"]
        layers = det["layer_keep"].bool().tolist()
        heads = [h if k else 0 for h, k in zip(det["head_keep"].sum(1).tolist(), layers)]  # a pruned layer keeps none
        channels = [c if k else 0 for c, k in zip(det["intermediate_keep"].sum(1).tolist(), layers)]
        x = list(range(len(heads)))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].bar(x, heads, color="tab:blue")
        axes[0].set(xlabel="layer (x: pruned)", ylabel="kept query heads", title="heads per layer")
        axes[1].bar(x, channels, color="tab:blue")
        axes[1].set(xlabel="layer (x: pruned)", ylabel="kept FFN channels", title="FFN channels per layer")
        for ax in axes:
            ax.set_xticks(x)
            gone = [i for i, k in enumerate(layers) if not k]
            if gone:
                ax.scatter(gone, [0] * len(gone), marker="x", color="tab:red", zorder=3, label="pruned layer")
                ax.legend(fontsize=7)
        fig.suptitle(f"{masks_file.parent.parent.parent.name}: masks at step {masks_file.stem[2:]}, "
                     f"hidden {int(det['hidden_keep'].sum())}/{det['hidden_keep'].numel()}")
        save(fig, "kept_units.png")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python -m llmshearing.plots")
    p.add_argument("--run", required=True, help="run directory (holds metrics.jsonl and checkpoints/)")
    p.add_argument("--output", "--out", dest="output", help="output folder (default: <run>/plots)")
    p.add_argument("--metrics", help="metrics file (default: <run>/metrics.jsonl)")
    args = p.parse_args(argv)
    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"--run {args.run}: no such run folder (the variables.run_dir of a training run)")
    for f in plot_run(args.run, args.output or Path(args.run) / "plots", args.metrics):
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
