"""What a patch really runs: per-module call counts, one warning per fallback reason, and the cases where a patch
used to say "patched" while fastlora's ops never ran (a weight stripped of its quant state, a class put on top of
the patch, PEFT's merge_and_unload)."""

import copy
import logging

import pytest
import torch

import fastlora
from fastlora.patching import coverage
from fastlora.testing import nf4_decoder, peft_lora_model

peft = pytest.importorskip("peft")

VOCAB = 101


def _llama(intermediate_size=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))


def _ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _fastlora_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fastlora" and r.levelno == logging.WARNING]


def test_every_patched_module_counts_what_ran(caplog):
    model = peft_lora_model(_llama())
    report = fastlora.patch(model, backend="torch")  # forced: RoPE and the fused MLP are patched on a CPU too
    assert str(report).splitlines()[0] == (
        "fastlora patch of a llama model: lora_linear on 14, lora_qkv on 2 (computing 6 of the layers' outputs), "
        "loss on 1, apply_rope on 2, lora_mlp on 2 (computing 6 of the layers' outputs); 0 left alone")
    ids = _ids()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        model.eval()
        model(input_ids=ids, labels=ids)
        with model.disable_adapter():
            model(input_ids=ids)
    cov = coverage(model)
    assert cov.never_ran() == [] and cov.fell_back() == {}
    # q/k/v of 2 layers through lora_qkv, o_proj alone, the MLPs whole: nothing counted twice.
    assert cov.ran() == {"lora_qkv": 4, "lora_linear": 4, "lora_mlp": 4, "apply_rope": 6,
                         "fused_linear_cross_entropy": 1, "cross_entropy": 1}
    by_name = {(c.name, c.op): c for c in cov.modules}
    q = by_name["model.layers.0.self_attn.q_proj", "lora_linear"]
    assert not q.ran and q.served_by is by_name["model.layers.0.self_attn", "lora_qkv"]
    assert by_name["model.layers.0.self_attn", "lora_qkv"].idle == {"adapters disabled": 1}
    assert _fastlora_warnings(caplog) == []  # disabled adapters are not a fallback
    assert "never ran" in str(cov) and "served by model.layers.0.mlp's lora_mlp" in str(cov)


def test_a_fallback_warns_once_per_reason_and_is_counted(caplog):
    model = peft_lora_model(_llama())
    fastlora.patch(model)
    ids = _ids()
    layers = [m for m in model.modules() if hasattr(m, "_fastlora_coverage")]
    model.eval()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        for _ in range(2):
            model(input_ids=ids, adapter_names=["default", "default"])  # PEFT's mixed-batch keyword
    warnings = _fastlora_warnings(caplog)
    assert len(warnings) == 2, warnings  # the layers' reason, and the attentions' (lora_qkv's outputs unused)
    assert "only PEFT's forward takes" in warnings[0] and "lora_qkv's outputs were not used" in warnings[1]
    cov = coverage(model)
    assert sum(cov.fell_back().values()) == 2 * (len(layers) + 2)  # + the 2 attentions
    assert {c.op for c in cov.never_ran()} == {"lora_linear", "lora_qkv", "loss"}


def test_a_layer_stripped_of_its_quant_state_keeps_the_fused_path():
    """FSDP2 all-gathers a Params4bit into a plain tensor: the weight has no quant_state in the sharded forward.
    The layer's own quant_state is read (as bitsandbytes' forward does), so the layer stays on lora_linear, with
    the same output."""
    pytest.importorskip("bitsandbytes")
    model = peft_lora_model(nf4_decoder(_llama(intermediate_size=128)))
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    x = torch.randn(3, 64)
    fastlora.patch(model)
    want = layer(x)
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.data.clone(), requires_grad=False)  # plain, as after all-gather
    assert getattr(base.weight, "quant_state", None) is None and base.quant_state is not None
    counter = layer._fastlora_coverage
    before = counter.ran["lora_linear"]
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert counter.ran["lora_linear"] == before + 1 and not counter.fell_back


def test_a_layer_bitsandbytes_repacked_for_cpu_falls_back_with_the_reason(caplog):
    pytest.importorskip("bitsandbytes")
    model = peft_lora_model(nf4_decoder(_llama(intermediate_size=128)))
    fastlora.patch(model)
    base = model.get_base_model().model.layers[0].self_attn.o_proj.get_base_layer()
    state = copy.copy(base.weight.quant_state)  # the repack installs a new state, flagged (here without repacking)
    state.packing_format_for_cpu = True
    base.weight.quant_state = state
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        for _ in range(2):
            layer(torch.randn(3, 64))  # bitsandbytes' forward runs (on bytes not really repacked: output unused)
    warnings = _fastlora_warnings(caplog)
    assert len(warnings) == 1 and "repacked by bitsandbytes for CPU inference" in warnings[0], warnings
    assert sum(layer._fastlora_coverage.fell_back.values()) == 2 and not layer._fastlora_coverage.ran


def test_undo_keeps_a_class_another_library_put_on_top():
    """FSDP2's fully_shard gives the module a class FSDP<Class>(FSDPModule, Class); undo must drop fastlora's class
    from under it, not put the pre-shard class back."""
    model = peft_lora_model(_llama())
    hf = model.get_base_model()
    original = type(hf)
    fastlora.patch(model, checkpointing="offload")

    class Marker:
        def marked(self):
            return True

    wrapped = type(f"Wrapped{type(hf).__name__}", (Marker, type(hf)), {})
    hf.__class__ = wrapped
    assert fastlora.unpatch(model)
    cls = type(hf)
    assert cls.__name__ == wrapped.__name__ and isinstance(hf, Marker) and hf.marked()
    assert cls.__mro__[2] is original  # both fastlora classes (fused loss, checkpointing) gone from under it
    ids = _ids()
    hf.train()
    assert hf(input_ids=ids, labels=ids).logits is not None


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_merge_and_unload_of_a_patched_model_gives_transformers_model(how):
    model = peft_lora_model(_llama())
    reference = peft_lora_model(_llama())
    fastlora.patch(model)
    merged = getattr(model, how)()
    want = getattr(reference, how)()
    assert type(merged) is type(want)
    assert not hasattr(merged, "_fastlora_patch") or merged._fastlora_patch.undone
    assert not any(type(m).__name__.startswith("FastLoRA") for m in merged.modules())
    ids = _ids()
    merged.train()
    want.train()
    out, ref = merged(input_ids=ids, labels=ids), want(input_ids=ids, labels=ids)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)


def test_a_deepspeed_zero3_partitioned_layer_falls_back_with_the_reason(caplog):
    """ZeRO-3 leaves an empty placeholder (carrying ``ds_id``) in each parameter outside its module's own forward;
    the fused path would read it, so the layer runs PEFT's forward and says why."""
    model = peft_lora_model(_llama())
    fastlora.patch(model)
    layer = model.get_base_model().model.layers[0].self_attn.o_proj
    layer.get_base_layer().weight.ds_id = 7  # the marker DeepSpeed puts on a partitioned parameter
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        layer(torch.randn(3, 64))
    warnings = _fastlora_warnings(caplog)
    assert len(warnings) == 1 and "DeepSpeed ZeRO-3" in warnings[0], warnings
    assert not layer._fastlora_coverage.ran
