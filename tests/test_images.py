"""Tests for the engine's image input: scanning folders/archives (sp2ot_engine.io.collection), pixel
conversion (io.decode), datasets and loaders (io.loader), transforms (sp2ot_engine.transforms)."""
from __future__ import annotations

import io
import os
import pickle
import stat
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sp2ot_engine.io.collection import ImageCollection, ImageLoadError, scan_images
from sp2ot_engine.io.decode import decode_image, parse_background, to_rgb
from sp2ot_engine.io.loader import ImageDataset, make_loader
from sp2ot_engine.transforms import TwoViews, eval_transform, train_transform


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _files() -> dict[str, bytes]:
    """name -> bytes: one image per Pillow mode plus every kind of bad file."""
    f: dict[str, bytes] = {}
    f["a_rgb.png"] = _encode(Image.new("RGB", (8, 6), (10, 20, 30)), "PNG")
    f["b_gray.png"] = _encode(Image.new("L", (8, 6), 77), "PNG")
    la = Image.new("LA", (4, 4), (100, 255))
    la.putpixel((0, 0), (100, 0))
    f["c_la.png"] = _encode(la, "PNG")
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    f["d_palette.png"] = _encode(p, "PNG")
    pt = p.copy()
    pt.putpixel((0, 0), 0)
    f["e_palette_trns.png"] = _encode(pt, "PNG", transparency=0)
    rgba = Image.new("RGBA", (4, 4), (0, 255, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    f["f_rgba.png"] = _encode(rgba, "PNG")
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (8, 0, 16, 16))
    f["g_cmyk.jpg"] = _encode(cmyk, "JPEG", quality=100)
    g16 = np.zeros((4, 4), np.uint16)
    g16[0, 0], g16[0, 1], g16[0, 2], g16[0, 3] = 65535, 257, 1000, 32768
    im16 = Image.fromarray(g16)
    assert im16.mode == "I;16"
    f["h_gray16.png"] = _encode(im16, "PNG")
    i32 = Image.fromarray(np.array([[0, 65535], [300, 257]], np.int32))
    assert i32.mode == "I"
    f["i_int32.tif"] = _encode(i32, "TIFF")
    fl = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32))
    assert fl.mode == "F"
    f["j_float.tif"] = _encode(fl, "TIFF")
    bw = Image.new("1", (4, 4), 0)
    bw.putpixel((0, 0), 1)
    f["k_bilevel.png"] = _encode(bw, "PNG")
    rot = Image.new("RGB", (40, 20), (200, 0, 0))
    rot.paste((0, 0, 200), (0, 0, 20, 20))  # left half blue, right half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    f["l_exif_rotated.jpg"] = _encode(rot, "JPEG", exif=exif, quality=95)
    f["sub/nested/m.bmp"] = _encode(Image.new("RGB", (5, 7), (1, 2, 3)), "BMP")
    f["sub/n.gif"] = _encode(Image.new("P", (3, 3), 0), "GIF")
    # bad files
    f[".hidden.png"] = f["a_rgb.png"]
    f["sub/.DS_Store"] = b"\x00\x00\x00\x01Bud1"
    f["notes.txt"] = b"hello, not an image\n"
    f["fake.png"] = b"this is text pretending to be a PNG\n" * 10
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpg = _encode(big, "JPEG", quality=90)
    f["truncated.jpg"] = jpg[: len(jpg) // 2]
    f["empty.png"] = b""
    return f


GOOD = sorted([
    "a_rgb.png", "b_gray.png", "c_la.png", "d_palette.png", "e_palette_trns.png", "f_rgba.png",
    "g_cmyk.jpg", "h_gray16.png", "i_int32.tif", "j_float.tif", "k_bilevel.png",
    "l_exif_rotated.jpg", "sub/n.gif", "sub/nested/m.bmp",
])

EXPECTED_SKIPS = {  # name -> a substring of the reason
    ".hidden.png": "hidden",
    "sub/.DS_Store": "hidden",
    "notes.txt": "not an image",
    "fake.png": "not a valid image",
    "truncated.jpg": "truncated",
    "empty.png": "empty",
}


def _write_folder(root, files):
    for name, data in files.items():
        p = root.joinpath(*name.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _write_zip(path, files, extra=(), link=False):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sub/", b"")  # explicit directory entry: silently ignored
        for name, data in files.items():
            z.writestr(name, data)
        for name, data in extra:
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo("link.png")
            info.create_system = 3  # unix
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "a_rgb.png")
    return path


def _write_tar(path, files, mode="w", extra=(), link=False):
    with tarfile.open(path, mode) as t:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for name, data in list(files.items()) + list(extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("link.png")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)
    return path


@pytest.fixture(scope="module")
def files():
    return _files()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, files):
    """The same content as a folder, a zip, a tar and a tar.gz (the folder also holds a symlink)."""
    base = tmp_path_factory.mktemp("sources")
    folder = _write_folder(base / "folder", files)
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._a_rgb.png").write_bytes(b"\x00\x05\x16\x07")
    os.symlink(folder / "a_rgb.png", folder / "link.png")
    extra = [("__MACOSX/._a_rgb.png", b"\x00\x05\x16\x07")]
    return {
        "folder": folder,
        "zip": _write_zip(base / "images.zip", files, extra),
        "tar": _write_tar(base / "images.tar", files, "w", extra),
        "tar.gz": _write_tar(base / "images.tgz", files, "w:gz", extra),
    }


