"""xmretrieval.metrics against plain loop references (ties, several captions per item, chunking, protocols)."""
import math

import numpy as np
import pytest
import torch

from xmretrieval.core import ConfigError, DataError, ShapeError
from xmretrieval.metrics import (aggregate_seeds, chunked_retrieval_metrics, fold_metrics, format_mean_std,
                                 metrics_from_ranks, protocol_metrics, retrieval_metrics, retrieval_ranks)


def ref_ranks(sims, t2v):
    "Plain loops: rank0 = number of wrong candidates scoring >= the best correct one."
    s = sims.tolist(); t2v = t2v.tolist()
    n_t, n_v = len(s), len(s[0])
    rt = [sum(1 for j in range(n_v) if j != t2v[i] and s[i][j] >= s[i][t2v[i]]) for i in range(n_t)]
    rv = []
    for j in range(n_v):
        correct = [i for i in range(n_t) if t2v[i] == j]
        best = max(s[i][j] for i in correct)
        rv.append(sum(1 for i in range(n_t) if t2v[i] != j and s[i][j] >= best))
    return rt, rv


def ref_metrics(sims, t2v, medr):
    rt, rv = ref_ranks(sims, t2v)
    out = {}
    for d, r in (("t2v", rt), ("v2t", rv)):
        for k in (1, 5, 10):
            out[f"{d}/R@{k}"] = 100.0 * sum(x < k for x in r) / len(r)
        srt = sorted(r); n = len(srt)
        med = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        out[f"{d}/MdR"] = (math.floor(med) if medr == "floor" else med) + 1
        out[f"{d}/MnR"] = sum(r) / len(r) + 1
    out["RSUM"] = sum(out[f"{d}/R@{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def problem(seed, n_visual=23, caps=(1, 4), ties=True):
    g = torch.Generator().manual_seed(seed)
    per = torch.randint(caps[0], caps[1] + 1, (n_visual,), generator=g)
    t2v = torch.repeat_interleave(torch.arange(n_visual), per)
    t2v = t2v[torch.randperm(len(t2v), generator=g)]
    sims = torch.randint(0, 6, (len(t2v), n_visual), generator=g).float() if ties else \
        torch.randn(len(t2v), n_visual, generator=g)
    sims[torch.arange(len(t2v)), t2v] += torch.randint(0, 4, (len(t2v),), generator=g).float()  # some signal
    return sims, t2v


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("medr", ["floor", "plain"])
@pytest.mark.parametrize("ties", [True, False])
def test_matches_reference(seed, medr, ties):
    sims, t2v = problem(seed, ties=ties)
    rt, rv = retrieval_ranks(sims, t2v, chunk_size=5)
    assert (rt.tolist(), rv.tolist()) == ref_ranks(sims, t2v)
    got, ref = retrieval_metrics(sims, t2v, medr), ref_metrics(sims, t2v, medr)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_full(chunk):
    sims, t2v = problem(11, n_visual=40, caps=(1, 6))
    calls = []

    def score(a, b):
        calls.append((a, b))
        return sims[a:b]
    assert chunked_retrieval_metrics(score, t2v, 40, chunk_size=chunk) == retrieval_metrics(sims, t2v)
    n_blocks = math.ceil(len(t2v) / chunk)
    assert len(calls) == 2 * n_blocks    # two passes, documented


def test_medr_conventions_differ_on_even_counts():
    r = metrics_from_ranks(torch.tensor([0, 0, 3, 4]), torch.tensor([1, 2]), "floor")
    p = metrics_from_ranks(torch.tensor([0, 0, 3, 4]), torch.tensor([1, 2]), "plain")
    assert (r["t2v/MdR"], p["t2v/MdR"]) == (2.0, 2.5)
    assert (r["v2t/MdR"], p["v2t/MdR"]) == (2.0, 2.5)


def test_ties_are_pessimistic_and_order_free():
    sims = torch.ones(4, 4)
    m = retrieval_metrics(sims, torch.arange(4))
    assert m["t2v/R@1"] == 0.0 and m["t2v/MnR"] == 4.0
    # permuting the items does not change anything (no dependence on sort order)
    sims, t2v = problem(3)
    perm = torch.randperm(sims.shape[1], generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    assert retrieval_metrics(sims[:, perm], inv[t2v]) == retrieval_metrics(sims, t2v)


def test_coco_1k_full_size_matches_manual_folds():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=-1)
    t2v = torch.arange(5000).repeat_interleave(5)
    cap = torch.nn.functional.normalize(img[t2v] + 0.35 * torch.randn(25000, 16, generator=g), dim=-1)
    sims = cap @ img.T
    m1k = protocol_metrics(sims, t2v, "coco-1k")
    folds = [retrieval_metrics(sims[5000 * f:5000 * (f + 1), 1000 * f:1000 * (f + 1)], t2v[:5000]) for f in range(5)]
    for k in folds[0]:
        assert m1k[k] == pytest.approx(np.mean([f[k] for f in folds]), abs=1e-9), k


def test_fold_metrics_with_shuffled_captions():
    sims, t2v = problem(5, n_visual=20)
    m = fold_metrics(sims, t2v, fold_size=10)
    ref = []
    for f0 in (0, 10):
        rows = ((t2v >= f0) & (t2v < f0 + 10)).nonzero()[:, 0]
        ref.append(ref_metrics(sims[rows][:, f0:f0 + 10], t2v[rows] - f0, "floor"))
    for k in ("t2v/R@1", "v2t/R@5", "t2v/MdR", "v2t/MnR"):
        assert m[k] == pytest.approx(np.mean([r[k] for r in ref]))


def test_errors():
    sims, t2v = problem(0)
    with pytest.raises(ShapeError, match="text_to_visual"):
        retrieval_metrics(sims, t2v[:-1])
    with pytest.raises(ShapeError, match="`sims` must have 2 dimensions"):
        retrieval_metrics(sims[0], t2v)
    with pytest.raises(DataError, match="no caption"):
        retrieval_metrics(torch.cat([sims, sims[:, :1]], 1), t2v)
    with pytest.raises(ConfigError, match="medr"):
        retrieval_metrics(sims, t2v, medr="ceil")
    bad = sims.clone(); bad[0, 0] = float("inf")
    with pytest.raises(ShapeError, match="NaN or inf"):
        chunked_retrieval_metrics(lambda a, b: bad[a:b], t2v, sims.shape[1])
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_retrieval_metrics(lambda a, b: sims[a:b], t2v, sims.shape[1], chunk_size=0)


def test_aggregate_and_format():
    runs = [{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 10.0}]
    agg = aggregate_seeds(runs)
    assert agg == {"a": (2.0, pytest.approx(math.sqrt(2))), "b": (10.0, 0.0)}
    assert format_mean_std(agg, 2) == {"a": "2.00 ± 1.41", "b": "10.00 ± 0.00"}
    with pytest.raises(ConfigError):
        aggregate_seeds([])


def test_plausible_metrics_golden():
    """Hand-computed: captions true of items {0,1}, {1,2}, {0,2} (own items 0, 1, 2); see nbs/02_metrics.ipynb."""
    from xmretrieval.metrics import plausible_metrics
    sims = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.7], [0.5, 0.6, 0.4]])
    m = plausible_metrics(sims, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 4, 6]), torch.tensor([0, 1, 1, 2, 0, 2]))
    assert abs(m["t2v/R-P"] - 200 / 3) < 1e-9 and abs(m["t2v/mAP@R"] - 175 / 3) < 1e-9
    assert (m["t2v/misses"], m["t2v/miss top-1 true (%)"]) == (2.0, 50.0)
    assert abs(m["v2t/R-P"] - 200 / 3) < 1e-9 and abs(m["v2t/mAP@R"] - 50.0) < 1e-9
    assert (m["v2t/misses"], m["v2t/miss top-1 true (%)"]) == (2.0, 0.0)
