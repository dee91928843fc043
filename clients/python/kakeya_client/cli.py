"""The `kakeya` command: serve, run, chat, generate, status, sessions, stop, service.

Exit codes: 0 ok, 1 the daemon reported an error (or timed out), 2 usage error,
3 no daemon reachable, 130 interrupted. Every failure is one line on stderr.

Over 400 lines because it holds every command's parser and short body together, so
one file shows the whole command; the larger pieces live beside it: which daemon
`run` uses (daemons.py), the service (service.py), the prefill spinner (progress.py).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from typing import Optional

from kakeya_protocol import SOCKET_ENV, default_socket_path
from kakeya_protocol import params as rules

from . import daemons
from .client import Client, GenerateStream, Session
from .daemons import STOP_WAIT_S
from .errors import ConnectionFailed, KakeyaError
from .events import DoneEvent, TokensEvent
from .progress import Spinner
from .service import add_parser as add_service_parser
from .wire import CLIENT_VERSION

EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_INTERRUPTED = 1, 2, 3, 130
# The CLI waits longer than the library default: a long prompt's prefill on a big model takes a while.
DEFAULT_TIMEOUT_S = 300.0
SAMPLING_KEYS = ("max_tokens", *rules.SAMPLING_NAMES, "stop")


class UsageError(Exception):
    """The command line asks for something impossible; exit code 2."""


# ---- parser ----------------------------------------------------------------


def _timeout_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"longest wait for each reply or streamed event (default: {DEFAULT_TIMEOUT_S:g})",
    )
    return parent


def _client_options(timeout: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False, parents=[timeout])
    parent.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's Unix socket (default: ${SOCKET_ENV} or {default_socket_path()})",
    )
    return parent


def _sampling_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "generation",
        description=(
            "Left out, a setting takes the model's own default (its generation_config.json), else the daemon's: "
            + ", ".join(f"{name.replace('_', '-')} {value:g}" for name, value in rules.DEFAULT_SAMPLING.items())
            + " (`kakeya status` shows those in force). --temperature 0 decodes greedily, with only the settings "
            "given here."
        ),
    )
    add = group.add_argument
    add("--max-tokens", type=int, metavar="N", help="most tokens to generate (default: the daemon's, 256)")
    add("--temperature", type=float, metavar="T", help="sampling temperature; 0 is greedy")
    add("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1]; 1 is off")
    add("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens; 0 is off")
    add("--min-p", type=float, metavar="P", help="drop tokens below P x the likeliest one's probability; 0 is off")
    add("--repetition-penalty", type=float, metavar="X", help="penalize recently seen tokens; 1 is off")
    add("--frequency-penalty", type=float, metavar="X", help="lower a token per time this reply used it; 0 is off")
    add("--presence-penalty", type=float, metavar="X", help="lower every token this reply used; 0 is off")
    add("--seed", type=int, metavar="N", help="seed for sampling, for reproducible output")
    add("--stop", action="append", metavar="TEXT", help="stop when TEXT appears (it is not printed); repeatable")
    return parent


def _prompt_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("prompt", nargs="?", help="the prompt; read from stdin when omitted or '-'")
    add("--chat", action="store_true", help="send the prompt as a user message, in the model's chat template")
    add("--system", metavar="TEXT", help="system message (implies --chat)")
    add("--json", action="store_true", help="print one JSON object with the text and the done statistics at the end")
    add("--json-schema", metavar="FILE", help="make the reply JSON valid against the JSON Schema in FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kakeya",
        description=(
            "Talk to the kakeya daemon: a local LLM server that keeps each conversation's KV cache resident, "
            "so a new turn costs only its new tokens."
        ),
        epilog=(
            "Run `kakeya COMMAND --help` for a command's options. "
            "Exit codes: 0 ok, 1 daemon error, 2 usage error, 3 no daemon, 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kakeya {CLIENT_VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    timeout, sampling = _timeout_option(), _sampling_options()
    client = _client_options(timeout)

    p = commands.add_parser(
        "serve",
        add_help=False,  # `kakeya serve --help` shows the daemon's own help
        help="run the daemon in the foreground (see `kakeya serve --help`)",
        description="Run the daemon in the foreground; every argument goes to the daemon.",
    )
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser(
        "run",
        parents=[client, sampling],
        help="one-shot: generate with the running daemon, else with a private one (nothing needs to be running)",
        description=(
            "Generate like `kakeya generate`, with the daemon that answers on the socket when it serves the model "
            "asked for; else start a private daemon on a temporary socket, show its progress while the model "
            "loads, generate, then shut it down. Which one is used is said on stderr."
        ),
    )
    p.add_argument(
        "--model",
        help="model to use: a Hugging Face-layout folder, a GGUF file, a hub repo id, or smollm2 "
        "(default: the running daemon's, else smollm2)",
    )
    _prompt_options(p)
    p.set_defaults(func=cmd_run)

    p = commands.add_parser(
        "chat",
        parents=[client, sampling],
        help="interactive chat using the model's chat template",
        description=(
            "Chat in the terminal. Each turn is sent as a chat message; the daemon keeps the conversation's cache, "
            "so only the new turn is computed. Commands: /reset (new conversation), /info, /help, /quit. "
            "Ctrl-C stops a reply, Ctrl-D quits."
        ),
    )
    p.add_argument("--system", metavar="TEXT", help="system message at the start of the conversation")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser(
        "generate",
        parents=[client, sampling],
        help="generate from a prompt (argument or stdin), streaming text to stdout",
        description="Continue a prompt (or answer it, with --chat) and stream the text to stdout.",
    )
    _prompt_options(p)
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser(
        "status",
        parents=[client],
        help="show the daemon's model, limits and counters",
        description="Show whether a daemon runs, and its model, limits and counters.",
    )
    p.add_argument("--json", action="store_true", help="print {'server': hello result, 'stats': stats result} as JSON")
    p.set_defaults(func=cmd_status)

    p = commands.add_parser(
        "sessions",
        parents=[client],
        help="list the daemon's sessions; save, restore or delete one by name",
        description=(
            "List the sessions the daemon holds, most recently used first: in memory, or in its session store "
            "until their next request; then the ones saved by name. With an action: "
            "'save SESSION NAME' saves a session under a name, 'restore NAME' makes a new session holding a saved "
            "conversation (a fork; prints its id), 'delete NAME' deletes a saved one."
        ),
    )
    p.add_argument("action", nargs="*", metavar="ACTION", help="save SESSION NAME | restore NAME | delete NAME")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the daemon's reply as JSON (listing: {'sessions': [...], 'saved': [...]})",
    )
    p.set_defaults(func=cmd_sessions)

    p = commands.add_parser(
        "stop",
        parents=[client],
        help="stop the daemon gracefully",
        description="Ask the daemon to stop, and wait until its socket is gone.",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=STOP_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for the socket to disappear (default: {STOP_WAIT_S:g})",
    )
    p.set_defaults(func=cmd_stop)

    add_service_parser(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "serve":
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.extra = extra
    try:
        code = args.func(args)
    except ConnectionFailed as exc:
        return _fail(exc.message, EXIT_NO_DAEMON)
    except KakeyaError as exc:
        return _fail(exc.message, EXIT_ERROR)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code or 0


def _fail(message: str, code: int) -> int:
    """One line on stderr, whatever the message holds."""
    print(f"kakeya: {' '.join(message.split())}", file=sys.stderr)
    return code


# ---- commands --------------------------------------------------------------


def cmd_serve(args) -> int:
    if importlib.util.find_spec("kakeya_daemon") is None:
        raise UsageError(
            f"the daemon (kakeya-mlx) is not installed for {sys.executable}: this is the client alone; "
            "install kakeya-mlx to serve a model here"
        )
    from kakeya_daemon.server import main as serve_main  # here, not at the top: the daemon's own imports

    return serve_main(args.extra)


def _connect(args) -> Client:
    return Client(args.socket, timeout=args.timeout)


def _sampling(args) -> dict:
    return {key: getattr(args, key) for key in SAMPLING_KEYS if getattr(args, key) is not None}


def _constraint(args) -> Optional[dict]:
    """The --json-schema file as a generate constraint, or None."""
    if args.json_schema is None:
        return None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--json-schema {args.json_schema}: {exc}") from None
    return {"type": "json_schema", "schema": schema}


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    else:
        if sys.stdin.isatty():
            print("reading the prompt from stdin; end it with Ctrl-D", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt:
        raise UsageError("the prompt is empty")
    return prompt


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    with _connect(args) as client:
        return _generate(client, args, prompt)


def _generate(client: Client, args, prompt: str) -> int:
    """Append the prompt to a fresh session and stream (or collect) the reply; the session is closed after."""
    constraint = _constraint(args)
    session = client.create_session()
    try:
        if args.chat or args.system is not None:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            appended = session.append(messages=messages + [{"role": "user", "content": prompt}])
        else:
            appended = session.append(text=prompt)
        stream = session.generate(**_sampling(args), constraint=constraint)
        show = None if args.json else _print_text
        text, tokens, interrupted = _consume(stream, show, _prefill_spinner(appended))
        done = stream.done
    finally:
        with contextlib.suppress(KakeyaError):
            session.close()
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "done": _done_dict(done)}, ensure_ascii=False))
    elif text and not text.endswith("\n") and sys.stdout.isatty():
        print()
    if done is not None and done.error is not None:
        raise done.error
    return EXIT_INTERRUPTED if interrupted else 0


def _print_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _prefill_spinner(appended: dict) -> Spinner:
    n = appended["appended"]
    return Spinner(f"reading the prompt ({n} token{'s' if n != 1 else ''})")


def _consume(stream: GenerateStream, show, spinner: Optional[Spinner] = None) -> tuple[str, list[int], bool]:
    """Read a stream to its done event; Ctrl-C cancels the generation and reads on to the end.

    `spinner` runs (on a terminal) until the first event: while the prompt is prefilled.
    """
    chunks, tokens, interrupted = [], [], False
    if spinner is not None:
        spinner.start()
    try:
        while True:
            try:
                for event in stream:
                    if spinner is not None:
                        spinner.stop()
                    if isinstance(event, TokensEvent):
                        chunks.append(event.text)
                        tokens.extend(event.tokens)
                        if show is not None and event.text:
                            show(event.text)
                break
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: stop waiting; closing the connection ends the generation
                    stream.client.close()
                    raise
                interrupted = True
                stream.cancel()
    finally:
        if spinner is not None:
            spinner.stop()
    return "".join(chunks), tokens, interrupted


def _done_dict(done: Optional[DoneEvent]) -> Optional[dict]:
    if done is None:
        return None
    out = {
        "stop_reason": done.stop_reason,
        "prompt_tokens": done.prompt_tokens,
        "generated_tokens": done.generated_tokens,
        "cached_tokens": done.cached_tokens,
        "timings": done.timings,
    }
    if done.error is not None:
        out["error"] = {"code": done.error.code, "message": done.error.message}
    return out


def cmd_run(args) -> int:
    prompt = _read_prompt(args)
    client = daemons.running_daemon(args.socket, args.model, args.timeout)
    if client is not None:
        with client:
            return _generate(client, args, prompt)
    if importlib.util.find_spec("kakeya_daemon") is None:
        raise ConnectionFailed(
            f"no kakeya daemon answers at {args.socket or default_socket_path()}, and none can be started here: "
            f"the daemon (kakeya-mlx) is not installed for {sys.executable}; install it, or start a daemon elsewhere"
        )
    with daemons.private_daemon(args.model, args.timeout) as client:
        return _generate(client, args, prompt)


def cmd_chat(args) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    with _connect(args) as client:
        model = client.server_info.get("model", {})
        if not model.get("has_chat_template", False):
            name = model.get("name", "")
            raise KakeyaError(f"the model {name!r} has no chat template; use `kakeya generate` for plain text")
        print(
            f"kakeya chat with {model.get('name', 'the model')}: /reset starts over, /info shows the session, "
            "/quit leaves. Ctrl-C stops a reply, Ctrl-D quits.",
            file=sys.stderr,
        )
        chat = _Chat(client, args)
        try:
            chat.loop()
        finally:
            chat.close()
    return 0


CHAT_HELP = """/reset  start a new conversation
/info   show this session's history and cache
/quit   leave (or Ctrl-D)"""


class _Chat:
    def __init__(self, client: Client, args):
        self.client = client
        self.args = args
        self.session: Session = client.create_session()
        self.started = False  # the system message goes with the first user turn

    def close(self) -> None:
        with contextlib.suppress(KakeyaError):
            self.session.close()

    def loop(self) -> None:
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not line.strip():
                continue
            if line.strip().startswith("/"):
                if not self.command(line.strip()):
                    return
                continue
            try:
                self.turn(line)
            except ConnectionFailed:
                raise
            except KakeyaError as exc:
                print(f"error: {exc.message}", file=sys.stderr)

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name = line.split()[0]
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/reset":
            self.close()
            self.session = self.client.create_session()
            self.started = False
            print("(new conversation)", file=sys.stderr)
        elif name == "/info":
            info = self.session.info()
            print(
                f"session {info['session_id']}: {info['history_length']} tokens of history, "
                f"{info['cache_length']} in the cache (sink {info['sink']} + window {info['window']}), "
                f"{info['evicted_tokens']} evicted, KV {_size(info['kv_bytes'])}",
                file=sys.stderr,
            )
        elif name in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
        else:
            print(f"unknown command {name}; try /help", file=sys.stderr)
        return True

    def turn(self, text: str) -> None:
        messages = []
        if not self.started and self.args.system is not None:
            messages.append({"role": "system", "content": self.args.system})
        messages.append({"role": "user", "content": text})
        appended = self.session.append(messages=messages)
        self.started = True
        stream = self.session.generate(**_sampling(self.args))
        _, _, interrupted = _consume(stream, _print_text, _prefill_spinner(appended))
        print()
        if interrupted:
            print("(stopped)", file=sys.stderr)
        if stream.done is not None and stream.done.error is not None:
            raise stream.done.error


def cmd_status(args) -> int:
    with _connect(args) as client:
        hello, stats = client.server_info, client.stats()
    if args.json:
        print(json.dumps({"server": hello, "stats": stats}, indent=2))
        return 0
    model, limits, http = hello.get("model", {}), hello.get("limits", {}), hello.get("http", {})
    sessions, gens, tokens = stats["sessions"], stats["generations"], stats["tokens"]
    memory, rates = stats["memory"], stats["tokens_per_s"]
    rejections = ", ".join(f"{k} {v}" for k, v in sorted(stats.get("rejections", {}).items())) or "none"
    budget = _size(memory["budget_bytes"]) if memory.get("budget_bytes") else "none"
    lines = [
        f"{hello.get('server', 'kakeya')} on {client.socket_path} (protocol {hello.get('protocol')}), "
        f"up {_duration(stats['uptime_s'])}",
        f"model:       {model.get('name')} ({model.get('model_type')}, {model.get('dtype')}, "
        f"{model.get('num_layers')} layers, vocab {model.get('vocab_size')})",
        f"cache:       sink {model.get('sink')} + window {model.get('window')}, block {model.get('block')}, "
        f"{_size(model.get('kv_bytes_per_token', 0))} per token",
        f"sampling:    {_defaults_text(hello.get('generation_defaults', {}))}",
        f"http:        {', '.join(http.get('urls', [])) if http.get('enabled') else 'off'}",
        f"sessions:    {sessions['active']} of {sessions['max']} "
        f"(evicted: {sessions['evicted_idle']} idle, {sessions['evicted_lru']} for memory)",
        *_store_lines(stats.get("store"), sessions.get("stored", 0)),
        f"generations: {gens['active']} running of {limits.get('max_concurrent_generations', '?')}, "
        f"{gens['queued']} queued, {gens['total']} done",
        f"tokens:      {tokens['in']} in at {rates['prefill']:.1f}/s, {tokens['out']} out at {rates['decode']:.1f}/s",
        f"memory:      {_size(memory.get('active_bytes', 0))} active, {_size(memory.get('peak_bytes', 0))} peak, "
        f"{_size(memory.get('kv_bytes', 0))} KV, budget {budget}",
        f"connections: {stats['connections']}, requests {stats['requests']}, rejections: {rejections}",
    ]
    print("\n".join(lines))
    return 0


def _store_lines(store: Optional[dict], stored: int) -> list[str]:
    """`kakeya status`'s line about the session store (none from a daemon that has no word on it)."""
    if store is None:
        return []
    if not store["enabled"]:
        return ["store:       none (sessions leaving memory are closed)"]
    return [
        f"store:       {stored} stored, {store['saved_sessions']} saved by name, {_size(store['bytes'])} of "
        f"{_size(store['max_bytes'])} in {store['directory']} ({store['eviction']}; {store['spilled']} spilled, "
        f"{store['restored']} restored, {store['lost']} lost)"
    ]


