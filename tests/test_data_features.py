"""xmretrieval.data.features against plain references: the EfficientNet grid and the MiniLM mean pooling."""
import numpy as np
import torch

from xmretrieval.data.emoji import emoji_image
from xmretrieval.data.features import FeatureConfig, encode_images, encode_texts, image_encoder, text_encoder


def test_image_grid_matches_plain_forward():
    ims = [emoji_image(c, 224) for c in "🐶🍕🚀"]
    cfg = FeatureConfig(bf16=False, image_batch_size=2)  # two batches: batching must not change anything
    grid, glob = encode_images(ims, cfg)
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims]).float()
    with torch.inference_mode():
        ref = image_encoder("cpu").extract_features((x - 127.0) / 128.0)  # (3, 1280, 7, 7)
    assert torch.allclose(grid, ref.flatten(2).transpose(1, 2), atol=1e-4)
    assert torch.allclose(glob, ref.mean((2, 3)), atol=1e-4)
    fast, _ = encode_images(ims, FeatureConfig())  # bf16 autocast where supported
    assert torch.nn.functional.cosine_similarity(fast.mean(1), glob).min() > 0.99


def test_text_mean_pooling_matches_reference():
    caps = ["a dog face", "a rocket to the left of a big slice of pizza", "x"]
    tokens, mask, pooled = encode_texts(caps, FeatureConfig(text_batch_size=2))
    tok, model = text_encoder("cpu")
    for i, c in enumerate(caps):  # one at a time, no padding
        enc = tok([c], return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state[0]
        n = h.shape[0]
        assert mask[i].sum() == n and torch.allclose(tokens[i, :n], h, atol=1e-4)
        assert torch.allclose(pooled[i], h.mean(0), atol=1e-4)
    assert tokens.shape[1] == mask.sum(1).max() and not tokens[~mask].any()
