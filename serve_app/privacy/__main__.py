"""The audit's command line: `python -m serve_app.privacy audit [flags]`, and the console
script `serve-app-audit [flags]` (`audit_main`), which takes the same flags directly.

It reads the gateway's config from the Serve config file `serve run` deploys, runs the
attack suite on the configured transform (or a sweep of sigmas, or the reference weak
transforms), and prints a table, or JSON with `--json`: one object for a single run, a list
of them for a sweep or the weak examples.
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
from serve_app.privacy.audit import AuditModel, AuditResult, measure, measure_target, prepare
from serve_app.privacy.config_file import GATEWAY_IMPORT_PATH, read_app_config
from serve_app.privacy.configured import TransformKey, sweep_configs
from serve_app.privacy.exact import ExactOptions
from serve_app.privacy.examples import weak_targets
from serve_app.privacy.sample import read_sample
from serve_app.privacy.suite import ATTACKS, AttackResult, SuiteOptions

PROG = "serve-app-audit"
DESCRIPTION = ("Run the attack suite of an upstream that holds the model's weights, reads "
               "every byte sent, sees many requests and is also a client, on the prompt "
               "embeddings the configured transform leaves, and measure what the transform "
               "costs the answers (docs/privacy.md).")
_HEADER = ("                       ------------------ tokens recovered ----------------  "
           "------------ utility -------\n"
           "transform        sigma   worst  by attack                     L2  cosine   "
           "top-5   next-token  mean KL  greedy")


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


def _attacks(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected attacks among {', '.join(ATTACKS)}")
    return names


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
    parser.add_argument("--attacks", type=_attacks, metavar="NAMES",
                        help=f"comma-separated attacks (default: every one that applies): "
                        f"{', '.join(ATTACKS)}")
    parser.add_argument("--sightings", type=_positive, default=16,
                        help="sightings of each prompt the averaging attack sees "
                        "(default: %(default)s)")
    parser.add_argument("--known-rows", type=_positive, metavar="N",
                        help="known (clean, sent) rows the linear-map attack fits to "
                        "(default: twice the hidden size)")
    parser.add_argument("--candidates", type=_positive, default=32,
                        help="nearest rows the exact-arithmetic attack tests at a time "
                        "(default: %(default)s)")
    parser.add_argument("--weak-examples", action="store_true",
                        help="audit the reference weak transforms (none, float32 gaussian and "
                        "keyed noise at each sigma, a random rotation) instead of the "
                        "configured one")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object, or a list of them for a sweep or the "
                        "weak examples")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="draw recovery against next-token agreement into FILE (png)")


def _percent(value: float) -> str:
    return f"{value:7.1%}"


def render_table(results: Sequence[AuditResult], app: AppConfig, seed: int) -> str:
    """One line per transform with the worst attack's share and the six figures, after a
    line naming what was measured; then each transform's attacks, worst first, and the
    keyed checks' outcomes where there are any."""
    samples = results[0].samples
    lines = [f"{app.model.name}: {samples.source} sample, {samples.texts} texts, "
             f"{samples.rows} rows; greedy: {samples.greedy_prompts} prompts x "
             f"{samples.greedy_tokens} tokens; seed {seed}", _HEADER]
    for result in results:
        recovery, use = result.token_recovery, result.utility
        worst = "-" if recovery.worst is None else _percent(recovery.worst)
        lines.append(f"{_name(result):<22}{worst:>8}  {recovery.worst_attack or '-':<26}"
                     f"{_percent(recovery.l2)} {_percent(recovery.cosine)} "
                     f"{_percent(recovery.top5)}      {_percent(use.next_token_agreement)}"
                     f"  {use.mean_kl:7.4f} {_percent(use.greedy_match)}")
    for result in results:
        lines += ["", f"{_title(result)}: attacks, worst first"]
        lines += [f"  {name:<28}{_percent(attack.recovered)}  {_note(name, attack)}".rstrip()
                  for name, attack in result.attacks.items()]
    keyed = [_keyed_line(result) for result in results if result.keyed is not None]
    return "\n".join(lines + ([""] + keyed if keyed else []))


