"""Tiny model configs and helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from llmshearing.models.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REDPAJAMA = SHARED / "data" / "redpajama_sample"
LLAMA2_TOKENIZER = SHARED / "data" / "llama2_tokenizer" / "tokenizer.model"

# family -> tiny config fields; one per supported family, covering MHA, GQA + llama3 rope scaling, qkv bias.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama2_mha": (
        "llama",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
    ),
    "llama3_gqa": (
        "llama",
        dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    ),
    "mistral_gqa": (
        "mistral",
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None),
    ),
    "qwen2_bias": (
        "qwen2",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
    ),
    "llama_mlp_bias": (
        "llama",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, mlp_bias=True, attention_bias=True),
    ),
    "qwen3_gqa": (
        "qwen3",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
             use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "phi3_gqa": (
        "phi3",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, partial_rotary_factor=0.5),
    ),
    "gemma3_tied": (
        "gemma3_text",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=6,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=16),
    ),
    "gemma2_tied": (
        "gemma2",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=6,
             final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=16),
    ),
    "olmo2": (
        "olmo2",
        dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64),
    ),
    "pythia": (
        "gpt_neox",
        dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True),
    ),
}


def make_tiny_model(name: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny transformers model; norm weights and biases perturbed so they matter."""
    family, fields = TINY_CONFIGS[name]
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**fields, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_cpu_source(path: Path, seed: int = 0) -> Path:
    """A random LLaMA of ``yamls/pretrain/tiny_cpu.yaml``'s shape (vocabulary 512, the test tokenizer's), saved as a
    source for the CPU pruning and continued-training configs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


def save_uneven_source(path: Path, gqa: bool = False, seed: int = 0) -> Path:
    """A random LLaMA whose FFN (171) and vocabulary (515, the test tokenizer's 512 + 3) do not divide by 2 or 4 ranks,
    so FSDP shards unevenly; ``gqa``: 4 query heads in 2 KV groups with LLaMA-3's rope, else 4 heads (MHA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    extra = dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}) if gqa else dict(num_key_value_heads=4,
                                                                                         rms_norm_eps=1e-6)
    LlamaForCausalLM(LlamaConfig(vocab_size=515, hidden_size=64, intermediate_size=171, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                                 **extra)).save_pretrained(path)
    return path


def save_tiny_model(name: str, path: Path, seed: int = 0) -> Path:
    make_tiny_model(name, seed).save_pretrained(path)
    return path


def run_traced(out: Path, yaml: Path, overrides: list[str], nproc: int = 1, timeout: int = 300,
               kill_at: str | None = None, kill_rank: int | None = None, every_step: bool = False) -> dict | None:
    """Run ``composer -n nproc tests/trace_run.py`` and return its trace (see tests/trace_run.py); one process runs
    ``python tests/trace_run.py`` directly (the same run: the launcher would only add its own ~9 s of imports).

    With ``kill_at`` (``mid:N``, ``step:N``, ``eval:N``, ``save:N``) the run is killed there (only rank ``kill_rank``
    when given): returns None after checking that it died. ``every_step``: the trace holds the model's tensors after
    every batch."""
    import os
    import signal
    import subprocess
    import sys

    launcher = [sys.executable] if nproc == 1 else [str(Path(sys.executable).parent / "composer"), "-n", str(nproc)]
    cmd = [*launcher, str(REPO / "tests" / "trace_run.py"), str(out), str(yaml), *overrides]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for key in ("KILL_AT", "KILL_RANK", "TRACE_EVERY_STEP"):
        env.pop(key, None)
    if kill_at:
        env["KILL_AT"] = kill_at
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    if every_step:
        env["TRACE_EVERY_STEP"] = "1"
    # a session of its own, so a run that hangs is ended with every rank (killing the launcher alone left its ranks
    # running, holding their ports and locks)
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{stdout[-3000:]}\n"
                                 f"{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if kill_at:
        assert proc.returncode != 0, f"the run was to be killed at {kill_at} but finished"
        return None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=False)
