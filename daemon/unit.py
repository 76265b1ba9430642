"""The systemd unit of `a3x run`, written from the configuration by `a3x service install`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from daemon.config import Config

UNIT_NAME = "a3x.service"

UNIT_TEMPLATE = """\
# Written by `a3x service install`; edit and run `systemctl{scope} daemon-reload` to change it.
[Unit]
Description=A3X local agent: scheduled cycles on a local GGUF model
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} run
ExecReload=/bin/kill -HUP $MAINPID
Environment=A3X_HOME={home}
Environment=PYTHONUNBUFFERED=1
{config_line}{private_users}Restart=on-failure
RestartSec=30
# The main loop pings the watchdog at half this timeout.
WatchdogSec=120
TimeoutStopSec=60
MemoryMax={memory_max}
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
# The home and the model cache must exist before the first start (install creates them).
ReadWritePaths=-{home} -{cache}{runtime}
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectControlGroups=true
RestrictSUIDSGID=true
LockPersonality=true
RestrictRealtime=true
RestrictAddressFamilies=AF_UNIX
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy={wanted_by}
"""


def render_unit(config: Config, user: bool, executable: Path | None = None) -> str:
    executable = executable or Path(shutil.which("a3x") or sys.argv[0]).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "a3x"
    config_line = f"Environment=A3X_CONFIG={config.source}\n" if config.source else ""
    return UNIT_TEMPLATE.format(
        scope=" --user" if user else "",
        exec_start=executable,
        home=config.home,
        cache=cache,
        config_line=config_line,
        memory_max=f"{config.service.memory_max_mb}M",
        # A user service puts its control socket in the runtime folder (%t), and user
        # managers apply the namespacing options above only with PrivateUsers.
        runtime=" %t" if user else "",
        private_users="PrivateUsers=true\n" if user else "",
        wanted_by="default.target" if user else "multi-user.target",
    )


def install_unit(config: Config, user: bool, output: Path | None = None) -> Path:
    """Write the unit; without `output`, also reload systemd and enable the service."""
    from daemon.home import prepare_home

    user = user or os.geteuid() != 0
    text = render_unit(config, user)
    if output is not None:
        output.write_text(text)
        return output
    prepare_home(config.home)
    (Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "a3x").mkdir(
        parents=True, exist_ok=True
    )
    folder = Path("~/.config/systemd/user").expanduser() if user else Path("/etc/systemd/system")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / UNIT_NAME
    path.write_text(text)
    scope = ["--user"] if user else []
    for command in (["daemon-reload"], ["enable", UNIT_NAME]):
        subprocess.run(["systemctl", *scope, *command], check=True)
    return path
