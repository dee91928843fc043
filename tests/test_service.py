"""`kakeya service`: the LaunchAgent plist and the systemd user unit, generated into a temporary home.

The real launchctl / systemctl steps run only where those tools are present; elsewhere
those tests are skipped with the reason.
"""

import argparse
import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys

import pytest

from kakeya_client import service

SYSTEMD_SPECIAL = {"%%": "%", "$$": "$"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $HOME whose path has a space in it, as macOS's "Application Support" does."""
    home = tmp_path / "home dir"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (*service.CARRIED_ENV, "KAKEYA_SOCKET", service.PLATFORM_ENV):
        monkeypatch.delenv(name, raising=False)
    return home


def kakeya_service(*argv: str) -> int:
    """Parse `kakeya service ...` with the subcommand registered the way the CLI registers it, and run it."""
    parser = argparse.ArgumentParser(prog="kakeya")
    service.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", *argv])
    return args.func(args)


def daemon_arguments(model: str, socket: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kakeya_daemon", "--model", model, "--socket", socket, *extra]


def unit_words(value: str) -> list[str]:
    """Split an ExecStart= value the way systemd does for the quoting service.py writes."""
    for escaped, plain in SYSTEMD_SPECIAL.items():
        value = value.replace(escaped, plain)
    return shlex.split(value)


def read_unit(path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path, encoding="utf-8")
    return unit


def test_plist_says_what_the_daemon_needs(home, monkeypatch):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    socket = str(home / "Library" / "Application Support" / "kakeya" / "kakeya.sock")
    assert kakeya_service("install", "--no-load", "--model", "org/some-model", "--socket", socket,
                          "--extra-arg=--max-sessions=8", "--extra-arg=--log-level=debug") == 0

    path = home / "Library" / "LaunchAgents" / "ai.kakeya.mlx.plist"
    with open(path, "rb") as fh:
        plist = plistlib.load(fh)
    log_file = str(home / "Library" / "Logs" / "kakeya" / "ai.kakeya.mlx.log")

    assert plist["Label"] == "ai.kakeya.mlx"
    # The interpreter that ran install, by absolute path, then the daemon module and its flags in order.
    assert plist["ProgramArguments"] == daemon_arguments("org/some-model", socket, "--max-sessions=8", "--log-level=debug")
    assert os.path.isabs(plist["ProgramArguments"][0])
    assert plist["RunAtLoad"] is True
    # Restarted only after an unsuccessful exit; a requested stop (exit 0) stays stopped.
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] > 0
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 0
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log_file
    assert (home / "Library" / "Logs" / "kakeya").is_dir()
    assert plist["WorkingDirectory"] == str(home)
    assert plist["EnvironmentVariables"] == {"PATH": f"{os.path.dirname(sys.executable)}:{service.SYSTEM_PATH}"}
    # Every key is one of the above: nothing unexamined reaches launchd.
    assert set(plist) == {
        "Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "ThrottleInterval", "ExitTimeOut", "ProcessType",
        "StandardOutPath", "StandardErrorPath", "WorkingDirectory", "EnvironmentVariables",
    }


def test_install_defaults_to_the_bundled_model_and_the_platform_socket(home, monkeypatch, capsys):
    from kakeya_protocol import default_socket_path

    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    assert kakeya_service("install", "--dry-run") == 0
    plist = plistlib.loads(capsys.readouterr().out.encode("utf-8"))
    assert plist["ProgramArguments"] == daemon_arguments("smollm2", str(default_socket_path()))
    assert not (home / "Library").exists()  # a dry run writes nothing


def test_install_makes_model_and_socket_paths_absolute(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    (home / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(home)
    assert kakeya_service("install", "--dry-run", "--model", "models/tiny", "--socket", "run/k.sock") == 0
    arguments = plistlib.loads(capsys.readouterr().out.encode("utf-8"))["ProgramArguments"]
    assert arguments == daemon_arguments(str(home / "models" / "tiny"), str(home / "run" / "k.sock"))


def test_install_carries_where_models_and_config_live(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("KAKEYA_HOME", str(home / "kakeya-cache"))
    monkeypatch.setenv("KAKEYA_MAX_SESSIONS", "3")  # a setting, not a location: stays out
    assert kakeya_service("install", "--dry-run", "--socket", str(home / "s.sock")) == 0
    env = plistlib.loads(capsys.readouterr().out.encode("utf-8"))["EnvironmentVariables"]
    assert env == {
        "PATH": f"{os.path.dirname(sys.executable)}:{service.SYSTEM_PATH}",
        "HF_HOME": str(home / "hf"),
        "KAKEYA_HOME": str(home / "kakeya-cache"),
    }


@pytest.mark.parametrize("platform, relative", [
    ("launchd", "Library/LaunchAgents/ai.kakeya.mlx.plist"),
    ("systemd", ".config/systemd/user/kakeya.service"),
])
def test_reinstall_is_idempotent(home, monkeypatch, capsys, platform, relative):
    monkeypatch.setenv(service.PLATFORM_ENV, platform)
    argv = ("install", "--no-load", "--model", "m", "--socket", str(home / "k.sock"))
    assert kakeya_service(*argv) == 0
    path = home / relative
    first = path.read_bytes()
    assert kakeya_service(*argv) == 0
    assert path.read_bytes() == first
    assert "unchanged" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind
    # --dry-run prints exactly what install writes.
    assert kakeya_service(*argv[:1], "--dry-run", *argv[2:]) == 0
    assert capsys.readouterr().out.encode("utf-8") == first


def test_systemd_unit_says_the_same_in_systemd_terms(home, monkeypatch):
    monkeypatch.setenv(service.PLATFORM_ENV, "systemd")
    model = home / "models" / "50% tiny $HOME"  # specifier, variable and space must all survive quoting
    model.mkdir(parents=True)
    socket = str(home / "run" / "kakeya.sock")
    assert kakeya_service("install", "--no-load", "--model", str(model), "--socket", socket,
                          '--extra-arg=--log-level="debug"') == 0

    unit = read_unit(home / ".config" / "systemd" / "user" / "kakeya.service")
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Service"]["Type"] == "simple"
    assert unit_words(unit["Service"]["ExecStart"]) == daemon_arguments(str(model), socket, '--log-level="debug"')
    # Restart after failures only, with a pause, and give up after a burst of failed starts.
    assert unit["Service"]["Restart"] == "on-failure"
    assert int(unit["Service"]["RestartSec"]) > 0
    assert int(unit["Unit"]["StartLimitIntervalSec"]) > 0 and int(unit["Unit"]["StartLimitBurst"]) > 0
    assert int(unit["Service"]["TimeoutStopSec"]) > 0
    assert unit["Service"]["StandardOutput"] == unit["Service"]["StandardError"] == "journal"
    assert unit["Service"]["WorkingDirectory"].replace("%%", "%") == str(home)
    assert unit_words(unit["Service"]["Environment"]) == [f"PATH={os.path.dirname(sys.executable)}:{service.SYSTEM_PATH}"]
    assert unit["Install"]["WantedBy"] == "default.target"


def test_service_managers_own_checkers_accept_the_files(home, monkeypatch):
    """systemd-analyze verify and plutil -lint parse the files exactly as the managers will."""
    if shutil.which("systemd-analyze") is None and shutil.which("plutil") is None:
        pytest.skip("neither systemd-analyze nor plutil found: no systemd and not macOS")
    model = home / "models" / "50% tiny $HOME"
    model.mkdir(parents=True)
    argv = ("install", "--no-load", "--model", str(model), "--socket", str(home / "k.sock"), '--extra-arg=--x="y\\z"')
    if shutil.which("systemd-analyze"):
        monkeypatch.setenv(service.PLATFORM_ENV, "systemd")
        assert kakeya_service(*argv) == 0
        path = home / ".config" / "systemd" / "user" / "kakeya.service"
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", path.name], cwd=path.parent,
                              capture_output=True, text=True, timeout=60)
        complaints = [line for line in proc.stderr.splitlines() if "kakeya.service" in line]
        assert proc.returncode == 0 and complaints == [], proc.stderr
    if shutil.which("plutil"):
        monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
        assert kakeya_service(*argv) == 0
        path = home / "Library" / "LaunchAgents" / "ai.kakeya.mlx.plist"
        proc = subprocess.run(["plutil", "-lint", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_systemd_unit_goes_under_xdg_config_home(home, monkeypatch):
    monkeypatch.setenv(service.PLATFORM_ENV, "systemd")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "cfg"))
    assert kakeya_service("install", "--no-load", "--label", "kakeya-alt", "--socket", str(home / "k.sock")) == 0
    assert (home / "cfg" / "systemd" / "user" / "kakeya-alt.service").is_file()


@pytest.mark.parametrize("action", [("install",), ("uninstall",), ("status",), ("logs",), ("restart",)])
def test_without_a_service_manager_every_action_explains_what_to_run(home, monkeypatch, capsys, action):
    monkeypatch.setenv(service.PLATFORM_ENV, "none")
    assert kakeya_service(*action) == 1
    err = capsys.readouterr().err
    assert "no service manager" in err
    assert f"nohup {shlex.quote(sys.executable)} -m kakeya_daemon --model smollm2" in err
    assert "non-zero" in err
    assert not (home / "Library").exists() and not (home / ".config").exists()


def test_dry_run_without_a_service_manager_prints_what_it_would_write(home):
    """Through the `kakeya` command, as on a Linux without systemd."""
    env = {**os.environ, service.PLATFORM_ENV: "none"}
    argv = ["service", "install", "--dry-run", "--model", "m", "--socket", str(home / "k.sock")]
    cmd = [sys.executable, "-m", "kakeya_client", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout, proc.stderr
    assert "no service manager here" in err and "would write" in err
    arguments = daemon_arguments("m", str(home / "k.sock"))
    if sys.platform == "darwin":
        assert plistlib.loads(out.encode())["ProgramArguments"] == arguments
    else:
        assert out == service.render_unit(service.DEFAULT_UNIT, arguments, service.service_environment())
    assert not (home / "Library").exists() and not (home / ".config").exists()


def test_unknown_platform_override_is_named(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "upstart")
    assert kakeya_service("status") == 1
    assert f"{service.PLATFORM_ENV}='upstart': expected one of launchd, systemd, none" in capsys.readouterr().err


def test_bad_label_is_refused(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    assert kakeya_service("install", "--no-load", "--label", "../evil", "--socket", str(home / "k.sock")) == 1
    assert "--label '../evil'" in capsys.readouterr().err
    assert not (home / "Library" / "LaunchAgents").exists()


def test_missing_service_manager_tool_is_reported_with_the_command(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    monkeypatch.setenv("PATH", str(home))  # no launchctl anywhere on PATH
    assert kakeya_service("install", "--socket", str(home / "k.sock")) == 1
    err = capsys.readouterr().err
    assert f"kakeya service install: `launchctl print gui/{os.getuid()}/ai.kakeya.mlx` failed: launchctl not found" in err


def test_failed_command_message_has_command_exit_status_and_stderr():
    cmd = [sys.executable, "-c", "import sys; print('it broke', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(service.ServiceError) as info:
        service.run_command(cmd)
    assert str(info.value) == f"`{shlex.join(cmd)}` failed (exit 3): it broke"


def test_logs_prints_the_last_lines(home, monkeypatch, capsys):
    monkeypatch.setenv(service.PLATFORM_ENV, "launchd")
    log = home / "Library" / "Logs" / "kakeya" / "ai.kakeya.mlx.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert kakeya_service("logs", "-n", "3") == 0
    assert capsys.readouterr().out == "line 99997\nline 99998\nline 99999\n"
    assert kakeya_service("logs", "--label", "other") == 1
    assert "no log at" in capsys.readouterr().err


def test_service_module_pulls_in_no_mlx():
    code = "import sys, kakeya_client.service; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_service_install_dry_run(home):
    """Through the real `kakeya` entry point (kakeya_client.cli.main)."""
    env = {**os.environ, service.PLATFORM_ENV: "launchd"}
    argv = ["kakeya", "service", "install", "--dry-run", "--model", "m", "--socket", str(home / "k.sock")]
    code = f"import sys; sys.argv = {argv!r}; from kakeya_client.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert plistlib.loads(proc.stdout.encode("utf-8"))["ProgramArguments"] == daemon_arguments("m", str(home / "k.sock"))


# ---------------------------------------------------------------- real service managers


def test_real_launchctl_install_status_uninstall(home, monkeypatch, capsys):
    if shutil.which("launchctl") is None:
        pytest.skip("launchctl not found: not macOS")
    label = f"ai.kakeya.mlx.test-{os.getpid()}"
    target = f"gui/{os.getuid()}/{label}"
    # A model path that does not exist: the daemon exits non-zero at once, which is all this needs.
    argv = ("--label", label, "--model", str(home / "no-such-model"), "--socket", str(home / "k.sock"))
    try:
        assert kakeya_service("install", *argv) == 0
        assert subprocess.run(["launchctl", "print", target], capture_output=True).returncode == 0
        assert kakeya_service("install", *argv) == 0
        assert "already loaded" in capsys.readouterr().out
        kakeya_service("status", "--label", label)
        assert f"service: {label} (launchd" in capsys.readouterr().out
        assert kakeya_service("uninstall", "--label", label) == 0
        assert subprocess.run(["launchctl", "print", target], capture_output=True).returncode != 0
        assert not (home / "Library" / "LaunchAgents" / f"{label}.plist").exists()
    finally:
        subprocess.run(["launchctl", "bootout", target], capture_output=True)


def test_real_systemctl_install_status_uninstall(tmp_path, monkeypatch, capsys):
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl not found: no systemd here")
    probe = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"systemctl --user not reachable: no user systemd instance ({probe.stderr.strip()})")
    # The user manager reads units only from the real home, so this uses it, under a name of its own.
    monkeypatch.setenv(service.PLATFORM_ENV, "systemd")
    name = f"kakeya-test-{os.getpid()}"
    unit = f"{name}.service"
    argv = ("--label", name, "--model", str(tmp_path / "no-such-model"), "--socket", str(tmp_path / "k.sock"))

    def show(prop: str) -> str:
        out = subprocess.run(["systemctl", "--user", "show", unit, f"--property={prop}"], capture_output=True, text=True)
        return out.stdout.strip().partition("=")[2]

    try:
        assert kakeya_service("install", *argv) == 0
        assert show("LoadState") == "loaded" and show("UnitFileState") == "enabled"
        assert kakeya_service("install", *argv) == 0
        kakeya_service("status", "--label", name)
        assert "LoadState: loaded" in capsys.readouterr().out
        assert kakeya_service("uninstall", "--label", name) == 0
        assert show("LoadState") == "not-found"
        assert not service.unit_path(name).exists()
    finally:
        subprocess.run(["systemctl", "--user", "disable", "--now", unit], capture_output=True)
        service.unit_path(name).unlink(missing_ok=True)
        subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True)
