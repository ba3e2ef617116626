"""OffloadedCheckpointing: gradients exactly those of torch's checkpoint, what moves and when, the transformers
and Trainer hooks. On a CPU the offload logic runs by treating CPU tensors as offloadable (separate host copies)."""

import copy
import logging

import pytest
import torch

import fastlora
from fastlora import OffloadedCheckpointing
from fastlora.checkpointing import enable_checkpointing, trainer_checkpointing_args
from fastlora.testing import nf4_decoder, peft_lora_model

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

peft = pytest.importorskip("peft")

VOCAB = 101
LAYERS = 3


def _model(*, four_bit=False, dropout=0.1, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config).float()
    if four_bit:
        pytest.importorskip("bitsandbytes")
        nf4_decoder(model)
    model = peft_lora_model(model, dropout=dropout)
    model.train()
    return model


def _offload(**kwargs):
    """Offloads CPU tensors too, whatever their size, so that the logic runs here."""
    return OffloadedCheckpointing(min_offload_bytes=0, offload_device_types=("cuda", "cpu"), pin_memory=False,
                                  **kwargs)


def _batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 9), generator=g) for _ in range(n)]


def _train_grads(model, batches, *, seed=5):
    """Gradients accumulated over the batches (one forward and backward each), and the losses."""
    torch.manual_seed(seed)  # the dropout masks
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal(a, b):
    losses_a, grads_a = a
    losses_b, grads_b = b
    assert torch.equal(torch.stack(losses_a), torch.stack(losses_b))
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * LAYERS
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradients_equal_checkpointing_without_offload(use_reentrant, four_bit):
    """PEFT with LoRA dropout, two accumulated micro-batches: bit-identical to torch's checkpoint."""
    batches = _batches()
    reference = _model(four_bit=four_bit)
    enable_checkpointing(reference, use_reentrant=use_reentrant)
    expected = _train_grads(reference, batches)

    model = _model(four_bit=four_bit)
    offload = _offload(use_reentrant=use_reentrant)
    offload.install(model)
    _assert_equal(_train_grads(model, batches), expected)
    # Per step: every layer input but the last went to host memory, each came back through a prefetch.
    stats = offload.stats
    assert (stats.offloaded, stats.prefetched, stats.fetched, stats.on_device) == \
        (2 * (LAYERS - 1), 2 * (LAYERS - 1), 0, 2)
    assert stats.offloaded_bytes == 2 * (LAYERS - 1) * 2 * 9 * 64 * 4


