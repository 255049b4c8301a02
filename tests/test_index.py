"""xmretrieval.index against exact brute-force search (clustered data, never isotropic random vectors)."""
import json

import numpy as np
import pytest
import torch

from xmretrieval.core import CheckpointError, ConfigError, ShapeError
from xmretrieval.index import (EmbeddingIndex, Gallery, IndexConfig, SearchResult, SetEmbeddingIndex, SetIndexConfig,
                               clustered_unit_sets, clustered_unit_vectors, recall_at_k)
from xmretrieval.similarity import SET_SIMILARITIES, smooth_chamfer


@pytest.fixture(scope="module")
def data():
    gal, c = clustered_unit_vectors(6000, 24, n_centers=80, seed=0)
    qry, _ = clustered_unit_vectors(150, 24, seed=1, centers=c)
    return gal, qry


@pytest.fixture(scope="module")
def set_data():
    sets, c = clustered_unit_sets(2000, 4, 16, n_centers=200, seed=0)
    q, _ = clustered_unit_sets(60, 3, 16, seed=1, centers=c)   # query sets may have another size than the gallery's
    return sets, q


def brute_topk(q, g, k):
    s = q.double() @ g.double().T
    return s.topk(k)


def test_flat_is_exact(data):
    gal, qry = data
    idx = EmbeddingIndex(24).add(gal[:3000]).add(gal[3000:])   # incremental adds keep positions
    s, i = idx.search(qry, 10)
    rs, ri = brute_topk(qry, gal, 10)
    torch.testing.assert_close(s.double(), rs, atol=1e-5, rtol=0)
    assert recall_at_k(i, ri) == 1.0 and i.dtype == torch.int64 and len(idx) == 6000


@pytest.mark.parametrize("cfg", [IndexConfig(backend="ivf", nprobe=8), IndexConfig(backend="ivf", nlist=32, nprobe=32),
                                 IndexConfig(backend="hnsw", hnsw_m=16, ef_search=64)])
def test_approximate_recall_on_clustered_data(data, cfg):
    gal, qry = data
    _, ri = brute_topk(qry, gal, 10)
    idx = EmbeddingIndex(24, cfg).add(gal)
    s, i = idx.search(qry, 10)
    r = recall_at_k(i, ri)
    assert r >= (0.999 if cfg.nlist == cfg.nprobe else 0.9), r      # scanning every list is exact
    # the returned scores are the true inner products of the returned items
    torch.testing.assert_close(s, (qry[:, None, :] * gal[i]).sum(-1), atol=1e-5, rtol=0)
    assert (s[:, :-1] >= s[:, 1:] - 1e-6).all()


