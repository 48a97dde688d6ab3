"""spurfast.integrations: the Lightning and Hugging Face trainer callbacks.

Each callback trains a tiny model for two epochs on the CPU; its statistics (the file saved at
each epoch's end and the final ``callback.stats``) must equal those of a hand-written spurfast
loop that replays the same batches, in the same order, on a copy of the initial model with the
same optimizer and ``stats.record`` around each forward and backward, the loss scaled as the
trainer scales it (gradient accumulation, a GradScaler).

Tolerances: both sides run the same float32 operations in the same order on one thread, so
``group_count`` must match exactly and every other table (float64 sums of float32 per-sample
values, float32 ``group_grad``) to ``rtol=1e-5, atol=1e-7``: a few float32 rounding steps, far
below a wrong loss scale (a factor of 2 or more). The fp16 (GradScaler) run is compared with
the same tolerance: both sides run the same fp16 kernels.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spurfast import NeuronStats  # noqa: E402

RTOL, ATOL = 1e-5, 1e-7
NUM_GROUPS = 3
LR = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning's pytree shim on new torch
        warnings.filterwarnings("ignore", message="spurfast: these modules hold weights")  # the embeddings
        yield
    torch.set_num_threads(saved)


def assert_same_stats(got, want):
    """``got``/``want``: NeuronStats or their state_dict()."""
    got = got if isinstance(got, dict) else got.state_dict()
    want = want if isinstance(want, dict) else want.state_dict()
    assert got["layer_names"] == want["layer_names"]
    assert set(got) == set(want)
    assert torch.equal(got["group_count"], want["group_count"]), (got["group_count"], want["group_count"])
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and key != "group_count":
            torch.testing.assert_close(got[key].to(value.dtype), value, rtol=RTOL, atol=ATOL, msg=key)


def assert_restored(model):
    """No hooks on ``model`` and no layer forward replaced by an open record() block."""
    for name, module in model.named_modules():
        assert "forward" not in vars(module), name
        assert not module._forward_pre_hooks and not module._forward_hooks, name


def _optimizer_step(opt, scaler):
    """The trainers' optimizer step, through the GradScaler when there is one."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def record_works(stats, model, inputs, group_ids):
    """A fresh record() block on ``stats`` runs and folds (nothing left open)."""
    before = int(stats.group_count.sum())
    with stats.record(group_ids):
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        (out["loss"] if isinstance(out, dict) else out.float().square().mean()).backward()
    assert int(stats.group_count.sum()) == before + group_ids.shape[0]


class _Boom(Exception):
    pass


def test_import_spurfast_imports_no_trainer():
    code = ("import sys, spurfast, spurfast.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# =========================================================================== Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="lightning is not installed")


def _lightning_data(kind="dict"):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    group = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0, 1])
    if kind == "dict":
        data = [{"x": x[i], "y": y[i], "group": group[i], "idx": torch.tensor(i)} for i in range(10)]
    else:
        data = [(x[i], y[i], group[i]) for i in range(10)]
    return torch.utils.data.DataLoader(data, batch_size=4)  # batches of 4, 4, 2: the last accumulation is short


def _lightning_module(fail_at=None):
    pl = _lightning()

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, NUM_GROUPS))

        def training_step(self, batch, batch_idx):
            x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
            loss = F.cross_entropy(self.net(x), y)
            if fail_at == (self.current_epoch, batch_idx):  # after the forward: the block is open
                raise _Boom("training_step failed")
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    return Net()


def _lightning_fit(module, loader, callback, tmp_path, epochs=2, **trainer_kwargs):
    pl = _lightning()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path), **trainer_kwargs)
    trainer.fit(module, loader)
    return trainer


def _lightning_hand_loop(module0, loader, epochs, accumulate, reset_every_epoch=False, scaler=None):
    """The reference: Lightning's loop by hand (loss / accumulate, step after `accumulate`
    batches and after the epoch's last one), stats.record around each forward and backward."""
    ref = copy.deepcopy(module0)
    stats = NeuronStats(ref, NUM_GROUPS)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    snapshots = []
    for _ in range(epochs):
        for i, batch in enumerate(loader):
            loss_scale = 1.0 / accumulate if scaler is None else scaler.get_scale() / accumulate
            with stats.record(batch["group"], loss_scale=loss_scale, sample_ids=batch["idx"]):
                with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                    loss = F.cross_entropy(ref.net(batch["x"]), batch["y"])
                loss = loss / accumulate
                (loss if scaler is None else scaler.scale(loss)).backward()
            if (i + 1) % accumulate == 0 or i + 1 == len(loader):
                _optimizer_step(opt, scaler)
        snapshots.append(stats.state_dict())
        if reset_every_epoch:
            stats.reset()
    return ref, stats, snapshots


