"""scail_win.run_config: the typed, frozen options of a run, and the upstream args made from them.

The namespace tests start torch.distributed, so they run in a child process
(as in test_arguments.py). Their reference is the sample CLI's former path to
upstream's args: its options written out as command-line flags and parsed
by get_args; the args made directly from a RunConfig must equal those, field
for field.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scail_win import arguments, pipeline, run_config
from scail_win.cli import sample
from scail_win.errors import UserError
from scail_win.run_config import RunConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "configs" / arguments.PACKAGED_CONFIG


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (arguments.WEIGHTS_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def merged(argv):
    """Upstream's args as get_args merges flags and configs (without the process group)."""
    parser = arguments.build_parser()
    args = parser.parse_args(argv)
    return arguments.process_config_to_args(args, given=arguments._flags_given(parser, argv))


# ------------------------------------------------------------- the dataclass


def test_a_run_config_and_its_groups_are_frozen():
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory = run_config.Memory()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.memory.vram_budget = 4.0
    assert hash(config) == hash(RunConfig())


def test_defaults_are_upstreams_behaviour_and_the_parsers_defaults():
    config = RunConfig()
    assert config.options() == dict(
        vram_budget=None, blocks_on_gpu=None, ram_budget=None, t5_cpu=False, offload="auto", vae_tiling="auto",
        seed=1234, steps=None, cfg_scale=None, resolution=None, max_frames=None, sampler="euler", shift=None,
        lora=(), rope_mode="fp32", attention="auto", fp8_matmul=False, step_cache=0.0,
        base=(), weights=None, output_dir="samples", embed_cache=None, save_every=5, resume=False, quiet=False,
        smoke=False)
    # Upstream's parser, before any config: the same values.
    assert RunConfig.from_args(arguments.build_parser().parse_args([])) == config
    # The sample CLI's parser, with nothing given: the same, but for what prepare() resolves.
    cli = RunConfig.from_cli(sample.build_parser().parse_args([])).options()
    assert cli == config.options()


def test_from_cli_takes_the_sample_options():
    opts = sample.build_parser().parse_args([
        "--input-dir", "ex", "--vram-budget", "7.5", "--blocks-on-gpu", "0", "--t5-cpu", "--vae-tiling", "on",
        "--offload", "none", "--sampler", "unipc", "--shift", "3", "--lora", "a.safetensors:0.5", "--lora", "b",
        "--attention", "sdpa", "--fp8-matmul", "--step-cache", "0.08", "--rope-mode", "exact",
        "--embed-cache", "off", "--output-dir", "out", "--save-every", "0", "--resume", "--quiet",
        "--seed", "7", "--steps", "20", "--cfg-scale", "1", "--resolution", "480x832", "--max-frames", "33",
        "--base", "a.yaml", "b.yaml", "--weights", "W"])
    config = RunConfig.from_cli(opts)
    assert config.memory == run_config.Memory(vram_budget=7.5, blocks_on_gpu=0, t5_cpu=True, vae_tiling="on",
                                              offload="none")
    assert config.sampling == run_config.Sampling(seed=7, steps=20, cfg_scale=1.0, resolution=(480, 832),
                                                  max_frames=33, sampler="unipc", shift=3.0,
                                                  lora=("a.safetensors:0.5", "b"))
    assert config.numerics == run_config.Numerics(rope_mode="exact", attention="sdpa", fp8_matmul=True,
                                                  step_cache=0.08)
    assert config.io == run_config.IO(base=("a.yaml", "b.yaml"), weights="W", output_dir="out",
                                      embed_cache="off", save_every=0, resume=True, quiet=True)


def test_from_args_takes_flags_and_the_configs_args_section(clean_env):
    extra = write_yaml(clean_env / "extra.yaml", """\
        args:
          t5_cpu: true
          sampler: dpmpp_2m
          lora: x.safetensors:0.7
          step_cache: 0.1
          vram_budget: "6"
          vae_tiling: on
          seed: 9
          output_dir: from_config
        """)
    args = merged(["--base", str(PACKAGED), str(extra), "--vae-tiling", "off", "--attention", "sdpa"])
    config = RunConfig.from_args(args)
    assert (config.memory.t5_cpu, config.memory.vram_budget, config.memory.vae_tiling) == (True, 6.0, "off")
    assert (config.sampling.sampler, config.sampling.lora, config.sampling.seed) == (
        "dpmpp_2m", ("x.safetensors:0.7",), 9)
    assert (config.numerics.step_cache, config.numerics.attention) == (0.1, "sdpa")
    assert config.io.output_dir == "from_config" and config.io.base == (str(PACKAGED), str(extra))
    assert config.io.weights == str(clean_env / "SCAIL-Preview")
    # Upstream's args lack the CLI's run options: their defaults.
    assert (config.io.save_every, config.io.resume, config.sampling.max_frames) == (5, False, None)


