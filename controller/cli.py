"""The `nexlify` command line.

    nexlify train ...            the pipeline (alias: nexlify-train)
    nexlify preflight ...        the checks `train` runs first, as a pass/fail table
    nexlify backtest --walk-forward ...  folds: the pipeline on the past only, tested on the window after
    nexlify worker train ...     one training run (what the pipeline starts locally or in a pod)
    nexlify evaluate|data|bench  the trainer's own commands (nexlify.cli)
    nexlify report OUTPUT        (re)build report.html of a finished pipeline or a paper session (a folder or s3://)
    nexlify config schema        the JSON schema of the pipeline config (used by the Helm chart)

Bad input exits with code 2 and one line naming the bad value and what is accepted, before anything
is written. Other permanent errors exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import typing

import structlog

from controller.backtest_run import add_parser as add_backtest_parser
from controller.bench_learn import add_parser as add_bench_learn_parser
from controller.paper.cli import add_parser as add_paper_parser
from controller.config import MAX_EPISODES, PipelineConfig, quick_test_preset
from nexlify import logs
from nexlify.cli import add_commands as add_trainer_commands
from nexlify.cli import build_config
from nexlify.config import TrainConfig
from nexlify.configtools import add_flags, check_bounds, flags_to_mapping, json_schema, load_yaml
from nexlify.errors import InputError, NexlifyError

log = structlog.get_logger("nexlify")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (no usage block of up to 80 lines before it), with
    the way to the usage: `error: nexlify train: argument --seed: invalid int value: 'x'; see nexlify
    train --help`. Exit code 2, as argparse's. Sub-parsers are of this class too (add_subparsers)."""

    def error(self, message: str) -> typing.NoReturn:
        line = " ".join(f"{self.prog}: {message}".split())
        self.exit(2, f"error: {_capped(line)}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nexlify", description="Train RL crypto-trading agents as a pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run the pipeline: multi-start, selection, auto-retraining, summary")
    _add_pipeline_args(train)
    train.set_defaults(handler=cmd_train)

    pre = sub.add_parser("preflight", help="check versions, device, data, output and disk; a pass/fail table")
    _add_pipeline_args(pre)
    pre.set_defaults(handler=cmd_preflight)

    worker = sub.add_parser("worker", help="one training run")
    worker_sub = worker.add_subparsers(dest="worker_command", required=True)
    wt = worker_sub.add_parser("train", help="train one run and write its checkpoint and result.json")
    wt.add_argument("--run-key", default="run", help="name of the run in logs (init-1, retrain-3)")
    # defaults as the pipeline's (PipelineConfig: one place), which always passes both
    wt.add_argument("--seed", type=int, default=PipelineConfig.seed, help="seed of the run (default: %(default)s)")
    wt.add_argument("--episodes", type=int, required=True)
    wt.add_argument("--out", required=True, help="output folder or s3://bucket/prefix of this run")
    wt.add_argument("--config", help="TrainConfig file (JSON/YAML; local path or s3://)")
    wt.add_argument("--data-snapshot", help="folder or s3:// prefix holding the pipeline's candle snapshot")
    wt.add_argument("--init-from", help="checkpoint to continue from (weights and optimizer)")
    wt.add_argument("--checkpoint-every", type=int, default=PipelineConfig.checkpoint_every,
                    help="episodes between resume checkpoints (0 = only at the end; default: %(default)s)")
    wt.add_argument("--log-format", choices=logs.FORMATS, default=None)
    add_flags(wt, TrainConfig)
    wt.set_defaults(handler=cmd_worker_train)

    add_backtest_parser(sub, _add_pipeline_args)

    rep = sub.add_parser("report", help="(re)build report.html of a finished pipeline's output or a paper session's")
    rep.add_argument("output", help="the pipeline's (or the paper session's) output folder or s3://bucket/prefix")
    rep.add_argument("--log-format", choices=logs.FORMATS, default=None)
    rep.set_defaults(handler=cmd_report)

    cfg = sub.add_parser("config", help="inspect the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    schema = cfg_sub.add_parser("schema", help="print the JSON schema of the pipeline config")
    schema.set_defaults(handler=cmd_config_schema)
    show = cfg_sub.add_parser("show", help="print the resolved pipeline config as YAML")
    _add_pipeline_args(show)
    show.set_defaults(handler=cmd_config_show)

    add_trainer_commands(sub, bench_extra=lambda bench_sub: add_bench_learn_parser(bench_sub, _add_pipeline_args))
    add_paper_parser(sub)
    evaluate = sub.choices["evaluate"]
    evaluate.set_defaults(handler=_model_from_store(evaluate.get_default("handler")))
    _escape_help_percent(parser)
    return parser


def _model_from_store(handler):
    """`evaluate --model s3://bucket/.../model.pt` (a summary's final_model_path of a bucket output): the
    checkpoint is downloaded to a temporary file first; the trainer itself reads local files only."""

    def run(args: argparse.Namespace) -> int:
        from controller.stores import StoreKeyMissing, download_url, is_s3_url

        if not is_s3_url(args.model or ""):
            return handler(args)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nexlify-model-") as tmp:
            local = os.path.join(tmp, os.path.basename(args.model.rstrip("/")) or "model.pt")
            try:
                download_url(args.model, local)
            except StoreKeyMissing:
                raise InputError(f"--model {args.model} does not exist") from None
            args.model = local
            return handler(args)

    return run


_LONE_PERCENT = re.compile(r"(?<!%)%(?![(%])")


def _escape_help_percent(parser: argparse.ArgumentParser) -> None:
    """argparse formats help strings with `%`, so a help text like "improvement in %" breaks --help.
    Escape every lone `%` (leaving `%%` and `%(default)s` as they are) in this parser and its
    sub-parsers, so a setting's help may say "%" without knowing it ends up in argparse."""
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = _LONE_PERCENT.sub("%%", action.help)
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _escape_help_percent(child)


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="config_file", help="YAML file with the same keys as the flags; flags win")
    preset = ", ".join(f"{key} {' '.join(value) if isinstance(value, list) else value}"
                       for key, value in quick_test_preset().items())
    p.add_argument("--quick-test", action="store_true", help=f"a small run: {preset} (flags still win)")
    p.add_argument("--automated", action="store_true", help="never prompt (the pipeline never prompts anyway)")
    p.add_argument("--force", action="store_true", help="start over on an output that holds another config")
    p.add_argument("--log-format", choices=logs.FORMATS, default=None,
                   help="auto: JSON unless stderr is a terminal")
    p.add_argument("--verbose", action="store_true", help="also print the preflight table before training")
    add_flags(p, PipelineConfig)