@pytest.mark.parametrize("accumulate, reset_every_epoch", [(1, False), (2, False), (1, True)])
def test_lightning_statistics_equal_the_hand_loop(tmp_path, accumulate, reset_every_epoch):
    from spurfast.integrations.lightning import NeuronStatsCallback

    loader, module = _lightning_data(), _lightning_module()
    module0 = copy.deepcopy(module)
    callback = NeuronStatsCallback(NUM_GROUPS, group_key="group", sample_key="idx", dirpath=tmp_path,
                                   reset_every_epoch=reset_every_epoch)
    _lightning_fit(module, loader, callback, tmp_path, accumulate_grad_batches=accumulate)
    ref, ref_stats, snapshots = _lightning_hand_loop(module0, loader, 2, accumulate, reset_every_epoch)

    for p, q in zip(module.parameters(), ref.parameters()):  # the replay is the same training
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
    assert callback.saved_paths == [str(tmp_path / f"neuron_stats_epoch{e}.safetensors") for e in (0, 1)]
    for path, snapshot in zip(callback.saved_paths, snapshots):
        assert_same_stats(NeuronStats.load(path), snapshot)
        reloaded = NeuronStats.load(path, module)  # on the model, to record on
        assert_same_stats(reloaded, snapshot)
    assert_same_stats(callback.stats, ref_stats)
    if reset_every_epoch:  # each file: that epoch's 10 samples
        assert [int(NeuronStats.load(p).group_count.sum()) for p in callback.saved_paths] == [10, 10]
    else:
        torch.testing.assert_close(callback.stats.last_sample_ids, torch.tensor([8, 9]))
    assert_restored(module)


def test_lightning_resume_from_the_saved_file(tmp_path):
    """Two fits of one epoch, the second resuming from the first's file (assigned to
    callback.stats), end with the statistics of one fit of two epochs."""
    from spurfast.integrations.lightning import NeuronStatsCallback

    loader, module = _lightning_data(), _lightning_module()
    module0 = copy.deepcopy(module)
    first = NeuronStatsCallback(NUM_GROUPS, dirpath=tmp_path / "first")
    _lightning_fit(module, loader, first, tmp_path, epochs=1)
    second = NeuronStatsCallback(NUM_GROUPS, dirpath=tmp_path / "second")
    second.stats = NeuronStats.load(first.saved_paths[0], module)
    _lightning_fit(module, loader, second, tmp_path, epochs=1)  # a fresh SGD (stateless): the same steps
    _, ref_stats, _ = _lightning_hand_loop(module0, loader, 2, 1)
    assert_same_stats(NeuronStats.load(second.saved_paths[0]), ref_stats)


def test_lightning_grad_scaler_and_accumulation(tmp_path):
    """fp16 autocast with a GradScaler (what precision="16-mixed" sets up on a GPU), on the CPU:
    the loss is divided by accumulate_grad_batches and then scaled by the scaler."""
    from lightning.pytorch.plugins import MixedPrecision

    from spurfast.integrations.lightning import NeuronStatsCallback

    loader, module = _lightning_data(), _lightning_module()
    module0 = copy.deepcopy(module)
    callback = NeuronStatsCallback(NUM_GROUPS, dirpath=tmp_path, sample_key="idx")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _lightning_fit(module, loader, callback, tmp_path, accumulate_grad_batches=2, plugins=[plugin])
    assert scaler.get_scale() != 256.0  # it grew: the scale changed between batches
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    _, ref_stats, snapshots = _lightning_hand_loop(module0, loader, 2, 2, scaler=ref_scaler)
    assert_same_stats(NeuronStats.load(callback.saved_paths[0]), snapshots[0])
    assert_same_stats(callback.stats, ref_stats)


@pytest.mark.parametrize("group_key", [2, lambda batch: batch[2]], ids=["index", "callable"])
def test_lightning_tuple_batches(tmp_path, group_key):
    from spurfast.integrations.lightning import NeuronStatsCallback

    loader = _lightning_data("tuple")
    callback = NeuronStatsCallback(NUM_GROUPS, group_key=group_key, dirpath=tmp_path)
    _lightning_fit(_lightning_module(), loader, callback, tmp_path, epochs=1)
    assert callback.stats.group_count.tolist() == [4, 3, 3]


