"""Fast paths of the set models' inference against plain references: bf16 autocast embeddings vs fp32, the table
lookup of the projected sine positions vs the per-token encoding, and the one-pass finiteness check."""
import math

import pytest
import torch

from xmretrieval.core import ConfigError, ShapeError, check_tensor, fork_rng
from xmretrieval.data.core import load_benchmark
from xmretrieval.index import recall_at_k
from xmretrieval.models.base import build_model
from xmretrieval.models.dive import SetPredictionModule, projected_sine_positions, sine_positions
from xmretrieval.train import load_config

BF16_EMBED_ATOL = 0.01   # max |bf16 - fp32| of a unit embedding's coordinates (measured: ~0.0015 at D=256)


def sine_reference(mask, dim, temperature=10000.0):
    "The per-token formula: channel i is sin (even i) or cos (odd i) of pos / temperature^(2 floor(i/2) / dim)."
    m = mask.float()
    pos = m.cumsum(1) / m.sum(1, keepdim=True).clamp(min=1) * (2 * math.pi)
    i = torch.arange(dim)
    ang = pos[..., None] / temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / dim)
    return torch.where(i % 2 == 0, ang.sin(), ang.cos()) * m[..., None]


@pytest.mark.parametrize("dim", [6, 7, 384])
def test_sine_positions_match_the_formula(dim):
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [False, True, False, True, True], [False] * 5])
    torch.testing.assert_close(sine_positions(mask, dim), sine_reference(mask, dim), atol=1e-6, rtol=0)


def test_projected_sine_positions_match_projecting_each_token():
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[0] = False; mask[1] = True
    w = torch.randn(12, 10, requires_grad=True)
    fast = projected_sine_positions(mask, w)
    ref = sine_reference(mask, 10) @ w.T
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad((fast * g).sum(), w)[0], torch.autograd.grad((ref * g).sum(), w)[0],
                               atol=1e-4, rtol=1e-5)


def test_text_set_module_equals_positions_added_to_the_inputs():
    "The SPM adds to_k(positions) to the keys from a table; the definition adds the positions to the key inputs."
    with fork_rng(0):
        spm = SetPredictionModule(3, context_dim=10, dim=8, depth=2, heads=2, head_dim=4, pos_encoding="sine").eval()
        local, glob = torch.randn(4, 7, 10), torch.randn(4, 8)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4, [False, True] * 3 + [True], [True] + [False] * 6])
    out, slots, _ = spm(local, glob, mask)
    ref_slots, _ = spm.agg(local, mask, sine_reference(mask, 10))      # keys from norm(x) + pos, values from norm(x)
    torch.testing.assert_close(slots, ref_slots, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, torch.nn.functional.normalize(spm.global_norm(glob)[:, None] + ref_slots, dim=-1),
                               atol=1e-5, rtol=1e-4)


def test_check_tensor_one_pass_finiteness():
    x = torch.randn(50, 40)
    assert check_tensor(x, "x") is x
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone(); y[3, 4] = bad
        with pytest.raises(ShapeError, match="`y` contains NaN or inf"): check_tensor(y, "y")
    y = x.clone(); y[3, 4], y[5, 6] = float("inf"), -float("inf")          # inf - inf: the sum is NaN
    with pytest.raises(ShapeError, match="NaN or inf"): check_tensor(y, "y")
    big = torch.full((10,), 3e38)                                          # finite values whose sum overflows
    assert check_tensor(big, "big") is big
    assert check_tensor(torch.full((10000,), 3e38, dtype=torch.bfloat16), "b").dtype == torch.bfloat16


@pytest.fixture(scope="module")
def dive_and_data():
    data = load_benchmark("emoji-scenes", "tiny", "test")
    cfg = load_config("dive_tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, {**cfg.model_config, "visual_dim": int(data.visual_local.shape[-1]),
                                    "text_dim": int(data.text_local.shape[-1])})
    return model, data


def test_bf16_embeddings_agree_with_fp32(dive_and_data, one_thread):
    model, data = dive_and_data
    t32, v32 = model.embed(data)
    t16, v16 = model.embed(data, batch_size=7, precision="bf16")            # several batches, a ragged last one
    for a, b in ((t16, t32), (v16, v32)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
        assert (a - b).abs().max() <= BF16_EMBED_ATOL
    s32, s16 = model.score(t32, v32), model.score(t16, v16)
    assert (s32 - s16).abs().max() <= 2 * BF16_EMBED_ATOL
    k = min(10, data.n_visual)
    assert recall_at_k(s16.topk(k).indices, s32.topk(k).indices) >= 0.9
    # fp32 embedding does not depend on the batch size (the batching is exact)
    t32b, v32b = model.embed(data, batch_size=5)
    torch.testing.assert_close(t32b, t32, atol=1e-5, rtol=0); torch.testing.assert_close(v32b, v32, atol=1e-5, rtol=0)


def test_embed_arguments_are_checked(dive_and_data):
    model, data = dive_and_data
    with pytest.raises(ConfigError, match="precision"): model.embed(data, precision="fp16")
    with pytest.raises(ConfigError, match="batch_size"): model.embed(data, batch_size=0)
