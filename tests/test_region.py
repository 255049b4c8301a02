"""The region reference model: smooth max over regions against a plain loop (values, gradients, masks), chunked
scoring, raw inputs, a set gallery, configs, and short training runs (trainer and CLI) on the tiny emoji-scenes split."""
import math

import pytest
import torch
import torch.nn.functional as F

from xmretrieval.checkpoint import load_config
from xmretrieval.cli import xmr_eval, xmr_index, xmr_search, xmr_train
from xmretrieval.core import ConfigError, ShapeError
from xmretrieval.data.core import load_benchmark
from xmretrieval.data.emoji import render_item
from xmretrieval.index import Gallery, SetIndexConfig
from xmretrieval.models.base import build_model, text_batch, visual_batch
from xmretrieval.models.region import RegionConfig, RegionModel, region_mask, smooth_max_similarity
from xmretrieval.repro.dive import chance_metrics
from xmretrieval.similarity import mean_sim
from xmretrieval.train import Trainer, evaluate, load_checkpoint


def unit(g, *shape):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def loop_smooth_max(t, v, mask, alpha):
    "Plain definition: for each caption i and item j, (1/alpha) log sum over j's valid regions of exp(alpha cos)."
    rows = []
    for i in range(len(t)):
        row = []
        for j in range(len(v)):
            terms = [alpha * (t[i] @ v[j, r]) for r in range(v.shape[1]) if mask[j, r]]
            row.append(torch.logsumexp(torch.stack(terms), 0) / alpha)
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("alpha", [4.0, 16.0, 60.0])   # 60: smooth_chamfer's logsumexp form (alpha > 40)
@pytest.mark.parametrize("chunk", [None, 2])
def test_smooth_max_equals_a_loop_value_and_gradient(alpha, chunk):
    g = torch.Generator().manual_seed(0)
    t, v = unit(g, 5, 12), unit(g, 7, 6, 12)
    mask = torch.rand(7, 6, generator=g) > 0.4
    mask[:, 0] = True
    t1, v1 = t.clone().requires_grad_(), v.clone().requires_grad_()
    t2, v2 = t.clone().requires_grad_(), v.clone().requires_grad_()
    got = smooth_max_similarity(t1, v1, alpha, mask, chunk_size=chunk)
    ref = loop_smooth_max(t2, v2, mask, alpha)
    assert got.shape == (5, 7) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (got * w).sum().backward(); (ref * w).sum().backward()
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v1.grad, v2.grad, atol=1e-10, rtol=1e-10)
    assert v1.grad[~mask].abs().max() == 0          # padded regions get no gradient


def test_padded_regions_never_win():
    g = torch.Generator().manual_seed(1)
    t, v = unit(g, 3, 8).float(), unit(g, 4, 5, 8).float()
    mask = torch.ones(4, 5, dtype=torch.bool); mask[1, 2:] = False
    base = smooth_max_similarity(t, v, 16.0, mask)
    v_bad = v.clone(); v_bad[1, 2:] = t[0]          # padding that would be a perfect match for caption 0
    torch.testing.assert_close(smooth_max_similarity(t, v_bad, 16.0, mask), base, atol=1e-6, rtol=0)
    assert smooth_max_similarity(t, v_bad, 16.0)[0, 1] > base[0, 1] + 0.1   # unmasked, it would have won
    # the model marks padding by zero rows, and its similarity reads the mask from them
    m = RegionModel(RegionConfig(visual_dim=10, text_dim=6, embed_dim=8)).eval()
    local = torch.randn(2, 5, 10); vmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ve = m.encode_visual({"visual_local": local, "visual_mask": vmask})
        local2 = local.clone(); local2[0, 3:] = 1e3
        ve2 = m.encode_visual({"visual_local": local2, "visual_mask": vmask})
        te = m.encode_text({"text_global": torch.randn(3, 6)})
        assert torch.equal(region_mask(ve), vmask) and ve[0, 3:].abs().max() == 0
        torch.testing.assert_close(m.similarity(te, ve2), m.similarity(te, ve), atol=1e-6, rtol=0)
        ref = loop_smooth_max(te[:, 0].double(), ve.double(), vmask, m.config.alpha)
        torch.testing.assert_close(m.similarity(te, ve).double(), ref, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    return {s: load_benchmark("emoji-scenes", "tiny", s) for s in ("train", "test")}


@pytest.fixture(scope="module")
def trained(tiny):
    "region_tiny trained by the shared trainer (3 epochs), and its summary."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config("region_tiny"))
        summary = trainer.fit()
    finally:
        torch.set_num_threads(n)
    return trainer.model.eval(), summary


def test_shapes_and_chunked_score_equal_full_score(trained, tiny):
    model, _ = trained
    d = tiny["test"]
    te, ve = model.embed(d, batch_size=7)
    assert te.shape == (d.n_text, 1, 64) and ve.shape == (d.n_visual, 49, 64)
    torch.testing.assert_close(te.norm(dim=-1), torch.ones(d.n_text, 1), atol=1e-5, rtol=0)
    full = model.similarity(te, ve)
    for chunk in (1, 13, 10_000):
        torch.testing.assert_close(model.score(te, ve, chunk_size=chunk), full, atol=1e-6, rtol=0)


