"""--image-encoder-int8: an int8 image encoder beside the fp32 one, picked by devices when asked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from flora.edge.bundle import IMAGE_ENCODER, IMAGE_ENCODER_INT8, BundleError, load_bundle
from flora.edge.features import FeatureCache, ImageEncoder, feature_key, image_features
from flora.edge.predict import PredictError, Predictor, choose_adapter
from flora.edge.preprocess import preprocess_batch
from flora.export.pipeline import ExportError

from .helpers import export_tiny


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("int8") / "b", image_encoder_int8=True)


def digit_images(tmp_path, n: int = 24):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_int8_encoder_is_in_the_bundle_quantized_and_verified(int8_bundle):
    m = int8_bundle.manifest
    assert IMAGE_ENCODER_INT8 in m.files and m.onnx["image_encoder_int8"]["weight_type"] == "int8"
    graph = onnx.load(str(int8_bundle.path(IMAGE_ENCODER_INT8))).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops and "ConvInteger" not in ops
    assert m.onnx["image_encoder_int8"]["int8_matmuls"] == sum(n.op_type == "MatMulInteger" for n in graph.node) > 0
    int8_bytes = sum(t.ByteSize() for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert int8_bytes > 0
    with open(int8_bundle.path(IMAGE_ENCODER_INT8), "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    try:
        with pytest.raises(BundleError, match=r"image_encoder_int8\.onnx does not match its manifest sha256"):
            load_bundle(int8_bundle.root, backends=())
    finally:
        with open(int8_bundle.path(IMAGE_ENCODER_INT8), "r+b") as fh:
            fh.seek(200)
            fh.write(byte)


def test_int8_features_are_close_to_fp32_on_real_images(int8_bundle, tmp_path):
    paths = digit_images(tmp_path)
    pixels = preprocess_batch(paths, int8_bundle.manifest.preprocess)
    fp32 = ImageEncoder(int8_bundle)(pixels)
    int8 = ImageEncoder(int8_bundle, int8=True)(pixels)
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cos.min() > 0.98 and cos.mean() > 0.99, (cos.mean(), cos.min())
    assert np.abs(fp32 - int8).max() > 0  # really another encoder


def test_int8_features_are_cached_apart_from_fp32(int8_bundle, tmp_path):
    paths = digit_images(tmp_path, n=4)
    cache = FeatureCache(tmp_path / "features.sqlite")
    fp32 = image_features(int8_bundle, paths, cache)
    int8 = image_features(int8_bundle, paths, cache, int8=True)
    model_id = int8_bundle.manifest.model_id
    assert cache.count(model_id) == 4 and cache.count(feature_key(model_id, int8=True)) == 4
    assert not np.array_equal(fp32, int8)
    np.testing.assert_array_equal(image_features(int8_bundle, paths, cache, int8=True), int8)
    assert cache.prune(model_id) == 0  # an agent's pruning keeps both
    cache.close()


def test_predict_with_int8_and_clear_errors(int8_bundle, tiny_text_bundle, tiny_vision_bundle, tmp_path):
    paths = digit_images(tmp_path, n=6)
    tensors = choose_adapter(int8_bundle).tensors
    fp32 = np.concatenate([x for _, x in Predictor(int8_bundle, tensors).predict_paths(paths)])
    int8 = np.concatenate([x for _, x in Predictor(int8_bundle, tensors, int8=True).predict_paths(paths)])
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()
    with pytest.raises(BundleError, match=r"no int8 image encoder.*--image-encoder-int8"):
        Predictor(tiny_text_bundle, choose_adapter(tiny_text_bundle).tensors, int8=True)
    with pytest.raises(PredictError, match="text-mode bundles"):
        Predictor(tiny_vision_bundle, choose_adapter(tiny_vision_bundle).tensors, int8=True)
    with pytest.raises(ExportError, match="--image-encoder-int8 quantizes the frozen image encoder"):
        export_tiny(tmp_path / "v", tower="vision", image_encoder_int8=True)
    from flora.export.shared_data import used_ranges

    fp32_bytes = int8_bundle.path(IMAGE_ENCODER).stat().st_size + sum(
        n for _, n in used_ranges(int8_bundle.root, [IMAGE_ENCODER]))  # its weights live in weights.data
    assert int8_bundle.path(IMAGE_ENCODER_INT8).stat().st_size < 0.6 * fp32_bytes
