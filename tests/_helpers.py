import torch

# Maximum relative error (max-abs error over max-abs value) accepted, per input dtype.
# fp16/bf16 inputs are upcast and accumulated in float32, so they share float32's bound
# against a float64 reference computed from the same (rounded) inputs.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are 0)."""
    expected = expected.double()
    scale = expected.abs().max().item()
    diff = (actual.double() - expected).abs().max().item()
    return diff / scale if scale > 0 else diff