def test_dropout_is_recomputed_with_the_forward_masks():
    """Against no checkpointing at all: a recompute with other dropout masks would be far off."""
    batches = _batches(1)
    expected = _train_grads(_model(dropout=0.5), batches)
    model = _model(dropout=0.5)
    _offload().install(model)
    losses, grads = _train_grads(model, batches)
    torch.testing.assert_close(losses, expected[0], rtol=1e-6, atol=1e-6)
    for name, grad in expected[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_two_graphs_alive_at_once():
    """Two forwards before their backwards: the second one offloads the first one's last input, which its
    backward then fetches (no prefetch for it); gradients still exact."""
    batches = _batches()
    reference = _model()
    enable_checkpointing(reference, use_reentrant=False)
    model = _model()
    offload = _offload()
    offload.install(model)
    grads = []
    for m in (reference, model):
        torch.manual_seed(5)
        losses = [m(input_ids=ids, labels=ids).loss for ids in batches]
        for loss in losses:
            loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    assert offload.stats.offloaded == 2 * LAYERS - 1 and offload.stats.fetched >= 1


def test_small_tensors_and_other_devices_stay():
    model = _model()
    offload = OffloadedCheckpointing(offload_device_types=("cuda", "cpu"), pin_memory=False)  # 1 MiB threshold
    offload.install(model)
    _train_grads(model, _batches(1))
    assert offload.stats == fastlora.OffloadStats()
    cuda_only = _model()
    offload = OffloadedCheckpointing(min_offload_bytes=0)
    offload.install(cuda_only)
    _train_grads(cuda_only, _batches(1))
    assert offload.stats == fastlora.OffloadStats()  # a CPU model: plain checkpointing


def test_pinned_memory_failure_falls_back_with_one_warning(monkeypatch, caplog):
    empty = torch.empty

    def no_pinned_memory(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinned_memory)
    model = _model()
    offload = OffloadedCheckpointing(min_offload_bytes=0, offload_device_types=("cpu",), pin_memory=True)
    offload.install(model)
    with caplog.at_level(logging.WARNING, logger="fastlora.checkpointing"):
        _train_grads(model, _batches())
    warnings = [r for r in caplog.records if "pinned host memory" in r.getMessage()]
    assert len(warnings) == 1 and "out of memory (simulated)" in warnings[0].getMessage()
    assert offload.stats.offloaded == 2 * (LAYERS - 1)


def test_a_prefetch_without_device_memory_is_skipped_not_an_error(monkeypatch, caplog):
    model = _model()
    offload = _offload()
    offload.install(model)
    real = OffloadedCheckpointing._to_device
    calls = []

    def first_one_fails(self, saved):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(self, saved)

    monkeypatch.setattr(OffloadedCheckpointing, "_to_device", first_one_fails)
    batches = _batches()
    reference = _model()
    enable_checkpointing(reference, use_reentrant=False)
    with caplog.at_level(logging.WARNING, logger="fastlora.checkpointing"):
        _assert_equal(_train_grads(model, batches), _train_grads(reference, batches))
    assert sum("prefetch" in r.getMessage() for r in caplog.records) == 1
    assert (offload.stats.prefetched, offload.stats.fetched) == (2 * (LAYERS - 1) - 1, 1)


def test_an_input_modified_in_place_is_an_error_not_a_wrong_gradient():
    weight = torch.randn(4, 4, requires_grad=True)
    offload = _offload()
    x = torch.randn(3, 4)
    y = offload(lambda h: (h @ weight).tanh(), x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_only_the_checkpoint_inputs_are_offloaded():
    """Inside the checkpoint torch's own hooks (or no_grad) take over: one tensor per layer is seen."""
    for use_reentrant in (False, True):
        model = _model()
        offload = _offload(use_reentrant=use_reentrant)
        offload.install(model)
        _train_grads(model, _batches(1))
        assert offload.stats.offloaded + offload.stats.on_device == LAYERS


def test_one_object_per_model():
    first, second = _model(), _model()
    offload = _offload()
    offload.install(first)
    offload.install(first)  # again on its own model: fine
    with pytest.raises(ValueError, match="belongs to another model"):
        offload.install(second)
    with pytest.raises(ValueError, match="belongs to another model"):
        fastlora.patch(second, checkpointing=offload)
    assert all("FastLoRA" not in type(m).__name__ for m in second.modules())  # nothing changed
    assert "_fastlora_patch" not in second.get_base_model().__dict__
    copy.deepcopy(first)  # a copy's object starts without an owner, and the copy takes it


def test_bad_options():
    with pytest.raises(ValueError, match="min_offload_bytes"):
        OffloadedCheckpointing(min_offload_bytes=-1)
    with pytest.raises(ValueError, match="offload_device_types"):
        OffloadedCheckpointing(offload_device_types="cuda")
    with pytest.raises(TypeError, match="not a transformers model"):
        OffloadedCheckpointing().install(torch.nn.Linear(2, 2))


def test_patch_switches_checkpointing_on_now_and_later_and_undo_restores_torch_checkpoint():
    model = _model()
    hf = model.get_base_model()
    offload = _offload()
    report = fastlora.patch(model, checkpointing=offload, lora=False, loss=None, rope=False, mlp=False)
    assert any(name == "checkpointing" for name, _ in report.patched)
    layers = list(hf.model.layers)
    assert not any(layer.gradient_checkpointing for layer in layers)  # not on yet: patch does not turn it on
    enable_checkpointing(model, use_reentrant=True)
    assert all(layer._gradient_checkpointing_func is offload for layer in layers)
    assert offload.checkpoint_fn.keywords == {"use_reentrant": True}  # what transformers was asked for
    _train_grads(model, _batches(1))
    assert offload.stats.offloaded == LAYERS - 1
    report.undo()
    assert all(layer._gradient_checkpointing_func is offload.checkpoint_fn for layer in layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert type(hf).__name__ == "LlamaForCausalLM" and "_fastlora_checkpointing" not in hf.__dict__


def test_patch_switches_over_checkpointing_that_is_already_on():
    model = _model()
    enable_checkpointing(model, use_reentrant=False, every_n_layers=2)
    layers = list(model.get_base_model().model.layers)
    on = [layer.gradient_checkpointing for layer in layers]
    assert on == [True, False, True]
    report = fastlora.patch(model, checkpointing="offload")
    assert [layer.gradient_checkpointing for layer in layers] == on
    offload = layers[0]._gradient_checkpointing_func
    assert isinstance(offload, OffloadedCheckpointing) and offload.min_offload_bytes == 1 << 20
    assert fastlora.patch(model, checkpointing="offload") is report
    with pytest.raises(ValueError, match="already patched with other options.*checkpointing"):
        fastlora.patch(model)
    clone = copy.deepcopy(model)
    clone_layers = clone.get_base_model().model.layers
    assert clone_layers[0]._gradient_checkpointing_func is not offload
    assert fastlora.unpatch(clone) and isinstance(layers[0]._gradient_checkpointing_func, OffloadedCheckpointing)
    assert fastlora.unpatch(model)
    with pytest.raises(ValueError, match="checkpointing must be"):
        fastlora.patch(model, checkpointing="cpu")


def test_hf_trainer_uses_it_when_asked(tmp_path):
    """A Trainer turning checkpointing on inside train() gets the offloaded kind on a patched model, with the
    use_reentrant it was given; its losses are those of a Trainer with plain checkpointing."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for batch in _batches(4) for ids in batch]

    def train(model):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, **trainer_checkpointing_args(use_reentrant=False), seed=3,
                                 dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=rows).train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    expected = train(_model())
    model = _model()
    offload = _offload()
    fastlora.patch(model, checkpointing=offload, lora=False, loss=None, rope=False, mlp=False)
    trained = train(model)
    assert trained.keys() == expected.keys() and trained
    for name in expected:
        assert torch.equal(trained[name], expected[name]), name
    assert offload.stats.offloaded == 3 * (LAYERS - 1)
    assert offload.checkpoint_fn.keywords == {"use_reentrant": False}


@pytest.mark.gpu
def test_on_a_gpu_inputs_leave_the_gpu_and_gradients_are_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        # Eager attention: SDPA's fused backward kernels may accumulate in a different order on every run.
        config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=VOCAB, attn_implementation="eager")
        model = peft.get_peft_model(LlamaForCausalLM(config).cuda(), peft.LoraConfig(r=8, lora_dropout=0.1,
                                                                                    target_modules="all-linear"))
        model.train()
        return model

    ids = torch.randint(0, VOCAB, (2, 512), device="cuda")  # layer inputs of 4 MiB: above the 1 MiB threshold
    input_bytes = 2 * 512 * 1024 * 4
    allocated, grads = [], []
    for offload in (None, OffloadedCheckpointing()):
        model = build()
        if offload is None:
            enable_checkpointing(model, use_reentrant=False)
        else:
            offload.install(model)
        torch.manual_seed(5)
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator take back blocks whose copies are done
        allocated.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        del model, loss
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    assert (offload.stats.offloaded, offload.stats.prefetched, offload.stats.on_device) == (3, 3, 1)
    assert allocated[0] - allocated[1] >= 2 * input_bytes, allocated
