import json

import pytest
import torch

from tunesmith.config import CheckpointConfig, LoraConfig, TrainConfig, ValidationConfig
from tunesmith.data.formats import read_conversations
from tunesmith.data.tokenize import TokenizedExample, tokenize_all, use_chat_template
from tunesmith.methods.full import apply_full
from tunesmith.methods.lora import apply_lora
from tunesmith.train.batching import batch_order, collate, shared_batch
from tunesmith.train.loop import Session, fit, overfitting, plan_steps
from tunesmith.train.loss import answer_loss_sum, model_loss_sum, share_limit

from .conftest import build_model, build_tokenizer, write_jsonl


def examples_for(chat_file, tokenizer):
    use_chat_template(tokenizer, None)
    conversations, _ = read_conversations(chat_file)
    examples, _ = tokenize_all(tokenizer, conversations, max_length=128)
    return examples


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_answer_loss_equals_the_full_logits_loss(chat_file, frozen_head):
    """Values and every gradient, with the output layer trained (recomputed chunks) or frozen (FrozenHead)."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.get_output_embeddings().requires_grad_(not frozen_head)
    batch = collate(examples_for(chat_file, tokenizer)[:4], tokenizer.pad_token_id)
    reference = model(**batch).loss
    reference.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    n_loss_tokens = int((batch["labels"][:, 1:] != -100).sum())
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    ours = answer_loss_sum(hidden, batch["labels"], model.get_output_embeddings(), chunk_size=7) / n_loss_tokens
    ours.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert len(expected_grads) == len(list(model.parameters())) - frozen_head
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert torch.allclose(model_loss_sum(model, batch) / n_loss_tokens, reference, rtol=1e-5)


def _system_examples(tokenizer, tmp_path, n=6):
    """Chat examples that all begin with the same long system prompt (a tools block, say) and differ after it."""
    use_chat_template(tokenizer, None)
    system = "You are the clinic's assistant. Tools: lookup patient, book visit, move visit, cancel visit. " * 3
    records = [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i} " * (1 + i)},
                      {"role": "assistant", "content": f"answer {i} " * (2 + i % 3)}]}
        for i in range(n)
    ]  # fmt: skip
    conversations, _ = read_conversations(write_jsonl(tmp_path / "system.jsonl", records))
    examples, _ = tokenize_all(tokenizer, conversations, max_length=512)
    return examples


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_batch_sharing_its_system_prompt_has_the_padded_batchs_loss_and_gradients(attention, tmp_path):
    tokenizer = build_tokenizer()
    examples = _system_examples(tokenizer, tmp_path)
    model = build_model(len(tokenizer))
    model.config._attn_implementation = attention
    model.get_output_embeddings().requires_grad_(False)
    shared = shared_batch(examples, 512)
    assert shared is not None and shared["input_ids"].shape[1] < sum(map(len, examples)) * 0.75
    assert len(shared["targets"]) == sum(sum(e.loss_mask[1:]) for e in examples)
    results = []
    for batch in (shared, collate(examples, tokenizer.pad_token_id)):
        model.zero_grad()
        loss = model_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_batch_shares_only_what_pays_and_what_the_model_computes_exactly(tmp_path):
    tokenizer = build_tokenizer()
    examples = _system_examples(tokenizer, tmp_path)
    longest = max(map(len, examples))
    assert shared_batch(examples, longest) is not None
    assert shared_batch(examples, longest - 1) is None  # an example past the sliding window
    assert shared_batch(examples[:1], longest) is None  # nothing to share with
    # the shared beginning stops before the first learned token, even where answers begin alike too
    alike = [TokenizedExample(list(range(3, 43)) + [end], [0] * 30 + [1] * 11) for end in (50, 51, 52)]
    batch = shared_batch(alike, 64)
    assert batch["input_ids"].shape[1] == 30 + 3 * 11 and len(batch["targets"]) == 3 * 11
    assert batch["sources"][:2].tolist() == [29, 30] and batch["sources"][11].tolist() == 29
    # beginnings that differ early: too little to share
    other = [TokenizedExample(e.input_ids[::-1], e.loss_mask[::-1]) for e in examples]
    assert shared_batch(other, longest) is None
    model = build_model(len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"
    assert share_limit(model) is None


def test_training_with_shared_prefixes_equals_training_without(tmp_path):
    tokenizer = build_tokenizer()
    examples = _system_examples(tokenizer, tmp_path, n=8)
    assert all(shared_batch(examples[i : i + 4], 512) is not None for i in range(5))  # any 4 of them share
    losses = []
    for share in (True, False):
        model, _ = apply_lora(build_model(len(tokenizer)), LoraConfig(r=4, dropout=0.0))
        settings = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, share_prefixes=share, seed=0, dtype="fp32")
        fit(model, examples, settings, tokenizer.pad_token_id, metrics_path=tmp_path / f"{share}.jsonl")
        rows = [json.loads(line) for line in (tmp_path / f"{share}.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r.get("type") == "train"])
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_softcap_is_applied():
    torch.manual_seed(0)
    hidden = torch.randn(1, 5, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[-100, 3, 4, -100, 5]])
    logits = torch.tanh(head(hidden[0, [0, 1, 3]]) / 2.0) * 2.0
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([3, 4, 5]), reduction="sum")
    torch.testing.assert_close(answer_loss_sum(hidden, labels, head, softcap=2.0), expected)


def test_batches_cover_every_example_once_per_epoch():
    lengths = [5, 50, 7, 8, 90, 3, 12, 40, 41, 6]
    batches = batch_order(lengths, batch_size=3, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batch_order(lengths, 3, seed=1) == batches and batch_order(lengths, 3, seed=2) != batches


def test_lora_trains_only_adapter_parameters(chat_file):
    tokenizer = build_tokenizer()
    model, trainable = apply_lora(build_model(len(tokenizer)), LoraConfig(r=4, alpha=8, dropout=0.0))
    before = snapshot(model)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all("lora_" in n for n in trainable_names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)
    # lora_B starts at zero, so lora_A only moves from the second step on: train 3 steps.
    result = fit(
        model,
        examples_for(chat_file, tokenizer),
        TrainConfig(max_steps=3, batch_size=4, lr=1e-2),
        tokenizer.pad_token_id,
    )
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (name in trainable_names), name
    assert result.steps == 3 and len(result.history) == 3


def test_full_fine_tuning_changes_every_weight(chat_file):
    tokenizer = build_tokenizer()
    model, trainable = apply_full(build_model(len(tokenizer)))
    before = snapshot(model)
    assert trainable == sum(p.numel() for p in model.parameters())
    fit(
        model,
        examples_for(chat_file, tokenizer),
        TrainConfig(max_steps=2, batch_size=4, lr=1e-3),
        tokenizer.pad_token_id,
    )
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    # Embedding rows of tokens never seen get no gradient but still move through AdamW's update only when
    # the gradient is non-zero; the matrices themselves must all move.
    assert unchanged == []


def test_training_lowers_the_loss_and_logs_each_step(chat_file, tmp_path):
    tokenizer = build_tokenizer()
    model, _ = apply_full(build_model(len(tokenizer)))
    metrics = tmp_path / "metrics.jsonl"
    result = fit(
        model,
        examples_for(chat_file, tokenizer),
        TrainConfig(max_steps=30, batch_size=8, lr=5e-3, warmup_ratio=0.1),
        tokenizer.pad_token_id,
        metrics,
    )
    lines = metrics.read_text().splitlines()
    assert len(lines) == 30
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(result.history[0])
    assert 0 < result.history[0]["lr"] < result.history[2]["lr"]  # warmup from above zero


def test_gradient_accumulation_equals_one_large_batch(chat_file):
    tokenizer = build_tokenizer()
    examples = examples_for(chat_file, tokenizer)[:8]
    finals = []
    for batch_size, accum in [(8, 1), (4, 2)]:
        model, _ = apply_full(build_model(len(tokenizer), seed=3))
        settings = TrainConfig(
            max_steps=1, batch_size=batch_size, grad_accum=accum, lr=1e-2, warmup_ratio=0.0, max_grad_norm=None
        )
        fit(model, examples, settings, tokenizer.pad_token_id)
        finals.append(snapshot(model))
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_steps_from_epochs_and_max_steps():
    assert plan_steps(10, TrainConfig(epochs=2, grad_accum=2)) == 10
    assert plan_steps(10, TrainConfig(epochs=2, max_steps=3)) == 3
    assert plan_steps(1, TrainConfig(epochs=0.1)) == 1


def test_saved_adapter_reloads_with_identical_logits(chat_file, tmp_path):
    from peft import PeftModel

    tokenizer = build_tokenizer()
    model, _ = apply_lora(build_model(len(tokenizer), seed=5), LoraConfig(r=4, alpha=8, dropout=0.0))
    fit(
        model,
        examples_for(chat_file, tokenizer),
        TrainConfig(max_steps=3, batch_size=4, lr=1e-2),
        tokenizer.pad_token_id,
    )
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_model(len(tokenizer), seed=5), tmp_path / "adapter").eval()
    batch = collate(examples_for(chat_file, tokenizer)[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_lr_schedule_warms_up_from_above_zero_and_decays():
    from tunesmith.train.loop import lr_factor

    cosine = [lr_factor(s, 2, 10, "cosine") for s in range(10)]
    assert cosine[:3] == [1 / 3, 2 / 3, 1.0]
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:], strict=False)) and cosine[-1] > 0
    linear = [lr_factor(s, 0, 4, "linear") for s in range(4)]
    assert linear == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(7, 2, 10, "constant") == 1.0


def test_packed_batch_gives_the_unpacked_loss_and_gradients(chat_file):
    from tunesmith.train.batching import pack

    tokenizer = build_tokenizer()
    examples = examples_for(chat_file, tokenizer)[:6]
    results = []
    for batch in (collate(examples, tokenizer.pad_token_id), pack(examples, tokenizer.pad_token_id, row_tokens=200)):
        model = build_model(len(tokenizer), seed=11)
        batch = {k: v for k, v in batch.items() if k != "real_tokens"}
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = model_loss_sum(model, batch) / n
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, batch))
    (unpacked_loss, unpacked_grads, padded), (packed_loss, packed_grads, packed) = results
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several examples share a row
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-6)
    for name, grad in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_restarts_positions_and_never_predicts_across_examples(chat_file):
    from tunesmith.train.batching import pack

    tokenizer = build_tokenizer()
    examples = examples_for(chat_file, tokenizer)[:3]
    batch = pack(examples, tokenizer.pad_token_id, row_tokens=1000)
    assert batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    ordered = sorted(examples, key=len, reverse=True)
    assert starts == [0, len(ordered[0]), len(ordered[0]) + len(ordered[1])]
    for start in starts:
        assert batch["labels"][0, start] == -100
    assert int(batch["real_tokens"].sum()) == sum(len(e) for e in examples)


def _evaluations(val_losses, train_losses):
    return [
        {"step": i, "val_loss": v, "train_loss": t}
        for i, (v, t) in enumerate(zip(val_losses, train_losses, strict=True))
    ]


def test_overfitting_needs_a_sustained_rise_while_train_loss_falls():
    falling = [0.30, 0.20, 0.15, 0.10]
    assert not overfitting(_evaluations([0.0140, 0.0131, 0.0122, 0.0129], falling))  # the quickstart's last step
    assert not overfitting(_evaluations([0.0122, 0.0129, 0.0125, 0.0131], falling))  # up, down, up: noise
    assert overfitting(_evaluations([0.0131, 0.0122, 0.0129, 0.0137], falling))  # two rises in a row
    assert not overfitting(_evaluations([0.0131, 0.0122, 0.0129, 0.0137], [0.1, 0.15, 0.2, 0.3]))  # both rose
    assert not overfitting(_evaluations([0.0122, 0.0129], falling[:2]))  # too few validations to tell


def test_fit_does_not_warn_of_overfitting_on_one_noisy_rise(chat_file, tmp_path):
    tokenizer = build_tokenizer()
    model, _ = apply_full(build_model(len(tokenizer)))
    val_losses = iter([0.0150, 0.0122, 0.0129])  # the quickstart: a rise at the last validation only
    session = Session(
        run_dir=tmp_path,
        checkpoint=CheckpointConfig(keep_last=1),
        validation=ValidationConfig(every=2),
        validate=lambda model: {"val_loss": next(val_losses)},
    )
    settings = TrainConfig(max_steps=6, batch_size=8, lr=5e-3)
    fit(
        model,
        examples_for(chat_file, tokenizer),
        settings,
        tokenizer.pad_token_id,
        tmp_path / "m.jsonl",
        session=session,
    )
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    val = [r for r in records if r["type"] == "val"]
    assert [r["val_loss"] for r in val] == [0.015, 0.0122, 0.0129] and not any(r.get("overfitting") for r in val)