def cmd_sessions(args) -> int:
    if args.action:
        return _session_store_action(args)
    with _connect(args) as client:
        listing = client.call("list_sessions")
    sessions, saved = listing["sessions"], listing.get("saved", [])
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not sessions and not saved:
        print("no sessions")
        return 0
    now = time.time()

    def last_used(s: dict) -> float:
        return s.get("last_used_at", s.get("stored_at", 0.0))

    header = ("SESSION", "HISTORY", "CACHE", "EVICTED", "KV", "STATE", "IDLE")
    rows = [
        (
            s["session_id"],
            str(s.get("history_length", "?")),
            str(s.get("cache_length", "?")),
            str(s.get("evicted_tokens", "?")),
            _size(s["kv_bytes"]) if s.get("state", "resident") == "resident" else "-",
            _session_state(s),
            _duration(max(0.0, now - last_used(s))),
        )
        for s in sorted(sessions, key=last_used, reverse=True)
    ]
    _print_table(header, rows, left_aligned=(0, 5))  # the id and the state; numbers align right
    if saved:
        if rows:
            print()
        header = ("SAVED", "HISTORY", "SIZE", "AGE", "FROM")
        rows = [
            (
                s["name"],
                str(s.get("history_length", "?")),
                _size(s["stored_bytes"]),
                _duration(max(0.0, now - s["saved_at"])) if s.get("saved_at") else "?",
                s.get("from_session", s.get("error", "")),
            )
            for s in saved
        ]
        _print_table(header, rows, left_aligned=(0, 4))
    return 0


