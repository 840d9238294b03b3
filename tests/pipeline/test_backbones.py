"""Backbones: token layouts, weight loading, FeatureExtractor (real transformers classes, tiny
configs, CPU)."""
from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch
from transformers import (
    TimesformerForVideoClassification,
    TimesformerModel,
    VideoMAEForPreTraining,
    VivitForVideoClassification,
    VJEPA2Model,
)
from transformers.activations import FastGELUActivation

from pipeline.backbones import (
    MODEL_CLASSES,
    MODEL_NAMES,
    FeatureExtractor,
    _random_checkpoint,
    _seeded_init,
    build_models,
    full_configs,
    layout_spec,
    tiny_configs,
)
from pipeline.config import ModelsConfig, ModelSpec
from pipeline.preprocess import INPUT_SPECS, derive_inputs
from pipeline.rewrites import (
    LinearGELU,
    fuse_fast_gelu,
    use_cached_rope_vjepa2,
    use_cls_only_last_layer_vivit,
    use_float8_linears,
    use_sdpa_timesformer,
)
from tokconv.targets import ALL_SPECS

# the hub checkpoints' own classes (what from_pretrained meets): name -> (class, attribute holding
# the backbone)
HUB_CLASSES = {"student": (VJEPA2Model, None), "videomae": (VideoMAEForPreTraining, "videomae"),
               "timesformer": (TimesformerForVideoClassification, "timesformer"),
               "vivit": (VivitForVideoClassification, "vivit")}


@pytest.fixture(scope="module")
def tiny():
    return FeatureExtractor(ModelsConfig(weights="tiny"), device="cpu")


