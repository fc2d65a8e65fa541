"""``llmbin`` command line: ``quantize`` and ``eval``.

Parsing needs only this module, ``config``, ``recipes`` and ``version``: no torch, no transformers,
so ``--help`` and usage errors come at once. Each command imports what it uses when it runs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .config import OPTION_CHOICES, OPTION_HELP, RECIPE_METHODS, method_configs
from .errors import LlmbinError, QuantizationStopped
from .evaluate.zeroshot import DEFAULT_TASKS, TASK_DATA_ENV
from .version import __version__

DTYPE_NAMES = ("bfloat16", "float16", "float32")
CALIB_DATA, NSAMPLES, SEQLEN = "wikitext2", 128, 2048  # a bare run's calibration
def _yaml_list(text: str) -> list:
    """``--layers``: a YAML list (flow style fits one line), read as recipes are."""
    from .recipes import yaml_value

    try:
        value = yaml_value(text)
    except LlmbinError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} is not a YAML list; write e.g. '[{{match: mlp.down_proj, planes: 2}}]'")
    return value


FIELD_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list": _yaml_list}  # config fields are annotated by name


class Parser(argparse.ArgumentParser):
    """A usage error is one line and where to look, not argparse's whole usage before it."""

    def error(self, message, prog=None):
        self.exit(2, f"llmbin: error: {message}; see {prog or self.prog} --help\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # found by the top parser, though they follow a command: point at that command's help
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extra)}", f"{self.prog} {command}" if command else None)
        return parsed


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (argparse's own
    ArgumentDefaultsHelpFormatter would also print ``(default: None)``); lines never break inside
    a hyphenated name such as ``pb-llm-10``."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


def method_option_table() -> dict[str, tuple[str, dict[str, object]]]:
    """Config field -> (its type's name, {method: its default}), fields in the order they first appear."""
    table: dict[str, tuple[str, dict[str, object]]] = {}
    for cls in method_configs():
        for field in dataclasses.fields(cls):
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            table.setdefault(field.name, (field.type, {}))[1][cls.method] = default
    return table


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as a recipe writes it


def methods_and_defaults(defaults: dict[str, object], methods: list[str]) -> str:
    """``all methods; default: 0.01``, ``pb-llm, billm; default: hessian``, or, where the defaults
    differ, ``default: pb-llm, db-llm true; gptq, billm false``."""
    groups: dict[str, list[str]] = {}
    for method, value in defaults.items():
        groups.setdefault(_show(value), []).append(method)
    if len(groups) > 1:
        return "default: " + "; ".join(f"{', '.join(users)} {value}" for value, users in groups.items())
    users = "all methods" if len(defaults) == len(methods) else ", ".join(defaults)
    return f"{users}; default: {next(iter(groups))}"


def _method_options(parser: argparse.ArgumentParser) -> list[str]:
    """One ``--option`` per config field of any method, its help saying which methods have it and
    their defaults. The parser's own default is None: a value not given stays the method's (or the recipe's)."""
    group = parser.add_argument_group(
        "method options", "Each applies to the methods named in its help; one not given keeps the recipe's value, "
        "else the method's default.")
    table = method_option_table()
    methods = [cls.method for cls in method_configs()]
    for name, (kind, defaults) in table.items():
        flag = "--" + name.replace("_", "-")
        text = f"{OPTION_HELP.get(name, '')} ({methods_and_defaults(defaults, methods)})".replace("%", "%%")
        if FIELD_TYPES[kind] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in OPTION_CHOICES:
            group.add_argument(flag, type=FIELD_TYPES[kind], choices=OPTION_CHOICES[name], default=None, help=text)
        else:
            group.add_argument(flag, type=FIELD_TYPES[kind], default=None, metavar=name.upper(), help=text)
    return list(table)


def _method_name(name: str) -> str:
    """``--method``: a method's name; a former method that is a recipe now says which recipe."""
    if name in RECIPE_METHODS:
        raise argparse.ArgumentTypeError(f"{name} is a recipe now, not a method: use --recipe {name}")
    methods = sorted(cls.method for cls in method_configs())
    if name not in methods:
        raise argparse.ArgumentTypeError(f"unknown method {name!r} (choose from {', '.join(methods)})")
    return name


