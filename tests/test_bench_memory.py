"""The memory benchmark counts what autograd keeps, on the meta device."""
import torch
import torch.nn.functional as F

from bench.bench_memory import count_saved_bytes, label_vae_activations, training_peak


def test_counts_each_saved_storage_once():
    lin = torch.nn.Linear(16, 32, device="meta")
    x = torch.empty(8, 16, device="meta", requires_grad=True)
    with count_saved_bytes() as saved:
        y = lin(x)       # saves x (weights are parameters: not counted)
        F.relu(y).sum()  # saves relu's output
    assert saved["bytes"] == 8 * 16 * 4 + 8 * 32 * 4


def test_attention_is_counted_as_a_fused_kernel():
    q = torch.empty(1, 1, 1024, 64, device="meta", dtype=torch.float16, requires_grad=True)
    with count_saved_bytes() as saved:
        F.scaled_dot_product_attention(q, q * 1, q * 2)
    # q, k, v, out and a float32 logsumexp row: no 1024 x 1024 score matrix
    assert saved["bytes"] == 4 * 1024 * 64 * 2 + 1024 * 4


def test_label_vae_activations_grow_with_batch_and_peak_adds_optimizer_state():
    small, big = label_vae_activations(21, 1, 64), label_vae_activations(21, 2, 64)
    assert small["params"] == big["params"] > 1e6
    assert 1.9 < big["saved_bytes"] / small["saved_bytes"] < 2.1
    peak = training_peak(1_000_000, 0, 0, 0, "adamw", 0.0)
    assert abs(peak["peak_gib"] - 16e6 / 1024 ** 3) < 0.01
