"""ONNX Runtime on-device training artifacts (training, eval, optimizer models and checkpoint)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from flora.edge.bundle import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, OptimizerConfig

from .onnx_export import MAX_IR_VERSION, cap_ir_version, initializer_names

log = logging.getLogger(__name__)

LOGITS = "logits"
#: name of the training and eval models' first output (onnxblock would call it `onnx::loss::<n>`)
LOSS = "loss"


@contextlib.contextmanager
def native_stderr_captured(keep_lines: int = 40) -> Iterator[None]:
    """Send file descriptor 2 to a temp file for the block; replay its tail if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            tail = sink.read().decode(errors="replace").splitlines()[-keep_lines:]
            if tail:
                print("\n".join(tail), file=sys.stderr)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate(
    forward: onnx.ModelProto, trainable: Sequence[str], out_dir: Path, optimizer: OptimizerConfig, loss: str = "ce"
) -> None:
    """Write the four artifacts into `out_dir`.

    `forward` maps (input, ) -> logits; the artifacts add the loss (`ce`: cross-entropy; `contrastive`:
    CLIP's symmetric loss over the batch, see `_contrastive_named`) against a `labels` input,
    the gradient graph for exactly the `trainable` initializers (every other initializer frozen),
    and an AdamW optimizer graph. Training and eval models output (`loss`, `logits`).
    """
    from onnxruntime.training import artifacts

    names = initializer_names(forward)
    missing = sorted(set(trainable) - set(names))
    if missing:
        raise RuntimeError(f"trainable tensors missing from the forward graph: {missing[:3]}")
    frozen = [n for n in names if n not in set(trainable)]
    adamw = _pytorch_adamw(optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = logging.getLogger().level
    logging.getLogger().setLevel(max(previous, logging.WARNING))  # onnxblock logs every step at INFO
    try:
        # ORT's gradient builder logs every graph pass at INFO on the native stderr, whatever the
        # logger severity; keep it out of the user's terminal unless something fails.
        with native_stderr_captured():
            artifacts.generate_artifacts(
                forward,
                requires_grad=list(trainable),
                frozen_params=frozen,
                loss=_contrastive_named(LOSS) if loss == "contrastive" else _cross_entropy_named(LOSS),
                optimizer=adamw,
                artifact_directory=str(out_dir),
                additional_output_names=[LOGITS],
            )
    finally:
        logging.getLogger().setLevel(previous)
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        _cap_saved_ir_version(out_dir / name)
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
        if not (out_dir / name).is_file():
            raise RuntimeError(f"onnxruntime-training did not write {name}")
    modes = [
        attr.i
        for node in onnx.load(str(out_dir / OPTIMIZER_MODEL)).graph.node
        if node.op_type == "AdamWOptimizer"
        for attr in node.attribute
        if attr.name == "adam_mode"
    ]
    if modes != [PYTORCH_ADAMW_MODE]:
        raise RuntimeError(f"optimizer graph has AdamW modes {modes}, expected [{PYTORCH_ADAMW_MODE}]")


def _cap_saved_ir_version(path: Path) -> None:
    """Re-stamp a saved model's IR version; external data files (if any) are left as they are."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        onnx.save_model(cap_ir_version(model), str(path))


def _cross_entropy_named(output_name: str):
    """onnxblock's CrossEntropyLoss block, with its loss output named `output_name`."""
    from onnxruntime.training.onnxblock import loss

    class _NamedCrossEntropyLoss(loss.CrossEntropyLoss):
        def build(self, scores_input_name: str, labels_name: str = "labels") -> str:
            generated = super().build(scores_input_name, labels_name)
            if any(output_name in (*n.input, *n.output) for n in self.base.graph.node):
                raise RuntimeError(f"the forward graph already has a tensor named {output_name!r}")
            for node in self.base.graph.node:
                for i, name in enumerate(node.output):
                    if name == generated:
                        node.output[i] = output_name
            return output_name

    return _NamedCrossEntropyLoss()


def _contrastive_named(output_name: str):
    """CLIP's symmetric image-text loss as an onnxblock: the logits gathered at the batch's labels, (N, N), and
    the mean of the cross-entropies of that matrix and of its transpose against arange(N) (export/step_graph.py's
    contrastive_loss, as ONNX ops the gradient builder knows: Gather, Transpose, SoftmaxCrossEntropyLoss)."""
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class _ContrastiveLoss(onnxblock.Block):
        def build(self, scores_input_name: str, labels_name: str = "labels") -> str:
            graph = self.base.graph
            if any(output_name in (*n.input, *n.output) for n in graph.node):
                raise RuntimeError(f"the forward graph already has a tensor named {output_name!r}")
            if not _graph_utils.node_arg_exists(self.base, labels_name):
                labels = copy.deepcopy(_graph_utils.get_output_from_output_name(self.base, scores_input_name))
                labels.name = labels_name
                labels.type.tensor_type.elem_type = onnx.TensorProto.INT64
                del labels.type.tensor_type.shape.dim[-1]
                graph.input.append(labels)

            def name(tag: str) -> str:
                return _graph_utils.generate_graph_name(f"contrastive.{tag}")

            zero, one, half = name("zero"), name("one"), name("half")
            graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0, np.int64), zero),
                                      onnx.numpy_helper.from_array(np.array(1, np.int64), one),
                                      onnx.numpy_helper.from_array(np.array(0.5, np.float32), half)])
            pairs, pairs_t, shape, n, arange = name("pairs"), name("pairs_t"), name("shape"), name("n"), name("arange")
            l_img, l_txt, total = name("loss_image"), name("loss_text"), name("sum")
            make = onnx.helper.make_node
            graph.node.extend([
                make("Gather", [scores_input_name, labels_name], [pairs], axis=1, name=name("gather")),
                make("Transpose", [pairs], [pairs_t], perm=[1, 0], name=name("transpose")),
                make("Shape", [labels_name], [shape], name=name("shape_op")),
                make("Gather", [shape, zero], [n], axis=0, name=name("batch")),
                make("Range", [zero, n, one], [arange], name=name("range")),
                make("SoftmaxCrossEntropyLoss", [pairs, arange], [l_img], reduction="mean", name=name("ce_image")),
                make("SoftmaxCrossEntropyLoss", [pairs_t, arange], [l_txt], reduction="mean", name=name("ce_text")),
                make("Add", [l_img, l_txt], [total], name=name("add")),
                make("Mul", [total, half], [output_name], name=name("mean")),
            ])
            return output_name

    return _ContrastiveLoss()


#: ORT's AdamWOptimizer op: mode 0 is torch.optim.AdamW's update (decoupled decay first, eps added
#: to the bias-corrected sqrt(v)); mode 1, onnxblock's default, is Hugging Face's older variant,
#: whose eps acts sqrt(1 - beta2^t) times larger and so differs visibly on small gradients.
PYTORCH_ADAMW_MODE = 0


def _pytorch_adamw(config: OptimizerConfig):
    """onnxblock's AdamW block with the AdamWOptimizer node switched to PyTorch's update rule.

    onnxblock 1.17-1.19 hard-codes adam_mode=1; its AdamWOptimizer builds the node from a dict
    of attributes, so a subclass that sets adam_mode=0 is the smallest change.
    """
    from onnxruntime.training.onnxblock import optim

    class _TorchAdamWOptimizer(optim.optim.AdamWOptimizer):
        def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):
            attributes = dict(node_attributes, adam_mode=PYTORCH_ADAMW_MODE)
            return super()._build_optimizer_node(input_names, output_name, node_name, attributes)

    block = optim.AdamW(
        bias_correction=True, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )
    block._adamw = _TorchAdamWOptimizer(
        bias_correction=True, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )
    return block
