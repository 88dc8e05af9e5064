"""The toy interleaved world that every model in nanomix trains on.

Nothing downloads. A tiny world of *scenes* -- a 16x16 RGB image of one shape with four attributes
(shape, colour, size, position) and a caption from a small grammar that states them -- is generated from a
seed, and turned into documents that interleave modalities in both orders:

    caption -> image   ("a large red circle in the top left ." <boi> img img ... <eoi>)   generation
    image -> caption   (<boi> img img ... <eoi> "the circle is red and large , top left .")  captioning

and, as in Chameleon's data mix, text-only documents: text in a made-up language (a fixed random second-order
Markov chain over the same words, see `language()`), with statistics of its own that no image shares.

The settings (what `make_data(setting)` returns):
    chameleon    text tokens + discrete image tokens (a fixed toy image tokenizer: a k-means codebook of 4x4 patches);
                 30% of the document slots are text-only documents
    speech       the same + a third modality: discrete "speech" codes tied to the caption's words
                 (each word has a fixed pronunciation of 2-4 codes; each code lasts 1 or 2 steps)
    transfusion  text tokens + images as 16 continuous 4x4x3 patches in [-1, 1] (no image token ids); pairs only,
                 the caption first 80% of the time (as the Transfusion paper orders its pairs)
    text         the text-only stream of the transfusion setting (captions only), e.g. to pretrain LMFusion's text model
    bytes        a byte stream of captions, unpredictable stretches (random characters) and predictable ones
                 (a phrase repeated, counting); `data_file=PATH` reads any local text file instead
    realtext     bytes of real English shipped with the repo (three public-domain works, docs/realtext/): see RealText

Why it looks like this (what the papers need to show up at toy scale): image tokens and text tokens have
disjoint vocabularies and very different statistics (what modality-specific weights exploit); captions and
images depend on each other (cross-modal learning can be measured, and generations scored); images carry
jitter and one of four background colours but no pixel noise (noise no model can predict only lifts the loss
floor, for every model alike); bytes mix stretches of very different predictability (what dynamic patching has
to find). Why text-only documents (MoT): when every text token is a caption, text and image carry the same
information, and a dense model's shared weights are the better deal -- the circuits that read one modality from
the other are learned once. Per-modality weights pay off when each modality also has much of its own to model, as
in real data; the text-only share gives the text side that. (The measurements behind these choices: RESULTS.md.)

What tells the shapes apart (SMALL_ART and LARGE_ART draw them pixel by pixel, so it can be read off): a small shape
fits a 6x6 box, a large one an 8x8 box, centred on its quadrant's centre (a patch corner: each of the 4 patches
around it holds a quarter of the shape, up to the jitter). At each size the circle (its box without the corners),
the square (small: 4x4, so that it is not the circle; large: the whole box), the triangle (widening downwards) and
the cross (two bars 2 pixels wide) differ in at least 12 pixels, and no small shape, jittered or not, is a large
one. So every scene has an image of its own, a token sequence of its own, and classify_image reads its attributes
back (tests/test_data.py checks all 4 x 6 x 2 x 4 scenes).

Token ids (shared by all settings except bytes); modality m owns ids [modality_offsets[m], modality_offsets[m+1])
(continuous images own none; registered modalities come after speech/image, their markers top the text range):
    text    0 <pad>  1 <bos>  2 <boi>  3 <eoi>  4 <bosp>  5 <eosp>  6 "."  then words      -> ids [0, 64)
    image   codebook entries                                                              -> ids [64, 320)
    speech  speech codes                                                                  -> ids [320, 448)
Markers are text (modality 0).

Determinism: row r of split s is generated from numpy's SeedSequence([seed, s, r]) alone, and the batch for
micro-step `index` on `rank` of `world_size` holds rows index*world_size*B + rank*B + [0, B). So a run is the
same on every machine, each DDP rank gets its own disjoint shard, and the union of the ranks' rows at a step is
exactly the single-process batch (what makes the DDP test and exact resume simple). Every batch carries
`row_id` (int64, (B,)): SPLITS[split] * 2**40 + the global row number, the same whatever the rank / micro-batch
split, for models that draw per-row random numbers (Transfusion's diffusion time and noise). A training loop may
draw its rows before its first step -- ds.prepare(split, B, first, last, rank, world_size), get_batch's arguments --
and get_batch then hands them out, the same bits, for next to nothing (the world is drawn in Python, row by row).

Modalities are named once, here (MODALITIES); each setting numbers the ones it uses (ds.modality_names[m] names
id m: text 0, image 1, speech 2 where present); `ds.model_fields()` gives models n_modalities, modality_names and
modality_offsets, so no model hard-codes them. `register_modality(name, n_codes, encode)` adds a modality to
the chameleon, speech and transfusion settings (the exercise "a fourth modality"; see its docstring).

Run:  python data.py   (a training row of every setting, decoded; the figure: python plots.py toy_world)
Read next: mot.py (the first paper: a weight set per modality)
"""
import functools
import gzip
import hashlib
import os

import numpy as np
import torch

SETTINGS = ("chameleon", "speech", "transfusion", "text", "bytes", "realtext")
MODALITIES = ("text", "image", "speech")   # every modality's name (+ any register_modality adds); a setting
                                           # numbers its own in order: ds.modality_names[id] (batch["modality"])
TEXT, IMAGE, SPEECH = 0, 1, 2
assert MODALITIES[TEXT] == "text" and MODALITIES[IMAGE] == "image" and MODALITIES[SPEECH] == "speech"
SPLITS = {"train": 0, "val": 1}
ROW_ID_SPLIT = 2 ** 40                      # batch["row_id"] = SPLITS[split] * ROW_ID_SPLIT + global row number
# P(the next document slot is a text-only document) per setting; see the module docstring for why
TEXT_DOCS = {"chameleon": 0.3, "speech": 0.3, "transfusion": 0.0, "text": 0.0}

# --- the world: attributes, words, grammar -------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
POSITIONS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
ATTRS = ("shape", "colour", "size", "position")
N_VALUES = (len(SHAPES), len(COLOURS), len(SIZES), len(POSITIONS))
RGB = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
       "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.1, 0.85), "cyan": (0.1, 0.9, 0.9)}

