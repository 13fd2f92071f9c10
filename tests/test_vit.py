"""vit.py against transformers (test-only reference): CLIP / SigLIP / BLIP-2 vision towers in every
checkpoint layout, position-embedding interpolation, strict loading, save_pretrained, and the
image preprocessing on real photos."""
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skdata

import tiny
from weights.checkpoint import CheckpointError
from image_processor import ImageProcessor, pad_to_square
from vit import ViT, ViTConfig

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
REF = {"clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
       "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel)}


def reference(family, seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = REF[family]
    return model_cls(config_cls(**TINY)).eval()


def hidden_states(ref, x, **kw):
    with torch.no_grad():
        return ref(pixel_values=x, output_hidden_states=True, **kw).hidden_states


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vision")
    reference("clip").save_pretrained(folder)
    return folder


def images():
    """Real photos, square and not (512x512, 451x300, 600x400), plus RGBA and greyscale copies."""
    photos = [Image.fromarray(getattr(skdata, n)()) for n in ("astronaut", "chelsea", "coffee")]
    rgba = np.array(photos[1].convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)
    return photos + [Image.fromarray(rgba), photos[2].convert("L")]


# ----------------------------------------------------------------- model parity

@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_every_select_layer_matches_transformers(family, tmp_path):
    ref = reference(family)
    ref.save_pretrained(tmp_path)
    ours = ViT.from_pretrained(tmp_path)
    assert ours.config.family == family and not ours.training
    x = torch.randn(2, 3, 32, 32)
    states = hidden_states(ref, x)
    assert len(states) == TINY["num_hidden_layers"] + 1
    with torch.no_grad():
        for layer in range(-len(states), len(states)):
            assert max_diff(ours(x, select_layer=layer), states[layer]) <= 1e-4, layer
        n_cls = int(family == "clip")
        assert torch.equal(ours(x, select_layer=-2, drop_cls=True), ours(x, select_layer=-2)[:, n_cls:])
        assert ours(x, drop_cls=True).shape == (2, 16, 32)
    with pytest.raises(IndexError):
        ours(x, select_layer=len(states))


def test_clip_pooled_and_post_layernorm(clip_folder):
    ref, ours = transformers.CLIPVisionModel.from_pretrained(clip_folder).eval(), ViT.from_pretrained(clip_folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=x)
        assert max_diff(ours.pooled(x), out.pooler_output) <= 1e-4
        assert max_diff(ours(x), out.last_hidden_state) <= 1e-4  # CLIP: last_hidden_state is pre-LN


def test_siglip_last_hidden_state_is_post_layernormed_and_pooled_refuses(tmp_path):
    ref = reference("siglip")
    ref.save_pretrained(tmp_path)
    ours, x = ViT.from_pretrained(tmp_path), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(ours.post_layernorm(ours(x)), ref(pixel_values=x).last_hidden_state) <= 1e-4
    with pytest.raises(ValueError, match="attention head"):
        ours.pooled(x)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("size", [(48, 48), (40, 56)])
def test_position_interpolation_matches_transformers(family, size, tmp_path):
    ref = reference(family, seed=1)
    ref.save_pretrained(tmp_path)
    ours, x = ViT.from_pretrained(tmp_path), torch.randn(2, 3, *size)
    states = hidden_states(ref, x, interpolate_pos_encoding=True)
    with torch.no_grad():
        out = ours(x, select_layer=-1)
    assert out.shape[1] == (size[0] // 8) * (size[1] // 8) + (family == "clip")
    assert max_diff(out, states[-1]) <= 1e-4
    assert max_diff(ours(x, select_layer=0), states[0]) <= 1e-4


# ----------------------------------------------------------------- checkpoint layouts

def test_vision_only_file_with_prefix_and_position_ids(clip_folder, tmp_path):
    """The hub's older layout: `vision_model.` prefix plus a position_ids buffer."""
    state = {"vision_model." + k: v for k, v in load_file(clip_folder / "model.safetensors").items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((clip_folder / "config.json").read_text())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ViT.from_pretrained(tmp_path)(x), ViT.from_pretrained(clip_folder)(x))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_full_dual_encoder_checkpoint_skips_text_tower(family, tmp_path):
    torch.manual_seed(2)
    if family == "clip":
        cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=TINY, projection_dim=16)
        ref = transformers.CLIPModel(cfg).eval()
    else:
        ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=TINY)).eval()
    ref.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert any(k.startswith("text_model.") for k in keys) and "logit_scale" in keys
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    ours, x = ViT.from_pretrained(tmp_path), torch.randn(2, 3, 32, 32)
    states = hidden_states(ref.vision_model, x)
    with torch.no_grad():
        for layer in (0, -2, -1):
            assert max_diff(ours(x, select_layer=layer), states[layer]) <= 1e-4


