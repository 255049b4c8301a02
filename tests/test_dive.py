"""Tests of xmretrieval.models.dive: fast paths against plain references, masks, gradients, loss, learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from xmretrieval.core import ConfigError, ShapeError, fork_rng, make_generator
from xmretrieval.models.base import build_model
from xmretrieval.testing import aggregation_reference, dive_objective_reference, set_similarity_reference
from xmretrieval.train import OptimConfig, param_groups
from xmretrieval.models.dive import (AggregationBlock, DiveConfig, DiveLossConfig, DivE, PIENet, SetPredictionModule,
                                     SetSimilarity, attention_weights, dive_loss, drop_inputs, mmd_loss, mp_similarity,
                                     set_log_variance, sine_positions, uniformity_loss)


@pytest.mark.parametrize("mode,faithful", [("slot", False), ("slot", True), ("transformer", False)])
def test_aggregation_block_matches_loop_forward_and_gradient(mode, faithful):
    with fork_rng(0):
        blk = AggregationBlock(num_slots=3, dim=8, context_dim=5, depth=3, heads=2, head_dim=4, mode=mode,
                               faithful_padding=faithful).eval()
        inp = torch.randn(3, 6, 5, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [False, True, True, True, True, False]])
    out, attn = blk(inp, mask)
    ref = aggregation_reference(blk, inp, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(out)
    g_fast, = torch.autograd.grad((out * w).sum(), inp)
    g_ref, = torch.autograd.grad((ref * w).sum(), inp)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)
    assert attn.shape == (3, 2, 3, 6)


def test_positional_encoding_on_keys_matches_loop():
    with fork_rng(0):
        blk = AggregationBlock(num_slots=2, dim=6, context_dim=4, depth=2, heads=1, head_dim=4).eval()
        inp = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    pos = sine_positions(mask, 4)
    torch.testing.assert_close(blk(inp, mask, pos)[0], aggregation_reference(blk, inp, mask, pos), atol=1e-5, rtol=1e-4)


def test_slot_axis_softmax_property():
    logits = torch.randn(4, 2, 5, 9, generator=make_generator(1)) * 3
    mask = torch.rand(4, 9, generator=make_generator(2)) > 0.3
    mask[:, 0] = True
    pre = logits.softmax(dim=-2)                                       # the competition step
    torch.testing.assert_close(pre.sum(-2), torch.ones(4, 2, 9))
    w = attention_weights(logits, mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 2, 5), atol=1e-5, rtol=0)
    assert w.masked_select(~mask[:, None, None, :].expand_as(w)).abs().max() == 0
    # on the valid inputs the clean weights equal pre / row-sum over the valid inputs
    ref = pre * mask[:, None, None, :]
    torch.testing.assert_close(w, ref / (ref.sum(-1, keepdim=True) + 1e-7))
    # the official leak: padded inputs get 1/K before the renormalisation
    wf = attention_weights(logits, mask, faithful_padding=True)
    unnorm = wf * (torch.where(mask[:, None, None, :], pre, torch.full_like(pre, 1 / 5)).sum(-1, keepdim=True) + 1e-7)
    torch.testing.assert_close(unnorm.masked_select(~mask[:, None, None, :].expand_as(w)),
                               torch.full_like(unnorm.masked_select(~mask[:, None, None, :].expand_as(w)), 0.2))
    with pytest.raises(ConfigError, match="`mode` must be one of"):
        attention_weights(logits, mode="inputs")


@pytest.mark.parametrize("module", ["slot", "transformer", "pienet"])
def test_padding_has_no_influence(module):
    with fork_rng(0):
        spm = (PIENet(3, 5, 8) if module == "pienet" else
               SetPredictionModule(3, 5, 8, depth=2, heads=2, head_dim=4, attention=module, pos_encoding="sine")).eval()
        local, glob = torch.randn(2, 6, 5), torch.randn(2, 8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    e, r, a = spm(local, glob, mask)
    noisy = local.clone(); noisy[1, 4:] = 50.0
    torch.testing.assert_close(spm(noisy, glob, mask)[0], e)
    # a padded sample gives the same set as the unpadded one
    torch.testing.assert_close(spm(local[1:, :4], glob[1:], mask[1:, :4])[0], e[1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2, 3))


def test_masks_are_validated():
    blk = AggregationBlock(num_slots=2, dim=4, depth=1, heads=1, head_dim=4)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ShapeError, match="no valid element"):
        blk(x, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ShapeError, match="bool"):
        blk(x, torch.ones(2, 3))
    with pytest.raises(ShapeError, match=r"`mask` must have shape \(2, 3\)"):
        blk(x, torch.ones(3, 3, dtype=torch.bool))


# ---------------------------------------------------------------- similarities
def test_set_similarities_match_definitions_with_masks_and_chunks():
    g = make_generator(3)
    X = F.normalize(torch.randn(7, 4, 6, generator=g), dim=-1)
    Y = F.normalize(torch.randn(5, 3, 6, generator=g), dim=-1)
    xm = torch.ones(7, 4, dtype=torch.bool); xm[2, 2:] = False
    for name in ["smooth_chamfer", "chamfer", "max_sim", "mp"]:
        sim = SetSimilarity(name, alpha=16.0, chunk_size=3)
        got = sim(X, Y, x_mask=xm)
        ref = set_similarity_reference(name, X, Y, 16.0, x_mask=xm).float()     # MP at its initial a=1, b=0
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_mp_gradient_matches_direct():
    g = make_generator(4)
    X = F.normalize(torch.randn(3, 2, 5, generator=g), dim=-1).requires_grad_()
    Y = F.normalize(torch.randn(4, 3, 5, generator=g), dim=-1)
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(-0.5, requires_grad=True)
    fast = mp_similarity(X, Y, a, b, chunk_size=2)
    ref = set_similarity_reference("mp", X, Y, a=a, b=b).float()
    w = torch.randn(3, 4, generator=g)
    gf = torch.autograd.grad((fast * w).sum(), (X, a, b))
    gr = torch.autograd.grad((ref * w).sum(), (X, a, b))
    for u, v in zip(gf, gr): torch.testing.assert_close(u, v)


# ---------------------------------------------------------------- loss
def test_loss_matches_direct_computation_value_and_gradient():
    g = make_generator(5)
    tset = F.normalize(torch.randn(6, 3, 5, generator=g), dim=-1).requires_grad_()
    vset = F.normalize(torch.randn(4, 3, 5, generator=g), dim=-1).requires_grad_()
    tres = torch.randn(6, 3, 5, generator=g, requires_grad=True)
    vres = torch.randn(4, 3, 5, generator=g, requires_grad=True)
    t2v = torch.tensor([0, 0, 1, 2, 3, 3])
    S = SetSimilarity("smooth_chamfer")(tset, vset)
    fast = dive_loss(S, t2v, tset, vset, tres, vres)["loss"]
    ref = dive_objective_reference(S, t2v, tset, vset, tres, vres)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    gf = torch.autograd.grad(fast, (tset, vset, tres, vres), retain_graph=True)
    gr = torch.autograd.grad(ref, (tset, vset, tres, vres))
    for u, v in zip(gf, gr): torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-4)


def test_regularisers():
    x = torch.randn(5, 4)
    assert abs(mmd_loss(x, x.clone()).item()) < 1e-6
    assert mmd_loss(x, x + 3).item() > 0.1
    assert abs(uniformity_loss(torch.ones(3, 4, 2)).item() - 1.0) < 1e-6      # collapsed set: maximal
    eye = torch.eye(4)[None]                                                    # orthogonal: exp(-4)
    assert abs(uniformity_loss(eye).item() - math.exp(-4)) < 1e-6
    assert uniformity_loss(torch.randn(3, 1, 4)).item() == 0.0
    assert set_log_variance(torch.ones(2, 3, 4)) == float("-inf")
    assert abs(set_log_variance(eye) - math.log(0.75)) < 1e-6


# ---------------------------------------------------------------- the model
def random_batch(n_v=3, n_t=6, L=10, Lt=5, dv=12, dt=10, seed=0):
    g = make_generator(seed)
    vm = torch.ones(n_v, L, dtype=torch.bool); vm[0, -3:] = False
    tm = torch.ones(n_t, Lt, dtype=torch.bool); tm[1, 2:] = False
    return dict(visual_global=torch.randn(n_v, dv, generator=g), visual_local=torch.randn(n_v, L, dv, generator=g),
                visual_mask=vm, text_global=torch.randn(n_t, dt, generator=g),
                text_local=torch.randn(n_t, Lt, dt, generator=g), text_mask=tm,
                text_to_visual=torch.arange(n_t) % n_v)


SMALL = DiveConfig(visual_dim=12, text_dim=10, embed_dim=16, heads=2, head_dim=8, depth=2)


@pytest.mark.parametrize("arch,sim", [("slot", "smooth_chamfer"), ("transformer", "chamfer"), ("pienet", "max_sim"),
                                      ("slot", "mp")])
def test_gradient_reaches_every_parameter(arch, sim):
    with fork_rng(0):
        m = DivE(SMALL.replace(arch=arch, similarity=sim)).train()
        out = m(random_batch())
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead
    assert torch.isfinite(out["loss"])


def test_model_scores_and_registry():
    m = build_model("dive", SMALL.to_dict()).eval()
    b = random_batch()
    t, v = m.encode_text(b), m.encode_visual(b)
    assert t.shape == (6, 4, 16) and v.shape == (3, 4, 16)
    torch.testing.assert_close(m.score(t, v, chunk_size=4), m.similarity(t, v))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(6, 4))
    # forward equals compute_loss on the sets and residuals (no DDP: gather is the identity)
    with fork_rng(0): out = m(b)
    tt, tr, _ = m.encode_text_set(b); vv, vr, _ = m.encode_visual_set(b)
    torch.testing.assert_close(out["loss"], m.compute_loss(tt, vv, b["text_to_visual"], tr, vr)["loss"])


def test_drop_inputs():
    mask = torch.tensor([[True, True, True, False]] * 200)
    with fork_rng(0):
        d = drop_inputs(mask, 0.5)
    assert d.any(1).all() and not d[:, 3].any()
    frac = d[:, :3].float().mean().item()
    assert 0.4 < frac < 0.7
    assert torch.equal(drop_inputs(mask, 0.0), mask)


def toy_retrieval_data(n=64, n_obj=20, L=12, Lt=6, dv=16, dt=12, caps=2, seed=0):
    "Images = 3 random objects among noise cells; each caption names 2 of them. Chance R@1 = 1/n."
    g = make_generator(seed)
    ov, ot = torch.randn(n_obj, dv, generator=g), torch.randn(n_obj, dt, generator=g)
    objs = torch.stack([torch.randperm(n_obj, generator=g)[:3] for _ in range(n)])
    vl = 0.2 * torch.randn(n, L, dv, generator=g)
    for i in range(n):
        cells = torch.randperm(L, generator=g)[:3]
        vl[i, cells] += ov[objs[i]]
    tl = 0.2 * torch.randn(n * caps, Lt, dt, generator=g)
    t2v = torch.arange(n).repeat_interleave(caps)
    for t in range(n * caps):
        named = objs[t2v[t], torch.randperm(3, generator=g)[:2]]
        tl[t, :2] += ot[named]
    tm = torch.ones(n * caps, Lt, dtype=torch.bool)
    tm[::3, -2:] = False
    return dict(visual_local=vl, visual_mask=torch.ones(n, L, dtype=torch.bool), visual_global=vl.mean(1),
                text_local=tl, text_mask=tm, text_global=(tl * tm[..., None]).sum(1) / tm.sum(1, keepdim=True),
                text_to_visual=t2v)


def test_short_training_loop_beats_random_ranking(one_thread):
    "A self-contained training loop (AdamW, clip 1, SPM lr x0.1) on a toy set-matching task."
    data = toy_retrieval_data(n=320)
    def items(lo, hi):   # images lo..hi-1 and their captions, text_to_visual re-indexed
        t = (data["text_to_visual"] >= lo) & (data["text_to_visual"] < hi)
        out = {k: data[k][lo:hi] for k in ("visual_local", "visual_mask", "visual_global")}
        out.update({k: data[k][t] for k in ("text_local", "text_mask", "text_global")})
        out["text_to_visual"] = data["text_to_visual"][t] - lo
        return out
    train, test = items(0, 256), items(256, 320)      # unseen object combinations at test time
    cfg = DiveConfig(visual_dim=16, text_dim=12, embed_dim=32, heads=2, head_dim=16, depth=2, dropout=0.0)
    with fork_rng(0):
        m = DivE(cfg)
        opt = torch.optim.AdamW(param_groups(m, OptimConfig(lr=2e-3, lr_scales={"visual_spm": 0.1, "text_spm": 0.1})))
        g = make_generator(0)
        n = train["visual_local"].shape[0]
        for step in range(120):
            v_idx = torch.randperm(n, generator=g)[:32]
            t_idx = torch.nonzero(torch.isin(train["text_to_visual"], v_idx)).flatten()
            pos = torch.full((n,), -1); pos[v_idx] = torch.arange(32)
            batch = {k: train[k][v_idx] for k in ("visual_local", "visual_mask", "visual_global")}
            batch.update({k: train[k][t_idx] for k in ("text_local", "text_mask", "text_global")})
            batch["text_to_visual"] = pos[train["text_to_visual"][t_idx]]
            loss = m(batch)["loss"]
            opt.zero_grad(); loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    m.eval()
    with torch.no_grad():
        S = m.score(m.encode_text(test), m.encode_visual(test))
    r1 = (S.argmax(1) == test["text_to_visual"]).float().mean().item()
    chance = 1 / S.shape[1]
    assert r1 > 5 * chance, f"R@1 {r1:.3f} vs chance {chance:.3f}"
