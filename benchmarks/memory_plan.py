"""The activation terms of the README's memory plan, measured (issue #7).

For LLaMA2-7B and LLaMA-3-8B widths (every dimension but depth; bf16 weights, SDPA), runs the forward of
1- and 2-layer models through the project's loss on CPU, with the pruning masks attached and sampled as
in training, and adds up every tensor autograd saves for the backward pass (each storage once; parameters
and views of them excluded: they are not extra memory). The difference between 2 layers and 1 is what one
decoder layer keeps, i.e. what activation checkpointing recomputes for one layer at a time; the rest is
the embedding, final norm, LM head and loss. Two sequence lengths separate the part that grows with tokens
from the part that does not (the mask-scaled ``o_proj`` / ``down_proj`` weights). The plan rows for 8 GPUs
with FSDP FULL_SHARD, sequence 4096, are then computed from these coefficients.

    python -m benchmarks.memory_plan --out runs/benchmarks/memory_plan.json

Saved-for-backward bytes do not depend on the device. Not measured here: allocator slack, and the
transient gradient buffers of the loss (taken as 6 B per logit: an fp32 and a bf16 gradient).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import write_json  # noqa: E402

MODELS = {
    "llama2_7b": dict(
        width=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                   vocab_size=32000),
        layers=32, params=6.74e9, micro=4,
        target=dict(hidden_size=2560, num_attention_heads=20, num_key_value_heads=20, intermediate_size=6912)),
    "llama3_8b": dict(
        width=dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                   vocab_size=128256, rope_theta=500000.0),
        layers=32, params=8.03e9, micro=2,
        target=dict(hidden_size=2560, num_attention_heads=16, num_key_value_heads=4, intermediate_size=6912)),
}
SEQ, GPUS = 4096, 8


def saved_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd saves in one forward + loss (parameters excluded)."""
    import torch

    from llmshearing.models.composer_causal_lm import token_cross_entropy

    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights (or views of them)

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss, valid = token_cross_entropy(logits, {"input_ids": input_ids})
        (loss * valid).sum()
    return sum(storages.values())


def build(spec: dict, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmshearing.models.families import describe_shape
    from llmshearing.pruning.hooks import attach_masks
    from llmshearing.pruning.masks import ShearingMasks

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=SEQ, **spec["width"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    target = dict(spec["target"], num_hidden_layers=max(1, layers - 1))
    masks = ShearingMasks(describe_shape(config), target, ["layer", "head", "intermediate", "hidden"])
    attach_masks(model, masks)
    return model


def measure(spec: dict, tokens: list[int]) -> dict:
    import torch

    d, V = spec["width"]["hidden_size"], spec["width"]["vocab_size"]
    models = {L: build(spec, L) for L in (1, 2)}
    rows = []
    for T in tokens:
        ids = torch.randint(0, V, (1, T))
        b = {L: saved_bytes(models[L], ids) for L in (1, 2)}
        rows.append({"tokens": T, "layer": b[2] - b[1], "outside": 2 * b[1] - b[2]})
    (t1, r1), (t2, r2) = (tokens[0], rows[0]), (tokens[-1], rows[-1])
    per_token = (r2["layer"] - r1["layer"]) / (t2 - t1)
    return {
        "rows": rows,
        "layer_bytes_per_token_per_hidden": per_token / d,
        "layer_token_independent_bytes": r1["layer"] - per_token * t1,
        "outside_bytes_per_token_per_vocab": (r2["outside"] - r1["outside"]) / (t2 - t1) / V,
    }


def plan(spec: dict, m: dict) -> dict:
    """Per-GPU bytes of pruning the full-depth model on 8 GPUs (FSDP FULL_SHARD, checkpointing per layer)."""
    w = spec["width"]
    d, V, L, b = w["hidden_size"], w["vocab_size"], spec["layers"], spec["micro"]
    tokens = b * SEQ
    layer_params = (spec["params"] - 2 * V * d) / L
    rows = {
        "fp32 weights + grads + Adam (16 B/param, sharded)": 16 * spec["params"] / GPUS,
        "one layer gathered in bf16 + the next prefetched": 2 * 2 * layer_params,
        "checkpointed layer inputs (L x tokens x d x 2 B)": L * tokens * d * 2,
        "one layer recomputed in backward (measured)": m["layer_bytes_per_token_per_hidden"] * tokens * d
        + m["layer_token_independent_bytes"],
        "LM head + loss: saved (measured) + 6 B/logit of gradients": (m["outside_bytes_per_token_per_vocab"] + 6)
        * tokens * V,
    }
    return {"micro_batch": b, "rows": rows, "total": sum(rows.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmarks/memory_plan.json")
    p.add_argument("--tokens", type=int, nargs=2, default=[256, 512])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    args = p.parse_args(argv)
    result = {"dtype": "bfloat16", "seq_len": SEQ, "gpus": GPUS, "models": {}}
    for name in args.models:
        spec = MODELS[name]
        m = measure(spec, args.tokens)
        result["models"][name] = {"spec": spec, "measured": m, "plan": plan(spec, m)}
        print(json.dumps({name: {k: v for k, v in m.items() if k != "rows"}}), flush=True)
    write_json(args.out, result)
    names = list(result["models"])
    print("| per GPU | " + " | ".join(f"{n} (b={result['models'][n]['plan']['micro_batch']})" for n in names) + " |")
    print("| --- |" + " --- |" * len(names))
    for row in result["models"][names[0]]["plan"]["rows"]:
        print(f"| {row} | " + " | ".join(f"{result['models'][n]['plan']['rows'][row] / 1e9:.2f} GB" for n in names)
              + " |")
    print("| total | " + " | ".join(f"{result['models'][n]['plan']['total'] / 1e9:.1f} GB" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
