"""The Phase enum: one name per phase, shared by the plan, the engine and the messages."""
import types

import pytest
import torch

from scail_win import sample_video
from scail_win.placement.registry import HookRegistry
from scail_win.placement.memory_plan import plan_memory
from scail_win.model.loader import _SplitCFG
from scail_win.phases import Phase
from test_memory import specs
from test_sample_loop import make_engine


def test_phases_are_their_names():
    assert [str(p) for p in Phase] == ["vae_encode", "clip", "text", "denoise", "vae_decode"]
    assert Phase("denoise") is Phase.DENOISE and Phase.DENOISE == "denoise"
    assert {Phase.TEXT: 1}["text"] == 1 and f"{Phase.CLIP}" == "clip"
    with pytest.raises(ValueError):
        Phase("vae")  # the engine's old name for both VAE phases


def test_vae_phases_and_their_ops():
    assert (Phase.VAE_ENCODE.vae_op, Phase.VAE_DECODE.vae_op) == ("encode", "decode")
    assert Phase.for_vae_op("decode") is Phase.VAE_DECODE
    with pytest.raises(ValueError, match="not a VAE phase"):
        Phase.DENOISE.vae_op
    with pytest.raises(ValueError, match="'encode' or 'decode'"):
        Phase.for_vae_op("vae")


def test_the_plan_estimates_every_phase_by_its_phase():
    parts, dit = specs()
    plan = plan_memory(dit, total_vram_bytes=141 * 2 ** 30, **parts)
    assert set(plan.peaks) == set(Phase) and all(isinstance(p, Phase) for p in plan.peaks)
    assert plan.resident_phases == (Phase.DENOISE,)


def test_the_engine_runs_phases_by_name_and_refuses_others():
    engine = make_engine()
    with engine.phase(Phase.DENOISE) as device:
        assert device == torch.device("cpu") and engine.current_phase is Phase.DENOISE
    assert engine.current_phase is None
    with engine.phase("denoise"):
        assert engine.current_phase is Phase.DENOISE
    with pytest.raises(ValueError, match="'vae' is not a valid Phase"):
        with engine.phase("vae"):
            pass


def test_out_of_memory_names_each_phase():
    for phase, words in ((Phase.VAE_ENCODE, "VAE encoding; try --vae-tiling on"),
                         (Phase.CLIP, "image encoding; try --vram-budget"),
                         (Phase.TEXT, "text encoding; try --t5-cpu"),
                         (Phase.DENOISE, "denoising; try --blocks-on-gpu 0"),
                         (Phase.VAE_DECODE, "VAE decoding; try --vae-tiling on")):
        model = types.SimpleNamespace(current_phase=phase, memory_plan=None)
        assert sample_video.out_of_memory_message(model, None).startswith(f"out of GPU memory during {words}")


def test_the_engine_lists_its_hooks():
    engine = make_engine()
    engine._lazy = {}
    assert engine.installed_hooks() == {}
    HookRegistry.of(engine.model).add(_SplitCFG())
    assert engine.installed_hooks() == {"network": ["split_cfg"]}
    HookRegistry.of(engine.model).remove_all()
    assert engine.installed_hooks() == {}
