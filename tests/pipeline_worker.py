"""The in-process half of tests/test_pipeline.py, run as a script in its own process.

SCAIL's vendored ``sat`` must be the ``sat`` of the process (the pytest
process has PyPI's on its path first), so these checks run here with the
SCAIL tree first on sys.path; they record what they see, and the tests
assert on it:

    python tests/pipeline_worker.py SCAIL_ROOT SETUP_DIR OUT_DIR

writes OUT_DIR/report.json and OUT_DIR/latents.safetensors. SETUP_DIR gets
the smoke setup (32x32, 5 frames) first, so that other processes can use it
once SETUP_DIR/smoke.json exists.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import sys
from pathlib import Path

SIZE = (32, 32)
FRAMES = 5
INTERRUPT_AT = 2  # steps completed when Ctrl-C arrives


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def take(self):
        taken, self.messages = self.messages, []
        return taken


@contextlib.contextmanager
def without_gpu_calls():
    """Upstream's engine on the CPU: its RoPE tables call .cuda(), Ulysses asks for the GPU's name."""
    import torch

    cuda, name = torch.Tensor.cuda, torch.cuda.get_device_name
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.get_device_name = lambda *args, **kwargs: "cpu"
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.get_device_name = cuda, name


def upstream_engine(scail_root: Path, args, checkpoint: Path):
    """Upstream's SATVideoDiffusionEngine (loaded from its file) with the smoke DiT's weights."""
    from omegaconf import OmegaConf

    from scail_win.weights import checkpoint as weights

    spec = importlib.util.spec_from_file_location("upstream_diffusion_video", scail_root / "diffusion_video.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    up_args = copy.copy(args)
    config = OmegaConf.create(OmegaConf.to_container(args.model_config))
    config.first_stage_config.params.device = "cpu"  # WanVAE's default is "cuda"
    config.network_config.params.transformer_args.checkpoint_activations = False  # as upstream's __main__
    up_args.model_config = config
    with without_gpu_calls():
        engine = module.SATVideoDiffusionEngine(up_args)
    engine.eval()
    engine.sampler.device = "cpu"  # BaseDiffusionSampler's default is "cuda"
    with weights.open_state_dict(checkpoint) as source:
        missing, unexpected = engine.load_state_dict({k: source[k] for k in source}, strict=False)
    return engine, [k for k in missing if k.startswith("model.")], unexpected


def main(scail_root: Path, setup_dir: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from sgm.modules.diffusionmodules.sampling import RFSampler

    from scail_win import arguments, pipeline, sample_video
    from scail_win.weights import prefetch
    from scail_win.io import resume
    from scail_win.testing import smoke
    from scail_win.io.embed_cache import EmbedCache
    from scail_win.io.jobs import Job, validate_job

    records = Records()
    logging.getLogger("scail_win").addHandler(records)
    logging.getLogger("scail_win").setLevel(logging.INFO)
    report, tensors = {}, {}

    setup = smoke.make_smoke_setup(setup_dir, height=SIZE[0], width=SIZE[1], frames=FRAMES)
    args = arguments.get_args(["--base", str(setup.config), "--rope-mode", "exact"])
    model = sample_video.build_model(args)
    report["build_log"] = records.take()
    report["prefetched"] = sorted(str(path) for path in prefetch._started)
    job = validate_job(Job(prompt=smoke.SMOKE_PROMPT, input_dir=setup.example), resolution=SIZE,
                       max_frames=FRAMES, output_dir=out / "samples")
    cache = pipeline.TextEmbeddingCache(EmbedCache(out / "cache"),
                                            args.model_config.conditioner_config.params.emb_models[0].params)
    cond = pipeline.encode_job(model, job, args, cache)
    report["shape"] = list(cond.shape)

    # Resume: interrupted during step INTERRUPT_AT + 1, then continued.
    state_file = out / "state.resume.safetensors"
    torch.manual_seed(11)
    tensors["uninterrupted"] = pipeline.denoise(model, cond, args, None, "fp", 0, False)
    original_step = RFSampler.sampler_step
    calls = {"n": 0}

    def interrupted_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > INTERRUPT_AT:
            raise KeyboardInterrupt
        return original_step(self, *a, **k)

    records.take()
    torch.manual_seed(11)
    RFSampler.sampler_step = interrupted_step
    try:
        pipeline.denoise(model, cond, args, state_file, "fp", 1, False)
        report["interrupt_raised"] = False
    except KeyboardInterrupt:
        report["interrupt_raised"] = True
    finally:
        RFSampler.sampler_step = original_step
    report["interrupt_log"] = records.take()
    report["saved_step"] = resume.load_state(state_file, "fp").step
    torch.manual_seed(999)  # the saved RNG state must win over the current one
    tensors["resumed"] = pipeline.denoise(model, cond, args, state_file, "fp", 1, True)
    report["resume_log"] = records.take()

    # Upstream's engine, same weights, inputs and seed.
    engine, report["upstream_missing"], report["upstream_unexpected"] = upstream_engine(
        scail_root, args, setup.weights / "model" / "1" / "mp_rank_00_model_states.pt")
    for name, m in (("ours", model), ("upstream", engine)):
        torch.manual_seed(7)
        tensors[name] = m.sample(copy.deepcopy(cond.c), uc=copy.deepcopy(cond.uc), batch_size=1, shape=cond.shape,
                                 ofs=torch.tensor([2.0]), fps=torch.tensor([16]))
    del engine

    # The embedding cache: a second engine gets the embeddings without building T5.
    rng = torch.get_rng_state()
    fresh = sample_video.build_model(args)
    records.take()
    c, uc = pipeline.encode_text(fresh, smoke.SMOKE_PROMPT, cache)
    report["cache_log"] = records.take()
    report["cache_built"] = sorted(fresh._lazy)
    tensors["cached_c"], tensors["first_c"] = c["crossattn"], cond.c["crossattn"]
    # Building (eagerly or lazily) must not move the RNG the initial noise comes from.
    for name in ("conditioner", "i2v_clip", "first_stage_model"):
        getattr(fresh, name)
    report["rng_untouched_by_building"] = torch.equal(rng, torch.get_rng_state())
    del fresh

    # A batch whose first pose video turns unreadable after validation.
    bad_dir = out / "bad"
    bad_dir.mkdir()
    for name in ("ref.jpg", "rendered.mp4"):
        (bad_dir / name).write_bytes((setup.example / name).read_bytes())
    bad = validate_job(Job(prompt="bad", input_dir=bad_dir), resolution=SIZE, max_frames=FRAMES,
                       output_dir=out / "samples")
    (bad_dir / "rendered.mp4").write_bytes(b"\0" * 64)
    records.take()
    results = sample_video.run_batch(model, [bad, job], args, cache)
    report["batch"] = [{"error": r.error, "output": str(r.output) if r.output else None} for r in results]
    report["batch_exit"] = sample_video.summarize(results)
    report["batch_log"] = records.take()

    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / "latents.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