def test_training_beats_chance_by_a_wide_margin(trained, tiny):
    model, summary = trained
    d = tiny["test"]
    chance = chance_metrics(d.text_to_visual, d.n_visual)["RSUM"]
    rsum = evaluate(model, d)["RSUM"]
    assert rsum == pytest.approx(summary["test"]["RSUM"], abs=1e-6)
    # measured (region_tiny, seed 0, 30 steps): training split RSUM ~590 of 600, test split 96.7 against chance 64.8;
    # the tiny test split holds only emoji groups never seen in training (the unseen-concept protocol)
    train_rsum = evaluate(model, tiny["train"])["RSUM"]
    assert train_rsum > 6 * chance, f"train RSUM {train_rsum:.1f} vs chance {chance:.1f}"
    assert rsum > chance + 20, f"test RSUM {rsum:.1f} vs chance {chance:.1f}"


def test_raw_inputs_match_the_feature_path(trained, tiny):
    model, _ = trained
    d = tiny["test"]
    with torch.no_grad():
        ref_t = model.encode_text(text_batch(d, range(4)))
        ref_v = model.encode_visual(visual_batch(d, [0, 1]))
    torch.testing.assert_close(model.encode_text(d.captions[:4]), ref_t, atol=2e-4, rtol=0)
    imgs = [render_item("emoji-scenes", "tiny", "test", i) for i in (0, 1)]
    torch.testing.assert_close(model.encode_visual(imgs), ref_v, atol=2e-4, rtol=0)


def test_set_gallery_search(trained, tiny):
    model, _ = trained
    d = tiny["test"]
    te, ve = model.embed(d)
    gal = Gallery(model.index_embeddings(ve), d.visual_ids,
                  SetIndexConfig(similarity="smooth_chamfer", alpha=model.config.alpha, element_k=ve.shape[0] * 49))
    res = gal.search(model.index_embeddings(te[:20]), k=5)
    # the gallery ranks by Smooth-Chamfer = (smooth max + mean cosine) / 2 over the item's regions
    half = (model.score(te[:20], ve) + mean_sim(te[:20], ve)) / 2
    torch.testing.assert_close(res.scores, half.topk(5).values, atol=1e-5, rtol=0)


def test_bf16_autocast_training_runs_and_scores_in_float32(one_thread):
    trainer = Trainer(load_config("region_tiny", epochs=1, bf16=True))
    summary = trainer.fit()
    assert math.isfinite(summary["test"]["RSUM"])
    m = trainer.model.eval()
    te = F.normalize(torch.randn(3, 1, 64), dim=-1)
    ve = F.normalize(torch.randn(4, 49, 64), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_bf = m.similarity(te.bfloat16(), ve)
    assert s_bf.dtype == torch.float32
    torch.testing.assert_close(s_bf, m.similarity(te.bfloat16().float(), ve), atol=1e-6, rtol=0)


def test_cli_trains_and_reloads(tmp_path, one_thread):
    out = tmp_path / "run"
    summary = xmr_train("region_tiny", out=str(out), epochs=1)
    assert summary["model"] == "region"
    model, cfg, _ = load_checkpoint(out / "best.safetensors", model_name="region")
    assert isinstance(model, RegionModel) and cfg.model == "region"
    res = xmr_eval(str(out / "best.safetensors"), split="test")
    assert res["metrics"]["RSUM"] == pytest.approx(summary["test"]["RSUM"], abs=1e-6)
    # `xmr index` / `xmr search`: region sets in a set gallery, a raw caption as a one-element query set
    index = xmr_index(str(out / "best.safetensors"), out=str(tmp_path / "test.index"))
    hits = xmr_search(str(index), "a dog face above a pizza", k=3)
    assert len(hits) == 3 and all(h[0] is not None for h in hits) and hits[0][1] >= hits[2][1]


@pytest.mark.parametrize("field,value", [("loss", "nce"), ("head", "deep"), ("reduction", "max"), ("alpha", 0.0),
                                         ("alpha", float("inf")), ("temperature", -1.0), ("margin", -0.1),
                                         ("dropout", 1.0), ("embed_dim", 0), ("visual_dim", -1)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"RegionConfig.{field}"):
        RegionConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"RegionConfig.{field}"):
        build_model("region", {field: value})


def test_bad_shapes():
    m = RegionModel(RegionConfig(visual_dim=10, text_dim=6, embed_dim=8))
    with pytest.raises(ConfigError, match="visual_dim is 0"):
        RegionModel(RegionConfig(text_dim=6))
    with pytest.raises(ShapeError, match="one vector per caption"):
        smooth_max_similarity(torch.randn(2, 3, 8), F.normalize(torch.randn(4, 5, 8), dim=-1))
    with pytest.raises(ShapeError, match="visual_local"):
        m.encode_visual({"visual_local": torch.randn(2, 5, 9)})
    with pytest.raises(ShapeError, match="text_emb"):
        m.similarity(torch.randn(2, 3, 8), F.normalize(torch.randn(4, 5, 8), dim=-1))
