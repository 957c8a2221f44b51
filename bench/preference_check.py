"""Our preference losses and per-row answer log-probs against TRL's own code on the same batch (issue 18).

    .venv/bin/python bench/preference_check.py

Two random 2-layer Llamas (policy and reference) score random pairs with prompts of different lengths and right
padding. TRL's side runs TRL's trainers' loss methods (objects built without __init__, with the attributes those
methods read) on models carrying TRL's fused LM head; ours runs `model_logps` and `tunesmith.objectives.losses`.
Exits 1 if any difference exceeds 1e-4.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from transformers import LlamaConfig, LlamaForCausalLM
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import add_fused_lm_head

from tunesmith.objectives.losses import dpo, ipo, kto, kto_kl, orpo, reward_stats, simpo
from tunesmith.train.loss import IGNORE, model_logps

VOCAB, PAD, BOS = 300, 0, 1
BETA, EPS, GAMMA, ORPO_LAMBDA = 0.1, 0.1, 0.5, 0.2
TOLERANCE = 1e-4


class OneProcess:
    """The slice of accelerate's Accelerator that TRL's loss methods call, for a single CPU process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


def tiny_llama(seed: int, softcap: float | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=BOS,
        eos_token_id=2,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Llama has no softcap; both sides read Gemma's config field, so setting it checks that both apply it.
    model.config.final_logit_softcapping = softcap
    # TRL's fused head patches this instance's forward only (fused_lm_head=True); model_logps never calls forward.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def random_ids(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


def rows_to_batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """(prompt ids, answer ids) per row, right-padded: input_ids, attention_mask, labels (answers only)."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids, attention_mask, labels = [], [], []
    for prompt, answer in rows:
        padding = width - len(prompt) - len(answer)
        input_ids.append(prompt + answer + [PAD] * padding)
        attention_mask.append([1] * (len(prompt) + len(answer)) + [0] * padding)
        labels.append([IGNORE] * len(prompt) + answer + [IGNORE] * padding)
    return {
        k: torch.tensor(v)
        for k, v in zip(("input_ids", "attention_mask", "labels"), (input_ids, attention_mask, labels), strict=True)
    }


def pairs(generator: torch.Generator, n: int, prompt_only_bos: bool = False, chosen_length: int | None = None):
    """n preference pairs: (prompt, chosen), (prompt, rejected), answers of random lengths."""
    chosen, rejected = [], []
    for _ in range(n):
        prompt = (
            [BOS]
            if prompt_only_bos
            else [BOS] + random_ids(generator, int(torch.randint(1, 6, (1,), generator=generator)))
        )
        lengths = torch.randint(2, 9, (2,), generator=generator).tolist()
        chosen.append((prompt, random_ids(generator, chosen_length or lengths[0])))
        rejected.append((prompt, random_ids(generator, lengths[1])))
    return chosen, rejected


def trl_trainer(cls, policy, ref=None, **attributes):
    trainer = object.__new__(cls)
    common = dict(
        accelerator=OneProcess(),
        model=policy,
        ref_model=ref,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=BETA,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        is_encoder_decoder=False,
    )
    trainer.__dict__.update(common | attributes)
    return trainer


def ours_pairwise(policy, ref, chosen_rows, rejected_rows):
    """Our per-row sums and counts for chosen and rejected, from one concatenated batch as the loop would run it."""
    batch = rows_to_batch(chosen_rows + rejected_rows)
    n = len(chosen_rows)
    policy_logps, tokens = model_logps(policy, batch)
    with torch.no_grad():
        ref_logps, _ = model_logps(ref, batch)
    return policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], tokens[:n], tokens[n:]


def main() -> int:
    generator = torch.Generator().manual_seed(0)
    results: list[tuple] = []  # (objective, ours, TRL) or, where the difference is not ours - TRL, (..., diff)
    policy, ref = tiny_llama(0), tiny_llama(1)

    # 1. Per-row answer log-probs: model_logps against TRL's fused LM head, without and with a softcap small enough
    # to matter (TRL reads it when the head is added, so the softcapped model is a separate one).
    chosen_rows, rejected_rows = pairs(generator, 3)
    batch = rows_to_batch(chosen_rows + rejected_rows)
    for softcap, model in ((None, policy), (0.5, tiny_llama(0, softcap=0.5))):
        with torch.no_grad():
            ours, _ = model_logps(model, batch)
            theirs = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                fused_lm_head=True,
            ).log_probs.sum(dim=1)
        worst = int((ours - theirs).abs().argmax())
        name = f"row log-prob, softcap={softcap} (worst of {len(ours)} rows)"
        results.append((name, ours[worst].item(), theirs[worst].item()))

    # 2. DPO sigmoid and IPO through DPOTrainer._compute_loss (policy and reference forwards included).
    dpo_inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != IGNORE).long(),
    }
    pc, pr, rc, rr, nc, nr = ours_pairwise(policy, ref, chosen_rows, rejected_rows)
    for loss_type in ("sigmoid", "ipo"):
        trainer = trl_trainer(
            DPOTrainer,
            policy,
            ref,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            label_smoothing=0.0,
            use_weighting=False,
        )
        policy.zero_grad()
        theirs = trainer._compute_loss(policy, dpo_inputs, return_outputs=False)
        if loss_type == "sigmoid":
            theirs.backward()
            their_grads = [p.grad.clone() for p in policy.parameters()]
            policy.zero_grad()
            losses, chosen_rewards, rejected_rewards = dpo(pc, pr, rc, rr, BETA)
        else:
            losses, chosen_rewards, rejected_rewards = ipo(pc, pr, rc, rr, nc, nr, BETA)
        results.append((f"DPO {loss_type} loss (DPOTrainer)", losses.mean().item(), theirs.item()))
        if loss_type == "sigmoid":
            losses.mean().backward(retain_graph=True)
            diff = max((p.grad - g).abs().max().item() for p, g in zip(policy.parameters(), their_grads, strict=True))
            largest = [
                max(g.abs().max().item() for g in grads)
                for grads in ([p.grad for p in policy.parameters()], their_grads)
            ]
            results.append(("DPO sigmoid grads: max |dL/dθ|, max elementwise diff", *largest, diff))
            stats = reward_stats(chosen_rewards, rejected_rewards)
            metrics = trainer._metrics["train" if policy.training else "eval"]
            results.append(("DPO sigmoid rewards/margins", stats["margin"], metrics["rewards/margins"][-1]))
            results.append(("DPO sigmoid rewards/accuracies", stats["accuracy"], metrics["rewards/accuracies"][-1]))
            results.append(("DPO sigmoid rewards/chosen", stats["chosen"], metrics["rewards/chosen"][-1]))

    # 3. Conservative label smoothing: TRL 1.16's DPO sigmoid has none (label_smoothing serves robust/EXO there); its
    # CPO sigmoid keeps the cDPO expression, which on log-ratios (policy - reference) is DPO with label smoothing.
    with torch.no_grad():
        their_logps = {
            name: model(**dpo_inputs | {"labels": batch["labels"]}, fused_lm_head=True).log_probs.sum(dim=1).chunk(2)
            for name, model in (("policy", policy), ("ref", ref))
        }
    cpo = trl_trainer(CPOTrainer, policy, loss_type="sigmoid", label_smoothing=EPS, alpha=0.0)
    their_losses, _, _ = cpo.cpo_loss(
        their_logps["policy"][0] - their_logps["ref"][0], their_logps["policy"][1] - their_logps["ref"][1]
    )
    ours_smoothed, _, _ = dpo(pc, pr, rc, rr, BETA, label_smoothing=EPS)
    results.append(
        (
            f"DPO label_smoothing={EPS} (CPO sigmoid on log-ratios)",
            ours_smoothed.mean().item(),
            their_losses.mean().item(),
        )
    )

    # 4. SimPO through CPOTrainer.get_batch_loss_metrics (loss_type="simpo", cpo_alpha=0: full logits, own log-probs).
    cpo_batch = {}
    for side, rows in (("chosen", chosen_rows), ("rejected", rejected_rows)):
        for key, value in rows_to_batch(rows).items():
            cpo_batch[f"{side}_{key}"] = value
    simpo_trainer = trl_trainer(
        CPOTrainer,
        policy,
        loss_type="simpo",
        simpo_gamma=GAMMA,
        label_smoothing=0.0,
        alpha=0.0,
        cpo_alpha=0.0,
        pad_token_id=PAD,
    )
    with torch.no_grad():
        theirs, _ = simpo_trainer.get_batch_loss_metrics(policy, cpo_batch)
        ours_simpo, _, _ = simpo(pc, pr, nc, nr, BETA, GAMMA)
    results.append((f"SimPO beta={BETA} gamma={GAMMA} (CPOTrainer)", ours_simpo.mean().item(), theirs.item()))

    # 5. ORPO through ORPOTrainer.get_batch_loss_metrics. TRL's NLL term is a token mean over prompt AND answer of all
    # chosen rows; the paper's (and ours) is each chosen answer's per-token NLL, averaged over pairs. They agree when
    # the prompt is only BOS and the chosen answers have one length, the batch used here.
    orpo_chosen, orpo_rejected = pairs(generator, 3, prompt_only_bos=True, chosen_length=5)
    orpo_batch = {}
    for side, rows in (("chosen", orpo_chosen), ("rejected", orpo_rejected)):
        for key, value in rows_to_batch(rows).items():
            orpo_batch[f"{side}_{key}"] = value
    orpo_trainer = trl_trainer(ORPOTrainer, policy, beta=ORPO_LAMBDA, padding_value=PAD)
    with torch.no_grad():
        theirs, _ = orpo_trainer.get_batch_loss_metrics(policy, orpo_batch)
        opc, opr, _, _, onc, onr = ours_pairwise(policy, ref, orpo_chosen, orpo_rejected)
        ours_orpo, _, _ = orpo(opc, opr, onc, onr, ORPO_LAMBDA)
    results.append((f"ORPO lambda={ORPO_LAMBDA} (ORPOTrainer)", ours_orpo.mean().item(), theirs.item()))

    # 6. KTO through KTOTrainer._compute_loss: 5 rows of which 3 desirable, KL rows = each prompt with the previous
    # row's completion (TRL's collator), reference point from those.
    kto_chosen, _ = pairs(generator, 5)
    desirable = torch.tensor([True, False, True, True, False])
    kl_rows = [(prompt, kto_chosen[i - 1][1]) for i, (prompt, _) in enumerate(kto_chosen)]
    main_batch, kl_batch = rows_to_batch(kto_chosen), rows_to_batch(kl_rows)
    kto_inputs = {
        "input_ids": main_batch["input_ids"],
        "attention_mask": main_batch["attention_mask"],
        "completion_mask": (main_batch["labels"] != IGNORE).long(),
        "KL_input_ids": kl_batch["input_ids"],
        "KL_attention_mask": kl_batch["attention_mask"],
        "KL_completion_mask": (kl_batch["labels"] != IGNORE).long(),
        "label": desirable,
    }
    kto_trainer = trl_trainer(
        KTOTrainer,
        policy,
        ref,
        calculate_KL=True,
        loss_type="kto",
        desirable_weight=1.0,
        undesirable_weight=1.5,
    )
    with torch.no_grad():
        theirs = kto_trainer._compute_loss(policy, kto_inputs, return_outputs=False)
        policy_rows, _ = model_logps(policy, main_batch)
        ref_rows, _ = model_logps(ref, main_batch)
        kl = kto_kl(model_logps(policy, kl_batch)[0], model_logps(ref, kl_batch)[0])
        ours_kto, _, _ = kto(policy_rows, ref_rows, desirable, kl, BETA, 1.0, 1.5)
    results.append(
        (
            "KTO reference point z (kl)",
            kl.item(),
            kto_trainer._metrics["eval" if not policy.training else "train"]["kl"][-1],
        )
    )
    results.append(("KTO loss, weights 1.0/1.5 (KTOTrainer)", ours_kto.mean().item(), theirs.item()))

    print(f"TRL {trl.__version__}, torch {torch.__version__}, tolerance {TOLERANCE}")
    width = max(len(row[0]) for row in results)
    print(f"{'objective':<{width}}  {'ours':>14}  {'TRL':>14}  {'abs diff':>9}")
    failed = False
    for name, ours_value, their_value, *explicit in results:
        diff = explicit[0] if explicit else abs(ours_value - their_value)
        failed |= diff > TOLERANCE
        print(f"{name:<{width}}  {ours_value:>14.8f}  {their_value:>14.8f}  {diff:>9.2e}")
    print("FAIL" if failed else "all within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
