"""Socket types of LoRA Kiln (type names are part of saved workflows: never rename them)."""

from comfy_api.latest import io

KilnDatasetType = io.Custom("KILN_DATASET")
KilnStateType = io.Custom("KILN_STATE")

CATEGORY = "LoRA Kiln"
