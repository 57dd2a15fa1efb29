"""The resumable checkpoint of the bundled-model trainers (:mod:`nha_plugin.zoo.train_scenes_rn`), pickle-free.

A checkpoint is one :func:`nha_plugin.files.save_state` file (safetensors + JSON metadata, checksummed; nothing
is unpickled, so a planted file cannot run code): the model and optimizer state dicts, the torch (and CUDA) RNG
states, the step, the best evaluation so far, the evaluation history, the run key (:func:`training_key`) and
the phases (the step each set of schedule options took over from).

Resuming checks the key. The model, the data seed, the batch size and the evaluation set (:data:`IDENTITY`)
must match: a checkpoint of another model or data is refused (:class:`~nha_plugin.runs.RunMismatchError`
naming each difference) unless ``--fresh`` starts over. The schedule options (:data:`SCHEDULE`) must match too,
so that a resumed run ends bit-identical to an uninterrupted one, unless ``--new-options`` says to continue
with the new ones: the model cards' recipes train in phases that change them (a new phase is recorded).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from nha_plugin.files import CorruptFileError, load_state, save_state
from nha_plugin.runs import RunMismatchError, check_key, run_key

__all__ = ["CHECKPOINT_VERSION", "IDENTITY", "SCHEDULE", "training_key", "rng_state", "set_rng_state",
           "save_checkpoint", "load_checkpoint"]

CHECKPOINT_VERSION = 2       # 1: torch.save'd dicts (no longer read: unpickling them could run code)
_FORMAT = "nha-train-checkpoint"
_EXPECTED = "a training checkpoint written by nha_plugin.zoo.train_scenes_rn"

# what a run is (never changes within one); the other options not listed (--stop-at, --checkpoint-every,
# --threads, --device, --quiet and the paths) decide neither the weights nor the evaluations
IDENTITY = ("seed", "batch_size", "eval_seed", "eval_n")
SCHEDULE = ("steps", "lr", "warmup", "weight_decay", "twins", "shape_captions", "eval_every")


def training_key(args: argparse.Namespace, config: dict) -> dict:
    """The run key of a training run.

    Returns:
        A JSON-normalised :func:`nha_plugin.runs.run_key`: ``config`` = the :data:`SCHEDULE` options of
        ``args``; ``data`` = the scene generator and the :data:`IDENTITY` options; ``model`` = the
        architecture and preprocessing (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``nha.preprocess_mean/std``
        of the model ``config``).
    """
    nha = config.get("nha", {})
    model = {"embed_dim": config["embed_dim"], "vision_cfg": config["vision_cfg"], "text_cfg": config["text_cfg"],
             "preprocess_mean": nha.get("preprocess_mean"), "preprocess_std": nha.get("preprocess_std")}
    data = {"scenes": "nha_plugin.scenes", **{name: getattr(args, name) for name in IDENTITY}}
    return run_key({name: getattr(args, name) for name in SCHEDULE}, data=data, version=CHECKPOINT_VERSION,
                   model=model)


def rng_state(device: torch.device) -> dict:
    """The torch RNG states the trainer seeds (``torch.manual_seed(--seed)``): ``torch`` (CPU) and ``cuda`` (one
    per GPU when training on CUDA, else empty). Python's and NumPy's global RNGs are neither seeded nor used
    (batches come from per-step generators), so they are not part of a run's state."""
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return {"torch": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; CUDA states only when as many GPUs are visible as were saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, key: dict, phases: List[dict], model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, step: int, best: Optional[dict], history: List[dict],
                    device: torch.device) -> Path:
    """Write the checkpoint of ``step`` atomically (:func:`nha_plugin.files.save_state`).

    Args:
        path: the checkpoint file (safetensors whatever its suffix).
        key: :func:`training_key` of this run.
        phases: ``[{"from_step": s, "config": schedule options}, ...]``, the last one current.
        model, optimizer, step, best, history: the training state.
        device: the training device (whose RNG states are saved).

    Returns:
        The path.
    """
    return save_state(path, {"format": _FORMAT, "key": key, "phases": phases, "step": step,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "rng": rng_state(device), "best": best, "history": history})


def load_checkpoint(path: Path, key: dict, *, new_options: bool = False) -> Dict[str, Any]:
    """The state :func:`save_checkpoint` wrote (tensors on the CPU), after checking it belongs to run ``key``.

    Args:
        path: the checkpoint.
        key: :func:`training_key` of the run that resumes it.
        new_options: accept a checkpoint whose :data:`SCHEDULE` options differ from ``key``'s (the rest must
            match); a new phase starting at the checkpoint's step is then appended to ``phases``.

    Returns:
        ``{"format", "key", "phases", "step", "model", "optimizer", "rng", "best", "history"}``.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: unreadable, a pickle (never unpickled), or not a trainer checkpoint (names the file).
        RunMismatchError: a checkpoint of another run (names each differing option).
    """
    state = load_state(path)
    fields = {"key", "phases", "step", "model", "optimizer", "rng", "best", "history"}
    if not (isinstance(state, dict) and state.get("format") == _FORMAT and fields <= set(state)
            and isinstance(state["key"], dict) and isinstance(state["phases"], list)):
        raise CorruptFileError(path, "no training checkpoint in it", _EXPECTED)
    found = state["key"]
    if {**found, "config": key["config"]} != key:
        check_key(found, key, path)                   # another model, data or format: names every difference
    if found["config"] != key["config"]:
        if not new_options:
            try:
                check_key(found, key, path)
            except RunMismatchError as err:
                raise RunMismatchError(f"{err}\nOr pass --new-options to continue this run from step {state['step']} "
                                       "with the new schedule options (it then differs from an uninterrupted run)."
                                       ) from None
        state["phases"].append({"from_step": state["step"], "config": key["config"]})
    state["key"] = key
    return state
