"""The paper's short APT fine-tune of a trained EVA-02-L detector: only the APT layers train
(everything else frozen), 5% of the schedule, lr / 10. Set train.init_checkpoint to the detector."""
from .apt_vitdet_l import dataloader, lr_multiplier, model, optimizer, train

train.apt_layers_only = True
train.max_iter = train.max_iter // 20
optimizer.lr = optimizer.lr / 10
lr_multiplier.scheduler.milestones = [train.max_iter * 8 // 10, train.max_iter * 9 // 10]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 50 / train.max_iter
