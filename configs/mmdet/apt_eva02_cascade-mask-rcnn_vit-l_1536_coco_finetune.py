# The paper's short APT fine-tune of a trained EVA-02-L detector: only the APT layers train (everything
# else frozen), 5% of the schedule, lr / 10. Set load_from to the detector (mmdet key names).
_base_ = ["./apt_eva02_cascade-mask-rcnn_vit-l_1536_coco.py"]
model = dict(backbone=dict(init_cfg=None))  # every weight comes from load_from
optim_wrapper = dict(optimizer=dict(lr=5e-6), paramwise_cfg=dict(apt_layers_only=True))
max_iters = 3000
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type="MultiStepLR", begin=0, end=max_iters, by_epoch=False, milestones=[2400, 2700], gamma=0.1),
]
train_cfg = dict(max_iters=max_iters, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=1000))