@pytest.mark.parametrize("kind, group_key, error, words", [
    ("dict", "grp", KeyError, ["group_key='grp'", "keys ['x', 'y', 'group', 'idx']"]),
    ("tuple", "group", TypeError, ["group_key='group' is a dict key", "list of 3 items"]),  # collated to a list
    ("tuple", 5, IndexError, ["group_key=5", "list of 3 items"]),
    ("dict", lambda batch: batch["x"], ValueError, ["[B] integer tensor", "torch.float32 tensor of shape [4, 6]"]),
], ids=["missing-key", "key-on-tuple", "index-out-of-range", "not-group-ids"])
def test_lightning_bad_group_key(tmp_path, kind, group_key, error, words):
    from spurfast.integrations.lightning import NeuronStatsCallback

    module = _lightning_module()
    callback = NeuronStatsCallback(NUM_GROUPS, group_key=group_key, dirpath=tmp_path)
    with pytest.raises(error) as info:
        _lightning_fit(module, _lightning_data(kind), callback, tmp_path, epochs=1)
    for word in words:
        assert word in str(info.value)
    assert_restored(module)
    assert callback.saved_paths == []


def test_lightning_exception_in_training_step(tmp_path):
    from spurfast.integrations.lightning import NeuronStatsCallback

    module = _lightning_module(fail_at=(1, 1))  # epoch 1, second batch, after its forward
    callback = NeuronStatsCallback(NUM_GROUPS, dirpath=tmp_path)
    with pytest.raises(_Boom):
        _lightning_fit(module, _lightning_data(), callback, tmp_path)
    assert_restored(module)
    assert callback._open is None
    assert int(callback.stats.group_count.sum()) == 10 + 4  # epoch 0 and the first batch of epoch 1
    assert len(callback.saved_paths) == 1
    record_works(callback.stats, module.net, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    record_works(NeuronStats(module, NUM_GROUPS), module.net, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))


# =========================================================================== Hugging Face
def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


class _PlainClassifier(nn.Module):
    """forward without **kwargs: the Trainer passes no num_items_in_batch and divides the
    loss by the micro-batches of each optimizer step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids).mean(1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class _ItemsClassifier(_PlainClassifier):
    """forward with **kwargs that honours num_items_in_batch (summed loss / num_items_in_batch),
    as transformers' language-model heads do: the Trainer then does not divide it."""

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.head(self.embed(input_ids).mean(1))
        return {"loss": F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch, "logits": logits}


def _bert():
    transformers = _transformers()
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


HF_MODELS = {"bert": _bert, "plain": _PlainClassifier, "items": _ItemsClassifier}


def _hf_data(with_idx):
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 50, (8,), generator=gen), "labels": i % 2, "group": i % NUM_GROUPS}
            for i in range(12)]
    return [dict(row, idx=i) for i, row in enumerate(data)] if with_idx else data


