"""The model zoo: real architectures from `transformers` and `monai`, built from small random
configs (never downloaded), with input draws that each family accepts.

Every entry is a :class:`ZooModel`: ``build()`` returns a fresh model in eval mode (seeded, so
two builds are equal), ``draw(seed, batch=..., length=...)`` returns keyword inputs (a dict, as
a tokenizer or image processor would give) with valid token ids / pixel values / features.
Families: ``text`` (token ids + attention mask), ``seq2seq`` (plus decoder ids), ``image``
(``pixel_values``, N x 3 x H x W), ``audio`` (``input_features``, N x mel x frames), ``volume``
(N x 1 x D x H x W, MONAI 3-D), ``image2d`` (MONAI 2-D).

Tests import this as ``zoo_models`` (tests/zoo is on sys.path under pytest's rootdir layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

VOCAB = 99
HIDDEN = 32
HEADS = 4
LAYERS = 2
INTER = 37


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build it and how to draw inputs it accepts."""

    name: str
    family: str
    make: Callable[[], nn.Module]
    image_size: int = 32
    channels: int = 3
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().eval()

    def draw(self, seed: int, *, batch: int = 2, length: int = 8,
             size: int | None = None) -> dict[str, torch.Tensor]:
        """Keyword inputs for one draw (fresh random values, valid ids, a ragged mask)."""
        g = torch.Generator().manual_seed(seed)
        if self.family in ("text", "seq2seq"):
            ids = torch.randint(0, VOCAB, (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.long)
            if batch > 1 and length > 2:
                mask[-1, length - length // 3:] = 0  # one padded sequence
            out = {"input_ids": ids, "attention_mask": mask}
            if self.family == "seq2seq":
                out["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, max(1, length // 2)),
                                                         generator=g)
            return out
        if self.family == "audio":
            frames = self.extra["frames"]
            return {"input_features": torch.randn(batch, self.extra["mel"], frames, generator=g)}
        s = size or self.image_size
        arg = self.extra.get("arg", "x")
        if self.family == "volume":
            return {arg: torch.randn(batch, self.channels, s, s, s, generator=g)}
        if self.family == "image2d":
            return {arg: torch.randn(batch, self.channels, s, s, generator=g)}
        return {"pixel_values": torch.randn(batch, self.channels, s, s, generator=g)}


def _text_cfg(**kw: Any) -> dict[str, Any]:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=64)
    base.update(kw)
    return base


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(**_text_cfg(type_vocab_size=2)))


def _bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(**_text_cfg(num_labels=3)))


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel
    return RobertaModel(RobertaConfig(**_text_cfg(max_position_embeddings=72, pad_token_id=1)))


def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel
    return DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                            n_heads=HEADS, hidden_dim=INTER,
                                            max_position_embeddings=64))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, n_positions=64, use_cache=False,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def _t5_cfg() -> Any:
    from transformers import T5Config
    return T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTER,
                    num_layers=LAYERS, num_heads=HEADS, use_cache=False,
                    decoder_start_token_id=0)


def _t5_encoder() -> nn.Module:
    from transformers import T5EncoderModel
    return T5EncoderModel(_t5_cfg())


def _t5() -> nn.Module:
    from transformers import T5ForConditionalGeneration
    return T5ForConditionalGeneration(_t5_cfg())


def _decoder_cfg(cls_name: str, **kw: Any) -> Any:
    import transformers
    cfg = getattr(transformers, cls_name)
    return cfg(**_text_cfg(num_key_value_heads=2, use_cache=False, **kw))


def _llama() -> nn.Module:
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM(_decoder_cfg("LlamaConfig"))


def _mistral() -> nn.Module:
    from transformers import MistralForCausalLM
    return MistralForCausalLM(_decoder_cfg("MistralConfig", sliding_window=None))


def _qwen2() -> nn.Module:
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM(_decoder_cfg("Qwen2Config"))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER, num_labels=5))


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
        num_labels=5, image_size=32))


def _resnet_hf() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
        layer_type="basic", num_labels=5))


def _mobilenet_v1() -> nn.Module:
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification
    return MobileNetV1ForImageClassification(MobileNetV1Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, min_depth=4, tf_padding=True,
        num_labels=5))


def _mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, depth_divisible_by=4,
        min_depth=4, tf_padding=True, num_labels=5))


def _whisper_encoder() -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=HIDDEN, encoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_layers=1,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
                        decoder_ffn_dim=INTER, max_source_positions=16,
                        max_target_positions=16, pad_token_id=VOCAB - 1,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                        decoder_start_token_id=VOCAB - 2)
    return WhisperEncoder(cfg)


def _monai_densenet(dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from monai.networks.nets import DenseNet121
        return DenseNet121(spatial_dims=dims, in_channels=1, out_channels=3,
                           init_features=8, growth_rate=4)
    return make


def _monai_resnet(dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from monai.networks.nets import ResNet
        return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 8, 16, 16],
                      spatial_dims=dims, n_input_channels=1, num_classes=3)
    return make


