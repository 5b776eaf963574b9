"""`python -m faceclip_zoo bench`: faceclip_zoo against what a user would run instead,
side by side in one process on one machine (benchmarks, not tests).

Sections (each a table row or two): encoder (contrastive step vs open_clip; cached vs
computed frozen features; our encoder forward vs the release's computation), diffusion
(SDXLJointModule / FluxJointModule vs plain diffusers training steps), inference
(FaceCLIPSDXLPipeline vs StableDiffusionXLPipeline), data (shard loader vs step
consumption; prepare vs its detector). Extras, run only when named: align (alignment
accuracy), resume (mid-epoch resume cost).
"""
