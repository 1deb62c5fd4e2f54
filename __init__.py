"""LoRA Kiln: train LoRA adapters inside the ComfyUI graph.

ComfyUI loads this package from ``custom_nodes/``; it finds the nodes through ``comfy_entrypoint`` and the
frontend extensions in ``WEB_DIRECTORY``. Outside ComfyUI (the engine's tests, ``lora_core`` used as a
library) importing it does nothing.
"""

import logging

WEB_DIRECTORY = "./web/js"

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # not running inside ComfyUI
    logging.getLogger(__name__).debug("ComfyUI not importable: LoRA Kiln nodes are not registered")
else:

    class KilnExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            from .nodes import NODES

            return list(NODES)

    async def comfy_entrypoint() -> KilnExtension:
        return KilnExtension()
