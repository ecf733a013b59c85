"""mmfast.eval against brute-force definitions on the full float64 score matrix, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.__main__ import main
from mmfast.eval import _common
from tests.helpers import backend_params, features
from tests.test_similarity import exact_features, scores64

ALL = backend_params()


def positions(s: torch.Tensor) -> np.ndarray:
    """1-based position of every column in its row's ranking (higher first, ties: lower column first)."""
    s = s.double().numpy()
    cols = np.arange(s.shape[1])
    pos = np.empty(s.shape, dtype=np.int64)
    for r, row in enumerate(s):
        pos[r, np.lexsort((cols, -row))] = np.arange(1, s.shape[1] + 1)
    return pos


def summary(direction, ranks, ks):
    out = {f"{direction}_R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{direction}_mean_rank"] = float(np.mean(ranks))
    out[f"{direction}_median_rank"] = float(np.median(ranks))
    return out


def brute_retrieval(img, txt, t2i, ks, normalize=True):
    """The definitions, on the full matrix: image→text rank = best position of any of its captions
    (images without captions left out), text→image rank = position of its image."""
    s = scores64(img, txt, 1.0, normalize)
    t2i = t2i.numpy()
    pos_it, pos_ti = positions(s), positions(s.T)
    it = np.array([pos_it[i, t2i == i].min() for i in range(s.shape[0]) if (t2i == i).any()])
    ti = pos_ti[np.arange(s.shape[1]), t2i]
    return {**summary("image_to_text", it, ks), **summary("text_to_image", ti, ks)}


def coco_like(n, d, normalize, seed, captions=5):
    """n images with `captions` captions each (shuffled), many exact ties: duplicated captions,
    captions equal to their image, duplicated images."""
    img = exact_features(n, d, normalize, seed)
    t2i = torch.randperm(n * captions, generator=torch.Generator().manual_seed(seed)) % n
    txt = exact_features(n * captions, d, normalize, seed + 1)
    txt[::7] = img[t2i[::7]]  # some captions are their image
    txt[1::11] = txt[0]  # one caption repeated
    img[3] = img[2].clone()  # two identical images
    return img, txt, t2i


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("normalize", [False, True])
def test_retrieval_equals_brute_force_with_ties(backend, normalize):
    img, txt, t2i = coco_like(30, 8, normalize, 1)
    out = mmfast.eval.retrieval_metrics(img, txt, t2i, normalize=normalize, backend=backend)
    assert out == brute_retrieval(img, txt, t2i, (1, 5, 10), normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_ranks_beyond_the_topk_across_chunks(monkeypatch, normalize):
    """ks = (1,): every rank above 1 comes from the chunked count, here over chunks of a few columns."""
    monkeypatch.setattr(_common, "CHUNK_ELEMS", 64)
    img, txt, t2i = coco_like(30, 8, normalize, 2)
    out = mmfast.eval.retrieval_metrics(img, txt, t2i, ks=(1,), normalize=normalize)
    assert out == brute_retrieval(img, txt, t2i, (1,), normalize)


@pytest.mark.parametrize("backend", ALL)
def test_retrieval_random_features_and_captionless_images(backend):
    """Float features (no ties), a random caption→image map that leaves some images without a
    caption (left out of image→text), and cut-offs beyond N and M."""
    g = torch.Generator().manual_seed(3)
    img, txt = features(64, 32, normalize=False, seed=4), features(150, 32, normalize=False, seed=5)
    t2i = torch.randint(0, 64, (150,), generator=g)
    assert (torch.bincount(t2i, minlength=64) == 0).any()
    ks = (1, 5, 10, 100, 1000)
    out = mmfast.eval.retrieval_metrics(img, txt, t2i, ks=ks, backend=backend)
    assert out == brute_retrieval(img, txt, t2i, ks)


def test_retrieval_single_image_and_half_precision():
    img, txt = features(1, 16, torch.float16), features(5, 16, torch.float16)
    out = mmfast.eval.retrieval_metrics(img, txt, torch.zeros(5, dtype=torch.int64), ks=(1, 2))
    assert out["image_to_text_R@1"] == 1.0 and out["text_to_image_mean_rank"] == 1.0
    assert all(isinstance(v, float) for v in out.values())


# ---------------------------------------------------------------- zero-shot

def brute_zero_shot(img, labels, classifier, ks):
    pos = positions(img.double() @ classifier.double().T)
    rank = pos[np.arange(len(labels)), labels.numpy()]
    out = {f"top{k}_accuracy": float(np.mean(rank <= k)) for k in ks}
    labels = labels.numpy()
    recalls = [np.mean(rank[labels == c] == 1) for c in np.unique(labels)]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


@pytest.mark.parametrize("backend", ALL)
def test_zero_shot_accuracy_equals_brute_force_with_ties(backend):
    classifier = exact_features(12, 8, False, 6)
    classifier[5] = classifier[9]  # two classes that always tie
    img = exact_features(90, 8, False, 7)
    labels = torch.randint(0, 11, (90,), generator=torch.Generator().manual_seed(8))  # class 11 absent
    ks = (1, 5, 20)  # 20 > C counts as C
    out = mmfast.eval.zero_shot_accuracy(img, labels, classifier, ks=ks, backend=backend)
    assert out == brute_zero_shot(img, labels, classifier, ks)
    assert out["top20_accuracy"] == 1.0


def fake_text_encoder(texts):
    """A deterministic 'text encoder': a random vector per string (seeded by its CRC), not normalised."""
    return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) * 3
                        for t in texts])


