"""scail_win.sample: options, job lines, input validation before any model, hand-over."""

import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from scail_win.cli import sample
from scail_win.io import jobs
from scail_win.errors import UserError

REPO = Path(__file__).resolve().parents[1]

BASE_YAML = """\
args:
  sampling_image_size: [64, 128]
  vae_compress_size: [4, 8, 8]
  representation: 'smpl_downsample'
model:
  network_config:
    params:
      num_frames: 81
      time_compressed_rate: 4
      latent_width: 300
      latent_height: 300
      patch_size: [1, 2, 2]
      in_channels: 20
      out_channels: 16
      hidden_size: 128
      text_dim: 64
      num_layers: 2
      num_attention_heads: 2
      elementwise_affine: false
      modules:
        adaln_layer_config:
          params:
            hidden_size_head: 128
  conditioner_config:
    params:
      emb_models:
        - target: sgm.modules.encoders.umt5.T5EncoderModel
          params:
            max_length: 512
"""


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "model config.yaml"
    path.write_text(BASE_YAML, encoding="utf-8")
    return path


def make_clip(path, frames, height=48, width=64, rate=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), index * 7 % 256, np.uint8),
                                               format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_example(folder, frames=9, ref="ref.jpg", pose="rendered.mp4", ref_size=(40, 60), rate=16):
    """An example folder as upstream expects it; ref_size is (height, width)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if ref:
        Image.new("RGB", ref_size[::-1], (200, 100, 50)).save(folder / ref)
    if pose:
        make_clip(folder / pose, frames, rate=rate)
    return folder


def run_cli(args, cwd, stdin=b"", env=None):
    environment = dict(os.environ, PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8", SCAIL_WIN_DISABLE="1")
    environment.pop("SCAIL_WEIGHTS", None)
    environment.update(env or {})
    result = subprocess.run([sys.executable, "-m", "scail_win.sample", *map(str, args)], cwd=cwd,
                            input=stdin, capture_output=True, env=environment, timeout=120)
    return result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")


def assert_user_error(result, *needles):
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None)
                  for p in Path(folder).rglob("*"))


# -- --help -------------------------------------------------------------------------------


def test_help_is_instant_and_torch_free(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(REPO), SCAIL_WIN_DISABLE="1")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "scail_win.sample", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, env=environment, timeout=60)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "scail_win.errors" in imported   # the CLI ran; it imports only this of ours
    assert not {"torch", "av", "numpy", "omegaconf", "PIL"} & imported
    for text in ("--input-dir", "--vae-tiling", "(default: 50)", "(default: 1234)", "(default: samples)"):
        assert text in result.stdout


# -- bad options: argparse usage errors -------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--input-dir", "a", "--input-file", "b"], "cannot be used together"),
    (["--input-file", "b", "--prompt", "p"], "--prompt applies to --input-dir"),
    (["--prompt", "p"], "--prompt needs --input-dir"),
    (["--resume"], "--resume needs"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--cfg-scale", "-1"], "--cfg-scale"),
    (["--vram-budget", "-2"], "--vram-budget"),
    (["--vram-budget", "nan"], "--vram-budget"),
    (["--ram-budget", "0"], "--ram-budget"),
    (["--blocks-on-gpu", "-1"], "--blocks-on-gpu"),
    (["--max-frames", "-5"], "--max-frames"),
    (["--save-every", "-1"], "--save-every"),
    (["--resolution", "512"], "HEIGHTxWIDTH"),
    (["--resolution", "0x896"], "positive"),
    (["--vae-tiling", "maybe"], "--vae-tiling"),
    (["--quiet", "--debug"], "not allowed with"),
])
def test_bad_options_exit_2_with_usage(tmp_path, args, needle):
    assert_user_error(run_cli(args, tmp_path), needle, "usage: scail-win sample")
    assert list(tmp_path.iterdir()) == []


# -- bad inputs: checked before any model, all at once -----------------------------------------


def test_every_bad_input_is_one_clear_line(tmp_path, base):
    make_example(tmp_path / "no ref", ref=None)
    make_example(tmp_path / "no pose", pose=None)
    bad_image = make_example(tmp_path / "bad image")
    (bad_image / "ref.jpg").write_bytes(b"not a jpeg")
    bad_video = make_example(tmp_path / "bad video")
    (bad_video / "rendered.mp4").write_bytes(b"\x00" * 500)
    make_example(tmp_path / "short", frames=3)
    cases = {
        "missing": "example folder not found",
        "no ref": "no reference image in",
        "no pose": "no pose video in",
        "bad image": "cannot read reference image",
        "bad video": "cannot read video",
        "short": "has 3 frame(s); at least 5",
    }
    for folder, needle in cases.items():
        result = run_cli(["--base", base, "--input-dir", folder], tmp_path)
        assert_user_error(result, needle, "error: --input-dir: ")
        assert len([l for l in result[2].splitlines() if l.startswith("error:")]) == 1
    # the whole batch at once: every problem listed, nothing started
    everything = [arg for folder in cases for arg in ("--input-dir", folder)]
    code, _, err = run_cli(["--base", base, *everything], tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "6 jobs cannot run (nothing was started)" in err
    for needle in cases.values():
        assert needle in err


def test_non_ascii_paths_are_named_in_errors(tmp_path, base):
    folder = make_example(tmp_path / "beispiel ü 日本", frames=2)
    assert_user_error(run_cli(["--base", base, "--input-dir", folder], tmp_path), str(folder / "rendered.mp4"))


def test_input_file_errors_name_the_line(tmp_path, base):
    make_example(tmp_path / "ok")
    jobs = tmp_path / "jobs ü.txt"
    jobs.write_text("dance@@ok\n\nno separator here\nx@@ok@@again\nfine@@missing\n", encoding="utf-8")
    code, _, err = run_cli(["--base", base, "--input-file", jobs], tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "3 jobs cannot run" in err
    assert "jobs ü.txt line 3: expected '<prompt>@@<example_dir>'" in err
    assert "jobs ü.txt line 4: more than one '@@'" in err
    assert "jobs ü.txt line 5: example folder not found: missing" in err


def test_stdin_lines_are_validated_too(tmp_path, base):
    result = run_cli(["--base", base], tmp_path, stdin="dance@@nowhere\n".encode())
    assert_user_error(result, "stdin line 1: example folder not found: nowhere")
    assert_user_error(run_cli(["--base", base], tmp_path, stdin=b"\n\n"), "no jobs")
    assert_user_error(run_cli(["--base", base, "--input-file", "-"], tmp_path, stdin=b"oops\n"), "stdin line 1")


def test_missing_input_file(tmp_path, base):
    assert_user_error(run_cli(["--base", base, "--input-file", "nope.txt"], tmp_path),
                      "--input-file not found: nope.txt")


def test_bad_config_files(tmp_path):
    make_example(tmp_path / "ok")
    assert_user_error(run_cli(["--base", "absent.yaml", "--input-dir", "ok"], tmp_path),
                      "--base absent.yaml: config file not found")
    broken = tmp_path / "broken.yaml"
    broken.write_text("args: [unclosed\n", encoding="utf-8")
    assert_user_error(run_cli(["--base", broken, "--input-dir", "ok"], tmp_path), "not valid YAML")
    no_size = tmp_path / "no size.yaml"
    no_size.write_text(BASE_YAML.replace("  sampling_image_size: [64, 128]\n", ""), encoding="utf-8")
    assert_user_error(run_cli(["--base", no_size, "--input-dir", "ok"], tmp_path), "pass --resolution")
    odd_size = tmp_path / "odd size.yaml"
    odd_size.write_text(BASE_YAML.replace("[64, 128]", "[520, 896]"), encoding="utf-8")
    assert_user_error(run_cli(["--base", odd_size, "--input-dir", "ok"], tmp_path),
                      "the config's sampling_image_size 520x896: height and width must be multiples of 32")


@pytest.mark.parametrize("args,needle", [
    (["--resolution", "520x896"], "multiples of 32"),
    (["--resolution", "512x4096"], "2400 pixels"),
    (["--max-frames", "120"], "at most 81 frames"),
    (["--max-frames", "4"], "at least 5 frames"),
])
def test_model_limits(tmp_path, base, args, needle):
    make_example(tmp_path / "ok")
    assert_user_error(run_cli(["--base", base, "--input-dir", "ok", *args], tmp_path), needle)


def test_long_pose_video_is_cut_with_a_warning_then_weights_are_checked(tmp_path, base):
    make_example(tmp_path / "long", frames=90)
    code, _, err = run_cli(["--base", base, "--input-dir", "long", "--weights", "no weights here"], tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "has 90 frames; using the first 81" in err
    assert "weights folder not found" in err and "no weights here" in err


def test_valid_inputs_stop_at_missing_weights_and_touch_nothing(tmp_path, base):
    make_example(tmp_path / "001")
    planned = tmp_path / "samples" / "001" / "001_output_000000.mp4"
    planned.parent.mkdir(parents=True)
    planned.write_bytes(b"an earlier result")
    before = tree(tmp_path)
    assert_user_error(run_cli(["--base", base, "--input-dir", "001", "--prompt", "dance"], tmp_path),
                      "weights folder not found")
    assert tree(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path, base):
    code, _, err = run_cli(["--base", base, "--input-dir", "missing", "--debug"], tmp_path)
    assert code == 2 and "Traceback" in err and "example folder not found" in err


# -- job lines --------------------------------------------------------------------------------


def test_parse_job_line():
    job = jobs.parse_job_line("the girl is dancing@@examples/001\n", 3, "jobs.txt")
    assert (job.prompt, job.input_dir, job.line, job.source) == ("the girl is dancing", Path("examples/001"), 3,
                                                                  "jobs.txt line 3")
    assert job.name == "001"
    assert jobs.parse_job_line("None@@ex").prompt == ""
    assert jobs.parse_job_line("@@ex").prompt == ""
    assert jobs.parse_job_line("  two  spaces @@ ex dir ").prompt == "two  spaces "   # as upstream sends it
    assert jobs.parse_job_line("p@@ ex dir ").input_dir == Path("ex dir")


@pytest.mark.parametrize("line,needle", [
    ("no separator", "expected '<prompt>@@<example_dir>'"),
    ("a@@b@@c", "more than one '@@'"),
    ("prompt@@   ", "folder after '@@' is missing"),
])
def test_parse_job_line_rejects(line, needle):
    with pytest.raises(UserError) as caught:
        jobs.parse_job_line(line, 7, "stdin")
    assert str(caught.value).startswith("stdin line 7: ") and needle in str(caught.value)


def test_job_file_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_bytes("\ufeffdance ü@@a\n\n   \nspin@@b\n".encode("utf-8"))
    found, problems = jobs.read_input_file(str(path))
    assert problems == []
    assert [(j.prompt, str(j.input_dir), j.line) for j in found] == [("dance ü", "a", 1), ("spin", "b", 4)]


def test_interactive_loop_asks_again_after_a_bad_line(monkeypatch, capsys):
    lines = iter(["bad", "", "dance@@x", "spin@@y"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def validate(job):
        if job.input_dir == Path("x"):
            raise UserError("x is broken")
        return job

    monkeypatch.setattr("builtins.input", fake_input)
    jobs = list(sample.interactive_jobs(validate))
    assert [j.prompt for j in jobs] == ["spin"] and jobs[0].line == 4
    err = capsys.readouterr().err
    assert "error: stdin line 1: expected" in err and "error: x is broken" in err


# -- validation details and the hand-over to sample_video ------------------------------------------


@pytest.fixture
def handed_over(monkeypatch):
    """Replace the lead's run_jobs with a recorder; return what it was given."""
    from scail_win import sample_video

    seen = {}

    def fake_run_jobs(opts, jobs):
        seen["opts"], seen["jobs"] = opts, list(jobs)
        return 0

    monkeypatch.setattr(sample_video, "run_jobs", fake_run_jobs)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    monkeypatch.delenv("SCAIL_WEIGHTS", raising=False)
    return seen


