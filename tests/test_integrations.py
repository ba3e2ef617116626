"""FastLoRACallback: an HF Trainer patches its model when it is made, and trains as the unpatched one."""

import logging
import types

import pytest
import torch

from fastlora.checkpointing import trainer_checkpointing_args
from fastlora.integrations import FastLoRACallback
from fastlora.testing import assert_pooled_close_to_reference, peft_lora_model, torch_twin

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 101


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return peft_lora_model(LlamaForCausalLM(config), dropout=0.1)


def _rows(n=8):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (9,), generator=g)
        labels = ids.clone()
        labels[: i % 5] = -100  # micro-batches with different numbers of counted tokens
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _train(model, tmp_path, callbacks=(), **options):
    from transformers import Trainer, TrainingArguments

    options = {"learning_rate": 1e-2, **options}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, save_strategy="no", report_to=[],
                             use_cpu=True, **trainer_checkpointing_args(), seed=3, dataloader_num_workers=0,
                             **options)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), callbacks=list(callbacks))
    result = trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}, result.training_loss


class _Gradients(transformers.TrainerCallback):
    """The LoRA gradients the optimizer is about to apply, step by step (accumulated, and clipped if asked)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads += [p.grad.detach().clone() for n, p in sorted(model.named_parameters()) if "lora_" in n]


def test_trainer_with_the_callback_trains_like_the_unpatched_model(tmp_path):
    """Gradient accumulation with uneven label counts: the patched loss must get num_items_in_batch. The
    gradients of both optimizer steps are within twice the unpatched model's error against the same Trainer run in
    fp64, pooled. SGD, so that the second step starts from nearly the same weights in the three runs: AdamW's first
    step moves every weight by about the learning rate whatever the rounding of its gradient (a weight compare
    after two AdamW steps failed on AVX-512 CPUs)."""
    runs = {}
    for name in ("fp64", "unpatched", "patched"):
        model = torch_twin(_model()) if name == "fp64" else _model()
        grads = _Gradients()
        callbacks = [grads] + ([FastLoRACallback(checkpointing="offload")] if name == "patched" else [])
        _train(model, tmp_path, callbacks, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)  # clipping hides scale
        runs[name] = grads.grads
    callback = callbacks[1]
    kinds = " ".join(what for _, what in callback.report.patched)
    assert "lora_linear" in kinds and "fused_linear" in kinds and "offloaded" in kinds
    assert len(runs["patched"]) == len(runs["fp64"]) == 2 * 2 * 7 * 2  # 2 steps, A and B of 7 layers x 2 layers
    assert_pooled_close_to_reference(runs["patched"], runs["fp64"], runs["unpatched"], name="LoRA gradients")
    from fastlora import OffloadedCheckpointing

    layer = model.get_base_model().model.layers[0]
    assert isinstance(layer._gradient_checkpointing_func, OffloadedCheckpointing)


def test_trainer_in_bf16_mixed_precision(tmp_path, fused_calls):
    """``bf16=True`` on an fp32 model runs the forward under autocast: the patched model trains there, its fused
    ops run under autocast, and its loss is the unpatched model's within bf16 rounding (measured 2e-4 apart).
    AdamW's first steps move every weight by about the learning rate whatever the rounding, so the loss is
    compared, not the weights."""
    _, expected = _train(_model(), tmp_path, bf16=True)
    seen = []
    model = _model()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    layer.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    _, got = _train(model, tmp_path, [FastLoRACallback()], bf16=True)
    assert seen and all(seen), "the Trainer did not run the forward under autocast"
    assert "lora_qkv" in fused_calls
    assert got == pytest.approx(expected, rel=2e-3)


def test_a_forward_set_on_the_model_instance_is_reported(caplog):
    """TRL's SFTTrainer sets the model's forward on the instance (tests/test_trl.py runs the real one); any such
    forward hides the patched class's loss, which on_train_begin says once."""
    model = _model()
    callback = FastLoRACallback()
    callback.on_init_end(types.SimpleNamespace(), None, None, model=model)
    hf = model.get_base_model()
    hf.forward = hf.forward  # a bound method kept on the instance, as TRL's wrapper keeps one
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        callback.on_train_begin(None, None, None)
        callback.on_train_begin(None, None, None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "a forward set on the model instance" in warnings[0], warnings
    with pytest.raises(ValueError, match="no model"):
        FastLoRACallback().on_init_end(types.SimpleNamespace(), None, None, model=None)


def test_callback_warns_after_the_first_step_about_what_never_ran(caplog):
    model = _model()
    callback = FastLoRACallback()
    callback.on_init_end(types.SimpleNamespace(), None, None, model=model)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.train()
    model(input_ids=ids).logits.sum().backward()  # no labels: the loss never runs
    with caplog.at_level(logging.INFO, logger="fastlora"):
        callback.on_step_end(None, types.SimpleNamespace(global_step=1), None)
        callback.on_step_end(None, types.SimpleNamespace(global_step=2), None)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(infos) == 1 and "fastlora coverage of a llama model" in infos[0]
    assert len(warnings) == 1 and "1 patched modules did not run fastlora's ops" in warnings[0], warnings
    assert "(loss; first: loss): they were never called" in warnings[0]