@pytest.mark.parametrize("options, flag", [
    (dict(vram_budget=-1), "--vram-budget"), (dict(blocks_on_gpu=2.5), "--blocks-on-gpu"),
    (dict(sampler="ddim"), "--sampler ddim"), (dict(shift=0), "--shift 0"), (dict(step_cache=True), "--step-cache"),
    (dict(step_cache=float("inf")), "--step-cache"), (dict(attention="xformers"), "--attention"),
    (dict(steps=0), "--steps"), (dict(cfg_scale=-1), "--cfg-scale"), (dict(resolution=(0, 64)), "--resolution"),
    (dict(max_frames="many"), "--max-frames"), (dict(save_every=-1), "--save-every"), (dict(seed=0), "--seed"),
    (dict(lora=[3]), "--lora"), (dict(t5_cpu="maybe"), "--t5-cpu"), (dict(offload="disk"), "--offload"),
])
def test_a_bad_value_is_a_one_line_user_error_naming_the_flag(options, flag):
    with pytest.raises(UserError) as caught:
        RunConfig.from_options(options)
    message = str(caught.value)
    assert message.startswith(flag) and "\n" not in message


def test_a_group_made_directly_is_checked_too():
    with pytest.raises(UserError, match="--vae-tiling"):
        run_config.Memory(vae_tiling="sometimes")
    assert run_config.Memory(vae_tiling="ON").vae_tiling == "on"


def test_an_unknown_option_name_is_a_programming_error():
    with pytest.raises(TypeError, match="no_such_option"):
        RunConfig.from_options({"no_such_option": 1})


def test_a_config_value_is_checked_with_the_flags_parser(clean_env):
    bad = write_yaml(clean_env / "bad.yaml", "args:\n  step_cache: .inf\n")
    with pytest.raises(UserError, match="step_cache"):
        merged(["--base", str(PACKAGED), str(bad)])


def test_non_default_numerics_name_what_changes_the_latents():
    assert RunConfig().non_default_numerics() == {}
    config = RunConfig.from_options(dict(sampler="unipc", shift=3, step_cache=0.1, attention="sdpa",
                                         fp8_matmul=True, rope_mode="exact", vram_budget=4))
    assert config.non_default_numerics() == dict(sampler="unipc", shift=3.0, step_cache=0.1, attention="sdpa",
                                                 fp8_matmul=True)


def test_of_attaches_one_config_built_from_the_args():
    args = argparse.Namespace(sampler="unipc", vram_budget="4", max_frames=17, model_config={})
    config = run_config.of(args)
    assert args.run_config is config and run_config.of(args) is config
    assert (config.sampling.sampler, config.memory.vram_budget, config.sampling.max_frames) == ("unipc", 4.0, 17)
    attached = RunConfig.from_options(dict(sampler="euler"))
    assert run_config.of(argparse.Namespace(sampler="unipc", run_config=attached)) is attached


def test_with_options_changes_only_the_named_options_and_checks_them():
    config = RunConfig.from_options(dict(sampler="unipc", vram_budget=8, steps=20))
    changed = config.with_options(sampler="dpmpp_2m", vram_budget=None)
    assert (changed.sampling.sampler, changed.memory.vram_budget, changed.sampling.steps) == ("dpmpp_2m", None, 20)
    assert config.sampling.sampler == "unipc"
    with pytest.raises(UserError, match="--sampler ddim"):
        config.with_options(sampler="ddim")


def test_updated_from_takes_the_flag_values_of_the_args():
    config = RunConfig.from_options(dict(steps=8, max_frames=9, sampler="unipc"))
    args = argparse.Namespace(sampler="unipc", t5_cpu=True, seed=5, base=["c.yaml"], max_frames=100)
    updated = config.updated_from(args)
    assert (updated.memory.t5_cpu, updated.sampling.seed, updated.io.base) == (True, 5, ("c.yaml",))
    # What is not a flag stays the config's own.
    assert (updated.sampling.steps, updated.sampling.max_frames) == (8, 9)


