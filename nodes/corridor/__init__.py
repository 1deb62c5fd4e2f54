"""The corridor: the only code of the ComfyUI wing that touches ComfyUI internals.

It turns ComfyUI objects into the engine's interfaces and the engine's events into ComfyUI's. One module per
concern; nodes import the module they need (``from .corridor import folders``) and never reach into ``comfy``:

- :mod:`.families`  what Kiln knows about each model family (SD1.x, SD2.x, SDXL ...): the one place that does
- :mod:`.denoiser`  the network the engine trains, called the way ComfyUI calls it (``extra_conds``)
- :mod:`.text`      text encoders: cached caption encoding, and encoding with gradients for text-encoder training
- :mod:`.patching`  per-clone adapters on a shared module tree, loading for training, LoraLoader key checks
- :mod:`.encode`    VAE latents, cached across re-queues (bounded)
- :mod:`.paths`     ComfyUI's folders, safe names inside them, captioner model folders
- :mod:`.progress`  progress bars, progress text, websocket events, Cancel
- :mod:`.preview`   preview images with ComfyUI's own sampler
- :mod:`.devices`   compute device, dtype, memory
- :mod:`.errors`    :class:`KilnUserError`
"""

from .errors import KilnUserError

__all__ = ["KilnUserError"]
