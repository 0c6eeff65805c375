"""FLORA edge: the on-device side of federated LoRA fine-tuning of CLIP.

This package is the bottom floor of the project. It defines the bundle format, the adapter
blob and the MQTT wire protocol, and it runs training on a device with ONNX Runtime. It never
imports torch.
"""

__version__ = "0.1.0"