def resolve_pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    file_mapping = None
    if args.config_file:
        try:
            with open(args.config_file) as fh:
                text = fh.read()
        except FileNotFoundError:
            raise InputError(f"--config {args.config_file}: no such file") from None
        except OSError as exc:  # a folder, no permission
            raise InputError(f"--config {args.config_file}: cannot be read ({exc.strerror or exc}); "
                             "accepted: a YAML file") from None
        except UnicodeDecodeError:
            raise InputError(f"--config {args.config_file} is not a text file; accepted: a YAML file") from None
        file_mapping = load_yaml(text, f"--config {args.config_file}") or {}
    flags = flags_to_mapping(args, PipelineConfig)
    preset = quick_test_preset() if args.quick_test else None
    return build_config(PipelineConfig, file_mapping, preset, flags)


def cmd_train(args: argparse.Namespace) -> int:
    from controller.preflight import check_local_output, preflight, show_table
    from controller.run import run_pipeline
    from controller.selection import final_lines as selection_lines

    cfg = resolve_pipeline_config(args)
    check_local_output(cfg.output)  # before anything loads
    ok, rows, first_error = preflight(cfg)
    if args.verbose:
        show_table(rows)
    if not ok:  # one line (the table only with --verbose or `nexlify preflight`)
        raise InputError(f"preflight failed: {first_error}")
    as_json = logs.json_mode()  # in a cluster every line is JSON: the result too, as an event
    signal.signal(signal.SIGTERM, _raise_terminated)  # stop like Ctrl-C: workers save, training.log is published
    summary = run_pipeline(cfg, force=args.force)
    final = {k: summary[k] for k in ("stop_reason", "best_initial_score", "final_best_score", "total_improvement_pct",
                                     "final_model_url")}
    final["score_note"] = ("best_initial_score, final_best_score and total_improvement_pct are the guide's "
                           "selection score and its change: not returns")
    chosen = summary.get("selection") or {}
    v = summary.get("verdict") or {}
    final.update({"winner": chosen.get("selected"), "val_return": chosen.get("val_return"),
                  "val_sharpe": chosen.get("val_sharpe"), "cash_plus_lending": chosen.get("cash_plus_lending"),
                  "sharpe_vs_lending": v.get("sharpe_vs_lending"), "deflated_sharpe": v.get("deflated_sharpe"),
                  "models_tried": chosen.get("models_tried"),
                  "beats_cash_plus_lending": chosen.get("beats_cash_plus_lending"), "verdict": chosen.get("verdict")})
    # stdout stays one JSON object (with JSON logs one line, an event: kubectl logs merges stdout and stderr);
    # the same in words on stderr
    print(json.dumps({"event": "pipeline_result", **final}) if as_json else json.dumps(final, indent=2))
    for line in selection_lines(summary):  # the last lines: in words, or as events where every line is JSON
        if as_json:
            structlog.get_logger("nexlify.pipeline").info("pipeline_verdict", line=line)
        else:
            print(line, file=sys.stderr)
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from controller.preflight import preflight, show_table

    ok, rows, first_error = preflight(resolve_pipeline_config(args))
    show_table(rows)
    if not ok:
        raise InputError(f"preflight failed: {first_error}")
    return 0


