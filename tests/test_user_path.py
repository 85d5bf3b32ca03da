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


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("command, argv, expected", [
    ("scripts.export_hf", ["--checkpoint", "/nowhere/ep0-ba2-rank0.pt", "--output", "/tmp/x"], "does not exist"),
    ("llmshearing.evaluate", ["--model", "/nowhere", "--data", "/nowhere"], "not a Hugging Face model directory"),
    ("llmshearing.reference_losses", ["measure", "--model", "/nowhere", "--data", "/nowhere"], "/nowhere"),
    ("llmshearing.plots", ["--run", "/nowhere"], "no such run folder"),
    ("llmshearing.models.gguf", ["/nowhere/model.gguf", "--output", "/tmp/x"], "/nowhere/model.gguf"),
    ("llmshearing.hub", ["/nowhere", "--push-to-hub", "me/x", "--dry-run"], "/nowhere"),
    ("data_prep.prepare_data", ["--input", "/nowhere", "--output", "/tmp/x", "--tokenizer", "/nowhere"], "/nowhere"),
    ("llmshearing.quickstart", ["--source", "/nowhere", "--target", "hidden_size=8"], "/nowhere"),
])
def test_every_command_reports_an_input_error_as_one_line_and_exits_2(command, argv, expected, capsys):
    import importlib
    import sys

    if command.startswith(("scripts.", "data_prep.")):
        sys.path.insert(0, str(REPO))
    main = importlib.import_module(command).main
    assert main(argv) == 2
    assert expected in _error_line(capsys)
    with pytest.raises(Exception):  # --debug: the traceback
        main([*argv, "--debug"])


@pytest.mark.parametrize("overrides, expected", [
    (["loggers.wandb.project=x"], "loggers.wandb needs the wandb package"),
    (["model.attn_implementation=flash_attention_2"], "needs the flash-attn package"),
    (["max_duration=300"], "max_duration='300' is not a duration.*did you mean 300ba"),
    (["max_duration=2"], "max_duration='2' is not a duration.*did you mean 2ba"),  # Composer: 2 s of wall clock
    (["variables.source=null", "variables.vocab_size=512", "data.domains=[cc,wiki]"],
     r"data.domains \['cc', 'wiki'\] are not in the prepared dataset .* override data.domains=\[code,docstrings,"
     r"reference\], data.proportions=\[...\] and dynamic_loading.reference_losses"),
])
def test_train_reports_configuration_errors_in_one_line_before_loading(overrides, expected, mds_data, tmp_path,
                                                                       capsys, monkeypatch):
    import importlib.util
    import re

    from llmshearing.trainer import main

    find_spec = importlib.util.find_spec  # as on a machine without these packages
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "flash_attn") else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        main(_tiny_prune_args(mds_data, tmp_path, *overrides))
    assert e.value.code == 2
    assert re.search(expected, _error_line(capsys))


def test_wandb_without_credentials_is_named_before_loading(tmp_path, monkeypatch):
    """wandb without a key stops a non-interactive run at its first step with a traceback; say it first, with the
    ways out. Offline mode, a key in the environment or a netrc entry each make it go through."""
    import io
    import sys

    from llmshearing.config import wandb_credentials_problem

    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal
    problem = wandb_credentials_problem()
    assert problem and "WANDB_API_KEY" in problem and "WANDB_MODE=offline" in problem
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_credentials_problem() is None
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_credentials_problem() is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    assert "wandb.example.org" in wandb_credentials_problem()


def test_train_names_a_missing_variable_and_an_occupied_run_folder(mds_data, tmp_path, capsys):
    from llmshearing.trainer import main

    cpt = [str(REPO / "yamls" / "continue_pretrain" / "tiny_cpu.yaml"), f"variables.data={mds_data}",
           f"variables.run_dir={tmp_path / 'cpt'}", f"variables.source={tmp_path}"]
    with pytest.raises(SystemExit):
        main(cpt)  # before: OmegaConf's "Missing mandatory value: reference_losses"
    assert "variables.reference_losses is required (tiny_cpu.yaml leaves it ???)" in _error_line(capsys)
    main(_tiny_prune_args(mds_data, tmp_path))  # a run with checkpoints in run/checkpoints
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_tiny_prune_args(mds_data, tmp_path, "autoresume=false"))  # before: Composer's "...set overwrite=True"
    line = _error_line(capsys)
    assert "already holds checkpoints of a run (latest ep0-ba2-rank0.pt)" in line and "save_overwrite=true" in line


