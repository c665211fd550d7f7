"""sp2ot_engine.io.archive: one rule per kind of bad member, pixel counts from headers (nothing
decoded), the manifest and reading images back from it."""
from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib

import pytest
from PIL import Image, ImageFile

from sp2ot_engine.io.archive import (
    ArchiveRejected,
    Limits,
    Manifest,
    Rejection,
    build_manifest,
    inspect_archive,
    manifest_path,
    open_source,
    upload_of_manifest,
)
from sp2ot_engine.io.collection import ImageCollection, scan_images


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def png(w: int, h: int, colour=(10, 20, 30)) -> bytes:
    return encode(Image.new("RGB", (w, h), colour))


def png_claiming(w: int, h: int) -> bytes:
    """A grey PNG whose header says ``w x h`` with only four rows of data: a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4))
            + chunk(b"IEND", b""))


def make_zip(path, files: dict[str, bytes], *, symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return path


def make_tar(path, files: dict[str, bytes], mode: str = "w", *, links: dict[str, tuple[str, str]] | None = None,
             fifos: tuple[str, ...] = ()):
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
            info.linkname = target
            t.addfile(info)
        for name in fifos:
            info = tarfile.TarInfo(name)
            info.type = tarfile.FIFOTYPE
            t.addfile(info)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Records every attempt to decode pixels (Pillow decodes only in ImageFile.load, through a
    decoder from Image._getdecoder)."""
    calls: list[str] = []
    load, getdecoder = ImageFile.ImageFile.load, Image._getdecoder

    def spy_load(self, *a, **kw):
        calls.append(f"load {self.format} {self.size}")
        return load(self, *a, **kw)

    def spy_decoder(mode, decoder_name, *a, **kw):
        calls.append(f"decoder {decoder_name}")
        return getdecoder(mode, decoder_name, *a, **kw)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    monkeypatch.setattr(Image, "_getdecoder", spy_decoder)
    return calls


# ----------------------------------------------------------------------------- rejections
@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png", "..\\evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_zip_slip_names_reject_the_archive(tmp_path, name, kind):
    files = {"ok.png": png(4, 4), name: png(4, 4)}
    arc = make_zip(tmp_path / "a.zip", files) if kind == "zip" else make_tar(tmp_path / "a.tgz", files, "w:gz")
    with pytest.raises(ArchiveRejected) as e:
        inspect_archive(arc)
    assert "escape the archive" in e.value.reason and e.value.member == name
    assert e.value.rule == Rejection.UNSAFE_NAME
    assert str(tmp_path) not in e.value.reason and str(e.value).startswith(str(arc))


@pytest.mark.parametrize("kind, word", [("sym", "symbolic link"), ("hard", "hard link")])
def test_links_in_a_tar_reject_the_archive(tmp_path, kind, word):
    arc = make_tar(tmp_path / "a.tar", {"ok.png": png(4, 4)}, links={"link.png": (kind, "ok.png")})
    with pytest.raises(ArchiveRejected, match=word) as e:
        inspect_archive(arc)
    assert e.value.member == "link.png" and e.value.rule == Rejection.LINK


def test_zip_symlink_special_and_encrypted_members_reject_the_archive(tmp_path):
    with pytest.raises(ArchiveRejected, match="symbolic link"):
        inspect_archive(make_zip(tmp_path / "l.zip", {"ok.png": png(4, 4)}, symlinks={"l.png": "/etc/passwd"}))
    with pytest.raises(ArchiveRejected, match="not a regular file") as e:
        inspect_archive(make_tar(tmp_path / "f.tar", {"ok.png": png(4, 4)}, fifos=("pipe.png",)))
    assert e.value.rule == Rejection.SPECIAL
    raw = bytearray(make_zip(tmp_path / "e.zip", {"ok.png": png(4, 4)}).read_bytes())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # mark the member encrypted in both headers
        pos = raw.find(sig)
        raw[pos + flag_at] |= 0x1
    (tmp_path / "e.zip").write_bytes(bytes(raw))
    with pytest.raises(ArchiveRejected, match="encrypted") as e:
        inspect_archive(tmp_path / "e.zip")
    assert e.value.rule == Rejection.ENCRYPTED


