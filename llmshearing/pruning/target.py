"""Checks that a target architecture is reachable from the source by the configured pruning."""

from __future__ import annotations

from collections.abc import Sequence

from llmshearing.config import ConfigError, TargetShape

__all__ = ["resolve_target"]

_STRUCTURE = {
    "num_hidden_layers": "layer",
    "hidden_size": "hidden",
    "intermediate_size": "intermediate",
    "num_attention_heads": "head",
    "num_key_value_heads": "head",
}


def resolve_target(source: dict[str, int], target: TargetShape, prune: Sequence[str]) -> dict[str, int]:
    """The full target shape, or a :class:`ConfigError` that says why it cannot be reached.

    Args:
        source: ``describe_shape`` of the source config.
        target: the requested target.
        prune: the structures that have masks.
    """
    H, G = source["num_attention_heads"], source["num_key_value_heads"]
    gqa = G != H
    kv = target.num_key_value_heads
    if kv is None:
        kv = G if gqa else target.num_attention_heads
    out = {
        "num_hidden_layers": target.num_hidden_layers,
        "hidden_size": target.hidden_size,
        "intermediate_size": target.intermediate_size,
        "num_attention_heads": target.num_attention_heads,
        "num_key_value_heads": kv,
    }
    for key, want in out.items():
        have = source[key]
        if want > have:
            raise ConfigError(
                f"pruning.target.{key}={want} is larger than the source's {have}; pruning only removes "
                f"structure — choose a target no larger than the source"
            )
        if want < have and _STRUCTURE[key] not in prune:
            raise ConfigError(
                f"pruning.target.{key}={want} differs from the source's {have} but '{_STRUCTURE[key]}' is not in "
                f"pruning.prune {list(prune)}; add it or set the target to {have}"
            )
    Ht = out["num_attention_heads"]
    if not gqa and kv != Ht:
        raise ConfigError(
            f"the source has multi-head attention ({H} heads, each with its own K/V); a pruned MHA model keeps "
            f"K/V per head, so pruning.target.num_key_value_heads must equal num_attention_heads ({Ht}), not {kv}"
        )
    if gqa:
        if Ht % kv:
            raise ConfigError(
                f"pruning.target: {Ht} query heads cannot be split evenly over {kv} KV heads; every kept KV group "
                f"must keep the same number of query heads (choose num_attention_heads a multiple of {kv})"
            )
        if Ht // kv > H // G:
            raise ConfigError(
                f"pruning.target: {Ht} query heads over {kv} KV heads is {Ht // kv} per group, but the source's "
                f"groups have only {H // G} ({H} heads / {G} KV heads); keep more KV heads or fewer query heads"
            )
    if source["hidden_size"] != out["hidden_size"] and out["hidden_size"] < 1:
        raise ConfigError("pruning.target.hidden_size must be >= 1")
    return out
