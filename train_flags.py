"""train.py's command line: the flags in four groups, --config FILE.toml (any flag as a key), and
the checks that run before anything loads, so a mistake ends in one `error:` line and exit 2.

    python train.py --help
"""
import argparse
import math
import re
import tomllib

import torch

import models
import planner
import util
from util import LoadError


def build_parser() -> argparse.ArgumentParser:
    """The flags, in four groups; every one can also be given as a key of --config FILE.toml."""
    p = argparse.ArgumentParser(
        formatter_class=util.HelpFormatter,
        description="Train a FLUX.2 [dev] / [klein] LoRA on a folder of captioned images.")
    p.add_argument("--config",
                   help="TOML file with the same keys as the flags (flags given on the command "
                        "line win)")
    _model_and_data_flags(p.add_argument_group("model and data").add_argument)
    _training_flags(p.add_argument_group("LoRA and training").add_argument)
    _memory_flags(p.add_argument_group("memory and speed").add_argument)
    _run_flags(p.add_argument_group("seed, checkpoints, previews").add_argument)
    return p


def _model_and_data_flags(a) -> None:
    a("--data", help="folder of images with same-stem .txt captions or a metadata.jsonl")
    a("--model", choices=["dev", "tiny", *models.RANDOM_MODELS], default="dev",
      help="dev (needs --model-dir: a dev or klein snapshot), tiny (random, CPU demo), or a "
           "full-size model with random weights for speed/memory runs: "
           + ", ".join(models.RANDOM_MODELS))
    a("--model-dir",
      help="a FLUX.2-dev or FLUX.2-klein(-base) snapshot folder (DiT file or transformer/, ae, "
           "text_encoder, tokenizer); for klein train on the base model")
    a("--out", default="out",
      help="output folder: lora.safetensors, checkpoints/, log.jsonl, loss.png, samples/")
    a("--cache-dir",
      help="latent/text cache (default ~/.cache/flux2-lora); entries are keyed by content hash")
    a("--resolution", type=int,
      help="training side in pixels, multiple of 16 (default 1024; 128 for tiny)")
    a("--buckets", action="store_true",
      help="aspect-ratio buckets of about resolution^2 pixels instead of squares")
    a("--repeats", type=int, default=1, help="times each image appears per epoch")
    a("--default-caption", help="caption for images without one")
    a("--control-dir", metavar="CONTROL",
      help="edit LoRA: folder of reference images; DATA/sub/stem.ext's are CONTROL/sub/stem.*, "
           "then stem_1.*, stem_2.*, ... (or a \"control\" list in metadata.jsonl); every "
           "image needs at least one")
    a("--control-resolution", type=int, metavar="PX",
      help="cap each reference's area at PX^2 pixels (default: as sampling, 2024^2 for one "
           "reference, 1024^2 each for several)")
    a("--caption-dropout", type=float, default=0.0, metavar="P",
      help="probability that a row trains on the empty prompt instead of its caption")


def _training_flags(a) -> None:
    a("--steps", type=int, default=1000,
      help="optimizer steps in total (a resumed run counts from its start)")
    a("--batch-size", type=int, default=1,
      help="images per micro-batch over all processes (torchrun: split evenly)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--rank", type=int, default=16, help="LoRA rank r of every adapter")
    a("--alpha", type=float, help="LoRA alpha (scale alpha/rank); default = rank, i.e. scale 1")
    a("--lora-targets", default="paper",
      help="lora.py preset (paper, attn+mlp, all) or a regex over module names")
    a("--lr", type=float, default=1e-4,
      help="AdamW learning rate, constant (the report: no scheduler)")
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    a("--timestep-sampling", choices=["shift", "logit-normal", "uniform"], default="shift",
      help="how training t is drawn: shift = the sampler's time shift applied to U(0,1) "
           "(matches sampling), logit-normal = the same shift on sigmoid(N(0,1)), "
           "uniform = U(0,1) as the diffusers trainer")
    a("--guidance", type=float, default=4.0,
      help="guidance value fed to the guidance embedder while training")


