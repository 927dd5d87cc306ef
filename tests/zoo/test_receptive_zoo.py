"""Receptive fields of zoo CNNs: published values, and the layers the walk must pass through."""

from __future__ import annotations

import pytest
import torch
import zoo_models

import fc2conv


def test_mobilenet_v1_tf_padding_gives_the_published_field() -> None:
    """MobileNetV1 (TF "same" padding: F.pad before each conv): 315 px, stride 32, effective
    padding 126 (Araujo et al., "Computing receptive fields of CNNs", Distill 2019). The
    padding is asymmetric (0 low, 1 high before stride-2 convs on even maps), so it differs
    from the symmetric (315 - 1) / 2 = 157."""
    model = zoo_models.ZOO["mobilenet_v1"].build(0).eval()
    dense = fc2conv.convolutionalize(model, (3, 32, 32), verify=False)  # checked elsewhere
    rf = fc2conv.receptive_field(dense, (3, 32, 32))
    assert (rf.size, rf.stride, rf.padding) == ((315, 315), (32, 32), (126, 126))
    assert not rf.exact and "mobilenet_v1.conv_stem" in str(rf.reason)


def test_convnext_field_passes_the_channels_last_stretch() -> None:
    """ConvNeXt permutes to NHWC around LayerNorm + Linear: patchify 4/4, dwconv 7 at jump 4,
    downsample 2/2, dwconv 7 at jump 8, the dense global pool 4x4 at jump 8."""
    model = zoo_models.ZOO["convnext"].build(0).eval()
    dense = fc2conv.convolutionalize(model, (3, 32, 32), verify=False)  # checked elsewhere
    rf = fc2conv.receptive_field(dense, (3, 32, 32))
    size = 4 + 6 * 4 + 1 * 4 + 6 * 8 + 3 * 8
    assert (rf.size, rf.stride, rf.padding) == ((size, size), (8, 8), (36, 36))
    x = torch.randn(1, 3, 64, 48)
    assert tuple(zoo_models.logits(dense(x)).shape[2:]) == \
        fc2conv.receptive_field(dense, (3, 64, 48)).output_size


def test_efficientnet_squeeze_excitation_is_named() -> None:
    model = zoo_models.ZOO["monai_efficientnet3d"].build(0).eval()
    with pytest.raises(fc2conv.Fc2ConvError, match="'_blocks.0.0'.*squeeze-and-excitation"):
        fc2conv.receptive_field(model, (1, 32, 32, 32))


def test_swiftformer_refusal_names_the_head_join_not_the_input() -> None:
    """SwiftFormer averages two heads, ``(head(x) + dist_head(x)) / 2``, after
    ``x.flatten(2).mean(-1)`` and returns a ModelOutput: the refusal names the join."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "SwiftFormerForImageClassification"):
        pytest.skip("this transformers has no SwiftFormer")
    cfg = transformers.SwiftFormerConfig(num_channels=3, depths=[1, 1, 1, 1],
                                         embed_dims=[8, 8, 16, 16], mlp_ratio=2, num_labels=5)
    torch.manual_seed(0)
    model = transformers.SwiftFormerForImageClassification(cfg).eval()
    with pytest.raises(fc2conv.Fc2ConvError) as err:
        fc2conv.convolutionalize(model, (3, 32, 32))
    msg = str(err.value)
    assert "'head' and 'dist_head'" in msg and "pixel_values" not in msg