def _check_collection(col: ImageCollection):
    assert col.names == GOOD
    assert len(col) == len(GOOD)
    reasons = dict(col.skipped)
    for name, frag in EXPECTED_SKIPS.items():
        assert name in reasons, (name, col.skipped)
        assert frag in reasons[name], (name, reasons[name])
    assert [s[0] for s in col.skipped] == sorted(s[0] for s in col.skipped)
    assert not set(col.names) & set(reasons)


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tar.gz"])
def test_scan_names_order_and_skips(sources, kind):
    col = ImageCollection.open(sources[kind])
    _check_collection(col)
    reasons = dict(col.skipped)
    if kind == "folder":
        assert "__MACOSX" in reasons["__MACOSX/"]
        assert "symbolic link" in reasons["link.png"]  # a folder's own link: skipped, not followed
    else:
        assert col.kind == {"zip": "zip", "tar": "tar", "tar.gz": "tar.gz"}[kind]
        assert "__MACOSX" in reasons["__MACOSX/._a_rgb.png"]
    for i in range(len(col)):
        im = col.load(i)
        assert isinstance(im, Image.Image) and im.mode == "RGB"
    col.close()


def _px(col, name, xy=(0, 0)):
    return col.load(col.names.index(name)).getpixel(xy)


@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
def test_pixels_every_mode(sources, kind):
    col = scan_images(sources[kind])  # default background: white
    assert _px(col, "a_rgb.png") == (10, 20, 30)
    assert _px(col, "b_gray.png") == (77, 77, 77)
    assert _px(col, "c_la.png") == (255, 255, 255)  # transparent -> background
    assert _px(col, "c_la.png", (1, 1)) == (100, 100, 100)
    assert _px(col, "d_palette.png") == (255, 0, 0)
    assert _px(col, "e_palette_trns.png") == (255, 255, 255)
    assert _px(col, "e_palette_trns.png", (1, 1)) == (255, 0, 0)
    assert _px(col, "f_rgba.png") == (255, 255, 255)
    r, g, b = _px(col, "f_rgba.png", (1, 0))  # half-transparent red over white
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert _px(col, "f_rgba.png", (2, 2)) == (0, 255, 0)
    white = np.array(_px(col, "g_cmyk.jpg", (2, 8)))
    cyan = np.array(_px(col, "g_cmyk.jpg", (13, 8)))
    assert np.abs(white - 255).max() <= 3 and np.abs(cyan - (0, 255, 255)).max() <= 3
    assert _px(col, "h_gray16.png") == (255, 255, 255)  # 65535 -> 255 (scaled, not clipped)
    assert _px(col, "h_gray16.png", (1, 0)) == (1, 1, 1)  # 257 -> 1
    assert _px(col, "h_gray16.png", (2, 0)) == (4, 4, 4)  # 1000 -> round(3.89)
    assert _px(col, "h_gray16.png", (3, 0)) == (128, 128, 128)  # 32768 -> 127.5 -> 128
    assert _px(col, "i_int32.tif", (1, 0)) == (255, 255, 255)
    assert _px(col, "i_int32.tif", (0, 1)) == (1, 1, 1)  # 300 -> 1.17
    assert _px(col, "j_float.tif", (1, 0)) == (255, 255, 255)  # float 1.0
    assert _px(col, "j_float.tif", (0, 1)) == (128, 128, 128)  # float 0.5
    assert _px(col, "k_bilevel.png") == (255, 255, 255)
    assert _px(col, "k_bilevel.png", (1, 1)) == (0, 0, 0)
    rot = col.load(col.names.index("l_exif_rotated.jpg"))
    assert rot.size == (20, 40)  # 40x20 stored, orientation 6 applied
    top, bottom = np.array(rot.getpixel((10, 5))), np.array(rot.getpixel((10, 35)))
    assert top[2] > 150 and top[0] < 50  # rotated CW: the left (blue) half is now on top
    assert bottom[0] > 150 and bottom[2] < 50
    assert _px(col, "sub/nested/m.bmp") == (1, 2, 3)
    assert col.load(col.names.index("sub/nested/m.bmp")).size == (5, 7)


