# The dense baseline of apt_upernet_eva02_b_512_ade20k: same weights and pipeline, no merging.
_base_ = ["./apt_upernet_eva02_b_512_ade20k.py"]
model = dict(backbone=dict(adaptive=False))
