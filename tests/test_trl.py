"""TRL's SFTTrainer with FastLoRACallback: it trains as the unpatched SFTTrainer does, fastlora's LoRA ops run inside
TRL's fused-head forward, and the bypassed loss is reported once with the true reason."""

import logging

import pytest
import torch

import fastlora
from fastlora.integrations import FastLoRACallback
from fastlora.testing import assert_close_to_reference, peft_lora_model, torch_twin

pytestmark = pytest.mark.cpu_kernels

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 101


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(2, VOCAB)} | {"<pad>": 0, "</s>": 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="t2")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1)
    return peft_lora_model(LlamaForCausalLM(config))


def _unpatched_forward(trainer):
    """After fastlora.unpatch, TRL's forward (which kept the patched model's bound forward) gives transformers'
    outputs again: logits, and transformers' loss."""
    model = trainer.model
    assert fastlora.unpatch(model)
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 6, VOCAB)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


class _Losses(trl.SFTTrainer):
    """Records each micro-batch's loss as TRL computes it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(loss.detach().clone())
        return loss


def _train(model, tmp_path, loss_type, padding_free, callbacks=(), after=None):
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(2, VOCAB, (n,), generator=g).tolist()} for n in (7, 12, 5, 9, 11, 6, 8, 10)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, optim="sgd", report_to=[], use_cpu=True,
                         save_strategy="no", loss_type=loss_type, padding_free=padding_free, bf16=False,
                         max_length=None if padding_free else 1024, seed=0, dataloader_num_workers=0)
    trainer = _Losses(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=_tokenizer(), callbacks=list(callbacks))
    trainer.losses = []
    trainer.train()
    if after is not None:
        after(trainer)
    return torch.stack(trainer.losses)


@pytest.mark.parametrize("loss_type, padding_free", [("nll", False), ("dft", False), ("nll", True)])
def test_sft_trainer_patched_equals_unpatched_and_says_what_ran(tmp_path, caplog, loss_type, padding_free):
    """Per micro-batch losses of 2 optimizer steps (4 micro-batches) within twice the unpatched run's error against
    the same SFTTrainer run in fp64; the patched LoRA layers ran fastlora's ops; TRL's own fused head computed the
    loss, which one warning says, with no second warning about the loss after the first step."""
    exact = _train(torch_twin(_model()), tmp_path, loss_type, padding_free)
    unpatched = _train(_model(), tmp_path, loss_type, padding_free)
    callback = FastLoRACallback()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        patched = _train(_model(), tmp_path, loss_type, padding_free, [callback], after=_unpatched_forward)
    assert len(patched) == 4
    assert_close_to_reference(patched, exact, unpatched, ulps=4, name=f"{loss_type} losses")
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("TRL's fused lm_head" in w and "fastlora's loss does not run" in w for w in warnings) == 1, warnings
    assert not any("did not run fastlora's ops" in w for w in warnings), warnings
    coverage = callback.report.coverage()  # kept by the report after the unpatch
    assert [c.op for c in coverage.never_ran()] == ["loss"], str(coverage)
    assert coverage.ran()["lora_qkv"] > 0 and coverage.ran()["lora_linear"] > 0
