"""The audit's command line: `python -m serve_app.privacy audit [flags]`, and the console
script `serve-app-audit [flags]` (`audit_main`), which takes the same flags directly.

It reads the gateway's config from the Serve config file `serve run` deploys, measures the
configured transform (or a sweep of sigmas), and prints a table, or JSON with `--json`: one
object for a single run, a list of them for a sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from serve_app.config import AppConfig
from serve_app.privacy.audit import (
    AuditModel,
    AuditResult,
    TransformKey,
    measure,
    prepare,
    sweep_configs,
)
from serve_app.privacy.config_file import GATEWAY_IMPORT_PATH, read_app_config
from serve_app.privacy.sample import read_sample

PROG = "serve-app-audit"
DESCRIPTION = ("Measure what an upstream holding the model's weights reads back from the "
               "prompt embeddings the configured transform leaves, and what the transform "
               "costs the answers (docs/privacy.md).")
_HEADER = ("                       ---- tokens recovered ---  ------------ utility -------\n"
           "transform        sigma     L2  cosine   top-5   next-token  mean KL  greedy")


def _sigmas(text: str) -> list[float]:
    try:
        sigmas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers, e.g. 0,1,2") from None
    if not sigmas:
        raise argparse.ArgumentTypeError("expected at least one sigma")
    return sigmas


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"),
                        help="the Serve config file, as for `serve run` (default: %(default)s)")
    parser.add_argument("--app", help="the gateway application's name (default: the one "
                        f"application whose import_path is {GATEWAY_IMPORT_PATH})")
    parser.add_argument("--text-file", type=Path, metavar="FILE",
                        help="the sample, one text a line (default: the built-in sample)")
    parser.add_argument("--sweep", type=_sigmas, metavar="SIGMAS",
                        help="comma-separated sigmas (e.g. 0,0.5,1,2,4): the configured noise "
                        "kind at each; gaussian when the configured kind is none or module")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch's seed before each measurement (default: %(default)s)")
    parser.add_argument("--prompts", type=_positive, default=8,
                        help="greedy prompts: the sample's first N texts (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, or a list of them for a sweep")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="draw recovery against next-token agreement into FILE (png)")


def _percent(value: float) -> str:
    return f"{value:7.1%}"


def render_table(results: Sequence[AuditResult], app: AppConfig, seed: int) -> str:
    """One line per transform with its six figures, after a line naming what was measured,
    and the keyed checks' outcomes where there are any."""
    samples = results[0].samples
    lines = [f"{app.model.name}: {samples.source} sample, {samples.texts} texts, "
             f"{samples.rows} rows; greedy: {samples.greedy_prompts} prompts x "
             f"{samples.greedy_tokens} tokens; seed {seed}", _HEADER]
    for result in results:
        sigma = result.transform.get("sigma")
        recovery, use = result.token_recovery, result.utility
        lines.append(f"{result.transform['kind']:<14} {'-' if sigma is None else f'{sigma:g}':>7}"
                     f"{_percent(recovery.l2)} {_percent(recovery.cosine)} "
                     f"{_percent(recovery.top5)}      {_percent(use.next_token_agreement)}"
                     f"  {use.mean_kl:7.4f} {_percent(use.greedy_match)}")
    lines += [_keyed_line(result) for result in results if result.keyed is not None]
    return "\n".join(lines)


def _keyed_line(result: AuditResult) -> str:
    keyed = result.keyed
    assert keyed is not None
    yes = {True: "yes", False: "NO"}
    return (f"keyed_gaussian sigma {result.transform['sigma']:g} ({keyed.key} key): "
            f"identical prefixes give identical rows: "
            f"{yes[keyed.identical_prefixes_identical_rows]}; different keys give different "
            f"rows: {yes[keyed.different_keys_different_rows]}")


def _quiet_transformers() -> None:
    """No progress bars or deprecation notes from transformers among the audit's output."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*past_key_values", category=FutureWarning)


def _measure_all(args: argparse.Namespace, app: AppConfig,
                 texts: list[str]) -> list[AuditResult]:
    """The configured transform, or each of the sweep's, measured on the sample."""
    configured = app.privacy.transform
    configs = sweep_configs(configured, args.sweep) if args.sweep else [configured]
    key = TransformKey.for_config(configs[0]) if configs[0].kind == "keyed_gaussian" else None
    if key is not None and key.ephemeral:
        print(f"{PROG}: {configs[0].key_env} is unset: keyed_gaussian is measured with an "
              "ephemeral random key", file=sys.stderr)
    _quiet_transformers()
    model = AuditModel.load(app.model, args.device)
    clean = prepare(model, texts, args.prompts, str(args.text_file or "built-in"))
    return [measure(model, clean, config, args.seed, key) for config in configs]


def _report(args: argparse.Namespace, app: AppConfig, results: list[AuditResult]) -> None:
    if args.plot:
        from serve_app.privacy.plot import plot_sweep

        samples = results[0].samples
        plot_sweep(results, args.plot, f"{app.model.name}: {results[0].transform['kind']} "
                   f"noise, {samples.source} sample ({samples.rows} rows)")
    if args.json:
        objects = [result.as_json() for result in results]
        print(json.dumps(objects if args.sweep else objects[0], indent=2))
    else:
        print(render_table(results, app, args.seed))


def run_audit(args: argparse.Namespace) -> int:
    """The audit the parsed flags ask for; 2, with a message, when the config, the sample,
    the model or the transform is unusable (as the gateway would refuse to start)."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"{PROG}: --plot needs matplotlib: pip install 'serve_app[audit]'", file=sys.stderr)
        return 2
    try:
        app = read_app_config(args.config, args.app)
        results = _measure_all(args, app, read_sample(args.text_file))
    except (OSError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    _report(args, app, results)
    return 0


def audit_main(argv: Sequence[str] | None = None) -> int:
    """`serve-app-audit`: the audit's flags, without the subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_audit_arguments(parser)
    return run_audit(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.privacy")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="the inversion audit", description=DESCRIPTION)
    add_audit_arguments(audit)
    return run_audit(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
