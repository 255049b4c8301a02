"""Tests of xmretrieval.models.cret: GEES against its definition (identity, bound, loop reference, gradients), CCM
sharing and independence, the embedding layout, search, bad input, and a short training run on emoji-video tiny."""
import math

import pytest
import torch
import torch.nn.functional as F

from xmretrieval.core import ConfigError, DataError, ShapeError, fork_rng, make_generator
from xmretrieval.encoders import masked_mean
from xmretrieval.losses import infonce_from_sims
from xmretrieval.models.base import build_model
from xmretrieval.models.cret import (COVARIANCES, GEES_VARIANTS, CenterDecoder, Cret, CretConfig, CretIndex, cret_similarity,
                                     frame_nce_loss, gaussian_moments, gees_loss, local_embeddings, mean_nce_loss,
                                     sample_frames)

F64 = torch.float64


# ---------------------------------------------------------------- references written with loops
def loop_gees(t, frames, fmask, t2v, s, variant="strict", covariance="full", lam=1.0):
    "The symmetric GEES bound with loops over captions and clips and explicit d x d covariance matrices."
    mus, sigmas = [], []
    for j in range(frames.shape[0]):
        f = frames[j][fmask[j]]
        mu = f.mean(0)
        S = (f - mu).T @ (f - mu) / len(f)
        mus.append(mu)
        sigmas.append(S if covariance == "full" else torch.diag(torch.diagonal(S)))

    def a(k, j): return s * (t[k] @ mus[j]) + lam * s ** 2 / 2 * (t[k] @ sigmas[j] @ t[k])

    def num(k):
        p = int(t2v[k])
        return s * (t[k] @ mus[p]) + (0 if variant == "strict" else lam * s ** 2 / 2 * (t[k] @ sigmas[p] @ t[k]))

    n_t, n_v = t.shape[0], frames.shape[0]
    total = 0
    for k in range(n_t):
        p = int(t2v[k])
        total = total + torch.log(sum(torch.exp(a(k, j)) for j in range(n_v))) - num(k)          # text -> video
        den = torch.exp(a(k, p)) + sum(torch.exp(a(q, p)) for q in range(n_t) if int(t2v[q]) != p)
        total = total + torch.log(den) - num(k)                                                  # video -> text
    return total / (2 * n_t)


def monte_carlo_nce(t, frames, t2v, s, n=6000, seed=0):
    "Mean and standard error of the symmetric InfoNCE with v_j ~ N(mu_j, Sigma_j), Sigma_j the frames' covariance."
    g = make_generator(seed)
    mu = frames.mean(1)
    z = torch.randn(n, *frames.shape[:2], generator=g, dtype=frames.dtype)
    v = mu + torch.einsum("njm,jmd->njd", z, frames - mu[:, None]) / math.sqrt(frames.shape[1])
    vals = []
    for i in range(n):     # the library's InfoNCE, one draw at a time (float64 kept: compute by hand)
        sims = s * t @ v[i].T
        t2v_l = (sims.logsumexp(1) - sims[torch.arange(len(t2v)), t2v]).mean()
        col = sims[:, t2v].T
        neg = col.masked_fill(t2v[:, None] == t2v[None, :], float("-inf"))
        v2t_l = (torch.logaddexp(col.diagonal(), neg.logsumexp(1)) - col.diagonal()).mean()
        vals.append((t2v_l + v2t_l) / 2)
    vals = torch.stack(vals)
    return vals.mean().item(), vals.std().item() / math.sqrt(n)


