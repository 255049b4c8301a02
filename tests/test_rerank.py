"""xmretrieval.models.rerank: golden cross-encoder inputs, one parameter set for Joint, Coop = CE-only at K = gallery
size, a short tiny-preset run in which the cross-encoder separates positives from negatives, bad input, presets;
xmretrieval.repro.rerank: the cost per query and its extrapolation, other first stages + the cross-encoder."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from xmretrieval.core import CheckpointError, ConfigError, DataError, ShapeError, XMRError
from xmretrieval.data.core import load_benchmark, save_data
from xmretrieval.index import Gallery
from xmretrieval.metrics import retrieval_metrics
from xmretrieval.models.rerank import (TINY_BERT, CrossEncoderReranker, RerankConfig, RerankModel, ce_score_matrix,
                                       coop_metrics, retrieve_and_rerank)
from xmretrieval.train import Trainer, load_checkpoint, load_config

FIX = Path(__file__).parent / "fixtures" / "rerank_tokens.json"
PRESETS = ("rerank_tiny", "rerank_emoji_scenes", "rerank_emoji_objects", "rerank_precomp_coco", "rerank_precomp_f30k",
           "rerank_karpathy_coco", "rerank_karpathy_f30k")


def tiny(visual_dim=1280, **kw):
    torch.manual_seed(0)
    return RerankModel(RerankConfig(pretrained=False, bert=TINY_BERT, visual_dim=visual_dim, **kw)).eval()


def cross_inputs(model, captions, n_regions):
    "The CE sequence of (caption, item) pairs: token ids, and the transformer's mask, token types and positions."
    ids, mask = model.tokenize(captions)
    vis = torch.zeros(len(captions), n_regions, model.config.visual_dim)
    inp = model.sequence_inputs(model.cross_parts(ids, mask, vis))
    return {"input_ids": ids.tolist(), "attention_mask": inp["attention_mask"].tolist(),
            "token_type_ids": inp["token_type_ids"].tolist(), "position_ids": inp["position_ids"].tolist()}


def test_cross_encoder_inputs_match_the_golden_fixture():
    fix = json.loads(FIX.read_text())
    m = tiny(visual_dim=8, max_text_len=fix["max_text_len"])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = cross_inputs(m, fix["captions"], fix["n_regions"])
    assert any("truncated" in str(x.message) for x in w)      # the long caption is cut, with a warning
    for k in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
        assert got[k] == fix[k], k
    # the text part is the packaged MiniLM tokenizer's [CLS] ... [SEP] (the same ids the text encoder uses)
    minilm = json.loads((FIX.parent / "minilm_tokens.json").read_text())
    ids, _ = m.tokenize(minilm["captions"][:1])
    assert ids[0].tolist() == [i for i in minilm["input_ids"][0] if i]


def test_joint_model_has_one_parameter_set():
    m = tiny(visual_dim=8)
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("transformer.") for n in names) == len(list(m.transformer.parameters()))
    assert {n.split(".")[0] for n in names} == {"transformer", "visual_proj", "ce_head"}
    # both uses read the same weights: perturbing one transformer weight changes the BE and the CE outputs
    caps, vis = ["a dog", "a cat"], torch.randn(2, 4, 8)
    with torch.no_grad():
        t0, s0 = m.encode_text({"captions": caps}), m.cross_score(caps, vis)
        m.transformer.encoder.layer[0].output.dense.weight.add_(torch.randn(m.transformer.encoder.layer[0].output.dense.weight.shape))
        t1, s1 = m.encode_text({"captions": caps}), m.cross_score(caps, vis)
    assert not torch.allclose(t0, t1) and not torch.allclose(s0, s1)


def test_coop_with_k_equal_gallery_size_ranks_as_ce_only(one_thread):
    data = load_benchmark("emoji-scenes", "tiny", "test").subset(range(12))
    m = tiny()
    with torch.no_grad():
        t, v = m.embed(data)
    queries = list(data.captions[:10])
    rr = CrossEncoderReranker(m, data.visual_local, data.visual_mask, batch_size=64)
    coop = retrieve_and_rerank(Gallery(v, data.visual_ids), t[:10], queries, rr, k=data.n_visual)
    ce_only = rr.rank(queries)
    assert coop.indices.tolist() == [[r["corpus_id"] for r in row] for row in ce_only]
    assert torch.allclose(coop.scores, torch.tensor([[r["score"] for r in row] for row in ce_only]), atol=1e-5)
    # the same through Gallery.search(rerank=...), keeping the k best of the K reranked
    res = Gallery(v, data.visual_ids).search(t[:10], k=5, rerank=rr, k_rerank=data.n_visual, queries=queries)
    assert res.indices.tolist() == [row[:5] for row in coop.indices.tolist()]
    # visual-to-text, batched: a gallery of caption embeddings, image queries, the CE reranks each image's top 20
    rc = CrossEncoderReranker(m, list(data.captions), batch_size=16)
    r = Gallery(t).search(v[:3], k=4, rerank=rc, k_rerank=20, queries=data.visual_local[:3])
    top20 = Gallery(t).search(v[:3], k=20).indices
    ce = rc.score(data.visual_local[:3], top20)
    for q in range(3):
        assert r.indices[q].tolist() == top20[q][ce[q].argsort(descending=True)[:4]].tolist()
    # and over the split, in both directions: Coop K=all gives the CE-only metrics; K=3 costs 3 passes per query
    ce = retrieval_metrics(ce_score_matrix(m, data), data.text_to_visual)
    sims = m.score(t, v)
    full = coop_metrics(sims, m, data, k=data.n_text)
    for k in ("t2v/R@1", "t2v/R@5", "v2t/R@1", "v2t/R@5", "t2v/MnR", "v2t/MnR"):
        assert full[k] == pytest.approx(ce[k], abs=1e-6), k
    assert coop_metrics(sims, m, data, k=3)["ce_passes"] == 3 * (data.n_text + data.n_visual)


@pytest.mark.parametrize("preset", ["dive_tiny", "cret_tiny"])
def test_any_first_stage_through_the_gallery(preset, one_thread):
    "DivE sets and CRET vectors as the first stage (untrained tiny presets), reranked by the cross-encoder."
    from xmretrieval.checkpoint import load_config as load, load_split
    from xmretrieval.models.base import get_model_class
    cfg = load(preset)
    data = load_split(cfg.data, "test").subset(range(16))
    cls = get_model_class(cfg.model)
    torch.manual_seed(0)
    first = cls(cls.config_for_data(cls.config_class.from_dict(cfg.model_config), data)).eval()
    with torch.no_grad():
        t, v = first.embed(data)
    gallery = Gallery(first.index_embeddings(v), data.visual_ids)
    q = first.index_embeddings(t[:6])
    m = tiny(visual_dim=data.visual_local.shape[-1])
    rr = CrossEncoderReranker(m, data.visual_local, data.visual_mask)
    caps = list(data.captions[:6])
    top = gallery.search(q, k=10).indices
    res = gallery.search(q, k=4, rerank=rr, k_rerank=10, queries=caps)
    ce = rr.score(caps, top)
    for i in range(6):   # the 4 best of the first stage's 10 by CE score
        assert res.indices[i].tolist() == top[i][ce[i].argsort(descending=True)[:4]].tolist()
    # Coop metrics from the model's own score matrix, both directions, any K
    mets = coop_metrics(first.score(t, v), m, data, k=5)
    assert mets["ce_passes"] == 5 * (data.n_text + data.n_visual) and 0 <= mets["RSUM"] <= 600


def test_query_costs_and_their_extrapolation(one_thread):
    from xmretrieval.repro.rerank import exact_search_seconds_per_item, extrapolate_costs, query_costs
    data = load_benchmark("emoji-scenes", "tiny", "test").subset(range(12))
    m = tiny()
    costs = query_costs(m, m, data.visual_local, data.visual_mask, list(data.captions[:3]), k=4, n_ce_queries=1)
    assert costs["ce_passes_per_query"] == {"BE": 0, "Coop K=4": 4, "CE-only": 12}
    assert costs["queries_timed"] == {"BE": 3, "CE-only": 1, "Coop K=4": 3}
    slope = exact_search_seconds_per_item(32, n=5000, n_queries=2)
    assert slope > 0
    ex, med = extrapolate_costs(costs, 12_000, search_s_per_item=slope)["methods"], costs["median_s_per_query"]
    assert ex["CE-only"] == {"ce_passes": 12_000, "s": pytest.approx(med["CE-only"] * 1000)}
    assert ex["Coop K=4"]["ce_passes"] == 4 and ex["BE"]["ce_passes"] == 0
    growth = slope * (12_000 - 12)    # BE and Coop pay the same first-stage growth
    assert ex["BE"]["s"] == pytest.approx(med["BE"] + growth) and ex["Coop K=4"]["s"] == pytest.approx(med["Coop K=4"] + growth)
    # the benchmark file: without a recorded slope, all of BE's time is scaled (an upper bound)
    bench = json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / "rerank.json").read_text())
    for r in bench["runs"]:
        e = extrapolate_costs(r)
        assert e["methods"]["CE-only"]["ce_passes"] == 1_000_000 and e["methods"][f"Coop K={bench['k']}"]["ce_passes"] == bench["k"]
        if "search_s_per_item" not in r:
            assert e["search_slope"].startswith("upper bound")
            assert e["methods"]["BE"]["s"] == pytest.approx(r["median_s_per_query"]["BE"] * 1_000_000 / r["gallery"])


@pytest.mark.parametrize("preset", ["biencoder_tiny", "dive_tiny"])
def test_other_first_stages_with_the_cross_encoder(preset, one_thread):
    "K=1 keeps the first stage's ranking; K = every candidate is CE-only's, whatever the first stage; other splits refused."
    from xmretrieval.checkpoint import load_config as load
    from xmretrieval.models.base import get_model_class
    from xmretrieval.repro.rerank import combination_metrics
    full = load_benchmark("emoji-scenes", "tiny", "test")
    data = full.subset(range(12))
    cfg = load(preset)
    cls = get_model_class(cfg.model)
    torch.manual_seed(0)
    first = cls(cls.config_for_data(cls.config_class.from_dict(cfg.model_config), data)).eval()
    m = tiny()
    one, every = combination_metrics({"f": first}, m, data, k=1), combination_metrics({"f": first}, m, data, k=data.n_text)
    ce = retrieval_metrics(ce_score_matrix(m, data), data.text_to_visual)
    for key in ("t2v/R@1", "v2t/R@1", "t2v/MnR", "RSUM"):
        assert one["f + CE (K=1)"][key] == pytest.approx(one["f"][key], abs=1e-6), key
        assert every[f"f + CE (K={data.n_text})"][key] == pytest.approx(ce[key], abs=1e-6), key
    assert one["f + CE (K=1)"]["ce_passes"] == data.n_text + data.n_visual and one["f"]["ce_passes"] == 0
    with pytest.raises(DataError, match="cannot be combined .*: the visual items differ"):
        combination_metrics({"f": first}, m, data, first_data={"f": full.subset(range(1, 13))})


def test_load_first_stage_from_a_train_seeds_folder(tmp_path, one_thread):
    from xmretrieval.checkpoint import load_split
    from xmretrieval.repro.rerank import load_first_stage, split_mismatch
    from xmretrieval.train import train_seeds
    train_seeds(load_config("biencoder_tiny").replace(epochs=1), [0], tmp_path / "bi")
    model, cfg = load_first_stage(tmp_path / "bi", seed=0)
    assert cfg.model == "biencoder" and not model.training
    test = load_benchmark("emoji-scenes", "tiny", "test")
    assert split_mismatch(load_split(cfg.data, "test"), test) is None
    assert "has 12 items / 60 captions" in split_mismatch(test.subset(range(12)), test)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_first_stage(tmp_path / "bi", seed=1)


def pair_probs(model, data, seed=0):
    "Mean CE match probability of every caption's positive pair and of one random negative pair per caption."
    g = torch.Generator().manual_seed(seed)
    t2v = data.text_to_visual
    r = torch.randint(data.n_visual - 1, (data.n_text,), generator=g)
    neg = r + (r >= t2v).long()
    rr = CrossEncoderReranker(model, data.visual_local, data.visual_mask)
    pos = torch.cat(rr.score(list(data.captions), t2v[:, None], output="prob"))
    negp = torch.cat(rr.score(list(data.captions), neg[:, None], output="prob"))
    return pos, negp


def test_tiny_preset_cross_encoder_separates_positives_from_negatives(tmp_path, one_thread):
    cfg = load_config("rerank_tiny")
    cfg = cfg.replace(model_config={**cfg.model_config, "use": "ce"})
    train = load_benchmark("emoji-scenes", "tiny", "train")
    tr = Trainer(cfg, out_dir=tmp_path / "ce", train_data=train)
    summary = tr.fit()
    pos, neg = pair_probs(tr.model, train)
    acc = float(((pos > 0.5).float().mean() + (neg < 0.5).float().mean()) / 2)
    assert acc > 0.8 and float(pos.mean() - neg.mean()) > 0.4, (acc, float(pos.mean()), float(neg.mean()))
    # the checkpoint reloads (task_step included) and reproduces the trainer's CE-only test metrics
    model, _, _ = load_checkpoint(tmp_path / "ce" / "best.safetensors", model_name="rerank")
    assert model.config.eval_mode == "ce"
    from xmretrieval.train import evaluate
    test = load_benchmark("emoji-scenes", "tiny", "test")
    assert evaluate(model, test)["RSUM"] == pytest.approx(summary["test"]["RSUM"], abs=1e-4)


def test_bad_input_gives_clear_errors():
    m = tiny(visual_dim=8, max_text_len=6)
    feats = torch.randn(5, 3, 8)
    rr = CrossEncoderReranker(m, feats)
    with torch.no_grad():
        emb = m.encode_visual({"visual_local": feats})
        q = m.encode_text({"captions": ["a dog"]})
    gal = Gallery(emb)
    with pytest.warns(UserWarning, match="longer than max_text_len=6 tokens were truncated"):
        res = retrieve_and_rerank(gal, q, ["a dog " * 50], rr, k=2)
    assert res.indices.shape == (1, 2)
    with pytest.raises(ShapeError, match=r"`k`=6 is larger than the gallery \(5 items\)"):
        retrieve_and_rerank(gal, q, ["a dog"], rr, k=6)
    for k in (0, -1):
        with pytest.raises(ConfigError, match="`k` must be a positive int"):
            retrieve_and_rerank(gal, q, ["a dog"], rr, k=k)
    with pytest.raises(ShapeError, match="`items` has visual features of width 12 .* built for width visual_dim=8"):
        CrossEncoderReranker(m, torch.randn(5, 3, 12))
    with pytest.raises(DataError, match=r"`candidates\[1\]` is empty"):
        rr.score(["a dog", "a cat"], [[0, 1], []])
    with pytest.raises(XMRError, match="`items` is empty"):
        CrossEncoderReranker(m, [])


@pytest.mark.parametrize("name", PRESETS)
def test_presets_parse(name):
    cfg = load_config(name)
    mc = cfg.model_config_obj()
    assert cfg.model == "rerank" and mc.use == "joint" and mc.tasks == ["be", "ce"] and mc.margin == 0.1


def _write_precomp(folder, n_images, regions=6, dim=16, seed=0):
    "A SCAN-style precomp split: {split}_ims.npy (n, R, d) + {split}_caps.txt (5 lines per image)."
    rng = np.random.default_rng(seed)
    for split, n in n_images.items():
        np.save(folder / f"{split}_ims.npy", rng.normal(size=(n, regions, dim)).astype(np.float32))
        (folder / f"{split}_caps.txt").write_text("".join(f"image {i} caption {k}\n" for i in range(n) for k in range(5)))


def _write_karpathy(folder, n, regions=6, dim=16, seed=0):
    "dataset_flickr30k.json (Karpathy splits) + one .npz of region features keyed by file name."
    rng = np.random.default_rng(seed)
    splits = ["train"] * (n - 8) + ["val"] * 4 + ["test"] * 4
    imgs = [{"filename": f"{1000 + i}.jpg", "imgid": i, "split": s,
             "sentences": [{"raw": f"photo {i} sentence {k}", "tokens": []} for k in range(5)]}
            for i, s in enumerate(splits)]
    (folder / "dataset_flickr30k.json").write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    np.savez(folder / "feats.npz", **{f"{1000 + i}": rng.normal(size=(regions, dim)).astype(np.float32) for i in range(n)})


def _tiny_run(cfg, path):
    small = {**cfg.model_config, "pretrained": False, "bert": TINY_BERT}
    tr = Trainer(cfg.replace(data=cfg.data.replace(path=str(path)), model_config=small, epochs=1, batch_size=4,
                             progress=False, eval_batch_size=64))
    return tr, tr.fit()


@pytest.mark.parametrize("name,splits", [("rerank_precomp_coco", ("train", "dev", "testall")),
                                         ("rerank_precomp_f30k", ("train", "dev", "test"))])
def test_precomp_presets_on_small_precomp_folders(tmp_path, one_thread, name, splits):
    from xmretrieval.data.published import read_precomp
    raw, conv = tmp_path / "precomp", tmp_path / "converted"
    raw.mkdir(); conv.mkdir()
    _write_precomp(raw, dict(zip(splits, (8, 4, 4))))
    for s in splits:
        save_data(read_precomp(raw, s), conv / f"{s}.safetensors")
    cfg = load_config(name)
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == splits
    tr, s = _tiny_run(cfg, conv)
    assert s["steps"] == 2 and tr.model.config.visual_dim == 16 and 0 <= s["test"]["RSUM"] <= 600


@pytest.mark.parametrize("name", ["rerank_karpathy_coco", "rerank_karpathy_f30k"])
def test_karpathy_presets_on_a_small_karpathy_file(tmp_path, one_thread, name):
    from xmretrieval.data.published import read_karpathy
    conv = tmp_path / "converted"
    conv.mkdir()
    _write_karpathy(tmp_path, 16)
    for s in ("train", "val", "test"):
        save_data(read_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "feats.npz", s), conv / f"{s}.safetensors")
    cfg = load_config(name)
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == ("train", "val", "test")
    tr, s = _tiny_run(cfg, conv)
    assert s["steps"] == 2 and tr.model.config.visual_dim == 16 and 0 <= s["test"]["RSUM"] <= 600
