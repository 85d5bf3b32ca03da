"""End to end on CPU with the real Composer Trainer and real MDS shards: pre-train, resume, prune, export."""

from __future__ import annotations

import pytest
from composer.core import Event
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from transformers import AutoModelForCausalLM

from llmshearing.callbacks import read_metrics
from llmshearing.config import load_config
from llmshearing.evaluate import generate
from llmshearing.export import export_checkpoint
from llmshearing.plots import plot_run
from llmshearing.trainer import build_trainer
from tests.helpers import REPO


class Recorder(Callback):
    def __init__(self):
        self.losses, self.start_batch, self.logged = [], None, {}

    def fit_start(self, state: State, logger: Logger) -> None:
        self.start_batch = int(state.timestamp.batch)

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        self.losses.append(float(loss))

    def eval_end(self, state: State, logger: Logger) -> None:
        self.logged = dict(state.eval_metric_values)


def _pretrain_overrides(data, run_dir, steps):
    return [f"variables.data={data}", f"variables.run_dir={run_dir}", "variables.vocab_size=512",
            "data.max_seq_len=64", f"max_duration={steps}ba", "global_train_batch_size=8",
            "device_train_microbatch_size=8", "eval_interval=40ba", "save_interval=40ba", "console_log_interval=1000ba"]


def test_pretrain_learns_logs_domains_checkpoints_and_autoresumes(mds_data, tmp_path):
    yaml = REPO / "yamls" / "pretrain" / "tiny_cpu.yaml"
    rec = Recorder()
    trainer = build_trainer(load_config(yaml, _pretrain_overrides(mds_data, tmp_path, 80)), extra_callbacks=[rec])
    trainer.fit()
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert {f"LanguageCrossEntropy_{d}" for d in ("code", "docstrings", "reference")} <= set(rec.logged)
    assert (tmp_path / "checkpoints" / "latest-rank0.pt").exists()
    trainer.close()

    rec2 = Recorder()
    resumed = build_trainer(load_config(yaml, _pretrain_overrides(mds_data, tmp_path, 100)), extra_callbacks=[rec2])
    resumed.fit()
    assert rec2.start_batch == 80 and len(rec2.losses) == 20
    resumed.close()


def _log_with_reads_counted(algo, state) -> dict:
    """``L0Pruning._log`` once, counting tensor-to-host reads (``item``, ``tolist``, ``float()``, ``int()``,
    ``bool()``): each is a wait for the device on a GPU."""
    reads = []
    patched = {}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads.append(1)
            return _original(self, *a, **k)

        patched[name] = original
        setattr(torch.Tensor, name, counted)

    class Capture:
        metrics: dict = {}

        def log_metrics(self, metrics):
            self.metrics = dict(metrics)

    capture = Capture()
    try:
        algo._log(state, capture)
    finally:
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
    return {"reads": len(reads), "metrics": capture.metrics}


def test_tiny_pruning_reaches_the_target_and_exports(mds_data, tmp_path):
    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    rec = Recorder()
    overrides = _pretrain_overrides(mds_data, tmp_path, 200) + ["eval_interval=100ba", "save_interval=200ba"]
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=[rec])
    trainer.fit()
    algo = next(a for a in trainer.state.algorithms if type(a).__name__ == "L0Pruning")
    expected = algo.masks.expected_shape()
    for key, want in algo.target.items():
        assert abs(expected[key] - want) <= 0.05 * want, (key, expected[key], want)
    assert (tmp_path / "checkpoints" / "masks" / "ba200.pt").exists()
    logged = read_metrics(tmp_path / "metrics.jsonl")  # the run's JSON-lines log, and the figures made from it
    assert abs(logged["pruning/expected_hidden"][200] - expected["hidden_size"]) < 0.05  # logged before the last step
    assert set(logged["metrics/eval/LanguageCrossEntropy_code"]) == {0, 100, 200}  # eval_first: step 0 too
    # the expected-mask model (what dynamic loading reads) and the top-k-to-target model are both evaluated
    assert set(logged["metrics/eval_target/LanguageCrossEntropy_code"]) == {0, 100, 200}
    assert "pruning/weak_kept_intermediate" in logged
    # a step's log reads the device once, and holds what the masks say when asked one value at a time
    step_log = _log_with_reads_counted(algo, trainer.state)
    assert step_log["reads"] == 1, step_log["reads"]
    metrics = step_log["metrics"]
    assert metrics["pruning/expected_hidden_size"] == pytest.approx(expected["hidden_size"])
    assert metrics["pruning/expected_params"] == pytest.approx(algo.masks.expected_params())
    assert {k: metrics[f"pruning/weak_kept_{k}"] for k in algo.masks.gates} == algo.masks.weak_kept()
    assert isinstance(metrics["pruning/lambda1_hidden"], float)
    for g in algo.masks.gates.values():  # clamped after every step
        assert -4.6052 - 1e-5 <= float(g.log_alpha.min()) and float(g.log_alpha.max()) <= 4.6052 + 1e-5
    figures = {p.name for p in plot_run(tmp_path, tmp_path / "plots")}
    assert figures == {"domain_losses.png", "domain_weights.png", "sparsity.png", "kept_units.png"}
    assert all((tmp_path / "plots" / f).stat().st_size > 10_000 for f in figures)
    model = trainer.state.model
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        masked = model({"input_ids": ids})
    trainer.close()

    out = export_checkpoint(tmp_path / "checkpoints" / "latest-rank0.pt", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = hf.config
    got = {k: getattr(cfg, k) for k in algo.target}
    assert got == algo.target
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - masked).abs().max().item() <= 1e-4
    # an existing model directory is never overwritten unless asked
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_checkpoint(tmp_path / "checkpoints" / "latest-rank0.pt", tmp_path / "hf")
    assert not list(tmp_path.glob("hf.tmp*"))  # nothing half-written left behind
    # the export carries the run's tokenizer: plain transformers generates text from the directory alone
    text = generate(out, "def ", max_new_tokens=8)
    assert text.startswith("def") and len(text) > len("def ")


