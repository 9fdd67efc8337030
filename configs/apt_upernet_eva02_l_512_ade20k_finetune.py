# The paper's short APT fine-tune of a trained EVA-02-L UperNet: only the APT layers train
# (everything else frozen), 5% of the schedule, lr / 10. Set load_from to the trained model.
_base_ = ["./apt_upernet_eva02_l_512_ade20k.py"]
optim_wrapper = dict(optimizer=dict(lr=4e-6), paramwise_cfg=dict(apt_layers_only=True))
max_iters = 4000
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=100),
    dict(type="PolyLR", power=1.0, eta_min=0.0, by_epoch=False, begin=100, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=1000)
default_hooks = dict(checkpoint=dict(interval=1000))
