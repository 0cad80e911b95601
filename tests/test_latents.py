"""dataset.latents: the joint trainer's latent data (views, memory-mapped cache rows, batches)."""
import numpy as np
import pytest
import torch

from dataset.latents import CachedSource, LatentBatches, MappedRows, dihedral_view


def test_dihedral_views_are_the_eight_rotations_and_flips():
    x = torch.arange(12.0).view(1, 3, 4)[:, :, :3]  # 3x3, no symmetry
    views = [dihedral_view(x, k) for k in range(8)]
    expected = [np.rot90(x[0].numpy(), r) for r in range(4)]
    expected += [np.fliplr(e) for e in expected]
    for got, want in zip(views, expected):
        np.testing.assert_array_equal(got[0].numpy(), want)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert all(v.is_contiguous() for v in views)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_mapped_rows_are_the_rows_of_the_concatenated_tensors(tmp_path, dtype):
    """The cache's dtypes under fp16 / bf16 / no mixed precision (and the token ids): rows gathered
    across files and parts come back as ``torch.cat(parts)[rows]``, bit for bit."""
    from safetensors.torch import save_file

    from utils.checkpoints import map_safetensors

    parts = [(torch.randn(n, 2, 3) * 100).to(dtype) for n in (5, 3, 4)]
    for k, part in enumerate(parts):
        save_file({"x": part, "other": torch.zeros(k + 1)}, tmp_path / f"{k}.safetensors")
    mapped = [map_safetensors(tmp_path / f"{k}.safetensors") for k in range(3)]
    assert all(dtypes["x"] == {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                               torch.int32: "I32"}[dtype] for _, dtypes, _ in mapped)
    rows = MappedRows([arrays["x"] for arrays, _, _ in mapped], bfloat16=dtype == torch.bfloat16)
    pick = torch.tensor([11, 0, 4, 5, 7, 8, 4])
    got = rows[pick]
    assert len(rows) == 12 and got.dtype == dtype and torch.equal(got, torch.cat(parts)[pick])


def test_batches_depend_on_seed_and_step_alone_so_a_resumed_run_sees_the_same_rows():
    source = CachedSource({}, 40, None, [])
    batches = LatentBatches(source, 4, 2, 1, seed=3, views=2)
    whole = [b.tolist() for _, b in zip(range(25), (b for _, b in batches.iterate()))]
    resumed = [b.tolist() for _, b in zip(range(13), (b for _, b in batches.iterate(12)))]
    assert whole[12:] == resumed and batches.steps_per_epoch == 5
    g1, g2 = batches.step_generator(7, "cpu"), batches.step_generator(7, "cpu")
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
