"""Reading a shard gives exactly what webdataset's own reader gives, for every archive form, streamed member by
member; parts of a shard are read by skipping earlier samples undecoded."""
import gzip
import io
import tarfile
import warnings

import pytest
import webdataset as wds

from conftest import jpeg_bytes
from ssl_vit.data.tar_reader import iter_samples, read_shard
from ssl_vit.data.sources import expand_source


def webdataset_samples(url: str) -> list[dict]:
    """The reference: plain webdataset, no decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return [dict(s) for s in wds.WebDataset(url, shardshuffle=False, empty_check=False)]


def comparable(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in samples]


def make_tar(path, members: dict[str, bytes], fmt=tarfile.USTAR_FORMAT, directories=()) -> str:
    with tarfile.open(path, "w", format=fmt) as tf:
        for d in directories:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_written_shards_match_webdataset_whole_and_in_parts(train_shards):
    for url in expand_source(str(train_shards)).urls[:3]:
        ours = read_shard(url)
        assert len(ours) == 500
        assert comparable(ours) == comparable(webdataset_samples(url))
        assert list(iter_samples(url, 123, 130)) == ours[123:130]
        piped = list(iter_samples(f"pipe:cat {url}", 490))
        assert [dict(s, __url__=url) for s in piped] == ours[490:]


def test_ustar_prefix_directories_metadata_and_case(tmp_path):
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: stored in the ustar prefix field
    members = {f"{deep}/a.JPG": jpeg_bytes(), f"{deep}/a.cls": b"3", "__index__/x.json": b"{}", "__meta__": b"{}",
               "b.x.json": b"[1]", "b.x.png": b"png-bytes", "c.txt": b"hello"}
    url = make_tar(tmp_path / "p.tar", members, directories=["dir/"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damage reported
        ours = read_shard(url)
    assert not any(k.startswith("__") for s in ours for k in s if k not in ("__key__", "__url__"))
    assert comparable(ours) == comparable(webdataset_samples(url))
    assert ours[0]["__key__"] == f"{deep}/a" and "jpg" in ours[0]  # suffix lower-cased like webdataset
    assert ours[1]["__key__"] == "b" and set(ours[1]) >= {"x.json", "x.png"}


@pytest.mark.parametrize("kind", ["pax", "gnu-longname", "gzip"])
def test_long_names_and_compression_read_like_webdataset(tmp_path, kind):
    long_name = "x" * 150 + "/" + "y" * 120 + ".cls"  # too long for ustar: pax or GNU long-name headers
    members = {"s1.jpg": jpeg_bytes(), "s1.cls": b"1", long_name: b"7", "s2.cls": b"2"}
    if kind == "gzip":
        raw = open(make_tar(tmp_path / "p.tar", {"s1.jpg": jpeg_bytes(), "s1.cls": b"1"}), "rb").read()
        url = str(tmp_path / "p.tar.gz")
        with open(url, "wb") as f:
            f.write(gzip.compress(raw))
    else:
        url = make_tar(tmp_path / "p.tar", members, fmt=tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT)
    ours = read_shard(url)
    assert comparable(ours) == comparable(webdataset_samples(url))
    assert [s["__key__"] for s in read_shard(f"pipe:cat {url}")] == [s["__key__"] for s in ours]
    assert [s["__key__"] for s in ours] == (["s1"] if kind == "gzip" else ["s1", long_name[:-4], "s2"])


@pytest.mark.parametrize("damage", ["checksum", "garbage-header", "truncated-body", "truncated-header"])
def test_damaged_shard_keeps_what_precedes_the_damage_and_says_where(tmp_path, damage):
    url = make_tar(tmp_path / "p.tar", {f"s{i}.{ext}": b"%d" % i for i in range(1, 5) for ext in ("cls", "txt")})
    data = bytearray(open(url, "rb").read())
    third_sample = 4 * 1024  # two members of 1 header + 1 data block each per sample
    if damage == "checksum":
        data[third_sample + 5] ^= 0xFF  # a byte of the name: the stored checksum no longer matches
    elif damage == "garbage-header":
        data[third_sample:third_sample + 512] = b"\x07" * 512
    elif damage == "truncated-body":
        data = data[:third_sample + 512 + 100]
    else:
        data = data[:third_sample + 200]
    with open(url, "wb") as f:
        f.write(data)
    # Damage in a header leaves s2 in progress (the damaged member may be one of its own): it is dropped too. In a
    # body, s3's header has been read, so s2 is known to be complete.
    kept = ["s1", "s2"] if damage == "truncated-body" else ["s1"]
    with pytest.warns(RuntimeWarning, match=rf"p\.tar is truncated or corrupt after {len(kept)} samples"):
        samples = read_shard(url)
    assert [s["__key__"] for s in samples] == kept


def test_duplicate_member_ends_the_shard_like_webdataset(tmp_path):
    members = [("s1.cls", b"1"), ("s1.txt", b"a"), ("s2.cls", b"2"), ("s2.cls", b"3"), ("s3.cls", b"4")]
    url = str(tmp_path / "dup.tar")
    with tarfile.open(url, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.warns(RuntimeWarning, match=r"dup\.tar is truncated or corrupt after 1 samples .*duplicate file name"):
        samples = read_shard(url)
    assert [s["__key__"] for s in samples] == ["s1"]
    with pytest.raises(ValueError, match="duplicate file name"):
        webdataset_samples(url)  # webdataset's own reader fails on the same member


@pytest.mark.parametrize("form", ["{:06o}\0 ", "{:07o}\0", " {:06o}\0", "  {:o} \0", "{:08o}", "bad"])
def test_checksum_field_formats(tmp_path, form):
    """Writers format the stored checksum differently (tarfile: 6 digits, NUL, space; others pad with spaces or use 7
    digits); all are read, and a field that is not one run of octal digits is damage."""
    url = make_tar(tmp_path / "p.tar", {"s1.cls": b"1", "s2.cls": b"2"})
    data = bytearray(open(url, "rb").read())
    second_header = 1024
    header = data[second_header:second_header + 512]
    header[148:156] = b" " * 8
    total = sum(header)
    field = b"1 2\0    " if form == "bad" else form.format(total).encode()
    data[second_header + 148:second_header + 156] = field
    with open(url, "wb") as f:
        f.write(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [s["__key__"] for s in read_shard(url)]
    messages = [str(w.message) for w in caught]
    if form == "bad":
        assert keys == [] and any("bad tar header checksum at byte 1024" in m for m in messages)
    else:
        assert keys == ["s1", "s2"] and not messages