def test_background_choices(sources):
    col = scan_images(sources["folder"], background="black")
    assert _px(col, "e_palette_trns.png") == (0, 0, 0)
    assert _px(col, "c_la.png") == (0, 0, 0)
    assert col.load(col.names.index("f_rgba.png"), background=(10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)
    assert parse_background("white") == (255, 255, 255)
    assert parse_background("#102030") == (16, 32, 48)
    with pytest.raises(ValueError, match="colour"):
        parse_background("no-such-colour")
    with pytest.raises(ValueError):
        parse_background((1, 2, 300))
    with pytest.raises(ValueError):
        scan_images(sources["folder"], background="nope")


def test_to_rgb_direct_modes():
    assert to_rgb(Image.new("La", (2, 2), (50, 0)), "black").getpixel((0, 0)) == (0, 0, 0)
    rgb_trns = Image.new("RGB", (2, 2), (1, 2, 3))
    rgb_trns.info["transparency"] = (1, 2, 3)
    assert to_rgb(rgb_trns).getpixel((0, 0)) == (255, 255, 255)
    big = Image.fromarray(np.array([[-100, 100000]], np.int32))  # outside 16 bits -> stretched
    assert to_rgb(big).getpixel((0, 0)) == (0, 0, 0) and to_rgb(big).getpixel((1, 0)) == (255, 255, 255)
    f = Image.fromarray(np.array([[np.nan, 200.0]], np.float32))
    assert to_rgb(f).getpixel((1, 0)) == (200, 200, 200) and to_rgb(f).getpixel((0, 0)) == (0, 0, 0)
    be = Image.frombytes("I;16B", (1, 1), b"\xff\xff")
    assert to_rgb(be).getpixel((0, 0)) == (255, 255, 255)


def test_unsafe_tar_member_is_not_extracted(tmp_path, files):
    # One rule with the service (sp2ot_engine.io.archive): a member escaping the archive rejects it.
    for unsafe in ("../evil.png", "a/../../evil2.png"):
        arc = _write_tar(tmp_path / "evil.tar", {"ok.png": files["a_rgb.png"]}, "w", [(unsafe, files["a_rgb.png"])])
        with pytest.raises(ValueError, match="escape") as e:
            scan_images(arc)
        assert unsafe in str(e.value)
    assert not (tmp_path.parent / "evil.png").exists() and not (tmp_path.parent / "evil2.png").exists()


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_archives_with_unsafe_names_or_links_are_rejected(tmp_path, files, kind):
    write = {"zip": lambda p, **kw: _write_zip(p, files, **kw), "tar": lambda p, **kw: _write_tar(p, files, "w", **kw),
             "tar.gz": lambda p, **kw: _write_tar(p, files, "w:gz", **kw)}[kind]
    for i, name in enumerate(["../evil.png", "/abs.png"]):
        with pytest.raises(ValueError, match="escape"):
            scan_images(write(tmp_path / f"unsafe{i}.{kind}", extra=[(name, files["a_rgb.png"])]))
    with pytest.raises(ValueError, match="symbolic link"):
        scan_images(write(tmp_path / f"link.{kind}", link=True))


def test_folder_and_archive_entries_agree(sources):
    cols = {k: scan_images(v) for k, v in sources.items()}
    ref = cols["folder"]
    for k, col in cols.items():
        assert col.names == ref.names, k
        for i in range(len(ref)):
            assert col.read_bytes(i) == ref.read_bytes(i), (k, ref.names[i])


def test_bad_paths_raise_value_error(tmp_path, files):
    with pytest.raises(ValueError, match="does not exist"):
        scan_images(tmp_path / "nope")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="not a folder or an archive"):
        scan_images(txt)
    img = tmp_path / "single.png"
    img.write_bytes(files["a_rgb.png"])
    with pytest.raises(ValueError, match="not a folder or an archive"):
        scan_images(img)
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 50)
    with pytest.raises(ValueError, match="corrupt zip"):
        scan_images(bad_zip)
    good_tgz = _write_tar(tmp_path / "good.tgz", {"a.png": files["a_rgb.png"]} | {f"x{i}.jpg": files["truncated.jpg"] for i in range(20)}, "w:gz")
    data = good_tgz.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        scan_images(cut)
    notar = tmp_path / "plain.gz"
    import gzip

    notar.write_bytes(gzip.compress(b"just some text, not a tar" * 40))
    with pytest.raises(ValueError, match="corrupt|not"):
        scan_images(notar)