def _memory_flags(a) -> None:
    a("--offload", choices=planner.STRATEGIES, default="auto",
      help="block placement (offload.py): auto = resident if everything fits, else stream the "
           "fewest blocks (more when the batch hides the copies); spare memory keeps MLP and "
           "attention outputs, then skips checkpoints")
    a("--gpu-memory-limit", type=float,
      help="GiB this run may use on the GPU: the planner's budget and a hard allocator cap, to "
           "rehearse a smaller card (default: what is free)")
    a("--host-memory-limit", type=float,
      help="GiB of host memory the planner may pin for streamed weights (default: what the "
           "system reports available, less 10%% or at most 4 GiB)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the elementwise glue between the matmuls (flux2.fuse), with any plan "
           "(default: on with CUDA)")
    a("--device", help="cuda or cpu (default: cuda when available)")


def _run_flags(a) -> None:
    a("--seed", type=int, default=0,
      help="data order, noise, timesteps, LoRA init; preview seeds are seed + i")
    a("--save-every", type=int, default=250, help="checkpoint every N steps (0: only at the end)")
    a("--sample-every", type=int, default=200,
      help="preview grid every N steps, also at step 0 (0: never)")
    a("--sample-prompts",
      help="text file, one preview prompt per line, or .jsonl with {\"prompt\": ..., \"refs\": "
           "[image paths relative to the file]} per line (default: the first two captions, "
           "with their references in an edit run)")
    a("--sample-steps", type=int, default=50,
      help="sampling steps for previews; also picks the shift's mu")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with --config TOML values as defaults; a mistake exits 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**config_defaults(parser, args.config))
        args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required (a folder of images with .txt captions)")
    if args.model == "dev" and not args.model_dir:
        parser.error("--model-dir is required for --model dev (or pass --model tiny for the CPU "
                     "demo)")
    args.resolution = args.resolution or (128 if args.model == "tiny" else 1024)
    check_numbers(parser, args)
    if args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: must be a multiple of 16")
    if not 0 <= args.caption_dropout <= 1:
        parser.error(f"--caption-dropout {args.caption_dropout}: must be between 0 and 1")
    if args.control_resolution is not None and args.control_resolution < 64:
        parser.error(f"--control-resolution {args.control_resolution}: must be at least 64 "
                     f"(references need sides >= 64 px)")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device}: pass cpu, cuda or cuda:N")
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    return args


def config_defaults(parser: argparse.ArgumentParser, path) -> dict:
    """The keys of a --config TOML file as flag defaults, each value checked as its flag checks
    it (type, choices; true/false for switches); parser.error naming the file and key if not."""
    try:
        config = tomllib.loads(util.read_text(path))
    except LoadError as e:
        parser.error(f"--config {e}")
    except OSError as e:
        parser.error(f"--config {util.os_error_line(e)}")
    except tomllib.TOMLDecodeError as e:
        parser.error(f"--config {path}: {e}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in config.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            parser.error(f"--config {path}: unknown key {key!r}; use the flag names, e.g. "
                         f"batch-size")
        if action.nargs == 0:                       # a switch: --buckets, --resume, --compile
            kinds, what = (bool,), "true or false"
        else:
            kinds, what = {int: ((int,), "an integer"), float: ((int, float), "a number")}.get(
                action.type, ((str,), "a string"))
        if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
            parser.error(f"--config {path}: {key} = {value!r} must be {what}")
        if action.choices and value not in action.choices:
            parser.error(f"--config {path}: {key} = {value!r} must be one of "
                         f"{', '.join(map(str, action.choices))}")
        out[action.dest] = float(value) if action.type is float else value
    return out


def check_numbers(parser: argparse.ArgumentParser, args) -> None:
    """The numeric flags' ranges (NaN and inf fail every check)."""
    for key, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("repeats", 1),
                     ("rank", 1), ("resolution", 1), ("sample_steps", 1), ("save_every", 0),
                     ("sample_every", 0)):
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be at least {low}")
    for key, positive in (("lr", True), ("alpha", True), ("gpu_memory_limit", True),
                          ("weight_decay", False)):
        value = getattr(args, key)
        if value is not None and not (math.isfinite(value) and (value > 0 if positive
                                                                else value >= 0)):
            parser.error(f"--{key.replace('_', '-')} {value}: must be a finite number "
                         f"{'>' if positive else '>='} 0")
    if args.lr > 1:                 # AdamW moves each weight by about lr per step
        parser.error(f"--lr {args.lr}: must be at most 1 (1e-4 is the default)")
    if not math.isfinite(args.guidance):
        parser.error(f"--guidance {args.guidance}: must be a finite number")
