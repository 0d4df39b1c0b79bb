"""scail_win.arguments: flags, config merging, weights paths, the process group.

Config and parser tests run in this process (sat is imported once, through
the start-up hook's triton_rotary redirect). Everything that starts
torch.distributed runs in a child process, so no process group leaks between
tests: one process on the CPU (the Windows path), two processes under a
torchrun-style environment (upstream's tcp:// path), and on a GPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scail_win import arguments, hook
from scail_win.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "configs" / arguments.PACKAGED_CONFIG
WEIGHT_KEYS = {  # where the packaged config names weight files, relative to the weights folder
    ("args", "load"): "model",
    ("model", "conditioner_config", "params", "emb_models", 0, "params", "checkpoint_path"):
        "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth",
    ("model", "conditioner_config", "params", "emb_models", 0, "params", "tokenizer_path"): "umt5-xxl",
    ("model", "i2v_clip_config", "params", "checkpoint_path"):
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth",
    ("model", "first_stage_config", "params", "vae_pth"): "Wan2.1_VAE.pth",
}
SCAIL_WIN_KEYS = {"weights", "vram_budget", "blocks_on_gpu", "ram_budget", "t5_cpu", "vae_tiling",
                  "rope_mode", "embed_cache", "offload"}


@pytest.fixture(scope="module", autouse=True)
def sat_imported():
    """Import sat once, with triton_rotary redirected by the real start-up hook."""
    if "sat.arguments" not in sys.modules:
        had_hook = any(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path)
        hook.install()
        try:
            importlib.import_module("sat.arguments")
        finally:
            if not had_hook:
                hook.uninstall()
    return sys.modules["sat.arguments"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No weights variable, no torchrun variables; the current directory is tmp_path."""
    for name in (arguments.WEIGHTS_ENV, "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def parse(argv=()):
    """Parser and namespace as get_args builds them, before the configs are merged."""
    parser = arguments.build_parser()
    return parser, parser.parse_args(list(argv))


def merged(argv=()):
    parser, args = parse(argv)
    return arguments.process_config_to_args(args, given=arguments._flags_given(parser, list(argv)))


def lookup(config, keys):
    for key in keys:
        config = config[key]
    return config


# ------------------------------------------------------------- packaged config


def test_packaged_config_is_found_in_the_source_tree():
    assert arguments.packaged_config_path() == PACKAGED
    assert arguments.PACKAGED_CONFIG in arguments.packaged_config_names()
    with pytest.raises(ValueError):
        arguments.packaged_config_path("configs/" + arguments.PACKAGED_CONFIG)
    with pytest.raises(UserError, match="no packaged config named nope.yaml"):
        arguments.packaged_config_path("nope.yaml")


@pytest.mark.slow
def test_installed_package_finds_its_config_through_importlib_resources(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO / "scail_win", site / "scail_win", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", site / "scail_win" / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    code = "from scail_win import arguments; print(arguments.packaged_config_path())"
    env = dict(os.environ, PYTHONPATH=str(site), SCAIL_WIN_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "scail_win" / "configs" / arguments.PACKAGED_CONFIG


def test_missing_base_uses_the_packaged_config(clean_env, caplog):
    with caplog.at_level(logging.INFO, logger=arguments.__name__):
        args = merged()
    assert args.base == [str(PACKAGED)]
    assert sum("packaged config" in r.getMessage() for r in caplog.records) == 1
    assert args.mode == "inference" and args.bf16 is True
    assert args.sampling_image_size == [512, 896] and args.vae_compress_size == [4, 8, 8]
    assert args.representation == "smpl_downsample" and args.sampling_fps == 16
    assert args.model_config.network_config.params.num_layers == 40
    # sample_video edits the model config in place: it must stay an OmegaConf node.
    args.model_config.network_config.params.transformer_args.checkpoint_activations = False


def test_base_naming_a_packaged_config_that_is_not_here_uses_the_packaged_one(clean_env, caplog):
    missing = Path("configs") / "sampling" / arguments.PACKAGED_CONFIG
    with caplog.at_level(logging.INFO, logger=arguments.__name__):
        args = merged(["--base", str(missing)])
    assert args.base == [str(PACKAGED)]
    assert any(str(missing) in r.getMessage() and "packaged" in r.getMessage() for r in caplog.records)


def test_base_file_here_wins_over_a_packaged_name(clean_env):
    local = write_yaml(clean_env / arguments.PACKAGED_CONFIG, """\
        args:
          mode: inference
          sampling_fps: 5
        """)
    args = merged(["--base", local.name])
    assert args.base == [local.name] and args.sampling_fps == 5
    assert not hasattr(args, "model_config")


# ------------------------------------------------------------- merging


def test_configs_merge_in_order_and_sections_go_where_upstream_puts_them(clean_env):
    first = write_yaml(clean_env / "a.yaml", """\
        args:
          mode: inference
          sampling_fps: 10
          sampling_image_size: [256, 448]
        model:
          scale_factor: 1.0
          nested: {keep: 1, change: 1}
        data:
          target: x
        """)
    second = write_yaml(clean_env / "b.yaml", """\
        args:
          sampling_fps: 12
        model:
          nested: {change: 2}
        deepspeed:
          train_micro_batch_size_per_gpu: 3
        """)
    args = merged(["--base", first.name, second.name])
    assert args.sampling_fps == 12 and args.sampling_image_size == [256, 448]
    assert isinstance(args.sampling_image_size, list)
    assert dict(args.model_config.nested) == {"keep": 1, "change": 2}
    assert args.deepspeed_config == {"train_micro_batch_size_per_gpu": 3}
    assert isinstance(args.deepspeed_config, dict)
    assert args.data_config.target == "x"


def test_command_line_flags_win_over_the_config(clean_env):
    args = merged(["--sampling-fps", "8", "--seed", "9", "--vae-tiling", "off"])
    assert args.sampling_fps == 8 and args.seed == 9 and args.vae_tiling == "off"
    assert args.bf16 is True  # the config still sets what the command line left alone


def test_flags_given_names_only_what_the_command_line_set():
    parser = arguments.build_parser()
    given = arguments._flags_given(parser, ["--sampling-fps", "16", "--no-t5-cpu", "--base", "x.yaml"])
    assert given == {"sampling_fps", "t5_cpu", "base"}  # 16 is also the default: still given


def test_flags_given_handles_a_repeated_flag():
    parser = arguments.build_parser()
    assert arguments._flags_given(parser, ["--lora", "a.safetensors", "--lora", "b"]) == {"lora"}
    assert "lora" not in arguments._flags_given(parser, ["--seed", "3"])


def test_unknown_args_keys_are_named_in_a_warning(clean_env, caplog):
    config = write_yaml(clean_env / "c.yaml", """\
        args:
          mode: inference
          seed: 7
          no_such_flag: 1
          i2v_encode_video: true
        """)
    with caplog.at_level(logging.WARNING, logger=arguments.__name__):
        args = merged(["--base", str(config)])
    assert args.seed == 7 and not hasattr(args, "no_such_flag")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no_such_flag" in warnings[0] and "i2v_encode_video" in warnings[0] and "c.yaml" in warnings[0]


def test_the_packaged_config_merges_without_warnings(clean_env, caplog):
    with caplog.at_level(logging.WARNING):
        merged()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("text, needle", [
    ("args:\n  mode: inference: now\n", "not valid YAML (line 2, column 18: mapping values"),
    ("args:\n\tmode: inference\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping of sections"),
    ("args: 3\n", "section args: must be a mapping"),
    ("args:\n  load: ${nowhere}\n", "nowhere"),
])
def test_malformed_config_is_a_one_line_user_error(clean_env, text, needle):
    bad = clean_env / "bad config.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        merged(["--base", str(bad)])
    message = str(caught.value)
    assert needle in message and "bad config.yaml" in message and "\n" not in message


def test_missing_config_is_a_user_error_naming_it(clean_env):
    with pytest.raises(UserError, match=r"--base nowhere\.yaml: config file not found") as caught:
        merged(["--base", "nowhere.yaml"])
    assert "\n" not in str(caught.value)
    (clean_env / "folder.yaml").mkdir()
    with pytest.raises(UserError, match="not a file"):
        merged(["--base", "folder.yaml"])


def test_non_utf8_config_is_a_user_error(clean_env):
    bad = clean_env / "latin1.yaml"
    bad.write_bytes("args:\n  save_tag: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        merged(["--base", str(bad)])


# ------------------------------------------------------------- weights folder


def test_weights_default_to_scail_preview_in_the_current_directory(clean_env):
    args = merged()
    root = clean_env / arguments.DEFAULT_WEIGHTS_DIR
    assert args.weights == str(root)
    config = {"args": {"load": args.load}, "model": args.model_config}
    for keys, relative in WEIGHT_KEYS.items():
        value = lookup(config, keys)
        assert Path(value).is_absolute() and Path(value) == root / relative, keys


def test_weights_from_the_environment(clean_env, monkeypatch):
    folder = clean_env / "env wëights"
    monkeypatch.setenv(arguments.WEIGHTS_ENV, str(folder))
    args = merged()
    assert args.weights == str(folder)
    assert Path(args.model_config.first_stage_config.params.vae_pth) == folder / "Wan2.1_VAE.pth"


def test_weights_flag_wins_over_the_environment_and_may_be_relative(clean_env, monkeypatch):
    monkeypatch.setenv(arguments.WEIGHTS_ENV, str(clean_env / "from-env"))
    args = merged(["--weights", "my weights"])
    assert args.weights == str(clean_env / "my weights")
    assert Path(args.load) == clean_env / "my weights" / "model"


def test_weights_named_in_a_config_sit_between_flag_and_environment(clean_env, monkeypatch):
    monkeypatch.setenv(arguments.WEIGHTS_ENV, str(clean_env / "from-env"))
    extra = write_yaml(clean_env / "w.yaml", "args:\n  weights: from-config\n")
    args = merged(["--base", str(PACKAGED), str(extra)])
    assert Path(args.load) == clean_env / "from-config" / "model"
    args = merged(["--base", str(PACKAGED), str(extra), "--weights", "from-flag"])
    assert Path(args.load) == clean_env / "from-flag" / "model"


def test_load_config_resolves_for_other_callers(clean_env):
    config = arguments.load_config(weights=clean_env / "w")
    assert config.args.weights == str(clean_env / "w")
    assert Path(config.model.i2v_clip_config.params.checkpoint_path).parent == clean_env / "w"
    assert arguments.resolve_weights_dir("~") == Path(os.path.expanduser("~"))


# ------------------------------------------------------------- flags


def test_scail_win_flags_default_to_upstream_behaviour():
    _, args = parse()
    assert (args.weights, args.vram_budget, args.blocks_on_gpu, args.ram_budget) == (None, None, None, None)
    assert (args.t5_cpu, args.vae_tiling, args.rope_mode, args.embed_cache, args.offload) == (
        False, "auto", "fp32", None, "auto")


def test_scail_win_flags_parse_and_reject_bad_values(capsys):
    _, args = parse(["--vram-budget", "7.5", "--blocks-on-gpu", "0", "--ram-budget", "auto", "--t5-cpu",
                     "--vae-tiling", "ON", "--rope-mode", "exact", "--embed-cache", "cache dir",
                     "--offload", "none"])
    assert (args.vram_budget, args.blocks_on_gpu, args.ram_budget, args.t5_cpu) == (7.5, 0, None, True)
    assert (args.vae_tiling, args.rope_mode, args.embed_cache, args.offload) == ("on", "exact", "cache dir", "none")
    assert parse(["--t5-cpu", "--no-t5-cpu"])[1].t5_cpu is False
    for bad in (["--vram-budget", "-1"], ["--blocks-on-gpu", "2.5"], ["--vae-tiling", "sometimes"],
                ["--offload", "disk"]):
        with pytest.raises(SystemExit):
            parse(bad)
        assert bad[0] in capsys.readouterr().err


def test_scail_win_values_in_a_config_are_checked(clean_env):
    good = write_yaml(clean_env / "good.yaml", """\
        args:
          vae_tiling: on
          vram_budget: "6"
          blocks_on_gpu: 4
          t5_cpu: true
        """)
    args = merged(["--base", str(PACKAGED), str(good)])
    assert (args.vae_tiling, args.vram_budget, args.blocks_on_gpu, args.t5_cpu) == ("on", 6.0, 4, True)
    bad = write_yaml(clean_env / "bad.yaml", "args:\n  vram_budget: -2\n")
    with pytest.raises(UserError, match="vram_budget"):
        merged(["--base", str(PACKAGED), str(bad)])


def test_upstream_flags_are_all_there():
    _, args = parse()
    upstream = {
        "base", "model_parallel_size", "sequence_parallel_size", "force_pretrain", "device", "debug",
        "log_image", "model_type", "num_multi_query_heads", "output_dir", "input_dir", "input_type",
        "input_file", "sampling_image_size", "final_size", "sdedit", "grid_num_rows", "force_inference",
        "lcm_steps", "sampling_num_frames", "sampling_fps", "only_save_latents", "only_log_video_latents",
        "latent_channels", "vae_compress_size", "image2video", "horizontal_only", "use_pose",
        "representation", "save_tag", "multi_cond_cfg",
        # from sat
        "mode", "seed", "load", "batch_size", "bf16", "fp16", "zero_stage", "distributed_backend",
        "local_rank", "train_data", "eval_iters", "num_workers", "checkpoint_activations",
    }
    assert upstream <= set(vars(args))
    assert args.device == -1 and args.sampling_fps == 8 and args.log_image is True and args.use_pose is False
    # Upstream's type=bool read "False" as true.
    assert parse(["--use_pose", "False", "--multi_cond_cfg", "true"])[1].use_pose is False
    assert parse(["--vae-compress-size", "4", "8", "8"])[1].vae_compress_size == [4, 8, 8]


def test_help_works_despite_sats_percent_sign(capsys):
    with pytest.raises(SystemExit) as caught:
        parse(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "--vram-budget GB" in out and "1% of all" in out


def test_deepspeed_absent_still_leaves_deepspeed_config():
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    parser, args = parse()
    assert args.deepspeed is False and args.deepspeed_config is None
    del args.deepspeed_config  # what upstream's sample_video does
    with pytest.raises(SystemExit):
        parser.parse_args(["--deepspeed_config", "x.json"])


def test_training_mode_without_deepspeed_is_a_user_error(clean_env):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    args = merged(["--mode", "finetune"])
    with pytest.raises(UserError, match="DeepSpeed is not installed"):
        arguments._configure_precision_and_deepspeed(args)


def test_with_deepspeed_its_flags_and_training_config_follow_upstream(clean_env, monkeypatch):
    def add_config_arguments(parser):
        group = parser.add_argument_group("DeepSpeed")
        group.add_argument("--deepspeed", action="store_true")
        group.add_argument("--deepspeed_config", default=None)
        return parser

    monkeypatch.setattr(arguments, "_deepspeed", lambda: argparse.Namespace(add_config_arguments=add_config_arguments))
    assert parse(["--deepspeed_config", "x.json"])[1].deepspeed_config == "x.json"
    args = merged(["--mode", "finetune", "--batch-size", "3", "--lr", "0.5"])
    arguments._assign_rank_and_device(args)
    arguments._configure_precision_and_deepspeed(args)  # bf16 from the packaged config
    ds = args.deepspeed_config
    assert args.deepspeed is True and args.deepspeed_activation_checkpointing is False
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["optimizer"]["params"]["lr"] == 0.5

    given = write_yaml(clean_env / "ds.yaml", """\
        args:
          mode: finetune
        deepspeed:
          train_micro_batch_size_per_gpu: 2
          fp16: {enabled: true}
          optimizer: {params: {lr: 0.25}}
        """)
    args = merged(["--base", str(given)])
    arguments._assign_rank_and_device(args)
    arguments._configure_precision_and_deepspeed(args)
    assert (args.fp16, args.bf16, args.batch_size, args.lr) == (True, False, 2, 0.25)
    assert args.gradient_accumulation_steps is None  # upstream: the config's value, here none


def test_cpu_only_machine_gets_the_cpu(clean_env):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = merged()
    arguments._assign_rank_and_device(args)
    assert (args.device, args.rank, args.world_size, args.local_rank, args.cuda) == ("cpu", 0, 1, 0, False)
    args = merged(["--device", "0"])
    with pytest.raises(UserError, match="no CUDA GPU"):
        arguments._assign_rank_and_device(args)


def test_bad_torchrun_variables_are_user_errors(clean_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE"):
        arguments._assign_rank_and_device(merged())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="inconsistent"):
        arguments._assign_rank_and_device(merged())


def test_seed_must_be_positive():
    with pytest.raises(ValueError):
        arguments.set_random_seed(0)
    args = argparse.Namespace(mode="inference", train_data=None, train_iters=None, epochs=None,
                              train_data_weights=None, seed=0)
    with pytest.raises(UserError, match="--seed"):
        arguments._check_training_flags(args)


def test_sat_reexports_match_upstreams_module(sat_imported):
    assert arguments.mpu is importlib.import_module("sat.mpu")
    assert arguments.print_rank0 is importlib.import_module("sat.helpers").print_rank0
    with pytest.raises(AttributeError):
        arguments.no_such_name  # noqa: B018


# ------------------------------------------------------------- child processes

CHILD = r'''
import json, os, sys, time
from scail_win import hook
hook.install()
import torch, torch.distributed as dist
from sat import mpu
from scail_win import arguments

def listening_hosts():
    """Hex host part of every listening TCP socket of this process (Linux)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    hosts = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    hosts.append(fields[1].split(":")[0])
    return hosts

start = time.perf_counter()
args = arguments.get_args(json.loads(sys.argv[1]))
elapsed = time.perf_counter() - start
# The collectives upstream's sampling path calls, on the model-parallel group.
device = "cpu" if args.device == "cpu" else "cuda"
group = mpu.get_model_parallel_group()
src = dist.get_process_group_ranks(group)[0]
out = torch.empty(4, device=device)
dist.all_to_all_single(out, torch.arange(4.0, device=device), group=group)
dist.barrier(group=group)
objects = [{"prompt": "p"}, args.rank] if args.rank == src else [None, None]
dist.broadcast_object_list(objects, src=src, group=group)
tensor = torch.full((2,), float(args.rank), device=device)
dist.broadcast(tensor, src=src, group=group)
gathered = [torch.empty_like(tensor)] if args.rank == src else None
dist.gather(tensor, gather_list=gathered, dst=src, group=group)
collectives_ok = objects == [{"prompt": "p"}, src] and tensor.tolist() == [float(src)] * 2
report = dict(
    elapsed=elapsed, device=args.device, rank=args.rank, world=dist.get_world_size(),
    backend=dist.get_backend(), mp=mpu.get_model_parallel_world_size(),
    dp=mpu.get_data_parallel_world_size(),
    sp=mpu.get_sequence_parallel_world_size() if hasattr(mpu, "get_sequence_parallel_world_size") else None,
    broadcast_group=hasattr(mpu, "get_data_broadcast_group") and mpu.get_data_broadcast_group() is not None,
    sat=os.path.dirname(mpu.__file__), seed=args.seed, sampling_fps=args.sampling_fps,
    has_deepspeed_config=hasattr(args, "deepspeed_config"), weights=args.weights,
    vae=args.model_config.first_stage_config.params.vae_pth,
    again=arguments.initialize_distributed(args), all_to_all=out.tolist(), collectives_ok=collectives_ok,
    cuda_current=torch.cuda.current_device() if torch.cuda.is_available() else None,
    listening=listening_hosts() if sys.platform.startswith("linux") else None,
)
del args.deepspeed_config
dist.barrier()
print("REPORT " + json.dumps(report))
'''

LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net shows them


def child_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", arguments.WEIGHTS_ENV)}
    path = [str(REPO)]
    if extra.pop("vendored_sat", None):
        path.insert(0, extra.pop("scail_root"))
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start_child(tmp_path: Path, argv, env) -> subprocess.Popen:
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD, encoding="utf-8")
    return subprocess.Popen([sys.executable, str(script), json.dumps(list(argv))], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen, timeout: float = 240) -> dict:
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
        pytest.fail(f"child hung:\n{stderr[-3000:]}")
    assert child.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, stdout[-2000:] + stderr[-2000:]
    return json.loads(lines[-1][len("REPORT "):])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_get_args_single_process_on_the_cpu(tmp_path):
    weights = tmp_path / "wëights with space"
    # CUDA_VISIBLE_DEVICES="": a CPU-only machine, even where the tests run on a GPU host.
    env = child_env(tmp_path, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                    CUDA_VISIBLE_DEVICES="", **{arguments.WEIGHTS_ENV: str(weights)})
    report = finish(start_child(tmp_path, ["--sampling-fps", "8", "--seed", "11"], env))
    assert report["device"] == "cpu" and report["rank"] == 0 and report["world"] == 1
    assert report["backend"] == arguments.LOCAL_BACKEND
    assert report["mp"] == 1 and report["dp"] == 1 and report["sp"] in (None, 1)
    assert report["all_to_all"] == [0.0, 1.0, 2.0, 3.0] and report["collectives_ok"]
    assert report["again"] is False  # initialised once; the second call is a no-op
    assert report["elapsed"] < 20, report["elapsed"]
    assert report["seed"] == 11 and report["sampling_fps"] == 8 and report["has_deepspeed_config"]
    assert report["weights"] == str(weights) and Path(report["vae"]) == weights / "Wan2.1_VAE.pth"
    if report["listening"] is not None:
        # No rendezvous server (upstream's tcp:// store listens on every interface).
        assert set(report["listening"]) <= LOOPBACK_HEX, report["listening"]


@pytest.mark.slow
def test_get_args_under_torchrun_uses_upstreams_tcp_path(tmp_path):
    port = str(free_port())
    children = []
    for rank in (0, 1):
        env = child_env(tmp_path, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")
        children.append(start_child(tmp_path, ["--distributed-backend", "gloo", "--seed", "100"], env))
    reports = [finish(child) for child in children]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world"] == 2 and report["backend"] == "gloo"
        assert report["mp"] == 1 and report["dp"] == 2 and report["collectives_ok"]
        assert report["seed"] == 100 + rank  # upstream offsets the seed by the data-parallel rank


@pytest.mark.scail
@pytest.mark.slow
def test_get_args_with_scails_vendored_sat(tmp_path):
    root = os.environ.get("SCAIL_ROOT")
    if not root:
        pytest.skip("SCAIL_ROOT is not set")
    env = child_env(tmp_path, vendored_sat=True, scail_root=root, WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="")
    report = finish(start_child(tmp_path, [], env))
    assert Path(report["sat"]).resolve().is_relative_to(Path(root).resolve())
    assert report["sp"] == 1 and report["mp"] == 1 and report["broadcast_group"] is True
    assert report["backend"] == arguments.LOCAL_BACKEND and report["again"] is False


@pytest.mark.scail
def test_packaged_config_equals_upstreams_two_files(clean_env):
    root = os.environ.get("SCAIL_ROOT")
    if not root:
        pytest.skip("SCAIL_ROOT is not set")
    from omegaconf import OmegaConf
    upstream = OmegaConf.to_container(OmegaConf.merge(
        OmegaConf.load(Path(root) / "configs" / "video_model" / "Wan2.1-i2v-14Bsc-pose-xc-latent.yaml"),
        OmegaConf.load(Path(root) / "configs" / "sampling" / "wan_pose_14Bsc_xc_cli.yaml")))
    weights = clean_env / "SCAIL-Preview"
    ours = OmegaConf.to_container(arguments.load_config(weights=weights))
    for keys in WEIGHT_KEYS:  # upstream's relative paths, resolved against the same folder
        *parents, last = keys
        holder = lookup(upstream, parents)
        holder[last] = str(clean_env / holder[last])
    for dropped in ("i2v_encode_video", "use_i2v_clip"):  # no flag reads them under args:
        del upstream["args"][dropped]
    assert {k: v for k, v in ours["args"].items() if k not in SCAIL_WIN_KEYS} == upstream["args"]
    assert ours["model"] == upstream["model"]


@pytest.mark.gpu
@pytest.mark.slow
def test_get_args_on_a_gpu(tmp_path):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    # The GPU machine may have only SCAIL's vendored sat, not PyPI's.
    root = os.environ.get("SCAIL_ROOT")
    extra = dict(vendored_sat=True, scail_root=root) if root else {}
    env = child_env(tmp_path, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", **extra)
    report = finish(start_child(tmp_path, [], env))
    assert report["device"] == "cuda" and report["cuda_current"] == 0
    assert report["all_to_all"] == [0.0, 1.0, 2.0, 3.0] and report["collectives_ok"]
    assert report["backend"] == arguments.LOCAL_BACKEND and report["world"] == 1


@pytest.mark.gpu
@pytest.mark.slow
def test_torchrun_on_two_gpus_uses_nccl(tmp_path):
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    root = os.environ.get("SCAIL_ROOT")
    port = str(free_port())
    children = []
    for rank in (0, 1):
        extra = dict(vendored_sat=True, scail_root=root) if root else {}
        env = child_env(tmp_path, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        # SCAIL's vendored sat shards the sequence over both GPUs; PyPI's sat has no sequence parallelism.
        argv = ["--sequence-parallel-size", "2"] if root else []
        children.append(start_child(tmp_path, argv, env))
    reports = [finish(child) for child in children]
    for rank, report in enumerate(reports):
        assert report["backend"] == "nccl" and report["world"] == 2
        assert report["device"] == "cuda" and report["cuda_current"] == rank and report["collectives_ok"]
        if root:
            assert report["sp"] == 2 and report["dp"] == 1
