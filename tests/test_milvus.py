"""xmretrieval.milvus: Milvus Lite galleries against faiss (exact and approximate), across processes, errors."""
import os
import subprocess
import sys

import pytest
import torch

from xmretrieval.core import ShapeError
from xmretrieval.index import (EmbeddingIndex, IndexConfig, SetEmbeddingIndex, SetIndexConfig, clustered_unit_sets,
                               clustered_unit_vectors, recall_at_k)
from xmretrieval.milvus import MilvusConfig, MilvusError, MilvusGallery

pytest.importorskip("milvus_lite")


@pytest.fixture(scope="module")
def data():
    gal, c = clustered_unit_vectors(5000, 64, n_centers=100, spread=0.75, seed=0)
    qry, _ = clustered_unit_vectors(200, 64, spread=0.75, seed=1, centers=c)
    return gal, qry


def test_exact_top10_equals_faiss(tmp_path, data):
    gal, qry = data
    meta = [{"caption": f"caption {i}", "item": i} for i in range(len(gal))]
    with MilvusGallery.create(gal, ids=[f"v{i}" for i in range(len(gal))], metadata=meta,
                              config=MilvusConfig(uri=str(tmp_path / "g.db"))) as g:
        r = g.search(qry, 10)
        fs, fi = EmbeddingIndex(64).add(gal).search(qry, 10)
        assert torch.equal(r.indices, fi)
        torch.testing.assert_close(r.scores, fs, atol=1e-5, rtol=0)
        assert r.ids[3] == [f"v{i}" for i in fi[3].tolist()]
        assert g.metadata(r.indices[0, :2]) == [{"id": f"v{i}", "metadata": meta[i]} for i in fi[0, :2].tolist()]
        assert len(g) == 5000 and not g.is_set


@pytest.mark.parametrize("index_type", ["IVF_FLAT", "HNSW"])
def test_approximate_recall_matches_faiss(tmp_path, data, index_type):
    gal, qry = data
    _, exact = EmbeddingIndex(64).add(gal).search(qry, 10)
    cfg = MilvusConfig(uri=str(tmp_path / "a.db"), index_type=index_type, nlist=64, nprobe=4, hnsw_m=16,
                       ef_construction=40, ef_search=16)
    with MilvusGallery.create(gal, config=cfg) as g:
        r_milvus = recall_at_k(g.search(qry, 10).indices, exact)
    fcfg = (IndexConfig(backend="ivf", nlist=64, nprobe=4) if index_type == "IVF_FLAT"
            else IndexConfig(backend="hnsw", hnsw_m=16, ef_construction=40, ef_search=16))
    r_faiss = recall_at_k(EmbeddingIndex(64, fcfg).add(gal).search(qry, 10)[1], exact)
    assert r_milvus < 1.0 or r_faiss == 1.0                          # the approximate index is really used
    assert abs(r_milvus - r_faiss) <= 0.05, (r_milvus, r_faiss)
    assert r_milvus >= 0.8


def test_sets_equal_faiss_first_stage(tmp_path):
    sets, c = clustered_unit_sets(600, 4, 32, n_centers=120, seed=0)
    q, _ = clustered_unit_sets(15, 3, 32, seed=1, centers=c)
    mask = torch.rand(600, 4, generator=torch.Generator().manual_seed(0)) > 0.3; mask[:, 0] = True
    with MilvusGallery.create(sets, mask=mask, config=MilvusConfig(uri=str(tmp_path / "s.db"), element_k=24)) as g:
        r = g.search(q, 5)
        fs, fi = SetEmbeddingIndex(32, SetIndexConfig(element_k=24)).add(sets, mask).search(q, 5)
        assert torch.equal(r.indices, fi)
        torch.testing.assert_close(r.scores, fs, atol=1e-5, rtol=0)
        assert g.is_set and g.K == 4


def test_written_by_one_process_searched_by_another(tmp_path, data):
    gal, qry = data
    db = str(tmp_path / "shared.db")
    writer = ("import torch; from xmretrieval.milvus import MilvusGallery, MilvusConfig; "
              f"g = MilvusGallery.create(torch.load({str(tmp_path / 'g.pt')!r}), ids=[f'x{{i}}' for i in range(5000)], "
              f"config=MilvusConfig(uri={db!r}, collection='gal')); g.close()")
    torch.save(gal, tmp_path / "g.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", writer], check=True, env=env, capture_output=True)
    with MilvusGallery(MilvusConfig(uri=db, collection="gal")) as g:
        r = g.search(qry[:20], 10)
    assert torch.equal(r.indices, EmbeddingIndex(64).add(gal).search(qry[:20], 10)[1])
    assert r.ids[0][0] == f"x{int(r.indices[0, 0])}"


def test_clear_errors(tmp_path, data):
    gal, qry = data
    with pytest.raises(MilvusError, match="does not exist"):
        MilvusGallery(MilvusConfig(uri=str(tmp_path / "e.db"), collection="missing"))
    with pytest.raises(MilvusError, match="cannot reach Milvus"):
        MilvusGallery(MilvusConfig(uri="http://127.0.0.1:9", timeout=1.0))
    with MilvusGallery.create(gal[:100], config=MilvusConfig(uri=str(tmp_path / "e.db"))) as g:
        with pytest.raises(ShapeError, match="holds 64-d"): g.search(qry[:, :32], 5)
        with pytest.raises(ShapeError, match=r"\(nq, d\)"): g.search(qry[:, None], 5)
    with pytest.raises(MilvusError, match="already exists"):
        MilvusGallery.create(gal[:100], config=MilvusConfig(uri=str(tmp_path / "e.db")))
    with MilvusGallery.create(gal[:50], config=MilvusConfig(uri=str(tmp_path / "e.db"), overwrite=True)) as g:
        assert len(g) == 50


def test_gallery_backends_and_save_load(tmp_path, data):
    "Gallery: the config picks the backend; every backend returns faiss's exact top-10 and survives save/load."
    from xmretrieval.certified import CertifiedConfig
    from xmretrieval.index import Gallery
    gal, qry = data
    ids = [f"g{i}" for i in range(len(gal))]
    ref = Gallery(gal, ids).search(qry[:20], 10)
    for name, cfg in [("cert", CertifiedConfig(shortlist=32)), ("milvus", MilvusConfig(uri=str(tmp_path / "gb.db")))]:
        g = Gallery(gal, ids, config=cfg, metadata=[{"n": i} for i in range(len(gal))] if name == "milvus" else None)
        r = g.search(qry[:20], 10)
        assert torch.equal(r.indices, ref.indices) and r.ids == ref.ids
        p = g.save(tmp_path / f"{name}.index")
        if name == "milvus": g.index.close()
        back = Gallery.load(p)
        assert back.search(qry[:20], 10).ids == ref.ids and len(back) == len(gal)
        if name == "milvus":
            assert back.index.metadata([7]) == [{"id": "g7", "metadata": {"n": 7}}]
            back.index.close()
    np_r = Gallery(gal.numpy(), ids, config=CertifiedConfig()).search(qry[:5].numpy(), 3)
    assert type(np_r.indices).__name__ == "ndarray"