def test_importance_init_seeds_the_masks_from_the_sources_activations(mds_data, tmp_path):
    from llmshearing.data import calibration_batch
    from llmshearing.pruning.importance import activation_scores, gate_scores

    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    overrides = _pretrain_overrides(mds_data, tmp_path, 10) + ["pruning.init=importance", "pruning.calibration_sequences=6"]
    trainer = build_trainer(load_config(yaml, overrides))  # INIT has run: the masks exist, nothing trained
    algo = next(a for a in trainer.state.algorithms if type(a).__name__ == "L0Pruning")
    assert all(float(g.log_alpha.max() - g.log_alpha.min()) < 0.1 for g in algo.masks.gates.values())  # not yet
    algo.apply(Event.FIT_START, trainer.state, trainer.logger)  # scored on the wrapped model, masks switched off
    hf = trainer.state.model.model
    ids = calibration_batch(str(mds_data), 6, 64)
    assert ids.shape == (6, 64)
    algo.hooks.remove()  # score the plain source
    want = gate_scores(activation_scores(hf, ids), {k: g.shape for k, g in algo.masks.gates.items()})
    for name, g in algo.masks.gates.items():
        assert torch.equal(g.log_alpha.detach().argsort(-1), want[name].argsort(-1)), name
        assert float(g.log_alpha.max() - g.log_alpha.min()) == pytest.approx(3.0, abs=1e-4)
    trainer.close()

    # init: target ranks by the same scores and starts every row at the target's expected size
    trainer = build_trainer(load_config(yaml, [o for o in overrides if o != "pruning.init=importance"]
                                        + ["pruning.init=target"]))
    algo = next(a for a in trainer.state.algorithms if type(a).__name__ == "L0Pruning")
    trainer.eval()  # the evaluation before the first step (eval_first) sees the initialised masks, not the reference's
    placed = {name: g.log_alpha.detach().clone() for name, g in algo.masks.gates.items()}
    algo.apply(Event.FIT_START, trainer.state, trainer.logger)  # and fit() does not score again
    for name, g in algo.masks.gates.items():
        assert torch.equal(g.log_alpha.detach(), placed[name]), name
        _, keep = g.deterministic("target")
        assert torch.equal(keep, want[name].argsort(-1, descending=True).argsort(-1) < g.keep), name
        assert float(g.prob_nonzero().sum(-1).mean()) == pytest.approx(g.keep, abs=1e-3), name
    loss, _ = algo.masks.lagrangian()
    assert abs(float(loss)) < 1e-6  # the constraint holds at the first step
    trainer.close()


