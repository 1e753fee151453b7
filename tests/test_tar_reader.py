"""The direct tar reader reads what tarfile reads, in every header format, and fails as it does."""

from __future__ import annotations

import io
import tarfile

import pytest

from cn_lightning.data.format import tar_members, tar_samples


def _tar(members: list[tuple[str, bytes]], fmt: int, mode: str = "w", dirs: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        if dirs:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("k0.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("k0.txt", "un cercle rouge, é".encode()),
    ("k0.outline.png", b""),  # an empty member
    ("k1.jpg", b"x" * 512),  # exactly one block: no padding
    ("sub/dir/k2.txt", b"nested"),
    ("d" * 150 + "/k3.txt", b"a name longer than 100 characters"),
    ("__meta__", b"webdataset metadata, skipped"),
    ("k4." + "é" * 60 + ".txt", b"a long non-ASCII name"),
]
EXPECTED = [(n, d) for n, d in MEMBERS if n != "__meta__"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_every_header_format_like_tarfile(fmt):
    members = MEMBERS
    if fmt == tarfile.USTAR_FORMAT:  # ustar has no long non-ASCII names; prefix/name split only
        members = [(n, d) for n, d in MEMBERS if not n.startswith("k4.")]
    raw = _tar(members, fmt)
    got = list(tar_members(io.BytesIO(raw)))
    assert got == [(n, d) for n, d in members if n != "__meta__"]


def test_compressed_tars_go_through_tarfile():
    raw = _tar(MEMBERS, tarfile.PAX_FORMAT, mode="w:gz")
    assert list(tar_members(io.BytesIO(raw))) == EXPECTED


def test_groups_members_into_samples():
    raw = _tar(MEMBERS[:4], tarfile.GNU_FORMAT, dirs=False)
    samples = list(tar_samples(io.BytesIO(raw), "mem.tar"))
    assert [s["__key__"] for s in samples] == ["k0", "k1"]
    assert samples[0]["outline.png"] == b"" and samples[0]["txt"] == MEMBERS[1][1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"x" * 100, "truncated header"),
        (b"this is not a tar archive\n" * 40, "invalid header"),
    ],
)
def test_errors_are_tarfiles(data, message):
    with pytest.raises(tarfile.ReadError, match=message):
        list(tar_members(io.BytesIO(data)))


def test_a_tar_that_breaks_off_raises_after_its_complete_members():
    raw = _tar(MEMBERS[:2], tarfile.GNU_FORMAT, dirs=False)
    cut = raw[: 512 + 512 * 2 + 512 + 5]  # the first member whole, the second cut in its data
    stream = tar_members(io.BytesIO(cut))
    assert next(stream) == MEMBERS[0]
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        next(stream)
    assert list(tar_members(io.BytesIO(raw[: 1024 + 512]))) == [MEMBERS[0]]  # no end blocks
