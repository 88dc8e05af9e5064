"""data.py's realtext setting: the shipped text is pinned, its batches are deterministic, its split is clean, and a
missing or altered text is one line and exit 2 before any file is written."""
import gzip
import hashlib
import os

import numpy as np
import pytest
import torch

import data
import train

TEXT = data.realtext(data.REALTEXT_FILE)


def test_shipped_text_is_pinned_and_split_per_work():
    with gzip.open(data.REALTEXT_FILE, "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == data.REALTEXT_SHA256 and max(raw) < 128   # ASCII
    works = raw.split(b"\f")
    assert len(works) == 3
    train_b, val_b = TEXT["train"].tobytes(), TEXT["val"].tobytes()
    assert len(train_b) + len(val_b) == len(raw) - 2                                     # every byte but the 2 \f
    pos_t = pos_v = 0
    for w in works:   # each work = its training part, then its validation part (its last tenth, from a line start)
        n_val = len(w) - w.index(b"\n", int(len(w) * (1 - data.REALTEXT_VAL))) - 1
        assert 0.08 * len(w) < n_val <= 0.1 * len(w)
        assert w == train_b[pos_t:pos_t + len(w) - n_val] + val_b[pos_v:pos_v + n_val]
        pos_t, pos_v = pos_t + len(w) - n_val, pos_v + n_val


def batch_bytes(b):
    return hashlib.sha256(b["tokens"].numpy().astype(np.uint8).tobytes() + b["targets"][:, -1:].numpy()
                          .astype(np.uint8).tobytes()).hexdigest()


def test_same_bytes_for_the_same_seed():
    a, b, c = data.make_data("realtext", 256, seed=0), data.make_data("realtext", 256, seed=0), \
        data.make_data("realtext", 256, seed=1)
    for split in ("train", "val"):
        for i in range(3):
            x, y = a.get_batch(split, 4, i), b.get_batch(split, 4, i)
            assert all(torch.equal(x[k], y[k]) for k in x)
    # every machine: the first training batch of seed 0 is these bytes (numpy's seeded generator, no float maths)
    assert batch_bytes(a.get_batch("train", 4, 0))[:16] == "5b29b3e1456f9a26"
    assert not torch.equal(a.get_batch("train", 4, 0)["tokens"], c.get_batch("train", 4, 0)["tokens"])
    # the validation rows are the same whatever the seed (every run is judged on the same text)
    assert torch.equal(a.get_batch("val", 4, 1)["tokens"], c.get_batch("val", 4, 1)["tokens"])
    # the DDP shards of a batch are the single-process batch
    one = a.get_batch("train", 4, 2)
    two = [a.get_batch("train", 2, 2, rank=r, world_size=2) for r in (0, 1)]
    for k in ("tokens", "targets", "row_id"):
        assert torch.equal(one[k], torch.cat([t[k] for t in two]))
    assert one["tokens"].shape == (4, 256) and torch.equal(one["tokens"][:, 1:], one["targets"][:, :-1])
    assert "byte_kind" not in one and bool(one["loss_mask"].all())


def test_no_validation_text_in_training():
    ds = data.make_data("realtext", 512, seed=0)
    train_b, val_b = TEXT["train"].tobytes(), TEXT["val"].tobytes()
    for i in range(4):   # training rows are windows of the training text, validation rows of the validation text
        for row in ds.get_batch("train", 4, i)["tokens"].numpy().astype(np.uint8):
            assert train_b.find(row.tobytes()) >= 0 and val_b.find(row.tobytes()) < 0
    n = len(ds.val_order)
    starts = set()
    for i in range(n // 4 + 1):
        b = ds.get_batch("val", 4, i)
        for row, t in zip(b["tokens"].numpy().astype(np.uint8), b["targets"][:, -1].tolist()):
            s = val_b.find(row.tobytes() + bytes([t]))
            assert s >= 0 and s % 513 == 0
            starts.add(s)
    assert len(starts) == n   # n consecutive val rows tile the validation text: no overlap, nothing left out
    # and the split shares no 64-byte stretch: the validation text is text the models never trained on
    assert all(train_b.find(val_b[i:i + 64]) < 0 for i in range(0, len(val_b) - 64, 64))


def test_seq_len_longer_than_the_validation_text():
    with pytest.raises(ValueError, match="longer than the realtext validation text"):
        data.make_data("realtext", len(TEXT["val"]) + 10)


@pytest.mark.parametrize("case", ["missing", "altered", "not gzip"])
def test_missing_or_altered_text_is_one_line_exit_2(case, tmp_path, monkeypatch, capsys):
    path = tmp_path / "realtext.txt.gz"
    if case == "altered":
        with gzip.open(data.REALTEXT_FILE, "rb") as f:
            raw = bytearray(f.read())
        raw[1000] ^= 1
        path.write_bytes(gzip.compress(bytes(raw)))
    elif case == "not gzip":
        path.write_bytes(b"plain text, not the shipped file")
    monkeypatch.setattr(data, "REALTEXT_FILE", str(path))
    with pytest.raises(ValueError, match="git checkout -- docs/realtext/realtext.txt.gz"):
        data.make_data("realtext", 256)
    out = tmp_path / "run"
    assert train.main(["--model", "dense", "--setting", "realtext", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "git checkout" in err
    assert ("the file was altered" in err) == (case == "altered") and not os.path.exists(out)


def test_byte_models_train_on_it_and_report_bits_per_byte(tmp_path):
    import cli
    reg = cli.registry()
    for name in ("dense", "megabyte", "blt", "blt-entropy", "megalodon", "mamba"):
        cli.check_setting(name, "realtext", reg)                      # a byte model reads realtext as it reads bytes
    for name in ("mot", "transfusion"):
        with pytest.raises(cli.UsageError, match="does not support --setting realtext"):
            cli.check_setting(name, "realtext", reg)
    out = tmp_path / "run"
    assert train.main(["--model", "dense", "--setting", "realtext", "--steps", "2", "--seq_len", "64", "--batch_size",
                       "2", "--eval_batches", "2", "--d_model", "16", "--n_head", "2", "--out", str(out)]) == 0
    last = [r for r in train.read_jsonl(str(out / "metrics.jsonl")) if "eval_loss" in r][-1]
    assert last["eval_bpb"] == pytest.approx(last["eval_loss"] / np.log(2)) and last["se_eval_loss"] > 0
