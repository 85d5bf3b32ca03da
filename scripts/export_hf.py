"""Export a Composer checkpoint (pruning or continued pre-training) to a Hugging Face model directory, with its
model card (README.md) and provenance (llmshearing.json); optionally upload it to the Hub.

    python scripts/export_hf.py --checkpoint runs/prune/checkpoints/latest-rank0.pt --output models/pruned
    python scripts/export_hf.py ... --push-to-hub me/my-sheared-model [--private] [--revision main] [--dry-run]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmshearing.export import export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python scripts/export_hf.py")
    p.add_argument("--checkpoint", required=True,
                   help="Composer checkpoint file, sharded checkpoint folder, or a run's checkpoints folder (its latest)")
    p.add_argument("--output", "--out", dest="output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include (default: the one the run used)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto: the source model's declared dtype (float32 after random init or GGUF)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the export to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    p.add_argument("--revision", default=None, help="with --push-to-hub: the branch to upload to")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be uploaded")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    export_checkpoint(args.checkpoint, args.output, args.tokenizer, args.overwrite,
                      None if args.dtype == "auto" else getattr(torch, args.dtype))
    print(args.output)
    if args.push_to_hub:
        from llmshearing.hub import main as push

        return push([args.output, "--repo-id", args.push_to_hub] + ["--private"] * args.private
                    + (["--revision", args.revision] if args.revision else []) + ["--dry-run"] * args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
