"""Inference defaults of the release's own scripts (its SDXL and FLUX inference files),
in one place: the pipelines, `generate` and `evaluate` read them from here, and the README's
"Release defaults" table lists them.

The release conditions the unconditional branch of classifier-free guidance on a zero face
and a fixed negative text, never on an empty prompt; our pipelines do the same unless the
caller passes `negative_prompt=""`.
"""

from __future__ import annotations

# The SDXL script's negative text.
SDXL_NEGATIVE_PROMPT = (
    "nude, worst quality, low quality, normal quality, nsfw, abstract, glitch, deformed, "
    "mutated, ugly, disfigured, text, watermark, bad hands, error, jpeg artifacts, blurry, "
    "missing fingers, poorly drawn face, ugly eyes, imperfect eyes, deformed pupils, deformed iris, bad anatomy"
)
# The FLUX script's negative text: the SDXL one with style and occlusion terms in front.
FLUX_NEGATIVE_PROMPT = (
    "digital painting, 3d render, CGI, cartoon, anime, unreal, stylized, overexposed, glossy skin, "
    "wearing mask, looking away from the camera, wearing glasses, wearing sunglasses, "
) + SDXL_NEGATIVE_PROMPT

# Euler discrete (the scheduler the exported SDXL folder carries), CFG 5.0, 1152 x 864.
SDXL_DEFAULTS = dict(num_inference_steps=50, guidance_scale=5.0, height=1152, width=864)
# FlowMatch Euler, true CFG 3.5 against the negative branch, FLUX.1-dev's distilled
# guidance input 1.0, 1152 x 864.
FLUX_DEFAULTS = dict(num_inference_steps=50, true_cfg_scale=3.5, guidance_scale=1.0, height=1152, width=864)

# Wan 2.1 text-to-video (no FaceCLIP release covers video): diffusers' WanPipeline
# defaults, i.e. Wan's own 480p setting: UniPC with flow shift 3.0, 50 steps, CFG 5.0,
# 81 frames of 480 x 832 (16 fps).
WAN_DEFAULTS = dict(num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81)
WAN_FPS = 16