# ------------------------------------------------- upstream args, in a child process

CHILD = r'''
import argparse, json, sys
from pathlib import Path
from scail_win import hook
hook.install()
from omegaconf import OmegaConf
from scail_win import arguments
from scail_win.cli import sample
from scail_win.arguments import get_args, packaged_config_path


def reference_args_from_cli(opts):
    """The sample CLI's former path: its options as command-line flags, parsed by get_args."""
    args_list = ["--base", *[str(b) for b in (opts.base or [packaged_config_path()])]]
    if getattr(opts, "seed", None) is not None:
        args_list += ["--seed", str(opts.seed)]
    if getattr(opts, "weights", None) is not None:
        args_list += ["--weights", str(opts.weights)]
    for flag, key in (("--vram-budget", "vram_budget"), ("--blocks-on-gpu", "blocks_on_gpu"),
                      ("--ram-budget", "ram_budget"), ("--vae-tiling", "vae_tiling"),
                      ("--rope-mode", "rope_mode"), ("--embed-cache", "embed_cache"),
                      ("--offload", "offload"), ("--sampler", "sampler"), ("--shift", "shift"),
                      ("--attention", "attention"), ("--step-cache", "step_cache")):
        value = getattr(opts, key, None)
        if value is not None:
            args_list += [flag, str(value)]
    for spec in getattr(opts, "lora", None) or []:
        args_list += ["--lora", str(spec)]
    for flag, key in (("--t5-cpu", "t5_cpu"), ("--fp8-matmul", "fp8_matmul")):
        if getattr(opts, key, False):
            args_list.append(flag)
    args = get_args(args_list)
    sampler = args.model_config.sampler_config.params
    if getattr(opts, "steps", None) is not None:
        sampler.num_steps = int(opts.steps)
    if getattr(opts, "cfg_scale", None) is not None:
        sampler.guider_config.params.scale = float(opts.cfg_scale)
    if getattr(opts, "resolution", None):
        args.sampling_image_size = list(opts.resolution)
    for key in ("output_dir", "max_frames", "save_every", "resume", "quiet", "smoke"):
        if hasattr(opts, key):
            setattr(args, key, getattr(opts, key))
    return args


def plain(value):
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def prepared(argv, weights):
    """The CLI's options as sample.prepare leaves them (steps, guidance, size, length, weights resolved)."""
    opts = sample.build_parser().parse_args(argv)
    opts.weights = Path(opts.weights or weights).absolute()
    opts.steps = opts.steps or (4 if opts.fast else 50)
    opts.cfg_scale = (1.0 if opts.fast else 4.0) if opts.cfg_scale is None else opts.cfg_scale
    opts.resolution = opts.resolution or (512, 896)
    opts.max_frames = opts.max_frames or 81
    return opts


request = json.loads(sys.argv[1])
make = reference_args_from_cli if request["mode"] == "reference" else arguments.args_from_cli
namespaces, configs = [], []
for argv in request["combinations"]:
    fields = dict(vars(make(prepared(argv, request["weights"]))))
    configs.append(fields.pop("run_config").options())
    namespaces.append({key: plain(value) for key, value in fields.items()})
report = dict(namespaces=namespaces, configs=configs)
if request["mode"] == "direct":
    report["upstream"] = get_args(request["upstream_argv"]).run_config.options()
print("REPORT " + json.dumps(report, default=repr))
'''