def test_projected_constraint_holds_the_ramped_target_at_every_step_without_multipliers(mds_data, tmp_path):
    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    overrides = _pretrain_overrides(mds_data, tmp_path, 20) + ["pruning.constraint=projection", "eval_interval=20ba",
                                                                "save_interval=20ba", "pruning.lagrangian_warmup=10ba"]
    rec = Recorder()
    trainer = build_trainer(load_config(yaml, overrides), extra_callbacks=[rec])
    algo = next(a for a in trainer.state.algorithms if type(a).__name__ == "L0Pruning")
    lambdas = {id(p) for p in algo.masks.lambdas.values()}
    groups = trainer.state.optimizers[0].param_groups
    assert not any(id(p) in lambdas for g in groups for p in g["params"])  # no multipliers to learn
    trainer.fit()
    logged = read_metrics(tmp_path / "metrics.jsonl")
    for name, g in algo.masks.gates.items():
        got, want = logged[f"pruning/expected_{name}"], logged[f"pruning/target_{name}"]
        assert set(got) == set(range(1, 21))
        assert all(abs(got[s] - want[s]) < 1e-3 for s in got), name  # on the ramp and after it, every step
        assert abs(got[20] - g.keep) < 1e-3 and want[5] > g.keep + 0.5, name  # the ramp moved it there
        assert set(logged[f"pruning/lambda1_{name}"].values()) == {0.0}
    assert set(logged["loss/train/lagrangian"].values()) == {0.0}
    assert logged["loss/train/total"] == logged["loss/train/lm_loss"]
    # the masks still learned from the loss: the order within rows moved away from the initial noise's
    start = torch.randn(algo.masks.gates["intermediate"].shape,
                        generator=torch.Generator().manual_seed(1234 + sum(algo.masks.gates["intermediate"].shape)))
    assert not torch.equal(algo.masks.gates["intermediate"].log_alpha.detach().argsort(-1), start.argsort(-1))
    trainer.close()

    # resuming needs the same constraint (the multipliers' optimizer group exists in one and not the other) ...
    longer = [o for o in overrides if not o.startswith("max_duration=")] + ["max_duration=24ba"]
    with pytest.raises(ValueError, match="written with pruning.constraint=projection, this run has lagrangian"):
        build_trainer(load_config(yaml, [o for o in longer if o != "pruning.constraint=projection"]))
    # ... with it, the run continues on the target from its checkpoint
    trainer = build_trainer(load_config(yaml, longer))
    trainer.fit()
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert set(logged["pruning/expected_hidden"]) == set(range(1, 25))
    assert all(abs(logged["pruning/expected_hidden"][s] - 48) < 1e-3 for s in range(21, 25))
    trainer.close()


def test_cpu_bf16_autocast_trains_in_bf16_with_fp32_weights_and_tracks_fp32(mds_data, tmp_path):
    """``device=cpu precision=amp_bf16``: the pruning run's linear layers compute in bf16 (forward and evaluation),
    the weights, masks and optimizer stay fp32, and the losses follow the fp32 run's within bf16's error."""
    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    runs = {}
    for precision in ("fp32", "amp_bf16"):
        rec = Recorder()
        trainer = build_trainer(load_config(yaml, _pretrain_overrides(mds_data, tmp_path / precision, 4)
                                            + ["device=cpu", f"precision={precision}", "eval_interval=4ba"]),
                                extra_callbacks=[rec])
        dtypes = set()
        lin = next(m for m in trainer.state.model.modules() if isinstance(m, torch.nn.Linear))
        lin.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
        trainer.fit()
        assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}, dtypes
        assert {p.dtype for p in trainer.state.model.parameters()} == {torch.float32}
        assert str(trainer.state.precision) == "Precision.FP32"  # Composer's own context stays off on the CPU
        runs[precision] = (rec.losses, rec.logged["LanguageCrossEntropy"].item())
        trainer.close()
    (l32, e32), (l16, e16) = runs["fp32"], runs["amp_bf16"]
    assert len(l16) == len(l32) == 4 and all(abs(a - b) < 0.05 * a for a, b in zip(l32, l16)), (l32, l16)
    assert l16 != l32 and abs(e16 - e32) < 0.05 * e32, (e32, e16)  # not the same numbers, close ones


def test_a_gpu_yamls_bf16_stays_an_error_on_a_machine_without_a_gpu_unless_the_cpu_is_named(mds_data, tmp_path):
    from llmshearing.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="or device=cpu precision=amp_bf16"):
        build_trainer(load_config(yaml, _pretrain_overrides(mds_data, tmp_path, 2) + ["precision=amp_bf16"]))
    with pytest.raises(ConfigError, match="precision=amp_fp16 needs a GPU"):
        build_trainer(load_config(yaml, _pretrain_overrides(mds_data, tmp_path, 2) + ["device=cpu",
                                                                                      "precision=amp_fp16"]))
