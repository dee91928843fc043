"""`kakeya service`: run the daemon in the background under launchd (macOS) or systemd (Linux).

The service files come from the templates shipped in kakeya_client/templates/
(ai.kakeya.mlx.plist and kakeya.service), filled in at install time with the
absolute path of the running interpreter and the daemon's arguments.
Standard library only: the client package never imports MLX.

Over 400 lines because two service managers (launchd and systemd --user) each need
install, uninstall, status and a dry run, and they share the argument handling here.
"""

import argparse
import importlib.util
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

DEFAULT_LABEL = "ai.kakeya.mlx"
DEFAULT_UNIT = "kakeya"
# The daemon's bundled default model and the name it is served under (kakeya_mlx.locate's
# DEFAULT_MODEL and DEFAULT_MODEL_NAME, spelled out: the client does not depend on the engine).
DEFAULT_MODEL, DEFAULT_MODEL_NAME = "smollm2", "SmolLM2-135M-Instruct"
PLATFORMS = ("launchd", "systemd", "none")
PLATFORM_ENV = "KAKEYA_SERVICE_PLATFORM"
PLIST_TEMPLATE = "ai.kakeya.mlx.plist"
UNIT_TEMPLATE = "kakeya.service"
# launchd and systemd start the daemon without the login shell's environment; these say
# where its models, caches and config live, so they are carried over when set at install time.
CARRIED_ENV = ("KAKEYA_HOME", "KAKEYA_CONFIG", "HF_HOME", "HF_HUB_CACHE", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
COMMAND_TIMEOUT_S = 60.0

_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PLACEHOLDER_RE = re.compile(r"\$\{([A-Z_]+)\}")
_PLAIN_WORD_RE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


class ServiceError(Exception):
    """A service step failed; the message says which and why."""


# ---------------------------------------------------------------- commands


def run_command(cmd: list[str], *, check: bool = True, capture: bool = True, hint: str = "") -> subprocess.CompletedProcess:
    """Run one service-manager command. Every failure raises ServiceError naming the command and its stderr."""
    try:
        proc = subprocess.run(cmd, capture_output=capture, text=True, timeout=COMMAND_TIMEOUT_S if capture else None)
    except FileNotFoundError:
        raise ServiceError(f"`{shlex.join(cmd)}` failed: {cmd[0]} not found{hint}") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(cmd)}` did not finish within {COMMAND_TIMEOUT_S:g} s{hint}") from None
    if check and proc.returncode != 0:
        detail = ((proc.stderr or "").strip() or (proc.stdout or "").strip()) if capture else ""
        raise ServiceError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode})" + (f": {detail}" if detail else "") + hint)
    return proc


def detect_platform() -> tuple[str, str]:
    """("launchd" | "systemd" | "none", why none). KAKEYA_SERVICE_PLATFORM forces the choice."""
    forced = os.environ.get(PLATFORM_ENV)
    if forced:
        if forced not in PLATFORMS:
            raise ServiceError(f"{PLATFORM_ENV}={forced!r}: expected one of {', '.join(PLATFORMS)}")
        return forced, f"{PLATFORM_ENV}={forced} was set"
    if sys.platform == "darwin":
        return "launchd", ""
    if shutil.which("systemctl") is None:
        return "none", "launchctl is macOS-only and systemctl was not found (this system does not run systemd)"
    proc = run_command(["systemctl", "--user", "show-environment"], check=False)
    if proc.returncode != 0:
        why = proc.stderr.strip() or f"exit {proc.returncode}"
        return "none", (
            f"`systemctl --user` cannot reach a user instance of systemd ({why}); it runs in a login session "
            "that starts `systemd --user`, or always after `loginctl enable-linger $USER`"
        )
    return "systemd", ""


# ---------------------------------------------------------------- what gets installed


def program_arguments(model: str, socket: str, extra: list[str]) -> list[str]:
    """The daemon's command line: this interpreter's absolute path, -m kakeya_daemon, then its flags."""
    if not sys.executable:
        raise ServiceError("cannot tell which Python interpreter is running (sys.executable is empty)")
    if importlib.util.find_spec("kakeya_daemon") is None:
        raise ServiceError(f"the daemon (package kakeya_daemon) is not installed for {sys.executable}; install kakeya-mlx there")
    # A model given as a relative path must still resolve when the service starts elsewhere.
    candidate = Path(model).expanduser()
    if model != DEFAULT_MODEL and candidate.exists():
        model = str(candidate.absolute())
    return [sys.executable, "-m", "kakeya_daemon", "--model", model, "--socket", socket, *extra]


def service_environment() -> dict[str, str]:
    """PATH (this environment's bin folder first) plus the CARRIED_ENV variables that are set."""
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{SYSTEM_PATH}"}
    env.update({name: os.environ[name] for name in CARRIED_ENV if os.environ.get(name)})
    return env


def plist_path(label: str) -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{label}.plist"


def log_path(label: str) -> Path:
    return Path.home() / "Library" / "Logs" / "kakeya" / f"{label}.log"


def unit_path(name: str) -> Path:
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "systemd" / "user" / f"{name}.service"


def render_plist(label: str, arguments: list[str], environment: dict[str, str]) -> bytes:
    """The LaunchAgent plist: the template with its placeholders filled."""
    values = {
        "LABEL": label,
        "PROGRAM_ARGUMENTS": arguments,
        "WORKING_DIRECTORY": str(Path.home()),
        "ENVIRONMENT": environment,
        "LOG_FILE": str(log_path(label)),
    }
    template = plistlib.loads(_template(PLIST_TEMPLATE).encode("utf-8"))
    return plistlib.dumps(_fill(template, values), sort_keys=False)


def render_unit(name: str, arguments: list[str], environment: dict[str, str]) -> str:
    """The systemd user unit: the template with its placeholders filled, quoted the way systemd reads them."""
    values = {
        "EXEC_START": " ".join(systemd_quote(a, command_line=True) for a in arguments),
        "WORKING_DIRECTORY": _systemd_value(str(Path.home())),
        "ENVIRONMENT": " ".join(systemd_quote(f"{k}={v}") for k, v in environment.items()),
        "UNIT": f"{name}.service",
    }
    return _substitute(_template(UNIT_TEMPLATE), values)


def systemd_quote(word: str, command_line: bool = False) -> str:
    """One word for a unit file, double-quoted unless plainly safe; `%` (specifiers) and, on command lines,
    `$` (variables) doubled."""
    value = _systemd_value(word)
    if not _PLAIN_WORD_RE.fullmatch(value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value.replace("$", "$$") if command_line else value


def _systemd_value(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ServiceError(f"{text!r}: a systemd unit cannot hold a line break in a value")
    return text.replace("%", "%%")


def _template(name: str) -> str:
    return (resources.files("kakeya_client") / "templates" / name).read_text(encoding="utf-8")


def _substitute(text: str, values: dict[str, Any]) -> str:
    def one(match: re.Match) -> str:
        if match.group(1) not in values:
            raise ServiceError(f"service template names an unknown placeholder {match.group(0)}")
        return str(values[match.group(1)])

    return _PLACEHOLDER_RE.sub(one, text)


def _fill(node: Any, values: dict[str, Any]) -> Any:
    """Fill placeholders in a parsed plist; a string that is exactly one placeholder takes the value's own type."""
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(value, values) for value in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER_RE.fullmatch(node)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return _substitute(node, values)
    return node


def write_atomic(path: Path, data: bytes) -> bool:
    """Write data to path through a temporary file and a rename; False (and nothing written) when it is already there."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _no_manager(reason: str, arguments: list[str]) -> int:
    print(
        f"kakeya service: no service manager to install into: {reason}.\n"
        "Run the daemon under your own supervision instead, for example:\n"
        f"  nohup {shlex.join(arguments)} >> ~/kakeya.log 2>&1 &\n"
        "or give that command to the supervisor you use (supervisord, runit, s6, a container's init).\n"
        "It exits 0 when asked to stop and non-zero when it cannot run: restart it only after a\n"
        "non-zero exit, and wait about 10 seconds between attempts.",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------- launchd


def _gui_domain() -> str:
    return f"gui/{os.getuid()}"


def _launchd_loaded(target: str) -> bool:
    return run_command(["launchctl", "print", target], check=False).returncode == 0


def _launchd_bootout(target: str) -> None:
    run_command(["launchctl", "bootout", target])
    # bootout returns before the job is fully gone; bootstrapping too soon fails with EIO.
    deadline = time.monotonic() + 10.0
    while _launchd_loaded(target) and time.monotonic() < deadline:
        time.sleep(0.2)


def _launchd_bootstrap(label: str, path: Path) -> None:
    run_command(["launchctl", "enable", f"{_gui_domain()}/{label}"])  # undo an earlier `launchctl disable`
    run_command(
        ["launchctl", "bootstrap", _gui_domain(), str(path)],
        hint=f" ({_gui_domain()} exists only while you are logged in to the desktop; over ssh, log in at the Mac first)",
    )


def launchd_install(label: str, arguments: list[str], dry_run: bool, load: bool) -> int:
    path = plist_path(label)
    data = render_plist(label, arguments, service_environment())
    if dry_run:
        print(f"# would write {path}", file=sys.stderr)
        sys.stdout.write(data.decode("utf-8"))
        return 0
    log_path(label).parent.mkdir(parents=True, exist_ok=True)
    changed = write_atomic(path, data)
    print(f"{'wrote' if changed else 'unchanged'} {path}")
    print(f"logs: {log_path(label)}")
    target = f"{_gui_domain()}/{label}"
    if not load:
        print(f"not loaded; load it with: launchctl bootstrap {_gui_domain()} {shlex.quote(str(path))}")
        return 0
    loaded = _launchd_loaded(target)
    if loaded and not changed:
        print(f"{label} is already loaded with this configuration")
        return 0
    if loaded:
        _launchd_bootout(target)
    _launchd_bootstrap(label, path)
    print(f"loaded {label} into {_gui_domain()}; it starts now and at every login")
    return 0


def launchd_uninstall(label: str) -> int:
    path, target = plist_path(label), f"{_gui_domain()}/{label}"
    loaded = _launchd_loaded(target)
    if not loaded and not path.exists():
        print(f"{label} is not installed")
        return 0
    if loaded:
        _launchd_bootout(target)
        print(f"unloaded {label}")
    if path.exists():
        path.unlink()
        print(f"removed {path}")
    print(f"logs kept in {log_path(label).parent}")
    return 0


def launchd_status(label: str) -> tuple[bool, Optional[str]]:
    """Print launchd's view; (running, socket the installed plist serves)."""
    path, target = plist_path(label), f"{_gui_domain()}/{label}"
    socket = _socket_argument(plistlib.loads(path.read_bytes()).get("ProgramArguments", [])) if path.is_file() else None
    print(f"service: {label} (launchd, {_gui_domain()})")
    print(f"  plist: {path}{'' if path.is_file() else ' (missing)'}")
    proc = run_command(["launchctl", "print", target], check=False)
    if proc.returncode != 0:
        print("  state: not loaded")
        return False, socket
    # Top-level "key = value" lines of `launchctl print` (nested blocks are indented further).
    fields = dict(re.findall(r"^\t([a-z][a-z ]*?) = (.*)$", proc.stdout, re.MULTILINE))
    for key in ("state", "pid", "runs", "last exit code"):
        if key in fields:
            print(f"  {key}: {fields[key]}")
    print(f"  log: {log_path(label)}")
    return fields.get("state") == "running", socket


def launchd_restart(label: str) -> int:
    path, target = plist_path(label), f"{_gui_domain()}/{label}"
    if not path.is_file():
        raise ServiceError(f"{label} is not installed ({path} is missing); run `kakeya service install`")
    if _launchd_loaded(target):
        run_command(["launchctl", "kickstart", "-k", target])
        print(f"restarted {label}")
    else:
        _launchd_bootstrap(label, path)
        print(f"{label} was not loaded; loaded it")
    return 0


# ---------------------------------------------------------------- systemd


def _systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_command(["systemctl", "--user", *args], check=check)


def systemd_install(name: str, arguments: list[str], dry_run: bool, load: bool) -> int:
    path, unit = unit_path(name), f"{name}.service"
    text = render_unit(name, arguments, service_environment())
    if dry_run:
        print(f"# would write {path}", file=sys.stderr)
        sys.stdout.write(text)
        return 0
    changed = write_atomic(path, text.encode("utf-8"))
    print(f"{'wrote' if changed else 'unchanged'} {path}")
    print(f"logs: journalctl --user -u {unit}")
    if not load:
        print(f"not loaded; load it with: systemctl --user daemon-reload && systemctl --user enable --now {unit}")
        return 0
    if changed:
        _systemctl("daemon-reload")
    _systemctl("enable", unit)
    _systemctl("reset-failed", unit, check=False)  # clears a start limit hit earlier
    # restart applies a changed unit to a running daemon; start is a no-op for one already running.
    _systemctl("restart" if changed else "start", unit)
    print(f"enabled and started {unit}; it starts at every login")
    return 0


def systemd_uninstall(name: str) -> int:
    path, unit = unit_path(name), f"{name}.service"
    if not path.exists():
        print(f"{unit} is not installed")
        return 0
    _systemctl("disable", "--now", unit)
    path.unlink()
    print(f"stopped, disabled and removed {path}")
    _systemctl("daemon-reload")
    _systemctl("reset-failed", unit, check=False)
    return 0


def systemd_status(name: str) -> tuple[bool, Optional[str]]:
    """Print systemd's view; (running, socket the installed unit serves)."""
    path, unit = unit_path(name), f"{name}.service"
    socket = None
    if path.is_file():
        exec_start = re.search(r"^ExecStart=(.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
        if exec_start:
            socket = _socket_argument(shlex.split(exec_start.group(1).replace("%%", "%").replace("$$", "$")))
    print(f"service: {unit} (systemd --user)")
    print(f"  unit: {path}{'' if path.is_file() else ' (missing)'}")
    keys = ("LoadState", "UnitFileState", "ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainStatus")
    proc = _systemctl("show", unit, "--property=" + ",".join(keys))
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for key in keys:
        if key in fields:
            print(f"  {key}: {fields[key]}")
    print(f"  logs: journalctl --user -u {unit}")
    return fields.get("ActiveState") == "active", socket


def systemd_restart(name: str) -> int:
    path, unit = unit_path(name), f"{name}.service"
    if not path.is_file():
        raise ServiceError(f"{unit} is not installed ({path} is missing); run `kakeya service install`")
    _systemctl("reset-failed", unit, check=False)
    _systemctl("restart", unit)
    print(f"restarted {unit}")
    return 0


# ---------------------------------------------------------------- daemon's own view


def _socket_argument(arguments: list[str]) -> Optional[str]:
    for flag, value in zip(arguments, arguments[1:]):
        if flag == "--socket":
            return value
    return None


def _default_socket() -> str:
    from kakeya_protocol import default_socket_path

    return str(default_socket_path())


def print_daemon_stats(socket: str) -> bool:
    """Print the daemon's own `stats`; False when it cannot be reached."""
    try:
        from kakeya_client import Client

        client = Client(socket)
        try:
            stats = client.stats()
        finally:
            client.close()
    except Exception as exc:  # any failure here means "no answer"; say which
        print(f"daemon: not reachable at {socket}: {type(exc).__name__}: {exc}")
        return False
    sessions, generations = stats.get("sessions", {}), stats.get("generations", {})
    tokens, memory = stats.get("tokens", {}), stats.get("memory", {})
    print(f"daemon: answering at {socket}")
    print(f"  model: {stats.get('model')}, up {_duration(stats.get('uptime_s', 0))}")
    print(f"  sessions: {sessions.get('active')} of {sessions.get('max')}, connections: {stats.get('connections')}")
    print(f"  generations: {generations.get('active')} running, {generations.get('queued')} queued, {generations.get('total')} done")
    print(f"  tokens: {tokens.get('in')} in, {tokens.get('out')} out")
    budget = memory.get("budget_bytes")
    print(f"  memory: {_mib(memory.get('active_bytes'))} active, budget {_mib(budget) if budget else 'none'}")
    return True


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _mib(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def tail(path: Path, lines: int, follow: bool) -> None:
    """Print the last `lines` lines of path; with follow, keep printing what is appended until interrupted."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        start, data = end, b""
        while start > 0 and data.count(b"\n") <= lines:
            start = max(0, start - 65536)
            fh.seek(start)
            data = fh.read(end - start)
        shown = data.splitlines(keepends=True)[-lines:] if lines > 0 else []
        out = sys.stdout
        out.write(b"".join(shown).decode("utf-8", "replace"))
        out.flush()
        fh.seek(end)
        while follow:
            chunk = fh.read()
            if chunk:
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
                continue
            if os.stat(path).st_size < fh.tell():  # truncated or rotated in place: start over
                fh.seek(0)
            time.sleep(0.5)


# ---------------------------------------------------------------- argparse entry points


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ServiceError as exc:
            print(f"kakeya service {args.action}: {exc}", file=sys.stderr)
            return 1

    return run


def _name(args: argparse.Namespace, platform: str) -> str:
    name = args.label or (DEFAULT_LABEL if platform == "launchd" else DEFAULT_UNIT)
    if not _LABEL_RE.fullmatch(name):
        raise ServiceError(f"--label {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _default_arguments() -> list[str]:
    return program_arguments(DEFAULT_MODEL, _default_socket(), [])


@_command
def install(args: argparse.Namespace) -> int:
    platform, reason = detect_platform()
    socket = os.path.abspath(os.path.expanduser(args.socket)) if args.socket else _default_socket()
    arguments = program_arguments(args.model, socket, args.extra_arg or [])
    if platform == "none" and args.dry_run:
        # Nothing is written: show what would be, for the manager this OS usually runs.
        platform = "launchd" if sys.platform == "darwin" else "systemd"
        print(f"# no service manager here ({reason}); on a system running {platform}:", file=sys.stderr)
    if platform == "none":
        return _no_manager(reason, arguments)
    do = launchd_install if platform == "launchd" else systemd_install
    return do(_name(args, platform), arguments, args.dry_run, not args.no_load)


@_command
def uninstall(args: argparse.Namespace) -> int:
    platform, reason = detect_platform()
    if platform == "none":
        return _no_manager(reason, _default_arguments())
    return (launchd_uninstall if platform == "launchd" else systemd_uninstall)(_name(args, platform))


@_command
def status(args: argparse.Namespace) -> int:
    platform, reason = detect_platform()
    if platform == "none":
        return _no_manager(reason, _default_arguments())
    running, socket = (launchd_status if platform == "launchd" else systemd_status)(_name(args, platform))
    answered = print_daemon_stats(args.socket or socket or _default_socket())
    return 0 if running and answered else 1


@_command
def logs(args: argparse.Namespace) -> int:
    platform, reason = detect_platform()
    if platform == "none":
        return _no_manager(reason, _default_arguments())
    name = _name(args, platform)
    try:
        if platform == "systemd":
            cmd = ["journalctl", "--user", "-u", f"{name}.service", "-n", str(args.lines), "--no-pager"]
            run_command(cmd + (["-f"] if args.follow else []), capture=False)
            return 0
        path = log_path(name)
        if not path.is_file():
            raise ServiceError(f"no log at {path} yet: the service has not run, or it is not installed")
        tail(path, args.lines, args.follow)
    except KeyboardInterrupt:
        pass
    return 0


@_command
def restart(args: argparse.Namespace) -> int:
    platform, reason = detect_platform()
    if platform == "none":
        return _no_manager(reason, _default_arguments())
    return (launchd_restart if platform == "launchd" else systemd_restart)(_name(args, platform))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `kakeya service install | uninstall | status | logs | restart`; each sets `func(args) -> exit code`."""
    service = subparsers.add_parser(
        "service",
        help="run the daemon in the background (launchd on macOS, systemd --user on Linux)",
        description=(
            "Install the daemon as a per-user background service: a LaunchAgent on macOS, a systemd user unit "
            "on Linux. It starts at login and is restarted after a failure, never after a requested stop. "
            f"Set {PLATFORM_ENV}=launchd|systemd|none to choose the service manager yourself."
        ),
    )
    actions = service.add_subparsers(dest="action", metavar="ACTION", required=True)
    label_help = f"LaunchAgent label (default {DEFAULT_LABEL}) or systemd unit name (default {DEFAULT_UNIT})"

    p = actions.add_parser("install", help="write the service file and start it; running it again changes nothing")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model the daemon serves (default: {DEFAULT_MODEL}, the bundled default)")
    p.add_argument("--socket", help="Unix socket path (default: the platform's socket path)")
    p.add_argument("--label", help=label_help)
    p.add_argument(
        "--extra-arg",
        action="append",
        metavar="ARG",
        help="one more argument for `kakeya serve`, repeatable; write flags as --extra-arg=--max-sessions=8",
    )
    p.add_argument("--dry-run", action="store_true", help="print the service file instead of writing it")
    p.add_argument("--no-load", action="store_true", help="write the service file but do not load or start it")
    p.set_defaults(func=install)

    p = actions.add_parser("uninstall", help="stop the service and remove its file (logs are kept)")
    p.add_argument("--label", help=label_help)
    p.set_defaults(func=uninstall)

    p = actions.add_parser("status", help="the service manager's view and the daemon's own stats (exit 0 when both are fine)")
    p.add_argument("--label", help=label_help)
    p.add_argument("--socket", help="ask the daemon here (default: the socket the installed service serves)")
    p.set_defaults(func=status)

    p = actions.add_parser("logs", help="the daemon's recent log lines")
    p.add_argument("--label", help=label_help)
    p.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    p.set_defaults(func=logs)

    p = actions.add_parser("restart", help="restart the daemon (loads the service if it was not loaded)")
    p.add_argument("--label", help=label_help)
    p.set_defaults(func=restart)