def _session_state(s: dict) -> str:
    state = s.get("state", "resident")
    if state == "resident":
        return "generating" if s["generating"] else "idle"
    if state == "stored" and "stored_bytes" in s:
        return f"stored ({_size(s['stored_bytes'])})"
    return state


def _print_table(header: tuple, rows: list[tuple], left_aligned: tuple) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [c.ljust(w) if i in left_aligned else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


_STORE_ACTIONS = {"save": ("SESSION", "NAME"), "restore": ("NAME",), "delete": ("NAME",)}


def _session_store_action(args) -> int:
    """`kakeya sessions save SESSION NAME | restore NAME | delete NAME`."""
    verb, *words = args.action
    if verb not in _STORE_ACTIONS or len(words) != len(_STORE_ACTIONS[verb]):
        usage = " | ".join(" ".join([v, *w]) for v, w in _STORE_ACTIONS.items())
        raise UsageError(f"sessions: expected {usage}, not {' '.join(args.action)!r}")
    with _connect(args) as client:
        if verb == "save":
            result = client.session(words[0]).save(words[1])
            line = f"saved session {words[0]} as {words[1]} ({_size(result['stored_bytes'])} in {result['save_s']:.2f}s)"
        elif verb == "restore":
            result = client.call("restore_session", {"name": words[0]})
            line = result["session_id"]  # alone, for scripts: SID=$(kakeya sessions restore NAME)
        else:
            client.delete_saved(words[0])
            result, line = {"deleted": True}, f"deleted {words[0]}"
    print(json.dumps(result, indent=2) if args.json else line)
    return 0


def cmd_stop(args) -> int:
    with _connect(args) as client:
        path = client.socket_path
        client.shutdown()
    deadline = time.monotonic() + args.wait
    while path.exists():
        if time.monotonic() > deadline:
            raise KakeyaError(f"the daemon at {path} is still running {args.wait:g}s after the shutdown request")
        time.sleep(0.05)
    print(f"stopped the kakeya daemon at {path}")
    return 0


# ---- formatting ------------------------------------------------------------


def _defaults_text(defaults: dict) -> str:
    """What a generate that leaves settings out gets, e.g. 'temperature 0.4, top_p 0.9 (model), ...'."""
    if not defaults:
        return "unknown (an older daemon)"
    sources = defaults.get("sources", {})
    parts = [
        f"{name} {defaults[name]:g}" + (" (model)" if sources.get(name) == "model" else "")
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        if name in defaults
    ]
    return ", ".join(parts) + f"; max_tokens {defaults.get('max_tokens')}"


def _size(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
