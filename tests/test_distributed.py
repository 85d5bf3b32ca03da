"""Two processes (``composer -n 2``, gloo on CPU) against one, same global batch: same data, same run."""

from __future__ import annotations

from tests.helpers import REPO, run_traced


def test_two_processes_match_one_in_batches_losses_masks_and_proportions(mds_data, tmp_path):
    yaml = REPO / "yamls" / "prune" / "tiny_cpu.yaml"
    common = [
        f"variables.data={mds_data}", "variables.vocab_size=512", "data.max_seq_len=64",
        "max_duration=12ba", "eval_interval=4ba", "save_interval=1000ba", "console_log_interval=1000ba",
        "global_train_batch_size=8", "device_train_microbatch_size=4", "data.eval_sequences_per_domain=12",
        "dynamic_loading.update=doremi", "dynamic_loading.reference_losses=[4.0,4.0,4.0]",
    ]
    one = run_traced(tmp_path / "one.pt", yaml, common + [f"variables.run_dir={tmp_path}/one"], nproc=1)
    two = run_traced(tmp_path / "two.pt", yaml, common + [f"variables.run_dir={tmp_path}/two"], nproc=2)

    assert len(one["batches"]) == 12
    assert one["batches"] == two["batches"]  # the same global batches, in order
    # the doremi update moved the proportions away from the initial ones, identically in both runs
    assert max(abs(a - b) for a, b in zip(one["proportions"][0], one["proportions"][-1])) > 1e-3
    for p1, p2 in zip(one["proportions"], two["proportions"]):
        assert max(abs(a - b) for a, b in zip(p1, p2)) <= 1e-5
    for l1, l2 in zip(one["losses"], two["losses"]):
        assert l1.keys() == l2.keys() and "loss/train/lagrangian" in l1
        assert all(abs(l1[k] - l2[k]) <= 1e-5 for k in l1), (l1, l2)
    assert one["tensors"].keys() == two["tensors"].keys()
    assert any(k.startswith("masks.lambdas") for k in one["tensors"])
    for k, t in one["tensors"].items():
        assert (t.float() - two["tensors"][k].float()).abs().max().item() <= 1e-5, k