def test_hand_over_carries_validated_jobs(tmp_path, base, handed_over, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_example(tmp_path / "land", frames=10, ref_size=(40, 60), rate=Fraction(30000, 1001))
    portrait = make_example(tmp_path / "portrait ü", frames=90, ref="ref.png", ref_size=(60, 40),
                            pose="rendered_aligned.mp4")
    make_clip(portrait / "rendered.mp4", 9)   # rendered_aligned.mp4 wins, as upstream prefers it
    (tmp_path / "SCAIL-Preview").mkdir()
    code = sample.main(["--base", str(base), "--input-dir", "land", "--input-dir", str(portrait),
                        "--prompt", "dance", "--seed", "7", "--output-dir", "out"])
    assert code == 0
    opts, (land, port) = handed_over["opts"], handed_over["jobs"]
    assert opts.resolution == (64, 128) and opts.max_frames == 81 and opts.base == [str(base)]
    assert opts.seed == 7 and opts.steps == 50 and opts.cfg_scale == 4.0 and opts.vae_tiling == "auto"
    assert opts.weights == tmp_path / "SCAIL-Preview"
    assert land.validated and land.prompt == "dance"
    assert (land.ref_image, land.pose_video) == (Path("land/ref.jpg"), Path("land/rendered.mp4"))
    assert (land.pose_frames, land.frames, land.fps, land.size) == (10, 9, Fraction(30000, 1001), (64, 128))
    assert land.output_path == Path("out/land/land_output_000000.mp4")
    assert port.ref_image.name == "ref.png" and port.pose_video.name == "rendered_aligned.mp4"
    assert (port.pose_frames, port.frames, port.size) == (90, 81, (128, 64))
    assert port.output_path == Path("out/portrait ü/portrait ü_output_000000.mp4")


def test_packaged_config_is_the_default(tmp_path, handed_over):
    make_example(tmp_path / "ex", ref_size=(30, 20))
    assert sample.main(["--input-dir", str(tmp_path / "ex"), "--weights", str(tmp_path)]) == 0
    opts, (job,) = handed_over["opts"], handed_over["jobs"]
    assert opts.base is None and opts.resolution == (512, 896) and opts.max_frames == 81
    assert job.size == (896, 512)


def test_weights_folder_from_the_environment(tmp_path, base):
    make_example(tmp_path / "ex")
    result = run_cli(["--base", base, "--input-dir", "ex"], tmp_path, env={"SCAIL_WEIGHTS": "elsewhere ü"})
    assert_user_error(result, "weights folder not found", str(tmp_path / "elsewhere ü"))


def test_weights_flag_wins_over_the_environment(tmp_path, base, handed_over, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCAIL_WEIGHTS", str(tmp_path / "elsewhere"))
    make_example(tmp_path / "ex")
    (tmp_path / "given").mkdir()
    assert sample.main(["--base", str(base), "--input-dir", "ex", "--weights", "given"]) == 0
    assert handed_over["opts"].weights == tmp_path / "given"


def test_max_frames_is_rounded_to_whole_groups(tmp_path, base, handed_over):
    make_example(tmp_path / "ex", frames=30)
    code = sample.main(["--base", str(base), "--input-dir", str(tmp_path / "ex"), "--max-frames", "20",
                        "--smoke"])
    assert code == 0
    assert handed_over["opts"].max_frames == 17 and handed_over["jobs"][0].frames == 17


def test_stdin_batch_is_read_whole_before_running(tmp_path, base, handed_over, monkeypatch):
    make_example(tmp_path / "a")
    make_example(tmp_path / "b")
    data = f"one@@{tmp_path / 'a'}\ntwo@@{tmp_path / 'b'}\n".encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert sample.main(["--base", str(base), "--smoke"]) == 0
    assert [j.prompt for j in handed_over["jobs"]] == ["one", "two"]


@pytest.mark.parametrize("raised,code,needle", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (UserError("out of disk space in samples"), 2, "error: out of disk space in samples"),
])
def test_errors_from_the_run_map_to_exit_codes(tmp_path, base, monkeypatch, capsys, raised, code, needle):
    from scail_win import sample_video

    def failing_run_jobs(opts, jobs):
        raise raised

    monkeypatch.setattr(sample_video, "run_jobs", failing_run_jobs)
    make_example(tmp_path / "ex")
    assert sample.main(["--base", str(base), "--input-dir", str(tmp_path / "ex"), "--smoke"]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_limits_from_config(tmp_path):
    from omegaconf import OmegaConf

    from scail_win.model.spec import ModelSpec

    limits = jobs.ModelLimits.from_spec(ModelSpec.from_config(OmegaConf.create(BASE_YAML)))
    assert limits == jobs.ModelLimits(max_frames=81, frame_group=4, size_multiple=32, max_height=2400,
                                        max_width=2400)
    dwpose = OmegaConf.create(BASE_YAML.replace("smpl_downsample", "dwpose").replace("num_frames: 81",
                                                                                     "num_frames: 49"))
    limits = jobs.ModelLimits.from_spec(ModelSpec.from_config(dwpose))
    assert (limits.size_multiple, limits.max_frames) == (16, 49)


def test_config_without_a_network_dimension_is_a_user_error(tmp_path):
    base = tmp_path / "no-layers.yaml"
    base.write_text(BASE_YAML.replace("      num_layers: 2\n", ""), encoding="utf-8")
    make_example(tmp_path / "ex")
    assert_user_error(run_cli(["--base", base, "--input-dir", tmp_path / "ex"], tmp_path),
                      "model.network_config.params.num_layers", str(base))


@pytest.mark.scail
def test_upstream_configs_give_upstream_limits():
    root = os.environ.get("SCAIL_ROOT")
    if not root:
        pytest.skip("SCAIL_ROOT is not set")
    paths = [Path(root) / "configs/video_model/Wan2.1-i2v-14Bsc-pose-xc-latent.yaml",
             Path(root) / "configs/sampling/wan_pose_14Bsc_xc_cli.yaml"]
    from scail_win.arguments import load_config

    config = load_config(paths)
    assert jobs.config_resolution(config) == (512, 896)
    from scail_win.model.spec import ModelSpec

    assert jobs.ModelLimits.from_spec(ModelSpec.from_config(config)) == jobs.ModelLimits()
