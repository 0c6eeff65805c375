"""flora-export: open_clip CLIP + LoRA to an ONNX Runtime on-device training bundle (workstation side)."""
