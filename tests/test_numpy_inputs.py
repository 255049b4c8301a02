"""Index and gallery take numpy arrays and torch tensors alike: identical ids and scores, results in the query's type."""
import numpy as np
import pytest
import torch

from xmretrieval.index import EmbeddingIndex, Gallery, IndexConfig, SetEmbeddingIndex, clustered_unit_sets, clustered_unit_vectors


@pytest.mark.parametrize("backend", ["flat", "hnsw", "ivf"])
def test_vector_index_numpy_equals_torch(backend):
    gal, centers = clustered_unit_vectors(2000, 16, n_centers=40, seed=0)
    qry, _ = clustered_unit_vectors(20, 16, seed=1, centers=centers)
    cfg = IndexConfig(backend=backend, nlist=16, nprobe=4) if backend == "ivf" else IndexConfig(backend=backend)
    a = EmbeddingIndex(16, cfg).add(gal.numpy())
    b = EmbeddingIndex(16, cfg).add(gal)
    s_np, p_np = a.search(qry.numpy(), 5)
    s_t, p_t = b.search(qry, 5)
    assert isinstance(s_np, np.ndarray) and isinstance(p_np, np.ndarray) and s_np.dtype == np.float32
    assert isinstance(s_t, torch.Tensor)
    np.testing.assert_array_equal(p_np, p_t.numpy()); np.testing.assert_array_equal(s_np, s_t.numpy())


def test_gallery_numpy_equals_torch_vectors_and_sets():
    gal, centers = clustered_unit_vectors(500, 16, n_centers=20, seed=0)
    qry, _ = clustered_unit_vectors(7, 16, seed=1, centers=centers)
    ids = [f"item{i}" for i in range(len(gal))]
    r_np = Gallery(gal.numpy(), ids).search(qry.numpy(), k=4)
    r_t = Gallery(gal, ids).search(qry, k=4)
    assert isinstance(r_np.indices, np.ndarray) and isinstance(r_t.indices, torch.Tensor)
    np.testing.assert_array_equal(r_np.indices, r_t.indices.numpy()); np.testing.assert_array_equal(r_np.scores, r_t.scores.numpy())
    assert r_np.ids == r_t.ids
    sets, sc = clustered_unit_sets(300, 4, 16, n_centers=50, seed=0)
    qs, _ = clustered_unit_sets(5, 4, 16, seed=1, centers=sc)
    mask = torch.ones(300, 4, dtype=torch.bool); mask[::3, 3] = False
    r_np = Gallery(sets.numpy(), mask=mask.numpy()).search(qs.numpy(), k=3)
    r_t = Gallery(sets, mask=mask).search(qs, k=3)
    np.testing.assert_array_equal(r_np.indices, r_t.indices.numpy()); np.testing.assert_array_equal(r_np.scores, r_t.scores.numpy())
    s_np, p_np = SetEmbeddingIndex(16).add(sets.numpy()).search(qs.numpy(), 3)
    assert isinstance(p_np, np.ndarray)


def test_float64_numpy_is_accepted():
    gal, _ = clustered_unit_vectors(100, 8, n_centers=5, seed=0)
    r = Gallery(gal.numpy().astype(np.float64)).search(gal[:2].numpy().astype(np.float64), k=1)
    np.testing.assert_array_equal(r.indices[:, 0], [0, 1])