# ---------------------------------------------------------------- GEES
@pytest.mark.parametrize("variant", GEES_VARIANTS)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_gees_with_identical_frames_is_nce_on_the_means(variant, covariance):
    g = make_generator(0)
    t = F.normalize(torch.randn(9, 32, generator=g), dim=-1)
    t2v = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    still = F.normalize(torch.randn(5, 1, 32, generator=g), dim=-1).expand(-1, 6, -1)
    ref = infonce_from_sims(t @ still[:, 0].T, t2v, 20.0)
    torch.testing.assert_close(gees_loss(t, still, t2v, 20.0, variant=variant, covariance=covariance), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean_nce_loss(t, still, t2v, 20.0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frame_nce_loss(t, still, t2v, 20.0), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s", [2.0, 10.0])
def test_strict_bound_is_above_the_monte_carlo_expectation_and_the_seed_variant_below_it(s):
    g = make_generator(1)
    t = F.normalize(torch.randn(6, 12, generator=g, dtype=F64), dim=-1)
    t2v = torch.tensor([0, 0, 1, 2, 3, 3])
    frames = F.normalize(torch.randn(4, 1, 12, generator=g, dtype=F64) + 0.7 * torch.randn(4, 5, 12, generator=g, dtype=F64), dim=-1)
    mc, se = monte_carlo_nce(t, frames, t2v, s)
    strict = gees_loss(t, frames, t2v, s).item()
    seed = gees_loss(t, frames, t2v, s, variant="seed").item()
    assert strict >= mc - 4 * se
    # the seed variant is the strict bound minus the positive clip's variance term, never above it
    _, var = gaussian_moments(t, frames)
    assert seed == pytest.approx(strict - s ** 2 / 2 * var[torch.arange(6), t2v].mean().item(), abs=1e-10)
    assert seed <= strict


def test_seed_variant_is_not_an_upper_bound():
    e = torch.eye(8, dtype=F64)
    frames = torch.stack([torch.stack([1.9 * e[0], 0.1 * e[0] + 0.3 * e[2]]), torch.stack([e[1], e[1]])])
    t2v = torch.tensor([0, 1])
    mc, se = monte_carlo_nce(e[:2], frames, t2v, 5.0, n=8000)
    assert gees_loss(e[:2], frames, t2v, 5.0).item() >= mc - 4 * se
    assert gees_loss(e[:2], frames, t2v, 5.0, variant="seed").item() < mc - 4 * se


@pytest.mark.parametrize("variant", GEES_VARIANTS)
@pytest.mark.parametrize("covariance", COVARIANCES)
def test_gees_matches_a_loop_over_clips_value_and_gradient(variant, covariance):
    g = make_generator(2)
    t = F.normalize(torch.randn(7, 6, generator=g, dtype=F64), dim=-1).requires_grad_()
    frames = torch.randn(4, 5, 6, generator=g, dtype=F64).requires_grad_()
    fmask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, False, True, True, False], [True] * 5])
    t2v = torch.tensor([0, 1, 1, 2, 3, 0, 3])
    fast = gees_loss(t, frames, t2v, 4.0, fmask, variant, covariance, lam=0.8)
    ref = loop_gees(t, frames, fmask, t2v, 4.0, variant, covariance, lam=0.8)
    assert fast.item() == pytest.approx(ref.item(), abs=1e-10)
    for a, b in zip(torch.autograd.grad(fast, (t, frames)), torch.autograd.grad(ref, (t, frames))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_gees_gradients_finite_for_rank_deficient_covariance():
    g = make_generator(3)
    t = F.normalize(torch.randn(5, 256, generator=g), dim=-1).requires_grad_()
    frames = F.normalize(torch.randn(5, 2, 256, generator=g), dim=-1)        # 2 frames in d = 256: rank 1
    frames[0, 1] = frames[0, 0]                                              # and one clip with zero covariance
    frames.requires_grad_()
    for variant in GEES_VARIANTS:
        for cov in COVARIANCES:
            loss = gees_loss(t, frames, torch.arange(5), 20.0, variant=variant, covariance=cov)
            gt, gf = torch.autograd.grad(loss, (t, frames))
            assert torch.isfinite(loss) and torch.isfinite(gt).all() and torch.isfinite(gf).all()
            assert gf.abs().sum() > 0


def test_diag_covariance_equals_full_for_axis_aligned_spread():
    g = make_generator(4)
    t = F.normalize(torch.randn(3, 5, generator=g, dtype=F64), dim=-1)
    frames = torch.zeros(2, 3, 5, dtype=F64)
    frames[0, :, 1] = torch.tensor([1.0, -1.0, 0.0]); frames[1, :, 3] = torch.tensor([0.5, 0.5, -1.0])
    _, full = gaussian_moments(t, frames)
    _, diag = gaussian_moments(t, frames, covariance="diag")
    torch.testing.assert_close(full, diag)


# ---------------------------------------------------------------- model
def random_batch(n_v=3, n_t=5, T=16, Lt=7, dv=12, dt=10, seed=0):
    g = make_generator(seed)
    vm = torch.ones(n_v, T, dtype=torch.bool); vm[1, 6:] = False; vm[2, 2:] = False
    tm = torch.ones(n_t, Lt, dtype=torch.bool); tm[0, 4:] = False
    tl = torch.randn(n_t, Lt, dt, generator=g)
    return {"visual_local": torch.randn(n_v, T, dv, generator=g), "visual_mask": vm, "text_local": tl, "text_mask": tm,
            "text_global": masked_mean(tl, tm), "text_to_visual": torch.tensor([0, 0, 1, 2, 2])[:n_t]}


SMALL = dict(visual_dim=12, text_dim=10, dim=16, temporal_layers=1, heads=2, max_frames=16, num_centers=3,
             decoder_depth=1, decoder_heads=2, dropout=0.0)


def small_model(**changes):
    with fork_rng(0):
        return build_model("cret", {**SMALL, **changes})


def test_one_parameter_set_serves_both_modalities():
    m = small_model().eval()
    assert m.decoder_for("video") is m.decoder_for("text")
    names = {n.split(".")[0] for n, _ in m.named_parameters()}
    assert "decoder" in names and not names & {"video_decoder", "text_decoder"}
    E, M = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(m.decoder_for("video")(E, M), m.decoder_for("text")(E, M))
    # both modalities' local rows move with the shared weights
    b = random_batch()
    with torch.no_grad():
        v0, t0 = m.encode_visual(b), m.encode_text(b)
        for p in m.decoder.parameters(): p.add_(0.1 * torch.randn(p.shape, generator=make_generator(1)))
        v1, t1 = m.encode_visual(b), m.encode_text(b)
    assert (v1[:, 1:] - v0[:, 1:]).abs().max() > 1e-3 and (t1[:, 1:] - t0[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(v1[:, 0], v0[:, 0]) ; torch.testing.assert_close(t1[:, 0], t0[:, 0])
    sep = small_model(shared_decoder=False)
    assert sep.decoder_for("video") is not sep.decoder_for("text")
    n_shared = sum(p.numel() for p in m.parameters())
    n_sep = sum(p.numel() for p in sep.parameters())
    assert n_sep - n_shared == sum(p.numel() for p in m.decoder.parameters())


def test_video_embeddings_do_not_depend_on_the_text_batch():
    m = small_model().eval()
    b = random_batch()
    other = random_batch(n_t=2, seed=5)
    b2 = {**b, **{k: other[k] for k in ("text_local", "text_mask", "text_global")}, "text_to_visual": torch.tensor([0, 2])}
    with torch.no_grad():
        assert torch.equal(m.encode_visual(b), m.encode_visual(b2))


def test_layout_score_chunked_equals_plain_and_loss_parts():
    m = small_model().eval()
    b = random_batch()
    with torch.no_grad():
        t, v = m.encode_text(b), m.encode_visual(b)
    assert t.shape == (5, 4, 16) and v.shape == (3, 4, 16)
    torch.testing.assert_close(m.score(t, v, chunk_size=2), cret_similarity(t, v, 1.0))
    # S = S_g + beta S_l with S_l the mean of per-center cosines of the raw decodings
    with torch.no_grad():
        zt = m.decoder(m.text_tokens(b["text_local"]), b["text_mask"])
        frames, tokens, fm, _ = m.encode_frames(b)
        zv = m.decoder(tokens, fm)
    s_l = F.cosine_similarity(zt[:, None], zv[None], dim=-1).mean(-1)
    torch.testing.assert_close(cret_similarity(t, v, 0.7), t[:, 0] @ v[:, 0].T + 0.7 * s_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(local_embeddings(zt, "concat").flatten(1).norm(dim=-1), torch.ones(5))
    out = small_model(alpha=0.5).train()(b)
    torch.testing.assert_close(out["loss"].detach(), out["global"] + 0.5 * out["ccm"])


def test_training_samples_frames_and_evaluation_uses_all():
    m = small_model(train_frames=4, test_frames=0)
    b = random_batch()
    m.train()
    frames, _, fm, pos = m.encode_frames(b)
    assert frames.shape[1] == 4 and fm.all() and pos[2].tolist() == [0, 0, 1, 1]
    assert b["visual_mask"].gather(1, pos).all()
    m.eval()
    frames, _, fm, pos = m.encode_frames(b)
    assert frames.shape[1] == 16 and torch.equal(fm, b["visual_mask"])
    m8 = small_model(test_frames=8).eval()
    assert m8.encode_frames(b)[0].shape[1] == 8


def test_cret_index_first_stage_then_exact_rescoring():
    g = make_generator(5)
    K = 3
    gal = torch.cat([F.normalize(torch.randn(200, 1, 8, generator=g), dim=-1),
                     F.normalize(torch.randn(200, K, 8, generator=g), dim=-1) / math.sqrt(K)], 1)
    q = torch.cat([F.normalize(gal[:30, :1] + 0.4 * torch.randn(30, 1, 8, generator=g), dim=-1),
                   F.normalize(gal[:30, 1:] + 0.4 * torch.randn(30, K, 8, generator=g), dim=-1) / math.sqrt(K)], 1)
    exact = cret_similarity(q, gal, 2.0)
    top = exact.topk(10, dim=1)
    full = CretIndex(gal, beta=2.0, shortlist=0, chunk_size=7).search(q, 10)
    assert torch.equal(full.indices, top.indices)
    torch.testing.assert_close(full.scores, top.values)
    short = CretIndex(gal, beta=2.0, shortlist=40).search(q, 10)
    torch.testing.assert_close(short.scores, exact.gather(1, short.indices))        # exact S of the returned clips
    # the short list holds the best S_g clips: its best S is the best S among them
    cand = (q[:, 0] @ gal[:, 0].T).topk(40, dim=1).indices
    torch.testing.assert_close(short.scores[:, 0], exact.gather(1, cand).max(1).values)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    m = small_model()
    b = random_batch()
    with pytest.raises(ShapeError, match=r"`visual_local` holds frame features of width 20.*CretConfig.visual_dim"):
        m.encode_visual({**b, "visual_local": torch.randn(3, 16, 20)})
    with pytest.raises(DataError, match="fewer than the 4 frames that `CretConfig.train_frames` asks for"):
        small_model(short_clips="error").train()(b)
    with pytest.raises(DataError, match="fewer than the 4 frames"):
        sample_frames(b["visual_mask"], 4, short_clips="error")
    for bad, msg in [(dict(alpha=-0.1), "CretConfig.alpha"), (dict(beta=-1.0), "CretConfig.beta"),
                     (dict(beta=float("inf")), "CretConfig.beta"), (dict(num_centers=0), "CretConfig.num_centers"),
                     (dict(train_frames=-1), "CretConfig.train_frames"), (dict(test_frames=100), "CretConfig.test_frames"),
                     (dict(gees_variant="loose"), "CretConfig.gees_variant"), (dict(covariance="lowrank"), "CretConfig.covariance"),
                     (dict(center_init_std=float("nan")), "CretConfig.center_init_std")]:
        with pytest.raises(ConfigError, match=msg):
            CretConfig(**{**SMALL, **bad})
    with pytest.raises(ConfigError, match="`beta`"):
        cret_similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), beta=-1)


def test_checkpoint_with_other_frame_width_is_refused(tmp_path):
    from xmretrieval.data.core import RetrievalData
    from xmretrieval.checkpoint import TrainConfig, evaluate, load_checkpoint, save_checkpoint
    m = small_model()
    p = save_checkpoint(tmp_path / "m.safetensors", m, TrainConfig(model="cret", model_config=m.config.to_dict()), {})
    back, _, _ = load_checkpoint(p)
    g = make_generator(0)
    data = RetrievalData(name="x", split="test", visual_ids=["a", "b"], visual_global=torch.randn(2, 20, generator=g),
                         visual_local=torch.randn(2, 4, 20, generator=g), visual_mask=None, captions=["p", "q"],
                         text_to_visual=torch.tensor([0, 1]), text_global=torch.randn(2, 10, generator=g))
    with pytest.raises(ShapeError, match="width 20.*expects 12"):
        evaluate(back, data)


# ---------------------------------------------------------------- learning
def test_short_training_on_emoji_video_tiny_beats_random_ranking(one_thread):
    from xmretrieval.repro.dive import chance_metrics
    from xmretrieval.train import Trainer, load_config
    tr = Trainer(load_config("cret_tiny"))
    s = tr.fit()
    test = tr.data["test"]
    assert test.name == "emoji-video" and test.visual_local.shape[1] == 16
    ch = chance_metrics(test.text_to_visual, test.n_visual)
    # measured: RSUM 201 (seed 0; seeds 1-3: 179, 166, 199) vs 96 by chance; t2v R@10 54 (61, 54, 62) vs 31
    assert s["test"]["RSUM"] > ch["RSUM"] + 50
    assert s["test"]["t2v/R@10"] > 1.5 * ch["t2v/R@10"] and s["test"]["v2t/R@10"] > ch["v2t/R@10"]


def test_cret_index_save_load_roundtrip(tmp_path):
    from xmretrieval.core import CheckpointError
    from xmretrieval.index import IndexConfig
    g = make_generator(6)
    gal = torch.cat([F.normalize(torch.randn(300, 1, 8, generator=g), dim=-1),
                     F.normalize(torch.randn(300, 2, 8, generator=g), dim=-1) / math.sqrt(2)], 1)
    q = gal[:10].clone()
    idx = CretIndex(gal, beta=0.3, shortlist=60, ids=[f"c{i}" for i in range(300)], config=IndexConfig(backend="hnsw"))
    back = CretIndex.load(idx.save(tmp_path / "g.npz"))
    a, b = idx.search(q, 5), back.search(q, 5)
    assert torch.equal(a.indices, b.indices) and a.ids == b.ids and back.first.config.backend == "hnsw"
    (tmp_path / "x.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable CRET index"):
        CretIndex.load(tmp_path / "x.npz")


def test_bf16_autocast_keeps_the_bound_in_float32_and_the_model_loss_close():
    g = make_generator(8)
    t, f = F.normalize(torch.randn(6, 32, generator=g), dim=-1), F.normalize(torch.randn(4, 4, 32, generator=g), dim=-1)
    t2v = torch.tensor([0, 1, 1, 2, 3, 3])
    ref = gees_loss(t, f, t2v, 20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = gees_loss(t, f, t2v, 20.0)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    m = small_model(train_frames=0).train()       # no frame sampling: the same frames in both passes
    b = random_batch()
    with fork_rng(0): ref = m(b)["loss"]
    with fork_rng(0), torch.autocast("cpu", dtype=torch.bfloat16): fast = m(b)["loss"]
    assert torch.isfinite(fast) and abs(fast.item() - ref.item()) < 0.05 * abs(ref.item())


def test_reproduction_is_registered_and_its_configs_validate():
    from xmretrieval.reproduce import REPRODUCTIONS
    run = REPRODUCTIONS["cret"]
    assert run.__module__ == "xmretrieval.repro.cret" and REPRODUCTIONS.names().index("cret") > REPRODUCTIONS.names().index("dive")
    from xmretrieval.repro.cret import MAIN_VARIANTS, ablation_variants, cret_config
    for changes in [*MAIN_VARIANTS.values(), *ablation_variants("full").values()]:
        CretConfig.from_dict(cret_config("full", **changes).model_config)
    assert cret_config("quick").data.preset == "tiny" and cret_config("full").data.preset == "small"


def test_center_init_std_sets_the_scale_and_keeps_the_default_stream():
    "The default (0.02) draws the same centers as before the option existed; another std scales the same draw."
    torch.manual_seed(0)
    ref = torch.randn(4, 32) * 0.02
    for std in (0.02, 1.0):
        torch.manual_seed(0)
        d = CenterDecoder(32, 4, 1, 2, init_std=std)
        assert torch.allclose(d.centers, ref * (std / 0.02))