def test_budgets_reject_the_archive(tmp_path):
    files = {f"{i}.png": png(4, 4) for i in range(5)}
    arc = make_zip(tmp_path / "a.zip", files)
    assert len(inspect_archive(arc, Limits(max_members=5)).members) == 5
    with pytest.raises(ArchiveRejected, match="more than 4 files") as e:
        inspect_archive(arc, Limits(max_members=4))
    assert e.value.rule == Rejection.TOO_MANY_FILES
    total = sum(len(d) for d in files.values())
    with pytest.raises(ArchiveRejected, match="would extract to .* over the limit .* of uncompressed data") as e:
        inspect_archive(arc, Limits(max_total_bytes=total - 1))
    assert e.value.rule == Rejection.TOO_LARGE
    # a zip bomb by its declared sizes, and a tar.gz bomb caught while it is decompressed
    bomb = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(4 << 20)})
    with pytest.raises(ArchiveRejected, match="archive bomb") as e:
        inspect_archive(bomb, Limits(max_ratio=100, ratio_floor=1 << 20))
    assert e.value.rule == Rejection.BOMB
    tgz = make_tar(tmp_path / "bomb.tgz", {"zeros.bin": bytes(8 << 20)}, "w:gz")
    with pytest.raises(ArchiveRejected, match="archive bomb"):
        inspect_archive(tgz, Limits(max_ratio=100, ratio_floor=1 << 20), cache_dir=tmp_path / "spool")
    assert not list((tmp_path / "spool").iterdir())  # the partial spool file is gone
    with pytest.raises(ArchiveRejected, match="extracts to more than"):
        inspect_archive(tgz, Limits(max_total_bytes=4 << 20), cache_dir=tmp_path / "spool")


@pytest.fixture(autouse=True)
def _spool_dir(tmp_path):
    (tmp_path / "spool").mkdir()


