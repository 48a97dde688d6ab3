"""Issue 17: real transformer models, built tiny from their configs (nothing downloaded).

For Hugging Face BERT and GPT-2 and a timm ViT, every tracked layer's statistics are checked
against per-sample gradients from ``torch.func`` in float64, and every module holding a weight
matrix that gets a gradient but is not tracked (embeddings, GPT-2's ``Conv1D``) must be in
``stats.untracked`` with its reason and named by the construction warning.

What counts as "holding a weight" is ``_untracked``'s rule: a parameter of its own named
``*weight`` with 2 or more dims. LayerNorm weights (1-D) and timm's ``cls_token`` /
``pos_embed`` are therefore not listed, by design.

Tolerances (``_helpers.rel_err``, max-abs error over max-abs value): the per-sample tables
``last_grad_sq``, ``group_grad`` and ``last_ablation`` are kept in float32, so
``TOL[float32]`` (2e-5) against the float64 reference; the float64 parameter gradients and
``ablation_sum`` must match to ``TOL[float64]`` (1e-10).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

import spurfast as sf  # noqa: E402

from _helpers import TOL, rel_err  # noqa: E402

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")

NUM_GROUPS = 3
GROUP_IDS = torch.tensor([0, 2, 2, 1, 0])  # B = 5
BATCH, TOKENS, VOCAB = 5, 6, 100
# The per-sample reference runs the model on one sample at a time, so per-sample losses must
# not couple samples: eval mode (no dropout), and no padding token in unpadded inputs.
NOT_SPECIAL = 3  # token ids 0..2 are pad/bos/eos in the configs below


@pytest.fixture(autouse=True)
def _quiet_and_small():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    with warnings.catch_warnings():
        # vmap over F.scaled_dot_product_attention falls back to a loop, with a UserWarning
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------- models
def _bert(attn):
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3, attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(cfg)


def _gpt2_config(attn, **kw):
    kw = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **kw}
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=16, num_labels=3,
                                   attn_implementation=attn, **kw)


def _classify(call, sample):  # mean cross entropy of a sequence classifier
    labels = sample.pop("labels")
    return F.cross_entropy(call(**sample).logits, labels)


def _next_token(call, sample):  # mean over samples of each sample's mean next-token cross entropy
    ids = sample["input_ids"]
    logits = call(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _token_batch(padded=False, labels=True):
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(NOT_SPECIAL, VOCAB, (BATCH, TOKENS))}
    if padded:  # samples 1 and 3 are shorter; their tail is padding (token 0) masked out
        mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
        mask[1, 4:] = 0
        mask[3, 2:] = 0
        batch["input_ids"] = batch["input_ids"].masked_fill(mask == 0, 0)
        batch["attention_mask"] = mask
    if labels:
        batch["labels"] = torch.randint(0, 3, (BATCH,))
    return batch


# --------------------------------------------------------------------------- checks
def _per_sample_grads(model, loss, batch, vectorized=True):
    """``{parameter name: [B, *shape]}``: the gradient of ``loss`` on each sample alone, by
    ``torch.func`` (``vmap(grad(functional_call))``, or ``grad`` per sample where a model's
    forward has data-dependent Python control flow that vmap refuses)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(p, sample):
        sample = {k: v.unsqueeze(0) for k, v in sample.items()}
        return loss(lambda **kw: functional_call(model, (p, buffers), (), kw), sample)

    if vectorized:
        return vmap(grad(one), in_dims=(None, 0))(params, batch)
    per = [grad(one)(params, {k: v[n] for k, v in batch.items()}) for n in range(BATCH)]
    return {k: torch.stack([g[k] for g in per]) for k in params}


def _weight_holders_with_grad(model):
    """Names of modules with a ``*weight`` parameter of >= 2 dims of their own whose gradient
    is not zero (the modules ``_untracked`` has to account for)."""
    out = []
    for n, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if pn.endswith("weight") and p.dim() >= 2 and p.grad is not None and bool(p.grad.ne(0).any()):
                out.append(n)
                break
    return out


