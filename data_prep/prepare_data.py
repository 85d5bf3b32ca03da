"""Tokenize a RedPajama-style folder (<input>/<domain>/*.jsonl[.gz|.zst]) into per-domain MDS datasets.

Example:
    python data_prep/prepare_data.py --input /data/redpajama --output /data/rp_mds \
        --tokenizer /models/Llama-2-7b-hf --seq-len 4096 --val-fraction 0.005 --test-fraction 0.005 --workers 16

A Hugging Face dataset instead of a folder (a Hub id, a folder of data files or a save_to_disk folder; needs the
hf extra: pip install -e '.[hf]'):
    python data_prep/prepare_data.py --hf-dataset togethercomputer/RedPajama-Data-1T-Sample \
        --domain-column meta.redpajama_set_name --output /data/rp_mds --tokenizer <model> --seq-len 4096
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmshearing.data.prepare import prepare_dataset  # noqa: E402


def _budgets(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--max-tokens expects DOMAIN=N, got {item!r}")
        try:
            out[name] = int(float(value))
        except ValueError:
            raise SystemExit(f"--max-tokens expects DOMAIN=N with a number N, got {item!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python data_prep/prepare_data.py")
    p.add_argument("--input", "--data-folder", dest="input",
                   help="folder with one sub-folder per domain (or give --hf-dataset)")
    p.add_argument("--hf-dataset", help="a Hugging Face dataset instead: Hub id, data-file folder or save_to_disk folder")
    p.add_argument("--hf-split", default="train", help="with --hf-dataset: the split to read")
    p.add_argument("--hf-config", default=None, help="with --hf-dataset: its configuration name")
    p.add_argument("--text-column", default="text", help="with --hf-dataset: the column holding the text")
    p.add_argument("--domain-column", default=None,
                   help="with --hf-dataset: the column naming each row's domain (dotted for nested fields)")
    p.add_argument("--domain", default=None, help="with --hf-dataset: one domain name for every row")
    p.add_argument("--output", "--out", dest="output", required=True,
                   help="output folder (must not exist unless --overwrite)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer dir or SentencePiece .model")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--domains", nargs="*", default=None, help="domains to include (default: all sub-folders)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents held out for validation (training's evaluation, dynamic loading, tuning)")
    p.add_argument("--test-fraction", type=float, default=0.01,
                   help="share of documents held out for testing (reported results only)")
    p.add_argument("--max-doc-chars", type=int, default=None, help="cut longer documents at line breaks first")
    p.add_argument("--max-tokens", nargs="*", default=[], metavar="DOMAIN=N", help="per-domain training token caps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-mb", type=float, default=1.0,
                   help="input per worker task in MiB (plain files are cut at line starts; 0: one task per file)")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    p.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="leave out input files that cannot be read to their end (truncated .gz) and list them in the "
                        "manifest, instead of stopping")
    args = p.parse_args(argv)
    if (args.input is None) == (args.hf_dataset is None):
        p.error("give the raw data as --input <folder> or --hf-dataset <name>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    input_dir, identity, scratch = args.input, None, None
    if args.hf_dataset:
        import shutil
        import tempfile

        from llmshearing.data.hf_source import export_hf_dataset

        out = Path(args.output).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.hf-input-", dir=out.parent))
        input_dir = scratch / "raw"
    try:
        if args.hf_dataset:
            identity = export_hf_dataset(args.hf_dataset, input_dir, args.text_column, args.domain_column, args.domain,
                                         args.hf_split, args.hf_config)
        res = prepare_dataset(
            input_dir, args.output, args.tokenizer, args.seq_len, domains=args.domains,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, max_doc_chars=args.max_doc_chars,
            max_tokens=_budgets(args.max_tokens), seed=args.seed, workers=args.workers,
            chunk_bytes=int(args.chunk_mb * 2**20) or None, add_bos=not args.no_bos, compression=args.compression,
            overwrite=args.overwrite, skip_bad_files=args.skip_bad_files, input_identity=identity,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {d: {"train_seqs": e["train"]["sequences"], "val_seqs": e["val"]["sequences"],
                   "test_seqs": e["test"]["sequences"],
                   "text_tokens": e["text_tokens"], "malformed": len(e["malformed"]),
                   "skipped_files": len(e["skipped_files"])}
               for d, e in res.manifest["domains"].items()}
    print(json.dumps({"output": str(res.output), "seconds": round(res.seconds, 2), "domains": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
