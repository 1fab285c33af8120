"""QLoRA fine-tuning (Dettmers et al. 2023) of LoRA adapters (Hu et al. 2021) on a frozen, possibly packed base:
the backward pass, the optimizer, the data and the checkpoints of train.py."""