def test_ivf_training_is_seeded(data):
    gal, qry = data
    a = EmbeddingIndex(24, IndexConfig(backend="ivf", nlist=40, nprobe=2, train_size=2000, seed=3)).add(gal)
    b = EmbeddingIndex(24, IndexConfig(backend="ivf", nlist=40, nprobe=2, train_size=2000, seed=3)).add(gal)
    assert torch.equal(a.search(qry, 5)[1], b.search(qry, 5)[1])
    assert a.config.nlist == 40
    auto = EmbeddingIndex(24, IndexConfig(backend="ivf")).add(gal)
    assert auto.config.nlist == min(round(4 * 6000 ** 0.5), 6000 // 39)   # faiss wants >= 39 points per list


def test_save_load_roundtrip_and_refusals(data, tmp_path):
    gal, qry = data
    for cfg in (IndexConfig(), IndexConfig(backend="ivf", nlist=50, nprobe=4), IndexConfig(backend="hnsw", hnsw_m=8)):
        idx = EmbeddingIndex(24, cfg).add(gal)
        p = idx.save(tmp_path / f"{cfg.backend}.index")
        back = EmbeddingIndex.load(p, dim=24, config=cfg)
        assert torch.equal(back.search(qry, 7)[1], idx.search(qry, 7)[1])
        with pytest.raises(CheckpointError, match="expected 12-d"):
            EmbeddingIndex.load(p, dim=12)
    with pytest.raises(CheckpointError, match="backend"):
        EmbeddingIndex.load(tmp_path / "flat.index", config=IndexConfig(backend="hnsw"))
    with pytest.raises(CheckpointError, match="hnsw_m"):
        EmbeddingIndex.load(tmp_path / "hnsw.index", config=IndexConfig(backend="hnsw", hnsw_m=32))
    # search-time settings are not structural
    assert EmbeddingIndex.load(tmp_path / "ivf.index", config=IndexConfig(backend="ivf", nlist=50, nprobe=50)).config.nprobe == 50
    # nothing half-written: only the index files are in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.index", "hnsw.index", "ivf.index"]


def test_embedding_index_errors(data):
    gal, qry = data
    idx = EmbeddingIndex(24).add(gal[:20])
    with pytest.raises(ShapeError, match=r"`x` has dimension 16 \(shape \(4, 16\)\)"):
        idx.add(torch.nn.functional.normalize(torch.ones(4, 16), dim=-1))
    with pytest.raises(ShapeError, match="larger than the index"):
        idx.search(qry, 21)
    with pytest.raises(ShapeError, match="unit-norm"):
        idx.search(qry * 1.5, 2)
    with pytest.raises(ShapeError, match="`queries` must have 2 dimensions"):
        idx.search(qry[0], 2)
    with pytest.raises(ConfigError):
        IndexConfig(nprobe=0)


@pytest.mark.parametrize("kind", ["smooth_chamfer", "chamfer", "max_sim"])   # mean_sim is not element-driven
def test_set_index_matches_exhaustive(set_data, kind):
    sets, q = set_data
    idx = SetEmbeddingIndex(16, SetIndexConfig(similarity=kind, element_k=200)).add(sets)
    s, i = idx.search(q, 10)
    ref = SET_SIMILARITIES[kind](q, sets)
    rs, ri = ref.topk(10)
    torch.testing.assert_close(s, rs, atol=1e-5, rtol=0)
    # ties (max_sim can tie) aside, the same items; scores of the returned items are exact
    torch.testing.assert_close(s, ref.gather(1, i), atol=1e-5, rtol=0)


def test_set_index_ivf_recall_and_masks(set_data, tmp_path):
    sets, q = set_data
    gm = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    gm[:, 2] = True
    qm = torch.ones(60, 3, dtype=torch.bool); qm[::2, 0] = False
    cfg = SetIndexConfig(element=IndexConfig(backend="ivf", nprobe=16), element_k=64)
    idx = SetEmbeddingIndex(16, cfg).add(sets, gm)
    s, i = idx.search(q, 10, query_mask=qm)
    _, ri = smooth_chamfer(q, sets, x_mask=qm, y_mask=gm).topk(10)
    assert recall_at_k(i, ri) >= 0.95
    p = idx.save(tmp_path / "s.index")
    back = SetEmbeddingIndex.load(p, dim=16, config=cfg)
    assert torch.equal(back.search(q, 10, query_mask=qm)[1], i)
    with pytest.raises(CheckpointError, match="alpha"):
        SetEmbeddingIndex.load(p, config=SetIndexConfig(alpha=8.0))


def test_candidates_are_unique_and_contain_owners(set_data):
    sets, q = set_data
    idx = SetEmbeddingIndex(16, SetIndexConfig(element_k=5)).add(sets)
    cand = idx.candidates(q)
    assert cand.shape[0] == 60 and cand.shape[1] <= 15
    for row in cand:
        v = row[row >= 0]
        assert len(v) == len(v.unique())
    # the owner of each query element's nearest element is a candidate
    nn = (q.reshape(-1, 16) @ sets.reshape(-1, 16).T).argmax(1) // 4
    assert all(int(o) in set(cand[j // 3].tolist()) for j, o in enumerate(nn))


def test_gallery_search_and_ids(data, set_data, tmp_path):
    gal, qry = data
    g = Gallery(gal, [f"v{i}" for i in range(len(gal))])
    r = g.search(qry, 5)
    _, ri = brute_topk(qry, gal, 5)
    assert isinstance(r, SearchResult) and torch.equal(r.indices, ri)
    assert r.ids[3] == [f"v{j}" for j in ri[3].tolist()]
    p = g.save(tmp_path / "g.index")
    assert json.loads((tmp_path / "g.index.ids.json").read_text())[:2] == ["v0", "v1"]
    assert Gallery.load(p, dim=24).search(qry, 5).ids == r.ids
    sets, q = set_data
    sg = Gallery(sets)
    assert sg.is_set and sg.search(q, 3).indices.shape == (60, 3)
    with pytest.raises(ShapeError, match="query_embeddings"):
        sg.search(qry, 3)
    with pytest.raises(ConfigError, match="IndexConfig"):
        Gallery(gal, config=SetIndexConfig())
    with pytest.raises(CheckpointError, match="ids"):
        (tmp_path / "g.index.ids.json").unlink(); Gallery.load(p)


@pytest.mark.parametrize("element_k", [64, 128])
def test_hnsw_set_search_recall_matches_the_exact_first_stage(set_data, element_k):
    "HNSW first stage: recall@10 vs exhaustive Smooth-Chamfer as high as an exact (flat) first stage's at the same element_k."
    sets, q = set_data
    ex_s, ex_i = smooth_chamfer(q, sets).topk(10)
    rec = {}
    for backend in ("flat", "hnsw"):
        idx = SetEmbeddingIndex(16, SetIndexConfig(element=IndexConfig(backend=backend, hnsw_m=16, ef_search=element_k),
                                                   element_k=element_k)).add(sets)
        s, i = idx.search(q, 10)
        rec[backend] = recall_at_k(i, ex_i)
        # every returned score is the exact Smooth-Chamfer of the returned item
        torch.testing.assert_close(s, smooth_chamfer(q, sets).gather(1, i), atol=1e-5, rtol=0)
    assert rec["hnsw"] >= rec["flat"] - 0.01, rec
    if element_k >= 128: assert rec["hnsw"] >= 0.99, rec     # ~40 elements per mixture centre: element_k >> 40
