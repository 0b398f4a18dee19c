import torch

from zoo.backbones import ConvNet
from zoo.cam import class_activation_maps, colorize, normalize_maps, overlay_maps
from zoo.classification.classifier import ImageClassifier


def test_cam_spatial_mean_equals_logit_minus_bias():
    # Zhou et al. 2016: for GAP + linear, mean_xy M_c = y_c - b_c, for every class of every image.
    torch.manual_seed(0)
    model = ImageClassifier(backbone=ConvNet(in_chans=1, widths=[8, 16], num_pools=1), num_classes=5).eval()
    torch.nn.init.normal_(model.head.fc.bias)
    images = torch.rand(3, 1, 16, 16)
    logits, cams = model.class_activation_maps(images)
    assert cams.shape == (3, 5, 8, 8)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits - model.head.fc.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(images))


def test_cam_is_weighted_sum_of_feature_maps():
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0, 0, 0] = 1.0  # channel 0 fires top-left
    features[0, 1, 1, 1] = 2.0  # channel 1 fires bottom-right
    weight = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    cams = class_activation_maps(features, weight)
    torch.testing.assert_close(cams[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(cams[0, 1], torch.tensor([[0.5, 0.0], [0.0, -2.0]]))


def test_normalize_and_colorize():
    maps = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    torch.testing.assert_close(normalize_maps(maps), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    rgb = colorize(torch.tensor([[[0.0, 1.0]]]))  # (1, 3, 1, 2)
    assert rgb[0, :, 0, 0].argmax() == 2 and rgb[0, :, 0, 1].argmax() == 0  # low = blue, high = red


def test_overlay_shape_and_range():
    out = overlay_maps(torch.rand(4, 1, 32, 32), torch.randn(4, 8, 8))
    assert out.shape == (4, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