def test_corrupt_zip_member_is_skipped_not_fatal(tmp_path, files):
    arc = _write_zip(tmp_path / "crc.zip", {"a.png": files["a_rgb.png"], "b.png": files["b_gray.png"]})
    raw = bytearray(arc.read_bytes())
    # flip a byte inside b.png's compressed data -> CRC / inflate error when reading that member only
    with zipfile.ZipFile(arc) as z:
        info = z.getinfo("b.png")
    pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    raw[pos] ^= 0xFF
    arc.write_bytes(bytes(raw))
    col = scan_images(arc)
    assert col.names == ["a.png"]
    assert dict(col.skipped)["b.png"]


def test_pickle_and_reopen(sources):
    for kind in ("zip", "tar", "tar.gz"):
        col = scan_images(sources[kind])
        col.load(0)  # opens a handle in this process
        clone = pickle.loads(pickle.dumps(col))
        assert clone.names == col.names
        assert np.array_equal(np.asarray(clone.load(3)), np.asarray(col.load(3)))
        clone.close()
        col.close()


def test_spool_file_removed_on_close(sources, tmp_path):
    col = scan_images(sources["tar.gz"], cache_dir=tmp_path)
    spools = list(tmp_path.glob("sp2ot-images-*.tar"))
    assert len(spools) == 1
    clone = pickle.loads(pickle.dumps(col))
    clone.close()  # a copy never deletes the creator's spool
    assert spools[0].exists()
    col.close()
    assert not spools[0].exists()


def test_load_error_after_file_removed(tmp_path, files):
    _write_folder(tmp_path / "d", {"a.png": files["a_rgb.png"]})
    col = scan_images(tmp_path / "d")
    (tmp_path / "d" / "a.png").unlink()
    with pytest.raises(ImageLoadError, match="a.png"):
        col.load(0)