def test_unreadable_or_unknown_archives_are_rejected(tmp_path):
    (tmp_path / "empty.zip").write_bytes(b"")
    (tmp_path / "text.zip").write_text("hello")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04" + b"\x00garbage" * 50)
    data = make_tar(tmp_path / "x.tgz", {f"{i}.png": png(30, 30, (i, i, i)) for i in range(30)}, "w:gz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])
    for name, match, rule in [("nope", "does not exist", Rejection.MISSING), ("empty.zip", "empty", Rejection.EMPTY),
                              ("text.zip", "not a folder or an archive", Rejection.NOT_ARCHIVE),
                              ("bad.zip", "corrupt zip", Rejection.CORRUPT), ("cut.tgz", "corrupt", Rejection.CORRUPT)]:
        with pytest.raises(ArchiveRejected, match=match) as e:
            inspect_archive(tmp_path / name, cache_dir=tmp_path / "spool")
        assert e.value.rule == rule, name
    assert not list((tmp_path / "spool").iterdir())


# ----------------------------------------------------------------------------- skips
JPEG_HEAD_ONLY = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01"


def test_each_kind_of_bad_member_gets_exactly_its_rule(tmp_path, no_decoding):
    inner = make_zip(tmp_path / "inner.zip", {"x.png": png(2, 2)}).read_bytes()
    files = {
        "good.png": png(8, 6),
        "sub/good.jpg": encode(Image.new("RGB", (5, 7)), "JPEG"),
        "a" * 296 + ".png": png(2, 2),  # 300 characters
        "日" * 100 + ".png": png(2, 2),  # 104 characters, 304 bytes
        "日" * 83 + ".png": png(3, 3),  # 253 bytes: fits
        "inner.zip": inner,
        "photo.png": inner,  # an archive in disguise
        "fake.jpg": b"this is text pretending to be a JPEG\n" * 5,
        "notes.txt": b"hello\n",
        "cut.png": png(8, 6)[:20],  # the signature and half the IHDR chunk
        "cut.jpg": JPEG_HEAD_ONLY,
        "tiny.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        ".hidden.png": png(2, 2),
        "__MACOSX/._good.png": b"\x00\x05\x16\x07",
        "empty.png": b"",
        "big.png": png(8, 8) + bytes(2000),  # over max_member_bytes below
    }
    expected = {
        "a" * 296 + ".png": "name too long (300 bytes",
        "日" * 100 + ".png": "name too long (304 bytes",
        "inner.zip": "nested archive",
        "photo.png": "nested archive",
        "fake.jpg": "not a valid image",
        "notes.txt": "not an image file",
        "cut.png": "truncated or corrupt image header (png",
        "cut.jpg": "truncated or corrupt image header (jpeg",
        "tiny.heic": "unsupported image format (heif)",
        ".hidden.png": "hidden file",
        "__MACOSX/._good.png": "__MACOSX",
        "empty.png": "empty file",
        "big.png": "file too large",
    }
    for kind in ("zip", "tar", "tar.xz"):
        arc = (make_zip(tmp_path / "all.zip", files) if kind == "zip"
               else make_tar(tmp_path / f"all.{kind}", files, "w" if kind == "tar" else "w:xz"))
        m = inspect_archive(arc, Limits(max_member_bytes=1000), cache_dir=tmp_path / "spool")
        assert m.kind == kind
        assert m.names == sorted(["good.png", "sub/good.jpg", "日" * 83 + ".png"])
        reasons = dict(m.skipped)
        assert set(reasons) == set(expected), kind
        for name, fragment in expected.items():
            assert fragment in reasons[name], (kind, name, reasons[name])
    assert no_decoding == []


def test_duplicates_keep_and_read_the_first_copy(tmp_path):
    arc = tmp_path / "dup.zip"
    with zipfile.ZipFile(arc, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("a.png", png(4, 4, (255, 0, 0)))
        z.writestr("a.png", png(4, 4, (0, 0, 255)))
    m = inspect_archive(arc)
    assert m.names == ["a.png"] and dict(m.skipped) == {"a.png": "duplicate name in archive (first copy kept)"}
    with scan_images(arc) as col:
        assert col.load(0).getpixel((0, 0)) == (255, 0, 0)


def test_folder_rules(tmp_path):
    root = tmp_path / "imgs"
    (root / ".git").mkdir(parents=True)
    (root / "a.png").write_bytes(png(3, 2))
    (root / ".git" / "x.png").write_bytes(png(3, 2))
    os.symlink(root / "a.png", root / "link.png")
    os.mkfifo(root / "pipe.png")  # opening it would block: never opened
    raw_name = os.fsencode(root) + b"/latin1-\xe9.png"
    with open(raw_name, "wb") as f:
        f.write(png(2, 2))
    m = inspect_archive(root)
    assert m.kind == "folder" and m.names == ["a.png"] and m.source_bytes == 0
    reasons = dict(m.skipped)
    assert reasons[".git/"] == "hidden folder, not scanned"
    assert reasons["link.png"] == "symbolic link, not followed"
    assert reasons["pipe.png"] == "not a regular file"
    assert "not valid UTF-8" in reasons[os.fsdecode(b"latin1-\xe9.png")]


# ----------------------------------------------------------------------------- pixels
def test_pixel_counts_come_from_headers_without_decoding(tmp_path, no_decoding):
    files = {
        "huge.png": png_claiming(9400, 9400),
        "a.png": png(8, 6),
        "b.gif": encode(Image.new("P", (3, 5)), "GIF"),
        "c.bmp": encode(Image.new("RGB", (5, 7)), "BMP"),
        "d.tif": encode(Image.new("L", (11, 2)), "TIFF"),
        "e.jpg": encode(Image.new("RGB", (40, 20)), "JPEG"),
        "f.webp": encode(Image.new("RGB", (9, 4)), "WEBP", lossless=True),
        "g.webp": encode(Image.new("RGB", (12, 5)), "WEBP", quality=80),
        "h.webp": encode(Image.new("RGBA", (13, 6), (1, 2, 3, 4)), "WEBP", quality=80),  # extended (VP8X)
        "i.ico": encode(Image.new("RGB", (48, 48)), "ICO", sizes=[(16, 16), (48, 48), (32, 32)]),
        "j.ico": encode(Image.new("RGBA", (300, 300)), "ICO", sizes=[(256, 256)]),
        "k.ppm": encode(Image.new("RGB", (6, 3)), "PPM"),
    }
    assert len(files["huge.png"]) < 4096
    arc = make_zip(tmp_path / "px.zip", files)
    m = inspect_archive(arc)
    sizes = {x.name: (x.type, x.width, x.height) for x in m.members}
    assert sizes == {
        "huge.png": ("png", 9400, 9400), "a.png": ("png", 8, 6), "b.gif": ("gif", 3, 5), "c.bmp": ("bmp", 5, 7),
        "d.tif": ("tiff", 11, 2), "e.jpg": ("jpeg", 40, 20), "f.webp": ("webp", 9, 4), "g.webp": ("webp", 12, 5),
        "h.webp": ("webp", 13, 6), "i.ico": ("ico", 48, 48), "j.ico": ("ico", 256, 256), "k.ppm": ("ppm", 6, 3),
    }
    assert m.total_pixels == sum(w * h for _, w, h in sizes.values()) == (
        9400 * 9400 + 8 * 6 + 3 * 5 + 5 * 7 + 11 * 2 + 40 * 20 + 9 * 4 + 12 * 5 + 13 * 6 + 48 * 48 + 256 * 256 + 6 * 3)
    assert next(x for x in m.members if x.name == "huge.png").pixels == 88_360_000
    assert m.total_bytes == sum(len(d) for d in files.values())
    # per-image and per-upload budgets are the caller's parameters; both reject (a
    # decompression bomb), the per-image one naming the image
    with pytest.raises(ArchiveRejected, match=r"the image 'huge.png' is too large \(9400 x 9400 = 88.4 megapixels, "
                                              r"over the limit of 50.0 per image\)") as e:
        inspect_archive(arc, Limits(max_image_pixels=50_000_000))
    assert e.value.rule == Rejection.IMAGE_TOO_LARGE and e.value.member == "huge.png"
    with pytest.raises(ArchiveRejected, match="88.4 megapixels in total, over the limit of 80.0") as e:
        inspect_archive(arc, Limits(max_total_pixels=80_000_000))
    assert e.value.rule == Rejection.TOO_MANY_PIXELS
    assert no_decoding == []
    # scanning with a pixel budget rejects it before decoding anything
    with pytest.raises(ArchiveRejected, match="huge.png"):
        scan_images(arc, limits=Limits(max_image_pixels=50_000_000))
    assert no_decoding == []


# ----------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tar.gz", "tar.bz2"])
def test_manifest_round_trip_and_reading_without_a_rescan(tmp_path, kind, monkeypatch):
    files = {"b/x.png": png(4, 3, (1, 2, 3)), "a.jpg": encode(Image.new("RGB", (6, 2), (200, 0, 0)), "JPEG"),
             "bad.png": b"not really", "c.gif": encode(Image.new("P", (3, 3)), "GIF")}
    if kind == "folder":
        path = tmp_path / "imgs"
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    elif kind == "zip":
        path = make_zip(tmp_path / "imgs.zip", files)
    else:
        path = make_tar(tmp_path / f"imgs.{kind}", files, {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2"}[kind])
    m = inspect_archive(path, cache_dir=tmp_path / "spool")
    target = manifest_path(path)
    assert target.name == path.name + ".manifest.json" and upload_of_manifest(target) == path
    assert upload_of_manifest(path) is None
    m.write(target)
    again = Manifest.read(target)
    assert again == m and again.kind == kind and again.names == ["a.jpg", "b/x.png", "c.gif"]
    assert again.skipped == [("bad.png", "not a valid image: the content is not a recognised image format")]
    # reading from the manifest never walks or probes the archive again
    import sp2ot_engine.io.archive as archive

    monkeypatch.setattr(archive, "build_manifest", lambda *a, **k: pytest.fail("scanned again"))
    with ImageCollection.from_manifest(path, again, cache_dir=tmp_path / "spool") as col:
        assert col.names == again.names and col.kind == kind and col.manifest == again
        assert col.load(0).getpixel((0, 0))[0] > 150 and col.load(1).getpixel((0, 0)) == (1, 2, 3)
    assert not list((tmp_path / "spool").iterdir())


def test_manifest_belongs_to_its_file(tmp_path):
    arc = make_zip(tmp_path / "a.zip", {"a.png": png(4, 4)})
    m = inspect_archive(arc)
    other = make_zip(tmp_path / "b.zip", {"a.png": png(4, 4), "b.png": png(5, 5)})
    with pytest.raises(ValueError, match="does not belong"):
        ImageCollection.from_manifest(other, m)
    with pytest.raises(ValueError, match="not an sp2ot manifest"):
        Manifest.from_json({"format": "other", "version": 1})


def test_verify_from_manifest_skips_damaged_pixels(tmp_path):
    jpg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    arc = make_zip(tmp_path / "a.zip", {"ok.png": png(4, 4), "cut.jpg": jpg[: len(jpg) // 2]})
    m = inspect_archive(arc)
    assert m.names == ["cut.jpg", "ok.png"]  # the header is intact: only decoding can tell
    with ImageCollection.from_manifest(arc, m, verify=True) as col:
        assert col.names == ["ok.png"] and "truncated" in dict(col.skipped)["cut.jpg"]


@pytest.mark.parametrize("threads", [1, 2])
def test_on_decoded_sees_every_verified_image_once(tmp_path, threads):
    """The verification's decoded images go to on_decoded (what the service makes its
    thumbnails from): each image that decodes, once, as RGB; JPEGs no smaller than the hook's
    decode_min_side; its errors stop the scan; without verify it is refused."""
    import threading

    jpg = encode(Image.new("RGB", (1600, 1200), (200, 0, 0)), "JPEG", quality=90)
    files = {"big.jpg": jpg, "clear.png": encode(Image.new("RGBA", (6, 4), (0, 0, 255, 0))),
             "cut.jpg": jpg[: len(jpg) // 3], "grey.png": encode(Image.new("L", (5, 5), 7))}
    arc = make_zip(tmp_path / "a.zip", files)
    m = inspect_archive(arc)
    seen: dict[str, tuple] = {}
    lock = threading.Lock()

    def hook(name, image):
        with lock:
            assert name not in seen
            seen[name] = (image.mode, image.size, image.getpixel((0, 0)))

    hook.decode_min_side = 300
    with ImageCollection.from_manifest(arc, m, verify=True, threads=threads, on_decoded=hook) as col:
        assert col.names == ["big.jpg", "clear.png", "grey.png"] and set(seen) == set(col.names)
        with col.open_bytes(0) as f:  # the encoded bytes, streamed
            assert f.read(5) + f.read() == jpg
    assert seen["clear.png"] == ("RGB", (6, 4), (255, 255, 255))  # as load() makes it
    assert seen["grey.png"][0] == "RGB" and seen["grey.png"][2] == (7, 7, 7)
    assert seen["big.jpg"][1] == (400, 300)  # decoded at 1/4: the shorter side still >= 300
    hook.decode_min_side = None
    seen.clear()
    scan_images(arc, threads=threads, on_decoded=hook).close()
    assert seen["big.jpg"][1] == (200, 150)  # the verification's own scale (>= 64)

    def failing(name, image):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        ImageCollection.from_manifest(arc, m, verify=True, threads=threads, on_decoded=failing)
    with pytest.raises(ValueError, match="verify=True"):
        ImageCollection.from_manifest(arc, m, on_decoded=hook)


def test_keep_the_decompressed_tar_of_a_compressed_one(tmp_path):
    files = {"a.png": png(4, 4, (200, 0, 0)), "b.png": png(3, 3)}
    arc = make_tar(tmp_path / "a.tar.xz", files, "w:xz")
    kept = tmp_path / "spool" / "plain.tar"
    m = inspect_archive(arc, cache_dir=tmp_path / "spool", keep_decompressed=kept)
    assert m.kind == "tar" and m.source_bytes == kept.stat().st_size and m.names == ["a.png", "b.png"]
    assert [p.name for p in (tmp_path / "spool").iterdir()] == ["plain.tar"]
    with ImageCollection.from_manifest(kept, m) as col:  # read by offset, no decompression
        assert col.load(0).getpixel((0, 0)) == (200, 0, 0)
    zipped = make_zip(tmp_path / "a.zip", files)
    assert inspect_archive(zipped, keep_decompressed=tmp_path / "unused.tar").kind == "zip"
    assert not (tmp_path / "unused.tar").exists()


def test_open_source_of_a_compressed_tar_owns_its_spool(tmp_path):
    arc = make_tar(tmp_path / "a.tar.gz", {"a.png": png(4, 4)}, "w:gz")
    source = open_source(arc, cache_dir=tmp_path / "spool")
    assert source.kind == "tar.gz" and len(list((tmp_path / "spool").iterdir())) == 1
    assert build_manifest(source).names == ["a.png"]
    source.close()
    assert not list((tmp_path / "spool").iterdir())
