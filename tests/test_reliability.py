"""Bad input fails early with a message that says what is wrong and what to do; bad steps stop the run."""

from __future__ import annotations

import pytest
import torch
from composer.core import Callback

from llmshearing.callbacks import NonFiniteLoss
from llmshearing.config import ConfigError, load_config
from llmshearing.trainer import build_trainer
from tests.helpers import REPO

PRETRAIN = REPO / "yamls" / "pretrain" / "tiny_cpu.yaml"


def _overrides(data, run_dir, *extra):
    return [f"variables.data={data}", f"variables.run_dir={run_dir}", "variables.vocab_size=512",
            "data.max_seq_len=64", "global_train_batch_size=8", "device_train_microbatch_size=8",
            "console_log_interval=1000ba", *extra]


class _PoisonAt(Callback):
    """Sets the embedding to NaN at the start of batch ``step`` (a stand-in for a diverging run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.step:
            with torch.no_grad():
                model = state.model.module if hasattr(state.model, "module") else state.model
                model.model.get_input_embeddings().weight.fill_(float("nan"))


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(mds_data, tmp_path):
    cfg = load_config(PRETRAIN, _overrides(mds_data, tmp_path, "max_duration=10ba", "save_interval=4ba",
                                           "eval_interval=100ba"))
    trainer = build_trainer(cfg, extra_callbacks=[_PoisonAt(5)])
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    msg = str(err.value)
    assert "non-finite training loss at batch 6" in msg and "ep0-ba4-rank0.pt" in msg and "Restart from it" in msg
    assert not (tmp_path / "checkpoints" / "ep0-ba6-rank0.pt").exists()  # the bad step was never saved
    trainer.close()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.max_seq_len=512"], r"data.max_seq_len=512 is longer than the prepared sequences \(64 tokens"),
        (["variables.vocab_size=300"], "tokenized with a 512-token vocabulary .* but the model's vocab_size is 300"),
        (["data.domains=[code,nope]"], r"data.domains \['nope'\] are not in the prepared dataset"),
        (["data.proportions=[0.5,0.5]"], r"data.proportions has 2 values? .*3 domains"),
        (["max_duration=2ep"], "give a duration in batches"),
    ],
)
def test_bad_run_settings_fail_before_training(mds_data, tmp_path, extra, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        build_trainer(load_config(PRETRAIN, _overrides(mds_data, tmp_path, *extra)))


def test_missing_dataset_names_the_prep_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset .* data_prep/prepare_data.py"):
        build_trainer(load_config(PRETRAIN, _overrides(tmp_path / "nothing", tmp_path)))


def _short_run(mds_data, run_dir, *extra):
    trainer = build_trainer(load_config(PRETRAIN, _overrides(mds_data, run_dir, "max_duration=4ba", "save_interval=4ba",
                                                             "eval_interval=100ba", *extra)))
    trainer.fit()
    trainer.close()


def test_corrupted_checkpoint_is_named_before_loading(mds_data, tmp_path):
    from llmshearing.checkpointing import CheckpointError

    _short_run(mds_data, tmp_path)
    ckpt = tmp_path / "checkpoints" / "ep0-ba4-rank0.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"ep0-ba4-rank0.pt is damaged or truncated .* delete it"):
        build_trainer(load_config(PRETRAIN, _overrides(mds_data, tmp_path, "max_duration=8ba")))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_trainer(load_config(PRETRAIN, _overrides(mds_data, tmp_path / "other", "autoresume=false",
                                                       f"load_path={tmp_path}/nope.pt")))


def test_resuming_with_another_model_shape_is_refused(mds_data, tmp_path):
    _short_run(mds_data, tmp_path)
    with pytest.raises(ValueError, match=r"different model shape .*hidden_size=64 vs 32.*start a new run"):
        trainer = build_trainer(load_config(PRETRAIN, _overrides(mds_data, tmp_path, "max_duration=8ba",
                                                                 "model.config.hidden_size=32")))
        trainer.fit()


def test_launcher_checks_the_config_before_starting_processes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NPROC="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "launch.sh"), str(PRETRAIN), "variables.data=/x",
                           f"variables.run_dir={tmp_path}", "optimizr.lr=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "config error: unknown config key 'optimizr'; did you mean 'optimizer'?" in proc.stderr


def test_building_datasets_again_does_not_leak_file_descriptors(mds_data):
    """streaming keeps every StreamingDataset's shared memory for the life of the process and opens a handle on
    each earlier one when a new one starts: one per evaluation leaked thousands of descriptors in a benchmark."""
    import os

    from llmshearing.data import DomainTokenDataset, load_manifest

    manifest = load_manifest(mds_data)
    domains = list(manifest["domains"])

    def build_all() -> None:
        for split in ("train", "val", "test"):
            ds = DomainTokenDataset(mds_data, split, domains, 64, manifest=manifest)
            assert len(ds) > 0 and ds[0]["input_ids"].shape == (64,)

    build_all()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        build_all()
    assert len(os.listdir("/proc/self/fd")) == before


def test_checkpoint_retention_counts_the_checkpoints_of_earlier_attempts(mds_data, tmp_path):
    """save_num_checkpoints_to_keep=2 over three attempts (each resumed): 2 checkpoints remain, the newest, and
    the run still resumes from the last one (Composer alone left 6: it counts only its own process's)."""
    import re

    common = _overrides(mds_data, tmp_path, "save_interval=2ba", "eval_interval=1000ba", "autoresume=true",
                        "save_num_checkpoints_to_keep=2")
    for end in (4, 8, 12):
        trainer = build_trainer(load_config(PRETRAIN, common + [f"max_duration={end}ba"]))
        trainer.fit()
        assert int(trainer.state.timestamp.batch) == end
        trainer.close()
    left = sorted(int(re.match(r"ep\d+-ba(\d+)-rank0\.pt", p.name).group(1))
                  for p in (tmp_path / "checkpoints").glob("ep*-ba*-rank0.pt"))
    assert left == [10, 12]
    assert (tmp_path / "checkpoints" / "latest-rank0.pt").resolve().name.endswith("ba12-rank0.pt")


def test_plots_of_a_run_without_masks_say_why_the_sparsity_figure_is_missing(tmp_path, capsys):
    import json

    from llmshearing.plots import plot_run

    rows = [{"step": s, "metrics/eval/LanguageCrossEntropy_web": 4.0 - s / 10} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_run(tmp_path, tmp_path / "plots")
    out = capsys.readouterr().out
    assert "no pruning metrics (a run without masks, e.g. continued pre-training: expected)" in out


def test_train_entry_point_reports_a_configuration_error_as_one_line(mds_data, tmp_path, capsys):
    from llmshearing.trainer import main

    args = [str(PRETRAIN), *_overrides(mds_data, tmp_path), "max_duration=2ba", "data.max_seq_len=100000"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "data.max_seq_len=100000 is longer than the prepared sequences" in lines[0]
    assert "re-run data prep with --seq-len 100000" in lines[0]
    with pytest.raises(ValueError, match="longer than the prepared"):
        main(args + ["--debug"])
