"""Model surgery on checkpoints at rest: depth up-scaling and weight-averaging merges (docs/upscale.md).

    tensorfile.py  safetensors read and written one tensor at a time; peak-memory measurement
    source.py      an openmill or Hugging Face folder as named tensors on disk; the output folder
    upscale.py     Depth Up-Scaling (SOLAR): layer maps and the streaming copy
    merge.py       linear and SLERP weight averaging
    config.py      the recipe sections of the upscale and continue_pretrain stages

Nothing is imported here: config.py is read by openmill.config, which the rest imports.
"""

