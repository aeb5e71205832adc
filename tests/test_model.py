import pytest
import torch
from safetensors.torch import save_file

from laionfilter.errors import LaionfilterError
from laionfilter.images import Preprocessor
from laionfilter.model import (SCALES, BaseSpec, HeadConfig, ScoreHead, build_architecture, eval_transform,
                               layer_names, load_base, weights_fingerprint)


@pytest.mark.parametrize("arch, layers", [("ViT-B-16", 152), ("ViT-L-14", 296)])
def test_vision_tower_layer_counts_match_the_paper(arch, layers):
    _, model = build_architecture(arch, empty=True)  # names and shapes only: nothing allocated
    names = layer_names(model)
    assert sum(n.startswith("visual.") for n in names) == layers
    assert [n for n in names if n.startswith("head.")] == ["head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"]


def test_head_is_appendix_d_and_scores_are_expected_values_on_the_template():
    arch, model = load_base("lf-tiny-vit")
    head = model.head
    assert isinstance(head[0], torch.nn.Linear) and head[0].out_features == 512
    assert isinstance(head[1], torch.nn.GELU) and head[2].p == 0.5
    assert head[3].out_features == 10 and isinstance(head[4], torch.nn.Sigmoid)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        probs = head(model.visual(x))
        expected = (probs / probs.sum(-1, keepdim=True)) @ torch.arange(1.0, 11.0)
        assert torch.allclose(model(x), expected)
        model.template = torch.tensor(SCALES["1-5"])
        assert torch.allclose(model(x), expected / 2)  # 0.5..5 is half of 1..10


def test_head_initialisation_is_seeded_and_shared():
    a, b, c = ScoreHead(64, HeadConfig(seed=0)), ScoreHead(64, HeadConfig(seed=0)), ScoreHead(64, HeadConfig(seed=1))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[3].weight, b[3].weight)
    assert not torch.equal(a[0].weight, c[0].weight)
    rng = torch.random.get_rng_state()
    ScoreHead(64, HeadConfig())
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_base_spec_parsing(tmp_path):
    assert BaseSpec.parse("ViT-B-16") == BaseSpec("ViT-B-16")
    assert BaseSpec.parse("ViT-B-16:laion2b_s34b_b88k") == BaseSpec("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert BaseSpec.parse("ViT-L-14:/w/model.safetensors") == BaseSpec("ViT-L-14", checkpoint="/w/model.safetensors")
    with pytest.raises(LaionfilterError):
        BaseSpec.parse(":x")


def test_local_open_clip_checkpoint_loads_through_the_same_path(tmp_path):
    import open_clip

    from laionfilter.model import register_configs

    register_configs()
    torch.manual_seed(123)
    clip = open_clip.create_model("lf-tiny-vit")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))  # a full CLIP state dict
    arch, model = load_base(f"lf-tiny-vit:{path}")
    for name, p in model.visual.named_parameters():
        assert torch.equal(p, clip.visual.state_dict()[name]), name
    _, fresh = load_base("lf-tiny-vit")
    assert torch.equal(model.head[0].weight, fresh.head[0].weight)  # no head in the file: the seeded one
    assert weights_fingerprint(model) != weights_fingerprint(fresh)


def test_random_base_is_reproducible():
    _, a = load_base("lf-tiny-vit")
    _, b = load_base("lf-tiny-vit")
    assert weights_fingerprint(a) == weights_fingerprint(b)


def test_pretrained_tag_offline_fails_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LaionfilterError, match="ViT-B-16.*pretrained weights 'laion2b_s34b_b88k'"):
        load_base("ViT-B-16:laion2b_s34b_b88k")


def test_unknown_architecture():
    with pytest.raises(LaionfilterError, match="unknown OpenCLIP architecture 'ViT-Q-99'"):
        load_base("ViT-Q-99")


@pytest.mark.parametrize("photo", ["china", "astronaut", "page", "retina"])
def test_eval_transform_matches_open_clips_on_real_photos(photo):
    import io

    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from laionfilter.train.starter import load_photo

    arch, _ = load_base("lf-tiny-vit")
    assert arch.preprocess["interpolation"] == "bicubic" and arch.preprocess["resize_mode"] == "shortest"
    buf = io.BytesIO()
    Image.fromarray(load_photo(photo)).save(buf, "JPEG", quality=90)
    ours = Preprocessor(arch.preprocess, scaled_decode=False)(buf.getvalue())
    cfg = PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.preprocess.items()})
    theirs = image_transform_v2(cfg, is_train=False)(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert ours.shape == theirs.shape == (3, 64, 64)
    level = 1 / 255 / min(arch.preprocess["std"])
    # At most one uint8 level apart, and nearly always equal.
    assert (ours - theirs).abs().max() <= 1.01 * level
    assert (ours - theirs).abs().mean() < 1e-3
    assert torch.equal(eval_transform(arch)(buf.getvalue()), ours)  # the default decodes at full size
    # --decode scaled decodes a JPEG this large (over twice the 64-pixel input) at a reduced DCT scale:
    # the same picture, a few levels apart on average (what that does to scores: benchmarks/decode.py).
    scaled = Preprocessor(arch.preprocess, scaled_decode=True)(buf.getvalue())
    assert scaled.shape == ours.shape and 0 < (scaled - theirs).abs().mean() < 4 * level
