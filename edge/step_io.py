"""Input and output names of the portable training step graph (train_step.onnx).

Inputs: the batch (named by the manifest's input kind: `features` or `pixels`), `labels` (int64),
`step` (float32 count of this update, 1 for the first), `lr`, `weight_decay` (float32 scalars),
then every LoRA tensor by its adapter name, then the AdamW moments `adam_m.<name>` and
`adam_v.<name>`. Outputs: `loss`, `correct` (int64 arg-max hits), then `new.<name>` for every
LoRA tensor and moment, in the same order as the inputs.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

STEP_INPUTS = ("input", "labels", "step", "lr", "weight_decay")
STEP_OUTPUTS = ("loss", "correct")


def moment_names(names: Sequence[str]) -> Tuple[List[str], List[str]]:
    return [f"adam_m.{n}" for n in names], [f"adam_v.{n}" for n in names]


def new_names(names: Sequence[str]) -> List[str]:
    return [f"new.{n}" for n in names]
