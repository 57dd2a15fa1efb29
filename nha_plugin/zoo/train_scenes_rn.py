"""Train a bundled planted-concept CLIP (``scenes-rn``, ``scenes-vit``) contrastively on generated scenes (seeded,
resumable).

Batch ``s`` holds scenes ``(seed, s * batch_size + b)`` of :mod:`nha_plugin.scenes` and
one caption per scene drawn with ``default_rng((seed, 1, s))``, so a run is a pure function of its
arguments, and a resumed run sees exactly the batches an uninterrupted one would. The checkpoint
(:mod:`nha_plugin.zoo.checkpoint`: safetensors, never unpickled) also holds the RNG states, so a resumed run
ends bit-identical to an uninterrupted one. A checkpoint written with other options is refused: ``--fresh``
starts over; ``--new-options`` continues it with new schedule options (a training phase; the model cards'
recipes have several). Captions can be true of
several scenes of a batch ("a red object"); the loss therefore treats every caption whose facts hold
for a scene as a positive of that scene (a multi-positive CLIP loss, both directions).

The architecture comes from the model's JSON config (``--model`` or ``--config``): a CLIP-ResNet or a
CLIP-ViT. Training options the config does not set in ``"nha": {"train": {...}}`` take the ``scenes-rn``
defaults, so ``scenes-rn`` trains exactly as before.

Usage:
    python -m nha_plugin.zoo.train_scenes_rn --steps 3000 --checkpoint /tmp/scenes_rn.safetensors
    python -m nha_plugin.zoo.train_scenes_rn --evaluate-only          # score the bundled weights
    python -m nha_plugin.zoo.train_scenes_rn --model scenes-vit       # = python -m nha_plugin.zoo.train_scenes_vit

The held-out evaluation (:func:`evaluate`) uses seeds never used in training (``EVAL_SEED`` and up).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nha_plugin import scenes as S
from nha_plugin.files import CorruptFileError, atomic_path, save_state
from nha_plugin.runs import RunMismatchError
from nha_plugin.zoo.bundled import MODELS, build_model, images_to_tensor, load_zoo_model, weights_path, zoo_config
from nha_plugin.zoo.checkpoint import load_checkpoint, save_checkpoint, set_rng_state, training_key

TRAIN_SEED = 0
EVAL_SEED = 1000  # held-out: evaluation uses EVAL_SEED, EVAL_SEED + 1, EVAL_SEED + 2

PROMPTS = {
    "colour": "a photo of a {} object",
    "name": "a photo of a {}",
    "background": "a photo of something on {}",
}


def prompt_sets() -> Dict[str, List[str]]:
    """The zero-shot prompts of :func:`evaluate`, one per class ("a" becomes "an" before a vowel)."""
    def fill(template: str, word: str) -> str:
        return re.sub(r"\ba ([aeiou])", r"an \1", template.format(word))

    return {
        "colour": [fill(PROMPTS["colour"], c) for c in S.COLOURS],
        "name": [fill(PROMPTS["name"], n) for n in S.SHAPES + S.CATEGORIES],
        "background": [fill(PROMPTS["background"], b) for b in S.BACKGROUNDS],
    }


def _eval_sets(n: int, seed: int):
    """(task, dataset, label function) for the three held-out tasks."""
    return [
        ("colour", S.SceneDataset(n, seed, n_objects=1, kinds=("shape",)),
         lambda sc: list(S.COLOURS).index(sc.objects[0].colour)),
        ("name", S.SceneDataset(n, seed + 1, n_objects=1),
         lambda sc: list(S.SHAPES + S.CATEGORIES).index(sc.objects[0].name)),
        ("background", S.SceneDataset(n, seed + 2),
         lambda sc: list(S.BACKGROUNDS).index(sc.background)),
    ]


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 300, seed: int = EVAL_SEED, batch_size: int = 100,
             device: Optional[torch.device] = None, config: Optional[dict] = None) -> Dict[str, object]:
    """Zero-shot accuracy on freshly generated held-out scenes.

    Tasks: ``colour`` of the single shape of 1-object scenes (6 classes), ``name``: shape or photo
    category of the single object of 1-object scenes (5 shapes + 5 categories = 10 classes), and
    ``background`` of scenes with 1-3 objects (6 classes). Each task has ``n`` scenes; ``config`` (the
    model's) supplies the preprocessing mean/std.

    Returns:
        ``{"colour": acc, "name": acc, "background": acc, "n": n, "seed": seed, "prompts": {...}}``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out: Dict[str, object] = {"n": n, "seed": seed, "prompts": PROMPTS}
    prompts = prompt_sets()
    for task, ds, label_of in _eval_sets(n, seed):
        text = F.normalize(model.encode_text(tokenizer(prompts[task]).to(device)), dim=-1)
        correct = 0
        for start in range(0, n, batch_size):
            batch = [ds[i] for i in range(start, min(n, start + batch_size))]
            x = images_to_tensor(np.stack([sc.image for sc in batch]), config).to(device)
            img = F.normalize(model.encode_image(x), dim=-1)
            pred = (img @ text.T).argmax(-1).cpu()
            correct += int((pred == torch.tensor([label_of(sc) for sc in batch])).sum())
        out[task] = correct / n
    model.train(was_training)
    return out


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """CLIP loss where ``positives`` (B, B) marks every (image i, caption j) pair whose caption is true of the
    image; targets are uniform over the positives of each row (image -> text) and column (text -> image)."""
    logits = logit_scale * image_features @ text_features.T
    p = positives.float()
    loss_i = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(p / p.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (loss_i + loss_t) / 2


def _object_spec(obj: S.SceneObject) -> Dict[str, str]:
    keys = ("kind", "position", "size") + (("colour", "shape") if obj.kind == "shape" else ("category",))
    return {k: getattr(obj, k) for k in keys}


def _shape_caption(obj: S.SceneObject, rng: np.random.Generator):
    phrase, constraint = S.object_phrase(obj, str(rng.choice(["name", "full"])))
    return S.single_caption(phrase, str(rng.choice(S.SINGLE_TEMPLATES))), ((constraint,), None)


def make_batch(step: int, batch_size: int, seed: int, tokenizer, twins: float = 0.5, shape_captions: float = 0.5,
               config: Optional[dict] = None):
    """Images (B, 3, 224, 224), tokens (B, L) and the (B, B) positives matrix of training step ``step``
    (images normalised with the mean/std of ``config``, the model's).

    Colour, category and background separate most captions of a random batch, which starves the shape
    signal; so a share ``twins`` of the batch comes in pairs that differ only in one shape (same layout,
    colours and background, fresh jitter), captioned by that shape with probability ``shape_captions``.
    """
    rng = np.random.default_rng((seed, 1, step))
    scenes, caps = [], []
    b = 0
    while b < batch_size:
        scene = S.generate_scene((seed, step * batch_size + b))
        shapes = [i for i, o in enumerate(scene.objects) if o.kind == "shape"]
        if b + 1 < batch_size and shapes and rng.random() < twins:
            k = shapes[int(rng.integers(len(shapes)))]
            specs = [_object_spec(o) for o in scene.objects]
            specs[k]["shape"] = str(rng.choice([s for s in S.SHAPES if s != specs[k]["shape"]]))
            twin = S.generate_scene((seed, step * batch_size + b + 1), n_objects=len(specs), objects=specs,
                                    background=scene.background)
            for sc in (scene, twin):
                scenes.append(sc)
                caps.append(_shape_caption(sc.objects[k], rng) if rng.random() < shape_captions
                            else S.sample_caption(sc, rng))
            b += 2
        else:
            scenes.append(scene)
            caps.append(S.sample_caption(scene, rng))
            b += 1
    positives = torch.tensor([[S.facts_hold(facts, sc) for _, facts in caps] for sc in scenes])
    x = images_to_tensor(np.stack([sc.image for sc in scenes]), config)
    return x, tokenizer([t for t, _ in caps]), positives


def export_weights(model, path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the state dict as plain safetensors (floating tensors in fp16), atomically (mode 0644 minus the
    umask): the bundled-weights format, with no checksum entries, read by ``_zoo.load_state_dict_file``."""
    from safetensors.torch import save_file

    sd = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
          for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata or {})


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# the training options a config may set in "nha": {"train": {...}}; the values here are scenes-rn's
TRAIN_DEFAULTS: Dict[str, object] = {"steps": 3000, "batch_size": 64, "lr": 2e-3, "warmup": 100,
                                     "weight_decay": 0.05, "twins": 0.5, "shape_captions": 0.5, "eval_every": 250}


def _config_of(args: argparse.Namespace) -> dict:
    return zoo_config(args.config if args.config is not None else args.model)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; options left unset take the config's ``nha.train`` values, then
    :data:`TRAIN_DEFAULTS`, and ``--out`` / ``--checkpoint`` default to the model's own files."""
    # the model decides the defaults of the other options, so it is read first (without --help)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--model", default="scenes-rn", choices=MODELS, help="which bundled model to train")
    which.add_argument("--config", type=Path, default=None,
                       help="model config to use instead of the bundled <model>.json")
    known, _ = which.parse_known_args(argv)
    p = argparse.ArgumentParser(prog="python -m nha_plugin.zoo.train_scenes_rn", parents=[which],
                                description=__doc__.split("\n\n")[0])
    cfg = _config_of(known)
    defaults = {**TRAIN_DEFAULTS, **{k: v for k, v in cfg.get("nha", {}).get("train", {}).items()
                                     if k in TRAIN_DEFAULTS}}
    stem = weights_path(cfg, known.model).stem
    p.add_argument("--steps", type=int, default=defaults["steps"],
                   help="optimizer steps (cosine schedule length; default %(default)s)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (checkpoint written); resume later with the same options (or "
                        "--new-options); --stop-at, --checkpoint-every, --threads, --device, --quiet and the "
                        "paths may always change")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=defaults["warmup"], help="linear warm-up steps (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--twins", type=float, default=defaults["twins"],
                   help="share of scenes drawn as shape-twin pairs (default %(default)s)")
    p.add_argument("--shape-captions", type=float, default=defaults["shape_captions"],
                   help="probability a twin is captioned by its shape (default %(default)s)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="training seed (data and init)")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="held-out seed; must differ from --seed")
    p.add_argument("--eval-every", type=int, default=defaults["eval_every"])
    p.add_argument("--eval-n", type=int, default=300, help="held-out scenes per task")
    p.add_argument("--checkpoint", type=Path, default=Path(f"{stem.replace('-', '_')}_checkpoint.pt"),
                   help="resumable checkpoint (model, optimizer, RNG states, step; safetensors whatever its "
                        "suffix, never unpickled); resumed from when it exists and was written with the same "
                        "options, refused otherwise")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --checkpoint and start over")
    p.add_argument("--new-options", action="store_true",
                   help="resume a --checkpoint written with other schedule options (--steps, --lr, --warmup, "
                        "--weight-decay, --twins, --shape-captions, --eval-every) and continue with the new ones, "
                        "as the model cards' phased recipes do; the model, --seed, --batch-size, --eval-seed and "
                        "--eval-n must still match")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=weights_path(cfg, known.model),
                   help="safetensors written at the end (the checkpoint with the best held-out score)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--evaluate-only", action="store_true", help="only evaluate --out (default: bundled weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Train (or with ``--evaluate-only`` evaluate) as the command line ``argv`` says (see :func:`parse_args`).

    Returns:
        ``{"best", "history", "final_loss"}`` after training; the :func:`evaluate` dict with ``--evaluate-only``.

    Raises:
        RunMismatchError: ``--checkpoint`` was written with other options (pass ``--fresh`` or ``--new-options``).
        CorruptFileError: ``--checkpoint`` is unreadable or not a trainer checkpoint (a pickle is never loaded).
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.eval_seed == args.seed:
        raise ValueError(f"--eval-seed must differ from the training --seed; got {args.eval_seed} for both")
    cfg = _config_of(args)
    if args.evaluate_only:
        model, _, tokenizer = load_zoo_model(args.model, device, weights=args.out if args.out.exists() else None,
                                             config=cfg)
        result = evaluate(model, tokenizer, n=args.eval_n, seed=args.eval_seed, device=device, config=cfg)
        print(json.dumps(result))
        return result

    import open_clip
    from tqdm import tqdm

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    # open_clip zero-initialises the last BN of every residual branch, which suits deep nets; with one block
    # per stage it left the 3x3 branches (the only spatial context beyond the stem) near zero for
    # hundreds of steps and shapes were not learned, so the branches start switched on. (A ViT has no such
    # switch: open_clip leaves its residual output projections at PyTorch's default random initialisation.)
    for name, module in model.visual.named_modules():
        if name.endswith(".bn3"):
            torch.nn.init.ones_(module.weight)
    model = model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    key = training_key(args, cfg)
    step, best, history, phases = 0, None, [], [{"from_step": 0, "config": key["config"]}]
    if args.checkpoint.exists() and not args.fresh:
        state = load_checkpoint(args.checkpoint, key, new_options=args.new_options)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, best, history, phases = state["step"], state["best"], state["history"], state["phases"]
        print(f"resumed from {args.checkpoint} at step {step}", flush=True)

    def eval_and_keep_best(step: int) -> None:
        nonlocal best
        result = evaluate(model, tokenizer, n=args.eval_n, seed=args.eval_seed, device=device, config=cfg)
        result["step"] = step
        history.append({k: v for k, v in result.items() if k != "prompts"})
        score = min(result["colour"] / 0.9, result["name"] / 0.9, result["background"] / 0.8)
        print(f"eval step {step}: colour {result['colour']:.3f} name {result['name']:.3f} "
              f"background {result['background']:.3f}", flush=True)
        if best is None or score >= best["score"]:
            best = {"score": score, **{k: v for k, v in result.items() if k != "prompts"}}
            meta = {"step": str(step), "seed": str(args.seed), "eval": json.dumps(best)}
            export_weights(model, args.out, meta)
            save_state(Path(str(args.checkpoint) + ".best"), {"key": key, "model": model.state_dict(), "best": best})

    t0, losses = time.time(), []
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet, mininterval=5)
    last = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    while step < last:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)
        x, tokens, positives = make_batch(step, args.batch_size, args.seed, tokenizer, args.twins, args.shape_captions,
                                          cfg)
        img, txt, scale = model(x.to(device), tokens.to(device))
        loss = multi_positive_clip_loss(img, txt, scale, positives.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == args.steps:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"scale {model.logit_scale.exp().item():.1f} {(time.time() - t0):.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            eval_and_keep_best(step)
        if step % args.checkpoint_every == 0 or step == last:
            save_checkpoint(args.checkpoint, key, phases, model, opt, step, best, history, device)
    bar.close()
    print(json.dumps({"best": best, "steps": step, "seconds": round(time.time() - t0, 1)}), flush=True)
    return {"best": best, "history": history, "final_loss": losses[-1] if losses else None}


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: :func:`main`; a refused or unreadable checkpoint is one error line and exit status 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (RunMismatchError, CorruptFileError) as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli())
