"""The user's path (issue #26): sources by Hub id, data keyed by its inputs and tokenizer, re-runs of finished
stages, one error style across commands, CLI spellings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO, save_tiny_cpu_source


def test_a_hub_id_resolves_through_the_hugging_face_cache_and_offline_misses_name_the_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from llmshearing.models.gguf import resolve_pretrained

    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-llama" / "snapshots" / ("a" * 40)
    save_tiny_cpu_source(snap)
    (cache / "models--someorg--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--someorg--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Path(resolve_pretrained("someorg/tiny-llama")) == snap
    with pytest.raises(FileNotFoundError, match="huggingface-cli download someorg/not-here"):
        resolve_pretrained("someorg/not-here")
    local = tmp_path / "some" / "dir"
    local.mkdir(parents=True)
    assert resolve_pretrained(str(local)) == str(local)  # a local path is never taken for a Hub id


def _tiny_prune_args(mds_data, tmp_path, *extra):
    return [str(REPO / "yamls" / "prune" / "tiny_cpu.yaml"), f"variables.data={mds_data}",
            f"variables.run_dir={tmp_path / 'run'}", "variables.vocab_size=512", "data.max_seq_len=64",
            "max_duration=2ba", "eval_interval=100ba", "save_interval=2ba", "global_train_batch_size=4",
            "device_train_microbatch_size=4", "data.eval_sequences_per_domain=4", "console_log_interval=100ba", *extra]


def test_running_a_finished_stage_again_says_so_and_exits_0(mds_data, tmp_path, capsys):
    from llmshearing.trainer import main

    args = _tiny_prune_args(mds_data, tmp_path)  # autoresume: true (the CPU configs' default)
    main(args)
    assert (tmp_path / "run" / "checkpoints" / "ep0-ba2-rank0.pt").is_file()
    capsys.readouterr()
    main(args)  # before: Composer's "The max_duration (2ba) is less than or equal to the elapsed training duration"
    out = capsys.readouterr().out
    assert "this run is finished: it resumed" in out and "at 2 batches" in out and "raise max_duration" in out
