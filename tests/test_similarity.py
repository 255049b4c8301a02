"""xmretrieval.similarity against plain pair-by-pair references (forward and gradient)."""
import math

import pytest
import torch
import torch.nn.functional as F

from xmretrieval.core import ConfigError, ShapeError
from xmretrieval.similarity import (SET_SIMILARITIES, candidate_set_similarity, chamfer, cosine, max_sim,
                                    mean_sim, smooth_chamfer)
from xmretrieval.testing import random_masks as masks, set_similarity_reference as reference, unit_vectors as unit


@pytest.mark.parametrize("name", list(SET_SIMILARITIES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_forward_matches_reference(name, masked, chunk):
    g = torch.Generator().manual_seed(1)
    x, y = unit(g, 4, 3, 16), unit(g, 7, 5, 16)
    xm, ym = (masks(g, 4, 3), masks(g, 7, 5)) if masked else (None, None)
    got = SET_SIMILARITIES[name](x, y, x_mask=xm, y_mask=ym, chunk_size=chunk)
    ref = reference(name, x.double(), y.double(), 16.0, xm, ym)
    assert got.shape == (4, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 16.0, 39.0, 41.0, 200.0])
def test_smooth_chamfer_both_forms(alpha):
    "alpha <= 40 takes the shift-free form, larger alpha the logsumexp form: both exact."
    g = torch.Generator().manual_seed(2)
    x, y = unit(g, 3, 4, 8), unit(g, 6, 4, 8)
    xm, ym = masks(g, 3, 4), masks(g, 6, 4)
    for kw in ({}, {"x_mask": xm, "y_mask": ym}):
        ref = reference("smooth_chamfer", x.double(), y.double(), alpha, kw.get("x_mask"), kw.get("y_mask"))
        torch.testing.assert_close(smooth_chamfer(x, y, alpha, **kw).double(), ref, atol=1e-5, rtol=1e-5)


def test_extreme_similarities_do_not_overflow():
    "identical and opposite sets at alpha = 16 and 1000: finite, equal to the reference"
    g = torch.Generator().manual_seed(3)
    x = unit(g, 2, 4, 8)
    y = torch.cat([x, -x])
    for alpha in (16.0, 1000.0):
        got = smooth_chamfer(x, y, alpha)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), reference("smooth_chamfer", x.double(), y.double(), alpha),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(SET_SIMILARITIES))
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_matches_reference(name, masked):
    g = torch.Generator().manual_seed(4)
    x0, y0 = unit(g, 3, 4, 8), unit(g, 5, 3, 8)
    xm, ym = (masks(g, 3, 4), masks(g, 5, 3)) if masked else (None, None)
    w = torch.randn(3, 5, generator=g)
    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    (SET_SIMILARITIES[name](x, y, x_mask=xm, y_mask=ym, chunk_size=2) * w).sum().backward()
    xr, yr = x0.double().requires_grad_(), y0.double().requires_grad_()
    (reference(name, xr, yr, 16.0, xm, ym) * w.double()).sum().backward()
    for got, ref in ((x.grad, xr.grad), (y.grad, yr.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    if masked:   # masked elements get no gradient
        assert (x.grad[~xm] == 0).all() and (y.grad[~ym] == 0).all()


def test_gradcheck_smooth_chamfer_double():
    g = torch.Generator().manual_seed(5)
    x, y = unit(g, 2, 3, 5, dtype=torch.float64), unit(g, 3, 2, 5, dtype=torch.float64)
    xm = torch.tensor([[True, False, True], [True, True, True]])
    f = lambda a, b: smooth_chamfer(a, b, 4.0, x_mask=xm, check=False)
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), y.requires_grad_()))


def test_no_grad_path_equals_grad_path():
    g = torch.Generator().manual_seed(6)
    x, y = unit(g, 5, 4, 32), unit(g, 11, 4, 32)
    with torch.no_grad():
        a = smooth_chamfer(x, y, chunk_size=3)
    b = smooth_chamfer(x.requires_grad_(), y, chunk_size=4)
    assert b.requires_grad
    torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6)


def test_check_false_same_values():
    g = torch.Generator().manual_seed(7)
    x, y = unit(g, 3, 4, 8), unit(g, 4, 4, 8)
    for fn in SET_SIMILARITIES.values():
        torch.testing.assert_close(fn(x, y, check=False), fn(x, y))


def test_cosine_reference_and_grad():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    ref = torch.tensor([[float(a @ b / a.norm() / b.norm()) for b in y] for a in x], dtype=torch.float64)
    torch.testing.assert_close(cosine(x, y), ref)
    assert torch.autograd.gradcheck(cosine, (x.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("kind", list(SET_SIMILARITIES))
def test_candidate_set_similarity_matches_full(kind):
    g = torch.Generator().manual_seed(9)
    x, y = unit(g, 4, 3, 8), unit(g, 9, 5, 8)
    xm, ym = masks(g, 4, 3), masks(g, 9, 5)
    idx = torch.randint(0, 9, (4, 6), generator=g)
    full = SET_SIMILARITIES[kind](x, y, x_mask=xm, y_mask=ym)
    got = candidate_set_similarity(x, y[idx], kind, x_mask=xm, y_mask=ym[idx])
    torch.testing.assert_close(got, full.gather(1, idx), atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_arguments():
    g = torch.Generator().manual_seed(10)
    x, y = unit(g, 3, 4, 8), unit(g, 5, 4, 8)
    with pytest.raises(ShapeError, match="same feature dimension"):
        smooth_chamfer(x, unit(g, 5, 4, 6))
    with pytest.raises(ShapeError, match="unit-norm"):
        smooth_chamfer(x, y * 3)
    with pytest.raises(ShapeError, match="x_mask"):
        chamfer(x, y, x_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="kind"):
        candidate_set_similarity(x, y[None].expand(3, -1, -1, -1), "bogus")
    with pytest.raises(ShapeError, match="`y` must have size 3 on axis 0"):
        candidate_set_similarity(x, y[None].expand(2, -1, -1, -1))
    # unit-norm is checked only on valid elements: padding may be zero
    ym = torch.ones(5, 4, dtype=torch.bool); ym[:, 3] = False
    yp = y.clone(); yp[:, 3] = 0
    assert torch.isfinite(max_sim(x, yp, y_mask=ym)).all()
    assert torch.isfinite(mean_sim(x, yp, y_mask=ym)).all()


def test_peak_block_is_bounded_by_chunk():
    "the auto chunk keeps the (n, kx, c, ky) block near 8M entries whatever the gallery size"
    from xmretrieval.similarity import _auto_chunk
    assert _auto_chunk(1000, 4, 4, None) * 1000 * 16 <= 2 ** 23
    assert _auto_chunk(10 ** 7, 4, 4, None) == 1
    assert _auto_chunk(10, 4, 4, 7) == 7