def test_jpeg_draft_keeps_min_side():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 800, 3), dtype=np.uint8))
    data = _encode(im, "JPEG")
    small = decode_image(data, min_side=100)
    assert min(small.size) >= 100 and small.size[0] < 800
    assert decode_image(data).size == (800, 600)


def test_transforms_and_two_views():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    t = eval_transform(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = t(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    assert t.decode_min_side == round(64 * 256 / 224)
    assert torch.equal(t(img), x)  # deterministic
    tt = train_transform(64)
    views = TwoViews(tt)
    a, b = views(img)
    assert a.shape == b.shape == (3, 64, 64)
    assert not torch.equal(a, b)
    rrc = train_transform(48, crop="random_resized_crop")
    assert rrc(img).shape == (3, 48, 48)
    from torchvision.transforms import v2

    jittered = []  # colour jitter runs on the PIL image (the tensor hue shift is ~5x slower)
    for op in tt.transforms:
        if isinstance(op, v2.RandomApply):
            real = op.transforms[0]
            op.transforms[0] = lambda x, real=real: jittered.append(type(x)) or real(x)
            op.p = 1.0
    assert tt(img).shape == (3, 64, 64) and jittered == [Image.Image]
    with pytest.raises(ValueError):
        eval_transform(64, resize=32)
    with pytest.raises(ValueError):
        train_transform(64, crop="nope")


@pytest.mark.parametrize("wh", [(28, 28), (40, 30), (30, 70), (300, 200)])
def test_fast_eval_transform_matches_torchvision(wh):
    from torchvision.transforms import InterpolationMode, v2

    from PIL import ImageFilter

    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    img = noise.filter(ImageFilter.GaussianBlur(1.5))  # image-like; pure noise overshoots and clips
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = v2.Compose([v2.Resize(73, interpolation=InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(64),
                      v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ours = eval_transform(64, mean, std)
    a, b = ref(img), ours(img)
    assert a.shape == b.shape == (3, 64, 64)
    level = 1.0 / 255 / min(std)  # one grey level, normalised
    assert (a - b).abs().max() <= 2 * level + 1e-5  # Pillow's intermediate rounding differs
    assert (a - b).abs().mean() < 0.2 * level
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    from sp2ot_engine.transforms import ToNormalizedTensor

    ref_n = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(u8))
    assert torch.allclose(ToNormalizedTensor(mean, std)(u8), ref_n, atol=1e-5)


def test_dataloader_workers_over_tar_in_order(sources):
    col = scan_images(sources["tar"])
    ds = ImageDataset(col, eval_transform(32))
    serial = [ds[i][0] for i in range(len(ds))]
    loader = make_loader(ds, batch_size=4, shuffle=False, num_workers=2, seed=0)
    xs, idx = [], []
    for x, i in loader:
        xs.append(x)
        idx.append(i)
    idx = torch.cat(idx)
    assert idx.tolist() == list(range(len(col)))
    assert torch.allclose(torch.cat(xs), torch.stack(serial))
    assert loader.persistent_workers and not loader.pin_memory
    # seeded shuffling is reproducible
    order = lambda: torch.cat([i for _, i in make_loader(ds, 5, shuffle=True, seed=7)]).tolist()  # noqa: E731
    first = order()
    assert first == order() and sorted(first) == list(range(len(col)))


def test_in_process_loading_is_single_threaded_and_restores(sources):
    from sp2ot_engine.io.loader import single_threaded

    col = scan_images(sources["folder"])
    seen = []

    def spy(img):
        seen.append(torch.get_num_threads())
        return torch.zeros(1)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds = ImageDataset(col, spy)
        ds[0]
        list(make_loader(ds, batch_size=4))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_dataset_with_two_views_collates(sources):
    col = scan_images(sources["zip"])
    ds = ImageDataset(col, TwoViews(train_transform(32)))
    (a, b), idx = next(iter(make_loader(ds, batch_size=3, num_workers=0)))
    assert a.shape == b.shape == (3, 3, 32, 32)
    assert idx.tolist() == [0, 1, 2]