def _monai_efficientnet(dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from monai.networks.nets import EfficientNetBN
        return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=dims,
                              in_channels=1, num_classes=3)
    return make


ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("bert", "text", _bert),
    ZooModel("bert_cls", "text", _bert_cls),
    ZooModel("roberta", "text", _roberta),
    ZooModel("distilbert", "text", _distilbert),
    ZooModel("gpt2", "text", _gpt2),
    ZooModel("t5_encoder", "text", _t5_encoder),
    ZooModel("t5", "seq2seq", _t5),
    ZooModel("llama", "text", _llama),
    ZooModel("mistral", "text", _mistral),
    ZooModel("qwen2", "text", _qwen2),
    ZooModel("vit", "image", _vit, image_size=32),
    ZooModel("convnext", "image", _convnext, image_size=32),
    ZooModel("resnet_hf", "image", _resnet_hf, image_size=32),
    ZooModel("mobilenet_v1", "image", _mobilenet_v1, image_size=32),
    ZooModel("mobilenet_v2", "image", _mobilenet_v2, image_size=32),
    ZooModel("whisper_encoder", "audio", _whisper_encoder, extra={"mel": 8, "frames": 32}),
    ZooModel("monai_densenet3d", "volume", _monai_densenet(3), image_size=32, channels=1),
    ZooModel("monai_resnet3d", "volume", _monai_resnet(3), image_size=32, channels=1),
    ZooModel("monai_efficientnet3d", "volume", _monai_efficientnet(3), image_size=32,
             channels=1, extra={"arg": "inputs"}),
    ZooModel("monai_densenet2d", "image2d", _monai_densenet(2), image_size=32, channels=1),
]}

TEXT = [n for n, m in ZOO.items() if m.family in ("text", "seq2seq")]
IMAGE = [n for n, m in ZOO.items() if m.family in ("image", "image2d", "volume")]


def logits(out: Any) -> torch.Tensor:
    """The main tensor of a model output (a ModelOutput's first field, or the tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, tuple | list):
        return logits(out[0])
    if hasattr(out, "to_tuple"):  # a ModelOutput that is not a dict subclass
        return logits(out.to_tuple())
    raise TypeError(f"no tensor in {type(out).__name__}")


class Logits(nn.Module):
    """A zoo model called with positional inputs, as ``torch.onnx.export`` passes them:
    ``logits(model(**dict(zip(names, args))))``, the model's main output tensor."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return logits(self.model(**dict(zip(self.names, args, strict=True))))


def dynamic_dims(name: str) -> dict[int, str]:
    """The input axes an export may leave dynamic: the batch, and the sequence length of text
    (an image's size and Whisper's frame count are fixed by the model; a seq2seq model's two
    lengths differ, so only its batch)."""
    return {0: "batch", 1: "length"} if ZOO[name].family == "text" else {0: "batch"}


def export_onnx(name: str, exporter: str = "legacy", dynamic: bool = False, *,
                opset: int | None = None) -> tuple[Any, list[str]]:
    """Zoo model ``name`` (``build()``, ``use_cache`` off) exported to ONNX at ``draw(0)``'s
    shapes, wrapped in :class:`Logits`; returns the ``onnx.ModelProto`` and the input names.

    ``exporter``: ``"legacy"`` (``torch.onnx.export(dynamo=False)``; ``dynamic`` gives
    ``dynamic_axes`` over :func:`dynamic_dims`) or ``"dynamo"`` (``dynamo=True``; ``dynamic``
    gives ``dynamic_shapes`` with ``torch.export.Dim`` sizes batch in [1, 48], length in
    [2, 48]). ``opset`` is passed through when given. Warnings of the exporters are silenced.
    """
    import io
    import warnings

    import onnx

    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter is 'legacy' or 'dynamo', not {exporter!r}")
    zoo = ZOO[name]
    model = zoo.build()
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    draw = zoo.draw(0)
    names = list(draw)
    wrapped, args = Logits(model, names), tuple(draw.values())
    extra: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = None
            if dynamic:
                dims = {i: torch.export.Dim(label, min=1 if i == 0 else 2, max=48)
                        for i, label in dynamic_dims(name).items()}
                shapes = (tuple(dims for _ in names),)
            program = torch.onnx.export(wrapped, args, dynamo=True, dynamic_shapes=shapes,
                                        input_names=names, verbose=False, **extra)
            assert program is not None
            return program.model_proto, names
        buf = io.BytesIO()
        torch.onnx.export(wrapped, args, buf, dynamo=False, input_names=names,
                          dynamic_axes=dict.fromkeys(names, dynamic_dims(name)) if dynamic
                          else None, **extra)
        return onnx.load_from_string(buf.getvalue()), names


FOREIGN_DIR = Path(__file__).resolve().parent / "foreign"

Draw = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def foreign_models() -> dict[str, Path]:
    """ONNX files from exporters other than torch (tf2onnx, skl2onnx) and hand-built layouts,
    by name (file stem); see ``tests/zoo/foreign/README.md``. Each has a ``.npz`` beside it."""
    return {p.stem: p for p in sorted(FOREIGN_DIR.glob("*.onnx"))}


def foreign_draws(name: str) -> list[Draw]:
    """The fixed draws saved with foreign model ``name``: a list of (inputs, outputs) dicts keyed
    by the ONNX input / output names; outputs are the generating framework's own (float32,
    int64 labels), not onnxruntime's. Stored as ``in{k}__{name}`` / ``out{k}__{name}``."""
    draws: dict[int, Draw] = {}
    with np.load(FOREIGN_DIR / f"{name}.npz", allow_pickle=False) as data:
        for key in data.files:
            head, _, tensor = key.partition("__")
            kind, k = ("in", head[2:]) if head.startswith("in") else ("out", head[3:])
            ins, outs = draws.setdefault(int(k), ({}, {}))
            (ins if kind == "in" else outs)[tensor] = data[key]
    return [draws[k] for k in sorted(draws)]
