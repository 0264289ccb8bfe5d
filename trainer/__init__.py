"""The trainer: SFT and soft-label DPO on `cai up` data, with LoRA, checkpoints and exact resume."""