def rewrite(folder, tmp_path, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(clip_folder, tmp_path):
    folder = rewrite(clip_folder, tmp_path, lambda s: s.pop("encoder.layers.2.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: encoder\.layers\.2\.mlp\.fc2\.bias"):
        ViT.from_pretrained(folder)


def test_unexpected_tensor_is_named(clip_folder, tmp_path):
    folder = rewrite(clip_folder, tmp_path, lambda s: s.update({"head.probe": torch.zeros(1, 1, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: head\.probe"):  # head.* skipped for SigLIP only
        ViT.from_pretrained(folder)


def test_misshaped_tensor_is_named(clip_folder, tmp_path):
    folder = rewrite(clip_folder, tmp_path,
                     lambda s: s.update({"encoder.layers.0.mlp.fc1.weight": torch.zeros(64, 31)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight \(64, 31\) \(expected \(64, 32\)\)"):
        ViT.from_pretrained(folder)


def test_truncated_safetensors_is_named(clip_folder, tmp_path):
    data = (clip_folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        ViT.from_pretrained(tmp_path)



# ----------------------------------------------------------------- BLIP-2 / InstructBLIP towers

BLIP = {"blip2": (lambda f: tiny.write_blip2(f, text_way=False), transformers.Blip2ForConditionalGeneration),
        "instructblip": (tiny.write_instructblip, transformers.InstructBlipForConditionalGeneration)}


@pytest.fixture(scope="module", params=sorted(BLIP))
def blip(request, tmp_path_factory):
    """(folder, transformers' vision_model) of a tiny BLIP-2 / InstructBLIP that transformers wrote."""
    write, model_cls = BLIP[request.param]
    folder = write(tmp_path_factory.mktemp(request.param))
    return folder, model_cls.from_pretrained(folder).vision_model.eval()


def test_blip_vision_tower_matches_transformers(blip):
    folder, ref = blip
    ours = ViT.from_pretrained(folder)
    c = ours.config
    assert (c.family, c.class_token, c.pre_norm, c.hidden_act, c.layer_norm_eps) == ("blip", True, False, "gelu", 1e-6)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        for layer in (-1, -2, 0):
            assert max_diff(ours(x, select_layer=layer), out.hidden_states[layer]) <= 1e-5, layer
        assert max_diff(ours.post_layernorm(ours(x)), out.last_hidden_state) <= 1e-5  # LAVIS's ln_vision
        below, last = ours.hidden_states(x, (-2, -1))
        assert torch.equal(below, ours(x, select_layer=-2)) and torch.equal(last, ours(x))


def test_blip_qkv_bias_as_lavis_q_and_v_biases(blip, tmp_path):
    """LAVIS's separate q_bias / v_bias load as the fused bias with zeros for k."""
    folder, _ = blip

    def split(state):
        for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
            q, k, v = state.pop(key).chunk(3)
            assert not k.any()
            state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q, v

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ViT.from_pretrained(rewrite(folder, tmp_path, split))(x), ViT.from_pretrained(folder)(x))


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("vision_model.encoder.layers.1.self_attn.projection.bias"),
     r"missing tensors: vision_model\.encoder\.layers\.1\.self_attn\.projection\.bias"),
    (lambda s: s.update({"vision_model.encoder.layers.0.self_attn.k_bias": torch.zeros(32)}),
     r"unexpected tensors: vision_model\.encoder\.layers\.0\.self_attn\.k_bias"),
    (lambda s: s.update({"vision_model.embeddings.position_embedding": torch.zeros(1, 4, 32)}),
     r"pos_embed \(4, 32\) \(expected \(5, 32\)\)"),
])
def test_blip_loading_is_strict(blip, tmp_path, edit, message):
    """Only the file's other components (qformer, query_tokens, language_projection,
    language_model) are skipped; anything else wrong in the tower is named."""
    folder, _ = blip
    with pytest.raises(CheckpointError, match=message):
        ViT.from_pretrained(rewrite(folder, tmp_path, edit))


def test_blip_configs_and_what_is_refused(blip):
    config = ViT.from_pretrained(blip[0]).config
    assert ViTConfig.from_hf(config.to_hf()) == config
    assert ViTConfig.from_hf({"model_type": "instructblip", "vision_config": {}}).hidden_size == 1408
    with pytest.raises(CheckpointError, match="qkv_bias"):
        ViTConfig.from_hf({"model_type": "blip_2_vision_model", "qkv_bias": False})
    with pytest.raises(ValueError, match="only loaded"):
        ViT(config).save_pretrained(blip[0])

# ----------------------------------------------------------------- configs and save_pretrained

def test_config_family_defaults_and_hub_dicts():
    s = ViTConfig(**TINY, family="siglip")
    assert (s.class_token, s.pre_norm, s.patch_bias, s.hidden_act, s.layer_norm_eps) == \
           (False, False, True, "gelu_pytorch_tanh", 1e-6)
    c = ViTConfig.from_hf({"model_type": "clip", "vision_config": {"hidden_size": 96, "patch_size": 14}})
    assert (c.family, c.hidden_size, c.patch_size, c.image_size, c.hidden_act) == ("clip", 96, 14, 224, "quick_gelu")
    assert ViTConfig.from_hf(c.to_hf()) == c and ViTConfig.from_hf(s.to_hf()) == s
    with pytest.raises(CheckpointError, match="dinov2"):
        ViTConfig.from_hf({"model_type": "dinov2"})


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_save_pretrained_round_trip_and_transformers_loads_it(family, tmp_path):
    torch.manual_seed(3)
    ours = ViT(ViTConfig(**TINY, family=family)).eval()
    ours.save_pretrained(tmp_path)
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))
    back = ViT.from_pretrained(tmp_path)
    assert back.config == ours.config
    ref, info = REF[family][1].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(2, 3, 32, 32)
    states = hidden_states(ref.eval(), x)
    with torch.no_grad():
        for layer in (0, -2, -1):
            assert torch.equal(back(x, select_layer=layer), ours(x, select_layer=layer))
            assert max_diff(ours(x, select_layer=layer), states[layer]) <= 1e-4


def test_from_pretrained_dtype(clip_folder):
    fp32, bf16 = ViT.from_pretrained(clip_folder), ViT.from_pretrained(clip_folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    x = torch.randn(1, 3, 48, 48)  # interpolated positions in bf16 too
    with torch.no_grad():
        out = bf16(x)
        assert out.dtype == torch.bfloat16 and max_diff(out.float(), fp32(x)) < 0.1


# ----------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("size,crop", [(224, 224), (37, 33)])
def test_clip_preprocessing_matches_transformers(size, crop):
    ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                             crop_size={"height": crop, "width": crop})
    ours = ImageProcessor.from_hf(ref.to_dict())
    assert ours == ImageProcessor(size=size, crop_size=crop)
    imgs = images()
    expected = ref(imgs, return_tensors="pt").pixel_values
    got = ours(imgs)
    assert got.shape == (5, 3, crop, crop) and got.dtype == torch.float32
    assert max_diff(got, expected) <= 1e-5


@pytest.mark.parametrize("size", [224, 37])
def test_siglip_preprocessing_matches_transformers(size):
    ref = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    ours = ImageProcessor.from_hf(ref.to_dict())
    assert ours == ImageProcessor.siglip(size)
    assert max_diff(ours(images()), ref(images(), return_tensors="pt").pixel_values) <= 1e-5



@pytest.mark.parametrize("size", [224, 37])
def test_blip_preprocessing_matches_transformers(size):
    """BLIP-2 / InstructBLIP: resize to size x size, bicubic, OpenAI CLIP's mean and std, no crop."""
    ref = transformers.BlipImageProcessorPil(size={"height": size, "width": size})
    ours = ImageProcessor.from_hf(ref.to_dict())
    assert ours == ImageProcessor.blip(size) and ours.to_hf()["image_processor_type"] == "BlipImageProcessor"
    assert ImageProcessor.from_hf(ours.to_hf()) == ours
    got = ours(images())
    assert got.shape == (5, 3, size, size)
    assert max_diff(got, ref(images(), return_tensors="pt").pixel_values) <= 1e-5

def test_hub_style_preprocessor_configs():
    old_clip = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 336,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert ImageProcessor.from_hf(old_clip) == ImageProcessor.clip(336)
    for p in (ImageProcessor.clip(64, pad_to_square=True), ImageProcessor.siglip(48)):
        assert ImageProcessor.from_hf(p.to_hf()) == p
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessor.from_hf({**old_clip, "do_center_crop": False})


def test_pad_to_square_like_llava():
    proc = ImageProcessor.clip(32, pad_to_square=True)
    fill = tuple(int(m * 255) for m in proc.mean)
    wide = Image.fromarray(skdata.coffee())                       # 600 x 400
    square = np.asarray(pad_to_square(wide, fill))
    assert square.shape == (600, 600, 3)
    assert (square[:100] == fill).all() and (square[500:] == fill).all()
    assert np.array_equal(square[100:500], np.asarray(wide))
    tall = Image.fromarray(skdata.coffee()).transpose(Image.Transpose.TRANSPOSE)  # 400 x 600
    assert np.array_equal(np.asarray(pad_to_square(tall, fill))[:, 100:500], np.asarray(tall))
    expected = ImageProcessor.clip(32)([pad_to_square(wide, fill)])
    assert torch.equal(proc([wide]), expected)
    assert not torch.equal(expected, ImageProcessor.clip(32)([wide]))