def test_a_folder_without_a_tokenizer_is_one_short_line(tmp_path):
    from llmshearing.data.tokenizer import load_tokenizer

    save_tiny_cpu_source(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="has no tokenizer") as e:
        load_tokenizer(str(tmp_path / "model"))
    assert len(str(e.value)) < 400


def test_data_tokenized_otherwise_than_the_model_reads_is_refused_before_training(corpus_dir, mds_data, tmp_path):
    """Before: a source of vocabulary 49,152 trained on data of the quickstart's 2,048-token tokenizer, silently."""
    from llmshearing.config import ConfigError, load_config
    from llmshearing.data.train_tokenizer import train_tokenizer
    from llmshearing.trainer import build_trainer
    from tests.conftest import SPLIT

    bigger = train_tokenizer(corpus_dir, tmp_path / "tok600", vocab_size=600, **SPLIT)
    args = _tiny_prune_args(mds_data, tmp_path)
    with pytest.raises(ConfigError, match=r"tokenized with .* \(vocabulary 512\), this run's tokenizer .* has 600"):
        build_trainer(load_config(args[0], [*args[1:], f"tokenizer={bigger}", "variables.vocab_size=600"]))
    other = train_tokenizer(corpus_dir, tmp_path / "tok512", vocab_size=512, seed=5, val_fraction=0.3,
                            test_fraction=0.3)
    with pytest.raises(ConfigError, match="encodes text differently"):
        build_trainer(load_config(args[0], [*args[1:], f"tokenizer={other}"]))


@pytest.mark.slow  # two short quickstarts (~30 s each)
def test_the_quickstart_prepares_again_when_its_input_changes(corpus_dir, small_tokenizer, tmp_path, capsys):
    """Before: a second run with the same output and another input reused the first run's prepared data and reported
    the first input's domains, without a word."""
    import shutil

    from llmshearing.data.tokenizer import load_tokenizer
    from llmshearing.quickstart import main

    src = save_tiny_cpu_source(tmp_path / "src")
    load_tokenizer(small_tokenizer).save_pretrained(src)
    two = tmp_path / "two_domains"
    for d in ("code", "reference"):
        shutil.copytree(corpus_dir / d, two / ("wiki" if d == "code" else "news"))
    args = ["--output", str(tmp_path / "qs"), "--source", str(src), "--target", "num_hidden_layers=2",
            "hidden_size=48", "num_attention_heads=2", "intermediate_size=86", "--prune-steps", "2",
            "--cpt-steps", "2", "--seq-len", "64", "--batch-size", "4"]
    assert main([*args, "--input", str(corpus_dir)]) == 0
    first = capsys.readouterr().out
    assert "| model | parameters | test loss | code | docstrings | reference |" in first
    assert len(first.splitlines()) < 80  # banners, progress bars and the summary; the logs are in the run folders
    assert (tmp_path / "qs" / "prune" / "log.txt").stat().st_size > 1000
    assert main([*args, "--input", str(two)]) == 0
    second = capsys.readouterr().out
    assert "data: " in second and "was made from other inputs (corpus, corpus_files changed): making it again" in second
    assert "| model | parameters | test loss | news | wiki |" in second


def test_runs_evaluate_before_training_without_changing_it_and_plots_show_it(mds_data, tmp_path):
    """The step-0 point of every curve (evaluated before the first step: the pruning source's own loss) without
    changing the run: dynamic loading does not re-weight on it, the masks do not move."""
    import torch

    from llmshearing.callbacks import read_metrics
    from llmshearing.config import load_config
    from llmshearing.plots import plot_run
    from llmshearing.trainer import build_trainer

    finals = {}
    for first in (True, False):
        args = _tiny_prune_args(mds_data, tmp_path / str(first), "max_duration=4ba", "eval_interval=2ba",
                                f"eval_first={str(first).lower()}", "dynamic_loading.update=doremi",
                                "dynamic_loading.reference_losses=[4.0,4.0,4.0]")
        trainer = build_trainer(load_config(args[0], args[1:]))
        trainer.fit()
        finals[first] = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
        trainer.close()
    assert all(torch.equal(finals[True][k], v) for k, v in finals[False].items())
    m = read_metrics(tmp_path / "True" / "run" / "metrics.jsonl")
    assert sorted(m["metrics/eval/LanguageCrossEntropy_code"]) == [0, 2, 4]
    assert 0 in m["metrics/eval_target/LanguageCrossEntropy"] and 0 in m["dynamic_loading/excess_loss_code"]
    assert m["dynamic_loading/weight_code"][0] == m["dynamic_loading/weight_code"].get(1, m["dynamic_loading/weight_code"][0])
    assert 0 not in read_metrics(tmp_path / "False" / "run" / "metrics.jsonl")["metrics/eval/LanguageCrossEntropy_code"]
    names = [p.name for p in plot_run(tmp_path / "True" / "run", tmp_path / "plots")]
    assert {"domain_losses.png", "domain_weights.png", "sparsity.png", "kept_units.png"} <= set(names)


