"""fastlora.patch on tiny random-init models: patched vs unpatched, undo, idempotence, per-instance, reasons."""

import copy

import pytest
import torch

import fastlora
from fastlora.checkpointing import enable_checkpointing
from fastlora.patching import FAMILIES
from fastlora.testing import (
    assert_close_to_reference,
    assert_grads_close_to_reference,
    assert_pooled_close_to_reference,
    nf4_decoder,
    peft_lora_model,
    torch_twin,
)

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

peft = pytest.importorskip("peft")

VOCAB = 101  # odd on purpose
# The MLP width of a model whose decoder becomes bitsandbytes 4-bit: bnb's CPU dequantize misreads weights whose rows
# are not whole blocks of 64 on AVX-512 CPUs (bnb 0.49-0.50, recorded in tests/test_nf4.py), so every 4-bit layer's
# input width is a multiple of 64 there, as in real models. The dense models keep 96, not a multiple of the tiles.
NF4_INTERMEDIATE = 128


def _llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    options = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    config = LlamaConfig(**{**options, **overrides})
    return LlamaForCausalLM(config).float()


_peft = peft_lora_model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return None if out.logits is None else out.logits.detach(), out.loss.detach(), grads


def _exact(model, ids, labels, seed=None, dtype=torch.float64):
    """One step of ``model``'s twin computed by PyTorch alone (4-bit bases as the independent decoder reads them):
    in fp64 the reference that errors are measured against; in fp32 the yardstick for a 4-bit model, whose
    bitsandbytes kernels compute in other orders on other CPUs. Take it before patching."""
    twin = torch_twin(model, dtype)
    if seed is not None:
        torch.manual_seed(seed)  # the dropout masks
    return _step(twin, ids, labels)


def _same(got, want, exact):
    """The patched model's step (logits, loss, every gradient) within twice the unpatched model's error against
    the fp64 model's step (DESIGN.md's rule, plus a few ulps)."""
    (logits, loss, grads), (logits_u, loss_u, grads_u), (logits64, loss64, grads64) = got, want, exact
    if logits is not None and logits_u is not None:
        assert_close_to_reference(logits, logits64, logits_u, name="logits")
    assert_close_to_reference(loss, loss64, loss_u, ulps=4, name="loss")
    assert grads and grads.keys() == grads_u.keys() == grads64.keys()
    assert_grads_close_to_reference(grads, grads64, grads_u)


@pytest.mark.parametrize("loss", ["fused_linear", "logits", None])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_peft_llama_patched_equals_unpatched(checkpointing, loss):
    model = _peft(_llama())
    if checkpointing:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        model.enable_input_require_grads()
        assert model.get_base_model().model.layers[0].gradient_checkpointing
    model.train()
    ids, labels = _batch()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    report = fastlora.patch(model, loss=loss)
    # 7 LoRA layers and one q/k/v attention per decoder layer, and the loss.
    assert len(report.patched) == 2 * 8 + {"fused_linear": 2, "logits": 1, None: 0}[loss]
    patched = _step(model, ids, labels)
    assert (patched[0] is None) == (loss == "fused_linear")  # no logits made when the loss is fused
    _same(patched, before, exact)
    model.eval()
    eval_logits = model(input_ids=ids).logits
    model.train()
    report.undo()
    after = _step(model, ids, labels)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # bit-identical again
    model.eval()
    assert_close_to_reference(eval_logits, torch_twin(model).eval()(input_ids=ids).logits,
                              model(input_ids=ids).logits, name="eval logits")


