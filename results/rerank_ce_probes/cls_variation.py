"""The [CLS] state of the untrained MiniLM cross-encoder cut to 2 layers and whole (6): how much it varies over pairs (results/rerank_ce_probes/README.md). Run: python results/rerank_ce_probes/cls_variation.py"""
import torch
from xmretrieval.checkpoint import load_config, load_split
from xmretrieval.models.rerank import RerankConfig, RerankModel
torch.manual_seed(0)
d = load_split(load_config("rerank_emoji_scenes").data, "val")     # first 200 val scenes
caps, items = list(d.captions[:64]), d.text_to_visual[:64]
for layers in (2, 6):
    m = RerankModel(RerankConfig(visual_dim=1280, use="ce", bert=dict(num_hidden_layers=layers))).eval()
    ids, mask = m.tokenize(caps)
    with torch.no_grad():
        h, _, pooled = m._run(m.cross_parts(ids, mask, d.visual_local[items]))
        h2, _, pooled2 = m._run(m.cross_parts(ids, mask, d.visual_local[(items + 7) % d.n_visual]))
    print(f"{layers} layers: [CLS] std over 64 pairs {h[:, 0].std(0).mean():.4f}, mean change when the image changes "
          f"{(h[:, 0] - h2[:, 0]).abs().mean():.4f}; pooled std {pooled.std(0).mean():.4f}")