def test_a_run_logs_to_wandb_offline(mds_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _tiny_prune_args(mds_data, tmp_path, "loggers.wandb.project=llmshearing-test", "max_duration=2ba")
    trainer = build_trainer(load_config(args[0], args[1:]))
    trainer.fit()
    trainer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (log_file,) = runs[0].glob("*.wandb")  # the run's records, to sync later with `wandb sync`
    records = log_file.read_bytes()
    for key in (b"loss/train/total", b"pruning/expected_params", b"metrics/eval/LanguageCrossEntropy_code",
                b"dynamic_loading/weight_code"):
        assert key in records, key


def test_data_prep_reads_a_hugging_face_dataset_as_the_folder_it_would_read(corpus_dir, small_tokenizer, tmp_path,
                                                                           capsys):
    datasets = pytest.importorskip("datasets")
    import json
    import sys

    sys.path.insert(0, str(REPO))
    from data_prep.prepare_data import main

    rows = []
    for d in ("code", "reference"):
        for f in sorted((corpus_dir / d).glob("*.jsonl")):
            rows += [{"text": json.loads(line)["text"], "meta": {"set": d}} for line in f.read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    folder = tmp_path / "folder"
    for d in ("code", "reference"):  # the same rows, as a JSONL folder
        (folder / d).mkdir(parents=True)
        (folder / d / "part-00000.jsonl").write_text(
            "".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows if r["meta"]["set"] == d))
    common = ["--tokenizer", small_tokenizer, "--seq-len", "64"]
    assert main(["--hf-dataset", str(tmp_path / "hf"), "--domain-column", "meta.set", "--output",
                 str(tmp_path / "from_hf"), *common]) == 0
    assert main(["--input", str(folder), "--output", str(tmp_path / "from_folder"), *common]) == 0
    a = json.loads((tmp_path / "from_hf" / "manifest.json").read_text())
    b = json.loads((tmp_path / "from_folder" / "manifest.json").read_text())
    assert a["domains"] == b["domains"] and list(a["domains"]) == ["code", "reference"]
    assert a["inputs"]["hf_dataset"] == str(tmp_path / "hf") and a["inputs"]["rows"] == len(rows)
    assert not list(tmp_path.glob(".from_hf.hf-input-*"))  # the temporary JSONL is gone
    capsys.readouterr()
    assert main(["--hf-dataset", str(tmp_path / "hf"), "--output", str(tmp_path / "x"), *common]) == 2
    assert "--domain-column COLUMN" in _error_line(capsys)


def test_one_shot_activation_selection_is_a_pruning_method_of_the_recipe(mds_data, tmp_path):
    """pruning.method=activation: the run starts from the source's Minitron selection at the target shape (the same
    model the one-shot baseline builds) and trains it; its export is a plain model whose card and provenance say so."""
    import json

    import torch

    from llmshearing.config import load_config
    from llmshearing.data import calibration_batch
    from llmshearing.export import export_checkpoint
    from llmshearing.pruning import materialize
    from llmshearing.pruning.baselines import select_masks
    from llmshearing.trainer import build_trainer
    from transformers import AutoModelForCausalLM

    src = save_tiny_cpu_source(tmp_path / "src")
    args = _tiny_prune_args(mds_data, tmp_path, f"variables.source={src}", "pruning.method=activation",
                            "pruning.calibration_sequences=6")
    trainer = build_trainer(load_config(args[0], args[1:]))
    model = trainer.state.model.model
    assert not hasattr(trainer.state.model, "masks") and model.config.hidden_size == 48
    source = AutoModelForCausalLM.from_pretrained(src)
    want = materialize(source, select_masks(source, dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=2,
                                                         intermediate_size=86), "activation",
                                            calibration=calibration_batch(mds_data, 6, 64,
                                                                          ["code", "docstrings", "reference"])))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.state_dict().items())
    trainer.fit()
    trainer.close()
    out = export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "selected")
    prov = json.loads((out / "llmshearing.json").read_text())
    assert prov["stages"][0]["stage"] == "activation_selection"
    assert prov["stages"][0]["shape_before"]["hidden_size"] == 64 and prov["stages"][0]["shape_after"]["hidden_size"] == 48
    assert "one-shot structured pruning by activation importance" in (out / "README.md").read_text()