def _name(result: AuditResult) -> str:
    sigma = result.transform.get("sigma")
    return f"{result.transform['kind']:<14} {'-' if sigma is None else f'{sigma:g}':>7}"


def _title(result: AuditResult) -> str:
    sigma = result.transform.get("sigma")
    return result.transform["kind"] + ("" if sigma is None else f" sigma {sigma:g}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _note(name: str, attack: AttackResult) -> str:
    """What an attack spent or saw, in words."""
    d = attack.details
    if name == "nearest_row":
        return f"cosine {_share(d['cosine'])}, top-5 {_share(d['top5'])}"
    if name == "exact_arithmetic":
        spec = d["noise_spec"]
        source = "stated" if spec["stated"] else "assumed: the transform states none"
        return (f"true token consistent on {_share(d['true_token_consistent'])} of rows; "
                f"{d['consistent_candidates']:.1f} of {d['candidates']} nearest consistent; "
                f"{_share(d['checked_pairs'])} of pairs checked; {spec['dtype']} noise from "
                f"{spec['uniform_bits']}-bit uniforms, {spec['pairing']} ({source})")
    if name == "averaging":
        return f"{d['sightings']} sightings"
    if name == "linear_map":
        return (f"least squares {_share(d['least_squares'])}, Procrustes "
                f"{_share(d['procrustes'])}, from {d['known_rows']} known rows")
    if name.startswith("chosen_prefix"):
        per_token = d["queries_per_token"]
        spent = "no token matched" if per_token is None else f"{per_token:.1f} per token"
        return f"{d['queries']} queries, {spent}"
    if name == "sigma_reuse":
        a, b = d["sigmas"]
        return f"sigmas {a:g} and {b:g} under one key"
    return ""


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


def _options(args: argparse.Namespace, app: AppConfig) -> SuiteOptions:
    separate = app.auth.enabled and app.privacy.transform.tenant == "api_key"
    return SuiteOptions(attacks=args.attacks, sightings=args.sightings,
                        known_rows=args.known_rows,
                        exact=ExactOptions(candidates=args.candidates), seed=args.seed,
                        separate_tenants=separate)


def _measure_all(args: argparse.Namespace, app: AppConfig,
                 texts: list[str]) -> list[AuditResult]:
    """The configured transform, each of the sweep's, or the weak examples, measured on
    the sample."""
    configured = app.privacy.transform
    configs = sweep_configs(configured, args.sweep) if args.sweep else [configured]
    key = TransformKey.for_config(configs[0]) if configs[0].kind == "keyed_gaussian" else None
    if key is not None and key.ephemeral and not args.weak_examples:
        print(f"{PROG}: {configs[0].key_env} is unset: keyed_gaussian is measured with an "
              "ephemeral random key", file=sys.stderr)
    _quiet_transformers()
    model = AuditModel.load(app.model, args.device)
    clean = prepare(model, texts, args.prompts, str(args.text_file or "built-in"))
    options = _options(args, app)
    if args.weak_examples:
        sigmas = args.sweep or [configured.sigma]
        return [measure_target(model, clean, target, args.seed, options)
                for target in weak_targets(model.weight, sigmas, args.seed)]
    return [measure(model, clean, config, args.seed, key, options) for config in configs]


def _report(args: argparse.Namespace, app: AppConfig, results: list[AuditResult]) -> None:
    if args.plot:
        from serve_app.privacy.plot import plot_sweep

        samples = results[0].samples
        plot_sweep(results, args.plot, f"{app.model.name}: {results[0].transform['kind']} "
                   f"noise, {samples.source} sample ({samples.rows} rows)")
    if args.json:
        objects = [result.as_json() for result in results]
        several = args.sweep or args.weak_examples
        print(json.dumps(objects if several else objects[0], indent=2))
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