@pytest.fixture(scope="module")
def frames():
    """Two different windows (B=2, 32 frames, 256x256) of smooth random video."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(2, 32, 3, 16, 16, generator=g)
    up = torch.nn.functional.interpolate(low.flatten(0, 1), size=(256, 256), mode="bilinear")
    clips = (up * 255).round().to(torch.uint8).unflatten(0, (2, 32))
    return clips.permute(0, 1, 3, 4, 2).contiguous()


@pytest.fixture(scope="module")
def tiny_out(tiny, frames):
    return tiny(frames)


def test_layout_rules_give_the_full_size_targets():
    full = full_configs()
    assert {n: layout_spec(n, full[n]) for n in MODEL_NAMES} == ALL_SPECS


def test_tiny_configs_keep_the_full_layouts():
    full, tiny_cfg = full_configs(), tiny_configs()
    for n in MODEL_NAMES:
        f, t = layout_spec(n, full[n]), layout_spec(n, tiny_cfg[n])
        assert (t.tokens, t.grid) == (f.tokens, f.grid), n
        assert t.dim == tiny_cfg[n].hidden_size < f.dim


def test_layout_rules_reject_inputs_a_fixed_position_table_cannot_take():
    cfg = full_configs()
    with pytest.raises(ValueError, match="vivit: fixed position table needs 32 frames"):
        layout_spec("vivit", cfg["vivit"], INPUT_SPECS["videomae"])
    with pytest.raises(ValueError, match="student: input 224px"):
        layout_spec("student", cfg["student"], INPUT_SPECS["videomae"])


def test_tiny_models_emit_the_rule_layouts(tiny, frames, tiny_out):
    assert list(tiny_out) == list(MODEL_NAMES)
    for n, spec in tiny.specs.items():
        out = tiny_out[n]
        assert out.shape == (frames.shape[0], spec.tokens, spec.dim), n
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not torch.allclose(out[0], out[1]), f"{n}: both clips gave the same features"
    assert tiny.specs["student"].grid == (8, 16, 16)
    assert tiny.specs["timesformer"].grid == (16, 14, 14)


def test_batch_items_are_independent(tiny, frames, tiny_out):
    single = tiny(frames[1:])
    for n in MODEL_NAMES:
        torch.testing.assert_close(single[n][0], tiny_out[n][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,frame,patch", [("student", 6, (3, 11)), ("videomae", 6, (2, 9)),
                                              ("timesformer", 5, (12, 1))])
def test_grid_tokens_are_flattened_t_h_w(name, frame, patch):
    """Without transformer layers each output token sees only its own tubelet: changing one frame
    patch moves exactly token t*H*W + h*W + w of the (T, H, W) grid."""
    cfg = tiny_configs()[name]
    cfg.num_hidden_layers = 0
    torch.manual_seed(0)
    model = MODEL_CLASSES[name]._from_config(cfg).eval()
    if name == "timesformer":
        from pipeline.backbones import _finish
        _finish(name, model)
    # the real run/_tokens path around this one model
    fe = FeatureExtractor.__new__(FeatureExtractor)
    fe.device, fe.dtype, fe._run = torch.device("cpu"), torch.float32, {name: model}
    fe.attention = "auto"
    fe.specs = {name: layout_spec(name, cfg)}
    spec_in, (t_grid, h_grid, w_grid) = INPUT_SPECS[name], fe.specs[name].grid
    p = spec_in.crop // h_grid
    x = torch.randn(1, spec_in.frames, 3, spec_in.crop, spec_in.crop)
    y = x.clone()
    y[0, frame, :, patch[0] * p:(patch[0] + 1) * p, patch[1] * p:(patch[1] + 1) * p] += 1.0
    diff = (fe.run(name, y) - fe.run(name, x)).abs().amax(-1)[0]
    t = frame * t_grid // spec_in.frames
    assert diff.nonzero().flatten().tolist() == [t * h_grid * w_grid + patch[0] * w_grid + patch[1]]


def _timesformer_one_layer(fix: bool) -> TimesformerModel:
    cfg = tiny_configs()["timesformer"]
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = TimesformerModel(cfg).eval()
    # checkpoints hold non-zero time embeddings / temporal_dense
    for name, p in model.named_parameters():
        if "time_embeddings" in name or "temporal_dense" in name:
            torch.nn.init.normal_(p, std=0.5)
    if fix:
        from pipeline.backbones import _finish
        _finish("timesformer", model)
    return model


@pytest.mark.parametrize("fix", [True, False])
def test_timesformer_fed_16_frames_equals_a_native_16_frame_model(fix):
    """The k400 config says 8 frames. Fed 16, the loaded model must compute what a 16-frame
    TimeSformer with the (nearest-)resized time embeddings computes; unfixed layers regroup tokens
    as 8-frame halves."""
    model = _timesformer_one_layer(fix)
    cfg16 = tiny_configs()["timesformer"]
    cfg16.num_hidden_layers, cfg16.num_frames = 1, 16
    native = TimesformerModel(cfg16).eval()
    state = dict(model.state_dict())
    time_embeddings = state["embeddings.time_embeddings"]
    state["embeddings.time_embeddings"] = time_embeddings.repeat_interleave(2, dim=1)
    native.load_state_dict(state)
    x = torch.randn(1, 16, 3, 224, 224)
    with torch.no_grad():
        same = torch.allclose(model(pixel_values=x).last_hidden_state,
                              native(pixel_values=x).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert same == fix
    # the checkpoint's config is untouched (save_pretrained round-trips)
    assert model.config.num_frames == 8


def test_timesformer_sdpa_matches_eager():
    eager = _timesformer_one_layer(fix=False)
    sdpa = use_sdpa_timesformer(_timesformer_one_layer(fix=False))
    x = torch.randn(2, 16, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(pixel_values=x).last_hidden_state,
                                   eager(pixel_values=x).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_tiny_weights_are_seeded():
    a = build_models(ModelsConfig(weights="tiny", seed=3), device="cpu")
    b = build_models(ModelsConfig(weights="tiny", seed=3), device="cpu")
    c = build_models(ModelsConfig(weights="tiny", seed=4), device="cpu")
    for n in MODEL_NAMES:
        pa, pb, pc = (torch.cat([p.flatten() for p in m[n].parameters()]) for m in (a, b, c))
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), n
        assert not a[n].training and not any(p.requires_grad for p in a[n].parameters())


def test_random_full_size_models_build_the_hub_architectures():
    """weights=random builds the full architectures (on the meta device: no memory, no init time).
    """
    models = build_models(ModelsConfig(weights="random"), device="meta")
    enc_params = {n: sum(p.numel() for p in (m.encoder if n == "student" else m).parameters())
                  for n, m in models.items()}
    assert 300e6 < enc_params["student"] < 310e6  # ViT-L/16 encoder with a 3D patch embed
    for n in ("videomae", "timesformer", "vivit"):
        # ViT-B/16 (+ TimeSformer temporal blocks)
        assert 85e6 < enc_params[n] < 130e6, (n, enc_params[n])
    assert {n: layout_spec(n, m.config) for n, m in models.items()} == ALL_SPECS


@pytest.fixture(scope="module")
def hub_dirs(tiny, tmp_path_factory):
    """Each tiny backbone saved inside its hub checkpoint class, like the real hub repos."""
    root, dirs = tmp_path_factory.mktemp("hub"), {}
    # tiny's weights, hub modules
    upstream = build_models(ModelsConfig(weights="tiny", rewrites=[]), device="cpu")
    for n in MODEL_NAMES:
        cls, attr = HUB_CLASSES[n]
        holder = cls(tiny.models[n].config)
        (getattr(holder, attr) if attr else holder).load_state_dict(upstream[n].state_dict())
        dirs[n] = root / n
        holder.save_pretrained(dirs[n])
    return dirs


def test_pretrained_round_trip_from_local_dirs(tiny, frames, tiny_out, hub_dirs):
    dirs = hub_dirs
    cfg = ModelsConfig(weights="pretrained",
                       **{n: ModelSpec(source=str(d)) for n, d in dirs.items()})
    loaded = FeatureExtractor(cfg, device="cpu")
    assert loaded.specs == tiny.specs
    out = loaded(frames)
    for n in MODEL_NAMES:
        assert torch.equal(out[n], tiny_out[n]), n


def test_pretrained_from_an_fsspec_url_is_copied_locally(frames, tiny_out, hub_dirs, tmp_path,
                                                         monkeypatch):
    """A non-local source (here fsspec's in-memory filesystem; s3:// takes the same path) is copied
    to a local cache directory first."""
    monkeypatch.setenv("TOKCONV_MODEL_CACHE", str(tmp_path / "cache"))
    dirs = hub_dirs
    mem = fsspec.filesystem("memory")
    for n, d in dirs.items():
        for f in d.iterdir():
            mem.pipe(f"/h4-test/{n}/{f.name}", f.read_bytes())
    try:
        cfg = ModelsConfig(weights="pretrained",
                           **{n: ModelSpec(source=f"memory://h4-test/{n}") for n in dirs})
        models = build_models(cfg, device="cpu")
        x = derive_inputs(frames[:1])["vivit"]
        with torch.no_grad():
            got = models["vivit"](pixel_values=x).last_hidden_state[:, :1]
        # same weights, not the same bits: the CLS-only last layer's one-row matmuls round
        # differently for the loaded tensors (same input, same weights: up to 6e-7 apart on CPU)
        torch.testing.assert_close(got, tiny_out["vivit"][:1], rtol=1e-5, atol=1e-6)
        assert len(list((tmp_path / "cache").iterdir())) == 4
        with pytest.raises(FileNotFoundError, match="memory://h4-test/nothing"):
            nothing = ModelSpec(source="memory://h4-test/nothing")
            build_models(cfg.model_copy(update={"student": nothing}), device="cpu")
    finally:
        mem.rm("/h4-test", recursive=True)


@pytest.mark.integration
def test_pretrained_from_s3(frames, tiny_out, hub_dirs, s3_server, tmp_path, monkeypatch):
    """s3:// sources on a real S3 endpoint (moto server), with the Storage-style short options."""
    monkeypatch.setenv("TOKCONV_MODEL_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.make_bucket("models")
    for n, d in hub_dirs.items():
        s3_server.upload(d, f"s3://{bucket}/hub/{n}")
    cfg = ModelsConfig(weights="pretrained",
                       **{n: ModelSpec(source=f"s3://{bucket}/hub/{n}") for n in MODEL_NAMES})
    out = FeatureExtractor(cfg, device="cpu", storage_options=s3_server.storage_options)(frames)
    for n in MODEL_NAMES:
        assert torch.equal(out[n], tiny_out[n]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_rope_gives_exactly_upstreams_values(dtype):
    """The RoPE tables built once per length give bit-identical outputs to transformers' per-layer
    RoPE."""
    torch.manual_seed(0)
    model = VJEPA2Model(tiny_configs()["student"]).eval().to(dtype)
    x = torch.randn(2, 16, 3, 256, 256).to(dtype)
    with torch.inference_mode():
        upstream = model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        use_cached_rope_vjepa2(model)
        cached = model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        # the predictor's masked positions still run
        model(pixel_values_videos=x, skip_predictor=False)
    assert torch.equal(cached, upstream)
    attn = next(m for m in model.modules() if "_rope_cache" in m.__dict__)
    assert list(attn._rope_cache) == [(2048, dtype, torch.device("cpu"))]


def test_fused_fast_gelu_keeps_vivit_outputs():
    torch.manual_seed(0)
    model = MODEL_CLASSES["vivit"](tiny_configs()["vivit"], add_pooling_layer=False).eval()
    x = torch.randn(1, 32, 3, 224, 224)
    with torch.inference_mode():
        before = model(pixel_values=x).last_hidden_state
        fuse_fast_gelu(model)
        after = model(pixel_values=x).last_hidden_state
    assert not any(isinstance(m, FastGELUActivation) for m in model.modules())
    tanh_gelus = [m for m in model.modules()
                  if isinstance(m, torch.nn.GELU) and m.approximate == "tanh"]
    assert len(tanh_gelus) == 2
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_cls_only_last_vivit_layer_gives_the_full_models_cls_token():
    config = tiny_configs()["vivit"]
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = MODEL_CLASSES["vivit"](config, add_pooling_layer=False).eval()
    with torch.no_grad():  # a CLS embedding that is not zero, as in the checkpoint
        model.embeddings.cls_token.normal_()
    x = torch.randn(2, 32, 3, 224, 224)
    with torch.inference_mode():
        full = model(pixel_values=x).last_hidden_state
        use_cls_only_last_layer_vivit(model)
        cls_only = model(pixel_values=x).last_hidden_state
    assert full.shape == (2, 1 + 16 * 14 * 14, config.hidden_size)
    assert cls_only.shape == (2, 1, config.hidden_size)
    torch.testing.assert_close(cls_only, full[:, :1], rtol=1e-5, atol=1e-5)


def test_random_weights_are_drawn_once_and_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKCONV_MODEL_CACHE", str(tmp_path))
    cfg = tiny_configs()["videomae"]
    first = _random_checkpoint("videomae", cfg, 3, {})
    assert _random_checkpoint("videomae", tiny_configs()["videomae"], 3, {}) == first  # cache hit
    assert _random_checkpoint("videomae", cfg, 4, {}) != first  # another seed, another draw
    loaded = MODEL_CLASSES["videomae"].from_pretrained(first).state_dict()
    drawn = _seeded_init("videomae", cfg, 3, {}).state_dict()
    assert loaded.keys() == drawn.keys()
    assert all(torch.equal(loaded[k], drawn[k]) for k in drawn)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(first).name, Path(
        _random_checkpoint("videomae", cfg, 4, {})).name])  # no temporary copies left behind


def test_layer_scope_compiles_each_block_in_place_with_the_same_tokens(frames, tiny_out):
    """compile_scope=layers compiles every repeated block (not the model) and changes no output.
    (CPU: dynamo's real tracing with its ``eager`` backend; CUDA compiles with inductor.)"""
    fx = FeatureExtractor(ModelsConfig(weights="tiny"), device="cpu")
    assert fx.compiled == [] and fx._run == fx.models  # CPU: nothing compiled by default
    for name in ("student", "vivit"):
        model = fx.models[name]
        assert fx._compile(model, backend="eager") is model  # in place
        blocks = [b for m in model.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    torch._dynamo.reset()
    out = fx(frames)
    for n in MODEL_NAMES:
        torch.testing.assert_close(out[n], tiny_out[n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field", ["compile", "fp8"])
def test_feature_extractor_rejects_unknown_model_names(field):
    with pytest.raises(ValueError, match=rf"models.{field}: unknown model names \['vivitt'\]"):
        FeatureExtractor(ModelsConfig(weights="tiny", **{field: ["vivitt"]}), device="cpu")


def test_fp8_is_ignored_on_cpu_and_refused_for_a_cpu_module(tiny, frames, tiny_out):
    """models.fp8 is a CUDA setting (like compile): a CPU extractor keeps float32 linears; the
    function itself names the device it cannot use."""
    fx = FeatureExtractor(ModelsConfig(weights="tiny", fp8=list(MODEL_NAMES)), device="cpu")
    assert fx.fp8 == []
    out = fx(frames)
    for n in MODEL_NAMES:
        torch.testing.assert_close(out[n], tiny_out[n])
    with pytest.raises(ValueError, match="models.fp8: float8 matmuls need a CUDA device; "
                                         "VivitModel is on cpu"):
        use_float8_linears(fx.models["vivit"])


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tiny, frames, tiny_out):
    gpu = FeatureExtractor(ModelsConfig(weights="tiny", compile=["videomae"]), device="cuda")
    out = gpu(frames.pin_memory())
    for n in MODEL_NAMES:
        # activations run in models.dtype
        assert out[n].device.type == "cuda" and out[n].dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(out[n].float().cpu(), tiny_out[n], dim=-1)
        assert cos.min() > 0.98, (n, cos.min())


@pytest.mark.gpu
def test_cuda_fp8_linears_keep_the_tokens(tiny, frames, tiny_out):
    """models.fp8: every nn.Linear weight becomes a float8 tensor (e4m3, per-row scales), compiled
    and eager alike, and the tokens stay close to the CPU float32 reference."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability >= 8.9")
    cfg = ModelsConfig(weights="tiny", fp8=list(MODEL_NAMES), compile=["videomae"])
    gpu = FeatureExtractor(cfg, device="cuda")
    assert gpu.fp8 == list(MODEL_NAMES)
    for n, model in gpu.models.items():
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        # torchao Float8Tensor: data + scales
        assert linears and all(m.weight.qdata.dtype == torch.float8_e4m3fn
                               and m.weight.scale.numel() == m.out_features for m in linears), n
    out = gpu(frames.pin_memory())
    for n in MODEL_NAMES:
        assert out[n].dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(out[n].float().cpu(), tiny_out[n], dim=-1)
        assert cos.min() > 0.95, (n, cos.min())


@pytest.mark.gpu
def test_cuda_linear_gelu_epilogue_computes_its_formula():
    """LinearGELU on CUDA (one cuBLASLt matmul with a bias + GELU epilogue) is gelu_tanh(x W^T + b),
    eager and compiled (inductor keeps the call) on a 3D input; with gradients wanted it runs
    unfused (the fused op has no backward) and gradients flow."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256).cuda().to(torch.bfloat16)
    x = torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    ref = torch.nn.functional.gelu(exact, approximate="tanh")
    fused = LinearGELU(lin)
    for fn in (fused, torch.compile(fused)):
        with torch.inference_mode():
            out = fn(x)
        assert out.shape == (3, 50, 256) and out.dtype == torch.bfloat16
        assert ((out.double() - ref).norm() / ref.norm()) < 1e-2
    out = fused(x)
    out.float().sum().backward()
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2 and lin.weight.grad is not None
