"""xmretrieval.data.emoji: grouped splits, deterministic items, caption structure, tiny benchmarks end to end, clear errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from xmretrieval.core import DataError
from xmretrieval.data import emoji as E
from xmretrieval.data.core import load_benchmark


def test_variants_never_cross_splits():
    cat = E.emoji_catalogue()
    assert len(cat) > 3500
    split_of = {}
    for e in cat:
        s = E.split_of_group(e.group)
        assert split_of.setdefault(e.group, s) == s
    # all variants of "person biking" (skin tones, man/woman) share one group, hence one split
    bikers = [e for e in cat if e.name.split(":")[0] in ("person biking", "man biking", "woman biking")]
    assert len(bikers) == 18 and len({e.group for e in bikers}) == 1
    pools = {s: E.split_pool(s) for s in E.SPLITS}
    assert sum(map(len, pools.values())) == len(cat)
    groups = {s: {e.group for e in p} for s, p in pools.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["val"] & groups["test"]) and not (groups["train"] & groups["val"])
    n = len(set().union(*groups.values()))
    assert 0.7 < len(groups["train"]) / n < 0.9  # fractions 0.8 / 0.1 / 0.1 over groups


def test_items_are_deterministic_and_well_formed():
    cfg = E.preset_config("emoji-scenes", "tiny:unseen-concept")
    a, b = E.scene_item(cfg, "test", 7), E.scene_item(cfg, "test", 7)
    assert a.captions == b.captions and np.array_equal(np.asarray(a.visual), np.asarray(b.visual))
    test_groups = {e.group for e in E.split_pool("test")}
    for i in range(30):
        it = E.scene_item(cfg, "test", i)
        objs = it.info["objects"]
        assert {E.group_key(o["emoji"]) for o in objs} <= test_groups  # unseen-concept: only emoji of their split
        mentions = [set(c["mentions"]) for c in it.info["captions"]]
        assert all(len(m) <= 2 for m in mentions) and set().union(*mentions) == set(range(len(objs)))
        if len(objs) >= 3:
            assert all(len(m) < len(objs) for m in mentions)  # no caption covers the whole scene
        for c, m in zip(it.captions, mentions):  # a caption names exactly the emoji it says it mentions
            assert all(objs[j]["name"] in c for j in m)
    v = E.video_item(E.preset_config("emoji-video", "tiny"), "val", 3)
    assert len(v.visual) == 16 and v.info["captions"][0]["kind"] == "clip"
    first, last = v.info["events"][0], v.info["events"][-1]
    # an emoji is drawn only during its event: frames outside every event span would be blank
    f0 = np.asarray(v.visual[first["frames"][0]]); bg = f0[0, 0]
    assert (np.abs(f0.astype(int) - bg).sum(-1) > 30).any()
    tiny = E._object_entries(E.preset_config("emoji-objects", "tiny"), "val")
    objs = E.object_item(E.preset_config("emoji-objects", "tiny"), "val", 0)
    assert objs.captions[0] == tiny[0].name and objs.info["emoji"] == [tiny[0].char] and len(set(objs.captions)) == 5
    assert len(tiny) == 48 and len({e.group for e in tiny}) == 48  # one variant per group


def test_compositional_protocol():
    """Shared vocabulary, new compositions, no pixel-identical crops, determinism (scenes and video)."""
    import hashlib
    cfg = E.preset_config("emoji-scenes", "tiny")
    assert cfg.protocol == "compositional" and E.concept_pool(cfg, "train") == E.concept_pool(cfg, "test")
    assert len(E.vocabulary()) >= 500  # the full vocabulary: several hundred concepts or more
    train = [E.scene_item(cfg, "train", i) for i in range(cfg.n_train)]
    test = [E.scene_item(cfg, "test", i) for i in range(cfg.n_test)]
    vocab = {e.group for e in E.concept_pool(cfg, "train")}
    sets = lambda items: [frozenset(o["group"] for o in it.info["objects"]) for it in items]
    assert set().union(*sets(train), *sets(test)) <= vocab
    assert not set(sets(test)) & set(sets(train))
    assert set(sets(train)) == set(E.train_compositions("emoji-scenes", cfg))
    crop = lambda it, o: hashlib.sha256(np.asarray(it.visual.crop(tuple(o["box"]))).tobytes()).hexdigest()
    train_crops = {crop(it, o) for it in train for o in it.info["objects"]}
    assert not any(crop(it, o) in train_crops for it in test for o in it.info["objects"])
    a, b = E.scene_item(cfg, "val", 4), E.scene_item(cfg, "val", 4)
    assert a.captions == b.captions and np.array_equal(np.asarray(a.visual), np.asarray(b.visual))
    vc = E.preset_config("emoji-video", "tiny")
    vtrain = set(E.train_compositions("emoji-video", vc))
    assert not any(frozenset(e["group"] for e in E.video_item(vc, "test", i).info["events"]) in vtrain for i in range(vc.n_test))
    # the unseen-concept protocol keeps test concepts out of training
    u = E.preset_config("emoji-scenes", "tiny:unseen-concept")
    assert not {o["group"] for i in range(20) for o in E.scene_item(u, "test", i).info["objects"]} & \
        {o["group"] for i in range(48) for o in E.scene_item(u, "train", i).info["objects"]}


def test_true_matches_and_stats():
    sc, tr = load_benchmark("emoji-scenes", "tiny", "test"), load_benchmark("emoji-scenes", "tiny", "train")
    m = sc.true_matches()
    assert sc.has_matches and all(int(sc.text_to_visual[j]) in m[j] for j in range(sc.n_text))
    info = sc.meta["caption_info"]
    for j in range(sc.n_text):  # exact: the index agrees with checking every item
        assert m[j] == [i for i in range(sc.n_visual) if E.caption_true("emoji-scenes", info[j], sc.meta["items"][i])]
    st = E.composition_stats(sc, tr)
    assert st["new compositions (%)"] == 100.0 and st["captions"] == sc.n_text
    assert 0 <= st["shared wording (%)"] <= 100 and st["true items per caption (mean)"] >= 1
    # the protocols have separate caches
    un = load_benchmark("emoji-scenes", "tiny", "test", protocol="unseen-concept")
    assert un.meta["config"]["protocol"] == "unseen-concept" and un.captions != sc.captions


def test_scenes_and_video_tiny_end_to_end():
    sc = load_benchmark("emoji-scenes", "tiny", "test")
    assert sc.visual_local.shape == (48, 49, 1280) and sc.n_text == 240
    assert len(sc.meta["caption_info"]) == sc.n_text and len(sc.meta["items"]) == sc.n_visual
    im = E.render_item("emoji-scenes", "tiny", "test", 5)
    assert isinstance(im, Image.Image) and im.size == (224, 224)
    assert [o["name"] for o in sc.meta["items"][5]["objects"]] == [o["name"] for o in E.benchmark_item("emoji-scenes", "tiny", "test", 5).info["objects"]]
    vd = load_benchmark("emoji-video", "tiny", "test")
    assert vd.visual_local.shape == (32, 16, 1280) and vd.visual_mask is None
    assert torch.allclose(vd.visual_global, vd.visual_local.mean(1), atol=1e-2)
    assert E.render_item("emoji-video", "tiny", "test", 0).size == (16 * 112, 112)
    with pytest.raises(DataError, match="out of range"):
        E.benchmark_item("emoji-scenes", "tiny", "test", 48)


def test_missing_system_packages_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("XMR_EMOJI_FONT", str(tmp_path / "none.ttf"))
    monkeypatch.setattr(E, "FONT_PATHS", (str(tmp_path / "NotoColorEmoji.ttf"),))
    with pytest.raises(DataError, match="apt-get install fonts-noto-color-emoji"):
        E.font_path()
    monkeypatch.setenv("XMR_CLDR_DIR", str(tmp_path))
    monkeypatch.setattr(E, "CLDR_DIRS", (str(tmp_path),))
    with pytest.raises(DataError, match="apt-get install unicode-cldr-core"):
        E.cldr_dir()
