"""Mask dynamics as the reference implementation: start, clamp, per-row penalty, expected-mask evaluation,
weak kept units; activation importance (one-shot selection and mask initialisation)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llmshearing.config import ConfigError, PruningConfig, TargetShape, build_dataclass
from llmshearing.models.families import describe_shape
from llmshearing.pruning import HardConcrete, ShearingMasks, materialize, resolve_target
from llmshearing.pruning.baselines import select_masks
from llmshearing.pruning.importance import activation_scores, gate_scores
from llmshearing.pruning.masks import LOG_ALPHA_MAX, LOG_ALPHA_MIN
from tests.helpers import make_tiny_model

ALL = ["layer", "head", "intermediate", "hidden"]


def _masks(name="llama3_gqa", target=TargetShape(2, 40, 4, 1, 50), **kw):
    src = describe_shape(make_tiny_model(name).config)
    return ShearingMasks(src, resolve_target(src, target, ALL), ALL, **kw)


def test_masks_start_from_the_intact_source():
    masks = _masks()
    for name, g in masks.gates.items():
        u = torch.rand((4000, *g.shape), generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
        z = g.sample(u)
        assert abs(float((z == 1).float().mean()) - 0.953) < 0.02, name  # P(z = 1) = sigmoid(4.6 - beta ln 11)
        assert float((z == 0).float().mean()) < 0.005, name
        assert float(z.mean()) > 0.98, name
        assert float(g.log_alpha.max()) <= LOG_ALPHA_MAX + 1e-6


def test_clamp_bounds_log_alpha():
    masks = _masks()
    with torch.no_grad():
        for g in masks.gates.values():
            g.log_alpha.copy_(torch.linspace(-20, 20, g.log_alpha.numel()).view(g.shape))
    masks.clamp_()
    for g in masks.gates.values():
        assert float(g.log_alpha.min()) == pytest.approx(LOG_ALPHA_MIN)
        assert float(g.log_alpha.max()) == pytest.approx(LOG_ALPHA_MAX)


def test_penalty_is_per_row_so_rows_cannot_trade_off():
    """One layer over-keeps and one under-keeps by the same amount: the mean meets the target, and a penalty on
    the mean gap would be zero; the per-row penalty is positive and pulls each row toward the target."""
    src = describe_shape(make_tiny_model("llama2_mha").config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(3, 32, 4, None, 24), ["intermediate"]), ["intermediate"])
    masks.set_progress(1.0)  # target: 24 of 48 channels per layer
    g = masks.gates["intermediate"]
    with torch.no_grad():
        g.log_alpha.fill_(LOG_ALPHA_MIN)
        g.log_alpha[0, :36] = LOG_ALPHA_MAX  # layer 0 keeps ~36, layer 1 ~12, layer 2 ~24
        g.log_alpha[1, :12] = LOG_ALPHA_MAX
        g.log_alpha[2, :24] = LOG_ALPHA_MAX
        masks.lambdas["intermediate"].copy_(torch.tensor([0.0, 1.0]))
    mean_gap = float(g.prob_nonzero().sum(-1).mean()) / 48 - 0.5  # the layers' mean is (nearly) on target
    loss, _ = masks.lagrangian()
    assert float(loss) > 0.02 and float(loss) > 20 * mean_gap**2
    loss.backward()
    grad = g.log_alpha.grad
    assert grad[0, :36].sum() > 0 and grad[1, :12].sum() < 0  # descent: layer 0 drops channels, layer 1 regains


def test_expected_mode_keeps_what_the_gates_expect_and_target_mode_the_target():
    gate = HardConcrete((10,), keep=5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([LOG_ALPHA_MAX] * 7 + [LOG_ALPHA_MIN] * 3))
    values, keep = gate.deterministic("expected")
    assert keep.tolist() == [True] * 7 + [False] * 3  # 3 expected zeros
    assert torch.allclose(values[:7], torch.sigmoid(gate.log_alpha[:7] / gate.temperature * 0.8))
    _, keep_t = gate.deterministic("target")
    assert int(keep_t.sum()) == 5 and bool(keep_t[:7].sum() == 5)


def test_expected_mode_is_per_row():
    gate = HardConcrete((2, 8), keep=4)
    with torch.no_grad():
        gate.log_alpha.fill_(LOG_ALPHA_MIN)
        gate.log_alpha[0, :6] = LOG_ALPHA_MAX
        gate.log_alpha[1, :2] = LOG_ALPHA_MAX
    assert gate.kept_per_row("expected").tolist() == [6, 2]
    _, keep = gate.deterministic("expected")
    assert keep.sum(-1).tolist() == [6, 2]


def test_eval_forward_follows_the_eval_mode():
    model = make_tiny_model("llama2_mha")
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(3, 32, 4, None, 24), ["intermediate"]), ["intermediate"])
    from llmshearing.pruning import attach_masks

    attach_masks(model, masks)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masks.eval_mode = "expected"  # at the start every channel is expected to stay
        full = model(input_ids=ids).logits
        assert int((masks.z["intermediate"] > 0).sum()) >= 47 * 3
        masks.eval_mode = "target"
        half = model(input_ids=ids).logits
        assert int((masks.z["intermediate"] > 0).sum()) == 24 * 3
    assert (full - half).abs().max() > 1e-3


def test_weak_kept_units_are_counted_and_materialisation_warns(caplog):
    model = make_tiny_model("llama2_mha")
    src = describe_shape(model.config)
    masks = ShearingMasks(src, resolve_target(src, TargetShape(3, 32, 4, None, 24), ["intermediate"]), ["intermediate"])
    with torch.no_grad():
        masks.gates["intermediate"].log_alpha[1, :30] = -3.0  # 24 of 48 kept: 6 of the kept ones are weak
    assert masks.weak_kept() == {"intermediate": 6}
    det = masks.deterministic()
    assert det.weak_kept()["intermediate"] == 6
    with caplog.at_level(logging.WARNING):
        materialize(model, det)
    assert "below 0.1" in caplog.text and "'intermediate': 6" in caplog.text


def test_init_from_scores_follows_the_ranking_within_the_clamp():
    masks = _masks()
    gen = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(g.shape, generator=gen) for k, g in masks.gates.items()}
    masks.init_from_scores(scores, spread=3.0)
    for name, g in masks.gates.items():
        la = g.log_alpha.detach()
        assert torch.equal(la.argsort(-1), scores[name].argsort(-1)), name
        assert float(la.max()) == pytest.approx(LOG_ALPHA_MAX) and float(la.min()) == pytest.approx(LOG_ALPHA_MAX - 3.0)
    # the target ramp starts from the new expected sizes, so the constraint starts satisfied
    loss, _ = masks.lagrangian()
    assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize("log_alpha_min", [LOG_ALPHA_MIN, math.log(1e-4)])
def test_init_at_target_starts_at_the_target_with_the_ranking_top_k_kept(log_alpha_min):
    masks = _masks(log_alpha_min=log_alpha_min)
    gen = torch.Generator().manual_seed(2)
    scores = {k: torch.rand(g.shape, generator=gen) for k, g in masks.gates.items()}
    masks.init_from_scores(scores, spread=12.0, at_target=True)
    for name, g in masks.gates.items():
        la = g.log_alpha.detach()
        # log_alpha falls with the importance rank (ties only where the line meets the clamp)
        by_rank = la.gather(-1, scores[name].argsort(-1, descending=True))
        assert bool((by_rank[..., 1:] <= by_rank[..., :-1]).all()), name
        assert bool((by_rank[..., 1:] < by_rank[..., :-1]).any()), name
        # every row expects exactly the target's count (the clamp included) ...
        assert torch.allclose(g.prob_nonzero().sum(-1), torch.full(g.shape[:-1], float(g.keep)), atol=1e-3), name
        # ... the top-k by importance is the kept set, and the boundary sits at the gate threshold (P = 1/2; with the
        # reference clamp the pruned units' floor of 0.047 each pulls it a little below): the gates start out of
        # saturation there, where the constraint's gradient does not vanish
        _, keep = g.deterministic("target")
        assert torch.equal(keep, scores[name].argsort(-1, descending=True).argsort(-1) < g.keep), name
        p = g.prob_nonzero()
        assert float(p[keep].min()) > 0.4 and float(p[~keep].max()) < 0.5, name
        if log_alpha_min < LOG_ALPHA_MIN:
            assert float(p[keep].min()) > 0.5, name
        assert float(la.min()) >= log_alpha_min - 1e-6 and float(la.max()) <= LOG_ALPHA_MAX + 1e-6
    # the ramp is flat: the constraint holds from the first step and the ramp's end
    for progress in (0.0, 1.0):
        masks.set_progress(progress)
        loss, logs = masks.lagrangian()
        logs = {k: float(v) for k, v in logs.items()}  # device values are tensors
        assert abs(float(loss)) < 1e-6
        for name, g in masks.gates.items():
            assert logs[f"expected_{name}"] == pytest.approx(logs[f"target_{name}"], abs=1e-3)


@pytest.mark.parametrize("log_alpha_min", [LOG_ALPHA_MIN, math.log(1e-4)])
def test_projection_puts_every_row_on_the_count_and_keeps_its_order(log_alpha_min):
    g = HardConcrete((6, 40), keep=10, log_alpha_min=log_alpha_min)
    with torch.no_grad():
        g.log_alpha.copy_((torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 3).clamp(log_alpha_min, LOG_ALPHA_MAX))
    before = g.log_alpha.detach().clone()
    order = before.argsort(-1, descending=True)
    for count in (10.0, 23.5, 10.0):
        g.project_(count)
        la = g.log_alpha.detach()
        assert torch.allclose(g.prob_nonzero().sum(-1), torch.full((6,), count), atol=1e-3), count
        assert float(la.min()) >= log_alpha_min - 1e-6 and float(la.max()) <= LOG_ALPHA_MAX + 1e-6
        by_rank = la.gather(-1, order)  # the order within a row is kept (ties only at the clamp)
        assert bool((by_rank[..., 1:] <= by_rank[..., :-1] + 1e-6).all()), count
    # one shift per row: where neither the start nor the end is at a bound, every unit of a row moved alike
    la = g.log_alpha.detach()
    inner = (before > log_alpha_min + 1e-3) & (before < LOG_ALPHA_MAX - 1e-3) & (la > log_alpha_min + 1e-3) \
        & (la < LOG_ALPHA_MAX - 1e-3)
    shift = la - before
    for r in range(6):
        assert int(inner[r].sum()) > 5 and float(shift[r][inner[r]].max() - shift[r][inner[r]].min()) < 1e-4
    # a count the clamp cannot reach ends at the bound
    g.project_(40.0)
    assert float(g.log_alpha.min()) == pytest.approx(LOG_ALPHA_MAX)
    # ShearingMasks projects every structure onto its ramped target (0: the start sizes, 1: the target)
    masks = _masks()
    for progress in (1.0, 0.5):
        masks.project_(progress)
        masks.set_progress(progress)
        loss, logs = masks.lagrangian()
        logs = {k: float(v) for k, v in logs.items()}  # device values are tensors
        for name, g in masks.gates.items():
            assert logs[f"expected_{name}"] == pytest.approx(logs[f"target_{name}"], abs=1e-3), (name, progress)
            if progress == 1.0:
                assert logs[f"expected_{name}"] == pytest.approx(g.keep, abs=1e-3), name


def test_projected_masks_learn_which_units_matter_and_never_leave_the_ramped_target():
    # a row of 20 units of which the last 5 lower the loss; the target ramps from all 20 to 5 over 30 steps
    g = HardConcrete((4, 20), keep=5)
    useful = torch.zeros(4, 20)
    useful[:, 15:] = 1.0
    opt = torch.optim.Adam([g.log_alpha], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    start = float(g.prob_nonzero().sum(-1).mean())
    for step in range(150):
        z = g.sample(torch.rand(4, 20, generator=gen).clamp(1e-6, 1 - 1e-6))
        loss = -(z * useful).sum() + 0.1 * (z * (1 - useful)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        g.clamp_()
        count = start + min(1.0, (step + 1) / 30) * (5 - start)
        g.project_(count)
        assert torch.allclose(g.prob_nonzero().sum(-1), torch.full((4,), count), atol=1e-3), step
    _, keep = g.deterministic("target")
    assert bool(keep[:, 15:].all()) and int(keep.sum()) == 20


def test_the_constraint_is_a_config_choice():
    T4 = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24}
    assert build_dataclass(PruningConfig, {"target": T4}, "pruning").constraint == "lagrangian"
    assert build_dataclass(PruningConfig, {"constraint": "projection", "target": T4}, "pruning").constraint == "projection"
    with pytest.raises(ConfigError, match="pruning.constraint='penalty': use 'lagrangian'"):
        build_dataclass(PruningConfig, {"constraint": "penalty", "target": T4}, "pruning")


def test_target_init_is_a_config_choice_that_needs_no_spread():
    T4 = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 24}
    cfg = build_dataclass(PruningConfig, {"init": "target", "target": T4}, "pruning")
    assert cfg.init == "target" and cfg.importance_spread is None
    with pytest.raises(ConfigError, match="'reference', 'importance' or 'target'"):
        build_dataclass(PruningConfig, {"init": "ranked", "target": T4}, "pruning")


def _silenced_model():
    """A tiny GQA model with known dead units: KV group 1 of layer 0 (its V rows are zero, so are its heads'
    outputs), FFN channels 0..9 of every layer (zero up_proj rows), hidden dim 5 (zero in every norm) and layer 2
    (it writes nothing into the residual stream)."""
    model = make_tiny_model("llama3_gqa")
    hd = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[hd : 2 * hd] = 0
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:10] = 0
            layer.input_layernorm.weight[5] = 0
            layer.post_attention_layernorm.weight[5] = 0
        model.model.norm.weight[5] = 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model


def test_activation_scores_find_dead_units():
    model = _silenced_model()
    ids = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    s = activation_scores(model, ids, batch_size=4)
    H, G = model.config.num_attention_heads, model.config.num_key_value_heads
    q = H // G
    assert s["head"].shape == (3, H) and s["kv_group"].shape == (3, G) and s["intermediate"].shape == (3, 96)
    assert torch.all(s["head"][0, q : 2 * q] < 1e-6) and torch.all(s["head"][0, :q] > 1e-3)
    assert float(s["kv_group"][0, 1]) < 1e-6
    assert torch.all(s["intermediate"][:, :10] < 1e-6) and torch.all(s["intermediate"][:, 10:] > 0)
    assert float(s["hidden"][5]) < 1e-6 and float(s["hidden"].min(0).values) == float(s["hidden"][5])
    assert float(s["layer"][2]) < 1e-5 and torch.all(s["layer"][:2] > 1e-3)
    assert model.training is False
    # one-shot activation selection drops exactly those units, in a uniform target shape
    det = select_masks(model, {"num_hidden_layers": 2, "hidden_size": 63, "num_attention_heads": 4,
                               "num_key_value_heads": 1, "intermediate_size": 86}, "activation", calibration=ids)
    assert det.layer_keep.tolist() == [True, True, False]
    assert not det.hidden_keep[5] and int(det.hidden_keep.sum()) == 63
    assert not det.intermediate_keep[:, :10].any()
    assert not det.kv_keep[0, 1]
    small = materialize(model, det)
    assert small.config.num_key_value_heads == 1 and small.config.num_attention_heads == 4


def test_gate_scores_reshape_gqa_heads_into_groups():
    masks = _masks(target=TargetShape(2, 40, 2, 1, 50))
    model = make_tiny_model("llama3_gqa")
    ids = torch.randint(0, 160, (2, 8), generator=torch.Generator().manual_seed(0))
    s = gate_scores(activation_scores(model, ids), {k: g.shape for k, g in masks.gates.items()})
    assert s["head"].shape == (3, 2, 4) and s["kv_group"].shape == (3, 2)
    masks.init_from_scores(s, 2.0)


def test_activation_selection_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        select_masks(make_tiny_model("llama2_mha"), {"num_hidden_layers": 2, "hidden_size": 16,
                                                     "num_attention_heads": 2, "intermediate_size": 24}, "activation")


TARGET = TargetShape(2, 16, 2, None, 24)


def test_config_names_the_replaced_droprate_init():
    with pytest.raises(ConfigError, match="init_log_alpha"):
        build_dataclass(PruningConfig, {"droprate_init": 0.5}, "pruning.")
    with pytest.raises(ConfigError, match="'reference', 'importance' or 'target'"):
        PruningConfig(target=TARGET, init="magnitude")
    with pytest.raises(ConfigError, match="outside the clamp"):
        PruningConfig(target=TARGET, init_log_alpha=math.log(1000))


def test_a_lower_clamp_makes_pushed_down_units_count_nothing():
    """At the reference's clamp a unit pushed down still counts P(z != 0) = 0.047 in the expected size, so 20 dead
    units weigh as much as one alive; with log_alpha_min = ln 1e-4 they count ~0.0005 each."""
    for lo, per_dead in ((LOG_ALPHA_MIN, 0.047), (math.log(1e-4), 0.0005)):
        gate = HardConcrete((1, 60), keep=10, log_alpha_min=lo)
        with torch.no_grad():
            gate.log_alpha.fill_(-20.0)
            gate.log_alpha[0, :10] = LOG_ALPHA_MAX
        gate.clamp_()
        assert float(gate.log_alpha.min()) == pytest.approx(lo)
        dead = float(gate.prob_nonzero()[0, 10:].mean())
        assert dead == pytest.approx(per_dead, rel=0.1)


def test_frozen_weights_leave_the_source_untouched_while_the_masks_learn(mds_data, tmp_path):
    from tests.helpers import REPO, save_tiny_cpu_source
    from llmshearing.config import load_config
    from llmshearing.trainer import build_trainer

    src = save_tiny_cpu_source(tmp_path / "src")
    cfg = load_config(REPO / "yamls" / "prune" / "tiny_cpu.yaml", [
        f"variables.data={mds_data}", f"variables.run_dir={tmp_path / 'run'}", f"variables.source={src}",
        "variables.vocab_size=512", "data.max_seq_len=64", "max_duration=3ba", "eval_interval=100ba",
        "save_interval=100ba", "global_train_batch_size=4", "device_train_microbatch_size=4",
        "pruning.freeze_weights=true", "pruning.log_alpha_min=-9.2"])
    trainer = build_trainer(cfg)
    before = {k: v.clone() for k, v in trainer.state.model.model.state_dict().items()}
    masks_before = {k: v.clone() for k, v in trainer.state.model.masks.state_dict().items()}
    trainer.fit()
    after = trainer.state.model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(masks_before[k], v) for k, v in trainer.state.model.masks.state_dict().items())
    assert all(g.log_alpha_min == -9.2 for g in trainer.state.model.masks.gates.values())
    trainer.close()


def test_top_k_takes_units_tied_at_the_clamp_in_index_order():
    """At convergence many units sit exactly at the lower clamp and still count towards the expected size, so top-k
    picks among exact ties. They are taken in index order (a stable sort), so evaluation on a GPU and the export on
    the CPU keep the same units; the default sort orders ties differently on each (and on the CPU, not by index)."""
    gate = HardConcrete((2, 64), keep=40)
    with torch.no_grad():
        gate.log_alpha.fill_(LOG_ALPHA_MIN)
        gate.log_alpha[:, ::2] = 5.0  # 32 live units per row: 8 more must come from the 32 tied ones
    _, keep = gate.deterministic("target")
    tied_kept = [torch.nonzero(row[1::2]).flatten().tolist() for row in keep]
    assert tied_kept == [list(range(8))] * 2
    assert keep[:, ::2].all()


def test_flash_attention_scores_under_bf16_autocast_on_a_gpu_only():
    """flash-attn takes fp16 / bf16 only, and the source is scored in fp32 outside the trainer's precision context."""
    from types import SimpleNamespace

    from llmshearing.pruning.importance import scores_in_bf16

    def bf16(attn: str, device: str) -> bool:
        return scores_in_bf16(SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn)), torch.device(device))

    assert bf16("flash_attention_2", "cuda")
    assert not bf16("sdpa", "cuda") and not bf16("eager", "cuda") and not bf16("flash_attention_2", "cpu")


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_scoring_runs_its_forwards_under_the_scoring_autocast(bf16, monkeypatch):
    """activation_scores enters scoring_autocast around every forward (forced on here: on the CPU, CPU autocast)."""
    import llmshearing.pruning.importance as importance

    monkeypatch.setattr(importance, "scores_in_bf16", lambda model, device: bf16)
    model = make_tiny_model("llama2_mha")
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    activation_scores(model, torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0)), batch_size=2)
    assert seen == [bf16, bf16]


def test_a_training_forwards_masks_and_lagrangian_read_nothing_back_from_the_device(monkeypatch):
    """Sampling a forward's masks and the Lagrangian run every micro-batch: a value read back to the host there (a
    ``float()``, ``.item()``, ``int()``) makes a GPU wait each time. Checked on CPU by making such reads fail."""
    masks = _masks()
    masks.set_progress(0.5)

    def read_back(*args, **kwargs):
        raise AssertionError("a device value read back to the host")

    for name in ("__float__", "__int__", "__index__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    z = masks.sampled()
    loss, logs = masks.lagrangian()
    monkeypatch.undo()
    assert isinstance(z["hidden_count"], torch.Tensor) and float(z["hidden_count"]) == float((z["hidden"] != 0).sum())
    assert all(isinstance(logs[f"expected_{k}"], torch.Tensor) for k in masks.gates)
    assert logs["target_hidden"] == pytest.approx(masks.ramped_target("hidden", 0.5))
    with torch.no_grad():  # the optimizer's in-place step comes before the step's log: the log keeps this step's
        masks.lambdas["hidden"].add_(1.0)
    assert float(logs["lambda1_hidden"]) == 0.0