def test_zero_shot_classifier_and_accuracy():
    classnames = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", lambda c: f"itap of a {c}", "a {} in the wild"]
    classifier = mmfast.eval.zero_shot_classifier(fake_text_encoder, classnames, templates)
    assert classifier.shape == (3, 16) and classifier.dtype == torch.float32
    for c, name in enumerate(classnames):
        prompts = [f"a photo of a {name}.", f"itap of a {name}", f"a {name} in the wild"]
        mean = F.normalize(fake_text_encoder(prompts), dim=1).mean(0)
        torch.testing.assert_close(classifier[c], mean / mean.norm())
    img = classifier[torch.tensor([0, 1, 2, 2, 1])] + 0.01 * features(5, 16, normalize=False, seed=9)
    out = mmfast.eval.zero_shot_accuracy(img, torch.tensor([0, 1, 2, 2, 0]), classifier)
    assert out == {"top1_accuracy": 0.8, "top5_accuracy": 1.0, "mean_per_class_recall": (0.5 + 1 + 1) / 3}


# ---------------------------------------------------------------- bad input

IMG, TXT, T2I = features(4, 3), features(6, 3), torch.tensor([0, 0, 1, 2, 3, 3])
NAN_IMG = IMG.clone()
NAN_IMG[1, 1] = float("nan")

BAD = [
    (lambda: mmfast.eval.retrieval_metrics(IMG, features(6, 5), T2I), ValueError, "text_emb must have the feature size D=3"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I[:5]), ValueError, r"text_to_image must have shape \(6,\)"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I + 1), ValueError, r"text_to_image values must be in \[0, 4\)"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I - 1), ValueError, "text_to_image values must be in"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I.float()), TypeError, "text_to_image must hold integers"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, [0, 0, 1, 2, 3, 3]), TypeError, "text_to_image must be a torch.Tensor"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I, ks=()), ValueError, "ks must be a non-empty sequence"),
    (lambda: mmfast.eval.retrieval_metrics(IMG, TXT, T2I, ks=(0, 1)), ValueError, "ks must be a non-empty sequence"),
    (lambda: mmfast.eval.retrieval_metrics(NAN_IMG, TXT, T2I), ValueError, "image_emb has NaN or infinite entries"),
    (lambda: mmfast.eval.retrieval_metrics(IMG[:0], TXT, T2I), ValueError, "image_emb is an empty batch"),
    (lambda: mmfast.eval.zero_shot_accuracy(IMG, torch.tensor([0, 1, 2, 6]), TXT), ValueError, r"labels values must be in \[0, 6\)"),
    (lambda: mmfast.eval.zero_shot_accuracy(IMG, torch.tensor([0, 1]), TXT), ValueError, r"labels must have shape \(4,\)"),
    (lambda: mmfast.eval.zero_shot_accuracy(IMG, torch.tensor([0, 1, 2, 3]), features(6, 2)), ValueError,
     "classifier must have the feature size D=3"),
    (lambda: mmfast.eval.zero_shot_classifier(lambda t: torch.zeros(1, 3), ["a", "b"], ["{}", "x {}"]), ValueError,
     "text_encoder must return a float"),
    (lambda: mmfast.eval.zero_shot_classifier(fake_text_encoder, [], ["{}"]), ValueError, "classnames must be a non-empty"),
    (lambda: mmfast.eval.zero_shot_classifier(fake_text_encoder, ["a"], "{}"), ValueError, "templates must be a non-empty"),
]


