"""Training objectives: the place for what a method trains toward, beside `tunesmith.methods` (what trains).

An objective will own three things: what a batch holds (for SFT: input_ids, attention_mask and a loss
mask over the answer tokens), how the loss is computed from the model on a batch, and what it logs per
step. Today there is one objective, supervised fine-tuning, and it lives in the training loop:
`tunesmith.train.loss.model_loss_sum`. It moves here when a second objective (e.g. preference tuning) arrives.
"""
