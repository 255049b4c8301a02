"""Golden tokenisation/encoding of the packaged all-MiniLM-L6-v2, so a tokenizer-flag change fails a test."""
import json
from pathlib import Path

import torch

from xmretrieval.encoders import TextEncoder, TextEncoderConfig

FIX = json.loads((Path(__file__).parent / "fixtures" / "minilm_tokens.json").read_text())


def test_minilm_tokenisation_golden():
    enc = TextEncoder(TextEncoderConfig(kind="hf", path="minilm", max_length=FIX["max_length"]))
    tok = enc.tokenize(FIX["captions"])
    assert tok["input_ids"].tolist() == FIX["input_ids"]
    assert tok["attention_mask"].tolist() == FIX["attention_mask"]
    f = enc.encode_text({"captions": FIX["captions"]})
    torch.testing.assert_close(f.pooled[:, :8], torch.tensor(FIX["pooled_first8"]), atol=2e-4, rtol=0)
    torch.testing.assert_close(f.pooled.norm(dim=-1), torch.tensor(FIX["pooled_norm"]), atol=2e-4, rtol=0)


def test_minilm_pooled_matches_sentence_transformers_mean_pool():
    # the mean pooling of padded batches equals encoding each caption alone (padding is masked)
    enc = TextEncoder(TextEncoderConfig(kind="hf", path="minilm"))
    caps = FIX["captions"][:3]
    batch = enc.encode_text({"captions": caps}).pooled
    alone = torch.cat([enc.encode_text({"captions": [c]}).pooled for c in caps])
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=0)
