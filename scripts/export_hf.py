"""Export a Composer checkpoint (pruning or continued pre-training) to a Hugging Face model directory.

    python scripts/export_hf.py --checkpoint runs/prune/checkpoints/latest-rank0.pt --output models/pruned
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmshearing.export import export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Composer checkpoint file or save folder")
    p.add_argument("--output", required=True, help="Hugging Face model directory to write")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include (default: the one the run used)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    export_checkpoint(args.checkpoint, args.output, args.tokenizer, args.overwrite, getattr(torch, args.dtype))
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
