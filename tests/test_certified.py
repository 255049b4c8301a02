"""xmretrieval.certified: certified bf16 search against exact fp32 brute force, soundness of the certificate."""
import pytest
import torch

from xmretrieval.certified import (CertifiedConfig, CertifiedIndex, _GalleryBounds, bf16_rounding_model, bf16_shortlist,
                                   near_tie_gallery, score_bounds, smooth_chamfer_topk)
from xmretrieval.core import CheckpointError, ShapeError
from xmretrieval.index import clustered_unit_sets, clustered_unit_vectors
from xmretrieval.similarity import smooth_chamfer


@pytest.fixture(scope="module")
def data():
    gal, c = clustered_unit_vectors(30000, 64, n_centers=300, spread=0.75, seed=0)
    qry, _ = clustered_unit_vectors(400, 64, spread=0.75, seed=1, centers=c)
    return gal, qry


def same_sets(a, b):
    return (a.sort(1).values == b.sort(1).values).all(1)


def test_certified_equals_fp32_bruteforce(data):
    gal, qry = data
    idx = CertifiedIndex(64, CertifiedConfig(shortlist=32, chunk=4096)).add(gal)
    r = idx.search_certified(qry, 10, fallback=False)
    ref_s, ref_i = (qry @ gal.T).topk(10)
    assert r.certified.float().mean() > 0.95                       # clustered data: nearly everything certifies
    assert torch.equal(r.indices[r.certified], ref_i[r.certified])   # every certified query: the exact top-10
    torch.testing.assert_close(r.scores, ref_s, atol=1e-6, rtol=0)
    s, i = idx.search(qry, 10)                                      # with the fallback: exact for all
    assert torch.equal(i, ref_i)


def test_shortlist_is_topk_of_bf16_scores(data):
    gal, qry = data
    bs, bi = bf16_shortlist(qry[:50].bfloat16(), gal.bfloat16(), 33, chunk=2048, block=64)
    full = (qry[:50].bfloat16() @ gal.bfloat16().T).float()
    assert torch.equal(bs.float(), full.topk(33).values)
    assert torch.equal(full.gather(1, bi), bs.float())


@pytest.mark.parametrize("seed", [0, 1])
def test_error_bound_holds_for_every_pair(seed):
    "The certificate's bound covers |bf16 matmul output - exact score| for every (query, gallery) pair."
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(3000, 96, generator=g) * torch.rand(3000, 96, generator=g) ** 3, dim=-1)
    q = torch.nn.functional.normalize(torch.randn(200, 96, generator=g), dim=-1)
    out = (q.bfloat16() @ x.bfloat16().T).double()
    exact = q.double() @ x.double().T
    fp32 = (q @ x.T).double()
    bound = bf16_rounding_model() * out.abs() + score_bounds(q, _GalleryBounds.of(x))[:, None]
    assert bool(((exact - out).abs() <= bound).all())
    assert bool(((fp32 - out).abs() <= bound).all())                # the fp32 reference's error is included too
    assert float((fp32 - out).abs().max()) > 0.1 * float(bound.min())   # and the bound is not absurdly loose


@pytest.mark.parametrize("eps", [1e-4, 1e-3, 4e-3, 2e-2, 6e-2])
def test_certificate_is_sound_on_near_ties(eps):
    q = torch.nn.functional.normalize(torch.randn(40, 48, generator=torch.Generator().manual_seed(7)), dim=-1)
    gal = near_tie_gallery(q, n_ties=50, eps=eps, n_other=3000, seed=1)
    idx = CertifiedIndex(48, CertifiedConfig(shortlist=20, chunk=1024)).add(gal)
    r = idx.search_certified(q, 10, fallback=False)
    ref_s, ref_i = (q @ gal.T).topk(10)
    wrong = ~same_sets(r.indices, ref_i)
    assert not bool((r.certified & wrong).any()), "a certified query returned a wrong top-k"
    if eps <= 1e-3: assert not bool(r.certified.any())             # ties far inside the bf16 error: nothing certifies
    if eps >= 6e-2: assert bool(r.certified.any())                  # and with room, some do (the test is not vacuous)
    assert torch.equal(idx.search(q, 10)[1], ref_i)                 # the fallback makes every query exact


def test_save_load_and_errors(tmp_path, data):
    gal, qry = data
    idx = CertifiedIndex(64).add(gal[:2000])
    p = idx.save(tmp_path / "c.idx")
    back = CertifiedIndex.load(p, dim=64)
    assert torch.equal(back.search(qry[:30], 5)[1], idx.search(qry[:30], 5)[1])
    with pytest.raises(CheckpointError, match="64-d"): CertifiedIndex.load(p, dim=32)
    with pytest.raises(ShapeError, match="short list"): idx.search(qry, 65)
    with pytest.raises(ShapeError, match="dimension 32"): idx.search(qry[:, :32], 5)
    assert idx.nbytes == {"bf16": 2000 * 64 * 2, "fp32": 2000 * 64 * 4}


def test_smooth_chamfer_topk_exact():
    sets, c = clustered_unit_sets(3000, 4, 48, n_centers=300, seed=0)
    q, _ = clustered_unit_sets(80, 3, 48, seed=1, centers=c)        # query sets of another size than the gallery's
    ref_s, ref_i = smooth_chamfer(q, sets).topk(10)
    r = smooth_chamfer_topk(q, sets, 10, fallback=False)
    assert r.certified.float().mean() > 0.9
    assert torch.equal(r.indices[r.certified], ref_i[r.certified])
    full = smooth_chamfer_topk(q, sets, 10)
    assert torch.equal(full.indices, ref_i)
    torch.testing.assert_close(full.scores, ref_s, atol=1e-5, rtol=0)
    ym = torch.rand(3000, 4, generator=torch.Generator().manual_seed(0)) > 0.4; ym[:, 1] = True
    assert torch.equal(smooth_chamfer_topk(q, sets, 5, y_mask=ym).indices, smooth_chamfer(q, sets, y_mask=ym).topk(5).indices)


def test_smooth_chamfer_topk_sound_on_near_duplicates():
    sets, _ = clustered_unit_sets(400, 4, 32, n_centers=40, seed=3)
    noise = torch.randn(60, 4, 32, generator=torch.Generator().manual_seed(1))
    dup = torch.cat([torch.nn.functional.normalize(sets[:1] + 3e-4 * noise, dim=-1), sets[1:]])
    q = sets[:4]
    ref = smooth_chamfer(q, dup).topk(10).indices
    r = smooth_chamfer_topk(q, dup, 10, shortlist=16, fallback=False)
    assert not bool((r.certified & ~same_sets(r.indices, ref)).any())
    assert torch.equal(smooth_chamfer_topk(q, dup, 10, shortlist=16).indices, ref)
