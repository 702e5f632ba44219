"""Model surgery on checkpoints at rest: depth up-scaling and weight-averaging merges (docs/upscale.md).

    tensorfile.py  safetensors read and written one tensor at a time; peak-memory measurement
    source.py      an openmill or Hugging Face folder as named tensors on disk; the output folder
    upscale.py     Depth Up-Scaling (SOLAR): layer maps and the streaming copy
    merge.py       linear and SLERP weight averaging
"""

from openmill.surgery.merge import merge
from openmill.surgery.source import SurgeryError, open_checkpoint
from openmill.surgery.upscale import depth_upscale, dus_layer_map, upscale

__all__ = ["SurgeryError", "depth_upscale", "dus_layer_map", "merge", "open_checkpoint", "upscale"]
