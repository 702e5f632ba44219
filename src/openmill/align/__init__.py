"""Alignment: chat templates and loss masks, SFT and DPO data, the sft and dpo stages, LoRA."""
