"""scail_win.pipeline's steps that need no SCAIL classes: the job check and the conditioning it assembles."""
import types

import pytest
import torch

from scail_win import pipeline
from scail_win.errors import UserError


def _model(**attrs):
    return types.SimpleNamespace(compute_device=torch.device("cpu"), **attrs)


def test_a_model_that_does_not_encode_the_video_is_refused_in_one_line():
    with pytest.raises(UserError, match="i2v_encode_video: false"):
        pipeline.check_job(_model(i2v_encode_video=False), job=None)
    pipeline.check_job(_model(i2v_encode_video=True), job=None)


@pytest.mark.parametrize("with_clip", [True, False])
def test_conditioning_holds_the_latents_for_both_branches_and_the_latent_shape(with_clip):
    image, ref, pose = torch.randn(1, 5, 16, 6, 4), torch.randn(1, 1, 16, 6, 4), torch.randn(1, 5, 16, 6, 4)
    clip = torch.randn(1, 257, 1280) if with_clip else None
    text = ({"crossattn": torch.randn(1, 7, 32), "vector": torch.randn(2, 3)},
            {"crossattn": torch.zeros(1, 7, 32), "vector": torch.zeros(2, 3)})
    cond = pipeline.conditioning(_model(), pipeline.VideoLatents(image, ref, pose, clip), text)
    assert cond.shape == (5, 16, 6, 4)
    for d, source in ((cond.c, text[0]), (cond.uc, text[1])):
        assert d["concat_images"] is image and d["ref_concat"] is ref
        assert d["concat_pose"] is pose and d["concat_smpl_render"] is pose
        assert ("image_clip_features" in d) == with_clip
        assert d["vector"].shape == (1, 3)  # upstream keeps the first row of the non-text embeddings
    assert torch.equal(cond.c["crossattn"], text[0]["crossattn"])
    assert not torch.equal(cond.c["crossattn"], cond.uc["crossattn"])
