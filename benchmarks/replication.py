"""The paper's claims at small scale on CPU (issue #5), from the cached trained source of
``benchmarks/small_scale.py`` (1.33M parameters, 8.2M tokens) to the half-size target of
``yamls/prune/small_cpu.yaml`` (0.70M parameters):

1. sheared (learned-mask pruning + continued pre-training, dynamic loading) against the same
   architecture trained from scratch: loss at equal tokens, and the tokens scratch needs to reach the
   sheared model's final loss (linear interpolation between scratch evaluations);
2. dynamic batch loading against constant proportions for the continued pre-training of the same
   pruned model: mean loss and the worst domain's loss above its reference;
3. learned masks against one-shot weight-magnitude selection at the same shape, each followed by the
   same continued pre-training (so both get the same total tokens after the source).

Reference losses are the source's own per-domain eval losses (the paper's alternative to a scaling
law fit; ``python -m llmshearing.reference_losses``). Every model is evaluated by
``llmshearing.evaluate.domain_losses`` on the same held-out sequences.

    python -m benchmarks.replication --out runs/benchmarks/replication.json     # ~25 min on 2 cores

Writes JSON and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REPO, write_json  # noqa: E402
from benchmarks.small_scale import common_overrides, ensure_data, ensure_source, eval_losses  # noqa: E402

BATCH, SEQ = 32, 128
TARGET = dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=3, intermediate_size=224)


def _train(yaml: str, overrides: list[str]):
    from llmshearing.trainer import train_from_yaml

    trainer = train_from_yaml(str(REPO / yaml), overrides)
    trainer.close()


def _export(run: Path, out: Path) -> Path:
    from llmshearing.export import export_checkpoint

    return export_checkpoint(run / "checkpoints" / "latest-rank0.pt", out, overwrite=True)


def _cpt(cache: Path, work: Path, name: str, model: Path, steps: int, ref: str, dynamic: bool,
         extra: Sequence[str] = ()) -> Path:
    run = work / name
    _train("yamls/continue_pretrain/tiny_cpu.yaml", common_overrides(cache) + [
        f"variables.run_dir={run}", f"variables.source={model}", ref, f"global_train_batch_size={BATCH}",
        f"device_train_microbatch_size={BATCH}", f"max_duration={steps}ba", f"eval_interval={steps // 6}ba",
        f"save_interval={steps}ba", "autoresume=false", *([] if dynamic else ["dynamic_loading.update=constant"]), *extra])
    return _export(run, work / f"{name}_hf")


def _excess(losses: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    return {d: losses[d] - ref[d] for d in ref}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/replication.json")
    p.add_argument("--cache", default="runs/benchmarks/cache")
    p.add_argument("--prune-steps", type=int, default=400)
    p.add_argument("--cpt-steps", type=int, default=600)
    p.add_argument("--scratch-factor", type=float, default=3.0, help="scratch trains this many times the sheared tokens")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.callbacks.metrics_file import read_metrics
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks

    cache = Path(args.cache).resolve()
    data, source = ensure_data(cache), ensure_source(cache)
    work = Path(args.out).resolve().with_suffix("")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    domains = list(json.loads((data / "manifest.json").read_text())["domains"])
    ref_losses = eval_losses(source, data)
    reference = {d: ref_losses[d] for d in domains}
    ref = "variables.reference_losses=[" + ",".join(f"{reference[d]:.4f}" for d in domains) + "]"
    tok_per_step = BATCH * SEQ
    sheared_tokens = (args.prune_steps + args.cpt_steps) * tok_per_step
    models: dict[str, dict] = {"source": {"path": source, "tokens": 0}}

    # learned-mask pruning with dynamic loading, then continued pre-training (dynamic / constant)
    prune_run = work / "prune"
    _train("yamls/prune/small_cpu.yaml", common_overrides(cache) + [
        f"variables.run_dir={prune_run}", f"variables.source={source}", f"max_duration={args.prune_steps}ba",
        f"eval_interval={args.prune_steps // 4}ba", f"save_interval={args.prune_steps}ba", "autoresume=false",
        "dynamic_loading.update=doremi", f"dynamic_loading.reference_losses={ref.split('=', 1)[1]}"])
    pruned = _export(prune_run, work / "pruned_hf")
    models["pruned (learned masks)"] = {"path": pruned, "tokens": args.prune_steps * tok_per_step}
    models["sheared: pruned + continued, dynamic"] = {
        "path": _cpt(cache, work, "cpt_dynamic", pruned, args.cpt_steps, ref, True), "tokens": sheared_tokens}
    models["pruned + continued, constant"] = {
        "path": _cpt(cache, work, "cpt_constant", pruned, args.cpt_steps, ref, False), "tokens": sheared_tokens}

    # one-shot magnitude selection, then continued pre-training for the same total tokens
    src_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    mag = materialize(src_model, select_masks(src_model, TARGET, "magnitude"))
    mag.save_pretrained(work / "magnitude_hf")
    models["magnitude one-shot"] = {"path": work / "magnitude_hf", "tokens": 0}
    models["magnitude + continued, dynamic"] = {
        "path": _cpt(cache, work, "mag_cpt", work / "magnitude_hf", args.prune_steps + args.cpt_steps, ref, True),
        "tokens": sheared_tokens}

    # the target architecture from scratch, evaluated along the way
    scratch_steps = int(round(args.scratch_factor * (args.prune_steps + args.cpt_steps) / 100)) * 100
    scratch_run = work / "scratch"
    _train("yamls/pretrain/small_cpu.yaml", common_overrides(cache) + [
        f"variables.run_dir={scratch_run}", f"max_duration={scratch_steps}ba", "eval_interval=100ba",
        f"save_interval={scratch_steps}ba", "autoresume=false",
        *[f"model.config.{k}={v}" for k, v in TARGET.items()], f"model.config.num_key_value_heads={TARGET['num_attention_heads']}"])
    scratch_final = _export(scratch_run, work / "scratch_hf")
    models[f"scratch ({args.scratch_factor:g}x tokens)"] = {"path": scratch_final, "tokens": scratch_steps * tok_per_step}

    rows = {}
    for name, m in models.items():
        losses = ref_losses if name == "source" else eval_losses(Path(m["path"]), data)
        params = AutoModelForCausalLM.from_pretrained(m["path"]).num_parameters()
        ex = _excess(losses, reference)
        rows[name] = {"params": params, "tokens": m["tokens"], "losses": losses, "excess": ex,
                      "worst_excess": max(ex.values()), "worst_domain": max(ex, key=ex.get)}

    # scratch curve (trainer eval on the same sequences, data.eval_sequences_per_domain=128)
    curve = read_metrics(scratch_run / "metrics.jsonl")["metrics/eval/LanguageCrossEntropy"]
    curve = sorted((s * tok_per_step, v) for s, v in curve.items())
    sheared_loss = rows["sheared: pruned + continued, dynamic"]["losses"]["all"]
    at_equal = min(curve, key=lambda tv: abs(tv[0] - sheared_tokens))
    needed = None
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l0 > sheared_loss >= l1:
            needed = t0 + (t1 - t0) * (l0 - sheared_loss) / (l0 - l1)
            break
    claims = {
        "sheared_tokens": sheared_tokens,
        "sheared_loss": sheared_loss,
        "scratch_loss_at_equal_tokens": at_equal[1],
        "scratch_tokens_at_that_eval": at_equal[0],
        "scratch_tokens_to_match_sheared": needed,
        "scratch_tokens_ratio": None if needed is None else needed / sheared_tokens,
        "sheared_beats_scratch_at_equal_tokens": sheared_loss < at_equal[1],
        "dynamic_mean_loss": rows["sheared: pruned + continued, dynamic"]["losses"]["all"],
        "constant_mean_loss": rows["pruned + continued, constant"]["losses"]["all"],
        "dynamic_worst_excess": rows["sheared: pruned + continued, dynamic"]["worst_excess"],
        "constant_worst_excess": rows["pruned + continued, constant"]["worst_excess"],
        "dynamic_lowers_worst_excess": rows["sheared: pruned + continued, dynamic"]["worst_excess"]
        < rows["pruned + continued, constant"]["worst_excess"],
        "learned_vs_magnitude_after_continued": (rows["sheared: pruned + continued, dynamic"]["losses"]["all"],
                                                 rows["magnitude + continued, dynamic"]["losses"]["all"]),
    }
    weights = {}
    for name in ("prune", "cpt_dynamic"):
        m = read_metrics(work / name / "metrics.jsonl")
        weights[name] = {d: m.get(f"dynamic_loading/weight_{d}", {}) for d in domains}

    lines = [f"| model | params | tokens after source | eval loss | {' | '.join(domains)} | worst excess over reference |",
             "|---|---|---|---|" + "---|" * len(domains) + "---|"]
    for name, r in rows.items():
        l = r["losses"]
        lines.append(f"| {name} | {r['params'] / 1e6:.3f}M | {r['tokens'] / 1e6:.2f}M | {l['all']:.3f} | "
                     + " | ".join(f"{l[d]:.3f}" for d in domains) + f" | {r['worst_excess']:+.3f} ({r['worst_domain']}) |")
    lines.append("")
    lines.append(f"- scratch at {at_equal[0] / 1e6:.2f}M tokens: {at_equal[1]:.3f}; sheared at {sheared_tokens / 1e6:.2f}M: "
                 f"{sheared_loss:.3f}; scratch needs "
                 + (f"{needed / 1e6:.2f}M tokens ({needed / sheared_tokens:.2f}x)" if needed else
                    f"more than {curve[-1][0] / 1e6:.2f}M tokens (not reached)") + " to match")
    lines.append(f"- dynamic vs constant loading: mean {claims['dynamic_mean_loss']:.3f} vs {claims['constant_mean_loss']:.3f}; "
                 f"worst excess {claims['dynamic_worst_excess']:+.3f} vs {claims['constant_worst_excess']:+.3f}")
    table = "\n".join(lines)
    write_json(args.out, {"target": TARGET, "reference_losses": reference, "rows": rows, "claims": claims,
                          "scratch_curve": curve, "domain_weights": weights, "table": table,
                          "args": vars(args)})
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
