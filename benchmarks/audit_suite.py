"""What the audit's attack suite costs on the demo model: seconds per attack (wall and this
process's CPU) for each reference weak transform at one sigma, on the built-in sample.

    python benchmarks/audit_suite.py [--sigma 4] [--out DIR]

Needs the demo model (built on first use, no network) and no Ray. The target: the whole
suite on the built-in sample (574 rows) at one sigma well under a minute on two CPU cores.
Writes `audit_suite.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from serve_app.config import ModelConfig
from serve_app.privacy.audit import AuditModel, prepare
from serve_app.privacy.examples import weak_targets
from serve_app.privacy.sample import BUILT_IN_SAMPLE
from serve_app.privacy.suite import ATTACKS, SuiteOptions, Victim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    model = AuditModel.load(ModelConfig())
    clean = prepare(model, BUILT_IN_SAMPLE, greedy_prompts=8)
    lines = [f"# The audit's attack suite on the demo model, sigma {args.sigma:g}", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; built-in sample, "
             f"{clean.samples.rows} rows.", "",
             "| transform | attack | recovered | wall s | CPU s |", "|---|---|---|---|---|"]
    for target in weak_targets(model.weight, [args.sigma]):
        torch.manual_seed(0)
        victim = Victim.send(target, clean.prompts)
        total_wall = total_cpu = 0.0
        for name, attack in ATTACKS.items():
            if not attack.applies(victim):
                continue
            torch.manual_seed(0)
            wall, cpu = time.perf_counter(), time.process_time()
            result = attack.run(victim, SuiteOptions())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            total_wall, total_cpu = total_wall + wall, total_cpu + cpu
            lines.append(f"| {target.kind} | {name} | {result.recovered:.1%} | {wall:.2f} | "
                         f"{cpu:.2f} |")
        lines.append(f"| {target.kind} | **all** | | **{total_wall:.2f}** | "
                     f"**{total_cpu:.2f}** |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