def _recipe_list() -> str:
    from .recipes import shipped_recipes

    return ", ".join(shipped_recipes()) or "none"


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    methods = sorted(cls.method for cls in method_configs())
    parser = Parser(prog="llmbin", formatter_class=HelpFormatter,
                    description="Post-training binarization of causal LMs: quantize a model into a packed "
                                "checkpoint, and evaluate checkpoints and original models.")
    parser.add_argument("--version", action="version", version=f"llmbin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,generate}")

    q = sub.add_parser("quantize", help="calibrate, binarize and write a packed checkpoint",
                       formatter_class=HelpFormatter,
                       description=f"Calibrate on text, binarize the linear layers of every decoder block with one "
                                   f"method, and write a packed checkpoint. A bare run calibrates on {NSAMPLES} "
                                   f"windows of {SEQLEN} tokens of {CALIB_DATA} (--nsamples, --seqlen, --calib-data).",
                       epilog=f"shipped recipes (--recipe NAME): {_recipe_list()}")
    q.add_argument("--model", required=True, help="hub id, local HF folder, .gguf file, or 'smollm2-135m'")
    q.add_argument("--method", type=_method_name, metavar="{" + ",".join(methods) + "}",
                   help="the quantization method; required unless --recipe gives it")
    q.add_argument("--recipe", metavar="NAME|FILE",
                   help="a shipped recipe by name (listed below) or a YAML file of a method and its options; "
                        "method options given on the command line override it")
    q.add_argument("--calib-data", default=CALIB_DATA, metavar="DATA",
                   help="calibration text: wikitext2, c4, ptb, or a .parquet/.jsonl/.txt file")
    q.add_argument("--nsamples", type=int, default=NSAMPLES, help="calibration windows")
    q.add_argument("--seqlen", type=int, default=SEQLEN, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' random offsets")
    q.add_argument("--device", default="cpu", help="where each block is quantized (cpu, cuda, cuda:1, ...)")
    q.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="dtype the model is computed in; auto: float32 on the CPU, the checkpoint's own dtype on a GPU")
    q.add_argument("--offload-activations", metavar="DIR",
                   help="keep calibration activations in memory-mapped files in DIR (automatic, in OUT.partial/, when "
                        "they would exceed a quarter of RAM)")
    q.add_argument("--out", required=True, help="checkpoint directory to create")
    q.add_argument("--stop-after-blocks", type=int, metavar="K",
                   help="quantize K more blocks, keep them in OUT.partial/ and stop (rerun without it to continue): "
                        "quantize a big model over several sessions, or time and measure a few blocks")
    q.add_argument("--json", help="write a JSON report (bits, bytes, time, peak memory) here")
    q.add_argument("--eval-ppl", metavar="DATASET", help="after saving, also report the in-memory model's perplexity")
    q.add_argument("--eval-seqlen", type=int, default=2048, help="with --eval-ppl: tokens per window")
    q.add_argument("--max-windows", type=int, help="with --eval-ppl: evaluate only the first N windows")
    q.add_argument("--eval-tasks", metavar="TASKS",
                   help="after saving, reload the checkpoint and run these lm-eval zero-shot tasks (as llmbin eval --tasks)")
    q.add_argument("--limit", type=int, help="with --eval-tasks: only the first N examples of each task")
    q.add_argument("--eval-batch-size", type=int, default=8, help="with --eval-tasks: lm-eval batch size")
    q.add_argument("--task-data", help="with --eval-tasks: local copies of the task data (as llmbin eval --task-data)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    options = _method_options(q)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a packed checkpoint or an original model",
                       formatter_class=HelpFormatter,
                       description="Perplexity (by default wikitext2's, in windows of 2048 tokens) and lm-eval "
                                   "zero-shot accuracy of a packed checkpoint, or with --model of an original model.")
    e.add_argument("checkpoint", nargs="?", help="llmbin checkpoint directory")
    e.add_argument("--model", help="an original model instead (hub id, folder, .gguf, 'smollm2-135m')")
    e.add_argument("--ppl", help="data set for perplexity (wikitext2, c4, ptb); default wikitext2 unless --tasks is given")
    e.add_argument("--tasks", help="comma-separated lm-eval zero-shot tasks, e.g. " + ",".join(DEFAULT_TASKS))
    e.add_argument("--limit", type=int, help="with --tasks: only the first N examples of each task (quick checks)")
    e.add_argument("--batch-size", type=int, default=8, help="with --tasks: lm-eval batch size")
    e.add_argument("--task-data", help=f"with --tasks: local copies of the task data (default ${TASK_DATA_ENV}, "
                   "else zeroshot/ in the local data folder, else the hub)")
    e.add_argument("--cache", help="keep finished work under this path prefix (perplexity windows in "
                   "PREFIX.DATASET-SEQLEN.windows.jsonl, zero-shot requests in SQLite files): a rerun with the same "
                   "prefix resumes where an interrupted one stopped")
    e.add_argument("--eval-data", help="a local .parquet/.jsonl/.txt file holding the --ppl data set's text")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows (quick checks)")
    e.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...)")
    e.add_argument("--device-map", help="'auto', or a JSON object of module -> device/'cpu'/'disk': accelerate places "
                   "the blocks over GPUs, CPU and disk (with --offload-folder)")
    e.add_argument("--offload-folder", help="with --device-map: where blocks mapped to 'disk' are kept")
    e.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="dtype of activations and float layers; auto: float32 on the CPU, float16 (as stored) on a GPU")
    e.add_argument("--dense-cache", action="store_true",
                   help="decode each packed layer once and keep it dense: same numbers, faster, fp32-sized memory")
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--no-verify", action="store_true",
                   help="skip checking the checkpoint's files against their recorded digests (as LLMBIN_VERIFY=0): "
                        "a faster load that no longer detects corrupt or modified files")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="stream a greedy continuation of a prompt, with prefill and decode speed",
                       formatter_class=HelpFormatter,
                       description="Try a checkpoint (or with --model an original model) in one line: the greedy "
                                   "continuation of --prompt streams as it is decoded through model.generate, then "
                                   "prefill and decode tokens/s and peak memory are printed.")
    g.add_argument("checkpoint", nargs="?", help="llmbin checkpoint directory")
    g.add_argument("--model", help="an original model instead (hub id, folder, .gguf, 'smollm2-135m')")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    g.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1, ...)")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="dtype of activations and float layers; auto: float32 on the CPU, float16 (as stored) on a GPU")
    g.add_argument("--compile", action="store_true", help="the fast decode path (llmbin.prepare_decode: static cache, "
                   "compiled decode step); compiling first takes tens of seconds to minutes, reported apart")
    g.add_argument("--json", help="write the text and the speeds as JSON here")
    g.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's files against their "
                   "recorded digests (as LLMBIN_VERIFY=0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser, options


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_json(path: str | None, report: dict) -> None:
    """Written beside ``path`` and renamed over it: a reader never sees half a report, and a link at
    ``path`` is replaced, never followed into its target."""
    if path:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def check_quantize_options(args) -> None:
    """The command line's own mistakes, named before torch loads (a recipe is found, not yet read)."""
    if not args.method and not args.recipe:
        raise LlmbinError("give --method or --recipe (e.g. --recipe pb-llm-10; llmbin quantize --help lists both)")
    if args.recipe:
        from .recipes import find_recipe

        find_recipe(args.recipe)
    if args.stop_after_blocks is not None and args.stop_after_blocks < 1:
        raise LlmbinError(f"--stop-after-blocks must be at least 1, got {args.stop_after_blocks}")
    if args.eval_tasks is None and (args.limit is not None or args.task_data):
        raise LlmbinError("--limit and --task-data apply to zero-shot tasks; add --eval-tasks " + ",".join(DEFAULT_TASKS))
    if args.nsamples < 1 or args.seqlen < 1:
        raise LlmbinError(f"--nsamples and --seqlen must be positive, got {args.nsamples} and {args.seqlen}")
    if args.json:
        report, out = Path(args.json).resolve(), Path(args.out).resolve()
        work = out.with_name(f"{out.name}.partial")
        if report in (out, work) or work in report.parents or out in report.parents:
            raise LlmbinError(f"--json {args.json} lies where --out {args.out} is written; give a path outside it, "
                              f"such as {args.out.rstrip('/')}.json")
    check_json_target(args.json)