PAD, BOS, BOI, EOI, BOSP, EOSP, SEP = range(7)
SPECIALS = ("<pad>", "<bos>", "<boi>", "<eoi>", "<bosp>", "<eosp>", ".")
WORDS = SPECIALS + ("a", "the", "there", "is", "in", "at", "and", "with", ",", "shape", "colour", "it", "one",
                    "small", "large", "top", "bottom", "left", "right") + SHAPES + COLOURS
WORD_ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATES = (  # {s}ize {c}olour {h}shape {v}ertical {p}osition-horizontal
    "a {s} {c} {h} in the {v} {p}",
    "there is a {c} {h} at the {v} {p} and it is {s}",
    "the {h} is {c} and {s} , {v} {p}",
    "{v} {p} , one {s} {c} {h}",
    "a {h} with colour {c} , {s} , at the {v} {p}",
)

IMG, PATCH, CH = 16, 4, 3                      # image side, patch side, channels
N_PATCHES, PATCH_DIM = (IMG // PATCH) ** 2, PATCH * PATCH * CH   # 16 patches of 48 values
N_TEXT, N_CODES, N_SPEECH = 64, 256, 128
OFFSETS = (0, N_TEXT, N_TEXT + N_CODES)         # first id of text, image, speech
assert len(WORDS) <= N_TEXT


BACKGROUNDS = ((0.05, 0.05, 0.05), (0.05, 0.05, 0.3), (0.05, 0.28, 0.08), (0.3, 0.15, 0.05))  # dark: never foreground

# The shapes, drawn pixel by pixel ("#" = object), centred on their quadrant's centre (see the module docstring).
#              circle      square      triangle    cross
SMALL_ART = """ .####.      ......      ..##..      ..##..
                ######      .####.      ..##..      ..##..
                ######      .####.      .####.      ######
                ######      .####.      .####.      ######
                ######      .####.      ######      ..##..
                .####.      ......      ######      ..##.. """
LARGE_ART = """ ..####..    ########    ...##...    ...##...
                .######.    ########    ...##...    ...##...
                ########    ########    ..####..    ...##...
                ########    ########    ..####..    ########
                ########    ########    .######.    ########
                ########    ########    .######.    ...##...
                .######.    ########    ########    ...##...
                ..####..    ########    ########    ...##... """


def _pixel_art(art):
    """Rows of 4 shapes side by side -> (4, n, n) bool, one box per shape in SHAPES' order."""
    rows = [line.split() for line in art.splitlines()]
    return np.array([[[c == "#" for c in row[shape]] for row in rows] for shape in range(len(SHAPES))])


SHAPE_PIXELS = (_pixel_art(SMALL_ART), _pixel_art(LARGE_ART))   # [size][shape] -> (n, n) bool: 6x6 small, 8x8 large


def render(scene, rng=None, noise=0.0, jitter=(0, 0)):
    """scene = (shape, colour, size, position) indices -> image (3, 16, 16) float32 in [0, 1].
    With rng: the object jitters by up to 1 pixel and the background is one of 4 dark colours; `noise` adds
    Gaussian pixel noise (off in the world: noise the model cannot predict only raises the loss floor)."""
    if rng is None:
        return _clean_image((*scene, *(int(j) for j in jitter), -1)).copy()
    key = draw_image(scene, rng)
    if noise > 0:
        img = _image64(key) + rng.normal(0.0, noise, size=(CH, IMG, IMG))
        return np.clip(img, 0.0, 1.0).astype(np.float32)
    return _clean_image(key).copy()


def draw_image(scene, rng):
    """The random draws of one rendered image -- jitter (jy, jx), then the background -- in render()'s order:
    -> key (shape, colour, size, position, jy, jx, background); bg = -1 is the plain grey of render(rng=None).
    The image is a pure function of its key, so the world caches images, tokens and patches by key (speed)."""
    # two scalar draws give the same numbers as rng.integers(-1, 2, size=2), at a third of its cost
    jy, jx = int(rng.integers(-1, 2)), int(rng.integers(-1, 2))
    return (*scene, jy, jx, int(rng.integers(len(BACKGROUNDS))))


@functools.lru_cache(maxsize=None)
def _object_mask(shape, size, pos, jy, jx):
    """(16, 16) bool: where the object covers the image -- its pixel art, centred on its quadrant's centre, moved
    by the jitter (jy, jx); a large object jittered towards an edge loses the row or column that falls off."""
    box = SHAPE_PIXELS[size][shape]
    n = len(box)
    canvas = np.zeros((IMG + 2, IMG + 2), bool)          # a 1-pixel margin catches what the jitter pushes off
    top = 1 + 8 * (pos // 2) + 4 - n // 2 + jy
    left = 1 + 8 * (pos % 2) + 4 - n // 2 + jx
    canvas[top:top + n, left:left + n] = box
    mask = canvas[1:-1, 1:-1]
    mask.flags.writeable = False
    return mask


def _image64(key):
    shape, colour, size, pos, jy, jx, bg = key
    mask = _object_mask(shape, size, pos, jy, jx)
    bg = np.array(BACKGROUNDS[bg]) if bg >= 0 else np.full(3, 0.15)
    return np.where(mask[None], np.array(RGB[COLOURS[colour]])[:, None, None], bg[:, None, None])


@functools.lru_cache(maxsize=None)
def _clean_image(key):
    img = np.clip(_image64(key), 0.0, 1.0).astype(np.float32)
    img.flags.writeable = False      # shared by every row that draws this key: never modify it in place
    return img


@functools.lru_cache(maxsize=None)
def _image_tokens(key):
    return tuple(int(t) for t in tokenize_image(_clean_image(key)))


@functools.lru_cache(maxsize=None)
def _image_span(key):
    return (BOI, *_image_tokens(key), EOI)


@functools.lru_cache(maxsize=None)
def _image_patches(key):
    p = to_patches(_clean_image(key) * 2 - 1)
    p.flags.writeable = False
    return p


def to_patches(img):
    """(..., 3, 16, 16) -> (..., 16, 48): raster order of 4x4 patches, each flattened (channel last)."""
    lead = img.shape[:-3]
    x = img.reshape(*lead, CH, IMG // PATCH, PATCH, IMG // PATCH, PATCH)
    x = np.moveaxis(x, -5, -1)                                      # (..., 4, 4, 4, 4, 3)
    x = np.swapaxes(x, -4, -3)                                      # (..., py, px, 4, 4, 3)
    return x.reshape(*lead, N_PATCHES, PATCH_DIM)


def from_patches(p):
    """(..., 16, 48) -> (..., 3, 16, 16): the inverse of to_patches."""
    lead = p.shape[:-2]
    x = p.reshape(*lead, IMG // PATCH, IMG // PATCH, PATCH, PATCH, CH)
    x = np.swapaxes(x, -4, -3)                                      # (..., py, 4, px, 4, 3)
    x = np.moveaxis(x, -1, -5)
    return x.reshape(*lead, CH, IMG, IMG)


@functools.lru_cache(maxsize=None)
def codebook():
    """The fixed toy image tokenizer: k-means (256 entries) on 4x4x3 patches of 3000 seeded scenes.
    Fitted once per process, identical everywhere (fixed seed, float64)."""
    rng = np.random.default_rng(12345)
    scenes = [tuple(int(rng.integers(n)) for n in N_VALUES) for _ in range(3000)]
    x = to_patches(np.stack([render(s, rng) for s in scenes])).reshape(-1, PATCH_DIM).astype(np.float64)
    c = x[rng.choice(len(x), N_CODES, replace=False)]
    for _ in range(12):  # Lloyd iterations
        assign = _nearest(x, c)
        for k in range(N_CODES):
            members = x[assign == k]
            c[k] = members.mean(0) if len(members) else x[rng.integers(len(x))]
    return c.astype(np.float32)


def _nearest(x, c, c_t=None, c_sq=None):
    """Index of the nearest row of c for each row of x (squared distance). c_t = c.T, c_sq = (c ** 2).sum(1)[None]
    may be passed precomputed (the same numbers, computed once)."""
    c_t = c.T if c_t is None else c_t
    c_sq = (c ** 2).sum(1)[None] if c_sq is None else c_sq
    return np.argmin((x ** 2).sum(1, keepdims=True) - 2 * x @ c_t + c_sq, axis=1)


@functools.lru_cache(maxsize=None)
def _codebook_terms():
    c = codebook()
    return c.T.astype(np.float64), (c ** 2).sum(1)[None]   # exact upcast: what x (float64) @ c.T computes in


def tokenize_image(img):
    """(3, 16, 16) or (N, 3, 16, 16) -> image token ids (16,) / (N, 16), in the image id range."""
    p = to_patches(img)
    c_t, c_sq = _codebook_terms()
    return _nearest(p.reshape(-1, PATCH_DIM).astype(np.float64), None, c_t, c_sq).reshape(p.shape[:-1]) + OFFSETS[IMAGE]


def detokenize_image(ids):
    """image token ids (16,) -> (3, 16, 16); ids outside the image range decode to grey."""
    ids = np.asarray(ids)
    c = np.concatenate([codebook(), np.full((1, PATCH_DIM), 0.5, np.float32)])
    k = np.where((ids >= OFFSETS[IMAGE]) & (ids < OFFSETS[IMAGE] + N_CODES), ids - OFFSETS[IMAGE], N_CODES)
    return from_patches(c[k])


@functools.lru_cache(maxsize=None)
def pronunciations():
    """Each word's fixed speech pronunciation: 2-4 codes out of 128 (seeded, the same for every run)."""
    rng = np.random.default_rng(777)
    return {w: rng.integers(0, N_SPEECH, size=int(rng.integers(2, 5))) for w in WORDS[len(SPECIALS):]}


@functools.lru_cache(maxsize=None)
def language():
    """The text-only documents' made-up language: a fixed random second-order Markov chain over the caption words.
    Every word pair (w1, w2) allows 3 next words, with probabilities 0.7 / 0.2 / 0.1 (entropy floor 0.80 nats).
    -> (n, n, 3) word ids, n = number of non-special words (seeded, the same for every run)."""
    rng = np.random.default_rng(4242)
    n = len(WORDS) - len(SPECIALS)
    return rng.integers(0, n, size=(n, n, 3)) + len(SPECIALS)


_NEXT_CDF = np.cumsum(np.array((0.7, 0.2, 0.1)))   # a word's 3 successors' probabilities, as a CDF (as
_NEXT_CDF /= _NEXT_CDF[-1]                          # rng.choice(3, p=...) builds it)


@functools.lru_cache(maxsize=None)
def _successors():
    return language().tolist()


def story(rng, n_words):
    """A text-only document of n_words words of language(), ended by ".".
    (rng.choice(3, p=(0.7, 0.2, 0.1)) per word, drawn at once: one uniform per word, read through the CDF.)"""
    nxt, k0 = _successors(), len(SPECIALS)
    a, b = int(rng.integers(k0, len(WORDS))), int(rng.integers(k0, len(WORDS)))   # = integers(.., size=2), faster
    out = [a, b]
    for c in np.searchsorted(_NEXT_CDF, rng.random(n_words - 2), side="right").tolist():
        a, b = b, nxt[a - k0][b - k0][c]
        out.append(b)
    return out + [SEP]


def caption_words(scene, rng):
    return list(_caption(tuple(scene), int(rng.integers(len(TEMPLATES))))[0])


@functools.lru_cache(maxsize=None)
def _caption(scene, template):
    """-> (words, ids + ["."]) of the scene's caption in one template."""
    shape, colour, size, pos = scene
    words = tuple(TEMPLATES[template].format(s=SIZES[size], c=COLOURS[colour], h=SHAPES[shape], v=POSITIONS[pos][0],
                                             p=POSITIONS[pos][1]).split())
    return words, tuple(WORD_ID[w] for w in words) + (SEP,)


def speak(words, rng):
    """Speech codes for a list of words: each code of the word's pronunciation held 1 or 2 steps (no random codes:
    unpredictable noise only raises every model's loss floor and hides the differences; RESULTS.md)."""
    out, say = [], _pronounced()
    for w in words:
        for code in say[w]:
            out += [code] * int(rng.integers(1, 3))
    return out


@functools.lru_cache(maxsize=None)
def _pronounced():
    return {w: [int(c) + OFFSETS[SPEECH] for c in codes] for w, codes in pronunciations().items()}


# --- scoring: read a caption or an image back into attributes ------------------------------------------------
CAPTION_TOKENS = 14   # tokens the image -> caption eval generates for a caption and its "."


def _after_segment(ids, skip):
    """ids without a leading non-text segment (skip: {begin marker: end marker}, e.g. <bosp> ... <eosp>): what a model
    wrote after it. Unchanged when ids start otherwise; empty when the segment never ends."""
    ids = [int(i) for i in ids]
    if ids and ids[0] in skip:
        end = skip[ids[0]]
        return ids[ids.index(end) + 1:] if end in ids else []
    return ids


def parse_caption(ids):
    """text ids -> attribute tuple (None where the caption does not say); stops at the first "." or marker."""
    got = [None, None, None, None]
    v = h = None
    for i in ids:
        i = int(i)
        if i in (SEP, BOI, EOI, BOS, BOSP) or not 0 <= i < len(WORDS):
            break
        w = WORDS[i]
        for a, values in enumerate((SHAPES, COLOURS, SIZES)):
            if w in values and got[a] is None:
                got[a] = values.index(w)
        v = w if w in ("top", "bottom") and v is None else v
        h = w if w in ("left", "right") and h is None else h
    if v and h:
        got[3] = POSITIONS.index((v, h))
    return tuple(got)


@functools.lru_cache(maxsize=None)
def _masks():
    """Binary object masks for every (shape, size, position) and 1-pixel jitter: 4 * 2 * 4 * 9 templates."""
    keys, masks = [], []
    for h in range(4):
        for s in range(2):
            for p in range(4):
                for jy in (-1, 0, 1):
                    for jx in (-1, 0, 1):
                        img = render((h, 0, s, p), jitter=(jy, jx))
                        keys.append((h, s, p))
                        masks.append(img[0] > 0.5)       # red channel: the object is red, the background 0.15
    return keys, np.stack(masks).reshape(len(keys), -1).astype(np.float32)


def classify_image(img):
    """(3, 16, 16) in [0, 1] -> attributes: the foreground (bright pixels) is matched to the object mask templates
    by IoU (shape, size, position), its mean colour to the nearest palette colour. An empty image -> all None."""
    img = np.asarray(img, np.float32)
    fg = (img.max(0) > 0.5).reshape(-1).astype(np.float32)
    if fg.sum() == 0:
        return (None, None, None, None)
    keys, m = _masks()
    iou = (m @ fg) / ((m + fg[None]) > 0).sum(1)
    h, s, p = keys[int(np.argmax(iou))]
    mean = img.reshape(3, -1)[:, fg > 0].mean(1)
    c = int(np.argmin([((mean - np.array(RGB[name])) ** 2).sum() for name in COLOURS]))
    return (h, c, s, p)


def describe_scene(attrs):
    """Attribute tuple -> words, e.g. "large red circle, top left" ("?" where an attribute is None)."""
    h, c, s, p = attrs
    name = lambda values, i: "?" if i is None else values[i]
    return f"{name(SIZES, s)} {name(COLOURS, c)} {name(SHAPES, h)}, " + ("?" if p is None else " ".join(POSITIONS[p]))


def image_lines(scenes, images):
    """ds.scenes(n) and n images (3, 16, 16) in [0, 1] -> lines: the captions, the images, what the scorer reads."""
    pal = np.array([RGB[c] for c in COLOURS])
    lines = [f"  {k + 1}. {' '.join(WORDS[i] for i in e['caption'])}" for k, e in enumerate(scenes)]
    lines.append(("     " + "".join(f"{k + 1}.".ljust(22) for k in range(len(scenes)))).rstrip())
    art = []   # per image, 16 rows as the scorer sees them: "." background, else the pixel's nearest colour's initial
    for img in map(np.asarray, images):
        near = ((img.transpose(1, 2, 0)[:, :, None] - pal) ** 2).sum(-1).argmin(-1)
        art.append(["".join(COLOURS[k][0] if f else "." for k, f in zip(*r)) for r in zip(near, img.max(0) > 0.5)])
    lines += ["     " + "      ".join(row) for row in zip(*art)]
    for k, (e, img) in enumerate(zip(scenes, images)):
        r = classify_image(img)
        lines.append(f"  {k + 1}. the scorer reads: {describe_scene(r)} "
                     f"({sum(a == b for a, b in zip(r, e['scene']))} of 4 attributes as captioned)")
    return lines


def attribute_accuracy(pred, scenes):
    """Mean over examples and the 4 attributes of pred == truth (None counts as wrong)."""
    return float(np.mean([[p == t for p, t in zip(pr, sc)] for pr, sc in zip(pred, scenes)]))


def shuffled_chance(pred, scenes, seed=0):
    """Chance level: the same predictions scored against the attributes of other (shuffled) examples."""
    perm = np.random.default_rng(seed).permutation(len(scenes))
    perm = np.where(perm == np.arange(len(scenes)), (perm + 1) % len(scenes), perm)
    return attribute_accuracy(pred, [scenes[j] for j in perm])


# --- adding a modality (the exercise "a fourth modality") -------------------------------------------------------
EXTRA_MODALITIES = []       # registered with register_modality, in order
MARKERS = {}                # marker id -> name, for the registered modalities' span markers (text ids)


def register_modality(name, n_codes, encode):
    """Add a modality to the toy world. From now on, every scene pair of the chameleon, speech and transfusion
    settings also carries a span  <bos_NAME> codes <eos_NAME>,  codes = encode(scene, words, rng): ints in
    [0, n_codes) that say something about the scene (as speak() does for speech; scene = (shape, colour, size,
    position) indices, words = the caption's words, rng = the row's generator). The span is ordered among the pair's
    segments like speech (transfusion: after the caption/image pair). In each setting the modality takes the next
    modality id, the next n_codes token ids, and two marker ids (text) from the top of the text range; models get
    it all from ds.model_fields() -- nothing else in the code changes. Datasets made before keep their modalities.
    Example: data.register_modality("gesture", 12, lambda scene, words, rng: [scene[0], 4 + scene[2], 6 + scene[3]])
    """
    if not isinstance(name, str) or not name.isidentifier() or name in MODALITIES:
        raise ValueError(f"modality name {name!r} must be a new identifier (taken: {', '.join(MODALITIES)})")
    if not isinstance(n_codes, int) or n_codes < 1 or not callable(encode):
        raise ValueError("register_modality(name, n_codes >= 1, encode(scene, words, rng) -> codes)")
    free = N_TEXT - len(WORDS) - 2 * len(EXTRA_MODALITIES)
    if free < 2:
        raise ValueError(f"no text ids left for the markers of {name!r}; raise N_TEXT")
    bos, eos = len(WORDS) + free - 2, len(WORDS) + free - 1
    EXTRA_MODALITIES.append(dict(name=name, n_codes=n_codes, encode=encode, bos=bos, eos=eos))
    MARKERS.update({bos: f"<bos_{name}>", eos: f"<eos_{name}>"})
    _set_modalities()


def unregister_modality(name):
    """Undo register_modality(name) (tests, notebooks)."""
    e = next((e for e in EXTRA_MODALITIES if e["name"] == name), None)
    if e is None:
        raise ValueError(f"no registered modality {name!r} (registered: {[e['name'] for e in EXTRA_MODALITIES]})")
    EXTRA_MODALITIES.remove(e)
    MARKERS.pop(e["bos"]), MARKERS.pop(e["eos"])
    _set_modalities()


def _set_modalities():
    global MODALITIES
    MODALITIES = ("text", "image", "speech") + tuple(e["name"] for e in EXTRA_MODALITIES)


def word(t):
    """A text id's word or marker."""
    return WORDS[t] if t < len(WORDS) else MARKERS.get(t, f"<{t}>")


# --- datasets ----------------------------------------------------------------------------------------------------
class RowRng:
    """numpy's default_rng(seed), with its most called draws made cheaper: one random() or one integers(low, high)
    goes straight to the bit generator (numpy's own C functions, via its ctypes interface) and repeats numpy's
    arithmetic -- a double from one 64-bit draw; a bounded integer by Lemire's method on 32-bit draws -- so the
    numbers are exactly numpy's (tests/test_data.py checks it), at about half the cost. All else goes to numpy."""

    def __init__(self, seed):
        self.gen = np.random.default_rng(seed)
        c = self.gen.bit_generator.ctypes
        self._state, self._u32, self._f64 = c.state, c.next_uint32, c.next_double

    def random(self, size=None):
        return self._f64(self._state) if size is None else self.gen.random(size)

    def integers(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        n = high - low
        if size is not None or not 1 <= n < 2 ** 32:
            return self.gen.integers(low, high, size)
        if n == 1:
            return low                                   # numpy draws nothing for a range of one
        m = self._u32(self._state) * n
        if m & 0xFFFFFFFF < n:                           # Lemire's rejection: only in the biased low strip
            threshold = (2 ** 32 - n) % n
            while m & 0xFFFFFFFF < threshold:
                m = self._u32(self._state) * n
        return low + (m >> 32)

    def permutation(self, n):
        """numpy's permutation(n) of a small int n, as a list: numpy's Fisher-Yates from the end, each index drawn
        from a 32-bit draw masked to its bit length, redrawn while above the range (numpy's random_interval)."""
        if not isinstance(n, int) or n >= 2 ** 31:
            return self.gen.permutation(n)
        out = list(range(n))
        for i in range(n - 1, 0, -1):
            mask = (1 << i.bit_length()) - 1
            j = self._u32(self._state) & mask
            while j > i:
                j = self._u32(self._state) & mask
            out[i], out[j] = out[j], out[i]
        return out

    def __getattr__(self, name):                         # choice, normal, ...: numpy itself
        return getattr(self.gen, name)


def global_rows(split, batch_size, index, rank=0, world_size=1):
    """The global row numbers of the batch for micro-step `index` on `rank` of `world_size` (module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    start = (index * world_size + rank) * batch_size
    return range(start, start + batch_size)


def row_ids(split, rows):
    """batch["row_id"]: int64 (B,), one id per row that depends only on (split, global row), never on how the rows
    are split over ranks or micro-batches: models that draw per-row randomness seed it from this (DDP = one process)."""
    return torch.tensor([SPLITS[split] * ROW_ID_SPLIT + r for r in rows], dtype=torch.int64)


_PATCH_SPAN = [BOI] + [PAD] * N_PATCHES + [EOI]      # a continuous image in the token stream (patches go alongside)


class Rows:
    """What both datasets share: a batch is its rows (`_row(split, r)`, a pure function of the seed, split and global
    row), made into tensors (`_batch`). prepare() draws a run's rows before its first step, so that the steps pay only
    for _batch: the toy world is drawn in Python, and a thread drawing it beside the model's threads slows every step
    on a 2-core machine."""

    def get_batch(self, split, batch_size, index, rank=0, world_size=1):
        """The batch for micro-step `index` on `rank` of `world_size` (module docstring), as a dict of tensors."""
        ids = global_rows(split, batch_size, index, rank, world_size)
        return self._batch(split, ids, [self.prepared.pop((split, r), None) or self._row(split, r) for r in ids])

    def prepare(self, split, batch_size, first, last, rank=0, world_size=1):
        """Draw the rows of the batches first .. last - 1 (get_batch's arguments) now, into memory (compact: token
        ids and image keys); get_batch then hands each out once, bit for bit the batch it would have drawn."""
        for n in range(first, last):
            for r in global_rows(split, batch_size, n, rank, world_size):
                self.prepared[split, r] = self._row(split, r)


class ToyWorld(Rows):
    """Text + image (+ speech, + registered modalities) documents.  See the module docstring for the layout."""

    def __init__(self, setting, seq_len, seed):
        self.setting, self.seq_len, self.seed, self.prepared = setting, seq_len, seed, {}   # (split, row) -> row
        self.text_docs = TEXT_DOCS[setting]
        # the setting's modalities, in id order, and the number of token ids each owns (in that order)
        own = {"chameleon": ("text", "image"), "speech": ("text", "image", "speech"), "transfusion": ("text", "image"),
               "text": ("text",)}[setting]
        self.extras = [] if setting == "text" else list(EXTRA_MODALITIES)   # registered modalities (a copy)
        self.modality_names = own + tuple(e["name"] for e in self.extras)
        self.n_modalities = len(self.modality_names)
        n_ids = [{"text": N_TEXT, "image": 0 if setting == "transfusion" else N_CODES, "speech": N_SPEECH}[m]
                 for m in own] + [e["n_codes"] for e in self.extras]          # continuous images own no ids
        self.modality_offsets = tuple(int(o) for o in np.cumsum([0] + n_ids[:-1]))
        self.vocab_size = int(sum(n_ids))
        if setting in ("chameleon", "speech"):
            codebook()  # fit the tokenizer now, not inside the first training step

    def model_fields(self):
        f = dict(vocab_size=self.vocab_size, n_modalities=self.n_modalities, modality_names=self.modality_names,
                 seq_len=self.seq_len, modality_offsets=self.modality_offsets,
                 bos_id=BOS, boi_id=BOI, eoi_id=EOI, sep_id=SEP, pad_id=PAD)
        if self.setting == "transfusion":
            f.update(patch_dim=PATCH_DIM, n_patches=N_PATCHES, image_size=IMG, patch_size=PATCH, channels=CH)
        return f

    # A pair is a list of segments; a segment is (modality, ids) or, for continuous images, ("patches", image key).
    def _pair(self, rng):
        scene = tuple(rng.integers(n) for n in N_VALUES)
        words, cap = _caption(scene, rng.integers(len(TEMPLATES)))   # = caption_words(scene, rng), cached
        segs = [("text", cap)]
        if self.setting != "text":
            key = draw_image(scene, rng)                   # = render(scene, rng); images cached by their draws
            if self.setting == "transfusion":
                segs.append(("patches", key))
            else:
                segs.append(("image", _image_span(key)))
            if self.setting == "speech":
                segs.append(("speech", [BOSP] + speak(words, rng) + [EOSP]))
            for e, off in zip(self.extras, self.modality_offsets[-len(self.extras):] if self.extras else ()):
                codes = [int(c) for c in e["encode"](scene, words, rng)]
                if not codes or min(codes) < 0 or max(codes) >= e["n_codes"]:
                    raise ValueError(f"modality {e['name']!r}: encode must return 1 or more codes in "
                                     f"[0, {e['n_codes']}); got {codes}")
                segs.append((e["name"], [e["bos"], *(c + off for c in codes), e["eos"]]))
            if self.setting == "transfusion":  # Transfusion Sec. 4.1: "ordering the caption first 80% of the time"
                order = ([0, 1] if rng.random() < 0.8 else [1, 0]) + list(range(2, len(segs)))
            else:                              # both orders: caption->image (generation), image->caption
                order = rng.permutation(len(segs))
            segs = [segs[i] for i in order]
        return segs

    def _row(self, split, r):
        """Row r of a split -> (tokens (T+1,) int32, images): for transfusion, images lists each continuous image as
        (first position, image key, image first?) -- its patches are looked up when the batch is made (_batch).
        Modalities are not stored: they follow from the tokens (see modality_of)."""
        rng = RowRng([self.seed, SPLITS[split], r])
        T = self.seq_len + 1
        tok, images = [BOS], []
        while len(tok) < T:
            if rng.random() < 0.12:  # a new document
                tok.append(BOS)
            if self.text_docs and rng.random() < self.text_docs:  # a text-only document (its own statistics; no image to read)
                tok += story(rng, int(rng.integers(16, 48)))
                continue
            segs = self._pair(rng)
            for kind, x in segs:
                if kind == "patches":
                    images.append((len(tok) + 1, x, segs[0][0] == "patches"))
                    tok += _PATCH_SPAN
                else:
                    tok += x
        return np.array(tok[:T], np.int32), tuple(im for im in images if im[0] < T)

    def modality_of(self, tokens, image_index=None):
        """Modality id of every token: the id range it falls in (markers are text); in the transfusion setting the
        image positions (image_index >= 0) are image (their token is a <pad> placeholder)."""
        m = torch.bucketize(tokens, torch.tensor(self.modality_offsets[1:], dtype=tokens.dtype), right=True)
        return m if image_index is None else torch.where(image_index >= 0, IMAGE, m)

    def _batch(self, split, ids, rows):
        tok = torch.from_numpy(np.stack([r[0] for r in rows])).long()
        idx = None
        if self.setting == "transfusion":        # each image's patches, image index and image-first flag per position
            T = tok.shape[1]
            patches, idx, first = np.zeros((len(rows), T, PATCH_DIM), np.float32), np.full((len(rows), T), -1), \
                np.zeros((len(rows), T), bool)
            for b, (_, images) in enumerate(rows):
                for i, (start, key, img_first) in enumerate(images):
                    n = min(N_PATCHES, T - start)
                    patches[b, start:start + n] = _image_patches(key)[:n]
                    idx[b, start:start + n] = i
                    first[b, start:start + n] = img_first
            idx = torch.from_numpy(idx)
        mod = self.modality_of(tok, idx)
        x, y = tok[:, :-1].contiguous(), tok[:, 1:].clone()
        b = dict(tokens=x, modality=mod[:, :-1].contiguous(), target_modality=mod[:, 1:].contiguous())
        if self.setting == "transfusion":
            # the LM loss covers text -> text/marker predictions only: no target at or into a patch
            y[(idx[:, :-1] >= 0) | (idx[:, 1:] >= 0)] = -1
            b.update(patches=torch.from_numpy(patches)[:, :-1].contiguous(), image_index=idx[:, :-1].contiguous(),
                     image_first=torch.from_numpy(first)[:, :-1].contiguous())
        b.update(targets=y, loss_mask=y != -1, row_id=row_ids(split, ids))
        return b

    def decode(self, batch, row=0):
        """A readable rendering of one row of a batch: text as words (a new line at each <bos>), each image span as
        the scene it shows (read back by classify_image), each speech span as its number of codes."""
        tok, mod = batch["tokens"][row].tolist(), batch["modality"][row].tolist()
        out, i = [], 0
        while i < len(tok):
            j = i
            while j < len(tok) and mod[j] == mod[i]:
                j += 1
            if mod[i] == TEXT:
                for t in tok[i:j]:
                    out.append(("\n" if t == BOS and out else "") + word(t))
            else:
                n, name = j - i, self.modality_names[mod[i]]
                if mod[i] == IMAGE and n == N_PATCHES:
                    img = (from_patches(batch["patches"][row, i:j].numpy()) + 1) / 2 if "patches" in batch \
                        else detokenize_image(tok[i:j])
                    out.append(f"[{name}: {describe_scene(classify_image(img))}]")
                else:
                    out.append(f"[{name}: {n} {'tokens' if mod[i] == IMAGE else 'codes'}]")
            i = j
        return " ".join(out).replace(" \n", "\n")

    # --- generation prompts and scoring ---------------------------------------------------------------------
    def scenes(self, n, seed=0):
        """n fixed evaluation scenes (independent of the training stream), with their captions and images."""
        rng = np.random.default_rng([self.seed, 2, seed])
        out = []
        for _ in range(n):
            s = tuple(int(rng.integers(k)) for k in N_VALUES)
            img = render(s, rng)
            out.append(dict(scene=s, caption=[WORD_ID[w] for w in caption_words(s, rng)] + [SEP], image=img))
        return out

    def caption_tokens(self, ex):
        """Tokens the image -> caption eval would generate for scenes ex: CAPTION_TOKENS, plus, in the speech
        setting, the longest speech segment of their captions (each code held at most 2 steps, two markers).
        eval_generation generates fewer when seq_len is shorter (the default 256 fits them all)."""
        if self.setting != "speech":
            return CAPTION_TOKENS
        say = _pronounced()
        return CAPTION_TOKENS + 2 + max(sum(2 * len(say[WORDS[i]]) for i in e["caption"] if WORDS[i] in say) for e in ex)

    def eval_generation(self, generate_fn, n=32, image_temperature=1.0):
        """Caption -> image (sampled at image_temperature: greedy decoding of an image picks the likeliest token at
        every patch -- background -- and erases the object) and image -> caption (greedy), scored against the
        scenes' attributes.  generate_fn(prompt (B, Tp) int64, max_new_tokens, temperature) -> (B, max_new_tokens)."""
        ex = self.scenes(n)
        truth = [e["scene"] for e in ex]
        # caption -> image: <bos> caption . <boi>  => 16 image tokens (prompts grouped by length)
        img_pred = [None] * n
        by_len = {}
        for i, e in enumerate(ex):
            by_len.setdefault(len(e["caption"]), []).append(i)
        for idx in by_len.values():
            p = torch.tensor([[BOS] + ex[i]["caption"] + [BOI] for i in idx])
            out = generate_fn(p, N_PATCHES, image_temperature).cpu().numpy()
            for i, o in zip(idx, out):
                img_pred[i] = classify_image(detokenize_image(o))
        # image -> caption: <bos> <boi> image <eoi>  => caption words up to "."; in the speech setting the segments
        # come in random order, so a model may first say the caption (<bosp> ... <eosp>): the caption is read after it
        p = torch.tensor([[BOS, BOI] + list(tokenize_image(e["image"])) + [EOI] for e in ex])
        skip = {BOSP: EOSP, **{e["bos"]: e["eos"] for e in self.extras}}
        n_new = max(CAPTION_TOKENS, min(self.caption_tokens(ex), self.seq_len - p.shape[1]))   # what fits the model
        cap_pred = [parse_caption(_after_segment(o, skip)) for o in generate_fn(p, n_new, 0.0).cpu().numpy()]
        return dict(gen_image_acc=attribute_accuracy(img_pred, truth), gen_image_chance=shuffled_chance(img_pred, truth),
                    caption_acc=attribute_accuracy(cap_pred, truth), caption_chance=shuffled_chance(cap_pred, truth))

    def score_image_pixels(self, images, scenes):
        """Transfusion: images (N, 3, 16, 16) in [-1, 1] (or patches (N, 16, 48)) vs scene attributes ->
        (accuracy, chance)."""
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = from_patches(images)
        pred = [classify_image((im + 1) / 2) for im in images]
        return attribute_accuracy(pred, scenes), shuffled_chance(pred, scenes)

    def score_captions(self, captions, scenes):
        """Generated caption ids (list of sequences) vs scene attributes -> (accuracy, chance)."""
        pred = [parse_caption(c) for c in captions]
        return attribute_accuracy(pred, scenes), shuffled_chance(pred, scenes)


class Bytes(Rows):
    """Byte stream: captions, random stretches (unpredictable) and repeated phrases / counting (predictable).
    Batches carry `byte_kind` (B, T): 0 caption text, 1 random, 2 predictable -- the ground truth of how
    predictable each byte is, for BLT's patch-length analysis.  With data_file: windows of that file."""

    RANDOM_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#$%&*+-=?@", np.uint8)

    def __init__(self, seq_len, seed, data_file=None):
        self.setting, self.seq_len, self.seed, self.prepared = "bytes", seq_len, seed, {}   # (split, row) -> row
        self.vocab_size, self.n_modalities, self.modality_names = 256, 1, MODALITIES[:1]   # bytes of text
        self.file = None
        if data_file is not None:
            if not os.path.isfile(data_file):
                raise ValueError(f"--data {data_file}: no such file; give the path of a local text file")
            raw = np.fromfile(data_file, dtype=np.uint8)
            if len(raw) < 2 * (seq_len + 1):
                raise ValueError(f"--data {data_file}: {len(raw)} bytes is too short for seq_len={seq_len}; "
                                 f"use a file of at least {2 * (seq_len + 1)} bytes or a smaller --seq_len")
            cut = max(seq_len + 1, int(len(raw) * 0.9))       # last 10% is the validation split
            self.file = {"train": raw[:cut], "val": raw[cut - seq_len - 1:] if len(raw) - cut < seq_len + 1 else raw[cut:]}

    def model_fields(self):
        return dict(vocab_size=256, n_modalities=1, modality_names=self.modality_names, seq_len=self.seq_len,
                    modality_offsets=(0,))

    def _row(self, split, r):
        rng = RowRng([self.seed, SPLITS[split], r])
        T = self.seq_len + 1
        if self.file is not None:
            data = self.file[split]
            start = int(rng.integers(0, len(data) - T + 1))
            return data[start:start + T], np.zeros(T, np.uint8)
        out, kind = [], []
        while len(out) < T:
            u = rng.random()
            if u < 0.4:
                s = " ".join(caption_words(tuple(int(rng.integers(n)) for n in N_VALUES), rng)) + ". "
                b, k = s.encode(), 0
            elif u < 0.65:
                b, k = self.RANDOM_CHARS[rng.integers(0, len(self.RANDOM_CHARS), int(rng.integers(16, 80)))].tobytes() + b" ", 1
            elif u < 0.9:
                phrase = " ".join(caption_words(tuple(int(rng.integers(n)) for n in N_VALUES), rng)[:4])
                b, k = ((phrase + " | ") * int(rng.integers(3, 7))).encode(), 2
            else:
                n0 = int(rng.integers(0, 900))
                b, k = (" ".join(str(n0 + i) for i in range(int(rng.integers(6, 20)))) + " ").encode(), 2
            out += list(b)
            kind += [k] * len(b)
        return np.array(out[:T], np.uint8), np.array(kind[:T], np.uint8)

    def decode(self, batch, row=0):
        """One row as text, each stretch tagged with its kind (from byte_kind; untagged for a data file)."""
        raw = bytes(batch["tokens"][row].tolist())
        if self.file is not None or "byte_kind" not in batch:
            return raw.decode("utf-8", "replace")
        kind, out, i = batch["byte_kind"][row].tolist(), [], 0
        while i < len(raw):
            j = i
            while j < len(raw) and kind[j] == kind[i]:
                j += 1
            out.append(f"[{('caption', 'random', 'predictable')[kind[i]]}] {raw[i:j].decode('utf-8', 'replace')}")
            i = j
        return "\n".join(out)

    def _batch(self, split, ids, rows):
        tok = torch.from_numpy(np.stack([r[0] for r in rows])).long()
        kind = torch.from_numpy(np.stack([r[1] for r in rows])).long()
        zeros = torch.zeros_like(tok[:, :-1])
        y = tok[:, 1:].clone()
        return dict(tokens=tok[:, :-1].contiguous(), targets=y, modality=zeros, target_modality=zeros.clone(),
                    loss_mask=torch.ones_like(y, dtype=torch.bool), byte_kind=kind[:, 1:].contiguous(),
                    row_id=row_ids(split, ids))


def make_data(setting, seq_len=256, seed=0, data_file=None):
    """The dataset for a setting.  Raises ValueError with the fix on bad input."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    if not isinstance(seq_len, int) or seq_len < 8:
        raise ValueError(f"seq_len={seq_len!r} is too small; use an integer >= 8")
    if data_file is not None and setting != "bytes":
        raise ValueError(f"--data reads a text file for the byte models; add --setting bytes (got --setting {setting})")
    if setting == "realtext":
        return RealText(seq_len, seed)
    return Bytes(seq_len, seed, data_file) if setting == "bytes" else ToyWorld(setting, seq_len, seed)


# --- realtext: real English, shipped with the repo -------------------------------------------------------------------
REALTEXT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "realtext", "realtext.txt.gz")
REALTEXT_SHA256 = "efc989dd1b88500eb2ad806ab7f8af64e7dd3a77cd31ef43d2d93405330a6844"   # of the text, decompressed
REALTEXT_VAL = 0.1   # the last tenth of each work (from the next line start on) is the validation split


@functools.lru_cache(maxsize=None)
def realtext(path):
    """The realtext setting's text, checked against REALTEXT_SHA256 -> {"train": uint8 array, "val": uint8 array}.
    Three public-domain works (Alice's Adventures in Wonderland, As You Like It, Paradise Lost; where they come from:
    docs/realtext/SOURCE.md), ASCII, separated by a form feed. The split is fixed: the first nine tenths of each work
    are training text, the last tenth of each is validation text, so both splits hold all three styles."""
    fix = "restore the file the repo ships: git checkout -- docs/realtext/realtext.txt.gz"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:   # missing, unreadable, or not gzip
        raise ValueError(f"--setting realtext reads {path} and cannot ({type(e).__name__}: {e}); {fix}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != REALTEXT_SHA256:
        raise ValueError(f"--setting realtext: the text in {path} has sha256 {digest[:12]}..., not the recorded "
                         f"{REALTEXT_SHA256[:12]}... (the file was altered); {fix}")
    train, val = [], []
    for work in raw.split(b"\f"):
        cut = work.index(b"\n", int(len(work) * (1 - REALTEXT_VAL))) + 1
        train.append(work[:cut])
        val.append(work[cut:])
    return {"train": np.frombuffer(b"".join(train), np.uint8), "val": np.frombuffer(b"".join(val), np.uint8)}


class RealText(Bytes):
    """setting realtext: bytes of real English (realtext()), for the byte models. The same batches as Bytes
    with a --data file, except in the validation split (and no byte_kind: real text has no ground truth of it):
    train row r is the window at a random offset of the training text (RowRng([seed, 0, r])); val row r is window
    val_order[r % n] of the n non-overlapping windows that tile the validation text, in one fixed shuffled order
    whatever the seed, so an eval's rows never overlap and any eval_batches of them spread over all three works."""

    def __init__(self, seq_len, seed, path=None):
        super().__init__(seq_len, seed)
        self.setting, self.file = "realtext", realtext(path or REALTEXT_FILE)
        T = seq_len + 1
        n = len(self.file["val"]) // T
        if n < 1:
            raise ValueError(f"seq_len={seq_len} is longer than the realtext validation text ({len(self.file['val'])} "
                             f"bytes); use --seq_len {len(self.file['val']) - 1} or less")
        self.val_order = np.random.default_rng(0).permutation(n)

    def _row(self, split, r):
        if split != "val":
            return super()._row(split, r)
        T = self.seq_len + 1
        start = int(self.val_order[r % len(self.val_order)]) * T
        return self.file["val"][start:start + T].astype(np.int64), np.zeros(T, np.int64)

    def get_batch(self, split, batch_size, index, rank=0, world_size=1):
        b = super().get_batch(split, batch_size, index, rank, world_size)
        del b["byte_kind"]
        return b


if __name__ == "__main__":
    # the toy world: training row 0 of every setting, readable (the figure: python plots.py toy_world)
    for s in SETTINGS:
        ds = make_data(s, seq_len=200 if s != "bytes" else 400)
        b = ds.get_batch("train", 1, 0)
        print(f"=== setting {s!r}: vocab {ds.vocab_size}, modalities {', '.join(ds.modality_names)}; "
              f"training row 0 ({ds.seq_len} tokens), decoded" + (" (each image as the scorer reads it back, "
              "tokenizer errors included)" if s in ("chameleon", "speech", "transfusion") else "") + ":")
        print(ds.decode(b), "\n")
