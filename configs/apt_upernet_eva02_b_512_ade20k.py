# UperNet + APT EVA-02-B, ADE20K 512 (slide 512 / 341). Everything is in the base.
_base_ = ["./_base_/apt_upernet_eva02.py"]
