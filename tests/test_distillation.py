import math

import pytest
import torch
from conftest import TinyClassificationDataset, tiny_bert, tiny_gpt2, tiny_t5
from testing_utils import assert_refused_before_training, tiny_training_args
from transformers import TrainingArguments

from hf_prune import MagnitudePruningCallback, PruningConfig
from hf_prune.methods.distillation import IGNORE_INDEX, DistillationTrainer, distillation_loss, row_mask
from hf_prune.targets import find_targets


# ---------------------------------------------------------------------------------------------- the loss
def test_distillation_loss_matches_the_kl_written_out():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    t = 2.0
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * t * t

    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_leaves_masked_rows_out():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kept = mask.bool()

    masked = distillation_loss(student, teacher, 1.0, mask)
    torch.testing.assert_close(masked, distillation_loss(student[kept], teacher[kept], 1.0))
    student[~kept] += 100.0  # what the padding rows hold does not matter
    torch.testing.assert_close(distillation_loss(student, teacher, 1.0, mask), masked)


def test_row_mask_picks_the_mask_of_the_logits_leading_shape():
    attention = torch.ones(2, 5, dtype=torch.long)
    labels = torch.tensor([[4, 5, IGNORE_INDEX], [6, IGNORE_INDEX, IGNORE_INDEX]])
    inputs = {"attention_mask": attention, "labels": labels}

    assert row_mask(inputs, torch.Size([2, 5]), is_encoder_decoder=False) is attention
    assert row_mask(inputs, torch.Size([2]), is_encoder_decoder=False) is None, "sequence-level outputs"
    assert torch.equal(row_mask(inputs, torch.Size([2, 3]), is_encoder_decoder=True), labels != IGNORE_INDEX)
    decoder = torch.ones(2, 3)
    assert row_mask({**inputs, "decoder_attention_mask": decoder}, torch.Size([2, 3]), True) is decoder


# ------------------------------------------------------------------------------------------- the trainer
def trainer_for(student, teacher, tmp_path, dataset=None, callbacks=None, **kwargs):
    args = tiny_training_args(tmp_path, max_steps=kwargs.pop("max_steps", 4), logging_steps=1, weight_decay=0.0)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, callbacks=callbacks,
                               train_dataset=dataset if dataset is not None else TinyClassificationDataset(32),
                               **kwargs)


def batch_of(dataset, n=4):
    return {key: torch.stack([dataset[i][key] for i in range(n)]) for key in dataset[0]}


@pytest.mark.parametrize("field, value, accepted", [
    ("temperature", 0.0, "in [0.01, 100]"), ("temperature", float("nan"), "in [0.01, 100]"),
    ("temperature", True, "in [0.01, 100]"), ("temperature", 1e-45, "in [0.01, 100]"),
    ("temperature", 1e155, "in [0.01, 100]"),
    ("alpha", -0.1, "[0, 1]"), ("alpha", 1.5, "[0, 1]"),
    ("teacher_model", "bert-base-uncased", "torch.nn.Module"),
])
def test_bad_arguments_raise_naming_the_field(tmp_path, field, value, accepted):
    kwargs = {"teacher_model": tiny_bert(), field: value}
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        DistillationTrainer(model=tiny_bert(), args=args, **kwargs)
    assert accepted in str(error.value)


@pytest.mark.parametrize("teacher_labels", [1, 3])  # 1 would broadcast over the student's 2 labels silently
def test_a_teacher_with_other_logits_is_a_value_error_before_any_update(tmp_path, teacher_labels):
    trainer = trainer_for(tiny_bert(), tiny_bert(num_labels=teacher_labels), tmp_path)
    assert_refused_before_training(trainer, rf"logits: student \(8, 2\), teacher \(8, {teacher_labels}\).*num_labels")


def test_training_loss_mixes_distillation_and_task_loss_and_eval_is_the_task_loss(tmp_path):
    student, teacher = tiny_bert(), tiny_bert()
    torch.manual_seed(1)
    for param in teacher.parameters():
        param.data.add_(0.1 * torch.randn_like(param))
    trainer = trainer_for(student, teacher, tmp_path, temperature=3.0, alpha=0.25)
    batch = batch_of(trainer.train_dataset)

    student.train()
    torch.manual_seed(5)  # the same dropout masks in both student forwards
    loss = trainer.compute_loss(student, dict(batch))
    torch.manual_seed(5)
    with torch.no_grad():
        outputs = student(**batch)
        task, distill = outputs.loss, distillation_loss(outputs.logits, teacher(**batch).logits, 3.0)
    assert float(distill) > 0
    torch.testing.assert_close(loss, 0.25 * distill + 0.75 * task)
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())

    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(student, dict(batch)), student(**batch).loss)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5], ids=["gpt2", "t5"])
def test_token_level_logits_are_distilled_over_unpadded_rows(tmp_path, make):
    student, teacher = make(), make()
    torch.manual_seed(1)
    for param in teacher.parameters():
        param.data.add_(0.1 * torch.randn_like(param))
    input_ids = torch.randint(3, 99, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    trainer = trainer_for(student, teacher, tmp_path, dataset=[batch], alpha=1.0, temperature=1.0)

    student.train()
    torch.manual_seed(5)
    loss = trainer.compute_loss(student, dict(batch))
    torch.manual_seed(5)
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    rows = (labels if make is tiny_t5 else attention_mask) != (IGNORE_INDEX if make is tiny_t5 else 0)
    torch.testing.assert_close(loss, distillation_loss(s[rows], t[rows], 1.0))


def test_pruning_run_with_distillation_moves_the_student_towards_the_teacher(tmp_path):
    teacher = tiny_bert()
    torch.manual_seed(1)
    for param in teacher.parameters():
        param.data.add_(0.2 * torch.randn_like(param))
    student = tiny_bert()
    dataset = TinyClassificationDataset(64)
    batch = batch_of(dataset, 64)

    def gap() -> float:
        with torch.no_grad():
            return float(distillation_loss(student(**batch).logits, teacher(**batch).logits, 2.0))

    before = gap()
    config = PruningConfig(final_sparsity=0.5, schedule="oneshot")
    targeted = {target.name for target in find_targets(tiny_bert(), config)}
    assert len(targeted) == 12  # query, key, value, attention output, intermediate, output of both layers
    callback = MagnitudePruningCallback(config)
    trainer = trainer_for(student, teacher, tmp_path, dataset=dataset, callbacks=[callback], alpha=1.0,
                          max_steps=16)
    trainer.train()
    student.eval()

    assert gap() < 0.5 * before, (before, gap())
    assert callback.masks.keys() == targeted  # masks were built, one per targeted weight
    total = sum(mask.numel() for mask in callback.masks.values())
    assert total == sum(p.numel() for n, p in student.named_parameters() if n in targeted) > 0
    assert total - sum(int(mask.sum()) for mask in callback.masks.values()) == round(0.5 * total)
    params = dict(student.named_parameters())
    assert all(bool((params[name].detach()[~mask] == 0).all()) for name, mask in callback.masks.items())
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
