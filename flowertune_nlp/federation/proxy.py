"""The Fleet-only TLS reverse proxy (nginx) in front of a loopback-only SuperLink.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run/ls`, `flwr supernode
register`) and the Runtime API (ServerApps) on one port, as protobuf over HTTP/1.1, and does not
authenticate Control or Runtime callers. So the SuperLink listens on 127.0.0.1 and nginx, on the
public port, forwards only `POST /v1/fleet/<method>` (nginx/fleet-proxy.conf says where in
Flower's source each prefix is). nginx rather than Caddy or HAProxy: Debian 12 ships it as a
plain package (`apt-get install nginx`), it re-encrypts to the loopback SuperLink while checking
its certificate against our CA, and one regex on the raw request line pins the exact path the
SuperLink will route, with no automatic-HTTPS or admin endpoint of its own to switch off.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from pathlib import Path

from flowertune_nlp.federation.processes import FederationError

TEMPLATES = Path(__file__).with_name("nginx")
SITE_TEMPLATE = TEMPLATES / "fleet-proxy.conf"
MAIN_TEMPLATE = TEMPLATES / "loopback-main.conf"
FLEET_PREFIX = "/v1/fleet/"
INSTALL_HINT = "install it with `apt-get install nginx` (Debian/Ubuntu)"
# nginx lives in /usr/sbin, which is not on every user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
_FIELD = re.compile(r"\$\{([a-z_]+)\}")
_UNSAFE = re.compile(r'["\\;{}$\s]')


def find_nginx() -> str:
    """The nginx binary; FederationError naming the package when it is not installed."""
    found = shutil.which("nginx", path=SEARCH_PATH)
    if found is None:
        raise FederationError(f"nginx is not installed; the Fleet proxy needs it: {INSTALL_HINT}")
    return found


def _fill(template: Path, values: dict[str, str]) -> str:
    """`template` with every ${field} replaced; a missing field or a value that could break
    nginx's syntax (quote, backslash, ';', braces, '$', whitespace) is a ValueError."""
    for name, value in values.items():
        if name != "user_line" and _UNSAFE.search(value):
            raise ValueError(f"{name} {value!r}: nginx paths and addresses may not contain "
                             "spaces, quotes, backslashes, ';', '{', '}' or '$'")

    def field(match: re.Match) -> str:
        if match[1] not in values:
            raise ValueError(f"{template.name}: no value for ${{{match[1]}}}")
        return values[match[1]]

    return _FIELD.sub(field, template.read_text())


def render_site(listen: str, superlink: str, certificate: Path, certificate_key: Path,
                superlink_ca: Path, superlink_name: str = "localhost") -> str:
    """The nginx `server` block: TLS with `certificate` on `listen` (e.g. 0.0.0.0:8000),
    forwarding the Fleet API to the SuperLink at `superlink` (a loopback host:port), whose
    certificate must be signed by `superlink_ca` and name `superlink_name`."""
    return _fill(SITE_TEMPLATE, {
        "listen": listen, "superlink": superlink, "certificate": str(Path(certificate).resolve()),
        "certificate_key": str(Path(certificate_key).resolve()),
        "superlink_ca": str(Path(superlink_ca).resolve()), "superlink_name": superlink_name})


def render_loopback_main(directory: Path, site: Path, error_log: Path, access_log: Path) -> str:
    """The main configuration of a foreground nginx whose files all stay in `directory`."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return _fill(MAIN_TEMPLATE, {"user_line": user, "directory": str(directory),
                                 "site": str(site), "error_log": str(error_log),
                                 "access_log": str(access_log)})
