"""plait.optim: optimizers (AdamW, Lion), parameter groups, LR schedules, gradient clipping."""
