"""xmretrieval.data.published: every reader on small files written in the exact published layouts."""
import json
import pickle

import numpy as np
import pytest
import torch

from xmretrieval.core import DataError
from xmretrieval.data.published import (load_features, read_didemo, read_karpathy, read_lsmdc, read_msrvtt, read_msvd,
                                        read_precomp)


@pytest.fixture
def frames(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "frames"
    d.mkdir()
    feats = {f"video{i}": rng.random((3 + i % 3, 16), dtype=np.float32) for i in range(10)}
    for k, v in feats.items():
        np.save(d / f"{k}.npy", v)
    np.savez(tmp_path / "frames.npz", **feats)
    return d, tmp_path / "frames.npz", feats


def test_load_features_folder_equals_archive(frames):
    d, npz, feats = frames
    ids = ["video3", "video1", "video5"]
    a, ma, ga = load_features(d, ids)
    b, mb, gb = load_features(npz, ids)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    for i, v in enumerate(ids):  # global = mean over the valid frames only
        assert torch.allclose(ga[i], torch.from_numpy(feats[v]).mean(0), atol=1e-6)
    s, m, _ = load_features(d, ["video5"], max_len=2)
    assert torch.equal(s[0], torch.from_numpy(feats["video5"][[0, 4]]))


def test_karpathy_flickr(tmp_path):
    imgs = [{"sentids": [5 * i + k for k in range(5)], "imgid": i, "filename": f"{1000 + i}.jpg",
             "split": ["train", "val", "test", "test"][i],
             "sentences": [{"tokens": ["x"], "raw": f"img{i} cap{k}", "imgid": i, "sentid": 5 * i + k} for k in range(5)]}
            for i in range(4)]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    np.savez(tmp_path / "f.npz", **{f"{1000 + i}": np.full((36, 4), i, np.float32) for i in range(4)})
    d = read_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f.npz", "test")
    assert d.name == "flickr30k" and d.visual_ids == ["1002", "1003"] and d.n_text == 10
    assert d.captions[5] == "img3 cap0" and d.text_to_visual.tolist() == [0] * 5 + [1] * 5
    assert torch.all(d.visual_global[1] == 3)
    # an image with too few captions is an error naming the file
    imgs[2]["sentences"] = imgs[2]["sentences"][:3]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": imgs, "dataset": "flickr30k"}))
    with pytest.raises(DataError, match="dataset_flickr30k.json: image '1002' has 3 captions"):
        read_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f.npz", "test")


def test_precomp_vse_infinity_layout(tmp_path):
    pre = tmp_path / "f30k" / "precomp"
    pre.mkdir(parents=True)
    ims = np.random.default_rng(0).random((4, 36, 8), dtype=np.float32)
    np.save(pre / "dev_ims.npy", ims)
    (pre / "dev_caps.txt").write_text("".join(f"c{j}\n" for j in range(20)))
    d = read_precomp(tmp_path / "f30k", "dev")
    assert d.name == "f30k" and d.n_text == 20 and d.visual_mask is None
    assert torch.equal(d.visual_local, torch.from_numpy(ims)) and d.captions[7] == "c7" and int(d.text_to_visual[7]) == 1
    one = read_precomp(tmp_path / "f30k", "dev", max_images=1)
    assert one.n_visual == 1 and one.n_text == 5
    (pre / "dev_caps.txt").write_text("".join(f"c{j}\n" for j in range(19)))
    with pytest.raises(DataError, match="19 captions, not a multiple of the 4 images"):
        read_precomp(pre, "dev")


def test_video_readers(tmp_path, frames):
    d, npz, _ = frames
    vids = [f"video{i}" for i in range(10)]
    m = tmp_path / "msrvtt"; m.mkdir()
    (m / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": v, "split": "train" if i < 6 else "validate" if i < 8 else "test", "id": i, "url": "u",
                    "category": 0, "start time": 0, "end time": 1} for i, v in enumerate(vids)],
        "sentences": [{"caption": f"{v} s{k}", "video_id": v, "sen_id": k} for k in range(20) for v in vids]}))
    (m / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(vids[:6]) + "\n")
    (m / "MSRVTT_train.7k.csv").write_text("video_id\n" + "\n".join(vids[:4]) + "\n")
    (m / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" +
                                                "".join(f"ret{i},msr{i},{v},{v} query\n" for i, v in enumerate(vids[8:])))
    tr = read_msrvtt(m, npz, "train")
    assert tr.n_visual == 6 and tr.n_text == 120 and tr.visual_to_text()[2] == list(range(40, 60))
    assert read_msrvtt(m, d, "train", "7k").n_visual == 4 and read_msrvtt(m, d, "val").visual_ids == ["video6", "video7"]
    te = read_msrvtt(m, d, "test")
    assert te.visual_ids == ["video8", "video9"] and te.captions == ["video8 query", "video9 query"]
    s = tmp_path / "msvd"; s.mkdir()
    (s / "test_list.txt").write_text("video1\nvideo2\n")
    with open(s / "raw-captions.pkl", "wb") as f:
        pickle.dump({"video1": [["a", "b"], ["c"]], "video2": [["d"]]}, f)
    ms = read_msvd(s, d, "test")
    assert ms.captions == ["a b", "c", "d"] and ms.text_to_visual.tolist() == [0, 0, 1]
    (s / "val_list.txt").write_text("video3\n")
    with pytest.raises(DataError, match="no captions for video 'video3'"):
        read_msvd(s, d, "val")
    l = tmp_path / "lsmdc"; l.mkdir()
    (l / "LSMDC16_challenge_1000_publictect.csv").write_text(
        "video1\t0\t1\t0\t1\tSOMEONE opens a door.\nvideo2\t0\t1\t0\t1\tHe smiles.\n")
    ls = read_lsmdc(l, d, "test")
    assert ls.visual_ids == ["video1", "video2"] and ls.captions[1] == "He smiles."
    (l / "LSMDC16_annos_val.csv").write_text("video1\t0\t1\tSOMEONE opens a door.\n")
    with pytest.raises(DataError, match="LSMDC16_annos_val.csv line 1: expected 6"):
        read_lsmdc(l, d, "val")
    dd = tmp_path / "didemo"; dd.mkdir()
    (dd / "val_list.txt").write_text("video4.mp4\nvideo5.mov\nvideo6.mp4\n")
    (dd / "val_data.json").write_text(json.dumps([{"video": "video5.mov", "description": "b", "times": [[0, 0]]},
                                                  {"video": "video4.mp4", "description": "a1", "times": [[1, 1]]},
                                                  {"video": "video4.mp4", "description": "a2", "times": [[2, 3]]}]))
    di = read_didemo(dd, d, "val")
    assert di.visual_ids == ["video4.mp4", "video5.mov"] and di.captions == ["a1 a2", "b"]
    assert di.meta["dropped_without_description"] == 1
    with pytest.raises(DataError, match="no features for id 'video99'"):
        (dd / "test_list.txt").write_text("video99\n")
        (dd / "test_data.json").write_text(json.dumps([{"video": "video99", "description": "x", "times": [[0, 0]]}]))
        read_didemo(dd, d, "test")


def test_text_features_option(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 8), np.float32))
    (tmp_path / "test_caps.txt").write_text("a dog\na cat on a mat\n")
    d = read_precomp(tmp_path, "test", text_features=True)
    assert d.text_local.shape[0] == 2 and d.text_global.shape == (2, 384) and d.text_mask.sum(1).tolist() == [4, 7]