def cmd_worker_train(args: argparse.Namespace) -> int:
    from controller.worker import run_worker

    check_bounds("--episodes", args.episodes, 1, MAX_EPISODES)
    check_bounds("--checkpoint-every", args.checkpoint_every, 0, MAX_EPISODES)
    return run_worker(run_key=args.run_key, seed=args.seed, episodes=args.episodes, out_url=args.out,
                      config_url=args.config, overrides=flags_to_mapping(args, TrainConfig),
                      data_url=args.data_snapshot, init_from=args.init_from, checkpoint_every=args.checkpoint_every)


def cmd_report(args: argparse.Namespace) -> int:
    from controller.lease import acquire_output_lease
    from controller.report import read_summary, write_report
    from controller.stores import is_s3_url, open_store

    if not is_s3_url(args.output) and not os.path.isdir(args.output):  # missing is missing, not unfinished
        what = "is a file, not a folder" if os.path.exists(args.output) else "does not exist"
        raise InputError(f"{args.output} {what}; accepted: the output folder or s3:// prefix of a finished pipeline or a paper session")
    store = open_store(args.output)
    read_summary(store)  # not a finished output, or a damaged summary: one line, before the lease is written
    with acquire_output_lease(store, command="report"):  # never beside another command writing this output
        print(write_report(store))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(PipelineConfig), indent=2))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from nexlify.configtools import to_dict

    print(yaml.safe_dump(to_dict(resolve_pipeline_config(args)), sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = getattr(args, "log_format", None) or os.environ.get("NEXLIFY_LOG_FORMAT", "auto")
    logs.configure(fmt)
    as_json = logs.use_json(fmt)
    try:
        return int(args.handler(args) or 0)
    except NexlifyError as exc:
        return _fail(str(exc), exc.exit_code, as_json)
    except OSError as exc:  # a full disk, a folder where a file belongs, no permission: one line, no traceback
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return _fail(f"{exc.strerror or exc}:{where}".rstrip(":"), 1, as_json)
    except KeyboardInterrupt:
        log.warning("interrupted") if as_json else print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        log.warning("terminated") if as_json else print("terminated", file=sys.stderr)
        return 143


def _fail(message: str, code: int, as_json: bool) -> int:
    """One line on stderr: `error: ...` on a terminal, one JSON event under --log-format json (every line of
    JSON mode is JSON, so a log collector and the local executor parse the cause)."""
    message = _capped(" ".join(message.split()))  # one line, whatever the message held
    if as_json:
        log.error("failed", error=message, exit_code=code)
    else:
        print(f"error: {message}", file=sys.stderr)
    return code


MAX_ERROR_CHARS = 2000  # a message quoting a huge value (each quoted value is cut at 200 already) is cut here


def _capped(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... (cut: {len(message)} characters)"


class Terminated(BaseException):
    """SIGTERM reached `nexlify train`: unwinds like KeyboardInterrupt (never caught as an Exception), so
    the executor stops its workers (each saves its resume checkpoint) and training.log is published."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def train_alias() -> int:
    """`nexlify-train ...` is `nexlify train ...`."""
    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
