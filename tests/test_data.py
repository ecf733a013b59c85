"""mmfast.data: the shapes dataset (determinism, held-out split, captions against the drawn objects,
pixels), the tokenizer (round trips, padding, BERT masking statistics) and the file loaders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmfast.data import (COLORS, HELD_OUT, IGNORE_INDEX, SHAPES, SIZES, TEMPLATES, CaptionFiles, EmbeddingPairs,
                         Obj, Shapes, Tokenizer)
from mmfast.data.shapes import RADIUS_FRACTION, RGB


@pytest.fixture(scope="module")
def train():
    return Shapes("train", 2000, seed=0)


@pytest.fixture(scope="module")
def test_split():
    return Shapes("test", 2000, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(Shapes.vocabulary(), maskable=Shapes.attribute_words())


# ---- Shapes ----

def test_same_arguments_give_identical_data_and_other_seeds_differ():
    a, b, c = Shapes("train", 300, seed=5), Shapes("train", 300, seed=5), Shapes("train", 300, seed=6)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes() and a.captions == b.captions
    assert a.objects == b.objects and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


def test_held_out_pairs_cover_every_colour_and_shape():
    assert len(HELD_OUT) == 6 and all(c in COLORS and s in SHAPES for c, s in HELD_OUT)
    assert sorted(c for c, _ in HELD_OUT) == sorted(COLORS)
    assert sorted(s for _, s in HELD_OUT) == sorted(SHAPES * 2)


def test_train_avoids_held_out_pairs_and_test_always_has_one(train, test_split):
    assert not any((o.color, o.shape) in HELD_OUT for objs in train.objects for o in objs)
    assert all(any((o.color, o.shape) in HELD_OUT for o in objs) for objs in test_split.objects)
    seen = {(o.color, o.shape, o.size) for objs in train.objects for o in objs}
    assert {c for c, _, _ in seen} == set(COLORS) and {s for _, s, _ in seen} == set(SHAPES)
    assert {z for _, _, z in seen} == set(SIZES)


def expected_caption(objs):
    phrases = [f"a {o.size} {o.color} {o.shape}" for o in objs]
    if len(objs) == 1:
        return phrases[0]
    if len(objs) == 2:
        a, b = objs
        if abs(a.y - b.y) > abs(a.x - b.x):
            rel = "above" if a.y < b.y else "below"
        else:
            rel = "left of" if a.x < b.x else "right of"
        return f"{phrases[0]} {rel} {phrases[1]}"
    assert [o.x for o in objs] == sorted(o.x for o in objs), "three objects are listed left to right"
    return f"{phrases[0]} , {phrases[1]} and {phrases[2]}"


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_and_labels_follow_the_objects(split, train, test_split):
    data = train if split == "train" else test_split
    relations = set()
    for caption, objs, label in zip(data.captions, data.objects, data.labels.tolist()):
        assert all(isinstance(o, Obj) for o in objs)
        assert caption == expected_caption(objs)
        assert caption == caption.lower() and "  " not in caption
        assert label == COLORS.index(objs[0].color) * len(SHAPES) + SHAPES.index(objs[0].shape)
        assert Shapes.classnames()[label] == f"{objs[0].color} {objs[0].shape}"
        if len(objs) == 2:
            relations.add(" ".join(caption.split(" ")[4:-4]))  # between "a size colour shape" phrases
    assert relations == {"above", "below", "left of", "right of"}
    assert {len(objs) for objs in data.objects} == {1, 2, 3}


def test_objects_stay_inside_the_image_and_apart(train):
    s = train.image_size
    for objs in train.objects:
        boxes = [(o.x - RADIUS_FRACTION[o.size] * s, o.y - RADIUS_FRACTION[o.size] * s,
                  o.x + RADIUS_FRACTION[o.size] * s, o.y + RADIUS_FRACTION[o.size] * s) for o in objs]
        assert all(0 <= x0 and 0 <= y0 and x1 <= s and y1 <= s for x0, y0, x1, y1 in boxes)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= 1, (objs[i], objs[j])


def test_pixels_show_each_objects_colour_and_size(train):
    images = train.images.numpy().astype(int)
    for image, objs in zip(images[:500], train.objects[:500]):
        for o in objs:
            centre = image[:, int(o.y), int(o.x)]
            assert np.abs(centre - RGB[COLORS.index(o.color)]).max() <= 10, (o, centre)
        # Outside the objects' boxes lies dark background only.
        background = np.ones(image.shape[1:], bool)
        for o in objs:
            r = RADIUS_FRACTION[o.size] * train.image_size
            background[max(0, int(o.y - r) - 1):int(o.y + r) + 2, max(0, int(o.x - r) - 1):int(o.x + r) + 2] = False
        assert image[:, background].max() < 40
    # A large object covers clearly more pixels than a small one of the same shape.
    for shape in SHAPES:
        areas = {size: [] for size in SIZES}
        for image, objs in zip(images[:500], train.objects[:500]):
            if len(objs) == 1 and objs[0].shape == shape:
                areas[objs[0].size].append((image.max(axis=0) > 60).sum())
        assert min(areas["large"]) > 1.8 * max(areas["small"]), (shape, areas)


def test_shapes_differ_in_their_pixels(train):
    """Lone objects of the same size but different shapes fill different fractions of their box."""
    images = train.images.numpy()
    fill = {}
    for image, objs in zip(images, train.objects):
        if len(objs) == 1 and objs[0].size == "large":
            o, r = objs[0], RADIUS_FRACTION["large"] * train.image_size
            box = image.max(axis=0)[int(o.y - r):int(o.y + r) + 1, int(o.x - r):int(o.x + r) + 1]
            fill.setdefault(o.shape, []).append((box > 60).mean())
    means = {s: np.mean(f) for s, f in fill.items()}
    assert means["square"] > means["circle"] + 0.1 > means["triangle"] + 0.2, means


def test_items_images_and_class_helpers(train):
    image, caption = train[3]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and caption == train.captions[3]
    assert 0 <= image.min() and image.max() <= 1 and torch.equal(image, train.images[3].float() / 255)
    assert train.images.dtype == torch.uint8 and train.images.shape == (2000, 3, 32, 32) and len(train) == 2000
    assert train.labels.dtype == torch.int64 and train.labels.shape == (2000,)
    assert len(Shapes.classnames()) == 18 and Shapes.classnames()[:2] == ["red circle", "red square"]
    assert Shapes.attribute_words() == list(COLORS + SHAPES + SIZES)
    words = {w for c in train.captions for w in c.split(" ")}
    assert words <= set(Shapes.vocabulary()) and len(set(Shapes.vocabulary())) == len(Shapes.vocabulary())
    assert {w for t in TEMPLATES for w in t.format("red circle").split()} <= set(Shapes.vocabulary())


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 3), (3, 3), (1, 2)])
def test_object_counts_respect_min_and_max(lo, hi):
    data = Shapes("test", 200, seed=1, image_size=16, min_shapes=lo, max_shapes=hi)
    assert {len(objs) for objs in data.objects} == set(range(lo, hi + 1))
    assert data.images.shape == (200, 3, 16, 16)


@pytest.mark.parametrize("kwargs,name", [
    (dict(split="val"), "split"), (dict(size=0), "size"), (dict(image_size=15), "image_size"),
    (dict(min_shapes=0), "min_shapes"), (dict(min_shapes=4, max_shapes=4), "min_shapes"),
    (dict(max_shapes=4), "max_shapes"), (dict(min_shapes=3, max_shapes=2), "max_shapes"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shapes(**kwargs)


# ---- Tokenizer ----

def test_round_trip_of_every_caption(tokenizer, train, test_split):
    captions = train.captions + test_split.captions
    ids, mask = tokenizer.encode(captions, max_len=64)
    assert not (ids == tokenizer.unk_id).any()
    for row, caption in zip(ids, captions):
        assert tokenizer.decode(row) == caption
    assert tokenizer.decode([1, 5, 6, 2, 0]) == " ".join(Shapes.vocabulary()[:2])
    assert tokenizer.split("A Red circle,  left of") == ["a", "red", "circle", ",", "left", "of"]


def test_padding_truncation_and_special_positions(tokenizer):
    ids, mask = tokenizer.encode(["a red circle", "a small red circle above a large blue square"], max_len=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[:, 0].tolist() == [tokenizer.cls_id] * 2
    assert ids[0, 4] == tokenizer.sep_id and (ids[0, 5:] == tokenizer.pad_id).all()
    assert mask[0].tolist() == [True] * 5 + [False] * 3 and mask[1].all()
    assert ids[1, 7] == tokenizer.sep_id and tokenizer.decode(ids[1]) == "a small red circle above a"
    ids, mask = tokenizer.encode(["red", "blue"], max_len=50)
    assert ids.shape == (2, 3), "padded to the longest row, not to max_len"
    ids, _ = tokenizer.encode(["a red circle"], max_len=3)
    assert ids.tolist() == [[tokenizer.cls_id, tokenizer.ids["a"], tokenizer.sep_id]]
    assert [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.unk_id] == list(range(5))
    assert tokenizer.vocab_size == 5 + len(Shapes.vocabulary())


def test_unknown_words_become_unk(tokenizer):
    ids, _ = tokenizer.encode(["a purple circle!"], max_len=10)
    assert ids[0].tolist() == [1, tokenizer.ids["a"], tokenizer.unk_id, tokenizer.ids["circle"], tokenizer.unk_id, 2]


def test_from_texts_and_dict_round_trip():
    tok = Tokenizer.from_texts(["The cat, the dog", "a cat"], maskable=["cat", "dog"])
    assert tok.words == ["the", "cat", ",", "dog", "a"]
    assert Tokenizer.from_texts(["the cat the dog", "a cat"], min_count=2).words == ["the", "cat"]
    d = tok.to_dict()
    assert d == {"words": ["the", "cat", ",", "dog", "a"], "maskable": ["cat", "dog"]}
    assert all(isinstance(w, str) for v in d.values() for w in v)
    again = Tokenizer.from_dict(d)
    assert again.ids == tok.ids and again.maskable == tok.maskable


def test_to_dict_survives_a_weights_only_checkpoint(tokenizer, tmp_path):
    torch.save({"tokenizer": tokenizer.to_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert Tokenizer.from_dict(loaded["tokenizer"]).to_dict() == tokenizer.to_dict()


@pytest.mark.parametrize("make,exc,match", [
    (lambda: Tokenizer(["a", "b", "a"]), ValueError, "duplicates"),
    (lambda: Tokenizer(["a", "[MASK]"]), ValueError, "special"),
    (lambda: Tokenizer(["left of"]), ValueError, "words"),
    (lambda: Tokenizer([]), ValueError, "words"),
    (lambda: Tokenizer(["a", "b"], maskable=["c"]), ValueError, "maskable"),
    (lambda: Tokenizer(["a"]).encode(["a"], max_len=2), ValueError, "max_len"),
    (lambda: Tokenizer(["a"]).encode([], max_len=5), ValueError, "texts"),
    (lambda: Tokenizer(["a"]).encode("a", max_len=5), TypeError, "texts"),
    (lambda: Tokenizer.from_texts(["a"], min_count=0), ValueError, "min_count"),
])
def test_tokenizer_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_masking_bad_arguments(tokenizer):
    ids, mask = tokenizer.encode(["a red circle"], max_len=8)
    g = torch.Generator().manual_seed(0)
    for prob in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="prob"):
            tokenizer.mask_tokens(ids, mask, g, prob=prob)
    with pytest.raises(ValueError, match="mask"):
        tokenizer.mask_tokens(ids, mask[:, :2], g)
    with pytest.raises(TypeError, match="ids"):
        tokenizer.mask_one(ids.int(), mask, g)


def test_mask_tokens_follows_berts_statistics(tokenizer):
    data = Shapes("train", 3000, seed=2)
    ids, mask = tokenizer.encode(data.captions * 4, max_len=32)  # positions are masked independently
    original = ids.clone()
    maskable = torch.isin(ids, torch.tensor([tokenizer.ids[w] for w in Shapes.attribute_words()])) & mask
    assert maskable.sum() >= 50000
    inputs, labels = tokenizer.mask_tokens(ids, mask, torch.Generator().manual_seed(0))
    assert torch.equal(ids, original), "ids must not be modified"
    selected = labels != IGNORE_INDEX
    assert not (selected & ~maskable).any(), "only maskable positions are selected"
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    n = selected.sum().item()
    assert abs(n / maskable.sum().item() - 0.15) < 0.01
    masked = (inputs[selected] == tokenizer.mask_id).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    # A random replacement draws the original word with probability 1 / (number of words).
    random_hit = 1 / (tokenizer.vocab_size - 5)
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 * random_hit)) < 0.02
    assert abs(1 - masked - kept - 0.1 * (1 - random_hit)) < 0.02
    assert (inputs[selected] >= 5).sum() + (inputs[selected] == tokenizer.mask_id).sum() == n, \
        "random replacements are never special tokens"
    again = tokenizer.mask_tokens(ids, mask, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    other = tokenizer.mask_tokens(ids, mask, torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], labels)


def test_positions_outside_the_mask_are_never_selected(tokenizer):
    ids, mask = tokenizer.encode(["a small red circle above a large blue square"] * 50, max_len=16)
    mask[:, :5] = False  # hides "small red circle"
    g = torch.Generator().manual_seed(0)
    for inputs, labels in (tokenizer.mask_tokens(ids, mask, g, prob=1.0), tokenizer.mask_one(ids, mask, g)):
        assert (labels[:, :5] == IGNORE_INDEX).all() and torch.equal(inputs[:, :5], ids[:, :5])
        assert (labels[:, 5:] != IGNORE_INDEX).any()


def test_random_replacements_are_uniform_over_words():
    tok = Tokenizer(["w"] + [f"x{i}" for i in range(9)], maskable=["w"])
    ids, mask = tok.encode(["w " * 30] * 400, max_len=40)
    inputs, labels = tok.mask_tokens(ids, mask, torch.Generator().manual_seed(0), prob=1.0)
    assert (labels[mask & (ids != tok.cls_id) & (ids != tok.sep_id)] == tok.ids["w"]).all()
    replaced = inputs[(inputs != tok.mask_id) & (inputs != tok.ids["w"]) & mask & (ids == tok.ids["w"])]
    counts = torch.bincount(replaced, minlength=tok.vocab_size)[5:]
    assert (counts[1:] > 0.7 * counts[1:].float().mean()).all()  # counts[0]: "w", excluded from `replaced`
    assert int(replaced.min()) >= 5


def test_mask_one_masks_exactly_one_maskable_token_per_row(tokenizer):
    ids, mask = tokenizer.encode(["a red circle", "a small blue square above a large red circle", "a above of"],
                                 max_len=16)
    ids = ids.repeat(200, 1)
    mask = mask.repeat(200, 1)
    inputs, labels = tokenizer.mask_one(ids, mask, torch.Generator().manual_seed(0))
    selected = labels != IGNORE_INDEX
    assert selected.sum(dim=1).tolist() == [1, 1, 0] * 200
    assert (inputs[selected] == tokenizer.mask_id).all() and torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    words = {tokenizer.ids[w] for w in Shapes.attribute_words()}
    assert set(ids[selected].tolist()) <= words
    # The pick is spread over the row's maskable positions (here 6 in the second sentence).
    positions = selected[1::3].float().argmax(dim=1)
    assert len(set(positions.tolist())) == 6


# ---- CaptionFiles, EmbeddingPairs ----

@pytest.fixture
def image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "img").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)  # a red band on the left, cropped away by the centre crop
    wide[:, 10:30] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "img" / "wide.png")
    Image.fromarray(np.full((30, 30), 128, np.uint8), mode="L").save(tmp_path / "img" / "grey.png")
    return tmp_path


def test_caption_files_jsonl(image_folder):
    path = image_folder / "data.jsonl"
    path.write_text(json.dumps({"image": "img/wide.png", "caption": "a blue band"}) + "\n\n"
                    + json.dumps({"image": "img/grey.png", "caption": "grey"}) + "\n")
    data = CaptionFiles(path, image_size=10)
    assert len(data) == 2 and data.captions == ["a blue band", "grey"]
    image, caption = data[0]
    assert image.shape == (3, 10, 10) and image.dtype == torch.float32 and caption == "a blue band"
    # 40×20 → 20×10 → centre 10×10: columns 5..14 of the resized image, from the blue part.
    assert image[2, :, 1:-1].min() > 0.9 and image[0, :, 1:-1].max() < 0.1
    grey, _ = data[1]
    assert grey.shape == (3, 10, 10) and torch.allclose(grey, torch.full_like(grey, 128 / 255), atol=0.01)


def test_caption_files_csv_keys_and_root(image_folder, tmp_path_factory):
    listing = tmp_path_factory.mktemp("listing") / "pairs.csv"
    listing.write_text('file,text\nwide.png,"a band, blue"\ngrey.png,grey\n')
    data = CaptionFiles(listing, image_size=8, root=image_folder / "img", image_key="file", caption_key="text")
    assert data.captions == ["a band, blue", "grey"] and data[1][0].shape == (3, 8, 8)


@pytest.mark.parametrize("name,text,match", [
    ("a.jsonl", '{"image": "x.png", "caption": "c"}\n{"image": "y.png"}\n', r"line 2.*'caption'"),
    ("a.jsonl", '{"image": "x.png", "caption": "c"}\n[1, 2]\n', "line 2"),
    ("a.jsonl", '{"image": "x.png", "caption": "c"}\n{"image": "x.png", "caption": 3}\n', r"line 2.*'caption'"),
    ("a.jsonl", "\n\n", "no records"),
    ("a.csv", "image,caption\nx.png,c\ny.png\n", r"line 3.*'caption'"),
    ("a.csv", "image,text\nx.png,c\n", r"line 2.*'caption'"),
    ("a.txt", "x.png c\n", "unknown file type"),
])
def test_caption_files_bad_listings(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        CaptionFiles(tmp_path / name)


def test_caption_files_missing_files(image_folder):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        CaptionFiles(image_folder / "nothing.jsonl")
    path = image_folder / "data.jsonl"
    path.write_text('{"image": "img/wide.png", "caption": "a"}\n{"image": "img/gone.png", "caption": "b"}\n')
    data = CaptionFiles(path, image_size=4)  # images are not opened at construction
    data[0]
    with pytest.raises(FileNotFoundError, match=r"gone\.png.*record 1.*line 2"):
        data[1]


def test_embedding_pairs(tmp_path):
    np.save(tmp_path / "img.npy", np.arange(12, dtype=np.float64).reshape(4, 3))
    np.save(tmp_path / "txt.npy", np.ones((4, 5), np.float16))
    data = EmbeddingPairs(tmp_path / "img.npy", tmp_path / "txt.npy")
    assert len(data) == 4 and data.image_dim == 3 and data.text_dim == 5
    image, text = data[2]
    assert image.dtype == text.dtype == torch.float32 and image.tolist() == [6, 7, 8] and text.shape == (5,)
    np.save(tmp_path / "short.npy", np.ones((3, 5), np.float32))
    np.save(tmp_path / "flat.npy", np.ones(4, np.float32))
    np.save(tmp_path / "int.npy", np.ones((4, 5), np.int64))
    for image_file, text_file, match in [("img.npy", "short.npy", r"\(4, 3\).*\(3, 5\)"),
                                         ("flat.npy", "txt.npy", "flat.npy.*2-D"),
                                         ("img.npy", "int.npy", "int.npy.*floating")]:
        with pytest.raises(ValueError, match=match):
            EmbeddingPairs(tmp_path / image_file, tmp_path / text_file)
    with pytest.raises(FileNotFoundError):
        EmbeddingPairs(tmp_path / "img.npy", tmp_path / "missing.npy")