def run_child(tmp_path: Path, request: dict) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", arguments.WEIGHTS_ENV)}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(script), json.dumps(request)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.slow
def test_upstream_args_equal_the_former_command_line_round_trip(tmp_path):
    extra = write_yaml(tmp_path / "extra.yaml", """\
        args:
          t5_cpu: true
          fp8_matmul: true
          sampler: dpmpp_2m
          vae_tiling: on
          lora: [from_config.safetensors]
          vram_budget: 6
          shift: 2.5
          seed: 9
          output_dir: from_config
          sampling_fps: 12
          max_frames: 10
          step_cache: 0.3
          blocks_on_gpu: 5
        """)
    weights = tmp_path / "weights dir"
    combinations = [
        [],
        ["--seed", "7", "--vram-budget", "7.5", "--blocks-on-gpu", "0", "--ram-budget", "16", "--t5-cpu",
         "--vae-tiling", "on", "--offload", "none", "--max-frames", "33", "--resolution", "480x832"],
        ["--rope-mode", "exact", "--attention", "sdpa", "--fp8-matmul", "--step-cache", "0.08",
         "--embed-cache", "off", "--sampler", "unipc", "--shift", "3", "--lora", "a.safetensors:0.5",
         "--lora", "b.safetensors", "--quiet", "--resume", "--input-dir", "x", "--save-every", "2",
         "--output-dir", "out", "--weights", str(tmp_path / "elsewhere")],
        ["--base", str(PACKAGED), str(extra)],
        ["--base", str(PACKAGED), str(extra), "--lora", "cli.safetensors", "--shift", "4", "--fast",
         "--cfg-scale", "2", "--smoke"],
    ]
    request = dict(combinations=combinations, weights=str(weights),
                   upstream_argv=["--base", str(PACKAGED), str(extra), "--sampler", "unipc", "--attention", "sdpa",
                                  "--no-t5-cpu"])
    # One process each, the combinations in the same order: only the first
    # starts the process group (and so gets the local backend's name).
    reference = run_child(tmp_path, dict(request, mode="reference"))
    report = run_child(tmp_path, dict(request, mode="direct"))
    for argv, old, new in zip(combinations, reference["namespaces"], report["namespaces"]):
        assert len(new) > 100  # the whole upstream namespace is compared
        assert new == old, (argv, {key: (old.get(key), new.get(key)) for key in set(old) | set(new)
                                   if old.get(key) != new.get(key)})
    default, memory, speed, from_config, overridden = report["configs"]
    assert default["weights"] == str(weights) and default["steps"] == 50
    assert default["base"] == [str(arguments.packaged_config_path())]
    assert (memory["blocks_on_gpu"], memory["resolution"], memory["max_frames"]) == (0, [480, 832], 33)
    assert speed["lora"] == ["a.safetensors:0.5", "b.safetensors"] and speed["embed_cache"] == "off"
    # The config's args: reach the attached RunConfig where the CLI left them open ...
    assert (from_config["t5_cpu"], from_config["fp8_matmul"], from_config["vram_budget"]) == (True, True, 6.0)
    assert from_config["lora"] == ["from_config.safetensors"] and from_config["shift"] == 2.5
    # ... and not where the CLI sets them (its sampler, vae_tiling, seed and output_dir always are).
    assert (from_config["sampler"], from_config["vae_tiling"], from_config["seed"]) == ("euler", "auto", 1234)
    assert from_config["output_dir"] == "samples" and from_config["max_frames"] == 81
    assert from_config["step_cache"] == 0.0 and from_config["blocks_on_gpu"] == 5
    assert (overridden["lora"], overridden["shift"], overridden["steps"], overridden["cfg_scale"]) == (
        ["cli.safetensors"], 4.0, 4, 2.0)
    assert overridden["smoke"] is True
    # Upstream's own path (SCAIL's sample_video.py): its flags and the config's args: both arrive.
    upstream = report["upstream"]
    assert (upstream["sampler"], upstream["attention"], upstream["t5_cpu"]) == ("unipc", "sdpa", False)
    assert (upstream["fp8_matmul"], upstream["vae_tiling"], upstream["lora"]) == (
        True, "on", ["from_config.safetensors"])
    assert (upstream["seed"], upstream["output_dir"], upstream["save_every"]) == (9, "from_config", 5)


def test_the_resume_fingerprint_settings_are_the_non_default_numerics_and_the_loras(tmp_path):
    from scail_win.weights import lora

    assert pipeline.numerics_settings(argparse.Namespace()) == {}
    assert pipeline.numerics_settings(argparse.Namespace(sampler="euler", attention="auto", step_cache=0.0,
                                                             fp8_matmul=False, rope_mode="exact")) == {}
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(b"x")
    args = argparse.Namespace(sampler="unipc", step_cache="0.1", lora=[f"{weights}:0.5"])
    assert pipeline.numerics_settings(args) == dict(sampler="unipc", step_cache=0.1,
                                                        lora=lora.identity(args))
