"""Raw-input encoding: a caption or an image through `encode_text` / `encode_visual` gives the embedding of the
precomputed-feature path (the features the benchmarks store), for trained tiny models of every kind."""
import pytest
import torch

from xmretrieval.checkpoint import load_config
from xmretrieval.data.core import load_benchmark
from xmretrieval.data.emoji import render_item
from xmretrieval.data.features import featurize
from xmretrieval.models.base import text_batch, visual_batch
from xmretrieval.train import Trainer

CAPTION = "a dog face above a pizza"


@pytest.fixture(scope="module")
def test_split():
    return load_benchmark("emoji-scenes", "tiny", "test")


@pytest.fixture(scope="module", params=["biencoder_tiny", "dive_tiny"])
def model(request):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(request.param, max_steps=4, epochs=2, eval_every=2))
        trainer.fit()
    finally:
        torch.set_num_threads(n)
    return trainer.model.eval()


def test_caption_matches_the_feature_path(model, test_split):
    # a new caption: the features the benchmark builder (featurize) would store for it
    img = render_item("emoji-scenes", "tiny", "test", 0)
    d = featurize("one", "test", ["x"], [img], [CAPTION], [0])
    with torch.no_grad(): ref = model.encode_text(text_batch(d, [0]))
    torch.testing.assert_close(model.encode_text([CAPTION]), ref, atol=2e-4, rtol=0)
    # captions of the stored split, several at once (different lengths: padding and batching)
    with torch.no_grad(): ref = model.encode_text(text_batch(test_split, range(6)))
    got = model.encode_text(test_split.captions[:6])
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)


def test_image_matches_the_feature_path(model, test_split):
    items = [0, 1, 2]
    imgs = [render_item("emoji-scenes", "tiny", "test", i) for i in items]
    with torch.no_grad(): ref = model.encode_visual(visual_batch(test_split, items))
    torch.testing.assert_close(model.encode_visual(imgs), ref, atol=2e-4, rtol=0)


def test_raw_inputs_keep_the_mode_and_reject_bad_input(model):
    model.train()
    try:
        with pytest.raises(Exception, match="wrap it in a list"): model.encode_text(CAPTION)
        a = model.encode_text([CAPTION]); b = model.encode_text([CAPTION])
        torch.testing.assert_close(a, b, atol=0, rtol=0)        # eval mode inside: no dropout, no token drop
        assert model.training
    finally:
        model.eval()