@pytest.mark.parametrize("call,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- CLI

@pytest.fixture
def npy(tmp_path):
    """Writes arrays to tmp .npy files → their paths."""
    def save(name, arr):
        path = tmp_path / f"{name}.npy"
        np.save(path, arr)
        return str(path)
    return save


def test_cli_table_and_json(npy, tmp_path, capsys):
    img, txt, t2i = coco_like(20, 8, True, 10)
    out_json = tmp_path / "out.json"
    args = ["eval-retrieval", "--image-emb", npy("img", img.numpy()), "--text-emb", npy("txt", txt.numpy()),
            "--text-to-image", npy("map", t2i.numpy()), "--k", "1", "5", "--json", str(out_json)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "20 images, 100 captions, D = 8" in printed
    assert "image→text" in printed and "text→image" in printed and "R@5" in printed and "median rank" in printed
    result = json.loads(out_json.read_text())
    expected = brute_retrieval(img, txt, t2i, (1, 5))
    assert result == {"num_images": 20, "num_texts": 100, "ks": [1, 5], "metrics": expected}
    assert f"{100 * expected['text_to_image_R@1']:.2f}" in printed


def test_cli_entry_point(npy):
    img, txt = features(3, 4).numpy(), features(6, 4).numpy()
    args = [sys.executable, "-m", "mmfast", "eval-retrieval", "--image-emb", npy("i", img), "--text-emb", npy("t", txt),
            "--text-to-image", npy("m", np.array([0, 0, 1, 1, 2, 2]))]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0 and "image→text" in proc.stdout, proc.stderr


CLI_BAD = [
    ("rows", dict(map=np.array([0, 1, 2])), "has 3 entries but --text-emb .* has 6 rows"),
    ("dims", dict(txt=np.ones((6, 5), np.float32)), "--text-emb .* has D=5 but --image-emb .* has D=4"),
    ("range", dict(map=np.array([0, 1, 2, 3, 4, 5])), r"values must be image rows in \[0, 4\)"),
    ("negative", dict(map=np.array([0, 1, 2, 3, -1, 0])), r"values must be image rows in \[0, 4\)"),
    ("map-dtype", dict(map=np.zeros(6, np.float32)), "expected a 1-D integer array"),
    ("img-shape", dict(img=np.ones(4, np.float32)), r"--image-emb .* expected a non-empty \(N, D\) float array"),
    ("txt-dtype", dict(txt=np.ones((6, 4), np.int64)), r"--text-emb .* expected a non-empty \(M, D\) float array"),
    ("missing", dict(img=None), "--image-emb .* cannot read a .npy array"),
]


@pytest.mark.parametrize("case,arrays,message", CLI_BAD, ids=[c for c, _, _ in CLI_BAD])
def test_cli_mismatched_files(npy, tmp_path, capsys, case, arrays, message):
    given = {"img": np.ones((4, 4), np.float32), "txt": np.ones((6, 4), np.float32), "map": np.array([0, 0, 1, 1, 2, 3]),
             **arrays}
    paths = {name: (npy(name, arr) if arr is not None else str(tmp_path / "absent.npy")) for name, arr in given.items()}
    code = main(["eval-retrieval", "--image-emb", paths["img"], "--text-emb", paths["txt"], "--text-to-image", paths["map"]])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err