def cmd_quantize(args, option_names: list[str]) -> dict:
    from .config import make_config
    from .recipes import recipe_config

    out = Path(args.out)
    options = {k: getattr(args, k) for k in option_names if getattr(args, k) is not None}
    # the options' values are checked here, with torch loaded but before transformers is
    config = recipe_config(args.recipe, args.method, **options) if args.recipe else make_config(args.method, **options)
    tasks = _task_list(args.eval_tasks) if args.eval_tasks is not None else None
    if tasks is not None:
        from .evaluate.zeroshot import prepare_tasks

        prepare_tasks(tasks, limit=args.limit, batch_size=args.eval_batch_size, task_data=args.task_data)
    check_device(args.device)
    from . import distributed
    from .models import open_model, resolve_model

    resolve_model(args.model)  # a mistyped folder is named before transformers loads
    ranks, device = distributed.init_from_environment(args.device)  # under torchrun: join the other processes
    writer = ranks.writer  # rank 0 writes the checkpoint and the report, and shows progress
    _progress_bars(args.no_progress or not writer)

    from .bits import bit_report, directory_bytes
    from .checkpoint.folder import DeathWatch, claim_output, release_output
    from .checkpoint.resume import check_resumable, finished_blocks
    from .data.calibration import calibration_windows
    from .evaluate.perplexity import dataset_perplexity
    from .quantize import quantize_and_save, run_options

    info = {"data": args.calib_data, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    # before the model loads: the output can be written and is not another run's, and a resume has these options
    work = claim_output(out) if writer else None
    watch = DeathWatch(out) if writer else None  # says so at once if a SIGKILL (an out-of-memory kill) ends this run
    try:
        if writer:
            check_resumable(work, run_options(config, {"model": args.model, **info}))
        opened = open_model(args.model, dtype=args.dtype, device=device, whole=config.wants_distillation())
        calibration = calibration_windows(opened.tokenizer, args.calib_data, args.nsamples, args.seqlen, args.seed)
        start, stats = time.perf_counter(), {}
        report = {"model": args.model, "method": config.method, "recipe": args.recipe, "config": config.to_dict(),
                  "calibration": info, "dtype": str(opened.dtype).removeprefix("torch."), "streamed": opened.streamed,
                  "device": args.device, "timings": stats}
        model = quantize_and_save(opened, config, calibration, out, device=device, progress=not args.no_progress and writer,
                                  calibration_info={"model": args.model, **info},
                                  offload_activations=args.offload_activations,
                                  stop_after_blocks=args.stop_after_blocks, stats=stats)
    except QuantizationStopped as stop:
        if not writer:
            return None
        report.update({"stopped_after_blocks": stop.blocks_done, "quantize_seconds": time.perf_counter() - start,
                       "peak_rss_mib": _peak_rss_mib()})
        blocks = f"{stop.blocks_done} block{'s' * (stop.blocks_done != 1)}"
        print(f"stopped after {blocks} as asked; they are in {out}.partial, rerun without "
              f"--stop-after-blocks to continue (peak RSS {report['peak_rss_mib']:.0f} MiB)")
        return report
    except BaseException as exc:
        _ending()  # a launcher's SIGTERM after this failure must not cut the message short
        kept = len(finished_blocks(work)) if work is not None and work.exists() else 0
        if writer:
            release_output(out, remove=not kept)  # nothing half-written stays; finished blocks do, for the rerun
        if isinstance(exc, KeyboardInterrupt):
            how = f"stopped by {exc}" if isinstance(exc, Stopped) else "interrupted"
            if not writer:
                raise LlmbinError(f"{how}; rank 0 keeps the finished blocks") from None
            raise LlmbinError(f"{how}; {kept} finished blocks are kept in {work}, rerun the same command to resume"
                              if kept else f"{how} before any block was finished; nothing was kept") from None
        if isinstance(exc, distributed.PeerLost) and writer:
            raise LlmbinError(f"{exc}; {kept} finished blocks are kept in {work}, rerun the same command (with any "
                              "number of processes) to resume" if kept else f"{exc}; no block was finished") from None
        raise
    finally:
        if watch is not None:
            watch.ended()
    if not writer:
        return None
    seconds = time.perf_counter() - start
    bits = bit_report(model)
    report.update({"bits_per_weight": bits["bits_per_weight"], "bits_by_layer": bits["by_layer"], "tables": bits["tables"],
                   "disk_bytes": directory_bytes(out),
                   "fp16_bytes": bits["fp16_bytes"], "quantize_seconds": seconds, "peak_rss_mib": _peak_rss_mib()})
    print(f"wrote {out}: {bits['bits_per_weight']:.3f} bits/weight in the quantized layers, "
          f"{report['disk_bytes'] / 2**20:.1f} MiB on disk (fp16: {bits['fp16_bytes'] / 2**20:.1f} MiB), "
          f"{seconds:.0f} s, peak RSS {report['peak_rss_mib']:.0f} MiB")
    if args.eval_ppl:
        if opened.streamed:  # the streamed model was never whole in memory: evaluate the checkpoint it wrote
            from .checkpoint.io import load

            model = load(out)
        ppl = dataset_perplexity(model, opened.tokenizer, args.eval_ppl, seqlen=args.eval_seqlen,
                                 max_windows=args.max_windows, progress=not args.no_progress)
        report["ppl_in_memory" if not opened.streamed else "ppl"] = {args.eval_ppl: ppl}
        print(f"{'in-memory' if not opened.streamed else 'saved checkpoint'} {args.eval_ppl} perplexity {ppl:.3f}")
    if tasks is not None:
        from transformers import AutoTokenizer

        from .checkpoint.io import load

        del model  # the numbers are those of the saved files, reloaded as users will load them
        report.update(_zero_shot(load(out), AutoTokenizer.from_pretrained(out), tasks, args.limit,
                                 args.eval_batch_size, args.task_data, None))
    return report


def _progress_bars(off: bool) -> None:
    if off:  # transformers' own bars (loading shards), besides llmbin's
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _zero_shot(model, tokenizer, tasks, limit, batch_size, task_data, cache) -> dict:
    from .evaluate.zeroshot import table, zero_shot

    report = zero_shot(model, tokenizer, tasks, limit=limit, batch_size=batch_size, task_data=task_data, cache=cache)
    print(table(report))
    return report


def cmd_eval(args) -> dict:
    from .bits import bit_report, directory_bytes
    from .evaluate.perplexity import dataset_window_nlls, ppl_of
    from .nn.binary_linear import BinaryLinear

    _progress_bars(args.no_progress)
    _one_target(args)
    if not args.tasks and (args.limit is not None or args.task_data):
        raise LlmbinError("--limit and --task-data apply to zero-shot tasks; add --tasks " + ",".join(DEFAULT_TASKS))
    device_map = _device_map(args.device_map)  # options first, then files, then the model
    check_device(args.device)
    check_json_target(args.json)
    check_json_target(args.cache, "--cache", prefix=True)  # before the model loads, not after
    if args.cache and args.tasks:
        from .evaluate.zeroshot import check_cache

        check_cache(args.cache)
    lm = None
    if args.checkpoint:
        from .checkpoint.io import check_checkpoint, check_offload_folder, load_tokenizer

        tokenizer = load_tokenizer(check_checkpoint(args.checkpoint))  # cheap checks before the model loads
        check_offload_folder(args.offload_folder)
    if args.checkpoint and args.device_map and args.tasks:
        from .evaluate.zeroshot import checkpoint_lm, prepare_tasks

        # lm-eval loads the checkpoint from its path, with its own placement over GPUs, CPU and disk
        prepare_tasks(_task_list(args.tasks), limit=args.limit, batch_size=args.batch_size, task_data=args.task_data)
        lm = checkpoint_lm(args.checkpoint, dtype=_eval_dtype(args.dtype, args.device), device=args.device,
                           device_map=device_map, offload_folder=args.offload_folder,
                           batch_size=args.batch_size)
        model, tokenizer = lm.model, lm.tokenizer
    elif args.checkpoint:
        from .checkpoint.io import load

        model = load(args.checkpoint, dtype=_eval_dtype(args.dtype, args.device), device=args.device,
                     device_map=device_map, offload_folder=args.offload_folder)
    if args.checkpoint:
        if args.dense_cache:
            for module in model.modules():
                if isinstance(module, BinaryLinear):
                    module.dense_cache = True
    else:
        if args.device_map or args.offload_folder:
            raise LlmbinError("--device-map and --offload-folder apply to packed checkpoints; for --model use --device")
        model, tokenizer = _original_model(args)
    # Memory after loading alone, before any window runs: the loaded model's own footprint.
    loaded_rss = _peak_rss_mib()
    start = time.perf_counter()
    report = {"model": args.checkpoint or args.model, "bits_per_weight": bit_report(model)["bits_per_weight"],
              "disk_bytes": directory_bytes(args.checkpoint) if args.checkpoint else None,
              "load_peak_rss_mib": loaded_rss}
    bpw = report["bits_per_weight"]
    dataset = args.ppl or (None if args.tasks else "wikitext2")
    if dataset:
        log = None if not args.cache else f"{args.cache}.{Path(dataset).stem}-{args.seqlen}.windows.jsonl"
        nlls = dataset_window_nlls(model, tokenizer, dataset, eval_data=args.eval_data, seqlen=args.seqlen,
                                   max_windows=args.max_windows, progress=not args.no_progress, log=log,
                                   model_name=_model_identity(report["model"]))
        ppl = ppl_of(nlls)
        report.update({"ppl": {dataset: ppl}, "eval_data": args.eval_data, "seqlen": args.seqlen,
                       "max_windows": args.max_windows, "window_nll": nlls})
        print(f"{report['model']}: {dataset} perplexity {ppl:.3f}" + (f" ({bpw:.3f} bits/weight)" if bpw else ""))
    if args.tasks:
        report.update(_zero_shot(lm or model, tokenizer, _task_list(args.tasks), args.limit, args.batch_size,
                                 args.task_data, args.cache))
    report.update({"eval_seconds": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib()})
    return report


def _one_target(args) -> None:
    if bool(args.checkpoint) == bool(args.model):
        raise LlmbinError("give either a checkpoint directory or --model MODEL, not both or neither")


def _original_model(args):
    """``--model``'s model and tokenizer, on ``--device`` in ``--dtype`` (eval's and generate's rule)."""
    from .models import load_model

    model, tokenizer = load_model(args.model, _eval_dtype(args.dtype, args.device))
    return model.to(args.device), tokenizer


def cmd_generate(args) -> dict:
    from .evaluate.generation import timed_generate

    _progress_bars(args.no_progress)
    _one_target(args)
    if args.max_new_tokens < 1:
        raise LlmbinError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_device(args.device)
    check_json_target(args.json)
    if args.checkpoint:
        from .checkpoint.io import check_checkpoint, load, load_tokenizer

        tokenizer = load_tokenizer(check_checkpoint(args.checkpoint))
        model = load(args.checkpoint, dtype=_eval_dtype(args.dtype, args.device), device=args.device)
    else:
        model, tokenizer = _original_model(args)
    loaded_rss = _peak_rss_mib()
    compile_seconds = None
    if args.compile:
        from .nn.decode import prepare_decode

        prepare_decode(model)
        start = time.perf_counter()
        print("compiling the decode step for this prompt length...", file=sys.stderr, flush=True)
        timed_generate(model, tokenizer, args.prompt, args.max_new_tokens, echo=False)  # compiles for these shapes
        compile_seconds = time.perf_counter() - start
    print(args.prompt, end="", flush=True)
    result = timed_generate(model, tokenizer, args.prompt, args.max_new_tokens)
    report = {"model": args.checkpoint or args.model, "prompt": args.prompt, **result, "compiled": args.compile,
              "compile_seconds": compile_seconds, "load_peak_rss_mib": loaded_rss, "peak_rss_mib": _peak_rss_mib()}
    decode = result["decode_tokens_per_s"]
    print(f"\n\nprefill {result['prefill_tokens_per_s']:.1f} tokens/s ({result['prompt_tokens']} prompt tokens), decode "
          + (f"{decode:.1f} tokens/s" if decode else "n/a") + f" ({result['new_tokens']} new tokens), "
          f"peak RSS {report['peak_rss_mib']:.0f} MiB")
    return report


def _model_identity(name: str) -> str:
    """What a perplexity log records as the model: the absolute path of a local file or folder (so
    ``ckpt`` and ``./ckpt`` resume the same log), else the name (a hub id, ``smollm2-135m``)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def check_device(device: str) -> None:
    """``--device`` names a device this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LlmbinError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LlmbinError(f"--device {device}: this machine (or this torch build) has no CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise LlmbinError(f"--device {device}: there are only {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    elif parsed.type not in ("cpu", "meta"):
        raise LlmbinError(f"--device {device}: llmbin runs on cpu or cuda")


def check_json_target(path: str | None, option: str = "--json", prefix: bool = False) -> None:
    """``--json``'s (or ``option``'s) path is not a folder, and its folder exists and is writable, so
    nothing is lost after the work. A ``prefix`` (``--cache``) names files beside it, such as
    ``PREFIX.wikitext2-2048.windows.jsonl``, so it may also be a folder's name (the checkpoint's)."""
    if path is None:
        return
    if not prefix and Path(path).is_dir():
        raise LlmbinError(f"{option} {path} is a folder; give a file path, such as {Path(path) / 'report.json'}")
    folder = Path(path).parent
    if not folder.is_dir():
        raise LlmbinError(f"{option} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise LlmbinError(f"{option} {path}: folder {folder} is not writable; choose another path")


def _eval_dtype(name: str, device: str):
    """``--dtype`` of ``llmbin eval``: llmbin's auto rule with a packed checkpoint's stored float16
    as the stored dtype (float32 on the CPU, float16 on a GPU); ``--model`` has the same rule,
    whatever the original model's own dtype."""
    from .checkpoint.tensors import STORAGE_DTYPE
    from .models import compute_dtype

    return compute_dtype(name, device, STORAGE_DTYPE)


def _device_map(text: str | None):
    """``--device-map``: ``auto`` or a JSON object (module name -> device index, name, 'cpu' or 'disk')."""
    if text is None or text == "auto":
        return text
    try:
        mapping = json.loads(text)
    except ValueError:
        mapping = None
    if not isinstance(mapping, dict):
        raise LlmbinError(f"--device-map must be 'auto' or a JSON object such as '{{\"\": \"cuda:0\"}}'; got {text!r}")
    return mapping


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's time limit, a closed terminal), handled as Ctrl-C is: the run
    stops between Python steps, keeps its finished blocks and says so, instead of dying without a word."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_ENDING = False


def _ending() -> None:
    """The run is failing and says why: a SIGTERM from here on (torchrun stopping every rank once one
    failed) no longer interrupts the last message."""
    global _ENDING
    _ENDING = True


def _stop(signum, frame):
    if not _ENDING:
        raise Stopped(signum)


@contextmanager
def _stop_on_signals():
    """Within: SIGTERM and SIGHUP raise :class:`Stopped`; the caller's handlers come back after (tests call main)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    global _ENDING
    _ENDING = False
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        _ENDING = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    with _stop_on_signals():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        parser, option_names = build_parser()
        args = parser.parse_args(argv)
        if args.command == "quantize":
            passive_openmp_threads()
            check_quantize_options(args)
            report = cmd_quantize(args, option_names)
        else:
            from .checkpoint.tensors import verification

            with verification(False if args.no_verify else None):
                report = cmd_eval(args) if args.command == "eval" else cmd_generate(args)
        if report is not None:  # None: a rank other than 0 under torch.distributed
            _write_json(args.json, report)
    except LlmbinError as exc:
        print(f"llmbin: error: {_rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"llmbin: {_rank_prefix()}stopped by {exc}" if isinstance(exc, Stopped) else
              f"llmbin: {_rank_prefix()}interrupted", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Stopped) else 130
    finally:
        _leave_process_group()
    return 0


def passive_openmp_threads() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` for the quantize command, unless the user set it or ``GOMP_SPINCOUNT``;
    it must be set before torch loads its OpenMP runtime.

    Reconstruction runs thousands of small parallel operations per layer (GPTQ's columns). With
    libgomp's default, a thread spins for 300,000 rounds at each one's end waiting for the others;
    beside one busy process the waited-for thread is off its core, and a SmolLM2 PB-LLM block took
    498.7 s instead of 23.2. Passive threads sleep at once: 45.9 s beside the busy process, 24.8 s
    alone (``make bench-distributed``, docs/distributed.md#threads)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _rank_prefix() -> str:
    """``rank R of N: `` under torch.distributed, so a failure names the process it came from."""
    if "torch.distributed" not in sys.modules:
        return ""
    from .distributed import current

    ranks = current()
    return f"rank {ranks.rank} of {ranks.world}: " if ranks.distributed else ""


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:
        from .distributed import close

        close()


if __name__ == "__main__":
    sys.exit(main())
