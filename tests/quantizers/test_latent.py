"""Latent quantization: per-dimension scalar codebooks, their losses, and the
weight-decay parameter groups."""

from __future__ import annotations

import pytest
import torch

from tokenizers_vq.quantizers import LatentQuantizer, latent_quantization_param_groups


def test_each_dimension_snaps_to_its_own_values():
    lq = LatentQuantizer(3, values_per_dim=4)
    with torch.no_grad():
        lq.values.copy_(torch.tensor([[-1.0, 0.0, 1.0, 2.0], [10.0, 20.0, 30.0, 40.0], [0.5, -0.5, 0.25, -0.25]]))
    z = torch.tensor([[0.4, 26.0, -0.3], [1.6, 9.0, 0.3]])
    out = lq.eval()(z)
    assert out.codes.tolist() == [[1, 2, 3], [3, 0, 2]]
    assert out.quantized.tolist() == [[0.0, 30.0, -0.25], [2.0, 10.0, 0.25]]


def test_quantization_loss_moves_values_and_commitment_moves_encoder():
    torch.manual_seed(0)
    lq = LatentQuantizer(4, values_per_dim=5)
    z = torch.randn(64, 4, requires_grad=True)
    out = lq(z)
    assert set(out.losses) == {"quantization", "commitment"}
    out.losses["quantization"].backward(retain_graph=True)
    assert lq.values.grad.abs().sum() > 0 and z.grad is None
    out.losses["commitment"].backward()
    assert z.grad.abs().sum() > 0


def test_training_fits_values_to_clustered_latents():
    torch.manual_seed(0)
    lq = LatentQuantizer(2, values_per_dim=3, init_range=0.5)
    targets = torch.tensor([[-3.0, 0.0, 3.0], [-1.0, 0.2, 1.5]])  # each value starts nearest one cluster
    opt = torch.optim.Adam(lq.parameters(), lr=0.05)
    for _ in range(300):
        z = targets.gather(1, torch.randint(0, 3, (2, 256))).t()
        loss = lq(z + 0.01 * torch.randn_like(z)).total_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = lq.values.detach().sort(dim=1).values
    assert torch.allclose(learned, targets, atol=0.1), learned


def test_param_groups_put_codebooks_apart():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), LatentQuantizer(4), torch.nn.Linear(4, 8))
    groups = latent_quantization_param_groups(model, weight_decay=0.01, codebook_weight_decay=0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.01]
    assert groups[0]["params"] == [model[1].values]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"init_range": float("nan")}, r"init_range must be a number in \(0, "),
    ({"init_range": float("inf")}, r"init_range must be a number in \(0, "),
    ({"init_range": 1e30}, r"init_range must be a number in \(0, "),  # squared distances past float32
    ({"init_range": 0.0}, r"init_range must be a number in \(0, "),
    ({"quantize_weight": -1.0}, r"quantize_weight must be a number in \[0, inf\)"),
    ({"commit_weight": float("nan")}, r"commit_weight must be a number in \[0, inf\)"),
    ({"values_per_dim": 4.5}, r"values_per_dim must be a whole number in \[2, inf\), got 4.5"),
    ({"values_per_dim": 1}, r"values_per_dim must be a whole number in \[2, inf\), got 1"),
])
def test_arguments_out_of_range_are_refused_by_name(kwargs, said):
    """Not NaN values or losses, a negative loss or a raw TypeError from linspace."""
    with pytest.raises(ValueError, match=said):
        LatentQuantizer(8, **kwargs)
