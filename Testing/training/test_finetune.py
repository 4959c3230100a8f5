"""Fine-tuning from a trained package: organ prompts matched by name, one-slice encoder widened."""

from __future__ import annotations

import pytest
import torch

from MedDiffSegLib.errors import ModelError
from MedDiffSegLib.methods.base import _METHODS, _import_builtin_methods, build_method
from MedDiffSegLib.preprocessing import PreprocessSpec
from MedDiffSegLib.registry import Organ, save_package

from tinymodels import ANATOMY, SCT, TINY_ORGANS, make_tiny_package

KIDNEY = Organ("kidney_left", "Left kidney", (185, 102, 83), ANATOMY, {"code": "18639004", "scheme": SCT,
                                                                       "meaning": "Left kidney"})


def _model(organs: int, channels: int = 1, seed: int = 1):
    _import_builtin_methods()
    torch.manual_seed(seed)
    cfg = _METHODS["guided"].tiny_config(organs)
    cfg["image_channels"] = channels
    return build_method("guided", cfg)


def test_organs_are_matched_by_name_and_the_stem_is_widened(tmp_path):
    src = make_tiny_package(tmp_path / "src")  # organs: liver, spleen; one slice
    theirs = src.load_method()
    mine = _model(2, channels=3)
    fresh_kidney = mine.denoiser.unet.class_embedding.weight[1].clone()
    info = mine.load_pretrained(src.path, organs=["spleen", "kidney_left"])
    emb = mine.denoiser.unet.class_embedding.weight
    torch.testing.assert_close(emb[0], theirs.denoiser.unet.class_embedding.weight[1])  # spleen row
    torch.testing.assert_close(emb[1], fresh_kidney)  # unknown organ keeps its initialisation
    stem, src_stem = mine.image_encoder.stem[0].weight, theirs.image_encoder.stem[0].weight
    torch.testing.assert_close(stem[:, 1], src_stem[:, 0])
    assert not stem[:, 0].any() and not stem[:, 2].any()
    torch.testing.assert_close(mine.mask_autoencoder.decoder.head.weight, theirs.mask_autoencoder.decoder.head.weight)
    assert info["organs_matched"] == ["spleen"] and info["organs_new"] == ["kidney_left"]
    assert info["package"] == "tiny-guided"


def test_a_widened_model_starts_exactly_as_the_one_slice_model(tmp_path):
    src = make_tiny_package(tmp_path / "src")
    theirs = src.load_method()
    mine = _model(2, channels=3)
    mine.load_pretrained(src.path, organs=["liver", "spleen"])
    mine.eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    x3 = torch.cat([torch.rand(2, 1, 32, 32), x, torch.rand(2, 1, 32, 32)], 1)  # neighbours: anything
    ids = torch.tensor([0, 1])
    a = theirs.sample(theirs.condition(x), ids, 1, 1, torch.Generator().manual_seed(0))
    b = mine.sample(mine.condition(x3), ids, 1, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_another_architecture_is_refused(tmp_path):
    src = make_tiny_package(tmp_path / "src")
    _import_builtin_methods()
    cfg = _METHODS["guided"].tiny_config(2)
    cfg["unet_channels"] = [8, 8]
    with pytest.raises(ModelError, match="same architecture|shape"):
        build_method("guided", cfg).load_pretrained(src.path, organs=["liver", "spleen"])


def test_another_method_is_refused(tmp_path):
    src = make_tiny_package(tmp_path / "src", method="sdseg")
    with pytest.raises(ModelError, match="not 'guided'"):
        _model(2).load_pretrained(src.path, organs=["liver", "spleen"])


def test_a_tampered_package_is_refused(tmp_path):
    src = make_tiny_package(tmp_path / "src")
    w = src.path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="cannot start from"):
        _model(2).load_pretrained(src.path, organs=["liver", "spleen"])


def test_fp16_storage_halves_the_weights_and_loads_as_float32(tmp_path):
    from MedDiffSegLib.registry.package import ModelPackage, convert_weights

    src = make_tiny_package(tmp_path / "src")
    half = convert_weights(src.path, tmp_path / "half", "float16")
    assert half.weights_path.stat().st_size < 0.6 * src.weights_path.stat().st_size
    half.verify()
    m = ModelPackage.from_folder(half.path).load_method()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    ref = src.load_method()
    for (k, a), (_, b) in zip(ref.state_dict().items(), m.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4, msg=k)
    assert half.provenance["weights_storage"]["converted_from_sha256"] == src.weights_sha256
    with pytest.raises(ModelError, match="already exists"):
        convert_weights(src.path, tmp_path / "half")
