"""The portable `step` backend: a whole LoRA training step (forward, backward, AdamW) as one plain
ONNX inference graph, runnable by any onnxruntime (no training build needed).

The step function is traced with `make_fx` over `torch.func.grad_and_value`, decomposed to core
ATen ops, and exported by the dynamo-based ONNX exporter. Frozen CLIP weights become initializers;
the LoRA tensors, AdamW moments, step count, learning rate and weight decay are inputs, so the
caller owns all training state and the aggregator's round config can change lr and weight decay.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from flora.edge.bundle import OptimizerConfig
from flora.edge.step_io import STEP_INPUTS, STEP_OUTPUTS, moment_names, new_names

from .onnx_export import cap_ir_version, mha_fastpath_disabled, packed_projection_as_split, save_model

#: the lowest opset the dynamo exporter writes (17 fails on a non-constant axes input); tested on
#: onnxruntime-training 1.19.2 and plain onnxruntime 1.16.3 and 1.32.0 (tests/test_step_backend.py).
STEP_OPSET = 18


def adamw_update(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *,
    step: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, betas: Tuple[float, float], eps: float,
    coupled: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.AdamW's update (`coupled`: torch.optim.Adam's, whose weight decay is an L2 term added to
    the gradient), written so that it stays exact and finite.

    With B = 0 the gradient of A is exactly 0, so m = v = 0 and the update must be 0 / (0 + eps) = 0.
    The division is kept as `m_hat / (sqrt(v_hat) + eps)` with eps added after the square root;
    rewriting it as m * rsqrt(v) (as a fused optimiser might) gives 0 * inf = NaN.
    """
    beta1, beta2 = betas
    if coupled:
        g = g + weight_decay * p
    else:
        p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    bias1 = 1.0 - torch.pow(torch.tensor(beta1), step)
    bias2 = 1.0 - torch.pow(torch.tensor(beta2), step)
    denom = torch.sqrt(v) / torch.sqrt(bias2) + eps
    p = p - (lr / bias1) * (m / denom)
    return p, m, v


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric image-text loss over a batch, from the class-prompt logits (N, C).

    The batch's text embeddings are the class prompts' of its labels, so logits_per_image[i, j] =
    scale * img_i . text(labels_j) = logits[i, labels_j]; the loss is the mean of the cross-entropies
    of that (N, N) matrix and of its transpose against arange(N), as in FLORA's authors' code. Two
    images of the same class in one batch are each other's negatives there.
    """
    pairs = logits.index_select(1, labels)
    target = torch.arange(labels.shape[0], device=labels.device)
    return 0.5 * (F.cross_entropy(pairs, target) + F.cross_entropy(pairs.t(), target))


LOSS_FUNCTIONS = {"ce": F.cross_entropy, "contrastive": contrastive_loss}


class _StepFunction:
    """step(x, labels, step, lr, weight_decay, *params, *m, *v) -> (loss, correct, *params', *m', *v')."""

    def __init__(self, classifier: nn.Module, module_names: List[str], optimizer: OptimizerConfig,
                 loss: str = "ce") -> None:
        self.classifier = classifier
        self.module_names = module_names
        self.betas = (float(optimizer.betas[0]), float(optimizer.betas[1]))
        self.eps = float(optimizer.eps)
        self.coupled = optimizer.name == "adam"
        self.loss_fn = LOSS_FUNCTIONS[loss]

    def _loss(self, params: Dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor):
        logits = functional_call(self.classifier, params, (x,), strict=False)
        return self.loss_fn(logits, labels), logits

    def __call__(self, x, labels, step, lr, weight_decay, *state):
        k = len(self.module_names)
        params = dict(zip(self.module_names, state[:k]))
        grads, (loss, logits) = grad_and_value(self._loss, has_aux=True)(params, x, labels)
        correct = (logits.argmax(dim=-1) == labels).sum()
        new_p, new_m, new_v = [], [], []
        for i, name in enumerate(self.module_names):
            p, m, v = adamw_update(
                state[i], grads[name], state[k + i], state[2 * k + i],
                step=step, lr=lr, weight_decay=weight_decay, betas=self.betas, eps=self.eps, coupled=self.coupled,
            )
            new_p.append(p)
            new_m.append(m)
            new_v.append(v)
        return (loss, correct, *new_p, *new_m, *new_v)


class _Traced(nn.Module):
    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        return self.graph_module(*args)


def example_inputs(
    classifier: nn.Module, module_names: List[str], example: torch.Tensor, num_classes: int
) -> Tuple[torch.Tensor, ...]:
    params = dict(classifier.named_parameters())
    tensors = [params[n].detach().clone() for n in module_names]
    labels = torch.arange(example.shape[0]) % num_classes
    scalars = (torch.tensor(1.0), torch.tensor(1e-3), torch.tensor(0.0))
    return (example, labels, *scalars, *tensors, *[torch.zeros_like(t) for t in tensors],
            *[torch.zeros_like(t) for t in tensors])


def _linear_as_2d_matmul(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear, computed as one 2-D matmul over the flattened leading dimensions."""
    y = x.reshape(-1, x.shape[-1]) @ weight.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def _symbolic_friendly_linear() -> Iterator[None]:
    """aten's linear on a 3-D input guards on its size (an int, not a symbol) under symbolic tracing,
    which fixes the image batch of the vision tower at the traced value. The same product written as
    reshape + matmul keeps it symbolic. nn.Linear and multi_head_attention_forward look F.linear up
    at call time, so swapping the function for the trace is enough."""
    original = F.linear
    F.linear = _linear_as_2d_matmul
    try:
        yield
    finally:
        F.linear = original


def trace_step(classifier: nn.Module, module_names: List[str], optimizer: OptimizerConfig,
               args: Tuple[torch.Tensor, ...], loss: str = "ce") -> nn.Module:
    """make_fx trace of the step with symbolic shapes (the batch size stays dynamic)."""
    fn = _StepFunction(classifier, module_names, optimizer, loss)
    # The fused CPU scaled-dot-product-attention backward has no ONNX translation; the math one does.
    with sdpa_kernel([SDPBackend.MATH]), mha_fastpath_disabled(), packed_projection_as_split(), \
            _symbolic_friendly_linear(), torch.enable_grad():
        gm = make_fx(
            fn, decomposition_table=torch._decomp.core_aten_decompositions(), tracing_mode="symbolic",
            _allow_non_fake_inputs=True,  # the frozen weights are real tensors captured as constants
        )(*args)
    return _Traced(gm)


def export_step_graph(
    classifier: nn.Module,
    param_to_adapter: Dict[str, str],
    adapter_names: List[str],
    example: torch.Tensor,
    input_name: str,
    path: Path,
    optimizer: OptimizerConfig,
    loss: str = "ce",
) -> Dict[str, object]:
    """Trace and write train_step.onnx; returns facts for the manifest (opset, op types).

    The LoRA inputs come in the order of `adapter_names` (the manifest's trainable list).
    """
    by_adapter = {a: m for m, a in param_to_adapter.items()}
    module_names = [by_adapter[a] for a in adapter_names]
    num_classes = int(classifier(example[:1]).shape[1])
    # The traced batch size must equal no other size in the model: symbolic tracing unifies equal
    # sizes, and a batch of 2 in a model with 2 heads (or 2 classes) comes out as a constant.
    sizes = {num_classes, *example.shape[1:], *(d for p in classifier.parameters() for d in p.shape)}
    batch_size = next(b for b in range(17, 10_000, 2) if b not in sizes)
    example = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    args = example_inputs(classifier, module_names, example, num_classes)
    traced = trace_step(classifier, module_names, optimizer, args, loss)
    batch = torch.export.Dim("batch", min=1)
    dynamic = [{0: batch}, {0: batch}] + [None] * (len(args) - 2)
    m_names, v_names = moment_names(adapter_names)
    input_names = [input_name, *STEP_INPUTS[1:], *adapter_names, *m_names, *v_names]
    output_names = [*STEP_OUTPUTS, *new_names(adapter_names), *new_names(m_names), *new_names(v_names)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            traced, args, dynamo=True, opset_version=STEP_OPSET, dynamic_shapes=(tuple(dynamic),),
            input_names=input_names, output_names=output_names, verbose=False,
            # onnxscript's graph optimizer drops the `+ eps` of the AdamW denominator (1e-8 reads as
            # zero to it), which turns the B = 0 first step into 0/0 = NaN in every A. ONNX Runtime
            # optimizes the graph itself when it loads it, and keeps eps.
            optimize=False,
        )
    model = program.model_proto
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise RuntimeError(f"the step graph's batch dimension came out fixed at {batch_dim.dim_value}; "
                           "it must stay dynamic")
    cap_ir_version(model)
    save_model(model, path)
    return {"opset": STEP_OPSET, "op_types": sorted({n.op_type for n in model.graph.node})}