def test_num_items_in_batch_reaches_the_loss():
    """The trainer's gradient-accumulation divisor: summed loss / num_items, on both loss patches."""
    for loss in ("fused_linear", "logits"):
        model = _peft(_llama())
        model.train()
        ids, labels = _batch()
        want = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
        exact = torch_twin(model)(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
        fastlora.patch(model, loss=loss)
        got = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
        assert_close_to_reference(got, exact, want, ulps=4, name=f"{loss} loss")


def test_patched_layers_really_take_the_fused_path(fused_calls):
    model = _peft(_llama())
    fastlora.patch(model)
    model(input_ids=_batch()[0])
    # Per decoder layer: q, k and v in one lora_qkv; o, gate, up and down one lora_linear each.
    assert sorted(fused_calls) == ["lora_linear"] * 8 + ["lora_qkv"] * 2


def test_patching_twice_changes_nothing_and_unpatch():
    model = _peft(_llama())
    first = fastlora.patch(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    assert fastlora.patch(model) is first
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert fastlora.unpatch(model) and not fastlora.unpatch(model)
    assert all("FastLoRA" not in type(m).__name__ for m in model.modules())
    assert fastlora.patch(model) is not first  # patchable again after undo


def test_other_instances_are_untouched():
    a, b = _peft(_llama()), _peft(_llama())
    fastlora.patch(a)
    assert any("FastLoRA" in type(m).__name__ for m in a.modules())
    assert all("FastLoRA" not in type(m).__name__ for m in b.modules())


def test_dropout_adapter_switching_and_merge():
    model = _peft(_llama(), dropout=0.1)
    reference = copy.deepcopy(model)
    fastlora.patch(model)
    ids, labels = _batch()
    model.train()
    reference.train()
    torch.manual_seed(3)
    got = _step(model, ids, labels)
    torch.manual_seed(3)
    want = _step(reference, ids, labels)
    _same(got, want, _exact(reference, ids, labels, seed=3))  # the same dropout masks from the same RNG state
    model.eval()
    reference.eval()
    with model.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    merged = model.merge_and_unload()
    assert_close_to_reference(merged(input_ids=ids).logits, torch_twin(reference)(input_ids=ids).logits,
                              reference(input_ids=ids).logits, name="merged logits")


def test_dora_layers_are_left_alone_with_the_reason():
    model = _peft(_llama(), use_dora=True, targets=["q_proj", "v_proj"])
    report = fastlora.patch(model)
    assert not any("lora_linear" in what for _, what in report.patched)
    reasons = dict(report.skipped)
    assert reasons["model.layers.0.self_attn.q_proj"] == "DoRA adapter 'default'"
    assert "DoRA adapter" in str(report)


def test_plain_model_on_cpu_reports_what_it_leaves_alone():
    report = fastlora.patch(_llama())
    assert {name for name, _ in report.skipped} == {"rope", "mlp"}  # slower on a CPU, both measured
    assert [name for name, _ in report.patched] == ["loss_function", "LlamaForCausalLM"]


def test_unsupported_model_type_changes_nothing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = _peft(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)),
                  targets=["c_attn"])
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported \\(supported: gemma, gemma2"):
        fastlora.patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_family_table_matches_transformers():
    import importlib

    for family in FAMILIES.values():
        module = importlib.import_module(family.modeling)
        assert callable(module.apply_rotary_pos_emb), family.model_type


def _four_bit(model):
    """The decoder's linear layers replaced by bitsandbytes NF4 Linear4bit (as from_pretrained would load them)."""
    pytest.importorskip("bitsandbytes")
    return nf4_decoder(model)


def test_peft_over_bitsandbytes_patched_equals_unpatched():
    model = _peft(_four_bit(_llama(intermediate_size=NF4_INTERMEDIATE)))
    lora_layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert len(lora_layers) == 14
    ids, labels = _batch()
    model.train()
    before = _step(model, ids, labels)
    exact, fp32 = _exact(model, ids, labels), _exact(model, ids, labels, dtype=torch.float32)
    report = fastlora.patch(model)
    assert sum("Linear4bit" in what for _, what in report.patched) == 14
    _same(_step(model, ids, labels), fp32, exact)
    report.undo()
    torch.testing.assert_close(_step(model, ids, labels)[0], before[0], rtol=0, atol=0)


def test_generation_and_saving_adapters(tmp_path):
    model = _peft(_llama())
    model.eval()
    ids = _batch()[0][:, :4]
    keys = set(model.state_dict())
    want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fastlora.patch(model)
    got = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)  # greedy, with the KV cache
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_llama(), tmp_path)
    assert_close_to_reference(model(input_ids=ids).logits, torch_twin(reloaded)(input_ids=ids).logits,
                              reloaded(input_ids=ids).logits, name="logits of the reloaded adapters")


