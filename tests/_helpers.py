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

# A demo small enough for a test (seconds): the pipeline of `spurfast demo --quick`, tiny everywhere.
TINY_DEMO_PRESET = {
    "n_train": 240, "n_test": 80, "width": 4,
    "study": {"epochs": 2, "tracin_every": 1, "hardest": 20, "ks": (1, 2), "modes": ("zero", "random_init"),
              "sigmas": ("init",), "repeats": 2, "oracle": True},
    "framework": {"n_val": 40, "epochs": 1, "variants": ("features",)},
    "rare": {"ns": (0, 3), "patterns": ("S3",), "epochs": 1, "n_train": 240, "n_test": 80, "localize_images": 40,
             "ks": (1, 2), "random_repeats": 1},
}
