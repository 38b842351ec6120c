
import pytest
import torch

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.heatmaps import gaussian_1d, heatmap_squared_error, soft_argmax, spatial_softmax
from LandmarkDetectionLib.losses import landmark_loss
from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig, load_model
from LandmarkDetectionLib.modelheader import read_header
from LandmarkDetectionLib.preprocess import InputGeometry


def test_soft_argmax_of_a_peaked_volume_is_its_peak():
    logits = torch.full((1, 2, 6, 7, 8), -1e4)
    logits[0, 0, 4, 2, 5] = 0.0  # k=4, j=2, i=5
    logits[0, 1, 1, 6, 0] = 0.0
    assert torch.allclose(soft_argmax(spatial_softmax(logits)), torch.tensor([[[5.0, 2.0, 4.0], [0.0, 6.0, 1.0]]]))


def test_soft_argmax_is_sub_voxel():
    logits = torch.full((1, 1, 4, 4, 4), -1e4)
    logits[0, 0, 1, 1, 1] = logits[0, 0, 1, 1, 2] = 0.0
    assert torch.allclose(soft_argmax(spatial_softmax(logits))[0, 0], torch.tensor([1.5, 1.0, 1.0]))


def test_separable_heatmap_error_equals_the_dense_computation():
    torch.manual_seed(0)
    probs = spatial_softmax(torch.randn(2, 3, 9, 10, 11))
    target = torch.tensor([[[3.3, 4.1, 2.0], [5.0, 5.0, 5.0], [0.2, 9.0, 7.6]]] * 2)
    sigma = (1.5, 2.0, 1.2)
    gi, gj, gk = (gaussian_1d(target[..., a], sigma[a], n) for a, n in zip(range(3), (11, 10, 9)))
    dense = torch.einsum("bkw,bkh,bkd->bkdhw", gi, gj, gk)
    expected = ((probs - dense) ** 2).sum(dim=(2, 3, 4)) / (dense ** 2).sum(dim=(2, 3, 4))
    assert torch.allclose(heatmap_squared_error(probs, target, sigma), expected, rtol=1e-5)
    assert torch.allclose(heatmap_squared_error(dense, target, sigma), torch.zeros(2, 3), atol=1e-5)
    # A target outside the volume counts as the nearest border voxel (no 0/0 when its Gaussian underflows).
    outside = target.clone()
    outside[..., 0] = torch.tensor([-40.0, 5.0, 60.0])
    clamped = outside.clone()
    clamped[..., 0] = torch.tensor([0.0, 5.0, 10.0])
    assert torch.allclose(heatmap_squared_error(probs, outside, sigma), heatmap_squared_error(probs, clamped, sigma))


def test_mixed_loss_ignores_missing_landmarks():
    probs = spatial_softmax(torch.randn(1, 2, 5, 5, 5))
    pred = soft_argmax(probs)
    target = pred.detach().clone()
    target[0, 1] += 10.0
    mask = torch.tensor([[True, False]])
    coordinate_only = landmark_loss("mse", probs, pred, target, mask, (1.0, 1.0, 1.0), 2.0)
    assert float(coordinate_only) == pytest.approx(0.0, abs=1e-9)
    assert float(landmark_loss("mixed", probs, pred, target, mask, (1.0, 1.0, 1.0), 2.0)) > 0


def tiny_model(schema, **network):
    config = ModelConfig("highres3dnet", {"channels": [4, 4, 8], "blocks_per_stage": 1, **network},
                         InputGeometry((12, 10, 8), (4.0, 4.0, 5.0)), 6.0)
    torch.manual_seed(0)
    return LandmarkModel.create(config, schema)


def test_highres3dnet_shapes_and_chunked_prediction(afids32):
    model = tiny_model(afids32).network.eval()
    x = torch.randn(2, 1, 8, 10, 12)
    logits = model(x)
    assert logits.shape == (2, 32, 8, 10, 12)
    full = soft_argmax(spatial_softmax(logits))
    assert torch.allclose(model.predict_indices(x, chunk=5), full, atol=1e-5)
    assert dict(model.named_modules())["blocks.2.conv2"] is not None  # the paper's Grad-CAM layer


def test_model_file_round_trip_without_pickle(tmp_path, afids32):
    model = tiny_model(afids32)
    model.training, model.metrics = {"cases": 3}, {"validation": {"mre_mm": 1.5}}
    path = tmp_path / "m.safetensors"
    model.save(path)
    header = read_header(path)
    assert header.config["geometry"]["spacing"] == [4.0, 4.0, 5.0] and header.schema["name"] == "afids-32"
    loaded = load_model(path)
    assert loaded.schema.names == afids32.names and loaded.metrics["validation"]["mre_mm"] == 1.5
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])
    assert b"pickle" not in path.read_bytes()[:4096]


def test_truncated_and_foreign_model_files_are_refused(tmp_path, afids32):
    path = tmp_path / "m.safetensors"
    tiny_model(afids32).save(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LandmarkError, match="truncated"):
        load_model(truncated)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(LandmarkError, match="not a LandmarkDetection model"):
        load_model(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(LandmarkError, match="not a readable model file"):
        load_model(pickled)


def test_model_refuses_another_schema(afids32, brain88):
    with pytest.raises(LandmarkError, match="model detects schema 'afids-32'"):
        tiny_model(afids32).check_schema(brain88, "data.csv")


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_true_or_false_network_option_holds_a_boolean(value, afids32):
    """locnet's input_statistics is true or false in a model file; anything else is damaged metadata."""
    from LandmarkDetectionLib.modelfile import ModelConfig, check_config

    geometry = InputGeometry((24, 28, 24), (3.0, 3.0, 3.0))
    check_config(ModelConfig("locnet", {"input_statistics": True}, geometry))
    with pytest.raises(ValueError, match=r"input_statistics = .* \(expected true or false\)"):
        check_config(ModelConfig("locnet", {"input_statistics": value}, geometry))
