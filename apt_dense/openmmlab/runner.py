"""``APTRunner``: mmengine's ``Runner`` with the guarantees the APT workflows rely on.

- **Loading cannot be undone.** ``load_from`` is loaded after ``init_weights`` (mmengine's order
  when the runner loads it; a tool must never load before ``train()``), into the unwrapped model,
  with every shape checked and the APT layers named as the only expected missing keys.
- **Checkpoints are data.** Files are read with :func:`apt_dense.checkpoints.read_checkpoint`;
  mmengine's own training checkpoints resume with weights-only loading (their log buffers are
  allowed by name). ``allow_pickle_checkpoints=True`` in the config reads trusted legacy files.
- **The APT-only fine-tune freezes before DistributedDataParallel wraps the model.**
- **Resume resumes**: the latest checkpoint of the work dir, else ``load_from``; a new run refuses
  a work dir that already holds a run's checkpoints instead of overwriting them. The latest
  checkpoint is looked up in the work dir itself, so a moved or copied work dir resumes from its
  own files (mmengine's ``last_checkpoint`` marker holds an absolute path).
- **Data problems name their files**: an empty split or a training set without annotations is an
  error naming the dataset's folders before training starts, and a sample that cannot be loaded
  (e.g. a corrupt label PNG) names its image and label files.
- **Distributed on CPU**: ``--launcher pytorch`` without CUDA starts gloo (mmengine's
  ``init_dist`` needs CUDA) and wraps the model without ``device_ids``.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
import re

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mmengine.dist import is_distributed
from mmengine.logging import HistoryBuffer
from mmengine.model import MMDistributedDataParallel, is_model_wrapper, revert_sync_batchnorm
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..checkpoints import load_state_dict_checked, read_checkpoint, unwrap_state_dict
from ..param_groups import freeze_all_but_apt_layers

__all__ = ["APTRunner", "MMENGINE_CHECKPOINT_GLOBALS", "RunError", "SampleLoadError", "apt_layers_only", "latest_checkpoint"]



def _history_buffer_statistic(owner: type, name: str):
    """Stands in for ``getattr`` while a checkpoint is unpickled: mmengine pickles the statistics
    methods of its log buffers as ``getattr(HistoryBuffer, "mean")``; nothing else is looked up."""
    if owner is HistoryBuffer and name in ("min", "max", "current", "mean"):
        return getattr(owner, name)
    raise pickle.UnpicklingError(f"Unsupported global: builtins.getattr on {owner!r}.{name}")


# What mmengine's training checkpoints hold beyond tensors and arrays: the message hub's log
# buffers. Passed to read_checkpoint(safe_globals=...).
MMENGINE_CHECKPOINT_GLOBALS = (HistoryBuffer, (_history_buffer_statistic, "builtins.getattr"))


# The names mmengine's CheckpointHook gives checkpoints by default.
_NUMBERED_CHECKPOINT = re.compile(r"^(?:iter|epoch)_(\d+)\.pth$")


def latest_checkpoint(work_dir: str) -> str | None:
    """The newest checkpoint of the run in ``work_dir``, or None.

    mmengine's ``last_checkpoint`` marker holds the absolute path the checkpoint had when it was
    written, which a moved or copied work dir no longer matches. So the file it names is looked
    up in ``work_dir`` first, then at that path (a CheckpointHook ``out_dir`` elsewhere); without a
    usable marker, the ``iter_N.pth`` / ``epoch_N.pth`` of ``work_dir`` with the highest N.
    """
    marker = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(marker):
        with open(marker) as f:
            named = f.read().strip()
        if named:
            for candidate in (osp.join(work_dir, osp.basename(named)), named):
                if osp.isfile(candidate):
                    return candidate
    if not osp.isdir(work_dir):
        return None
    numbered = [(int(m.group(1)), name) for name in os.listdir(work_dir) if (m := _NUMBERED_CHECKPOINT.match(name))]
    return osp.join(work_dir, max(numbered)[1]) if numbered else None


class RunError(RuntimeError):
    """A run that cannot start as configured (a work dir holding an earlier run, an empty split,
    a checkpoint that cannot be resumed); the message says what to do. The tools print it as one
    line."""


class SampleLoadError(RuntimeError):
    """A dataset sample could not be loaded; the message names its files."""


class _NamedSampleErrors:
    """A dataset's pipeline whose errors name the sample's image and label files (a corrupt
    file otherwise fails deep inside the image decoder without saying which one)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, results):
        try:
            return self.pipeline(results)
        except Exception as err:
            files = [str(results[key]) for key in ("img_path", "seg_map_path") if isinstance(results, dict) and results.get(key)]
            if not files:
                raise
            raise SampleLoadError(f"cannot load the sample {' with '.join(files)}: {type(err).__name__}: {err}") from err

    def __getattr__(self, name: str):
        # Hooks read the pipeline's attributes (e.g. ``transforms``); unpickling looks up dunders
        # before ``pipeline`` exists.
        if name.startswith("__") or "pipeline" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["pipeline"], name)