def test_a_patched_model_saves_under_its_own_architecture(tmp_path):
    """The swapped model classes keep the original name: save_pretrained writes it into config.architectures."""
    import json

    from transformers import LlamaForCausalLM

    model = _llama()
    fastlora.patch(model, checkpointing="offload")  # two class swaps: the fused loss, then the checkpointing
    assert type(model) is not LlamaForCausalLM and type(model).__mro__[2] is LlamaForCausalLM
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def _tiny(model_type, layers=1, intermediate_size=96):
    import transformers

    common = dict(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    if model_type != "phi3":
        common["head_dim"] = 16
    else:
        common["pad_token_id"] = 0
    if model_type in ("gemma2", "gemma3_text"):
        common["final_logit_softcapping"] = 0.5  # small: random logits reach it, so a missing cap would show
    config = transformers.AutoConfig.for_model(model_type, **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_plain_model_fused_loss(model_type):
    """Full fine-tuning of a plain model (trainable lm_head, tied or not): loss and every gradient agree."""
    model = _tiny(model_type)
    model.train()
    ids, labels = _batch()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    report = fastlora.patch(model)
    assert any(what.startswith("training with labels") for _, what in report.patched), str(report)
    _same(_step(model, ids, labels), before, exact)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_rope_patch(model_type, monkeypatch):
    """With a backend forced (on a CPU, AUTO leaves RoPE alone), each family's attention rotates with fastlora."""
    import fastlora.patching.rope as rope_patch

    calls = []
    real = rope_patch.apply_rope
    monkeypatch.setattr(rope_patch, "apply_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, other = _tiny(model_type), _tiny(model_type)
    model.train()
    ids, labels = _batch()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    report = fastlora.patch(model, backend="torch", loss=None)
    assert sum("apply_rope" in what for _, what in report.patched) == 1  # one layer
    _same(_step(model, ids, labels), before, exact)
    assert len(calls) == 1
    other(input_ids=ids)  # an unpatched model of the same family keeps transformers' function
    assert len(calls) == 1
    report.undo()
    model(input_ids=ids)
    assert len(calls) == 1


def test_rope_patch_on_triton(triton_device):
    model = _tiny("phi3")  # partial rotary
    ids, labels = _batch()
    model.train()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    fastlora.patch(model, backend="triton", loss=None)
    _same(_step(model, ids, labels), before, exact)


def test_rope_is_left_alone_on_cpu_by_default():
    reasons = dict(fastlora.patch(_tiny("llama")).skipped)
    assert "slower than transformers' own function" in reasons["rope"]


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma"])  # gate+up silu, fused gate_up, gelu_tanh
def test_mlp_patch_equals_peft(model_type):
    model = _peft(_tiny(model_type), dropout=0.1)
    reference = copy.deepcopy(model)
    report = fastlora.patch(model, backend="torch", rope=False, loss=None)
    assert sum("lora_mlp" in what for _, what in report.patched) == 1, str(report)
    model.train()
    reference.train()
    ids, labels = _batch()
    torch.manual_seed(4)
    got = _step(model, ids, labels)
    torch.manual_seed(4)
    want = _step(reference, ids, labels)
    _same(got, want, _exact(reference, ids, labels, seed=4))


def test_mlp_patch_falls_back_when_adapters_change(monkeypatch):
    import fastlora.patching.mlp as mlp_patch

    calls = []
    real = mlp_patch.lora_mlp
    monkeypatch.setattr(mlp_patch, "lora_mlp", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _peft(_tiny("llama"))
    fastlora.patch(model, backend="torch")
    ids = _batch()[0]
    model(input_ids=ids)
    assert len(calls) == 1
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules="all-linear"))
    model.base_model.set_adapter(["default", "second"])  # two active adapters: the layers one by one
    model(input_ids=ids)
    assert len(calls) == 1


def test_four_bit_merge_unmerge_installs_new_weights_that_the_patch_reads():
    """PEFT's 4-bit merge/unmerge replaces each Params4bit: the patched layers must follow, not a cached view."""
    model = _peft(_four_bit(_llama(intermediate_size=NF4_INTERMEDIATE)))
    reference = copy.deepcopy(model)
    fastlora.patch(model)
    ids = _batch()[0]
    model.eval()
    reference.eval()
    model(input_ids=ids)  # fills the view cache with the current weights
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    old_weight = q_proj.base_layer.weight
    for m in (model, reference):
        m.base_model.merge_adapter()
        m.base_model.unmerge_adapter()  # requantized: new Params4bit objects
    assert q_proj.base_layer.weight is not old_weight
    assert_close_to_reference(model(input_ids=ids).logits, torch_twin(reference)(input_ids=ids).logits,
                              torch_twin(reference, torch.float32)(input_ids=ids).logits,
                              name="logits after merge and unmerge")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_takes_q_k_v_from_one_lora_qkv(model_type, fused_calls):
    """The attention's projection layers return what lora_qkv made for them, rather than computing again."""
    model = _peft(_tiny(model_type))
    model.train()
    ids, labels = _batch()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    fastlora.patch(model, rope=False, mlp=False)
    fused_calls.clear()
    _same(_step(model, ids, labels), before, exact)
    fused = model_type != "phi3"  # Phi3's qkv_proj is one layer already
    # One decoder layer: q, k, v (or Phi3's qkv), o, gate, up (or gate_up) and down.
    assert sorted(fused_calls) == ["lora_linear"] * 4 + ["lora_qkv"] * fused


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_peft_everything_patched(model_type, four_bit):
    """PEFT LoRA on every linear layer, every patch on (a backend forced so RoPE and the MLP are patched on a CPU
    too), with checkpointing: loss and LoRA gradients agree, undo is bit-identical, greedy generation matches."""
    base = _tiny(model_type, intermediate_size=NF4_INTERMEDIATE if four_bit else 96)
    if four_bit:
        base = _four_bit(base)
    model = _peft(base)
    enable_checkpointing(model, use_reentrant=False)
    model.train()
    ids, labels = _batch()
    before = _step(model, ids, labels)
    exact = _exact(model, ids, labels)
    yardstick = _exact(model, ids, labels, dtype=torch.float32) if four_bit else before
    report = fastlora.patch(model, backend="torch")
    kinds = " ".join(what for _, what in report.patched)
    assert "lora_linear" in kinds and "apply_rope" in kinds and "lora_mlp" in kinds and "fused_linear" in kinds
    if model_type == "phi3":
        assert ("model.layers.0.self_attn", "q/k/v: qkv_proj is already one projection") in report.skipped
    else:
        assert "lora_qkv" in kinds
    _same(_step(model, ids, labels), yardstick, exact)
    model.eval()
    prompt = ids[:, :4]
    patched_tokens = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    report.undo()
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       patched_tokens)
    model.train()
    torch.testing.assert_close(_step(model, ids, labels)[1], before[1], rtol=0, atol=0)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_trains_like_the_unpatched_model(model_type):
    """Twenty AdamW steps with LoRA dropout and checkpointing, everything patched (offloading too, on CPU tensors
    here): at every step the patched model's loss and LoRA gradients are within twice the unpatched model's error
    against the fp64 model, pooled over the steps.

    The fp64 model trains; before each step its weights are written into both fp32 models in place, as an optimizer
    writes them, so each step starts the three from the same point. Left to follow their own curves, the fp32 runs
    part ways after a few steps: AdamW turns rounding-sized differences in small gradients into steps of the
    learning rate's size, so by step 10 either model's drift from fp64 swung between 1e-6 and 1e-4 with the CPU's
    summation order, and a 2x bound on it failed on AVX-512 CPUs. In lock step the pooled patched/unpatched
    gradient error ratio measured 0.90-1.08 for every family under torch's AVX-512, AVX2 and default kernels, while
    a 2% error in layer 0's q (or qkv) LoRA scaling gives 2,500-57,000 (and 400 or more on the losses)."""
    from fastlora import OffloadedCheckpointing

    reference = _peft(_tiny(model_type, layers=2), dropout=0.05)
    model, exact = copy.deepcopy(reference), torch_twin(reference)
    offload = OffloadedCheckpointing(min_offload_bytes=0, offload_device_types=("cpu",), pin_memory=False)
    fastlora.patch(model, backend="torch", checkpointing=offload)
    for m in (reference, model, exact):
        enable_checkpointing(m, use_reentrant=False)
        m.train()
    trained = {n: p for n, p in exact.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    results = {"unpatched": ([], []), "patched": ([], []), "fp64": ([], [])}
    for step in range(20):
        ids, labels = _batch(seed=step % 2)  # two batches in turn: there is something to learn
        for name, m in (("fp64", exact), ("unpatched", reference), ("patched", model)):
            if m is not exact:
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if n in trained:
                            p.copy_(trained[n])
            torch.manual_seed(step)  # the dropout masks
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            results[name][0].append(loss.detach())
            results[name][1].extend(p.grad.clone() for n, p in sorted(m.named_parameters()) if n in trained)
            if m is not exact:
                m.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    losses = {name: torch.stack(r[0]) for name, r in results.items()}
    assert losses["fp64"][-1] < losses["fp64"][0] - 0.3  # it learns
    assert_pooled_close_to_reference([losses["patched"]], [losses["fp64"]], [losses["unpatched"]], name="losses")
    assert_pooled_close_to_reference(results["patched"][1], results["fp64"][1], results["unpatched"][1],
                                     name="LoRA gradients")
    assert offload.stats.offloaded == 20 and offload.stats.on_device == 20  # layer 0's input; layer 1's stays


def test_a_deep_copy_undoes_itself_not_the_original():
    model = _peft(_llama())
    fastlora.patch(model)
    clone = copy.deepcopy(model)
    assert fastlora.unpatch(clone)
    assert all("FastLoRA" not in type(m).__name__ for m in clone.modules())
    assert any("FastLoRA" in type(m).__name__ for m in model.modules())
    assert "_loss_function" not in clone.get_base_model().__dict__
    assert "_loss_function" in model.get_base_model().__dict__


def test_fused_forward_takes_arguments_as_transformers_does():
    """Positional arguments by the original's names (the 4th is ``cache`` in transformers 5.2x, ``past_key_values``
    before), and no deprecation warning the unpatched forward does not give."""
    import inspect
    import warnings

    model = _peft(_llama())
    hf = model.get_base_model()
    ids, labels = _batch()
    model.train()
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        want = hf(ids, None, None, None, None, labels).loss
    fastlora.patch(model)
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        out = hf(ids, None, None, None, None, labels, output_hidden_states=True)
    assert out.logits is None and len(out.hidden_states) == 3
    torch.testing.assert_close(out.loss, want)
    assert {str(w.message) for w in after} <= {str(w.message) for w in before}
    # The Trainer drops the dataset columns the forward's signature does not name.
    from transformers import LlamaForCausalLM

    assert inspect.signature(hf.forward) == inspect.signature(LlamaForCausalLM.forward.__get__(hf))
    with pytest.raises(TypeError, match="positional arguments"):
        hf(ids, *[None] * 20)


def test_a_forced_backend_that_cannot_run_is_refused_at_patch_time(monkeypatch):
    """patch(model, backend=...) with a backend this machine cannot run (Triton on a CPU without its interpreter) is
    refused before anything changes, naming the op and why, rather than failing inside the first forward."""
    from fastlora.device import _probe
    from fastlora.dispatch import BackendUnavailableError, _resolve_cached

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _probe.cache_clear()
    _resolve_cached.cache_clear()
    try:
        assert not fastlora.device_info("cpu").triton_usable
        model = _tiny("llama")
        with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run rope on this model's cpu"):
            fastlora.patch(model, backend="triton")
        assert not any(type(m).__name__.startswith("FastLoRA") for m in model.modules())
        fastlora.patch(model, backend="torch")  # one that can run is taken as before
    finally:
        monkeypatch.undo()
        _probe.cache_clear()
        _resolve_cached.cache_clear()