def _hf_trainer(model, callback, tmp_path, accumulate=1, trainer_cls=None, with_idx=False, **args_kwargs):
    transformers = _transformers()
    settings = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                    num_train_epochs=2, gradient_accumulation_steps=accumulate, remove_unused_columns=False,
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, max_grad_norm=0.0, seed=0)
    settings.update(args_kwargs)
    args = transformers.TrainingArguments(**settings)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=args, train_dataset=_hf_data(with_idx),
                                                    callbacks=[callback], optimizers=(opt, sched))
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def _spy(model):
    """Keep a copy of the inputs of every training forward (registered before the callback's
    hook, so it runs first and sees the group column)."""
    seen = []

    def hook(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            seen.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _hf_hand_loop(model0, batches, kind, accumulate, epochs=2, scaler=None):
    """The Trainer's loop by hand over the recorded micro-batches: 3 per epoch, optimizer steps
    after each `accumulate` of them and after the epoch's last one."""
    ref = copy.deepcopy(model0)
    stats = NeuronStats(ref, NUM_GROUPS)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    per_epoch = len(batches) // epochs
    snapshots = []
    for epoch in range(epochs):
        steps = [list(range(s, min(s + accumulate, per_epoch))) for s in range(0, per_epoch, accumulate)]
        for step in steps:
            for k in step:
                inputs = dict(batches[epoch * per_epoch + k])
                group_ids, _ = inputs.pop("group"), inputs.pop("idx")
                if kind == "bert":  # given num_items_in_batch, ignores it: the batch mean, undivided
                    trainer_factor, loss_scale = 1.0, 1.0
                elif kind == "plain":  # divided by the micro-batches of the step
                    trainer_factor = loss_scale = 1.0 / len(step)
                else:  # sum / num_items_in_batch = (B / num_items_in_batch) * batch mean, undivided
                    trainer_factor, loss_scale = 1.0, group_ids.shape[0] / float(inputs["num_items_in_batch"])
                if scaler is not None:
                    loss_scale *= scaler.get_scale()
                with stats.record(group_ids, loss_scale=loss_scale):
                    loss = ref(**inputs)["loss"] * trainer_factor
                    (loss if scaler is None else scaler.scale(loss)).backward()
            _optimizer_step(opt, scaler)
        snapshots.append(stats.state_dict())
    return ref, stats, snapshots


@pytest.mark.parametrize("kind, accumulate", [("bert", 1), ("bert", 2), ("plain", 2), ("items", 2)])
def test_huggingface_statistics_equal_the_hand_loop(tmp_path, kind, accumulate):
    from spurfast.integrations.huggingface import NeuronStatsCallback

    model = HF_MODELS[kind]()
    model0 = copy.deepcopy(model)
    callback = NeuronStatsCallback(NUM_GROUPS, group_key="group", sample_key="idx",
                                   model_loss="num_items" if kind == "items" else "mean")
    trainer = _hf_trainer(model, callback, tmp_path, accumulate, with_idx=True)
    seen, spy = _spy(model)
    trainer.train()
    spy.remove()
    assert len(seen) == 6 and ("num_items_in_batch" in seen[0]) == (kind != "plain")
    ref, ref_stats, snapshots = _hf_hand_loop(model0, seen, kind, accumulate)

    for p, q in zip(model.parameters(), ref.parameters()):  # the replay is the same training
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
    assert callback.saved_paths == [str(tmp_path / f"neuron_stats_epoch{e}.safetensors") for e in (0, 1)]
    for path, snapshot in zip(callback.saved_paths, snapshots):
        assert_same_stats(NeuronStats.load(path), snapshot)
        assert_same_stats(NeuronStats.load(path, model), snapshot)
    assert_same_stats(callback.stats, ref_stats)
    torch.testing.assert_close(callback.stats.last_sample_ids, seen[-1]["idx"])
    assert_restored(model)


def test_huggingface_grad_scaler_and_accumulation(tmp_path):
    """The GradScaler that accelerate keeps for fp16=True on a GPU (here put on the CPU
    Trainer's accelerator by hand): the loss is divided by the micro-batches, then scaled."""
    from spurfast.integrations.huggingface import NeuronStatsCallback

    model = _PlainClassifier()
    model0 = copy.deepcopy(model)
    callback = NeuronStatsCallback(NUM_GROUPS, group_key="group", sample_key="idx")
    trainer = _hf_trainer(model, callback, tmp_path, accumulate=2, with_idx=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    trainer.accelerator.scaler = scaler  # accelerate hands it to the prepared optimizer and to backward
    seen, spy = _spy(model)
    trainer.train()
    spy.remove()
    assert scaler.get_scale() == 256.0 * 2 ** 4  # it grew at each of the 4 optimizer steps
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    _, ref_stats, snapshots = _hf_hand_loop(model0, seen, "plain", 2, scaler=ref_scaler)
    assert_same_stats(NeuronStats.load(callback.saved_paths[0]), snapshots[0])
    assert_same_stats(callback.stats, ref_stats)


def test_huggingface_warns_when_num_items_in_batch_is_ambiguous(tmp_path):
    from spurfast.integrations.huggingface import NeuronStatsCallback

    callback = NeuronStatsCallback(NUM_GROUPS)  # model_loss not said
    with pytest.warns(RuntimeWarning, match="model_loss='num_items'"):
        _hf_trainer(_bert(), callback, tmp_path, num_train_epochs=1).train()


def test_huggingface_loss_factor_mismatch_raises(tmp_path):
    """A compute_loss override that changes the loss after the model: the check in backward
    catches it, nothing of that batch is recorded, and the model is restored."""
    transformers = _transformers()
    from spurfast.integrations.huggingface import NeuronStatsCallback

    class HalvingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            return 0.5 * super().compute_loss(model, inputs, **kwargs)

    model = _PlainClassifier()
    callback = NeuronStatsCallback(NUM_GROUPS)
    with pytest.raises(RuntimeError, match=r"multiplied the model's loss by 0\.5 .* expected 1"):
        _hf_trainer(model, callback, tmp_path, trainer_cls=HalvingTrainer).train()
    assert int(callback.stats.group_count.sum()) == 0
    assert_restored(model)

    fixed = NeuronStatsCallback(NUM_GROUPS, loss_scale=0.5)  # said by hand: taken as given
    _hf_trainer(model, fixed, tmp_path, trainer_cls=HalvingTrainer, num_train_epochs=1).train()
    assert int(fixed.stats.group_count.sum()) == 12


def test_huggingface_remove_unused_columns_is_refused(tmp_path):
    from spurfast.integrations.huggingface import NeuronStatsCallback

    model = _PlainClassifier()
    trainer = _hf_trainer(model, NeuronStatsCallback(NUM_GROUPS), tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match=r"drops the column\(s\) \['group'\].*remove_unused_columns=False"):
        trainer.train()
    assert_restored(model)


def test_huggingface_bad_group_key(tmp_path):
    from spurfast.integrations.huggingface import NeuronStatsCallback

    model = _PlainClassifier()
    callback = NeuronStatsCallback(NUM_GROUPS, group_key="grp")
    with pytest.raises(KeyError) as info:
        _hf_trainer(model, callback, tmp_path).train()
    assert "group_key='grp'" in str(info.value)
    assert "['group', 'input_ids', 'labels']" in str(info.value)
    assert_restored(model)


@pytest.mark.parametrize("hook_after", [False, True], ids=["alone", "another-forward-hook-after"])
def test_huggingface_exception_in_the_forward(tmp_path, hook_after):
    """The Trainer has no exception event: the always_call forward hook leaves the block and
    removes the hooks when the model's forward raises. With another forward hook registered
    after it, removing it then would break torch's loop over the hooks (the user's exception
    would turn into "OrderedDict mutated during iteration"): it stays, inert, until close()."""
    transformers = _transformers()
    from spurfast.integrations.huggingface import NeuronStatsCallback

    model = _PlainClassifier()
    calls = []

    def fail_second(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise _Boom("forward failed")

    failing = model.head.register_forward_hook(fail_second)
    later = []

    class HookAfter(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            later.append(model.register_forward_hook(lambda *a: None, always_call=True))

    callback = NeuronStatsCallback(NUM_GROUPS)
    trainer = _hf_trainer(model, callback, tmp_path)
    if hook_after:
        trainer.add_callback(HookAfter())
    with pytest.raises(_Boom):
        trainer.train()
    failing.remove()
    for handle in later:
        handle.remove()
    assert not model._forward_pre_hooks
    assert len(model._forward_hooks) == hook_after  # ours, left inert behind the later hook
    callback.close()
    assert_restored(model)
    assert callback._open is None
    assert int(callback.stats.group_count.sum()) == 4  # the first micro-batch only
    inputs = {"input_ids": torch.randint(1, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    record_works(callback.stats, model, inputs, torch.tensor([0, 1, 2, 0]))


def test_huggingface_exception_after_the_forward(tmp_path):
    """An exception after the forward (here in compute_loss) leaves the block open until
    close() or the next train(), which drop it without recording that batch."""
    transformers = _transformers()
    from spurfast.integrations.huggingface import NeuronStatsCallback

    failures = {"at": 2}
    calls = []

    class FailingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            calls.append(1)
            if len(calls) == failures["at"]:
                raise _Boom("compute_loss failed")
            return loss

    model = _PlainClassifier()
    callback = NeuronStatsCallback(NUM_GROUPS)
    trainer = _hf_trainer(model, callback, tmp_path, trainer_cls=FailingTrainer, num_train_epochs=1)
    with pytest.raises(_Boom):
        trainer.train()
    assert callback._open is not None  # no exception event: still open
    callback.close()
    assert_restored(model)
    assert int(callback.stats.group_count.sum()) == 4
    inputs = {"input_ids": torch.randint(1, 50, (4, 8)), "labels": torch.tensor([0, 1, 0, 1])}
    record_works(callback.stats, model, inputs, torch.tensor([0, 1, 2, 0]))

    calls.clear()
    with pytest.raises(_Boom):  # fails again, then a train() with the stale block still open
        trainer.train()
    failures["at"] = 0
    trainer.train()  # on_train_begin drops the stale block; 3 more micro-batches
    assert int(callback.stats.group_count.sum()) == 4 + 4 + 4 + 12
    assert_restored(model)


@pytest.mark.parametrize("module, blocked, extra", [("lightning", "lightning", "lightning"),
                                                    ("huggingface", "transformers", "huggingface")])
def test_a_missing_trainer_gives_an_install_hint(module, blocked, extra):
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"  # as if the package were not installed
            f"import spurfast.integrations.{module}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"spurfast.integrations.{module} needs {blocked}" in proc.stderr
    assert f"pip install 'spurfast[{extra}]'" in proc.stderr