def _datasets(dataset) -> list:
    """``dataset`` and the datasets inside mmengine's wrappers (Concat, Repeat, ClassBalanced)."""
    inner = getattr(dataset, "datasets", None) or ([dataset.dataset] if hasattr(dataset, "dataset") else [])
    return [dataset] + [d for child in inner for d in _datasets(child)]


def _describe_dataset(cfg) -> str:
    """``ADE20KDataset at data/ade (data_prefix ..., ann_file ...)`` from a dataset config."""
    cfg = cfg or {}
    where = [f"{key} {cfg[key]}" for key in ("data_prefix", "ann_file") if cfg.get(key)]
    text = f"{cfg.get('type', 'the dataset')} at {cfg.get('data_root') or '.'}" + (f" ({', '.join(where)})" if where else "")
    if (cfg.get("filter_cfg") or {}).get("filter_empty_gt"):
        text += "; images without annotations are left out (filter_cfg.filter_empty_gt)"
    return text


def apt_layers_only(cfg) -> bool:
    """The config asks for the paper's APT-only fine-tune (``optim_wrapper.paramwise_cfg``)."""
    paramwise = (cfg.get("optim_wrapper") or {}).get("paramwise_cfg") or {}
    return bool(paramwise.get("apt_layers_only", False))


@RUNNERS.register_module()
class APTRunner(Runner):
    """mmengine ``Runner`` for models with an APT backbone; select it with
    ``runner_type = "APTRunner"`` (the configs of this project do), so mmseg's and mmdet's own
    ``tools/train.py``/``tools/test.py`` use it too. Extra config keys:

    - ``allow_pickle_checkpoints`` (bool, default False): unpickle arbitrary objects in
      checkpoint files (trusted files only).
    """

    def setup_env(self, env_cfg: dict) -> None:
        if self.distributed and not is_distributed() and not torch.cuda.is_available():
            if self.launcher != "pytorch":
                raise RuntimeError(
                    f"distributed runs without CUDA need --launcher pytorch (torch.distributed.run); got {self.launcher}"
                )
            # mmengine's init_dist calls torch.cuda.set_device: start the CPU backend here.
            torch_dist.init_process_group(backend="gloo")
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: dict | None, model: nn.Module) -> nn.Module:
        if is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        cpu_distributed = self.distributed and not torch.cuda.is_available()
        if not self.distributed or cpu_distributed:
            # SyncBN needs CUDA; one process (or gloo processes) normalise with plain BN.
            model = revert_sync_batchnorm(model)
        if apt_layers_only(self.cfg):
            trainable = freeze_all_but_apt_layers(model)
            self.logger.info(f"APT-only fine-tune: {len(trainable)} trainable tensors: {trainable}")
        if not cpu_distributed:
            return super().wrap_model(model_wrapper_cfg, model)
        wrapper = dict(model_wrapper_cfg or {})
        if wrapper.pop("type", "MMDistributedDataParallel") != "MMDistributedDataParallel":
            raise ValueError("on CPU, APTRunner wraps models in MMDistributedDataParallel only; drop model_wrapper_cfg.type")
        wrapper.setdefault("broadcast_buffers", False)
        wrapper.setdefault("find_unused_parameters", self.cfg.get("find_unused_parameters", False))
        return MMDistributedDataParallel(module=model, device_ids=None, **wrapper)

    def train(self) -> nn.Module:
        if not self._resume:
            previous = self._latest_checkpoint()
            if previous is not None:
                raise RunError(
                    f"work dir {self.work_dir} holds checkpoints of an earlier run (latest: {previous}); "
                    "continue it with --resume (or resume=True), or start a new run with another --work-dir"
                )
        return super().train()

    def _latest_checkpoint(self) -> str | None:
        return latest_checkpoint(self.work_dir)

    def _checked_loop(self, split: str, build, loop):
        """``build(loop)`` with its dataset checked: not empty, and its samples' errors naming files."""
        dataset_cfg = (self.cfg.get(f"{split}_dataloader") or {}).get("dataset")
        empty = RunError(f"the {split} split is empty: {_describe_dataset(dataset_cfg)} holds no samples; "
                           "check --data-root and that split's folders / annotation file")
        try:
            loop = build(loop)
        except ValueError as err:
            # mmengine serialises a dataset's samples with np.concatenate, which fails on none.
            if "need at least one array to concatenate" in str(err):
                raise empty from err
            raise
        dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
        if dataset is not None:
            if len(dataset) == 0:
                raise empty
            for part in _datasets(dataset):
                if callable(getattr(part, "pipeline", None)) and not isinstance(part.pipeline, _NamedSampleErrors):
                    part.pipeline = _NamedSampleErrors(part.pipeline)
        return loop

    def build_train_loop(self, loop):
        return self._checked_loop("train", super().build_train_loop, loop)

    def build_val_loop(self, loop):
        return self._checked_loop("val", super().build_val_loop, loop)

    def build_test_loop(self, loop):
        return self._checked_loop("test", super().build_test_loop, loop)

    def load_or_resume(self) -> None:
        if self._has_loaded:
            return
        if self._resume:
            latest = self._latest_checkpoint()
            if latest is not None:
                if self._load_from is not None:
                    self.logger.info(f"resuming the run in {self.work_dir}; load_from={self._load_from} is not used")
                self.resume(latest)
            elif self._load_from is not None:
                self.resume(self._load_from)
            else:
                self.logger.warning(
                    f"resume requested but {self.work_dir} holds no checkpoint and load_from is not set: "
                    "training starts at iteration 0"
                )
            self._has_loaded = True
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
            self._has_loaded = True

    def resume(self, filename: str, *args, **kwargs) -> None:
        checkpoint_meta = self._read(filename).get("meta")
        if not isinstance(checkpoint_meta, dict) or "iter" not in checkpoint_meta:
            raise RunError(
                f"cannot resume from {filename}: it holds weights only, not a training state (no meta/iter). "
                "To fine-tune from it, pass it as load_from without --resume"
            )
        super().resume(filename, *args, **kwargs)
        self._rebase_checkpoint_paths(osp.dirname(filename))

    def _rebase_checkpoint_paths(self, folder: str) -> None:
        """Point the checkpoint paths the message hub carries (CheckpointHook's last and best
        checkpoints) at their copies in ``folder``, the checkpoint's own folder: after a work dir
        was moved or copied, the hook would otherwise delete or report the old path's files."""
        for key, value in list(self.message_hub.runtime_info.items()):
            if (key == "last_ckpt" or key.startswith("best_ckpt")) and isinstance(value, str):
                own = osp.join(folder, osp.basename(value))
                if own != value and osp.isfile(own):
                    self.message_hub.update_info(key, own)

    def _read(self, filename: str) -> dict:
        if "://" in str(filename):
            raise ValueError(f"{filename}: download checkpoints first; apt-dense reads local files only")
        cached = getattr(self, "_read_cache", None)
        if cached is not None and cached[0] == filename:
            return cached[1]
        checkpoint = dict(
            read_checkpoint(
                filename,
                allow_pickle=bool(self.cfg.get("allow_pickle_checkpoints", False)),
                safe_globals=MMENGINE_CHECKPOINT_GLOBALS,
            )
        )
        self._read_cache = (filename, checkpoint)
        return checkpoint

    def load_checkpoint(self, filename: str, map_location="cpu", strict: bool = False, revise_keys=None) -> dict:
        """Load weights into the (unwrapped) model; shapes must match; return the checkpoint."""
        checkpoint = self._read(filename)
        self._read_cache = None
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        state = unwrap_state_dict(checkpoint)
        if not set(state) & set(model.state_dict()):
            raise ValueError(
                f"no key of {filename} is a key of the model ({len(state)} keys, e.g. {sorted(state)[:3]}; "
                f"model: e.g. {sorted(model.state_dict())[:3]}): is it a checkpoint for this model?"
            )
        missing, unexpected = load_state_dict_checked(model, state)
        if strict and (missing or unexpected):
            raise ValueError(f"strict loading of {filename}: missing {missing}, unexpected {unexpected}")
        self._has_loaded = True
        self.logger.info(f"Loaded checkpoint {filename}")
        return checkpoint