def _build(model, **kw):
    """NeuronStats on ``model`` (float64, eval), and the text of the warnings its construction gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = sf.NeuronStats(model, num_groups=NUM_GROUPS, **kw)
    return stats, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _is_conv1d(module):
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _record_and_check(model, stats, loss, batch, vectorized=True):
    """Record one batch and compare every tracked layer with the torch.func reference."""
    want = _per_sample_grads(model, loss, batch, vectorized)
    with stats.record(GROUP_IDS):
        loss(model, dict(batch)).backward()
    modules = dict(model.named_modules())
    for layer in stats.layer_names:
        psg = want[f"{layer}.weight"]  # [B, *W.shape]
        # output channels first: rows of the weight, or columns of a Conv1D's [in, out] weight
        # (should Conv1D become tracked; group_grad keeps the parameter's own layout either way)
        rows = psg.transpose(-1, -2) if _is_conv1d(modules[layer]) else psg
        weight = modules[layer].weight.detach()
        weight = weight.t() if _is_conv1d(modules[layer]) else weight
        want_sq = rows.flatten(2).square().sum(-1)  # [B, C]
        got = stats.last_grad_sq[layer]
        assert got.shape == want_sq.shape, layer
        assert want_sq.abs().max() > 0, f"{layer}: no gradient reached it; the check would be vacuous"
        assert rel_err(got, want_sq) < TOL[torch.float32], layer
        want_gg = torch.stack([psg[GROUP_IDS == g].sum(0) for g in range(NUM_GROUPS)])
        assert stats.group_grad[layer].shape == (NUM_GROUPS,) + tuple(modules[layer].weight.shape), layer
        assert rel_err(stats.group_grad[layer], want_gg) < TOL[torch.float32], layer
        want_sum = torch.stack([want_sq[GROUP_IDS == g].sum(0) for g in range(NUM_GROUPS)])
        assert rel_err(stats.grad_sq_sum[layer], want_sum) < TOL[torch.float32], layer
        want_ab = -(rows * weight).flatten(2).sum(-1)  # first-order effect of zeroing channel c
        assert rel_err(stats.last_ablation[layer], want_ab) < TOL[torch.float32], layer
        want_ab_sum = torch.stack([want_ab[GROUP_IDS == g].sum(0) for g in range(NUM_GROUPS)])
        assert rel_err(stats.ablation_sum[layer], want_ab_sum) < TOL[torch.float64], layer
    # The model's own gradient (of the mean loss) is unchanged, relative to the largest one of the
    # model: some are 0 but for rounding (BERT's key bias: softmax ignores a shift shared by all keys).
    scale = max(want[n].mean(0).abs().max().item() for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert (p.grad - want[n].mean(0)).abs().max().item() < TOL[torch.float64] * scale, n


def _check_untracked(model, stats, messages, reasons):
    """``stats.untracked`` is exactly the weight holders that got a gradient and are not
    tracked, each with the expected reason fragment (by class name), and one warning names them all."""
    missed = [n for n in _weight_holders_with_grad(model) if n not in stats.layer_names]
    assert sorted(stats.untracked) == sorted(missed)
    modules = dict(model.named_modules())
    for n, reason in stats.untracked.items():
        assert reasons[type(modules[n]).__name__] in reason, (n, reason)
    if not missed:
        assert not [m for m in messages if "not tracked" in m], messages
        return
    warned = [m for m in messages if "not tracked" in m]
    assert len(warned) == 1, messages
    for n in missed:
        assert f"{n!r} (" in warned[0], n


NOT_SUPPORTED = {
    "Embedding": "Embedding is not a supported layer",
    "Conv1D": "Conv1D is not a supported layer",
}


# --------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_bert_linears_tracked_exactly_embeddings_reported(attn, padded, backend):
    torch.manual_seed(0)
    model = _bert(attn).double().eval()
    stats, messages = _build(model, backend=backend)
    # every projection (query/key/value, attention output, MLP, pooler, classifier) is an nn.Linear it calls
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 2
    assert stats.layer_names == linears
    assert set(stats.untracked) == {f"bert.embeddings.{e}_embeddings" for e in ("word", "position", "token_type")}
    # with a padding mask, vmap refuses transformers' mask code (data-dependent `if mask.all()`)
    _record_and_check(model, stats, _classify, _token_batch(padded), vectorized=not padded)
    _check_untracked(model, stats, messages, NOT_SUPPORTED)


# --------------------------------------------------------------------------- GPT-2
def _conv1d_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_classifier_conv1d_reported_head_exact(attn):
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(_gpt2_config(attn)).double().eval()
    stats, messages = _build(model)
    from transformers.pytorch_utils import Conv1D

    conv1d = _conv1d_names(model)
    assert all(isinstance(dict(model.named_modules())[n], Conv1D) for n in conv1d)
    assert len(conv1d) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert stats.layer_names == ["score"]  # the only nn.Linear
    assert set(stats.untracked) == set(conv1d) | {"transformer.wte", "transformer.wpe"}
    # GPT-2 checks `pad_token_id in input_ids` (a .item()) when no mask is given: no vmap
    _record_and_check(model, stats, _classify, _token_batch(), vectorized=False)
    _check_untracked(model, stats, messages, NOT_SUPPORTED)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_lm_untied_head_exact_conv1d_reported(attn):
    torch.manual_seed(0)
    cfg = _gpt2_config(attn, pad_token_id=None, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    stats, messages = _build(model)
    assert stats.layer_names == ["lm_head"]
    assert set(stats.untracked) == set(_conv1d_names(model)) | {"transformer.wte", "transformer.wpe"}
    _record_and_check(model, stats, _next_token, _token_batch(labels=False))
    _check_untracked(model, stats, messages, NOT_SUPPORTED)


def test_gpt2_lm_tied_head_reported_untracked_by_default():
    model = transformers.GPT2LMHeadModel(_gpt2_config("eager", pad_token_id=None)).double().eval()
    # its only nn.Linear is tied to the embedding and the rest are Conv1D: nothing to track, and
    # the error names every module it skipped and why
    with pytest.raises(ValueError, match=r"no layer to track.*'lm_head' \(Linear whose weight is tied to \['transformer.wte'\]"):
        sf.NeuronStats(model, num_groups=NUM_GROUPS)
    # next to a trackable layer, the tied head is listed in untracked and named by the warning
    model.extra = nn.Linear(4, 4)
    stats, messages = _build(model)
    assert stats.layer_names == ["extra"]
    assert "lm_head" in stats.untracked and "transformer.wte" in stats.untracked["lm_head"]
    assert any("'lm_head' (" in m for m in messages)
    stats.remove()


# --------------------------------------------------------------------------- timm ViT
def _timm():
    try:
        import timm
    except ImportError as exc:
        # timm 1.0 imports torchvision when timm itself is imported (timm.layers.create_norm:
        # `from torchvision.ops.misc import FrozenBatchNorm2d`), so without torchvision no timm model builds.
        pytest.skip(f"timm does not import: {exc}")
    return timm


@pytest.mark.parametrize("fused_attn", [True, False], ids=["sdpa", "eager"])
def test_timm_vit_fully_tracked_and_exact(fused_attn):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                              num_heads=2, depth=2, num_classes=3)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn  # F.scaled_dot_product_attention, or the explicit softmax
    model = model.double().eval()
    stats, messages = _build(model)
    # patch embedding (nn.Conv2d), qkv/proj (nn.Linear, attention itself is parameter-free), MLP, head
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert stats.layer_names == layers and "patch_embed.proj" in layers and "blocks.0.attn.qkv" in layers
    assert stats.untracked == {}
    torch.manual_seed(1)
    batch = {"x": torch.randn(BATCH, 3, 16, 16, dtype=torch.float64), "labels": torch.randint(0, 3, (BATCH,))}

    def loss(call, sample):
        return F.cross_entropy(call(x=sample["x"]), sample["labels"])

    _record_and_check(model, stats, loss, batch)
    _check_untracked(model, stats, messages, {})
